"""Interruption and damage during training: SIGTERM (what SLURM / Kubernetes send before killing
a job) under --exit-signal-handler stops every rank after the same iteration with a checkpoint,
and resuming continues exactly; a save that fails midway stops the run with the reason and
leaves the previous checkpoint loadable; --save on another run's checkpoints and a damaged
dataset are refused before any model is built."""

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from tests.training.conftest import (
    REPO,
    SCRIPT,
    iteration_dir,
    launch,
    our_traceback_frames,
    parse_iters,
    read_checkpoint,
    train_args,
)
from tests.training.launch import command, launch_env, run

pytestmark = pytest.mark.multiprocess

TP2 = ["--tensor-model-parallel-size", "2"]
LONG = 300  # iterations asked for: the signal always comes first
SCHEDULE = ["--lr-decay-iters", str(LONG)]


def _numbers(line):
    return (line["iter"], line["loss_turn"], line["loss_token"], line["lr"], line["grad_norm"])


def _run_until_terminated(args, after_iteration: int) -> subprocess.CompletedProcess:
    """torchrun with 2 processes; SIGTERM to torchrun (which forwards it to the workers) once
    iteration ``after_iteration`` is logged."""
    cmd = command(SCRIPT, 2, args)
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("iter ") and int(line.split()[1].split("/")[0]) >= after_iteration:
            proc.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(lines)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(lines) + out, err)


@pytest.fixture(scope="module")
def terminated(packed_data, tmp_path_factory):
    save = tmp_path_factory.mktemp("sigterm") / "ckpt"
    proc = _run_until_terminated(train_args(packed_data, *TP2, *SCHEDULE, "--save", save,
                                            "--load", save, "--exit-signal-handler",
                                            iters=LONG), after_iteration=2)
    return proc, save


def test_sigterm_saves_a_checkpoint_and_resuming_is_exact(terminated, packed_data, tmp_path):
    proc, save = terminated
    stopped = parse_iters(proc.stdout)[-1]["iter"]
    assert 2 <= stopped < LONG, proc.stdout
    assert (f"exiting at iteration {stopped} of {LONG} (SIGTERM with --exit-signal-handler); "
            f"continue with --load {save}") in proc.stdout, proc.stdout + proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(stopped)
    assert not our_traceback_frames(proc.stdout + proc.stderr), proc.stderr
    # the same command continues; stop both it and an uninterrupted run 2 iterations later
    until = ["--exit-interval", str(stopped + 2)]
    resumed = launch(2, train_args(packed_data, *TP2, *SCHEDULE, "--save", save, "--load", save,
                                   "--exit-signal-handler", *until, iters=LONG))
    straight = launch(2, train_args(packed_data, *TP2, *SCHEDULE, "--save", tmp_path / "s",
                                    *until, iters=LONG))
    tail = [r for r in parse_iters(straight.stdout) if r["iter"] > stopped]
    assert [_numbers(r) for r in parse_iters(resumed.stdout)] == [_numbers(r) for r in tail]
    a = read_checkpoint(iteration_dir(save, stopped + 2))
    b = read_checkpoint(iteration_dir(tmp_path / "s", stopped + 2))
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_exit_duration_stops_with_a_checkpoint(packed_data, tmp_path):
    proc = launch(1, train_args(packed_data, "--save", tmp_path / "d", "--exit-duration-in-mins",
                                "0.0001", iters=50))
    assert "exiting at iteration 1 of 50 (--exit-duration-in-mins 0.0001 elapsed); continue " \
           f"with --load {tmp_path / 'd'}" in proc.stdout
    assert (tmp_path / "d" / "latest_checkpointed_iteration.txt").read_text() == "1"


FAILING = os.path.join("tests", "training", "failing_save_worker.py")


def test_a_failed_save_stops_every_rank_and_keeps_the_previous_checkpoint(packed_data, tmp_path):
    save = tmp_path / "ckpt"
    args = train_args(packed_data, *TP2, "--save", save, "--save-interval", "2", iters=6)
    proc = run(FAILING, 2, args, expect_ok=False,
               env={"MT_DIALOG_TEST_FAIL_SAVE": "iter_0000004", "MT_DIALOG_TEST_FAIL_RANK": "1"})
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, proc.stderr  # one line per rank
    assert all(f"saving iteration 4 to {save} failed" in e for e in errors), errors
    assert all("No space left on device" in e for e in errors), errors  # the root cause
    assert all(f"the previous checkpoint (iteration 2) is untouched and --load {save} resumes "
               "from it" in e for e in errors), errors
    assert not our_traceback_frames(proc.stderr + proc.stdout), proc.stderr
    assert (save / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert not os.path.exists(iteration_dir(save, 4))  # the partial folder is removed
    resumed = launch(2, train_args(packed_data, *TP2, "--save", save, "--load", save, iters=6))
    assert f"loaded {save} at iteration 2" in resumed.stdout
    assert [r["iter"] for r in parse_iters(resumed.stdout)] == [3, 4, 5, 6]


def test_save_into_another_runs_checkpoints_is_refused(packed_data, tmp_path):
    save = tmp_path / "ckpt"
    launch(1, train_args(packed_data, "--save", save, iters=1))
    for extra in ([], ["--load", save, "--finetune"]):
        proc = launch(1, train_args(packed_data, "--save", save, *extra, iters=2),
                      expect_ok=False)
        assert proc.returncode == 1 and "mt_dialog: TP=" not in proc.stdout
        assert proc.stderr.strip() == (
            f"error: --save {save} already holds checkpoints of a run (newest: iteration 1); "
            f"continue that run with --load {save} (without --finetune), or save this run to a "
            "new folder"), proc.stderr


def test_a_damaged_dataset_is_refused_before_the_model_is_built(packed_data, tmp_path):
    from mt_dialog.data.storage import output_files

    copy = str(tmp_path / "copy")
    for source, target in zip(output_files(packed_data, ("train", "valid")),
                              output_files(copy, ("train", "valid"))):
        shutil.copy2(source, target)
    path = f"{copy}.valid.tokens.bin"  # validation data: read only at the first evaluation
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(size - 64)
    proc = launch(2, train_args(copy, *TP2, "--eval-interval", "2", iters=4), expect_ok=False)
    assert proc.returncode == 1 and "mt_dialog: TP=" not in proc.stdout
    message = f"error: {path} has {size - 64:,} bytes but the dataset's metadata says {size:,}"
    assert proc.stderr.count(message) == 2, proc.stderr
    assert not our_traceback_frames(proc.stderr + proc.stdout), proc.stderr
