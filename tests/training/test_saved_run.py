"""The run's tokenizer is the one it trained with (``saved_run.run_tokenizer``): files changed
at the recorded path since training are refused naming both hashes, or replaced by the run's
own copy (CKPT/tokenizer) when it has one; chat and export share this check."""

from __future__ import annotations

import os
import shutil

import pytest

from mt_dialog.data.tokenizers import load_tokenizer
from mt_dialog.training.saved_run import SavedRunError, run_tokenizer


def _record(path: str) -> dict:
    tokenizer = load_tokenizer("sentencepiece", path)
    return {"tokenizer": {"type": "sentencepiece", "path": path, "sha256": tokenizer.sha256,
                          "added_tokens": {}}}


def test_a_tokenizer_swapped_after_training_is_refused(demo_tokenizer, sp_model_path,
                                                       tmp_path):
    recorded = str(tmp_path / "tokenizer.model")
    shutil.copy(demo_tokenizer["tokenizer"], recorded)
    data = _record(recorded)
    run = str(tmp_path / "ckpt")
    os.makedirs(run)
    assert run_tokenizer(run, data, None).sha256 == data["tokenizer"]["sha256"]
    shutil.copy(sp_model_path, recorded)  # another tokenizer at the recorded path
    with pytest.raises(SavedRunError, match="not the one the run .* trained with"):
        run_tokenizer(run, data, None)


def test_the_runs_own_copy_replaces_changed_files(demo_tokenizer, sp_model_path, tmp_path):
    recorded = str(tmp_path / "tokenizer.model")
    shutil.copy(demo_tokenizer["tokenizer"], recorded)
    data = _record(recorded)
    run = str(tmp_path / "ckpt")
    os.makedirs(os.path.join(run, "tokenizer"))
    shutil.copy(recorded, os.path.join(run, "tokenizer", "tokenizer.model"))
    shutil.copy(sp_model_path, recorded)
    tokenizer = run_tokenizer(run, data, None)
    assert tokenizer.sha256 == data["tokenizer"]["sha256"]
    assert os.path.dirname(tokenizer.path) == os.path.join(run, "tokenizer")


def test_each_checkpoint_carries_its_run_record(saved_run):
    """Every save writes iter_N/run.json; the run's end writes the same record as config.json."""
    import json

    from tests.training.conftest import iteration_dir

    with open(os.path.join(iteration_dir(saved_run["ckpt"], 2), "run.json")) as handle:
        record = json.load(handle)
    with open(os.path.join(saved_run["ckpt"], "config.json")) as handle:
        assert json.load(handle) == record
    assert record["data"]["prefixes"] == [saved_run["data"]] and record["command"]


def test_the_iterations_own_record_wins_over_a_stale_one(saved_run, tmp_path):
    """A resumed run on other data that died before its end left the root config.json of the
    earlier run: chat and export read the newest iteration's own record."""
    import json

    from mt_dialog.training.saved_run import read_run_info

    root = str(tmp_path / "ckpt")
    shutil.copytree(saved_run["ckpt"], root)
    path = os.path.join(root, "config.json")
    with open(path) as handle:
        stale = json.load(handle)
    stale["data"]["prefixes"] = ["/elsewhere/other_data"]
    with open(path, "w") as handle:
        json.dump(stale, handle)
    assert read_run_info(root)["data"]["prefixes"] == [saved_run["data"]]


def test_a_record_cut_mid_write_leaves_the_last_good_one(saved_run, tmp_path, monkeypatch):
    """A crash or a full disk while config.json is written (here: json.dump failing after half
    the record) leaves the previous record whole; the next write removes the leftover."""
    import json

    from mt_dialog import files
    from mt_dialog.training.saved_run import read_run_info, write_run_record

    root = str(tmp_path / "ckpt")
    shutil.copytree(saved_run["ckpt"], root)
    os.remove(os.path.join(root, "iter_0000002", "run.json"))  # as written by earlier versions
    before = read_run_info(root)
    real_dump = json.dump

    def dump_half(value, handle, **kwargs):
        handle.write(json.dumps(value)[:50])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_half)
    with pytest.raises(OSError):
        write_run_record(root, ["x"], {"model": {}}, None, None)
    monkeypatch.setattr(json, "dump", real_dump)
    assert read_run_info(root) == before
    assert not files.leftovers(os.path.join(root, "config.json"))
