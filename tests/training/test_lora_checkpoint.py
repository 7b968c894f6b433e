"""The LoRA base pointer records every byte of the base (``lora_checkpoint.file_records``): a
base changed in the middle of a large file, where the older first-and-last-MiB fingerprint saw
nothing, is found; an untouched base is checked by ``stat`` alone."""

from __future__ import annotations

import os

from mt_dialog.training import lora_checkpoint
from mt_dialog.training.lora_checkpoint import changed_files, file_records, fingerprint


def _base(tmp_path) -> str:
    folder = tmp_path / "iter_0000000"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(os.urandom(5 << 20))  # 5 MiB: past 2 x 1 MiB
    (folder / "common.pt").write_bytes(b"common")
    return str(folder)


def test_a_change_in_the_middle_of_a_large_file_is_found(tmp_path):
    folder = _base(tmp_path)
    records, old_rule = file_records(folder), fingerprint(folder)
    assert changed_files(folder, records) == []
    shard = os.path.join(folder, "__0_0.distcp")
    with open(shard, "r+b") as handle:
        handle.seek(os.path.getsize(shard) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 1]))
    assert fingerprint(folder) == old_rule  # what the older rule missed
    assert changed_files(folder, records) == ["__0_0.distcp"]


def test_an_untouched_base_is_not_read_again(tmp_path, monkeypatch):
    folder = _base(tmp_path)
    records = file_records(folder)
    monkeypatch.setattr(lora_checkpoint, "_sha256_file", lambda path: 1 / 0)
    assert changed_files(folder, records) == []  # same size and mtime: no read


def test_a_rewritten_file_with_the_same_bytes_is_unchanged(tmp_path):
    """A copy or a re-import writes the files again (new mtime): their full hash decides."""
    folder = _base(tmp_path)
    records = file_records(folder)
    shard = os.path.join(folder, "__0_0.distcp")
    data = open(shard, "rb").read()
    os.remove(shard)
    with open(shard, "wb") as handle:
        handle.write(data)
    os.utime(shard, ns=(1, 1))
    assert changed_files(folder, records) == []
    (tmp_path / "iter_0000000" / "extra.bin").write_bytes(b"x")
    assert changed_files(folder, records) == ["extra.bin"]
