"""--overlap-grad-reduce and --overlap-param-gather (megatron-core DDP) at DP=2 on gloo with the
turn-normalized loss: the same steps as without overlap (every logged loss, grad norm and
validation loss, every saved tensor within 1e-6), and a resume from an overlapped run's
checkpoint equals the uninterrupted run. Small buckets (--ddp-bucket-size) so that several
reductions and gathers are in flight.

Two pairs of runs: without the distributed optimizer (--overlap-grad-reduce alone), and with it
(--overlap-grad-reduce --overlap-param-gather, bf16, bit for bit). With the distributed
optimizer the saved fp32 parameters and Adam moments are compared too: megatron-core 0.16.1
saved them shifted for every bucket after the first (``optimizer._fix_canonical_state_offsets``), and with
--overlap-param-gather a save or a validation right after a step must see the gathered updated
weights, not the previous step's (``model.finish_param_gather``): the checkpoint of iteration 2
is saved right after its step, the validation of iteration 4 too."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.training.conftest import (
    iteration_dir,
    launch,
    parse_iters,
    parse_validation,
    read_checkpoint,
    train_args,
)

BUCKETS = ["--ddp-bucket-size", "20000"]
# in bf16 as users run it; the gradient never clipped: the clipping's grad norm is summed in
# another order with other buckets (1e-7 apart), which would be the only difference
DIST = ["--use-distributed-optimizer", "--bf16", "--clip-grad", "1e9"]
RUNS = {  # name -> flags; each pair compared step by step
    "none": [],
    "overlap": ["--overlap-grad-reduce", *BUCKETS],
    "dist": DIST,
    "dist_overlap": [*DIST, "--overlap-grad-reduce", "--overlap-param-gather", *BUCKETS],
}
# validation at iteration 4 only: the save of iteration 2 follows its step directly (a
# validation's forward would gather the weights before it)
EVAL = ["--eval-interval", "4", "--eval-iters", "1"]


@pytest.fixture(scope="module")
def runs(packed_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    out = {}
    for name, flags in RUNS.items():
        save = str(root / name)
        proc = launch(2, train_args(packed_data, *flags, *EVAL, "--save", save,
                                    "--save-interval", "2", iters=4))
        out[name] = {"save": save, "log": proc.stdout}
    stopped = root / "stopped"  # as if the overlapped run had stopped after iteration 2
    shutil.copytree(out["dist_overlap"]["save"], stopped)
    shutil.rmtree(iteration_dir(stopped, 4))
    (stopped / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = launch(2, train_args(packed_data, *RUNS["dist_overlap"], *EVAL, "--load",
                                   str(stopped), "--save", str(root / "resumed"), iters=4))
    out["resumed"] = {"save": str(root / "resumed"), "log": resumed.stdout}
    return out


def _close(a, b, tol=1e-6):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _same_tensors(a_dir, b_dir, exact: bool = False):
    """Every tensor of two checkpoints within 1e-6, or ``exact``: bit for bit."""
    a, b = read_checkpoint(a_dir), read_checkpoint(b_dir)
    assert a and set(a) == set(b)
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), (key, (a[key].float() - b[key].float()).abs().max())
        else:
            assert (a[key] - b[key]).abs().max() <= 1e-6, key
    return a


def _same_steps(ours: str, base: str, count: int = 4):
    reference = parse_iters(base)
    assert len(reference) == count
    for mine, theirs in zip(parse_iters(ours), reference, strict=True):
        assert _close(mine["loss_turn"], theirs["loss_turn"]), (mine, theirs)
        assert _close(mine["grad_norm"], theirs["grad_norm"]), (mine, theirs)
    validations = parse_validation(base)
    assert validations
    for mine, theirs in zip(parse_validation(ours), validations, strict=True):
        assert _close(mine["loss_turn"], theirs["loss_turn"]), (mine, theirs)


@pytest.mark.multiprocess
def test_overlap_gives_the_same_steps(runs):
    assert "overlapped: grad reduce |" in runs["overlap"]["log"]
    _same_steps(runs["overlap"]["log"], runs["none"]["log"])
    for iteration in (2, 4):
        _same_tensors(iteration_dir(runs["overlap"]["save"], iteration),
                      iteration_dir(runs["none"]["save"], iteration))


@pytest.mark.multiprocess
def test_overlap_with_the_distributed_optimizer_gives_the_same_steps(runs):
    """Losses, grad norms, validation after a step, and both checkpoints bit for bit as without
    overlap (bf16): the model weights and the optimizer's fp32 parameters and moments of every
    bucket."""
    assert "overlapped: grad reduce, param gather |" in runs["dist_overlap"]["log"]
    _same_steps(runs["dist_overlap"]["log"], runs["dist"]["log"])
    saved = {}
    for iteration in (2, 4):
        saved[iteration] = _same_tensors(iteration_dir(runs["dist_overlap"]["save"], iteration),
                                         iteration_dir(runs["dist"]["save"], iteration),
                                         exact=True)
    assert any(key.startswith("optimizer.state.param.") for key in saved[4])
    # the step did change every compared weight: a stale save would not pass by accident
    weights = [key for key in saved[4] if not key.startswith("optimizer.")
               and saved[4][key].is_floating_point() and saved[4][key].numel() > 1]
    assert weights and all(not saved[4][k].equal(saved[2][k]) for k in weights)


@pytest.mark.multiprocess
def test_resume_of_an_overlapped_run_is_exact(runs):
    again = parse_iters(runs["resumed"]["log"])
    assert [r["iter"] for r in again] == [3, 4]
    first = {r["iter"]: r for r in parse_iters(runs["dist_overlap"]["log"])}
    for row in again:
        assert _close(row["loss_turn"], first[row["iter"]]["loss_turn"]), row
        assert _close(row["grad_norm"], first[row["iter"]]["grad_norm"]), row
    _same_tensors(iteration_dir(runs["resumed"]["save"], 4),
                  iteration_dir(runs["dist_overlap"]["save"], 4), exact=True)


def test_overlap_param_gather_needs_the_distributed_optimizer_and_grad_overlap():
    from mt_dialog.training.config import ParallelConfig

    ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True,
                   overlap_param_gather=True)
    ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True)
    with pytest.raises(ValueError, match="overlap_param_gather: needs --use-distributed-optimizer "
                       "and --overlap-grad-reduce .* drop --overlap-param-gather"):
        ParallelConfig(overlap_param_gather=True)
    with pytest.raises(ValueError, match="overlap_param_gather: needs --overlap-grad-reduce "):
        ParallelConfig(use_distributed_optimizer=True, overlap_param_gather=True)
    with pytest.raises(ValueError, match="ddp_bucket_size"):
        ParallelConfig(ddp_bucket_size=0)
