"""``benchmarks/bench_normalization.py --quick`` end to end: corpus, preprocessing, one training
run per loss normalization (torchrun, 1 process each), the per-turn validation JSON read back,
the table printed and the results JSON + PNG written (into tmp_path, not benchmarks/results)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest

from tests.training.launch import launch_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMALIZATIONS = ("token", "turn", "conversation")
LENGTH_GROUPS = ["reply length 1-4", "reply length 5-16", "reply length 17-64",
                 "reply length 65-256", "reply length 257+"]
TURN_GROUPS = ["turn 1", "turn 2", "turn 3", "turn 4+"]
GROUPS = ["all replies", *LENGTH_GROUPS, *TURN_GROUPS]
PARTS = ("loss per turn", "accuracy", "exact turns")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """Run the quick benchmark once for the module: its output, JSON and folder (the run's
    time is the benchmark's to report, not a test's)."""
    folder = tmp_path_factory.mktemp("bench_normalization")
    command = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_normalization.py"),
               "--quick", "--work-dir", str(folder / "work"),
               "--results-dir", str(folder / "results")]
    proc = subprocess.run(command, cwd=ROOT, env=launch_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"
    with open(folder / "results" / "normalization-quick.json", encoding="utf-8") as handle:
        data = json.load(handle)
    return {"proc": proc, "data": data, "folder": folder}


@pytest.mark.multiprocess
def test_every_normalization_and_group_is_reported(quick_run):
    data = quick_run["data"]
    assert data["quick"] is True and data["settings"]["seeds"] == [1]
    assert data["groups"] == GROUPS
    assert list(data["summary"]) == list(NORMALIZATIONS)
    for norm, by_group in data["summary"].items():
        assert list(by_group) == GROUPS, norm
        for group, entry in by_group.items():
            for part in PARTS:
                mean = entry[part]["mean"]
                if entry["turns"]:
                    assert mean is not None and math.isfinite(mean), (norm, group, part)
                    assert mean > 0 if part == "loss per turn" else 0 <= mean <= 1
                else:
                    assert mean is None, (norm, group, part)
    # the corpus has short, medium and long replies: their buckets are not empty
    for group in ("reply length 1-4", "reply length 5-16", "reply length 65-256", "turn 1"):
        assert data["summary"]["turn"][group]["turns"] > 0, group


@pytest.mark.multiprocess
def test_summary_is_the_runs_final_validation(quick_run):
    data = quick_run["data"]
    steps = data["settings"]["train_iters"]
    assert sorted(r["normalization"] for r in data["runs"]) == sorted(NORMALIZATIONS)
    for run in data["runs"]:
        assert f"--loss-normalization {run['normalization']}" in run["command"]
        final = run["validations"][-1]
        assert final["iteration"] == steps
        metrics = final["metrics"]
        entry = data["summary"][run["normalization"]]
        assert entry["all replies"]["loss per turn"]["mean"] == pytest.approx(
            metrics["loss per turn"])
        assert entry["reply length 1-4"]["exact turns"]["mean"] == pytest.approx(
            metrics["reply length 1-4: exact turns"])
        # every validation turn is in exactly one length group and one turn-index group
        total = metrics["turns"]
        assert total > 0
        assert sum(metrics[f"{g}: turns"] for g in LENGTH_GROUPS) == total
        assert sum(metrics[f"{g}: turns"] for g in TURN_GROUPS) == total
    # the three runs share the held-out set
    assert len({r["validations"][-1]["metrics"]["turns"] for r in data["runs"]}) == 1


@pytest.mark.multiprocess
def test_table_printed_and_files_written(quick_run):
    out = quick_run["proc"].stdout
    assert re.search(r"^\| group +\| normalization +\| turns +\| loss per turn +\| accuracy +\| "
                     r"exact turns +\|$", out, re.M), out
    for group in GROUPS:
        for norm in NORMALIZATIONS:
            assert re.search(rf"^\| {re.escape(group)} +\| {norm} +\|", out, re.M), (group, norm)
    assert "turn vs token, seed by seed" in out
    results = quick_run["folder"] / "results"
    assert (results / "normalization-quick.png").stat().st_size > 0
    assert quick_run["data"]["table"] in out


def test_reuse_takes_the_runs_of_the_same_settings_only(tmp_path):
    """``--reuse JSON``: the runs of a previous results file are taken when every setting but
    the normalizations, seeds and runs at a time is the same; otherwise it stops, naming them."""
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import bench_normalization as bench

    old = bench.parse_args(["--normalizations", "token", "turn", "--seeds", "1", "2"])
    path = tmp_path / "old.json"
    runs = [{"normalization": n, "seed": s, "seconds": 1.0, "validations": [{"iteration": 1000}]}
            for n in ("token", "turn") for s in (1, 2)]
    path.write_text(json.dumps({"settings": bench.settings_of(old), "runs": runs}))
    new = bench.parse_args(["--normalizations", "token", "power0.5", "--seeds", "1", "--parallel",
                            "3", "--reuse", str(path)])
    reused = bench.reusable_runs(new)
    assert set(reused) == {(n, s) for n in ("token", "turn") for s in (1, 2)}
    assert reused[("token", 1)]["reused"] == str(path)
    other = bench.parse_args(["--normalizations", "power0.5", "--lr", "1e-3", "--reuse",
                              str(path)])
    with pytest.raises(SystemExit, match=r"other settings \(lr\)"):
        bench.reusable_runs(other)
    assert bench.normalization_flags("power0.25") == ["--loss-normalization", "power",
                                                      "--loss-turn-exponent", "0.25"]
