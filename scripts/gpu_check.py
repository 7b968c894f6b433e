#!/usr/bin/env python
"""The GPU path of mt_dialog, checked on one GPU in under 8 minutes (issue 9).

    bash scripts/gpu_check.sh                     # every check (sets up .venv first)
    bash scripts/gpu_check.sh --python python3    # an interpreter that has the packages already
    bash scripts/gpu_check.sh --only thd,chat     # some checks (their prerequisites run too)

Each check prints PASS / FAIL / SKIP lines with its numbers; the exit code is 1 when one failed.

  1 versions        torch, CUDA, megatron-core, transformer-engine (TE), and whether TE is usable
                    (a bf16 TE Linear runs on the GPU); always runs first
  2 thd             2 packs flattened as training does (``flatten_micro_batch``: conversations and
                    a padding segment, 'thd' cu_seqlens) vs each conversation run alone, with the
                    local spec (fp32, bf16) and the TE spec (bf16); the weights of check 5's
                    checkpoint (written with the local spec) loaded into the TE model give the
                    local model's logits
  3 resume          bf16 + --use-distributed-optimizer (torchrun, 1 process): 30 iterations, save,
                    resume for 5 more; the resumed losses equal an uninterrupted 35-iteration run's
  4 finetune        --finetune --bf16 at lr 1e-8 from check 3's checkpoint: the validation loss
                    after each step equals the checkpoint's, and the first logged loss is the
                    loaded model's, not a random model's
  5 cpu-checkpoint  a checkpoint written on CPU (CUDA_VISIBLE_DEVICES="") resumed on the GPU: its
                    losses follow a CPU resume of the same checkpoint; tools/chat.py answers from it
  6 chat            tools/chat.py on check 3's checkpoint; its greedy tokens are the argmax of the
                    training forward (packed 'thd' parameters) at every step
  7 lora            --finetune --lora-rank 8 --bf16 from check 3's checkpoint (TE layers with
                    adapters): the first logged loss is the checkpoint's (B starts at zero), the
                    loss falls, the banner counts the adapters only; resumed from its adapter-only
                    checkpoint the losses follow an uninterrupted LoRA run; tools/chat.py answers
  8 moe             a Mixture of Experts (4 experts, top 2, aux loss 1e-2; TE's grouped-GEMM
                    experts on the GPU) trained in bf16: the loss falls and the router load is
                    logged; its checkpoint written on CPU (megatron-core's per-expert local MLPs)
                    resumed on the GPU follows a CPU resume of the same checkpoint
  9 attention       the attention variants, each a short bf16 run on CPU (local spec) saved and
                    checked as check 2 checks its checkpoint (packed vs alone: local fp32, local
                    bf16, TE bf16; the local weights loaded into the TE model): window (sliding
                    window on every other layer), sinks (--softmax-type learnable), mla
                    (multi-latent attention with a query rank and YaRN)
  10 moe-routing    check 8 with DeepSeek-V3-style routing (TE layers): a dense first layer, a
                    shared expert, sigmoid scores with an expert bias updated each step, two
                    groups, a scaling factor; the CPU checkpoint (layers saved one by one) on GPU
  11 gemma3         a tiny Gemma 3 block ((1 + w) norms, sandwich norms on the TE layers, q/k
                    norm, tanh GeGLU, scaled embeddings, --softmax-scale, soft-capped logits):
                    local fp32 / bf16 and TE bf16 (the local weights copied in): a conversation
                    packed after another == alone, TE bf16 vs local fp32 within the bf16 tolerance
  12 fp8           pretrain_dialog.py refuses --fp8-format hybrid where it cannot run, naming
                    why (any machine: the CPU stand-in); on a GPU of compute capability 8.9+ with
                    TE: FP8_ITERS iterations in bf16 and with --fp8-format hybrid --fp8-recipe
                    delayed from the same init and data: finite losses, FP8's first loss within
                    5% of bf16's (FP8 is in the GEMMs only; the loss is fp32 in both)
  13 tp-comm-overlap  with 2+ GPUs and TE: TP 2 + --sequence-parallel with and without
                    --tp-comm-overlap (TE's userbuffers) under torchrun: the same losses (1%);
                    skipped with the reason on one GPU
  14 context-parallel  --context-parallel-size 2 (torchrun, 2 processes) vs one process on the
                    same data and init, bf16: the same losses (CP_TOLERANCE of the loss); on 2+
                    GPUs with TE's THD context-parallel attention (p2p, then a2a), without
                    CUDA the CPU stand-in (the local attention's all-gather path, gloo); skipped
                    with the reason on one GPU

Tolerances. Logits in fp32: 1e-4 x the largest |logit|; in bf16: 3 x the difference bf16 itself
makes (the local spec in bf16 vs fp32 on the same batch), at least 1e-2 x the largest |logit|
(chat's tokens: the chosen logit within that of the best). Losses of a resumed run: 2 x the
difference of two identical runs, at least 1e-3. Validation after fine-tuning at lr 1e-8: 1e-3 x
the loss. GPU vs CPU training: 2% of the loss.

Without CUDA the GPU-only parts print "SKIP (no CUDA)" and the rest runs on CPU with a smaller model
(its plumbing, tested by tests/test_gpu_check.py). Without transformer-engine the TE parts print
"SKIP (no TE)" with the reason and the rest runs. Work files and each step's log (command and
output) go to --work-dir.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("versions", "thd", "resume", "finetune", "cpu-checkpoint", "chat", "lora", "moe",
          "attention", "moe-routing", "gemma3", "fp8", "tp-comm-overlap", "context-parallel")
MARKER = ".mt_dialog_gpu_check"
REQUIRED = (("torch", "torch"), ("megatron.core", "megatron-core"), ("numpy", "numpy"),
            ("sentencepiece", "sentencepiece"), ("psutil", "psutil"))
CHAT_MESSAGE = "What is 3 plus 4?"
STEP_TIMEOUT = 400  # seconds for one subprocess


@dataclass(frozen=True)
class Sizes:
    """Data, model and run lengths of one mode (the GPU's, or the reduced CPU mode's)."""

    conversations: int
    hidden: int
    global_batch: int
    iters: int  # the uninterrupted run of check 3
    resume_at: int  # check 3 saves here and resumes
    cpu_iters: int  # check 5's CPU run saves here
    cpu_total: int  # and both resumes go on to here
    lora_iters: int  # check 7's LoRA fine-tune (it saves halfway and resumes)
    eval_iters: int
    seq_length: int = 512
    layers: int = 2
    heads: int = 4
    micro_batch: int = 2


GPU_SIZES = Sizes(conversations=2000, hidden=128, global_batch=8, iters=35, resume_at=30,
                  cpu_iters=8, cpu_total=12, lora_iters=10, eval_iters=2)
CPU_SIZES = Sizes(conversations=400, hidden=64, global_batch=4, iters=8, resume_at=6,
                  cpu_iters=4, cpu_total=6, lora_iters=4, eval_iters=1)


class StepFailed(RuntimeError):
    """A subprocess of a check failed; the message holds the end of its output."""


@dataclass
class Line:
    """One printed result: ``status`` is PASS, FAIL, INFO or 'SKIP (reason)'."""

    status: str
    label: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<14} {self.label:<24} {self.detail}"


# -- arguments -----------------------------------------------------------------------------------

def parse_checks(text: str) -> List[str]:
    """``--only`` value -> check names in run order (``versions`` always first).

    Raises:
        ValueError: a name that is not a check (the message lists them).
    """
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown or not names:
        raise ValueError(f"--only {text!r}: unknown check {', '.join(unknown) or '(none given)'}; "
                         f"choose from {','.join(CHECKS)} (comma-separated)")
    return [name for name in CHECKS if name == "versions" or name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bash scripts/gpu_check.sh", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="scripts/gpu_check.sh also takes --python PY: run with the interpreter PY as it "
        "is (default: .venv, set up by scripts/setup.sh).")
    parser.add_argument("--only", default=",".join(CHECKS), metavar="CHECK[,CHECK...]",
                        help=f"checks to run, of {','.join(CHECKS)} (default: all)")
    parser.add_argument("--work-dir", default=os.path.join("runs", "gpu_check"), metavar="DIR",
                        help="folder for data, checkpoints and logs, emptied first (default: "
                        "runs/gpu_check)")
    parser.add_argument("--worker", choices=("versions", "thd", "greedy", "gemma3"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)  # the worker's JSON input
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is None:
        try:
            args.checks = parse_checks(args.only)
        except ValueError as exc:
            parser.error(str(exc))
    return args


def missing_packages() -> List[str]:
    """The pip names of the required packages this interpreter cannot import."""
    missing = []
    for module, package in REQUIRED:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def prepare_work_dir(path: str) -> str:
    """Empty ``path`` (only if this script made it) and return it absolute.

    Raises:
        ValueError: ``path`` exists, is not empty and holds no marker of this script.
    """
    path = os.path.abspath(path)
    if os.path.isdir(path) and os.listdir(path):
        if not os.path.exists(os.path.join(path, MARKER)):
            raise ValueError(f"--work-dir {path}: exists and was not made by gpu_check (no "
                             f"{MARKER}); pass an empty or new folder")
        shutil.rmtree(path)
    elif os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"--work-dir {path}: is a file; pass a folder")
    os.makedirs(os.path.join(path, "logs"), exist_ok=True)
    open(os.path.join(path, MARKER), "w").close()
    return path


# -- logs ----------------------------------------------------------------------------------------

_NUM = r"([-+0-9.eE]+|nan|inf)"
ITER_RE = re.compile(rf"^iter\s+(\d+)/\d+ \| loss/turn {_NUM} \| loss/token {_NUM}", re.M)
VALID_RE = re.compile(rf"^validation at iter (\d+) \| loss/turn {_NUM}", re.M)


@dataclass
class TrainLog:
    """Losses a pretrain_dialog.py run logged: iteration -> (loss/turn, loss/token), and
    iteration -> validation loss/turn."""

    iters: Dict[int, tuple] = field(default_factory=dict)
    valid: Dict[int, float] = field(default_factory=dict)


def parse_train_log(text: str) -> TrainLog:
    log = TrainLog()
    for match in ITER_RE.finditer(text):
        log.iters[int(match.group(1))] = (float(match.group(2)), float(match.group(3)))
    for match in VALID_RE.finditer(text):
        log.valid[int(match.group(1))] = float(match.group(2))
    return log


def max_loss_diff(first: TrainLog, second: TrainLog, iterations: Sequence[int]) -> float:
    """Largest |difference| of loss/turn and loss/token over ``iterations`` (nan when one run
    did not log one of them)."""
    worst = 0.0
    for it in iterations:
        if it not in first.iters or it not in second.iters:
            return float("nan")
        for a, b in zip(first.iters[it], second.iters[it]):
            worst = max(worst, abs(a - b))
    return worst


def bf16_tolerance(yardstick: float, scale: float) -> float:
    """3 x the difference bf16 makes on the same batch, at least 1e-2 x the largest |logit|."""
    return max(3.0 * yardstick, 1e-2 * scale)


def fp32_tolerance(scale: float) -> float:
    return 1e-4 * max(scale, 1.0)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


# -- running the project's CLIs ------------------------------------------------------------------

class Context:
    """The run's settings, its work folder, and what checks share (computed once, on demand)."""

    def __init__(self, work: str) -> None:
        self.work = work
        self.versions: Dict = {}  # what the versions worker found (check 1)
        self._memo: Dict[str, object] = {}
        self.seconds: Dict[str, float] = {}  # check -> seconds it took

    @property
    def cuda(self) -> bool:
        return bool(self.versions.get("cuda_available"))

    @property
    def sizes(self) -> Sizes:
        return GPU_SIZES if self.cuda else CPU_SIZES

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    @property
    def te_skip(self) -> Optional[str]:
        """None when the TE parts can run, else their SKIP status."""
        if not self.cuda:
            return "SKIP (no CUDA)"
        return None if self.versions.get("te_usable") else "SKIP (no TE)"

    def memo(self, key: str, make):
        """``make()`` once; a StepFailed it raised is raised again, not retried."""
        if key not in self._memo:
            try:
                self._memo[key] = make()
            except StepFailed as exc:
                self._memo[key] = exc
        if isinstance(self._memo[key], StepFailed):
            raise self._memo[key]
        return self._memo[key]


def subprocess_env(cpu: bool) -> Dict[str, str]:
    """The environment of a step: the repository importable, no launcher layout inherited,
    deterministic cuBLAS / TE kernels; ``cpu`` hides the GPUs."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    env.setdefault("OMP_NUM_THREADS", str(max(1, min(8, (os.cpu_count() or 2) // 2))))
    env["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    env["NVTE_ALLOW_NONDETERMINISTIC_ALGO"] = "0"
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_step(ctx: Context, name: str, cmd: List[str], cpu: bool = False) -> str:
    """Run one command from the repository root; its command and output go to logs/NAME.log.
    Returns stdout.

    Raises:
        StepFailed: non-zero exit or timeout (the message names the log and its last lines).
    """
    log, started = ctx.path("logs", f"{name}.log"), time.time()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(cpu), capture_output=True,
                              text=True, timeout=STEP_TIMEOUT)
        out, err, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out, err, code = _text(exc.stdout), _text(exc.stderr), f"timeout {STEP_TIMEOUT} s"
    with open(log, "w", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(cmd)}\n# exit: {code} after {time.time() - started:.1f} s\n"
                     f"--- stdout\n{out}\n--- stderr\n{err}\n")
    if code != 0:
        tail = [line for line in (err or out).strip().splitlines() if line.strip()][-3:]
        raise StepFailed(f"{name} exited with {code}: {' | '.join(tail)} (see {log})")
    return out


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def worker(ctx: Context, name: str, kind: str, spec: Dict, cpu: bool = False) -> Dict:
    """Run this script's ``--worker KIND`` on ``spec``; returns the JSON it printed last."""
    spec_path = ctx.path(f"{name}.json")
    with open(spec_path, "w", encoding="utf-8") as handle:
        json.dump(spec, handle)
    out = run_step(ctx, name, [sys.executable, os.path.abspath(__file__), "--worker", kind,
                               "--spec", spec_path], cpu=cpu)
    return json.loads(out.strip().splitlines()[-1])


def prepare_data(ctx: Context) -> str:
    """The demo corpus and tokenizer, packed as scripts/demo.sh does; returns the prefix."""
    folder, sizes = ctx.path("data"), ctx.sizes
    run_step(ctx, "data-corpus", [sys.executable, "-m", "mt_dialog.demo", "--output-dir", folder,
                                  "--conversations", str(sizes.conversations)])
    prefix = os.path.join(folder, "demo")
    run_step(ctx, "data-preprocess", [
        sys.executable, "tools/preprocess_dialog.py", "--input", os.path.join(folder, "corpus.jsonl"),
        "--tokenizer-model", os.path.join(folder, "tokenizer.model"), "--template", "chatml",
        "--seq-length", str(sizes.seq_length), "--output-prefix", prefix,
        "--workers", "2" if ctx.cuda else "1", "--no-progress"])
    return prefix


def data_prefix(ctx: Context) -> str:
    return ctx.memo("data", lambda: prepare_data(ctx))


def train_args(ctx: Context, iters: int, *extra: str) -> List[str]:
    """pretrain_dialog.py flags shared by every run of the check (bf16 throughout)."""
    s = ctx.sizes
    return ["--data-path", data_prefix(ctx),
            "--num-layers", str(s.layers), "--hidden-size", str(s.hidden),
            "--num-attention-heads", str(s.heads), "--micro-batch-size", str(s.micro_batch),
            "--global-batch-size", str(s.global_batch), "--train-iters", str(iters),
            "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "3",
            "--lr-decay-iters", str(s.iters + 5), "--log-interval", "1", "--seed", "1234",
            "--eval-iters", str(s.eval_iters), "--bf16", *extra]


def pretrain(ctx: Context, name: str, args: List[str], torchrun: bool = False,
             cpu: bool = False) -> TrainLog:
    """pretrain_dialog.py ``args`` (under torchrun with 1 process if ``torchrun``)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc_per_node", "1"] if torchrun else [sys.executable])
    return parse_train_log(run_step(ctx, name, [*launcher, "pretrain_dialog.py", *args], cpu=cpu))


def chat(ctx: Context, name: str, checkpoint: str, cpu: bool = False) -> Dict:
    """tools/chat.py --json on CHAT_MESSAGE (greedy); its JSON answer."""
    out = run_step(ctx, name, [sys.executable, "tools/chat.py", "--load", checkpoint, "--message",
                               CHAT_MESSAGE, "--max-new-tokens", "16", "--json"], cpu=cpu)
    return json.loads(out.strip().splitlines()[-1])


# -- runs shared by several checks ---------------------------------------------------------------

def cpu_checkpoint(ctx: Context):
    """(folder, log) of a short bf16 run on CPU (GPUs hidden) with the local spec, saved."""
    def make():
        folder = ctx.path("ckpt_cpu")
        log = pretrain(ctx, "cpu-checkpoint-write",
                       train_args(ctx, ctx.sizes.cpu_iters, "--save", folder), cpu=True)
        return folder, log
    return ctx.memo("cpu-checkpoint", make)


def distributed_optimizer_runs(ctx: Context, saved_only: bool = False):
    """Check 3's runs (bf16, distributed optimizer, torchrun with 1 process), each evaluated
    at the resume point: ``(uninterrupted, saved, checkpoint folder)``; with ``saved_only``
    the uninterrupted run is None unless it ran already."""
    s, folder = ctx.sizes, ctx.path("ckpt_gpu")
    common = ("--use-distributed-optimizer", "--eval-interval", str(s.resume_at))
    saved = ctx.memo("saved", lambda: pretrain(
        ctx, "resume-first-part", train_args(ctx, s.resume_at, *common, "--save", folder),
        torchrun=True))
    if saved_only and "uninterrupted" not in ctx._memo:
        return None, saved, folder
    whole = ctx.memo("uninterrupted", lambda: pretrain(
        ctx, "resume-uninterrupted", train_args(ctx, s.iters, *common), torchrun=True))
    return whole, saved, folder


def greedy_line(ctx: Context, name: str, label: str, checkpoint: str) -> Line:
    """tools/chat.py's reply from ``checkpoint``, its greedy tokens checked against the argmax
    of the training forward (packed 'thd' parameters) by the greedy worker."""
    answer = chat(ctx, name, checkpoint)
    spec = {"load": checkpoint, "messages": [{"role": "user", "content": CHAT_MESSAGE}],
            "token_ids": answer["token_ids"]}
    result = worker(ctx, f"{name}-greedy", "greedy", spec)
    scale = result["scale"]
    tol = fp32_tolerance(scale) if result["dtype"] == "float32" else bf16_tolerance(0.0, scale)
    ok = result["steps"] > 0 and result["margin"] <= tol
    return Line(verdict(ok), label,
                f"{CHAT_MESSAGE!r} -> {answer['text']!r} ({answer['finish_reason']}, "
                f"{result['steps']} tokens, {result['device']} {result['dtype']}); as training's "
                f"argmax: {result['argmax_equal']}/{result['steps']}, worst margin "
                f"{result['margin']:.1e} (tol {tol:.1e})")


# -- the checks ----------------------------------------------------------------------------------

def check_versions(ctx: Context) -> List[Line]:
    v = ctx.versions
    lines = [Line("PASS", "1 versions",
                  f"python {v['python']}, torch {v['torch']} (CUDA {v['cuda_build'] or 'none'}), "
                  f"megatron-core {v['megatron_core']}, transformer-engine "
                  f"{v['te_version'] or 'not importable'}; device {v['device']}")]
    if not ctx.cuda:
        lines.append(Line("SKIP (no CUDA)", "1 cuda", "torch.cuda.is_available() is False: the "
                          "GPU-only parts are skipped, the rest runs on CPU with a smaller model"))
        return lines
    if v["te_usable"]:
        lines.append(Line("PASS", "1 transformer-engine", f"{v['te_version']} usable: "
                          f"{v['te_detail']}; --transformer-impl auto picks {v['auto_impl']}"))
    elif v["te_version"]:
        lines.append(Line("FAIL", "1 transformer-engine", f"{v['te_version']} imports but "
                          f"{v['te_detail']}; the TE parts below are skipped"))
    else:
        lines.append(Line("SKIP (no TE)", "1 transformer-engine", f"not importable "
                          f"({v['te_detail']}): the TE parts below are skipped and the rest runs; "
                          "install it with pip install -e '.[gpu]'"))
    return lines


def check_thd(ctx: Context) -> List[Line]:
    folder, _ = cpu_checkpoint(ctx)
    result = worker(ctx, "thd", "thd", {"load": folder, "data": data_prefix(ctx),
                                        "te": ctx.te_skip is None})
    return thd_lines(ctx, result, "2 thd", "2 local weights -> TE")


def thd_lines(ctx: Context, result: Dict, label: str, load_label: str) -> List[Line]:
    """The PASS / FAIL / SKIP lines of a ``worker_thd`` result: packed vs alone for local fp32,
    local bf16 and TE bf16, and the local checkpoint loaded into the TE model vs local fp32."""
    variants, where = result["variants"], f"{result['conversations']} conversations + " \
        f"{result['padding']} padding segments in 2 packs, {result['device']}"
    fp32 = variants["local/fp32"]
    scale, lines = fp32["scale"], []
    tol = fp32_tolerance(scale)
    lines.append(Line(verdict(fp32["packed_vs_alone"] <= tol and not fp32["load_error"]),
                      f"{label} local fp32", f"packed vs alone max |dlogit| "
                      f"{fp32['packed_vs_alone']:.1e} (tol {tol:.1e}, max |logit| {scale:.2f}); "
                      f"{where}" + _load_note(fp32)))
    bf16 = variants["local/bf16"]
    tol = bf16_tolerance(bf16["vs_local_fp32"], scale)
    lines.append(Line(verdict(bf16["packed_vs_alone"] <= tol and not bf16["load_error"]),
                      f"{label} local bf16", f"packed vs alone {bf16['packed_vs_alone']:.1e} "
                      f"(bf16 tol {tol:.1e}; bf16 vs fp32 differ by {bf16['vs_local_fp32']:.1e})"
                      + _load_note(bf16)))
    if ctx.te_skip:
        reason = "needs CUDA" if not ctx.cuda else "transformer-engine is not usable (check 1)"
        return lines + [Line(ctx.te_skip, f"{label} TE bf16", reason),
                        Line(ctx.te_skip, load_label, reason)]
    te = variants["transformer_engine/bf16"]
    lines.append(Line(verdict(te["packed_vs_alone"] <= tol), f"{label} TE bf16",
                      f"packed vs alone {te['packed_vs_alone']:.1e} (tol {tol:.1e})"))
    lines.append(Line(verdict(not te["load_error"] and te["vs_local_fp32"] <= tol),
                      load_label, te["load_error"] or
                      f"checkpoint written with the local spec on CPU, TE bf16 vs local fp32 "
                      f"max |dlogit| {te['vs_local_fp32']:.1e} (tol {tol:.1e})"))
    return lines


def _load_note(variant: Dict) -> str:
    return f"; loading the checkpoint failed: {variant['load_error']}" if variant["load_error"] \
        else ""


def check_resume(ctx: Context) -> List[Line]:
    s = ctx.sizes
    whole, saved, folder = distributed_optimizer_runs(ctx)
    resumed = pretrain(ctx, "resume-second-part", train_args(
        ctx, s.iters, "--use-distributed-optimizer", "--load", folder), torchrun=True)
    noise = max_loss_diff(whole, saved, range(1, s.resume_at + 1))
    diff = max_loss_diff(whole, resumed, range(s.resume_at + 1, s.iters + 1))
    tol = max(1e-3, 2 * noise) if math.isfinite(noise) else 1e-3
    first, last = whole.iters.get(1, (math.nan,))[0], whole.iters.get(s.iters, (math.nan,))[0]
    return [Line(verdict(diff <= tol), "3 resume bf16 distopt",
                 f"iters {s.resume_at + 1}-{s.iters} resumed from iter {s.resume_at} vs "
                 f"uninterrupted: max |dloss| {diff:.1e} (tol {tol:.0e}; two identical runs "
                 f"differ by {noise:.1e} over iters 1-{s.resume_at}); loss/turn {first:.3f} -> "
                 f"{last:.3f}")]


def check_finetune(ctx: Context) -> List[Line]:
    s = ctx.sizes
    whole, saved, folder = distributed_optimizer_runs(ctx)
    tuned = pretrain(ctx, "finetune", train_args(
        ctx, 3, "--use-distributed-optimizer", "--load", folder, "--finetune", "--lr", "1e-8",
        "--min-lr", "1e-8", "--lr-warmup-iters", "0", "--eval-interval", "1"), torchrun=True)
    loaded = saved.valid.get(s.resume_at, math.nan)
    after = [tuned.valid.get(it, math.nan) for it in (1, 2, 3)]
    diff = max(abs(value - loaded) for value in after)
    tol = max(1e-3, 1e-3 * loaded)
    first = tuned.iters.get(1, (math.nan,))[0]
    trained, random = saved.iters[s.resume_at][0], whole.iters[1][0]
    continues = abs(first - trained) < abs(first - random)
    return [Line(verdict(diff <= tol and continues), "4 finetune bf16 lr 1e-8",
                 f"validation after steps 1-3: {', '.join(f'{v:.4f}' for v in after)} vs the "
                 f"checkpoint's {loaded:.4f} (max |d| {diff:.1e}, tol {tol:.0e}); first logged "
                 f"loss/turn {first:.3f}: checkpoint's last {trained:.3f}, a random model's on the "
                 f"same batch {random:.3f}")]


def check_cpu_checkpoint(ctx: Context) -> List[Line]:
    s = ctx.sizes
    folder, written = cpu_checkpoint(ctx)
    lines = [Line("PASS", "5 cpu-ckpt written", f"{s.cpu_iters} bf16 iterations with "
                  f"CUDA_VISIBLE_DEVICES='', loss/turn {written.iters[1][0]:.3f} -> "
                  f"{written.iters[s.cpu_iters][0]:.3f}, saved to {folder}")]
    if not ctx.cuda:
        return lines + [Line("SKIP (no CUDA)", "5 cpu-ckpt GPU training", "needs CUDA"),
                        Line("SKIP (no CUDA)", "5 cpu-ckpt GPU chat", "needs CUDA")]
    lines += attempt("5 cpu-ckpt GPU training", lambda: [cpu_checkpoint_on_gpu(ctx, folder)])
    return lines + attempt("5 cpu-ckpt GPU chat", lambda: [
        greedy_line(ctx, "cpu-checkpoint-chat", "5 cpu-ckpt GPU chat", folder)])


def cpu_checkpoint_on_gpu(ctx: Context, folder: str) -> Line:
    """The CPU-written checkpoint resumed on the GPU vs resumed on CPU, same iterations."""
    s = ctx.sizes
    more = train_args(ctx, s.cpu_total, "--load", folder)
    on_cpu = pretrain(ctx, "cpu-checkpoint-resume-cpu", more, cpu=True)
    on_gpu = pretrain(ctx, "cpu-checkpoint-resume-gpu", more + ["--save", ctx.path("ckpt_cpu_gpu")])
    its = range(s.cpu_iters + 1, s.cpu_total + 1)
    diff = max_loss_diff(on_cpu, on_gpu, its)
    tol = 0.02 * max((on_cpu.iters.get(it, (0.0,))[0] for it in its), default=0.0)
    return Line(verdict(diff <= tol), "5 cpu-ckpt GPU training",
                f"iters {its[0]}-{its[-1]} resumed on the GPU vs on CPU: max |dloss| {diff:.1e} "
                f"(tol {tol:.1e}); loss/turn on the GPU "
                f"{', '.join(f'{on_gpu.iters[it][0]:.3f}' for it in its if it in on_gpu.iters)}")


def attempt(label: str, make) -> List[Line]:
    """``make()``'s lines, or one FAIL line for ``label`` when a step of it failed (so the
    check's other parts still run)."""
    try:
        return make()
    except StepFailed as exc:
        return [Line("FAIL", label, str(exc))]


def check_chat(ctx: Context) -> List[Line]:
    _, _, folder = distributed_optimizer_runs(ctx, saved_only=True)
    return [greedy_line(ctx, "chat", "6 chat", folder)]


LORA_FLAGS = ("--lora-rank", "8", "--lora-alpha", "16")


def lora_runs(ctx: Context):
    """Check 7's LoRA runs from check 3's checkpoint: ``(uninterrupted, saved, resumed, log of
    the first, adapter checkpoint)``; the saved run stops halfway and the resumed one goes on."""
    s = ctx.sizes
    _, _, base = distributed_optimizer_runs(ctx, saved_only=True)
    folder, half = ctx.path("ckpt_lora"), max(2, s.lora_iters // 2)
    start = ("--load", base, "--finetune", *LORA_FLAGS)
    whole_text = run_step(ctx, "lora-uninterrupted", [
        sys.executable, "pretrain_dialog.py", *train_args(ctx, s.lora_iters, *start)])
    saved = pretrain(ctx, "lora-first-part", train_args(ctx, half, *start, "--save", folder))
    resumed = pretrain(ctx, "lora-second-part",
                       train_args(ctx, s.lora_iters, "--load", folder, *LORA_FLAGS))
    return parse_train_log(whole_text), saved, resumed, whole_text, folder


def check_lora(ctx: Context) -> List[Line]:
    s = ctx.sizes
    whole, saved, resumed, text, folder = lora_runs(ctx)
    base_whole, base_saved, _ = distributed_optimizer_runs(ctx, saved_only=True)
    first, last = whole.iters[1][0], whole.iters[s.lora_iters][0]
    trained = base_saved.iters[s.resume_at][0]
    random = (base_whole or base_saved).iters[1][0]
    found = re.search(r"trainable parameters ([\d,]+) of ([\d,]+)", text)
    share = (int(found[1].replace(",", "")) / int(found[2].replace(",", "")) if found
             else math.nan)
    continues = abs(first - trained) < abs(first - random)
    half = max(2, s.lora_iters // 2)
    noise = max_loss_diff(whole, saved, range(1, half + 1))
    diff = max_loss_diff(whole, resumed, range(half + 1, s.lora_iters + 1))
    tol = max(1e-3, 2 * noise) if math.isfinite(noise) else 1e-3
    lines = [Line(verdict(continues and last < first and share < 0.5), "7 lora bf16",
                  f"loss/turn {first:.3f} -> {last:.3f} over {s.lora_iters} iterations; first: "
                  f"the base checkpoint's last {trained:.3f}, a random model's {random:.3f}; "
                  f"trainable share {share:.1%}"),
             Line(verdict(diff <= tol), "7 lora resume",
                  f"iters {half + 1}-{s.lora_iters} resumed from the adapter checkpoint vs "
                  f"uninterrupted: max |dloss| {diff:.1e} (tol {tol:.0e})")]
    answer = chat(ctx, "lora-chat", folder)
    return lines + [Line(verdict(bool(answer.get("token_ids"))), "7 lora chat",
                         f"{CHAT_MESSAGE!r} -> {answer['text']!r} ({answer['finish_reason']})")]


MOE_FLAGS = ("--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "1e-2")


def routing_flags(layers: int) -> tuple:
    """Check 9's MoE: DeepSeek-V3-style routing on ``layers`` layers (the first dense)."""
    return (*MOE_FLAGS, "--moe-shared-expert-intermediate-size", "64",
            "--moe-router-score-function", "sigmoid", "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate", "1e-3", "--moe-router-num-groups", "2",
            "--moe-router-group-topk", "1", "--moe-router-topk-scaling-factor", "2.0",
            "--moe-layer-freq", f"([0]*1+[1]*{layers - 1})")


def check_moe(ctx: Context) -> List[Line]:
    return moe_lines(ctx, "8 moe", "moe", MOE_FLAGS)


def check_moe_routing(ctx: Context) -> List[Line]:
    return moe_lines(ctx, "10 moe-routing", "moe_routing", routing_flags(ctx.sizes.layers))


def moe_lines(ctx: Context, label: str, name: str, flags) -> List[Line]:
    """A MoE run with ``flags`` in bf16 (the loss falls, the router load is logged), then its
    checkpoint written on CPU resumed on the GPU vs on CPU."""
    s = ctx.sizes
    text = run_step(ctx, f"{name}-train", [sys.executable, "pretrain_dialog.py", *train_args(
        ctx, s.iters, *flags)])
    log = parse_train_log(text)
    first, last = log.iters[1][0], log.iters[s.iters][0]
    load = re.findall(r"experts max/mean ([\d.]+) min/mean ([\d.]+)", text)
    where = "GPU" if ctx.cuda else "CPU"
    lines = [Line(verdict(last < first and bool(load)), f"{label} bf16 {where}",
                  f"loss/turn {first:.3f} -> {last:.3f} over {s.iters} iterations; router load "
                  f"(busiest / idlest expert over an even share) at the end: "
                  f"{' / '.join(load[-1]) if load else 'not logged'}")]
    folder = ctx.path(f"ckpt_{name}_cpu")
    pretrain(ctx, f"{name}-cpu-write", train_args(ctx, s.cpu_iters, *flags, "--save", folder),
             cpu=True)
    if not ctx.cuda:
        return lines + [Line("SKIP (no CUDA)", f"{label} cpu-ckpt on GPU", "needs CUDA")]
    more = train_args(ctx, s.cpu_total, *flags, "--load", folder)
    on_cpu = pretrain(ctx, f"{name}-cpu-resume-cpu", more, cpu=True)
    on_gpu = pretrain(ctx, f"{name}-cpu-resume-gpu", more)
    its = range(s.cpu_iters + 1, s.cpu_total + 1)
    diff = max_loss_diff(on_cpu, on_gpu, its)
    tol = 0.02 * max((on_cpu.iters.get(it, (0.0,))[0] for it in its), default=0.0)
    return lines + [Line(verdict(diff <= tol), f"{label} cpu-ckpt on GPU",
                         f"iters {its[0]}-{its[-1]} of a CPU-written MoE checkpoint resumed on "
                         f"the GPU vs on CPU: max |dloss| {diff:.1e} (tol {tol:.1e})")]


# the attention variants of check 9 (flags of pretrain_dialog.py); the window (15 tokens before
# each query) is far shorter than the conversations, on every other layer
ATTENTION_VARIANTS = {
    "window": ("--window-size", "15", "0", "--window-attn-skip-freq", "2"),
    "sinks": ("--softmax-type", "learnable"),
    "mla": ("--multi-latent-attention", "--qk-layernorm", "--q-lora-rank", "48",
            "--kv-lora-rank", "32", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8",
            "--v-head-dim", "16", "--rope-type", "yarn", "--rotary-scaling-factor", "4",
            "--mscale", "0.707", "--mscale-all-dim", "0.707",
            "--original-max-position-embeddings", "128"),
}
ATTENTION_ITERS = 2


def check_attention(ctx: Context) -> List[Line]:
    """Check 9: for each of ATTENTION_VARIANTS, a short bf16 CPU run saved, then check 2's
    worker on that checkpoint (a failed step fails that variant only)."""
    lines = []
    for name, flags in ATTENTION_VARIANTS.items():
        label = f"9 {name}"
        try:
            folder = ctx.path(f"ckpt_attention_{name}")
            pretrain(ctx, f"attention-{name}-write", train_args(
                ctx, ATTENTION_ITERS, *flags, "--save", folder), cpu=True)
            result = worker(ctx, f"attention-{name}", "thd", {
                "load": folder, "data": data_prefix(ctx), "te": ctx.te_skip is None})
            lines += thd_lines(ctx, result, label, f"{label} local -> TE")
        except StepFailed as exc:
            lines.append(Line("FAIL", label, str(exc)))
    return lines


CHECK_FUNCTIONS = {"versions": check_versions, "thd": check_thd, "resume": check_resume,
                   "finetune": check_finetune, "cpu-checkpoint": check_cpu_checkpoint,
                   "chat": check_chat, "lora": check_lora, "moe": check_moe,
                   "attention": check_attention, "moe-routing": check_moe_routing}


# -- workers (subprocesses of this script; they print one JSON line) -----------------------------

def worker_versions(spec: Dict) -> Dict:
    """Versions, CUDA, transformer-engine's usability and what ``--transformer-impl auto`` picks."""
    import platform
    from importlib import metadata

    import torch

    from mt_dialog.training.model import use_transformer_engine

    cuda = torch.cuda.is_available()
    try:
        mcore = metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        from megatron.core.package_info import __version__ as mcore
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_build": torch.version.cuda, "cuda_available": cuda,
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "megatron_core": mcore}
    out.update(probe_transformer_engine(cuda))
    out["auto_impl"] = "transformer_engine" if use_transformer_engine("auto") else "local"
    from mt_dialog.training import fp8

    capability = fp8.probe()  # what pretrain_dialog.py decides --fp8-format from (check 12)
    out.update(gpus=capability.gpus, machine=capability.describe(),
               fp8_problem=fp8.fp8_machine_problem("delayed", capability),
               overlap_problem=fp8.tp_comm_overlap_machine_problem(capability))
    return out


def probe_transformer_engine(cuda: bool) -> Dict:
    """``te_version`` (None when not importable), ``te_usable`` (a bf16 ``te.Linear`` ran on the
    GPU and matched torch) and ``te_detail`` (what happened)."""
    try:
        import transformer_engine
        from importlib import metadata

        version = getattr(transformer_engine, "__version__", None) or \
            metadata.version("transformer-engine")
    except Exception as exc:  # ImportError, or OSError when a CUDA library is missing
        return {"te_version": None, "te_usable": False, "te_detail": f"{type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}"}
    if not cuda:
        return {"te_version": version, "te_usable": False, "te_detail": "needs CUDA"}
    try:
        import torch
        import transformer_engine.pytorch as te

        layer = te.Linear(64, 64, params_dtype=torch.bfloat16).cuda()
        x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            diff = (layer(x) - torch.nn.functional.linear(x, layer.weight, layer.bias)).abs().max()
        torch.cuda.synchronize()
    except Exception as exc:
        return {"te_version": version, "te_usable": False,
                "te_detail": f"a bf16 te.Linear failed ({type(exc).__name__}: {exc})"}
    return {"te_version": version, "te_usable": True,
            "te_detail": f"a bf16 te.Linear ran on the GPU (max |d| vs torch {float(diff):.1e})"}


def model_from_checkpoint(load: str, impl: str, dtype):
    """The checkpoint's model with layer implementation ``impl`` in ``dtype`` (one process),
    and the error loading its weights raised (None when they loaded)."""
    import dataclasses

    from mt_dialog.training.checkpoint import load_weights_for_inference
    from mt_dialog.training.saved_run import inference_config, read_run_info, \
        single_process_model, vocab_rows

    info = read_run_info(load)
    config = inference_config(info["config"])
    config = dataclasses.replace(config, model=dataclasses.replace(config.model,
                                                                   transformer_impl=impl))
    rows = vocab_rows(load, info["iteration"], int(info["data"]["vocab_size"]))
    model = single_process_model(config, rows, int(info["data"]["seq_length"]), dtype=dtype)
    try:
        load_weights_for_inference(load, [model], info["iteration"])
        error = None
    except Exception as exc:  # what the user would see; reported, the numerics still run
        error = f"{type(exc).__name__}: {str(exc)[:300]}"
    return model.eval(), error


def packed_samples(prefix: str):
    """The first two training packs with 2+ conversations and padding, and the (start, end) of
    every conversation once they are flattened into one sequence (padding excluded)."""
    from mt_dialog.data.dataset import PackedDialogDataset

    dataset = PackedDialogDataset(prefix, "train")
    samples = []
    for index in range(len(dataset)):
        sample = dataset[index]
        if int(sample["num_tokens"]) < len(sample["tokens"]) and len(sample["cu_seqlens"]) > 3:
            samples.append(sample)
        if len(samples) == 2:
            break
    if len(samples) < 2:
        raise RuntimeError(f"{prefix}: fewer than 2 packs with 2+ conversations and padding")
    segments, seq = [], len(samples[0]["tokens"])
    for pack, sample in enumerate(samples):
        bounds = [int(b) for b in sample["cu_seqlens"]]
        segments += [(pack * seq + a, pack * seq + b) for a, b in zip(bounds, bounds[1:])
                     if b <= int(sample["num_tokens"])]
    return samples, segments


def packed_and_alone_logits(model, batch, segments):
    """fp32 logits of the conversations' tokens: the flattened micro-batch in one forward, and
    each conversation in a forward of its own (no packed parameters, as generation does)."""
    import torch

    with torch.no_grad():
        packed = model(batch["tokens"], batch["position_ids"], None,
                       packed_seq_params=batch["packed_seq_params"])[0]
        alone = []
        for start, end in segments:
            tokens = batch["tokens"][:, start:end]
            positions = torch.arange(end - start, device=tokens.device)[None, :]
            alone.append(model(tokens, positions, None)[0])
    packed = torch.cat([packed[start:end] for start, end in segments]).float().cpu()
    return packed, torch.cat(alone).float().cpu()


def worker_thd(spec: Dict) -> Dict:
    """Packed vs alone logits for the local spec in fp32 and bf16 and (``spec['te']``) the TE
    spec in bf16, each loading ``spec['load']``; every variant also against local fp32."""
    import torch

    from mt_dialog.training.data import flatten_micro_batch
    from mt_dialog.training.distributed import device, initialize_single_process

    initialize_single_process(1234)
    samples, segments = packed_samples(spec["data"])
    batch = flatten_micro_batch(samples, True, device())  # as training flattens a micro-batch
    padding = len(batch["cu_seqlens"]) - 1 - len(segments)
    variants = [("local", torch.float32), ("local", torch.bfloat16)]
    if spec["te"]:
        variants.append(("transformer_engine", torch.bfloat16))
    out = {"conversations": len(segments), "padding": padding, "device": str(device()),
           "variants": {}}
    reference = None
    for impl, dtype in variants:
        model, error = model_from_checkpoint(spec["load"], impl, dtype)
        packed, alone = packed_and_alone_logits(model, batch, segments)
        reference = packed if reference is None else reference
        out["variants"][f"{impl}/{'fp32' if dtype == torch.float32 else 'bf16'}"] = {
            "load_error": error, "scale": float(packed.abs().max()),
            "packed_vs_alone": float((packed - alone).abs().max()),
            "vs_local_fp32": float((packed - reference).abs().max())}
        del model
    return out


def worker_greedy(spec: Dict) -> Dict:
    """For chat's greedy reply ``spec['token_ids']`` to ``spec['messages']``: one forward of the
    prompt + reply with the packed 'thd' parameters training uses, and at each generated
    position the margin between the best logit and the chosen token's."""
    import torch

    from mt_dialog.generate import Generator
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    generator = Generator.from_checkpoint(spec["load"])
    prompt = generator.prompt_ids(spec["messages"])
    chosen = [int(i) for i in spec["token_ids"]]
    ids = prompt + chosen[:-1]
    dev = generator.device
    tokens = torch.tensor([ids], dtype=torch.int64, device=dev)
    params = packed_seq_params_from_cu_seqlens(
        torch.tensor([0, len(ids)], dtype=torch.int32, device=dev))
    with torch.no_grad():
        logits = generator.model(tokens, torch.arange(len(ids), device=dev)[None, :], None,
                                 packed_seq_params=params)[0]
    logits = logits[len(prompt) - 1:, : generator.vocab_size].float().cpu()
    picked = logits.gather(1, torch.tensor(chosen)[:, None])[:, 0]
    margins = logits.max(dim=1).values - picked
    return {"steps": len(chosen), "margin": float(margins.max()) if chosen else math.nan,
            "argmax_equal": int((logits.argmax(dim=1) == torch.tensor(chosen)).sum()),
            "scale": float(logits.abs().max()), "device": str(dev),
            "dtype": str(next(generator.model.parameters()).dtype).replace("torch.", "")}


WORKERS = {"versions": worker_versions, "thd": worker_thd, "greedy": worker_greedy}


GEMMA3_FLAGS = dict(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                   num_query_groups=2, kv_channels=16, qk_layernorm=True, apply_layernorm_1p=True,
                   sandwich_norm=True, scale_embeddings=True, openai_gelu=True,
                   softmax_scale=24 ** -0.5, final_logit_softcapping=3.0, norm_epsilon=1e-6)
# local spec name -> TE spec name (TE fuses the input / MLP norms into the next linear)
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _gemma3_model(impl: str, dtype, state=None):
    """The tiny Gemma 3 of ``GEMMA3_FLAGS`` with layer implementation ``impl`` in ``dtype``;
    ``state``: a local-spec state dict to copy in (renamed for TE), else random (perturbed off
    the zero init of the (1 + w) norms)."""
    import torch

    from mt_dialog.training.config import (
        DataConfig, DialogTrainingConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig)
    from mt_dialog.training.saved_run import single_process_model

    config = DialogTrainingConfig(ModelConfig(transformer_impl=impl, **GEMMA3_FLAGS),
                                  ParallelConfig(), DataConfig(data_path=["unused"]),
                                  OptimConfig(), TrainConfig(train_iters=1))
    model = single_process_model(config, 128, 64, dtype=dtype).eval()
    if state is not None and impl != "local":
        state = {_te_name(name): tensor for name, tensor in state.items()}
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("_extra_state"):
                continue
            if state is None:
                tensor.add_(torch.randn_like(tensor.float()).to(tensor.dtype) * 0.3)
            else:
                tensor.copy_(state[name])
    return model


def _te_name(name: str) -> str:
    for local, te in TE_NAMES.items():
        if name.endswith("." + local):
            return name[:-len(local)] + te
    return name


def worker_gemma3(spec: Dict) -> Dict:
    """Packed vs alone logits of the tiny Gemma 3 for local fp32 / bf16 and (``spec['te']``) TE
    bf16, all with local fp32's weights; each also against local fp32."""
    import torch

    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens
    from mt_dialog.training.distributed import device

    reference_model = _gemma3_model("local", torch.float32)
    state = {k: v.float().cpu() for k, v in reference_model.state_dict().items()
             if not k.endswith("_extra_state")}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 128, (1, 40), generator=gen)
    out, reference = {"device": str(device()), "variants": {}}, None
    variants = [("local", torch.float32), ("local", torch.bfloat16)]
    if spec.get("te"):
        variants.append(("transformer_engine", torch.bfloat16))
    for impl, dtype in variants:
        model = _gemma3_model(impl, dtype, state)
        ids = tokens.to(device())
        params = packed_seq_params_from_cu_seqlens(torch.tensor([0, 17, 40], device=device()))
        with torch.no_grad():
            packed = model(ids, None, None, packed_seq_params=params)[0, 17:].float().cpu()
            alone = model(ids[:, 17:], torch.arange(23, device=device())[None], None)[0]
        alone = alone.float().cpu()
        reference = packed if reference is None else reference
        out["variants"][f"{impl}/{'fp32' if dtype == torch.float32 else 'bf16'}"] = {
            "scale": float(packed.abs().max()),
            "packed_vs_alone": float((packed - alone).abs().max()),
            "vs_local_fp32": float((packed - reference).abs().max())}
    return out


def check_gemma3(ctx: Context) -> List[Line]:
    result = worker(ctx, "gemma3", "gemma3", {"te": ctx.te_skip is None})
    variants, lines = result["variants"], []
    fp32 = variants["local/fp32"]
    tol = fp32_tolerance(fp32["scale"])
    lines.append(Line(verdict(fp32["packed_vs_alone"] <= tol), "11 gemma3 local fp32",
                      f"packed vs alone {fp32['packed_vs_alone']:.1e} (tol {tol:.1e}); "
                      f"{result['device']}"))
    bf16 = variants["local/bf16"]
    tol = bf16_tolerance(bf16["vs_local_fp32"], fp32["scale"])
    lines.append(Line(verdict(bf16["packed_vs_alone"] <= tol), "11 gemma3 local bf16",
                      f"packed vs alone {bf16['packed_vs_alone']:.1e} (bf16 tol {tol:.1e})"))
    if ctx.te_skip:
        reason = "needs CUDA" if not ctx.cuda else "transformer-engine is not usable (check 1)"
        return lines + [Line(ctx.te_skip, "11 gemma3 TE bf16", reason)]
    te = variants["transformer_engine/bf16"]
    ok = te["packed_vs_alone"] <= tol and te["vs_local_fp32"] <= tol
    lines.append(Line(verdict(ok), "11 gemma3 TE bf16",
                      f"packed vs alone {te['packed_vs_alone']:.1e}, vs local fp32 "
                      f"{te['vs_local_fp32']:.1e} (tol {tol:.1e}; sandwich norms are TENorm)"))
    return lines


WORKERS["gemma3"] = worker_gemma3
CHECK_FUNCTIONS["gemma3"] = check_gemma3


# -- checks 12 and 13: FP8 and tensor-parallel communication overlap -----------------------------

FP8_ITERS = 5
FP8_FLAGS = ("--fp8-format", "hybrid", "--fp8-recipe", "delayed")
FP8_TOLERANCE = 0.05  # relative, on the first step's loss (same weights and batch)


def refusal(ctx: Context, name: str, args: List[str]) -> tuple:
    """pretrain_dialog.py ``args``, expected to be refused before training: (exit code, its
    last stderr line); the command and output go to logs/NAME.log."""
    cmd = [sys.executable, "pretrain_dialog.py", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(cpu=False), capture_output=True,
                          text=True, timeout=STEP_TIMEOUT)
    with open(ctx.path("logs", f"{name}.log"), "w", encoding="utf-8") as handle:
        handle.write(f"$ {' '.join(cmd)}\n# exit: {proc.returncode}\n--- stdout\n{proc.stdout}"
                     f"\n--- stderr\n{proc.stderr}\n")
    lines = proc.stderr.strip().splitlines()
    return proc.returncode, lines[-1] if lines else ""


def refusal_line(ctx: Context, label: str, flags: Sequence[str], expected: str) -> Line:
    """PASS when pretrain_dialog.py with ``flags`` exits 2 with one line holding ``expected``
    (the reason this machine gave) and no traceback."""
    code, line = refusal(ctx, label.replace(" ", "-"), ["--data-path", "unused",
                                                         "--train-iters", "1", *flags])
    ok = code == 2 and expected in line and "Traceback" not in line
    return Line(verdict(ok), label, f"exit {code}: {line}")


def fp8_verdict(bf16: TrainLog, fp8: TrainLog, iters: int) -> tuple:
    """(ok, detail): every logged loss of both runs finite, all ``iters`` logged, and FP8's
    first loss/turn within FP8_TOLERANCE of bf16's."""
    losses = [v for log in (bf16, fp8) for it in range(1, iters + 1)
              for v in log.iters.get(it, (math.nan, math.nan))]
    finite = all(math.isfinite(v) for v in losses)
    first_bf16 = bf16.iters.get(1, (math.nan,))[0]
    first_fp8 = fp8.iters.get(1, (math.nan,))[0]
    gap = abs(first_fp8 - first_bf16) / abs(first_bf16) if first_bf16 else math.nan
    ok = finite and gap <= FP8_TOLERANCE
    last = fp8.iters.get(iters, (math.nan,))[0]
    return ok, (f"first loss/turn fp8 {first_fp8:.4f} vs bf16 {first_bf16:.4f} (relative "
                f"{gap:.1e}, tol {FP8_TOLERANCE:.0e}); fp8 after {iters} iterations {last:.4f}; "
                f"{'all' if finite else 'NOT all'} losses finite")


def check_fp8(ctx: Context) -> List[Line]:
    """Check 12: the refusal where FP8 cannot run (the reason check 1's probe gave), else
    bf16 vs FP8 training from the same init and data."""
    problem = ctx.versions.get("fp8_problem")
    if problem:
        expected = problem.split(";")[0]
        return [refusal_line(ctx, "12 fp8 refused", ["--bf16", *FP8_FLAGS], expected),
                Line(ctx.te_skip or "SKIP (no FP8)", "12 fp8 vs bf16",
                     problem.split(";")[0])]
    lines = [refusal_line(ctx, "12 fp8 needs --bf16", list(FP8_FLAGS), "needs --bf16")]
    bf16 = pretrain(ctx, "fp8-bf16", train_args(ctx, FP8_ITERS))
    fp8 = pretrain(ctx, "fp8-hybrid", train_args(ctx, FP8_ITERS, *FP8_FLAGS))
    ok, detail = fp8_verdict(bf16, fp8, FP8_ITERS)
    return lines + [Line(verdict(ok), "12 fp8 vs bf16", detail)]


OVERLAP_FLAGS = ("--tensor-model-parallel-size", "2", "--sequence-parallel",
                 "--micro-batch-size", "1")
OVERLAP_TOLERANCE = 0.01  # relative to the loss


def check_tp_comm_overlap(ctx: Context) -> List[Line]:
    """Check 13: TP 2 + sequence parallelism with and without --tp-comm-overlap (2 GPUs,
    torchrun), the same losses; else the refusal and a SKIP naming what is missing."""
    problem, gpus = ctx.versions.get("overlap_problem"), ctx.versions.get("gpus", 0)
    if problem:
        return [refusal_line(ctx, "13 overlap refused", [
            *OVERLAP_FLAGS, "--tp-comm-overlap", "--bf16"], problem.split(";")[0]),
            Line(ctx.te_skip or "SKIP (no TE)", "13 tp-comm-overlap",
                 f"{problem.split(';')[0]}")]
    if gpus < 2:
        return [Line("SKIP (1 GPU)", "13 tp-comm-overlap", f"needs 2 GPUs for tensor "
                     f"parallelism, this machine has {gpus}")]
    launcher = ["env", "CUDA_DEVICE_MAX_CONNECTIONS=1", sys.executable, "-m",
                "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "pretrain_dialog.py"]
    iters = ctx.sizes.cpu_iters
    plain = parse_train_log(run_step(ctx, "overlap-off", [
        *launcher, *train_args(ctx, iters, *OVERLAP_FLAGS)]))
    overlap = parse_train_log(run_step(ctx, "overlap-on", [
        *launcher, *train_args(ctx, iters, *OVERLAP_FLAGS, "--tp-comm-overlap")]))
    diff = max_loss_diff(plain, overlap, range(1, iters + 1))
    tol = OVERLAP_TOLERANCE * max((v[0] for v in plain.iters.values()), default=0.0)
    return [Line(verdict(diff <= tol), "13 tp-comm-overlap",
                 f"TP 2 + sequence parallel, iters 1-{iters} with vs without --tp-comm-overlap: "
                 f"max |dloss| {diff:.1e} (tol {tol:.1e})")]


CP_TOLERANCE = 0.02  # relative to the loss: bf16, keys and values attended in another order
CP_FLAGS = ("--context-parallel-size", "2")


def check_context_parallel(ctx: Context) -> List[Line]:
    """Check 14: CP=2 on 2 processes vs one process, the same losses: TE's context-parallel
    attention on 2+ GPUs (each --cp-comm-type of CP_COMM_TYPES), the CPU stand-in without
    CUDA; skipped with the reason on one GPU."""
    gpus = ctx.versions.get("gpus", 0)
    if ctx.cuda and gpus < 2:
        return [Line("SKIP (1 GPU)", "14 context-parallel", f"needs 2 GPUs for context "
                     f"parallelism, this machine has {gpus}")]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node"]
    iters = ctx.sizes.cpu_iters
    one = parse_train_log(run_step(ctx, "cp-1", [*launcher, "1", "pretrain_dialog.py",
                                                 *train_args(ctx, iters)]))
    tol = CP_TOLERANCE * max((v[0] for v in one.iters.values()), default=0.0)
    lines = []
    for comm in (("p2p", "a2a") if ctx.cuda else ("p2p",)):
        split = parse_train_log(run_step(ctx, f"cp-2-{comm}", [
            *launcher, "2", "pretrain_dialog.py",
            *train_args(ctx, iters, *CP_FLAGS, "--cp-comm-type", comm)]))
        diff = max_loss_diff(one, split, range(1, iters + 1))
        where = f"TE {comm}" if ctx.cuda else "CPU stand-in (local attention, all-gather)"
        lines.append(Line(verdict(diff <= tol), f"14 context-parallel {comm}",
                          f"{where}: iters 1-{iters} CP=2 vs one process: max |dloss| "
                          f"{diff:.1e} (tol {tol:.1e})"))
    return lines


CHECK_FUNCTIONS["fp8"] = check_fp8
CHECK_FUNCTIONS["tp-comm-overlap"] = check_tp_comm_overlap
CHECK_FUNCTIONS["context-parallel"] = check_context_parallel


def run_worker(kind: str, spec_path: Optional[str]) -> int:
    import warnings

    warnings.filterwarnings("ignore")  # megatron-core's import-time notices
    spec = {}
    if spec_path:
        with open(spec_path, encoding="utf-8") as handle:
            spec = json.load(handle)
    result = WORKERS[kind](spec)
    print(json.dumps(result), flush=True)
    return 0


# -- main ----------------------------------------------------------------------------------------

def run_checks(ctx: Context, checks: Sequence[str]) -> List[Line]:
    """Run ``checks`` in order, printing their lines as they come; a failed step fails its
    check only."""
    results = []
    for name in checks:
        started = time.time()
        try:
            lines = CHECK_FUNCTIONS[name](ctx)
        except StepFailed as exc:
            lines = [Line("FAIL", f"{CHECKS.index(name) + 1} {name}", str(exc))]
        for line in lines:
            print(line, flush=True)
        ctx.seconds[name] = ctx.seconds.get(name, 0.0) + time.time() - started
        results += lines
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return run_worker(args.worker, args.spec)
    missing = missing_packages()
    if missing:
        print(f"FAIL 1 versions: {', '.join(missing)} not importable by {sys.executable}; run "
              "bash scripts/gpu_check.sh without --python (it sets up .venv with "
              "scripts/setup.sh), or pip install -e . into that interpreter", file=sys.stderr)
        return 1
    try:
        ctx = Context(prepare_work_dir(args.work_dir))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    try:
        ctx.versions = worker(ctx, "versions", "versions", {})
        ctx.seconds["versions"] = time.time() - started
    except StepFailed as exc:
        print(Line("FAIL", "1 versions", str(exc)), flush=True)
        return 1
    mode = f"GPU ({ctx.versions['device']})" if ctx.cuda else "CPU mode (no CUDA)"
    print(f"== mt_dialog GPU check: {mode}; checks {','.join(args.checks)}; work dir {ctx.work}",
          flush=True)
    results = run_checks(ctx, args.checks)
    counts = {s: sum(line.status.startswith(s) for line in results)
              for s in ("PASS", "FAIL", "SKIP")}
    took = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in ctx.seconds.items())
    print(f"== {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
          f"{time.time() - started:.0f} s" + (" (budget: 480 s on one GPU)" if ctx.cuda else "")
          + f"; {took}", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
