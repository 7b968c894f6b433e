"""Failures of pretrain_dialog.py: bad set-ups are refused before any model is built, each with
one ``error: ...`` line on stderr that says how to fix it, exit code 1 and no Python traceback;
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
     "world size 2 is not divisible by tensor x pipeline parallel 4 x 1; launch a multiple of 4"),
    (6, ["--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2"],
     "world size 6 is not divisible by tensor x pipeline parallel 2 x 2"),
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


def test_dataset_refuses_a_smaller_model_vocabulary(packed_data):
    """The model's vocabulary is taken from the datasets (so the command line cannot make it
    smaller); the dataset reader itself refuses a model vocabulary that does not cover it."""
    from pretrain_dialog import parse_config

    from mt_dialog.training.loop import inspect_datasets
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
                            "seq_length: --seq-length 128 but {main} was packed for 256; use "
                            "--seq-length 256 or rebuild the dataset"),
    "blend_of_two_seq_lengths": (lambda d: _argv([d["main"], d["short"]]),
                                 "data_path: {short} has seq length 128 but {main} has 256; "
                                 "rebuild them alike"),
    "world_not_divisible": (lambda d: _argv(d["main"], "--pipeline-model-parallel-size", "2"),
                            "world size 1 is not divisible by tensor x pipeline parallel 1 x 2; "
                            "launch a multiple of 2 processes"),
    "global_batch_not_divisible": (lambda d: _argv(d["main"], "--micro-batch-size", "2",
                                                   "--global-batch-size", "3"),
                                   "global_batch_size: 3 is not divisible by micro-batch size x "
                                   "data-parallel size = 2 x 1; use a multiple of 2"),
    "missing_prefix": (lambda d: _argv(d["main"] + "_missing"),
                       "{main}_missing.meta.json not found: is '{main}_missing' the "
                       "--output-prefix of tools/preprocess_dialog.py"),
    "context_parallel": (lambda d: _argv(d["main"], "--context-parallel-size", "2"),
                         "context_parallel_size: 2 is not supported: the turn-normalized loss "
                         "needs each turn counted once"),
    "finetune_without_load": (lambda d: _argv(d["main"], "--finetune"),
                              "finetune: --finetune needs --load CHECKPOINT"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_before_the_model_is_built(case, packed_data, short_data):
    make_argv, expected = CASES[case]
    paths = {"main": packed_data, "short": short_data}
    proc = launch(1, make_argv(paths), expect_ok=False, timeout=120)
    err = proc.stderr.strip()
    assert proc.returncode == 1, f"exit code {proc.returncode}\n{proc.stdout}\n{err}"
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert err.count("\n") == 0 and err.startswith("error: "), f"not one error line:\n{err}"
    assert expected.format(**paths) in err, err
    assert "mt_dialog: TP=" not in proc.stdout  # nothing was built: no banner


# ---------------------------------------------------------------- several processes (torchrun)

@pytest.mark.multiprocess
def test_torchrun_world_not_divisible(packed_data):
    proc = launch(2, _argv(packed_data, "--tensor-model-parallel-size", "4"), expect_ok=False,
                  timeout=120)
    message = ("error: world size 2 is not divisible by tensor x pipeline parallel 4 x 1; "
               "launch a multiple of 4 processes or change the parallel sizes")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.count(message) == 2, proc.stderr  # each rank, before any group exists
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
