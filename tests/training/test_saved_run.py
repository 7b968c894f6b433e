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
