"""``--loss-normalization power`` through the CLI, as a user runs it: one process on a 0.7/0.3
blend of a conversation dataset and a plain-text dataset, with validation (and its JSON beside
the checkpoints). The loss it trains on (``sum l / L^p`` over ``sum_turns L^(1-p)``) is logged
on every line, overall and per dataset, in training and in validation; bad exponents are refused
with the flag's name and the fix. The gradient's exactness is the equivalence suite's
(``test_power_normalization_equals_its_reference``), the sums the unit tests' (``test_loss``)."""

import glob
import json
import math
import re

import pytest

from tests.training.conftest import launch, our_traceback_frames, train_args

NUM = r"([0-9.]+)"


@pytest.fixture(scope="module")
def power_run(packed_data, text_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("power") / "ckpt"
    args = train_args(["0.7", packed_data, "0.3", text_data], "--loss-normalization", "power",
                      "--loss-turn-exponent", "0.25", "--eval-interval", "2", "--eval-iters",
                      "1", "--save", save, iters=4)
    return launch(1, args), save


@pytest.mark.multiprocess
def test_power_loss_is_logged_overall_per_dataset_and_in_validation(power_run):
    proc, save = power_run
    out = proc.stdout
    assert "loss normalization power (p = 0.25)" in out, out
    lines = [ln for ln in out.splitlines() if ln.startswith("iter ")]
    assert len(lines) == 4, out
    for line in lines:
        found = re.search(rf"\| loss \(power 0.25\) {NUM}", line)
        assert found and math.isfinite(float(found[1])) and float(found[1]) > 0, line
        by_dataset = re.search(rf"\| loss/turn \(power\) by dataset: chat {NUM}, text {NUM}$",
                               line)
        assert by_dataset, line
        low, high = sorted(map(float, by_dataset.groups()))  # the blend's lies between them
        assert low - 1e-4 <= float(found[1]) <= high + 1e-4, line
    valid = [ln for ln in out.splitlines() if ln.startswith("validation at")]
    assert len(valid) == 2 and all(re.search(rf"\| loss \(power 0.25\) {NUM}", ln)
                                   for ln in valid), out
    (last,) = [p for p in glob.glob(f"{save}/validation/iter_*.json") if p.endswith("04.json")]
    metrics = json.load(open(last, encoding="utf-8"))["metrics"]
    assert metrics["loss per turn (power)"] > 0 and metrics["power turns"] > 0
    assert metrics["dataset chat: power turns"] + metrics["dataset text: power turns"] == \
        pytest.approx(metrics["power turns"], rel=1e-9)


@pytest.mark.parametrize("extra, message", [
    (["--loss-normalization", "power", "--loss-turn-exponent", "1.5"],
     "--loss-turn-exponent: 1.5 is not between 0 and 1"),
    (["--loss-turn-exponent", "0.5"], "--loss-turn-exponent: 0.5 is only used by "
                                      "--loss-normalization power, not turn"),
])
def test_bad_exponents_are_refused_by_the_cli(packed_data, extra, message):
    proc = launch(1, train_args(packed_data, *extra), expect_ok=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert not our_traceback_frames(proc.stderr), proc.stderr
