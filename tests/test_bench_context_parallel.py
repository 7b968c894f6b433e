"""``benchmarks/bench_context_parallel.py --quick`` end to end: a long-conversation dataset built
with the preprocessing CLI, pretrain_dialog.py under torchrun at CP=1 (1 process) and CP=2 (2
processes), then DP=2 with and without the overlap flags; the tables and ratios printed, the
results JSON + PNG written (into tmp_path, not benchmarks/results)."""

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from tests.training.launch import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_cp")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_context_parallel.py"),
               "--quick", "--work-dir", str(folder / "work"),
               "--results-dir", str(folder / "results")]
    started = time.monotonic()
    proc = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    with open(folder / "results" / "context_parallel-quick.json", encoding="utf-8") as handle:
        data = json.load(handle)
    return {"proc": proc, "data": data, "folder": folder, "seconds": time.monotonic() - started}


@pytest.mark.multiprocess
def test_cp_runs_measure_every_rank_and_train_the_same(quick_run):
    data = quick_run["data"]
    cp, iters = data["cp"], data["settings"]["iters"]
    assert list(cp) == ["cp1", "cp2"]
    assert [len(run["per_rank"]) for run in cp.values()] == [1, 2]
    for key, run in cp.items():
        assert [len(steps) for steps in run["step_seconds_all"]] == [iters] * len(run["per_rank"])
        assert all(r["steps_timed"] == iters - 1 for r in run["per_rank"]), key
        assert all(r["saved_mib"] > 0 and r["rss_peak_mib"] > 0 for r in run["per_rank"]), key
        assert all(math.isfinite(x) for x in run["losses"]), key
    # the same packs and steps: CP=2 gives CP=1's losses (bf16 rounding apart)
    assert cp["cp2"]["losses"] == pytest.approx(cp["cp1"]["losses"], rel=5e-3)
    # saved activations are counted, not timed: each CP rank keeps about half the tokens'
    ratio = data["ratios"]["activations (saved) CP2/CP1"]
    assert ratio == pytest.approx(cp["cp2"]["saved_mib"] / cp["cp1"]["saved_mib"])
    assert 0.4 < ratio < 0.85, ratio
    # tokens' activations halve; only the CP stand-in's attention saves masks (s/2 x s per layer)
    other = data["ratios"]["activations (saved, masks excluded) CP2/CP1"]
    assert 0.4 < other < 0.7, other
    assert cp["cp2"]["saved_masks_mib"] > 20 * cp["cp1"]["saved_masks_mib"]
    assert data["ratios"]["step time CP2/CP1"] == pytest.approx(
        cp["cp2"]["step_seconds"] / cp["cp1"]["step_seconds"])


@pytest.mark.multiprocess
def test_dp_overlap_variants_give_the_same_losses(quick_run):
    dp = quick_run["data"]["dp"]
    assert list(dp) == ["dp", "dp_overlap", "dp_dist", "dp_dist_overlap"]
    reference = dp["dp"]["losses"]
    assert len(reference) == quick_run["data"]["settings"]["iters"]
    for key, run in dp.items():
        assert len(run["per_rank"]) == 2, key
        assert run["losses"] == reference, key  # overlap moves communication, not arithmetic


@pytest.mark.multiprocess
def test_tables_ratios_and_files(quick_run):
    out, data = quick_run["proc"].stdout, quick_run["data"]
    assert data["table"] in out and data["dp_table"] in out
    for label in ("CP=1, 1 process", "CP=2, 2 processes", "DP=2", "DP=2 --overlap-grad-reduce",
                  "DP=2 --use-distributed-optimizer"):
        assert re.search(rf"^\| {re.escape(label)} +\|", out, re.M), label
    for name, value in data["ratios"].items():
        assert f"ratio {name}: {value:.2f}x" in out
    assert (quick_run["folder"] / "results" / "context_parallel-quick.png").stat().st_size > 0
    print(f"bench_context_parallel.py --quick: {quick_run['seconds']:.0f} s")
