"""A short TP=2 run on a 0.7/0.3 blend of a conversation dataset and a plain-text dataset (each
one's loss logged, to TensorBoard too), with validation, warmup + cosine decay to
--min-lr, a checkpoint and (when installed) TensorBoard; plus unit tests of the sample order
(``SampleStream``, ``step_sample_indices``) that resuming and data parallelism rely on.
"""

import glob
import importlib.util
import json
import math
import os
import re
from collections import Counter

import numpy as np
import pytest

from mt_dialog.training.data import SampleStream, step_sample_indices
from tests.training.conftest import MODEL_ARGS, launch, parse_iters, parse_validation

ITERS, LOG_INTERVAL, EVAL_INTERVAL = 11, 2, 5
LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 3, 9
HAVE_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def expected_lr(iteration: int) -> float:
    """lr of step ``iteration`` (1-based; the scheduler has taken iteration - 1 steps):
    linear warmup reaching LR / WARMUP at iteration 1 and LR at iteration WARMUP, cosine to
    MIN_LR at DECAY steps, then MIN_LR."""
    steps = iteration - 1
    if steps < WARMUP:
        return LR * iteration / WARMUP
    if steps > DECAY:
        return MIN_LR
    ratio = (steps - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + (LR - MIN_LR) * 0.5 * (math.cos(math.pi * ratio) + 1)


@pytest.fixture(scope="module")
def blended_run(packed_data, text_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    save, board = folder / "ckpt", folder / "tb"
    args = ["--tensor-model-parallel-size", "2", "--data-path", "0.7", packed_data, "0.3",
            text_data, "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", ITERS, "--log-interval", LOG_INTERVAL, "--eval-interval",
            EVAL_INTERVAL, "--lr", LR, "--min-lr", MIN_LR, "--lr-warmup-iters", WARMUP,
            "--lr-decay-iters", DECAY, "--save", save, *MODEL_ARGS]
    if HAVE_TENSORBOARD:
        args += ["--tensorboard-dir", board]
    proc = launch(2, args)
    return {"stdout": proc.stdout, "stderr": proc.stderr, "save": save, "board": board,
            "prefixes": [packed_data, text_data]}


BY_DATASET = re.compile(r"\| loss/turn by dataset: chat ([0-9.]+|-), text ([0-9.]+|-)$")


@pytest.mark.multiprocess
def test_each_dataset_of_the_blend_is_logged(blended_run):
    """Every log line gives the loss per turn of the conversations and of the text over its
    interval; the blend's loss lies between them (the datasets' sums add up to it)."""
    out = blended_run["stdout"]
    lines = [ln for ln in out.splitlines() if ln.startswith(("iter ", "validation at"))]
    both = 0
    for line, parsed in zip([ln for ln in lines if ln.startswith("iter ")], parse_iters(out)):
        found = BY_DATASET.search(line)
        assert found, line
        if "-" in found.groups():  # a dataset no step of the interval read
            continue
        chat, text = float(found[1]), float(found[2])
        assert min(chat, text) - 1e-4 <= parsed["loss_turn"] <= max(chat, text) + 1e-4, line
        both += 1
    assert both >= 4, out
    for line in (ln for ln in lines if ln.startswith("validation at")):
        assert re.search(r"\| loss/turn by dataset: chat [0-9.]+, text [0-9.]+ ", line), line


@pytest.mark.multiprocess
def test_one_log_line_per_interval_from_one_rank(blended_run):
    out = blended_run["stdout"]
    lines = parse_iters(out)
    # every LOG_INTERVAL iterations and at the end, each printed once (rank 1 only, not rank 0)
    assert [r["iter"] for r in lines] == [2, 4, 6, 8, 10, 11], out
    assert all(r["total"] == ITERS for r in lines)
    assert len([ln for ln in out.splitlines() if ln.startswith("iter ")]) == len(lines)
    assert out.count("mt_dialog: TP=2 PP=1 DP=1") == 1
    assert out.count("saved checkpoint") == 1
    for r in lines:
        assert all(math.isfinite(r[k]) for k in ("loss_turn", "loss_token", "grad_norm")), r
    assert "Traceback" not in blended_run["stderr"]


@pytest.mark.multiprocess
def test_no_validation_note_when_validating(blended_run):
    assert "note: no validation" not in blended_run["stdout"]


@pytest.mark.multiprocess
def test_validation_lines(blended_run):
    out = blended_run["stdout"]
    valid = parse_validation(out)
    assert [v["iter"] for v in valid] == [5, 10], out
    assert all(math.isfinite(v["loss_turn"]) and v["loss_turn"] > 0 for v in valid)
    order = [ln.split("|")[0].strip() for ln in out.splitlines()
             if ln.startswith(("iter ", "validation"))]
    assert order.index("validation at iter 5") == order.index("iter      6/11") - 1


@pytest.mark.multiprocess
def test_lr_warmup_then_cosine_to_min_lr(blended_run):
    lines = parse_iters(blended_run["stdout"])
    for r in lines:  # logged with 4 significant digits
        assert r["lr"] == pytest.approx(expected_lr(r["iter"]), rel=1e-3, abs=1e-12), r
    lrs = {r["iter"]: r["lr"] for r in lines}
    assert 0 < lrs[2] < lrs[4] == pytest.approx(LR)  # warming up, peak at the end of warmup
    assert lrs[4] > lrs[6] > lrs[8] > lrs[10]  # decaying
    assert lrs[10] == lrs[11] == pytest.approx(MIN_LR)  # and held at --min-lr


@pytest.mark.multiprocess
def test_blend_and_config_saved_beside_the_checkpoint(blended_run):
    from mt_dialog.data.dataset import PackedDialogDataset

    save = blended_run["save"]
    a, b = blended_run["prefixes"]
    packs = len(PackedDialogDataset(a, "train")) + len(PackedDialogDataset(b, "train"))
    assert f"| {packs} training packs |" in blended_run["stdout"]  # one stream over both
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(ITERS)
    assert (save / f"iter_{ITERS:07d}" / "mt_dialog_config.json").is_file()
    config = json.loads((save / "config.json").read_text())
    assert config["command"][0] == "pretrain_dialog.py" and "--data-path" in config["command"]
    assert config["data"]["prefixes"] == [a, b]
    assert config["data"]["weights"] == [0.7, 0.3]
    assert config["data"]["seq_length"] == 256
    assert config["config"]["parallel"]["tensor_model_parallel_size"] == 2
    assert config["config"]["optim"]["min_lr"] == MIN_LR
    assert config["config"]["data"]["data_path"] == ["0.7", a, "0.3", b]


@pytest.mark.multiprocess
def test_tensorboard_scalars(blended_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(str(blended_run["board"]), "events.out.tfevents.*"))
    assert len(files) == 1, files  # one writer: the logging rank
    events = EventAccumulator(files[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_per_turn", "train/loss_per_token", "train/lr", "train/grad_norm",
            "valid/loss_per_turn", "valid/loss_per_token"} <= tags, tags
    lrs = {e.step: e.value for e in events.Scalars("train/lr")}
    assert sorted(lrs) == list(range(1, ITERS + 1))  # every iteration, not only logged ones
    for step, value in lrs.items():
        assert value == pytest.approx(expected_lr(step), rel=1e-5, abs=1e-12), step
    assert [e.step for e in events.Scalars("valid/loss_per_turn")] == [5, 10]
    # the per-turn validation metrics, also in SAVE/validation/iter_*.json
    assert {"valid/accuracy", "valid/exact_turns", "valid/reply_length_1-4/loss_per_turn",
            "valid/reply_length_5-16/accuracy", "valid/turn_1/exact_turns",
            "valid/turn_4+/accuracy"} <= tags, sorted(t for t in tags if t.startswith("valid"))
    assert not any(t.endswith(("/turns", "/loss_tokens", "/conversations")) for t in tags)
    assert {f"{split}/dataset_{name}/loss_per_{unit}" for split in ("train", "valid")
            for name in ("chat", "text") for unit in ("turn", "token")} <= tags, tags
    chat = {e.step: e.value for e in events.Scalars("train/dataset_chat/loss_per_turn")}
    text = {e.step: e.value for e in events.Scalars("train/dataset_text/loss_per_turn")}
    total = {e.step: e.value for e in events.Scalars("train/loss_per_turn")}
    for step in set(chat) & set(text):  # the step's loss lies between its datasets'
        assert min(chat[step], text[step]) - 1e-6 <= total[step] <= max(chat[step],
                                                                        text[step]) + 1e-6
    saved = os.path.join(str(blended_run["save"]), "validation", "iter_0000010.json")
    with open(saved) as handle:
        record = json.load(handle)
    accuracy = events.Scalars("valid/accuracy")[-1]
    assert record["iteration"] == accuracy.step == 10
    assert record["metrics"]["accuracy"] == pytest.approx(accuracy.value, rel=1e-6)
    logged = {r["iter"]: r for r in parse_iters(blended_run["stdout"])}
    # the log line at iteration 11 covers iteration 11 alone: same loss as TensorBoard's
    tb_last = events.Scalars("train/loss_per_token")[-1]
    assert tb_last.step == ITERS
    assert tb_last.value == pytest.approx(logged[ITERS]["loss_token"], abs=1e-4)


# ------------------------------------------------------------------------- unit: sample order

class _Stream:
    """A SampleStream over stand-in datasets (dataset d: the samples ``{"pack": (d, pack)}``),
    indexed to the ``(d, pack)`` it reads, each checked to carry its dataset's number."""

    def __init__(self, sizes, weights, seed=1234):
        self.stream = SampleStream([[{"pack": (d, p)} for p in range(n)]
                                    for d, n in enumerate(sizes)], weights, seed)

    def __len__(self):
        return len(self.stream)

    def __getitem__(self, index):
        sample = self.stream[index]
        assert sample["dataset"] == sample["pack"][0]  # the blend dataset it came from
        return sample["pack"]


def test_sample_stream_is_a_function_of_seed_and_index():
    one, two = _Stream([13, 7], [0.6, 0.4], seed=5), _Stream([13, 7], [0.6, 0.4], seed=5)
    forward = [one[i] for i in range(100)]
    assert forward == [two[i] for i in reversed(range(100))][::-1]  # order of access is moot
    assert forward == [one[i] for i in range(100)]  # and repeatable
    assert forward != [_Stream([13, 7], [0.6, 0.4], seed=6)[i] for i in range(100)]


def test_each_round_visits_every_pack_once_with_proportional_weights():
    sizes = [11, 5, 3]
    stream = _Stream(sizes, sizes)
    assert len(stream) == sum(sizes)
    everything = sorted((d, p) for d, n in enumerate(sizes) for p in range(n))
    rounds = []
    for r in range(4):
        seen = [stream[i] for i in range(r * len(stream), (r + 1) * len(stream))]
        assert sorted(seen) == everything, f"round {r}"
        rounds.append(seen)
    assert rounds[0] != rounds[1]  # a fresh permutation per pass


def test_blend_weights_are_respected():
    stream = _Stream([10, 30], [0.7, 0.3], seed=3)
    counts = Counter(stream[i][0] for i in range(20000))
    assert counts[0] / 20000 == pytest.approx(0.7, abs=0.01)
    # the small dataset is re-read in whole fresh passes: its packs are used evenly
    per_pack = Counter(stream[i] for i in range(20000) if stream[i][0] == 0)
    assert len(per_pack) == 10 and max(per_pack.values()) - min(per_pack.values()) <= 1


@pytest.mark.parametrize("gbs, mbs, dp", [(8, 2, 1), (8, 2, 2), (12, 1, 4), (16, 2, 4)])
def test_data_parallel_ranks_read_disjoint_samples(gbs, mbs, dp):
    for consumed in (0, gbs, 5 * gbs):
        per_rank = [step_sample_indices(consumed, gbs, mbs, dp, r) for r in range(dp)]
        for micro_batches in per_rank:
            assert len(micro_batches) == gbs // (mbs * dp)
            assert all(len(m) == mbs for m in micro_batches)
        flat = [i for rank in per_rank for m in rank for i in m]
        # together the ranks read exactly the step's samples, each once
        assert sorted(flat) == list(range(consumed, consumed + gbs))


def test_resume_position_continues_the_Stream():
    """Consecutive steps tile the stream: step s starts where step s-1 ended, so resuming at
    consumed_samples reads exactly what an uninterrupted run would have."""
    gbs, mbs, dp = 8, 2, 2
    steps = [sorted(i for r in range(dp) for m in step_sample_indices(s * gbs, gbs, mbs, dp, r)
                    for i in m) for s in range(5)]
    assert np.concatenate(steps).tolist() == list(range(5 * gbs))
