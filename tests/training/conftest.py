"""Fixtures and helpers of the end-to-end training tests (pretrain_dialog.py under torchrun).

``packed_data`` builds, once per session, a small packed dataset from the built-in demo corpus
(``demo_tokenizer`` of tests/conftest.py: 300 conversations and the SentencePiece tokenizer of
``mt_dialog.demo``; ChatML, --seq-length 256);
``text_data`` plain-text documents with the same tokenizer (continued pretraining, for
blending; some longer than --seq-length: split). ``launch`` runs
pretrain_dialog.py (``launch.run``: torchrun for several processes, plain python for one) and
captures its output;
``parse_iters`` / ``parse_validation`` read the log lines; ``read_checkpoint`` loads every tensor
of a dist_checkpointing folder in this (non-distributed) process.
"""

from __future__ import annotations

import os
import re
import subprocess
import warnings
from typing import Dict, List, Sequence

import pytest

from tests.training.launch import REPO, run

SCRIPT = "pretrain_dialog.py"
SEQ_LENGTH = 256
MODEL_ARGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]


# ----------------------------------------------------------------------------------- launching

def launch(nproc: int, args: Sequence[str], expect_ok: bool = True,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """Run pretrain_dialog.py with ``args`` (``launch.run``): under torchrun with ``nproc``
    processes, or as one plain process when ``nproc == 1`` (WORLD_SIZE defaults to 1). With
    ``expect_ok`` a non-zero exit fails the test showing the whole output; otherwise the result
    is returned as is."""
    return run(SCRIPT, nproc, args, timeout=timeout, expect_ok=expect_ok)


def train_args(prefix, *extra, iters: int = 6, lr: float = 1e-2) -> List[str]:
    """The common flags of a small run on ``prefix`` (a list of prefixes/weights for a blend)."""
    data = list(prefix) if isinstance(prefix, (list, tuple)) else [prefix]
    return ["--data-path", *map(str, data), "--micro-batch-size", "2", "--global-batch-size",
            "8", "--train-iters", str(iters), "--log-interval", "1", "--lr", str(lr),
            *MODEL_ARGS, *map(str, extra)]


# ------------------------------------------------------------------------------------- parsing

_NUM = r"([-+0-9.eE]+|nan|inf)"
ITER_LINE = re.compile(rf"^iter\s+(\d+)/(\d+) \| loss/turn {_NUM} \| loss/token {_NUM} \| "
                       rf"lr {_NUM} \| grad norm {_NUM} \|", re.M)
VALID_LINE = re.compile(rf"^validation at iter (\d+) \| loss/turn {_NUM} \| loss/token {_NUM}",
                        re.M)


def parse_iters(stdout: str) -> List[Dict[str, float]]:
    """Every ``iter N/T | ...`` log line, in order."""
    return [{"iter": int(m[1]), "total": int(m[2]), "loss_turn": float(m[3]),
             "loss_token": float(m[4]), "lr": float(m[5]), "grad_norm": float(m[6])}
            for m in ITER_LINE.finditer(stdout)]


def parse_validation(stdout: str) -> List[Dict[str, float]]:
    return [{"iter": int(m[1]), "loss_turn": float(m[2]), "loss_token": float(m[3])}
            for m in VALID_LINE.finditer(stdout)]


def our_traceback_frames(text: str) -> List[str]:
    """Traceback frames that point into this repository's code (not the venv: torchrun's own
    ChildFailedError report is expected when a worker exits non-zero)."""
    frames = re.findall(r'File "([^"]+)", line \d+', text)
    venv = os.path.join(REPO, ".venv")
    return [f for f in frames
            if (f.startswith(REPO) and not f.startswith(venv)) or f in (SCRIPT, "<string>")]


# --------------------------------------------------------------------------------- checkpoints

def iteration_dir(root, iteration: int) -> str:
    return os.path.join(str(root), f"iter_{iteration:07d}")


def read_checkpoint(path: str) -> Dict[str, "torch.Tensor"]:  # noqa: F821
    """Every tensor (model weights and optimizer state, global shapes) of one dist_checkpointing
    iteration folder, read with torch.distributed.checkpoint in this single process."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    state = {key: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in metadata.state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state


# ------------------------------------------------------------------------------------ datasets

def _preprocess(corpus: str, tokenizer: str, prefix: str, seq_length: int = SEQ_LENGTH,
                overlong: str = "drop") -> str:
    from tools.preprocess_dialog import main as preprocess

    code = preprocess(["--input", corpus, "--tokenizer-model", tokenizer, "--template", "chatml",
                       "--seq-length", str(seq_length), "--output-prefix", prefix,
                       "--no-progress", "--overlong", overlong])
    assert code == 0, f"preprocess_dialog failed for {prefix}"
    return prefix


@pytest.fixture(scope="session")
def packed_data(demo_tokenizer) -> str:
    """Prefix of the main packed dataset (train + valid splits, --seq-length 256)."""
    return _preprocess(demo_tokenizer["corpus"], demo_tokenizer["tokenizer"],
                       os.path.join(demo_tokenizer["dir"], "chat"))


def _other_demo_data(demo_tokenizer, name: str, conversations: int, seed: int,
                     seq_length: int = SEQ_LENGTH) -> str:
    """Other demo conversations (``seed``), packed with the same tokenizer into ``name``."""
    from mt_dialog import demo

    corpus = os.path.join(demo_tokenizer["dir"], f"corpus_{name}.jsonl")
    demo.write_corpus(corpus, conversations, seed=seed)
    return _preprocess(corpus, demo_tokenizer["tokenizer"],
                       os.path.join(demo_tokenizer["dir"], name), seq_length=seq_length)


@pytest.fixture(scope="session")
def short_data(demo_tokenizer) -> str:
    """A tiny dataset packed for --seq-length 128 (same tokenizer): the seq-length mismatches."""
    return _other_demo_data(demo_tokenizer, "chat_128", 40, seed=2, seq_length=128)


@pytest.fixture(scope="session")
def text_data(demo_tokenizer) -> str:
    """Plain-text documents (format text) with the same tokenizer: the texts of 120 other demo
    conversations as prose, one document each, and every sixth one followed by five more (longer
    than --seq-length: cut into pieces)."""
    import json

    from mt_dialog import demo

    corpus = os.path.join(demo_tokenizer["dir"], "corpus_prose.jsonl")
    demo.write_corpus(corpus, 120, seed=3)
    with open(corpus, encoding="utf-8") as handle:
        prose = ["\n".join(m["content"] for m in json.loads(line)["messages"]) for line in handle]
    documents = [prose[i] if i % 6 else "\n\n".join(prose[i:i + 6]) for i in range(len(prose))]
    path = os.path.join(demo_tokenizer["dir"], "documents.jsonl")
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps({"text": text}) + "\n" for text in documents)
    return _preprocess(path, demo_tokenizer["tokenizer"], os.path.join(demo_tokenizer["dir"],
                                                                         "text"), overlong="split")


@pytest.fixture(scope="session")
def saved_run(packed_data, tmp_path_factory) -> Dict[str, str]:
    """{"ckpt", "data"}: a 2-iteration run (the tests' usual tiny model, one process) saved at
    iteration 2 on ``packed_data``; tests copy it before changing anything."""
    ckpt = str(tmp_path_factory.mktemp("saved_run") / "ckpt")
    launch(1, train_args(packed_data, "--save", ckpt, iters=2))
    return {"ckpt": ckpt, "data": packed_data}
