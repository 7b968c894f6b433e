"""Damaged datasets are refused when opened, naming the file, the expected and found values and
the fix; ``--verify`` tells a damaged or swapped file from a good one by the checksums recorded
at preprocessing; preprocessing killed at any point leaves no dataset at its prefix, and the
next run removes (and names) what it left."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.inspect import verify_dataset
from mt_dialog.data.storage import DatasetFormatError, metadata_path, output_files
from tests.conftest import ROOT, openai, preprocess_args, write_jsonl
from tools.preprocess_dialog import main as preprocess

SPLITS = ("train", "valid")


def _records(count, seed=0):
    return [openai((f"Question {seed}-{i}: what is {i} plus {i}?", f"It is {2 * i}."),
                   (f"And {i} times {seed + 1}?", f"{i * (seed + 1)}."))
            for i in range(count)]


@pytest.fixture(scope="module")
def built(sp_model_path, tmp_path_factory):
    """Two small datasets with the same tokenizer and layout but other conversations, and a
    rebuild of the first one's conversations in another pack order (files of the same sizes)."""
    root = tmp_path_factory.mktemp("damage")
    prefixes = {}
    for name, seed, count, extra in (("a", 0, 60, []), ("b", 1, 45, []),
                                     ("a_unshuffled", 0, 60, ["--no-shuffle"])):
        data = write_jsonl(root / f"{name}.jsonl", _records(count, seed=seed))
        prefixes[name] = str(root / name)
        assert preprocess(preprocess_args(data, sp_model_path, prefixes[name],
                                          "--split", "90,10", *extra)) == 0
    return prefixes


@pytest.fixture
def copy(built, tmp_path):
    """A fresh copy of dataset a, to damage."""
    target = str(tmp_path / "copy")
    for source, destination in zip(output_files(built["a"], SPLITS),
                                   output_files(target, SPLITS)):
        shutil.copy2(source, destination)
    return target


def _refused(prefix, *fragments):
    with pytest.raises(DatasetFormatError) as caught:
        PackedDialogDataset(prefix, "train")
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def _as_older_dataset(prefix, *keys):
    """Remove metadata records (as datasets written before them lack them)."""
    metadata = json.load(open(metadata_path(prefix)))
    for key in ("metadata_sha256", *keys):
        del metadata[key]
    json.dump(metadata, open(metadata_path(prefix), "w"))


def test_metadata_records_every_file(built):
    metadata = json.load(open(metadata_path(built["a"])))
    assert sorted(metadata["files"]) == sorted(
        os.path.basename(p)[2:] for p in output_files(built["a"], SPLITS)[:-1])
    for name, entry in metadata["files"].items():
        assert entry["bytes"] == os.path.getsize(f"{built['a']}.{name}")
        assert len(entry["sha256"]) == len(entry["probe_sha256"]) == 64
    assert len(metadata["metadata_sha256"]) == 64
    assert verify_dataset(built["a"]) == []


@pytest.mark.parametrize("change, words", [(-1024, "cut short"), (-1, "cut short"),
                                           (512, "too long")])
def test_a_bin_of_another_size_is_refused_at_open(copy, change, words):
    path = f"{copy}.train.tokens.bin"
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size + change)
    _refused(copy, path, f"has {size + change:,} bytes", f"says {size:,}", words,
             f"tools/inspect_dialog_dataset.py {copy} --verify")


def test_a_bin_cut_short_without_metadata_record_is_refused_by_its_index(copy):
    """Datasets written before the metadata recorded file sizes: the .idx still tells."""
    _as_older_dataset(copy, "files")
    path = f"{copy}.train.loss_token_num.bin"
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size - 100)
    _refused(copy, path, "its index copy.train.loss_token_num.idx says", "cut short")


def test_a_swapped_index_is_refused(copy, built):
    shutil.copy2(f"{built['b']}.train.tokens.idx", f"{copy}.train.tokens.idx")
    _refused(copy, f"{copy}.train.tokens.idx", "the dataset's metadata says")


def test_a_swapped_index_is_refused_without_metadata_record(copy, built):
    _as_older_dataset(copy, "files")
    shutil.copy2(f"{built['b']}.train.tokens.idx", f"{copy}.train.tokens.idx")
    _refused(copy, "train.tokens")


@pytest.mark.parametrize("name", ["train.tokens.bin", "train.loss_token_num.idx"])
def test_a_file_of_the_same_size_from_another_build_is_refused_at_open(copy, built, name):
    """The same conversations packed in another order: every size equal, the bytes not."""
    source, target = f"{built['a_unshuffled']}.{name}", f"{copy}.{name}"
    assert os.path.getsize(source) == os.path.getsize(target)
    shutil.copy2(source, target)
    _refused(copy, target, "first and last bytes differ", "swapped or edited")


def test_a_damaged_index_header_is_refused(copy):
    path = f"{copy}.train.tokens.idx"
    with open(path, "r+b") as handle:
        handle.write(b"NOTANIDX!")
    _refused(copy, path)


@pytest.mark.parametrize("edit", [
    lambda m: m["splits"]["train"].update(packs=m["splits"]["train"]["packs"] + 1),
    lambda m: m["tokenizer"].update(vocab_size=300),
    lambda m: m.update(seq_length=4096),
    lambda m: m.update(template="llama2"),
])
def test_edited_metadata_is_refused(copy, edit):
    metadata = json.load(open(metadata_path(copy)))
    edit(metadata)
    json.dump(metadata, open(metadata_path(copy), "w"))
    _refused(copy, f"{copy}.meta.json was edited after preprocessing")


def test_edited_counts_of_an_older_dataset_are_refused(copy):
    _as_older_dataset(copy)
    metadata = json.load(open(metadata_path(copy)))
    metadata["splits"]["train"]["packs"] += 1
    json.dump(metadata, open(metadata_path(copy), "w"))
    _refused(copy, "packs but the metadata", "records")


def test_verify_reads_every_byte(copy):
    """Opening reads each file's size and ends; --verify reads every byte against the
    checksums, and goes on to the invariants."""
    _as_older_dataset(copy)  # no probe recorded: only --verify can tell
    metadata = json.load(open(metadata_path(copy)))
    for entry in metadata["files"].values():
        del entry["probe_sha256"]
    json.dump(metadata, open(metadata_path(copy), "w"))
    path = f"{copy}.train.tokens.bin"
    with open(path, "r+b") as handle:
        handle.seek(10)
        byte = handle.read(1)
        handle.seek(10)
        handle.write(bytes([byte[0] ^ 1]))
    assert len(PackedDialogDataset(copy, "train")) > 0
    problems = verify_dataset(copy)
    assert path in problems[0] and "swapped or edited" in problems[0], problems
    assert "--verify" not in problems[0] and "copy it again or rebuild it" in problems[0]


# ------------------------------------------------------------------ preprocessing interrupted

KILL_WORKER = os.path.join(ROOT, "tests", "data", "kill_worker.py")


@pytest.mark.parametrize("point, workers", [("tokenizing", "1"), ("tokenizing", "2"),
                                            ("writing", "1"), ("publishing", "1")])
def test_preprocessing_killed_leaves_no_dataset_and_the_next_run_cleans_up(
        point, workers, sp_model_path, tmp_path):
    data = write_jsonl(tmp_path / "in.jsonl", _records(200))
    prefix = str(tmp_path / "out")
    argv = preprocess_args(data, sp_model_path, prefix, "--workers", workers)
    killed = subprocess.run([sys.executable, KILL_WORKER, point, *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = sorted(p for p in os.listdir(tmp_path) if ".tmp-" in p)
    assert leftovers, "the killed run should have left its temporary folder"
    assert not os.path.exists(metadata_path(prefix))  # no dataset at the prefix
    with pytest.raises(DatasetFormatError):
        PackedDialogDataset(prefix, "train")
    again = subprocess.run([sys.executable, "tools/preprocess_dialog.py", *argv, "--overwrite"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    for name in leftovers:
        assert f"removed {tmp_path / name}, left by an interrupted run" in again.stderr
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert verify_dataset(prefix) == []


def test_a_running_preprocessing_of_the_same_prefix_is_refused(sp_model_path, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", _records(5))
    prefix = str(tmp_path / "out")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        os.makedirs(f"{prefix}.tmp-{other.pid}")
        assert preprocess(preprocess_args(data, sp_model_path, prefix)) == 1
    finally:
        other.kill()
        other.wait()
    assert (f"{prefix}.tmp-{other.pid} belongs to a preprocessing run that is still running "
            f"(pid {other.pid})") in capsys.readouterr().err
    assert os.path.isdir(f"{prefix}.tmp-{other.pid}")  # another run's folder is not touched


def test_a_token_id_outside_the_vocabulary_is_refused_when_its_pack_is_read(sp_model_path,
                                                                           tmp_path):
    """A byte changed in the middle of tokens.bin (the open-time probe reads 64 KiB at each
    end) makes an id no tokenizer gave: the pack holding it is refused when read, never
    embedded."""
    import numpy as np

    from mt_dialog.data.storage import PROBE_BYTES, field_prefix

    copy = str(tmp_path / "big")
    data = write_jsonl(tmp_path / "big.jsonl", _records(1500))
    assert preprocess(preprocess_args(data, sp_model_path, copy, "--split", "100,0")) == 0
    dataset = PackedDialogDataset(copy, "train")
    assert os.path.getsize(field_prefix(copy, "train", "tokens") + ".bin") > 3 * PROBE_BYTES
    assert dataset.tokens.index.dtype == np.uint16 and dataset.vocab_size < 2 ** 16 - 1
    middle = len(dataset) // 2
    start = int(dataset.documents[middle])
    offset = int(dataset.tokens.index.sequence_pointers[start]) + 2  # its second token
    with open(field_prefix(copy, "train", "tokens") + ".bin", "r+b") as handle:
        handle.seek(offset)
        handle.write(np.array([2 ** 16 - 1], dtype=np.uint16).tobytes())
    damaged = PackedDialogDataset(copy, "train")  # opens: the ends are intact
    damaged[middle - 1]
    with pytest.raises(DatasetFormatError, match=f"pack {middle} holds token id 65535, "
                                                 "outside the dataset's vocabulary"):
        damaged[middle]


def test_preprocessing_refuses_ids_outside_the_tokenizers_vocabulary(sp_model_path):
    """The guard itself: a record whose rendered ids reach past ``vocab_size`` is refused (a
    counted error under --on-error skip), never narrowed into another id by the staging dtype."""
    from mt_dialog.data.readers import RawRecord
    from mt_dialog.data.records import RecordProcessor

    processor = RecordProcessor("sentencepiece", sp_model_path, "chatml", None, 64, None)
    record = RawRecord("x.jsonl", 1, raw=json.dumps(
        openai(("What is 2 plus 2?", "It is 4."))).encode())
    assert processor.process([(0, record)])[0].status == "ok"
    processor.vocab_size = 5  # as if the tokenizer gave ids past its size
    refused = processor.process([(0, record)])[0]
    assert refused.status == "error" and refused.reason == "token_id_out_of_range", refused


def test_staging_folders_of_other_hosts_are_never_removed(sp_model_path, tmp_path, capsys):
    """On a shared file system a staging folder named after another host may be that node's
    live run: refused naming the host and left alone; this host's dead run's folder is removed."""
    from mt_dialog import files

    data = write_jsonl(tmp_path / "in.jsonl", _records(5))
    prefix = str(tmp_path / "out")
    other = f"{prefix}.tmp-gpu-node-12-31337"
    os.makedirs(other)
    assert preprocess(preprocess_args(data, sp_model_path, prefix)) == 1
    err = capsys.readouterr().err
    assert f"{other} belongs to a preprocessing run on host gpu-node-12 (pid 31337)" in err
    assert os.path.isdir(other)
    os.rmdir(other)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = f"{prefix}.tmp-{files.host()}-{dead.pid}"
    os.makedirs(mine)
    assert preprocess(preprocess_args(data, sp_model_path, prefix)) == 0
    assert f"removed {mine}, left by an interrupted run" in capsys.readouterr().err
    assert not os.path.exists(mine)
