"""Megatron-LM users' habits in ``pretrain_dialog.py``.

``answer(flag)``: a one-line answer for a Megatron-LM ``pretrain_gpt.py`` flag that mt_dialog has
no field for, saying where the feature lives (preprocessing, another flag, always on, not
supported); ``pretrain_dialog.py`` prints it as ``error: FLAG: ANSWER`` (exit code 2) instead of
argparse's usage dump. ``check_tokenizer(config)``: ``--tokenizer-type`` / ``--tokenizer-model``
/ ``--tokenizer-path`` checked against the tokenizer each dataset was built with (its metadata:
type and sha256, computed as ``mt_dialog.data.tokenizers`` does at preprocessing).
``check_validation_data(config)``: ``--eval-interval`` / ``--eval-iters`` need validation packs.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from typing import Dict, Optional, Tuple

from mt_dialog.data.storage import read_metadata
from mt_dialog.data.tokenizers import file_sha256, folder_sha256

PREPROCESS = "tools/preprocess_dialog.py"
TOKENIZER = (f"the tokenizer is chosen at preprocessing ({PREPROCESS} --tokenizer-type, "
             "--tokenizer-model, --tokenizer-path) and read from PREFIX.meta.json; "
             "pretrain_dialog.py takes only --tokenizer-type, --tokenizer-model and "
             "--tokenizer-path, to check it")
LLAMA = ("the model is always a Llama-style block (RMSNorm, gated MLP, RoPE; no linear biases "
         "but --add-qkv-bias for Qwen2 or --add-bias-linear for all): drop the flag")
FUSIONS = ("kernel fusions follow the layers: on with Transformer Engine (--transformer-impl), "
           "off on megatron-core's local layers; nothing to set")
CHECKPOINTS = ("checkpoints are always megatron-core distributed checkpoints (torch_dist) "
               "saved whole; tools/convert_checkpoint.py converts from and to Hugging Face")
LOGGING = ("each log line, --tensorboard-dir and --wandb-project record loss per turn and per "
           "token, lr and grad norm every iteration; tokens/s and padding are in the log line")
NOT_SUPPORTED = "not supported by mt_dialog (dense Llama-style GPT, bf16/fp16/fp32)"
MOE = ("not supported by mt_dialog's Mixture of Experts, whose flags are --num-experts, "
       "--moe-router-topk, --moe-ffn-hidden-size, --moe-router-load-balancing-type "
       "(aux_loss, none), --moe-aux-loss-coeff, --moe-router-score-function, "
       "--moe-router-pre-softmax, --moe-token-dispatcher-type (allgather, alltoall), "
       "--moe-shared-expert-intermediate-size, --moe-shared-expert-gate, "
       "--moe-router-enable-expert-bias, "
       "--moe-router-bias-update-rate, --moe-router-num-groups, --moe-router-group-topk, "
       "--moe-router-topk-scaling-factor, --moe-layer-freq and --expert-model-parallel-size")


# one answer per flag (flags sharing an answer are added below)
ELSEWHERE: Dict[str, str] = {
    "--moe-grouped-gemm": "with Transformer Engine the experts are always TE's grouped GEMM "
                          "(TEGroupedMLP), on megatron-core's local layers SequentialMLP; "
                          "nothing to set",
    "--moe-shared-expert-overlap": "not available: it runs the shared expert on a second CUDA "
                                   "stream; the shared expert runs before the router (same "
                                   "result): drop the flag",
    "--split": f"the train/valid split is made at preprocessing: {PREPROCESS} --split 98,2 "
               "(or --valid-input); training reads PREFIX's train and valid splits",
    "--train-data-path": "give the dataset prefix to --data-path (its train split is read)",
    "--test-data-path": "there is no test phase: validate on it with --valid-data-path",
    "--mock-data": f"build a small dataset with {PREPROCESS} (scripts/demo.sh does)",
    "--data-cache-path": "packs are indexed once, at preprocessing: there is no cache",
    "--eod-mask-loss": "the loss covers assistant replies and their end-of-turn token only "
                       "(recorded at preprocessing); --loss-normalization weights them",
    "--sft": "pretrain_dialog.py is SFT: it trains on the packed conversations of "
             f"{PREPROCESS}",
    "--train-samples": "give --train-iters or --train-epochs",
    "--lr-warmup-samples": "give --lr-warmup-iters",
    "--lr-warmup-fraction": "give --lr-warmup-iters",
    "--lr-decay-samples": "give --lr-decay-iters",
    "--rampup-batch-size": "not supported: the global batch is --global-batch-size throughout",
    "--max-position-embeddings": "RoPE has no position table: sequences are --seq-length "
                                 "long, taken from the dataset",
    "--calculate-per-token-loss": "always on: --loss-normalization (turn, token, "
                                  "conversation, power) chooses the normalization",
    "--use-flash-attn": "attention is chosen by --transformer-impl: transformer_engine "
                        "runs packed conversations through TE's THD (flash / fused) "
                        "attention on GPU; local runs scaled_dot_product_attention per "
                        "conversation",
    "--use-legacy-models": "not available: the model is megatron-core's GPTModel",
    "--ddp-average-in-collective": "off by design: gradients are summed and divided once by "
                                   "the global turn (or token) count",
    "--distributed-backend": "chosen for you: nccl with CUDA, gloo on CPU",
    "--use-cpu-initialization": "automatic: weights are initialized on CPU without a GPU",
    "--num-layers-per-virtual-pipeline-stage": "give --virtual-pipeline-model-parallel-size"
                                               " (model chunks per pipeline rank)",
    "--no-load-optim": "--load DIR --finetune takes the weights only (new optimizer, "
                       "iteration 0)",
    "--log-throughput": "tokens/s is in every log line",
    "--profile": "not built in: run under nsys or torch.profiler",
    "--recompute-modules": "selective recompute (--recompute-granularity selective) "
                           "recomputes core attention; other modules are not selectable",
    "--num-workers": "packs are memory-mapped and read in the training process: there are "
                     "no loader workers to set",
}
_SAME_AS = {"--dataloader-type": "--num-workers", "--no-mmap-bin-files": "--num-workers",
            "--num-dataset-builder-threads": "--data-cache-path",
            "--attention-backend": "--use-flash-attn", "--no-load-rng": "--no-load-optim"}
ELSEWHERE.update({flag: ELSEWHERE[same] for flag, same in _SAME_AS.items()})
_SHARED = (
    (TOKENIZER, ("--vocab-file", "--merge-file", "--vocab-size", "--vocab-extra-ids",
                 "--legacy-tokenizer")),
    (LLAMA, ("--no-position-embedding",)),
    (FUSIONS, ("--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion",
               "--no-bias-dropout-fusion", "--no-gradient-accumulation-fusion",
               "--cross-entropy-loss-fusion", "--no-persist-layer-norm")),
    (CHECKPOINTS, ("--auto-detect-ckpt-format", "--async-save",
                   "--no-save-optim", "--no-save-rng", "--dist-ckpt-strictness",
                   "--non-persistent-save-interval")),
    (NOT_SUPPORTED, ("--use-torch-fsdp2",
                     "--use-custom-fsdp", "--spec", "--yaml-cfg")),
)
ELSEWHERE.update({flag: text for text, flags in _SHARED for flag in flags})

# flag families, by prefix (an exact entry above wins)
FAMILIES = {"--tokenizer-": TOKENIZER, "--tiktoken-": TOKENIZER, "--moe-": MOE,
            "--expert-tensor-parallel-size": MOE,
            "--fp8": "not supported; mt_dialog's FP8 flags are --fp8-format, --fp8-recipe, "
            "--fp8-margin, --fp8-amax-history-len and --fp8-amax-compute-algo (with --bf16)",
            "--tp-comm-": "not supported; --tp-comm-overlap takes TE's default userbuffer "
            "settings", "--fp4": NOT_SUPPORTED,
            "--ckpt-": CHECKPOINTS, "--log-": LOGGING, "--tensorboard-": LOGGING,
            "--timing-log": LOGGING, "--profile-": "not built in: run under nsys or "
            "torch.profiler", "--use-pytorch-profiler": "not built in: run under torch.profiler",
            "--wandb-": "the W&B flags are --wandb-project, --wandb-exp-name and "
            "--wandb-save-dir", "--recompute-": "the recompute flags are "
            "--recompute-granularity, --recompute-method and --recompute-num-layers (and "
            "--recompute-activations)"}


# Megatron-LM flags that state what mt_dialog always does: accepted, so that a Megatron-LM recipe
# runs unchanged; a value that says otherwise is refused with what mt_dialog does.
ALWAYS_ON = ("--swiglu", "--use-mcore-models", "--disable-bias-linear",
             "--use-rotary-position-embeddings", "--reset-position-ids",
             "--reset-attention-mask", "--accumulate-allreduce-grads-in-fp32",
             "--check-for-nan-in-loss-and-grad", "--use-dist-ckpt", "--group-query-attention",
             "--no-create-attention-mask-in-dataloader")
STYLE = ("the model is Llama-style: RMSNorm (--apply-layernorm-1p for Gemma's (1 + w) form), "
         "a gated MLP, RoPE")
DROPOUT = "dropout is off, the usual fine-tuning choice"
ALWAYS_VALUE = {"--normalization": ("RMSNorm", STYLE), "--attention-dropout": ("0.0", DROPOUT),
                "--hidden-dropout": ("0.0", DROPOUT),
                "--ckpt-format": ("torch_dist", "checkpoints are megatron-core distributed ones"),
                "--optimizer": ("adam", "the optimizer is Adam(W): --weight-decay, --adam-beta1, "
                                        "--adam-beta2, --adam-eps")}


def _same_as(expected: str, why: str):
    """An argparse ``type`` accepting only ``expected`` (numbers compared as numbers)."""
    def check(value: str) -> str:
        try:
            same = float(value) == float(expected)
        except ValueError:
            same = value == expected
        if not same:
            raise argparse.ArgumentTypeError(f"mt_dialog always uses {expected} ({why}); "
                                             "drop the flag")
        return value
    return check


def add_compatible_flags(parser: argparse.ArgumentParser) -> None:
    """Accept ``ALWAYS_ON`` and ``ALWAYS_VALUE``: they change nothing (hidden from --help but
    for the group's description)."""
    flags = list(ALWAYS_ON) + [f"{flag} {value}" for flag, (value, _) in ALWAYS_VALUE.items()]
    group = parser.add_argument_group(
        "Megatron-LM flags that state what mt_dialog always does (accepted as no-ops; another "
        "value is refused)", textwrap.fill(", ".join(flags), width=96, break_on_hyphens=False))
    for flag in ALWAYS_ON:
        group.add_argument(flag, action="store_true", help=argparse.SUPPRESS,
                           dest="megatron" + flag.replace("-", "_"))
    for flag, (value, why) in ALWAYS_VALUE.items():
        group.add_argument(flag, type=_same_as(value, why), help=argparse.SUPPRESS,
                           dest="megatron" + flag.replace("-", "_"))


def answer(flag: str) -> Optional[str]:
    """Where mt_dialog handles the Megatron-LM ``flag`` (one sentence), or None if unknown."""
    if flag in ELSEWHERE:
        return ELSEWHERE[flag]
    prefixes = [p for p in FAMILIES if flag.startswith(p)]
    return FAMILIES[max(prefixes, key=len)] if prefixes else None


# ---------------------------------------------------------------------------------- tokenizer

def _given_tokenizer(tok) -> Tuple[Optional[str], Optional[str], str]:
    """(back-end, sha256 or None, description) of the tokenizer flags (``TokenizerConfig``)."""
    flag = "--tokenizer-path" if tok.tokenizer_path else "--tokenizer-model"
    location = tok.tokenizer_path or tok.tokenizer_model
    if not location:
        return tok.kind, None, f"--tokenizer-type {tok.tokenizer_type}"
    if os.path.isdir(location):
        kind, sha = "huggingface", folder_sha256(location)
    elif os.path.isfile(location) and flag == "--tokenizer-model":
        kind, sha = "sentencepiece", file_sha256(location)
    else:
        what = "no such file or folder" if not os.path.exists(location) else (
            "a file, but --tokenizer-path is a Hugging Face folder (a SentencePiece .model "
            "file goes to --tokenizer-model)")
        raise ValueError(f"{flag[2:].replace('-', '_')}: {flag} {location}: {what}; give the "
                         "tokenizer the dataset was built with (PREFIX.meta.json records its "
                         "path) or drop the flag")
    if tok.kind and tok.kind != kind:
        raise ValueError(f"tokenizer_type: --tokenizer-type {tok.tokenizer_type} is a {tok.kind}"
                         f" tokenizer but {flag} {location} is a {kind} one (a SentencePiece "
                         "tokenizer is a .model file, a Hugging Face one a folder)")
    return kind, sha, f"the {kind} tokenizer {flag} {location} (sha256 {sha[:12]})"


def _mismatch(prefix: str, recorded: Dict, tok, description: str) -> str:
    rtype, rpath = recorded["type"], recorded["path"]
    right = "--tokenizer-path" if rtype == "huggingface" else "--tokenizer-model"
    location = tok.tokenizer_path or tok.tokenizer_model
    if location and os.path.abspath(location) == os.path.abspath(rpath):
        fix = (f"the tokenizer at {rpath} changed since preprocessing: rebuild the dataset with "
               f"{PREPROCESS}")
    elif location:
        fix = (f"pass {right} {rpath}, drop the tokenizer flags (training takes the dataset's), "
               f"or rebuild the dataset with {PREPROCESS} "
               f"{'--tokenizer-path' if os.path.isdir(location) else '--tokenizer-model'} "
               f"{location}")
    else:
        fix = f"pass --tokenizer-type {rtype} or drop it (training takes the dataset's)"
    return (f"tokenizer: {prefix} was built with the {rtype} tokenizer {rpath} (sha256 "
            f"{recorded['sha256'][:12]}), not {description}; {fix}")


def check_tokenizer(config) -> None:
    """Refuse tokenizer flags that differ from the tokenizer any dataset of ``config.data``
    (``--data-path`` and ``--valid-data-path``) was built with: back-end, and the sha256 of the
    file / folder when one is given. Nothing to check without tokenizer flags.

    Raises:
        ValueError: naming the dataset, both tokenizers and the fix (one line).
    """
    tok = config.tokenizer
    if not (tok.tokenizer_type or tok.tokenizer_model or tok.tokenizer_path):
        return
    kind, sha, description = _given_tokenizer(tok)
    prefixes, _ = config.data.blend()
    for prefix in prefixes + list(config.data.valid_data_path):
        recorded = read_metadata(prefix)["tokenizer"]
        if (kind and kind != recorded["type"]) or (sha and sha != recorded["sha256"]):
            raise ValueError(_mismatch(prefix, recorded, tok, description))


def check_validation_data(config) -> None:
    """--eval-interval / --eval-iters need validation packs: a valid split in a --data-path
    dataset or --valid-data-path.

    Raises:
        ValueError: naming the flag, the datasets and the fix.
    """
    train, data = config.train, config.data
    if not (train.eval_interval or train.eval_iters) or data.valid_data_path:
        return
    prefixes, _ = data.blend()
    splits = [read_metadata(p).get("splits", {}) for p in prefixes]
    if any(int(s.get("valid", {}).get("packs", 0)) > 0 for s in splits):
        return
    flag = "--eval-interval" if train.eval_interval else "--eval-iters"
    raise ValueError(f"{flag[2:].replace('-', '_')}: {flag} needs validation data but "
                     f"{', '.join(prefixes)} has no valid split; pass --valid-data-path PREFIX, "
                     f"rebuild with {PREPROCESS} --split 98,2, or drop {flag}")
