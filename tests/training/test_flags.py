"""Megatron-LM users' habits in pretrain_dialog.py, and experiment tracking.

- Flags mt_dialog has no field for get one ``error: FLAG: ANSWER`` line (exit code 2) saying
  where the feature lives; other unknown flags and bad values one line pointing to --help.
- --tokenizer-type / --tokenizer-model / --tokenizer-path are checked against the tokenizer each
  dataset was built with (its metadata's sha256) before any model is built.
- --exit-interval stops and saves; resuming continues exactly like an uninterrupted run.
- --eval-iters without --eval-interval validates once, at the end of the run.
- --recompute-granularity full (uniform, block) gives the losses of no recompute.
- --wandb-project logs the TensorBoard scalars to W&B (offline here) from the logging rank only.

Runs: 6 iterations of 8 packs (1 process unless said), --lr 1e-2 decaying over 6 iterations.
"""

import glob
import json
import os
import shutil
import struct
import subprocess
import sys

import pytest

from tests.training.conftest import (
    REPO,
    SCRIPT,
    iteration_dir,
    launch,
    our_traceback_frames,
    parse_iters,
    parse_validation,
    train_args,
)
from tests.training.launch import launch_env, run_torchrun

ITERS, EXIT = 6, 3
COMMON = ["--lr-decay-iters", str(ITERS), "--eval-iters", "1"]


def _numbers(line):
    return (line["iter"], line["loss_turn"], line["loss_token"], line["lr"], line["grad_norm"])


def _one_error_line(text: str) -> str:
    text = text.strip()
    assert text.count("\n") == 0 and text.startswith("error: "), f"not one error line:\n{text}"
    assert "usage:" not in text and "Traceback" not in text
    return text


def _main(argv, capsys):
    """pretrain_dialog.main(argv) in this process: (exit code, the stderr line)."""
    from pretrain_dialog import main

    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    return code, _one_error_line(capsys.readouterr().err)


# ------------------------------------------------------------- unknown flags: one line, no dump

def _base(prefix="data/unused"):
    return ["--data-path", prefix, "--train-iters", "2"]


@pytest.mark.parametrize("extra, expected", [
    (["--split", "98,2,0"], "error: --split: the train/valid split is made at preprocessing: "
                            "tools/preprocess_dialog.py --split 98,2"),
    (["--use-flash-attn"], "error: --use-flash-attn: attention is chosen by --transformer-impl"),
    (["--tokenizer-prompt-format", "chatml"], "error: --tokenizer-prompt-format: the tokenizer "
                                              "is chosen at preprocessing"),
    (["--vocab-file", "vocab.json"], "error: --vocab-file: the tokenizer is chosen at "
                                     "preprocessing"),
    (["--lr-warmup-fraction", "0.01"], "error: --lr-warmup-fraction: give --lr-warmup-iters"),
    (["--moe-router-topk", "4"], "error: --moe-router-topk needs --num-experts N"),
    (["--moe-expert-capacity-factor", "1.0"], "error: "
     "--moe-expert-capacity-factor: not supported by mt_dialog's Mixture of Experts"),
    (["--moe-shared-expert-overlap"], "error: --moe-shared-expert-overlap: not available: it "
     "runs the shared expert on a second CUDA stream"),
    (["--moe-layer-freq", "2"], "error: --moe-layer-freq needs --num-experts N"),
    (["--num-experts", "4", "--moe-layer-freq", "[0]*2"], "error: --moe-layer-freq: [0, 0] "
     "must have one 0 (dense) or 1 (MoE) per layer"),
    (["--num-experts", "4", "--moe-router-topk", "5"], "error: --moe-router-topk: 5 must be "
                                                        "between 1 and --num-experts 4"),
    (["--swiglu", "--normalization", "LayerNorm", "--disable-bias-linear"],
     "error: argument --normalization: mt_dialog always uses RMSNorm (the model is Llama-style: "
     "RMSNorm (--apply-layernorm-1p for Gemma's (1 + w) form), a gated MLP, RoPE); drop the "
     "flag; see "),
    (["--hidden-dropout", "0.1"], "error: argument --hidden-dropout: mt_dialog always uses 0.0 "
                                  "(dropout is off, the usual fine-tuning choice); drop the flag"),
    (["--lr", "-1"], "error: --lr: must be positive, got -1.0"),  # field names become flags
    (["--tensor-model-paralel-size", "2"], "error: unrecognized argument "
     "--tensor-model-paralel-size (did you mean --tensor-model-parallel-size?); see "),
    (["--tensor-model", "2"], "error: unrecognized argument --tensor-model"),  # no abbreviation
    (["--train-iters", "abc"], "error: argument --train-iters: invalid int value: 'abc'; see "),
    (["--recompute-granularity", "ful"], "error: argument --recompute-granularity: invalid "
                                         "choice: 'ful'"),
])
def test_unknown_flags_and_bad_values_are_one_line(extra, expected, capsys):
    code, line = _main(_base() + extra, capsys)
    assert code == 2 and line.startswith(expected), line


def test_a_megatron_lm_recipes_flags_that_state_what_mt_dialog_does_are_accepted():
    """Porting a Megatron-LM Llama recipe needs no edits for the flags that are always so here."""
    from pretrain_dialog import parse_config

    recipe = ["--swiglu", "--use-mcore-models", "--disable-bias-linear",
              "--use-rotary-position-embeddings", "--normalization", "RMSNorm",
              "--position-embedding-type", "rope", "--attention-dropout", "0",
              "--hidden-dropout", "0.0", "--ckpt-format", "torch_dist", "--optimizer", "adam",
              "--group-query-attention", "--num-query-groups", "2", "--use-dist-ckpt"]
    plain = parse_config(_base())
    ported = parse_config(_base() + recipe)
    assert ported.model.num_query_groups == 2
    ported.model.num_query_groups = plain.model.num_query_groups  # derived: one per head
    assert ported == plain  # nothing else changed


def test_every_answer_is_for_a_flag_mt_dialog_lacks(capsys):
    """Each Megatron-LM flag of the table reaches its answer through the real parser (none is
    shadowed by a real flag), in one line."""
    from mt_dialog.training.megatron_flags import ELSEWHERE
    from pretrain_dialog import build_parser

    real = {s for a in build_parser()._actions for s in a.option_strings}
    assert not set(ELSEWHERE) & real, set(ELSEWHERE) & real
    assert len(ELSEWHERE) >= 55  # (--num-experts, --expert-model-parallel-size, --overlap-grad-
    # reduce and --overlap-param-gather are real)
    for flag, answer in ELSEWHERE.items():
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(_base() + [flag, "1"])
        assert exc.value.code == 2
        assert _one_error_line(capsys.readouterr().err) == f"error: {flag}: {answer}"


@pytest.mark.multiprocess  # launches pretrain_dialog.py
def test_cli_answers_in_one_line_without_usage(packed_data):
    """The path users take: python pretrain_dialog.py with a Megatron-LM flag."""
    proc = launch(1, train_args(packed_data, "--use-flash-attn", "--split", "949,50,1"),
                  expect_ok=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith("error: --use-flash-attn: attention is chosen by --transformer-impl")
    assert line.endswith("(also not accepted: --split)") and not proc.stdout


# ---------------------------------------------------------------- config: recompute, eval, W&B

def _config(*extra):
    from pretrain_dialog import parse_config

    return parse_config(_base() + [str(e) for e in extra])


@pytest.mark.parametrize("extra, settings", [
    ([], (None, None, None)),
    (["--recompute-activations"], ("selective", None, None)),
    (["--recompute-granularity", "selective"], ("selective", None, None)),
    (["--recompute-granularity", "full"], ("full", "uniform", 1)),
    (["--recompute-granularity", "full", "--recompute-method", "block",
      "--recompute-num-layers", "2"], ("full", "block", 2)),
])
def test_recompute_flags_reach_megatron_core(extra, settings):
    from mt_dialog.training.model import transformer_config

    tconfig = transformer_config(_config("--num-layers", "4", "--transformer-impl", "local",
                                         *extra))
    assert (tconfig.recompute_granularity, tconfig.recompute_method,
            tconfig.recompute_num_layers) == settings


@pytest.mark.parametrize("extra, message", [
    (["--recompute-activations", "--recompute-granularity", "full"],
     "recompute_activations: --recompute-activations means --recompute-granularity selective"),
    (["--recompute-method", "block"], "recompute_method: --recompute-method applies to "
                                      "--recompute-granularity full only"),
    (["--recompute-granularity", "selective", "--recompute-num-layers", "1"],
     "recompute_num_layers: --recompute-num-layers applies to --recompute-granularity full"),
    (["--wandb-exp-name", "x"], "wandb_exp_name: --wandb-exp-name needs --wandb-project"),
    (["--exit-interval", "0"], "exit_interval: must be positive, got 0"),
])
def test_config_refusals_name_the_flag(extra, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        _config(*extra)


@pytest.mark.parametrize("extra, message", [
    (["--recompute-num-layers", "3"], "recompute_num_layers: 3 with --recompute-method uniform "
                                      "must be a divisor of the 4 layers"),
    (["--recompute-method", "block", "--recompute-num-layers", "3",
      "--pipeline-model-parallel-size", "2"], "recompute_num_layers: 3 with --recompute-method "
                                              "block must be at most the 2 layers"),
])
def test_recompute_layers_fit_the_pipeline_chunks(extra, message):
    from mt_dialog.training.config import validate_world

    config = _config("--num-layers", "4", "--recompute-granularity", "full", *extra)
    with pytest.raises(ValueError, match="^" + message):
        validate_world(config, 2)


def test_eval_iters_zero_turns_validation_off():
    train = _config("--eval-interval", "5", "--eval-iters", "0").train
    assert (train.eval_interval, train.eval_iters) == (None, None)


# ------------------------------------------------------------------------------- tokenizers

@pytest.fixture(scope="module")
def hf_data(hf_tokenizer_dir, demo_tokenizer, tmp_path_factory):
    """A dataset tokenized with the tiny Hugging Face tokenizer, without a valid split."""
    from tools.preprocess_dialog import main as preprocess

    prefix = str(tmp_path_factory.mktemp("hf_data") / "chat")
    code = preprocess(["--input", demo_tokenizer["corpus"], "--tokenizer-type", "huggingface",
                       "--tokenizer-path", hf_tokenizer_dir, "--template", "chatml",
                       "--seq-length", "256", "--split", "100,0", "--output-prefix", prefix,
                       "--no-progress", "--overlong", "drop"])
    assert code == 0
    return prefix


def _check(*argv):
    from mt_dialog.training.megatron_flags import check_tokenizer
    from pretrain_dialog import parse_config

    check_tokenizer(parse_config(["--train-iters", "1", *map(str, argv)]))


def test_tokenizer_hashes_match_preprocessing(packed_data, hf_data, demo_tokenizer,
                                              hf_tokenizer_dir):
    """The right tokenizer, named the Megatron-LM way or mt_dialog's, is accepted: the hashes
    equal the ones preprocessing recorded."""
    from mt_dialog.data.storage import read_metadata
    from mt_dialog.data.tokenizers import file_sha256, folder_sha256

    sp = demo_tokenizer["tokenizer"]
    assert file_sha256(sp) == read_metadata(packed_data)["tokenizer"]["sha256"]
    assert folder_sha256(hf_tokenizer_dir) == read_metadata(hf_data)["tokenizer"]["sha256"]
    for flags in (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp],
                  ["--tokenizer-type", "GPTSentencePieceTokenizer", "--tokenizer-model", sp],
                  ["--tokenizer-model", sp], ["--tokenizer-type", "sentencepiece"]):
        _check("--data-path", packed_data, *flags)
    for flags in (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model",
                   hf_tokenizer_dir], ["--tokenizer-path", hf_tokenizer_dir],
                  ["--tokenizer-type", "huggingface"]):
        _check("--data-path", hf_data, *flags)


def test_tokenizer_mismatch_is_refused_by_name(packed_data, hf_data, demo_tokenizer,
                                               hf_tokenizer_dir, sp_model_path, tmp_path,
                                               capsys):
    sp = demo_tokenizer["tokenizer"]
    other_hf = tmp_path / "other_hf"
    shutil.copytree(hf_tokenizer_dir, other_hf)
    config = json.loads((other_hf / "tokenizer_config.json").read_text())
    config["model_max_length"] = 77  # another tokenizer folder: other settings, other hash
    (other_hf / "tokenizer_config.json").write_text(json.dumps(config))
    cases = [
        ([packed_data, "--tokenizer-model", sp_model_path],
         f"error: tokenizer: {packed_data} was built with the sentencepiece tokenizer {sp} "
         f"(sha256 ", f"), not the sentencepiece tokenizer --tokenizer-model {sp_model_path} "
         f"(sha256 ", f"; pass --tokenizer-model {sp}, drop the tokenizer flags"),
        ([hf_data, "--tokenizer-path", other_hf],
         f"error: tokenizer: {hf_data} was built with the huggingface tokenizer "
         f"{hf_tokenizer_dir}", f"not the huggingface tokenizer --tokenizer-path {other_hf}",
         f"pass --tokenizer-path {hf_tokenizer_dir}"),
        ([hf_data, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", sp],
         f"error: tokenizer: {hf_data} was built with the huggingface tokenizer",
         f"not the sentencepiece tokenizer --tokenizer-model {sp}",
         f"rebuild the dataset with tools/preprocess_dialog.py --tokenizer-model {sp}"),
        ([packed_data, "--tokenizer-type", "HuggingFaceTokenizer"],
         f"error: tokenizer: {packed_data} was built with the sentencepiece tokenizer",
         "not --tokenizer-type HuggingFaceTokenizer; pass --tokenizer-type sentencepiece"),
        ([packed_data, "--tokenizer-type", "GPT2BPETokenizer"],  # a bad value: exit code 2
         "error: --tokenizer-type: 'GPT2BPETokenizer' is not supported"),
        ([packed_data, "--tokenizer-model", tmp_path / "missing.model"],
         f"error: --tokenizer-model {tmp_path / 'missing.model'}: no such file"),
        ([packed_data, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", sp],
         "error: --tokenizer-type HuggingFaceTokenizer is a huggingface "
         f"tokenizer but --tokenizer-model {sp} is a sentencepiece one"),
    ]
    for argv, *parts in cases:
        code, line = _main(["--data-path", argv[0], "--train-iters", "1", *argv[1:]], capsys)
        assert code == (2 if "GPT2BPE" in parts[0] else 1), line
        assert line.startswith(parts[0]) and all(p in line for p in parts), (line, parts)


@pytest.mark.multiprocess  # launches pretrain_dialog.py
def test_cli_refuses_another_tokenizer_before_the_model(packed_data, sp_model_path):
    proc = launch(1, train_args(packed_data, "--tokenizer-type", "Llama2Tokenizer",
                                "--tokenizer-model", sp_model_path), expect_ok=False,
                  timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line.startswith(f"error: tokenizer: {packed_data} was built with the sentencepiece")
    assert "mt_dialog: TP=" not in proc.stdout  # nothing was built


def test_validation_flags_need_validation_data(hf_data, capsys):
    for flag in ("--eval-iters", "--eval-interval"):
        code, line = _main(["--data-path", hf_data, "--train-iters", "1", flag, "2"], capsys)
        assert code == 1 and line.startswith(
            f"error: {flag} needs validation data but {hf_data} "
            "has no valid split; pass --valid-data-path PREFIX"), line


# --------------------------------------------------- exit interval, resume, eval at the end

def _run(prefix, *extra, script=None):
    args = train_args(prefix, *COMMON, *extra, iters=ITERS)
    if script:
        proc = run_torchrun(script, 1, args, timeout=300)
    else:
        proc = launch(1, args)
    return {"stdout": proc.stdout, "iters": parse_iters(proc.stdout),
            "valid": parse_validation(proc.stdout)}


@pytest.fixture(scope="module")
def straight(packed_data, demo_tokenizer):
    """6 iterations in one go; the right tokenizer given the Megatron-LM way is accepted."""
    return _run(packed_data, "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                demo_tokenizer["tokenizer"])


@pytest.fixture(scope="module")
def interrupted(packed_data, tmp_path_factory):
    """The same command twice, as a job that restarts: --load DIR --save DIR --exit-interval 3
    (the first launch finds no checkpoint in DIR and starts from scratch)."""
    save = str(tmp_path_factory.mktemp("exit") / "ckpt")
    first = _run(packed_data, "--save", save, "--load", save, "--exit-interval", EXIT)
    files_after_first = sorted(os.listdir(save))
    second = _run(packed_data, "--save", save, "--load", save, "--exit-interval", EXIT)
    return first, second, files_after_first, save


@pytest.mark.multiprocess  # launches pretrain_dialog.py
def test_eval_iters_alone_validates_once_at_the_end(straight):
    assert [r["iter"] for r in straight["iters"]] == list(range(1, ITERS + 1)), straight["stdout"]
    assert [v["iter"] for v in straight["valid"]] == [ITERS], straight["stdout"]


@pytest.mark.multiprocess  # launches pretrain_dialog.py
def test_exit_interval_stops_saves_and_resumes_exactly(straight, interrupted):
    first, second, files_after_first, save = interrupted
    assert [r["iter"] for r in first["iters"]] == list(range(1, EXIT + 1)), first["stdout"]
    assert f"--load {save}: no checkpoint there yet (it is the --save folder); starting from " \
           "scratch" in first["stdout"]
    assert f"exiting at iteration {EXIT} of {ITERS} (--exit-interval {EXIT}); continue with " \
           f"--load {save}" in first["stdout"]
    assert files_after_first == ["config.json", "iter_0000003",
                                 "latest_checkpointed_iteration.txt", "tokenizer", "validation"]
    assert f"iter_{EXIT:07d}.json" in os.listdir(os.path.join(save, "validation"))
    assert [v["iter"] for v in first["valid"]] == [EXIT]  # the end of that run
    assert f"loaded {save} at iteration {EXIT}\n" in second["stdout"]
    # every logged number, at every iteration, as if never interrupted
    assert [_numbers(r) for r in first["iters"] + second["iters"]] == \
        [_numbers(r) for r in straight["iters"]], second["stdout"]
    assert second["valid"] == straight["valid"]
    assert "exiting at" not in second["stdout"]  # iteration 6 is the end, not an exit
    assert os.path.isdir(iteration_dir(save, ITERS))


@pytest.mark.multiprocess
def test_full_recompute_gives_the_losses_of_no_recompute(packed_data, straight):
    """megatron-core recomputes every layer (uniform, 1 at a time; counted by the probe) and
    every logged number equals the run without recompute."""
    full = _run(packed_data, "--recompute-granularity", "full",
                script="tests/training/count_recompute.py")
    # 6 steps x 4 micro-batches x 2 layers, one checkpoint per layer
    assert "recompute checkpoints: 48" in full["stdout"], full["stdout"]
    assert [_numbers(r) for r in full["iters"]] == [_numbers(r) for r in straight["iters"]]
    assert full["valid"] == straight["valid"]


# -------------------------------------------------------------------- W&B and TensorBoard

def _wandb_records(path):
    """The protobuf records of a W&B ``.wandb`` run file: a 7-byte header, then LevelDB-log
    records (7-byte header: crc32, length, type; FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data, block = open(path, "rb").read(), 32768
    assert data[:4] == b":W&B", path
    pos, parts = 7, []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def _wandb_history(path):
    """{step: {key: value}} of the metrics logged in a W&B run file, and its run record."""
    history, run = {}, None
    for record in _wandb_records(path):
        if record.HasField("history"):
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            history.setdefault(record.history.step.num, {}).update(
                {k: v for k, v in items.items() if not k.startswith("_")})
        elif record.HasField("run"):
            run = record.run
    return history, run


@pytest.fixture(scope="module")
def tracked(packed_data, tmp_path_factory):
    """TP=2 (logging rank 1), full block recompute, TensorBoard and W&B offline."""
    folder = tmp_path_factory.mktemp("tracked")
    args = train_args(packed_data, *COMMON, "--tensor-model-parallel-size", "2",
                      "--recompute-granularity", "full", "--recompute-method", "block",
                      "--recompute-num-layers", "1", "--tensorboard-dir", folder / "tb",
                      "--wandb-project", "mt-dialog-test", "--wandb-exp-name", "tp2-run",
                      "--wandb-save-dir", folder / "wandb", iters=ITERS)
    proc = run_torchrun(SCRIPT, 2, args, timeout=300,
                        env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    return {"stdout": proc.stdout, "folder": folder}


@pytest.mark.multiprocess
def test_wandb_logs_the_tensorboard_scalars_from_the_logging_rank(tracked, straight):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = glob.glob(str(tracked["folder"] / "wandb" / "wandb" / "offline-run-*" / "*.wandb"))
    assert len(runs) == 1, runs  # one W&B run: the logging rank's
    history, run = _wandb_history(runs[0])
    assert (run.project, run.display_name) == ("mt-dialog-test", "tp2-run")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["parallel"]["tensor_model_parallel_size"] == 2
    assert sorted(history) == list(range(1, ITERS + 1))
    logged = {r["iter"]: r for r in parse_iters(tracked["stdout"])}
    printed = {"loss_turn": ("loss_per_turn", 5.1e-5, 0), "loss_token": ("loss_per_token",
               5.1e-5, 0), "lr": ("lr", 0, 5.1e-4), "grad_norm": ("grad_norm", 5.1e-4, 0)}
    for step, values in history.items():  # as precise as the log line prints them
        for ours, (theirs, absolute, relative) in printed.items():
            assert values[f"train/{theirs}"] == pytest.approx(
                logged[step][ours], abs=absolute, rel=relative), (step, theirs)
    (valid,) = parse_validation(tracked["stdout"])
    assert [s for s, v in history.items() if "valid/loss_per_turn" in v] == [ITERS]
    assert history[ITERS]["valid/loss_per_turn"] == pytest.approx(valid["loss_turn"], abs=5.1e-5)

    boards = glob.glob(str(tracked["folder"] / "tb" / "events.out.tfevents.*"))
    assert len(boards) == 1, boards
    events = EventAccumulator(boards[0])
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert tags == {k for values in history.values() for k in values}, tags
    for tag in tags:  # the same scalars at the same steps (TensorBoard stores float32)
        board = {e.step: e.value for e in events.Scalars(tag)}
        assert board == pytest.approx({s: v[tag] for s, v in history.items() if tag in v},
                                      rel=1e-6), tag
    # TP=2 with block recompute follows the 1-process run without recompute
    for got, want in zip(logged.values(), straight["iters"]):
        assert got["loss_turn"] == pytest.approx(want["loss_turn"], abs=2e-3), (got, want)


@pytest.mark.multiprocess  # launches pretrain_dialog.py
def test_wandb_flag_without_wandb_is_one_line(packed_data, tmp_path):
    """A machine without wandb (hidden from the import system): refused before the build."""
    args = train_args(packed_data, "--wandb-project", "p")
    code = ("import runpy, sys; sys.modules['wandb'] = None; "
            f"sys.argv = [{SCRIPT!r}] + sys.argv[1:]; runpy.run_path({SCRIPT!r}, "
            "run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=launch_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    line = _one_error_line(proc.stderr)
    assert line == ("error: --wandb-project needs the wandb package, which is "
                    "not installed: pip install wandb (or pip install -e '.[wandb]'), or drop "
                    "--wandb-project")
    assert not our_traceback_frames(proc.stderr) and "mt_dialog: TP=" not in proc.stdout
