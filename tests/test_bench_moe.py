"""``benchmarks/bench_moe.py --quick`` end to end: data, the three runs (dense, MoE EP=1, MoE
EP=2) in one two-process launch, the table and ratios printed, the results JSON + PNG written
(into tmp_path, not benchmarks/results)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.training.launch import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_moe")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_moe.py"), "--quick",
               "--work-dir", str(folder / "work"), "--results-dir", str(folder / "results")]
    proc = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    with open(folder / "results" / "moe-quick.json", encoding="utf-8") as handle:
        data = json.load(handle)
    return {"proc": proc, "data": data, "folder": folder}


@pytest.mark.multiprocess
def test_moe_and_dense_runs_compare_like_with_like(quick_run):
    data = quick_run["data"]
    variants = data["variants"]
    assert list(variants) == ["dense", "moe_ep1", "moe_ep2"]
    steps = data["settings"]["steps"]
    s = data["settings"]
    router = s["layers"] * s["hidden"] * s["experts"]  # the only MoE parameters not in dense
    assert variants["moe_ep1"]["params"]["active"] == variants["dense"]["params"]["active"] + router
    for key in ("total", "active"):  # all ranks' experts
        assert variants["moe_ep1"]["params"][key] == variants["moe_ep2"]["params"][key], key
    assert [variants[k]["params"]["expert_parallel"] for k in variants] == [1, 1, 2]
    assert variants["moe_ep1"]["params"]["experts_on_rank0"] == s["experts"]
    assert variants["moe_ep2"]["params"]["experts_on_rank0"] == s["experts"] // 2
    assert variants["moe_ep1"]["params"]["total"] > variants["moe_ep1"]["params"]["active"]
    for key, run in variants.items():
        assert len(run["step_seconds"]) == steps and run["step"]["n"] == steps - 2, key
        assert all(math.isfinite(x) for x in run["losses"]), key
        assert run["losses"][-1] < run["losses"][0], (key, run["losses"])  # it trains
    mean = {key: run["step"]["mean"] for key, run in variants.items()}
    assert data["ratios"]["moe_ep1 / dense"] == pytest.approx(mean["moe_ep1"] / mean["dense"])
    assert data["ratios"]["moe_ep2 / moe_ep1"] == pytest.approx(mean["moe_ep2"] / mean["moe_ep1"])


@pytest.mark.multiprocess
def test_table_ratios_and_load_printed_and_files_written(quick_run):
    out, data = quick_run["proc"].stdout, quick_run["data"]
    assert data["table"] in out
    for label in ("dense, same active parameters", "MoE, EP=1", "MoE, EP=2"):
        assert re.search(rf"^\| {re.escape(label)} +\|", out, re.M), label
    for name, value in data["ratios"].items():
        assert f"ratio {name}: {value:.2f}x" in out
    load = data["machine"]["load_average_1_5_15"]
    assert f"load average (1, 5, 15 min): {load} at the start" in out
    assert len(data["load_average_end"]) == 3
    assert (quick_run["folder"] / "results" / "moe-quick.png").stat().st_size > 0
