"""``benchmarks/bench_long_preprocess.py --quick`` end to end at tiny sizes: the real CLI at
``--seq-length 131072`` on 1x / 2x / 4x agent corpora, the table printed, --verify OK on every
output, JSON + PNG written (into tmp_path)."""

import json
import os
import subprocess
import sys

import pytest

from tests.training.launch import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.multiprocess  # six preprocessing / verify interpreters: the slower tier
def test_quick_long_preprocess_benchmark(tmp_path):
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_long_preprocess.py"),
               "--quick", "--workers", "1", "--work-dir", str(tmp_path / "work"),
               "--results-dir", str(tmp_path / "results")]
    proc = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[1].strip() == "corpus" and len(lines) == 2 + 3  # header, rule, rows
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["1x", "2x", "4x"]
    assert all("OK" in line.split("|")[-2] for line in lines[2:])
    data = json.loads((tmp_path / "results" / "long-preprocess-quick.json").read_text())
    assert (tmp_path / "results" / "long-preprocess-quick.png").is_file()
    rows = data["rows"]
    assert [r["size"] for r in rows] == [2, 4, 8] and data["settings"]["seq_length"] == 131072
    assert rows[0]["tokens"] < rows[1]["tokens"] < rows[2]["tokens"]
    for row in rows:
        assert row["verify"]["ok"] and row["packs"] >= 1
        assert row["main_maxrss_kib"] > 0 and row["child_maxrss_kib"] > 0
        assert row["anon_total_mib"] > 0 and row["tokens_per_second"] > 0
    assert set(data["growth_4x_over_1x"]["1"]) == {"tokens", "main_maxrss_kib",
                                                   "child_maxrss_kib", "anon_total_mib"}
