"""A short TP=2 training run on the demo corpus learns: the loss per turn falls clearly.

``trained_demo_run`` (one per test session, shared with tests/test_generate.py) writes a small
demo corpus and tokenizer, packs them, trains with ``torchrun --nproc_per_node 2
pretrain_dialog.py --tensor-model-parallel-size 2`` and saves a checkpoint.
"""

import json
import os
import re

import pytest

from tests.training.launch import run_torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_LINE = re.compile(r"^iter\s+(\d+)/(\d+) \| loss/turn ([0-9.naif]+)", re.M)
TRAIN_ARGS = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "60",
    "--lr", "3e-3", "--lr-warmup-iters", "5", "--log-interval", "10", "--seed", "7",
]
_CACHE = {}


def demo_dataset(tmp_path_factory):
    """A small demo corpus + tokenizer, packed with chatml at seq length 512 (session cache)."""
    if "data" not in _CACHE:
        from mt_dialog.demo import train_tokenizer, write_corpus
        from tools.preprocess_dialog import main as preprocess

        folder = tmp_path_factory.mktemp("demo_learning")
        corpus, model = str(folder / "corpus.jsonl"), str(folder / "tokenizer.model")
        write_corpus(corpus, 600, seed=3)
        train_tokenizer(corpus, model)
        prefix = str(folder / "demo")
        assert preprocess(["--input", corpus, "--tokenizer-model", model, "--template", "chatml",
                           "--seq-length", "512", "--output-prefix", prefix, "--workers", "1",
                           "--no-progress"]) == 0
        _CACHE["data"] = {"folder": folder, "corpus": corpus, "tokenizer": model, "prefix": prefix}
    return _CACHE["data"]


def trained_demo_run(tmp_path_factory):
    """Train once per session (TP=2 on 2 processes); returns paths, log and logged losses."""
    if "run" not in _CACHE:
        data = demo_dataset(tmp_path_factory)
        save = str(data["folder"] / "ckpt")
        out = run_torchrun("pretrain_dialog.py", 2, [
            "--tensor-model-parallel-size", "2", "--data-path", data["prefix"], "--save", save,
            *TRAIN_ARGS], timeout=300)
        losses = [(int(m[0]), float(m[2])) for m in LOSS_LINE.findall(out.stdout)]
        _CACHE["run"] = dict(data, save=save, log=out.stdout, losses=losses)
    return _CACHE["run"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    return trained_demo_run(tmp_path_factory)


@pytest.mark.multiprocess
def test_loss_per_turn_falls_clearly(trained_run):
    losses = trained_run["losses"]
    assert [it for it, _ in losses] == list(range(10, 61, 10)), trained_run["log"]
    first, last = losses[0][1], losses[-1][1]
    assert all(loss == loss and loss < 20 for _, loss in losses)  # finite
    assert last < 0.6 * first, f"loss per turn {first:.3f} -> {last:.3f}:\n{trained_run['log']}"
    # the run is the one the module claims: tensor parallel over the 2 processes
    assert "mt_dialog: TP=2 PP=1 DP=1 | 60 iterations x 4 packs" in trained_run["log"]


@pytest.mark.multiprocess
def test_run_saves_a_loadable_checkpoint_record(trained_run):
    save = trained_run["save"]
    assert open(os.path.join(save, "latest_checkpointed_iteration.txt")).read().strip() == "60"
    saved = json.load(open(os.path.join(save, "config.json")))
    assert saved["config"]["parallel"]["tensor_model_parallel_size"] == 2
    assert saved["data"]["tokenizer"]["path"] == os.path.abspath(trained_run["tokenizer"])
    assert saved["data"]["special_ids"]["end_of_turn"] is not None
    assert os.path.isfile(os.path.join(save, "iter_0000060", "mt_dialog_config.json"))
