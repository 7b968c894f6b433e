"""--overlap-grad-reduce (megatron-core DDP) at DP=2 on gloo with the turn-normalized loss: the
same steps as without overlap (every logged loss and grad norm, every saved tensor within 1e-6),
and a resume from an overlapped run's checkpoint equals the uninterrupted run. Small buckets
(--ddp-bucket-size) so that several reductions are in flight during the backward. With the
distributed optimizer megatron-core 0.16.1 saved stale fp32 main parameters in the checkpoint
(compared by hand with a run without overlap), so that combination is refused."""

from __future__ import annotations

import shutil

import pytest

from tests.training.conftest import (
    iteration_dir,
    launch,
    parse_iters,
    read_checkpoint,
    train_args,
)

OVERLAP = ["--overlap-grad-reduce", "--ddp-bucket-size", "20000"]


@pytest.fixture(scope="module")
def runs(packed_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("overlap")
    out = {}
    for name, flags in (("none", []), ("overlap", OVERLAP)):
        save = str(root / name)
        proc = launch(2, train_args(packed_data, *flags, "--save", save, "--save-interval", "2",
                                    iters=4))
        out[name] = {"save": save, "log": proc.stdout}
    stopped = root / "stopped"  # as if the overlapped run had stopped after iteration 2
    shutil.copytree(out["overlap"]["save"], stopped)
    shutil.rmtree(iteration_dir(stopped, 4))
    (stopped / "latest_checkpointed_iteration.txt").write_text("2")
    resumed = launch(2, train_args(packed_data, *OVERLAP, "--load", str(stopped), "--save",
                                   str(root / "resumed"), iters=4))
    out["resumed"] = {"save": str(root / "resumed"), "log": resumed.stdout}
    return out


def _close(a, b, tol=1e-6):
    return abs(a - b) <= tol * max(1.0, abs(a), abs(b))


def _same_tensors(a_dir, b_dir):
    a, b = read_checkpoint(a_dir), read_checkpoint(b_dir)
    assert a and set(a) == set(b)
    for key in a:
        assert (a[key] - b[key]).abs().max() <= 1e-6, key


@pytest.mark.multiprocess
def test_overlap_gives_the_same_steps(runs):
    reference = parse_iters(runs["none"]["log"])
    assert len(reference) == 4 and "overlapped: grad reduce |" in runs["overlap"]["log"]
    for ours, base in zip(parse_iters(runs["overlap"]["log"]), reference):
        assert _close(ours["loss_turn"], base["loss_turn"]), (ours, base)
        assert _close(ours["grad_norm"], base["grad_norm"]), (ours, base)
    _same_tensors(iteration_dir(runs["overlap"]["save"], 4), iteration_dir(runs["none"]["save"], 4))


@pytest.mark.multiprocess
def test_resume_of_an_overlapped_run_is_exact(runs):
    again = parse_iters(runs["resumed"]["log"])
    assert [r["iter"] for r in again] == [3, 4]
    first = {r["iter"]: r for r in parse_iters(runs["overlap"]["log"])}
    for row in again:
        assert _close(row["loss_turn"], first[row["iter"]]["loss_turn"]), row
    _same_tensors(iteration_dir(runs["resumed"]["save"], 4),
                  iteration_dir(runs["overlap"]["save"], 4))


def test_overlap_with_the_distributed_optimizer_is_refused():
    from mt_dialog.training.config import ParallelConfig

    with pytest.raises(ValueError, match="saves stale fp32 main parameters"):
        ParallelConfig(use_distributed_optimizer=True, overlap_grad_reduce=True)
    with pytest.raises(ValueError, match="overlap_param_gather: .* drop it"):
        ParallelConfig(overlap_param_gather=True)
    with pytest.raises(ValueError, match="ddp_bucket_size"):
        ParallelConfig(ddp_bucket_size=0)
