"""Hugging Face folders never run their own Python: ``auto_map`` (classes from ``*.py`` files
beside the weights, loaded only with ``trust_remote_code=True``) is ignored when a tokenizer is
loaded, and dropped from an export's JSON files."""

from __future__ import annotations

import json
import os
import shutil

from mt_dialog.convert.hf_checkpoint import _strip_remote_code
from mt_dialog.data.tokenizers import load_tokenizer


def _with_remote_code(folder: str, marker: str) -> None:
    """Point the folder's tokenizer_config.json at a tokenizer class in a .py file that would
    create ``marker`` when imported."""
    with open(os.path.join(folder, "tokenization_evil.py"), "w", encoding="utf-8") as handle:
        handle.write(f"open({marker!r}, 'w').close()\n"
                     "from transformers import PreTrainedTokenizerFast as EvilTokenizer\n")
    path = os.path.join(folder, "tokenizer_config.json")
    with open(path, encoding="utf-8") as handle:
        config = json.load(handle)
    config["auto_map"] = {"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle)


def test_a_tokenizer_folder_with_remote_code_loads_without_running_it(hf_tokenizer_dir,
                                                                       tmp_path):
    folder, marker = str(tmp_path / "tok"), str(tmp_path / "marker")
    shutil.copytree(hf_tokenizer_dir, folder)
    _with_remote_code(folder, marker)
    try:
        tokenizer = load_tokenizer("huggingface", folder)
    except ValueError as exc:  # a refusal is fine too; running the file is not
        assert "remote" in str(exc) or "auto_map" in str(exc) or "trust" in str(exc), exc
    else:
        assert tokenizer.encode("hello") == load_tokenizer("huggingface",
                                                           hf_tokenizer_dir).encode("hello")
    assert not os.path.exists(marker)


def test_export_drops_auto_map(tmp_path):
    for name in ("config.json", "tokenizer_config.json"):
        with open(tmp_path / name, "w", encoding="utf-8") as handle:
            json.dump({"auto_map": {"AutoConfig": "configuration_x.XConfig"}, "keep": 1}, handle)
    _strip_remote_code(str(tmp_path))
    for name in ("config.json", "tokenizer_config.json"):
        with open(tmp_path / name, encoding="utf-8") as handle:
            assert json.load(handle) == {"keep": 1}
