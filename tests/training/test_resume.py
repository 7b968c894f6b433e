"""Resume: 2k iterations straight and k + save + resume k give identical losses at every
iteration and identical final weights (and optimizer state); a checkpoint saved at TP=2 resumes
at PP=2 and loads (--finetune) in a single process, and training goes on from the trained weights.

All runs: k = 3, global batch 8 packs of 256 tokens, --lr 1e-2 with cosine decay over 6
iterations (--lr-decay-iters 6 in every run, so the 3-iteration run has the schedule of the
6-iteration one).
"""

import math

import pytest
import torch

from tests.training.conftest import (
    iteration_dir,
    launch,
    parse_iters,
    read_checkpoint,
    train_args,
)

pytestmark = pytest.mark.multiprocess

K = 3
SCHEDULE = ["--lr-decay-iters", str(2 * K)]
TP2 = ["--tensor-model-parallel-size", "2"]
PP2 = ["--pipeline-model-parallel-size", "2"]


def _run(nproc, prefix, save, *extra, iters):
    proc = launch(nproc, train_args(prefix, "--save", save, *SCHEDULE, *extra, iters=iters))
    return {"stdout": proc.stdout, "iters": parse_iters(proc.stdout), "save": str(save)}


@pytest.fixture(scope="module")
def straight(packed_data, tmp_path_factory):
    """2k iterations in one TP=2 run."""
    return _run(2, packed_data, tmp_path_factory.mktemp("straight"), *TP2, iters=2 * K)


@pytest.fixture(scope="module")
def first_half(packed_data, tmp_path_factory):
    """k iterations at TP=2, then save (and stop)."""
    return _run(2, packed_data, tmp_path_factory.mktemp("first_half"), *TP2, iters=K)


@pytest.fixture(scope="module")
def resumed(packed_data, first_half, tmp_path_factory):
    """A fresh TP=2 run that loads the k-iteration checkpoint and trains to 2k."""
    return _run(2, packed_data, tmp_path_factory.mktemp("resumed"), *TP2,
                "--load", first_half["save"], iters=2 * K)


@pytest.fixture(scope="module")
def resumed_pp2(packed_data, first_half, tmp_path_factory):
    """The TP=2 k-iteration checkpoint resumed (optimizer, scheduler, data position) at PP=2."""
    return _run(2, packed_data, tmp_path_factory.mktemp("resumed_pp2"), *PP2,
                "--load", first_half["save"], iters=2 * K)


@pytest.fixture(scope="module")
def finetuned_single(packed_data, straight, tmp_path_factory):
    """The TP=2 final checkpoint loaded weights-only by one plain process (TP=PP=1)."""
    return _run(1, packed_data, tmp_path_factory.mktemp("finetune1"), "--load", straight["save"],
                "--finetune", iters=K)


def _numbers(line):
    return (line["iter"], line["loss_turn"], line["loss_token"], line["lr"], line["grad_norm"])


def test_straight_run_logs_every_iteration(straight):
    assert [r["iter"] for r in straight["iters"]] == list(range(1, 2 * K + 1)), straight["stdout"]
    losses = [r["loss_turn"] for r in straight["iters"]]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0] - 1.0, losses  # it learns: the comparisons below mean something


def test_resume_gives_identical_losses_and_weights(straight, first_half, resumed):
    assert f"loaded {first_half['save']} at iteration {K}\n" in resumed["stdout"]
    assert [r["iter"] for r in first_half["iters"]] == list(range(1, K + 1))
    assert [r["iter"] for r in resumed["iters"]] == list(range(K + 1, 2 * K + 1)), \
        resumed["stdout"]
    # every logged number (loss per turn and per token, lr, grad norm) at every iteration
    assert [_numbers(r) for r in first_half["iters"] + resumed["iters"]] == \
        [_numbers(r) for r in straight["iters"]]

    a = read_checkpoint(iteration_dir(straight["save"], 2 * K))
    b = read_checkpoint(iteration_dir(resumed["save"], 2 * K))
    assert sorted(a) == sorted(b)
    weights = [k for k in a if not k.startswith("optimizer.")]
    assert "embedding.word_embeddings.weight" in weights and len(weights) >= 8
    assert any(k.startswith("optimizer.state.exp_avg_sq.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"final weights / optimizer state differ: {differ}"


def test_tp2_checkpoint_resumes_at_pp2(straight, first_half, resumed_pp2):
    """Model and optimizer state saved at TP=2 reshard to PP=2; the continued run follows the
    straight TP=2 run up to floating-point reduction order."""
    out = resumed_pp2["stdout"]
    assert "mt_dialog: TP=1 PP=2 DP=1" in out
    assert f"loaded {first_half['save']} at iteration {K}\n" in out
    got, want = resumed_pp2["iters"], straight["iters"][K:]
    assert [r["iter"] for r in got] == list(range(K + 1, 2 * K + 1)), out
    for g, w in zip(got, want):
        assert all(math.isfinite(g[k]) for k in ("loss_turn", "loss_token", "grad_norm"))
        assert g["lr"] == w["lr"]  # the scheduler state came along
        assert g["loss_turn"] == pytest.approx(w["loss_turn"], abs=2e-3), (g, w)
        assert g["loss_token"] == pytest.approx(w["loss_token"], abs=2e-3), (g, w)

    a = read_checkpoint(iteration_dir(straight["save"], 2 * K))
    p = read_checkpoint(iteration_dir(resumed_pp2["save"], 2 * K))
    assert sorted(a) == sorted(p)  # same global tensors whatever the layout
    for key in a:
        assert a[key].shape == p[key].shape, key
        torch.testing.assert_close(p[key], a[key], rtol=1e-4, atol=1e-5, msg=key)


def test_tp2_checkpoint_finetunes_in_one_process(straight, finetuned_single):
    out = finetuned_single["stdout"]
    assert "mt_dialog: TP=1 PP=1 DP=1" in out
    assert f"loaded {straight['save']} at iteration 0 (weights only)" in out
    lines = finetuned_single["iters"]
    assert [r["iter"] for r in lines] == list(range(1, K + 1)), out  # counts restart at 0
    assert all(math.isfinite(r["loss_turn"]) and math.isfinite(r["grad_norm"]) for r in lines)
    fresh = straight["iters"][0]["loss_turn"]  # same seed -> same first batch, fresh weights
    assert lines[0]["loss_turn"] < fresh - 0.8, (lines[0], fresh)
    # weights-only: the optimizer starts over (full --lr, warmup-free schedule from step 0)
    assert lines[0]["lr"] == straight["iters"][0]["lr"]
    assert open(f"{finetuned_single['save']}/latest_checkpointed_iteration.txt").read() == str(K)


# DP=2: optimizer state sharded over the two ranks; in bf16 as users run it (bf16 parameters,
# fp32 main-parameter shards)
DISTOPT = ["--use-distributed-optimizer", "--bf16"]


@pytest.fixture(scope="module")
def distopt_runs(packed_data, tmp_path_factory):
    """2k straight, and k + save + resume k, with the distributed optimizer at DP=2, bf16."""
    straight = _run(2, packed_data, tmp_path_factory.mktemp("do_straight"), *DISTOPT, iters=2 * K)
    half = _run(2, packed_data, tmp_path_factory.mktemp("do_half"), *DISTOPT, iters=K)
    resumed = _run(2, packed_data, tmp_path_factory.mktemp("do_resumed"), *DISTOPT,
                   "--load", half["save"], iters=2 * K)
    return straight, half, resumed


def test_distributed_optimizer_resume_is_exact(distopt_runs):
    """Guards the CPU shims of megatron-core's DistributedOptimizer (Adam ``step`` restored per
    parameter): a wrong step count changes Adam's bias correction after the resume."""
    straight, half, resumed = distopt_runs
    assert "DP=2" in straight["stdout"]
    assert [_numbers(r) for r in half["iters"] + resumed["iters"]] == \
        [_numbers(r) for r in straight["iters"]], resumed["stdout"]
    a = read_checkpoint(iteration_dir(straight["save"], 2 * K))
    b = read_checkpoint(iteration_dir(resumed["save"], 2 * K))
    assert sorted(a) == sorted(b) and any(k.startswith("optimizer.") for k in a)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"final weights / optimizer state differ: {differ}"
