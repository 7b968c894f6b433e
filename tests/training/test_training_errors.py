"""Failures of pretrain_dialog.py: bad set-ups are refused before any model is built, each with
one ``error: ...`` line on stderr that names the flag and says how to fix it, no Python
traceback, exit code 2 for a command line wrong in itself (as argparse's) and 1 otherwise;
a diverging run stops every rank with an error naming the iteration, keeping the last checkpoint.
"""

import os
import re

import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.storage import DatasetFormatError
from tests.training.conftest import (
    MODEL_ARGS,
    launch,
    our_traceback_frames,
    parse_iters,
)


def _argv(prefix, *extra):
    return ["--data-path", *([prefix] if isinstance(prefix, str) else prefix),
            "--train-iters", "2", *MODEL_ARGS, *extra]


# ------------------------------------------------------------------ unit: the layout checks

def _config(*extra):
    from pretrain_dialog import parse_config

    return parse_config(["--data-path", "unused", "--train-iters", "1", *extra])


@pytest.mark.parametrize("world, extra, message", [
    (2, ["--tensor-model-parallel-size", "4"],
     "world size 2 is not divisible by tensor x pipeline x context parallel 4 x 1 x 1; launch a multiple of 4"),
    (6, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
     "world size 6 is not divisible by tensor x pipeline x context parallel 2 x 2 x 1"),
    (4, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
         "--global-batch-size", "6"],
     "global_batch_size: 6 is not divisible by micro-batch size x data-parallel size = 2 x 2; "
     "use a multiple of 4"),
    (3, ["--tensor-model-parallel-size", "3"], "tensor_model_parallel_size: 3 must divide"),
    (2, ["--pipeline-model-parallel-size", "2", "--num-layers", "3"],
     "num_layers: 3 layers cannot be split evenly over 2 pipeline chunks"),
])
def test_validate_world_refuses(world, extra, message):
    from mt_dialog.training.config import validate_world

    with pytest.raises(ValueError, match=re.escape(message)):
        validate_world(_config(*extra), world)


@pytest.mark.parametrize("world, extra, dp", [
    (1, [], 1),
    (8, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"], 2),
    (4, ["--tensor-model-parallel-size", "2", "--micro-batch-size", "2",
         "--global-batch-size", "8"], 2),
])
def test_validate_world_returns_data_parallel_size(world, extra, dp):
    from mt_dialog.training.config import validate_world

    assert validate_world(_config(*extra), world) == dp


VPP = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
       "--num-layers", "4", "--micro-batch-size", "1"]
SP = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]


@pytest.mark.parametrize("extra, seq, valid, message", [
    (SP + ["--micro-batch-size", "1"], 255, 0,
     "sequence_parallel: a training micro-batch (micro-batch size x seq length) has 255 tokens, "
     "not divisible by the tensor-parallel size 2; rebuild the dataset with a --seq-length that "
     "is a multiple of 2"),
    (SP + ["--micro-batch-size", "2"], 255, 0,
     "sequence_parallel: a validation micro-batch (one pack) has 255 tokens"),
    (VPP + ["--global-batch-size", "3"], 256, 0,
     "global_batch_size: the interleaved pipeline schedule needs the micro-batches per step "
     "(global batch 3 / (micro-batch size 1 x data parallel 1) = 3) to be a multiple of the "
     "pipeline-parallel size 2; use a --global-batch-size that is a multiple of 2"),
    (VPP + ["--global-batch-size", "4", "--eval-interval", "2"], 256, 7,
     "eval_iters: the interleaved pipeline schedule needs each data-parallel rank's validation "
     "micro-batches (one pack each) to be a multiple of the pipeline-parallel size 2, but 7 "
     "validation packs over 1 data-parallel ranks give [7]; pass --eval-iters 1 (validation "
     "then reads 1 x global batch 4 = 4 packs)"),
    (VPP + ["--global-batch-size", "4", "--eval-interval", "2"], 256, 3,
     "give the validation set at least one global batch (4 packs)"),
])
def test_validate_schedule_refuses(extra, seq, valid, message):
    from mt_dialog.training.config import validate_schedule

    with pytest.raises(ValueError, match=re.escape(message)):
        validate_schedule(_config(*extra), 1, seq, valid)


@pytest.mark.parametrize("extra, seq, valid", [
    (SP + ["--micro-batch-size", "2"], 256, 0),
    (VPP + ["--global-batch-size", "4", "--eval-interval", "2", "--eval-iters", "1"], 256, 7),
    (VPP + ["--global-batch-size", "4", "--eval-interval", "2"], 256, 8),
    (VPP + ["--global-batch-size", "4"], 256, 7),  # no validation asked for
])
def test_validate_schedule_accepts(extra, seq, valid):
    from mt_dialog.training.config import validate_schedule

    validate_schedule(_config(*extra), 1, seq, valid)


@pytest.mark.parametrize("version, dtype, refused", [
    ("2.8.0", "float32", True), ("2.11.0+abc", "float32", True), ("2.12.0", "float32", False),
    ("2.8.0", "bfloat16", False), ("2.8.0", "float16", False)])
def test_fp32_thd_attention_needs_te_2_12(version, dtype, refused):
    import torch

    from mt_dialog.training.model import te_thd_precision_problem

    problem = te_thd_precision_problem(version, getattr(torch, dtype))
    assert (problem is not None) == refused
    if refused:
        assert f"Transformer Engine {version} has no fp32 attention backend" in problem
        assert "--bf16" in problem and "--transformer-impl local" in problem


def test_dataset_refuses_a_smaller_model_vocabulary(packed_data):
    """The model's vocabulary is taken from the datasets (so the command line cannot make it
    smaller); the dataset reader itself refuses a model vocabulary that does not cover it."""
    from pretrain_dialog import parse_config

    from mt_dialog.training.data import inspect_datasets
    from mt_dialog.training.model import padded_vocab_size

    info = inspect_datasets(parse_config(["--data-path", packed_data, "--train-iters", "1"]))
    assert info.vocab_size == 400 and info.seq_length == 256
    assert padded_vocab_size(info.vocab_size, 128, 2) >= info.vocab_size
    with pytest.raises(DatasetFormatError, match=r"uses token ids up to 399 \(vocabulary 400\) "
                       r"but the model's vocabulary is 300; use the tokenizer"):
        PackedDialogDataset(packed_data, "train", vocab_size=300)
    with pytest.raises(DatasetFormatError, match="was packed for --seq-length 256 but the run "
                       "uses --seq-length 512"):
        PackedDialogDataset(packed_data, "train", seq_length=512)
    assert len(PackedDialogDataset(packed_data, "train", seq_length=256, vocab_size=400)) > 0


# ----------------------------------------------------- one process: refused before the model

CASES = {
    "seq_length_mismatch": (lambda d: _argv(d["main"], "--seq-length", "128"),
                            "--seq-length 128 but {main} was packed for 256; use "
                            "--seq-length 256 or rebuild the dataset"),
    "blend_of_two_seq_lengths": (lambda d: _argv([d["main"], d["short"]]),
                                 "--data-path: {short} has seq length 128 but {main} has 256; "
                                 "rebuild them alike"),
    "world_not_divisible": (lambda d: _argv(d["main"], "--pipeline-model-parallel-size", "2"),
                            "world size 1 is not divisible by tensor x pipeline x context "
                            "parallel 1 x 2 x 1; launch a multiple of 2 processes"),
    "global_batch_not_divisible": (lambda d: _argv(d["main"], "--micro-batch-size", "2",
                                                   "--global-batch-size", "3"),
                                   "--global-batch-size: 3 is not divisible by micro-batch size x "
                                   "data-parallel size = 2 x 1; use a multiple of 2"),
    "missing_prefix": (lambda d: _argv(d["main"] + "_missing"),
                       "{main}_missing.meta.json not found: is '{main}_missing' the "
                       "--output-prefix of tools/preprocess_dialog.py"),
    "context_parallel": (lambda d: _argv(d["main"], "--context-parallel-size", "2"),
                         "world size 1 is not divisible by tensor x pipeline x context parallel "
                         "1 x 1 x 2; launch a multiple of 2 processes"),
    "finetune_without_load": (lambda d: _argv(d["main"], "--finetune"),
                              "--finetune needs --load CHECKPOINT"),
    # --load without a checkpoint starts from scratch only when it is the --save folder
    "load_without_checkpoint": (lambda d: _argv(d["main"], "--load", d["main"] + "_ckpt",
                                                "--save", d["main"] + "_other"),
                                "--load {main}_ckpt: no latest_checkpointed_iteration.txt; is it "
                                "a folder written by --save?"),
}


USAGE_ERRORS = {"finetune_without_load"}


@pytest.mark.multiprocess  # launches pretrain_dialog.py
@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_the_model_is_built(case, packed_data, short_data):
    make_argv, expected = CASES[case]
    paths = {"main": packed_data, "short": short_data}
    proc = launch(1, make_argv(paths), expect_ok=False, timeout=120)
    err = proc.stderr.strip()
    code = 2 if case in USAGE_ERRORS else 1  # a command line wrong in itself, as argparse's
    assert proc.returncode == code, f"exit code {proc.returncode}\n{proc.stdout}\n{err}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert err.count("\n") == 0 and err.startswith("error: "), f"not one error line:\n{err}"
    assert expected.format(**paths) in err, err
    assert "mt_dialog: TP=" not in proc.stdout  # nothing was built: no banner


# ---------------------------------------------------------------- several processes (torchrun)

@pytest.mark.multiprocess
def test_torchrun_world_not_divisible(packed_data):
    proc = launch(2, _argv(packed_data, "--tensor-model-parallel-size", "4"), expect_ok=False,
                  timeout=120)
    message = ("error: world size 2 is not divisible by tensor x pipeline x context parallel "
               "4 x 1 x 1; launch a multiple of 4 processes or change the parallel sizes")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count(message) == 2, proc.stderr  # each rank, before any group exists
    assert not our_traceback_frames(proc.stderr + proc.stdout), proc.stderr
    assert "mt_dialog: TP=" not in proc.stdout


@pytest.mark.multiprocess
def test_torchrun_interleaved_schedule_micro_batches(packed_data):
    """megatron-core would raise mid-run; refused on every rank before any model is built."""
    proc = launch(2, _argv(packed_data, *VPP, "--global-batch-size", "3"), expect_ok=False,
                  timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count("error: --global-batch-size: the interleaved pipeline schedule "
                             "needs the micro-batches per step") == 2, proc.stderr
    assert not our_traceback_frames(proc.stderr + proc.stdout), proc.stderr
    assert "mt_dialog: TP=" not in proc.stdout


@pytest.mark.multiprocess
def test_divergence_stops_every_rank_with_the_iteration(packed_data, tmp_path):
    """--lr 1e30 blows the weights up after step 1; at PP=2 the loss lives on the last stage
    only, yet both ranks must stop together with the error, and the checkpoint saved at
    iteration 1 stays the latest."""
    save = tmp_path / "ckpt"
    proc = launch(2, ["--data-path", packed_data, "--pipeline-model-parallel-size", "2",
                      "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters",
                      "6", "--log-interval", "1", "--lr", "1e30", "--save", save,
                      "--save-interval", "1", *MODEL_ARGS], expect_ok=False, timeout=300)
    assert proc.returncode != 0, proc.stdout
    pattern = (r"error: iteration (\d+): the (loss is NaN or Inf|gradient norm is \S+); lower "
               r"--lr")
    found = re.findall(pattern, proc.stderr)
    assert len(found) == 2, f"expected the error from both ranks:\n{proc.stderr}"
    bad = int(found[0][0])
    assert all(int(it) == bad for it, _ in found) and bad >= 2
    assert not our_traceback_frames(proc.stderr + proc.stdout), proc.stderr
    logged = parse_iters(proc.stdout)
    assert [r["iter"] for r in logged] == list(range(1, bad)), proc.stdout
    assert f"iter {bad:>6}/" not in proc.stdout
    assert (save / "latest_checkpointed_iteration.txt").read_text() == str(bad - 1)
    assert not os.path.exists(save / f"iter_{bad:07d}")
