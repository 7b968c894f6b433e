"""Checkpoints from others never run code (``training.safe_pickle``): payload pickles in
``.metadata``, ``common.pt``, a sharded object (a byte entry of a ``.distcp`` file) and a
Transformer Engine extra state are refused, naming the file, by the check itself and by every
user path that opens a checkpoint (resume, chat, export, a LoRA run's base); a marker file the
payload would create never appears. A clean checkpoint passes, and the check is cached.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil

import pytest
import torch

from tests.training.conftest import iteration_dir, launch, train_args
from tests.training.launch import tool_here


class Payload:
    """Unpickling this runs ``touch MARKER`` (what an attacker's file would do)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _metadata(folder: str):
    with open(os.path.join(folder, ".metadata"), "rb") as handle:
        return pickle.load(handle)  # our own, clean file


def _write_metadata(folder: str, metadata) -> None:
    with open(os.path.join(folder, ".metadata"), "wb") as handle:
        pickle.dump(metadata, handle)


def _replace_byte_entry(folder: str, prefix: str, data: bytes) -> None:
    """Point the first byte entry whose name starts with ``prefix`` at ``data``, appended to its
    ``.distcp`` file (index rewritten, as an attacker with write access would)."""
    metadata = _metadata(folder)
    index = next(i for i in metadata.storage_data if i.fqn.startswith(prefix))
    info = metadata.storage_data[index]
    path = os.path.join(folder, info.relative_path)
    offset = os.path.getsize(path)
    with open(path, "ab") as handle:
        handle.write(data)
    metadata.storage_data[index] = type(info)(info.relative_path, offset, len(data))
    _write_metadata(folder, metadata)


def _saved(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def poison(folder: str, kind: str, marker: str) -> str:
    """Put a payload of ``kind`` into the iteration folder ``folder``; the file it is in."""
    if kind == "metadata":
        with open(os.path.join(folder, ".metadata"), "wb") as handle:
            pickle.dump(Payload(marker), handle)
        return ".metadata"
    if kind == "common":
        common = torch.load(os.path.join(folder, "common.pt"), weights_only=True)
        torch.save({**common, "scheduler": Payload(marker)}, os.path.join(folder, "common.pt"))
        return "common.pt"
    if kind == "sharded_object":
        _replace_byte_entry(folder, "rng_state", _saved([{"python": Payload(marker)}]))
        return ".distcp"
    if kind == "extra_state":  # an FP8 state TE would pickle.loads: a uint8 tensor of a pickle
        blob = torch.frombuffer(bytearray(pickle.dumps(Payload(marker))), dtype=torch.uint8)
        _replace_byte_entry(folder, "decoder.layers.self_attention.linear_qkv._extra_state",
                            _saved(blob.clone()))
        return ".distcp"
    raise ValueError(kind)


KINDS = ("metadata", "common", "sharded_object", "extra_state")


def _poisoned_copy(saved_run, tmp_path, kind: str):
    root, marker = str(tmp_path / f"ckpt_{kind}"), str(tmp_path / f"marker_{kind}")
    shutil.copytree(saved_run["ckpt"], root)
    where = poison(iteration_dir(root, 2), kind, marker)
    return root, marker, where


def test_a_clean_checkpoint_passes_and_is_checked_once(saved_run, monkeypatch):
    from mt_dialog.training import safe_pickle

    folder = iteration_dir(saved_run["ckpt"], 2)
    safe_pickle.check_checkpoint_folder(folder)
    calls = []
    monkeypatch.setattr(safe_pickle, "_check_byte_entries", lambda f: calls.append(f))
    safe_pickle.check_checkpoint_folder(folder)
    assert calls == []  # unchanged folder: cached


@pytest.mark.parametrize("kind", KINDS)
def test_every_payload_is_refused_without_running(saved_run, tmp_path, kind):
    from mt_dialog.training.safe_pickle import UntrustedCheckpointError, check_checkpoint_folder

    root, marker, where = _poisoned_copy(saved_run, tmp_path, kind)
    with pytest.raises(UntrustedCheckpointError) as info:
        check_checkpoint_folder(iteration_dir(root, 2))
    message = str(info.value)
    assert where in message and "system" in message and "refused" in message, message
    assert not os.path.exists(marker)


def test_a_byte_entry_outside_the_folder_is_refused(saved_run, tmp_path):
    from mt_dialog.training.safe_pickle import UntrustedCheckpointError, check_checkpoint_folder

    root = str(tmp_path / "ckpt")
    shutil.copytree(saved_run["ckpt"], root)
    folder = iteration_dir(root, 2)
    metadata = _metadata(folder)
    index = next(i for i in metadata.storage_data if i.fqn.startswith("rng_state"))
    info = metadata.storage_data[index]
    metadata.storage_data[index] = type(info)("../../elsewhere.distcp", 0, 10)
    _write_metadata(folder, metadata)
    with pytest.raises(UntrustedCheckpointError, match="outside the checkpoint folder"):
        check_checkpoint_folder(folder)


@pytest.mark.multiprocess  # launches pretrain_dialog.py (resume, LoRA base)
def test_user_paths_refuse_payloads_without_running(saved_run, tmp_path):
    """Resume, chat, export and a LoRA run on a poisoned base: each exits with the file named,
    no traceback, no marker (one payload kind per path; every kind is covered above). Training
    runs as a fresh process; chat and export through their tools' ``main`` here (their command
    lines are launched in tests/convert)."""
    from tools.chat import main as chat_main
    from tools.convert_checkpoint import main as convert_main

    cases = {
        "resume": ("metadata", lambda root: launch(1, train_args(
            saved_run["data"], "--load", root, iters=3), expect_ok=False)),
        "chat": ("sharded_object", lambda root: tool_here(
            chat_main, "--load", root, "--message", "hi", "--max-new-tokens", "2",
            expect_ok=False)),
        "export": ("common", lambda root: tool_here(
            convert_main, "mcore-to-hf", "--load-dir", root, "--save-dir",
            str(tmp_path / "hf_out"), "--no-progress", expect_ok=False)),
        "lora_base": ("extra_state", lambda root: launch(1, train_args(
            saved_run["data"], "--pretrained-checkpoint", root, "--lora-rank", "2",
            iters=1), expect_ok=False)),
    }
    for name, (kind, run) in cases.items():
        root, marker, where = _poisoned_copy(saved_run, tmp_path / name, kind)
        proc = run(root)
        output = proc.stdout + proc.stderr
        assert proc.returncode != 0, (name, output[-2000:])
        assert "refused to read this checkpoint file" in output and where in output, \
            (name, output[-2000:])
        assert "Traceback" not in output, (name, output[-3000:])
        assert not os.path.exists(marker), name


def test_a_real_fp8_extra_state_passes(saved_run, tmp_path):
    """What Transformer Engine saves for an FP8 module (a uint8 tensor of a pickled dict of CPU
    tensors and plain values) is allowed; only its globals are checked."""
    from mt_dialog.training.safe_pickle import check_checkpoint_folder

    root = str(tmp_path / "ckpt")
    shutil.copytree(saved_run["ckpt"], root)
    state = {"recipe": None, "scale_fwd": torch.ones(3), "amax_history_fwd": torch.zeros(4, 3),
             "extra_fp8_variables": {"num_gemms": 1, "fp8_max_fwd": 448.0, "sizes": (1, 2)}}
    blob = torch.frombuffer(bytearray(pickle.dumps(state)), dtype=torch.uint8)
    _replace_byte_entry(iteration_dir(root, 2),
                        "decoder.layers.self_attention.linear_qkv._extra_state", _saved(blob.clone()))
    check_checkpoint_folder(iteration_dir(root, 2))


def test_a_te1_extra_state_of_torch_save_bytes_is_checked_as_such(saved_run, tmp_path):
    """TE 1.x kept its FP8 state as a uint8 tensor of ``torch.save`` bytes (read back with
    ``torch.load``): a clean one passes, one holding a payload is refused."""
    from mt_dialog.training.safe_pickle import UntrustedCheckpointError, check_checkpoint_folder

    entry = "decoder.layers.self_attention.linear_qkv._extra_state"
    for state, refused in (({"fp8_meta": None, "scale": torch.ones(2)}, False),
                           ({"fp8_meta": Payload(str(tmp_path / "marker"))}, True)):
        root = str(tmp_path / f"ckpt_{refused}")
        shutil.copytree(saved_run["ckpt"], root)
        saved = _saved(state)
        blob = torch.frombuffer(bytearray(saved), dtype=torch.uint8).clone()
        _replace_byte_entry(iteration_dir(root, 2), entry, _saved(blob))
        if refused:
            with pytest.raises(UntrustedCheckpointError, match="system"):
                check_checkpoint_folder(iteration_dir(root, 2))
        else:
            check_checkpoint_folder(iteration_dir(root, 2))
    assert not os.path.exists(tmp_path / "marker")
