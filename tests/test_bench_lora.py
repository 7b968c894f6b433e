"""``benchmarks/bench_lora.py --quick``: LoRA vs full fine-tuning measured on a tiny model in one
run (results into tmp_path), and the 70B / TP=8 projection."""

import json
import os
import subprocess
import sys

import pytest

from tests.training.launch import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.multiprocess
def test_quick_benchmark_reports_lora_against_full(tmp_path):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_lora.py"),
                           "--quick", "--results-dir", str(tmp_path)], cwd=ROOT,
                          env=launch_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "| measure" in proc.stdout and "LoRA / full" in proc.stdout
    data = json.loads((tmp_path / "lora-quick.json").read_text())
    assert (tmp_path / "lora-quick.png").is_file()
    full, lora, rank = data["full"], data["lora"], data["rank"]
    assert full["trainable"] == full["total"] == lora["total"] - lora["trainable"]
    # rank x (in + out) of qkv (64 -> 192), proj (64 -> 64), fc1 (64 -> 2 x 192), fc2 (192 ->
    # 64), per layer, 2 layers
    assert lora["trainable"] == 2 * rank * (256 + 128 + 448 + 256)
    # fp32 Adam: two moments of 4 bytes per trained parameter
    assert full["optimizer_bytes"] == 8 * full["trainable"]
    assert lora["optimizer_bytes"] == 8 * lora["trainable"]
    assert 0 < data["ratios"]["checkpoint"] < 0.5 and data["ratios"]["step time"] > 0
    projection = data["projection_70b_tp8"]
    assert projection["parameters"] == pytest.approx(68.98e9, rel=1e-3)  # Llama-2-70B's count
    assert projection["full_bytes_per_gpu"] == pytest.approx(18 * 68.98e9 / 8, rel=0.01)
    assert projection["lora_bytes_per_gpu"] < projection["full_bytes_per_gpu"] / 6
