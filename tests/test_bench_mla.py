"""``benchmarks/bench_mla.py --quick`` end to end: the GQA and MLA runs of the same parameter
count in one two-process launch, the table and ratio printed, JSON + PNG written (into tmp_path)."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.training.launch import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.multiprocess
def test_mla_and_gqa_compare_like_with_like(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_mla.py"), "--quick",
               "--work-dir", str(tmp_path / "work"), "--results-dir", str(tmp_path / "results")]
    proc = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    with open(tmp_path / "results" / "mla-quick.json", encoding="utf-8") as handle:
        data = json.load(handle)
    gqa, mla = data["variants"]["gqa"], data["variants"]["mla"]
    assert abs(mla["params"] - gqa["params"]) <= 0.01 * gqa["params"], (gqa, mla)
    assert mla["ffn"] != gqa["ffn"]  # the MLP took up the attention's difference
    for run in (gqa, mla):
        assert len(run["step_seconds"]) == data["settings"]["steps"]
        assert all(math.isfinite(x) for x in run["losses"]) and run["losses"][-1] < run["losses"][0]
    assert data["ratio_mla_over_gqa"] == pytest.approx(mla["step"]["mean"] / gqa["step"]["mean"])
    assert "ratio mla / gqa:" in proc.stdout and os.path.isfile(tmp_path / "results" /
                                                               "mla-quick.png")
