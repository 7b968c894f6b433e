#!/usr/bin/env python
"""Context parallelism and data-parallel communication overlap on CPU, through the real entry
point: ``torchrun ... pretrain_dialog.py`` (gloo, bf16 as users run, ``OMP_NUM_THREADS=1``) on
a synthetic dataset of few, long conversations built with ``tools/preprocess_dialog.py``.

Table 1, context parallelism: CP=1 on 1 process against ``--context-parallel-size 2`` on 2
processes, the same packs, micro-batch 1, the same global batch (DP=1 in both). Per rank:

  activations (saved)  peak bytes of the tensors autograd keeps for the backward during a step
                       (``torch.autograd.graph.saved_tensors_hooks``: each storage counted once
                       while a saved tensor holds it; model parameters excluded)
  RSS growth           peak resident memory during a step (``/proc/self/statm`` sampled every
                       5 ms) minus the resident memory at the step's start (model, gradients,
                       optimizer state and data already there); glibc's mmap threshold is fixed
                       (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the RSS and
                       every step starts from the same floor
  step time            wall time of ``loop.train_step`` (one optimizer step), medians over the
                       steps after the first; the slower rank's

Table 2, DP=2 on 2 processes: the same data and model, with and without ``--overlap-grad-reduce``
and with ``--use-distributed-optimizer`` (+ ``--overlap-grad-reduce --overlap-param-gather``),
``--ddp-bucket-size`` set so that the gradients form several buckets. The losses of the
variants must agree (they run the same steps); on gloo over 2 shared CPU cores the overlap
shows correctness, not GPU speed.

The measurements are taken inside each rank by this script's ``--probe`` mode, which wraps
``mt_dialog.training.loop.train_step`` and then calls ``pretrain_dialog.main`` with the real
command line (nothing else changed).

    python benchmarks/bench_context_parallel.py           # full run (~10 min on 2 quiet cores)
    python benchmarks/bench_context_parallel.py --quick   # smoke run (~1-2 min)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import threading
import time
import weakref
from typing import Any, Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

MMAP_THRESHOLD = 1 << 17  # bytes: tensor buffers above this are mmapped and unmapped on free
SAMPLE_SECONDS = 0.005
CP_RUNS = {"cp1": {"label": "CP=1, 1 process", "nproc": 1, "flags": []},
           "cp2": {"label": "CP=2, 2 processes", "nproc": 2,
                   "flags": ["--context-parallel-size", "2"]}}
DP_RUNS = {
    "dp": {"label": "DP=2", "flags": []},
    "dp_overlap": {"label": "DP=2 --overlap-grad-reduce", "flags": ["--overlap-grad-reduce"]},
    "dp_dist": {"label": "DP=2 --use-distributed-optimizer",
                "flags": ["--use-distributed-optimizer"]},
    "dp_dist_overlap": {"label": "DP=2 dist. opt. + overlap grad + param gather",
                        "flags": ["--use-distributed-optimizer", "--overlap-grad-reduce",
                                  "--overlap-param-gather"]},
}


# -- probe (inside each rank, under torchrun) --------------------------------------------------


class RssSampler(threading.Thread):
    """Samples this process's resident memory (bytes) every ``SAMPLE_SECONDS``; ``peak`` is the
    largest sample since the last ``reset``."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.stopped = False

    def rss(self) -> int:
        with open("/proc/self/statm", "rb") as handle:
            return int(handle.read().split()[1]) * self.page

    def reset(self) -> int:
        self.peak = self.rss()
        return self.peak

    def run(self) -> None:
        while not self.stopped:
            self.peak = max(self.peak, self.rss())
            time.sleep(SAMPLE_SECONDS)


class SavedTensors:
    """Live bytes of the tensors autograd saves for the backward (each storage once), and
    their peak since ``reset``; storages in ``exclude`` (the parameters) are not counted.
    ``peak_masks`` / ``peak_other``: the same for attention masks only (boolean tensors, and
    what SDPA saves of an explicit mask: a tensor of the mask's shape, ``mask_shape`` while an
    SDPA call with a mask runs) and for all other tensors only (each its own peak)."""

    def __init__(self) -> None:
        self.live: Dict[int, List[int]] = {}
        self.current = self.peak = 0
        self.masks = self.peak_masks = self.peak_other = 0
        self.exclude: set = set()
        self.mask_shape: Optional[tuple] = None

    def reset(self) -> None:
        self.peak, self.peak_masks = self.current, self.masks
        self.peak_other = self.current - self.masks

    def pack(self, tensor):
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        holder = _Held(tensor)
        if key in self.exclude or storage.nbytes() == 0:
            return holder
        mask = str(tensor.dtype) == "torch.bool" or tuple(tensor.shape) == self.mask_shape
        entry = self.live.setdefault(key, [storage.nbytes(), 0, mask])
        if entry[1] == 0:
            self._add(entry, 1)
        entry[1] += 1
        weakref.finalize(holder, self._release, key)
        return holder

    def _release(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self._add(entry, -1)
            del self.live[key]

    def _add(self, entry: List, sign: int) -> None:
        self.current += sign * entry[0]
        self.masks += sign * entry[0] * entry[2]
        self.peak = max(self.peak, self.current)
        self.peak_masks = max(self.peak_masks, self.masks)
        self.peak_other = max(self.peak_other, self.current - self.masks)

    @staticmethod
    def unpack(holder):
        return holder.tensor


class _Held:
    __slots__ = ("tensor", "__weakref__")

    def __init__(self, tensor) -> None:
        self.tensor = tensor


def probe(out: str, argv: Sequence[str]) -> int:
    """Run ``pretrain_dialog.main(argv)`` with ``loop.train_step`` wrapped to record, per step,
    its wall time, peak saved-tensor bytes, RSS at its start and its peak RSS; rank r writes
    ``out.rank{r}.json``."""
    import torch

    import pretrain_dialog
    from mt_dialog.training import loop

    sampler, saved, steps = RssSampler(), SavedTensors(), []
    original = loop.train_step

    def measured_step(run):
        if not saved.exclude:
            saved.exclude = {p.untyped_storage().data_ptr() for chunk in run.model
                             for p in chunk.parameters()}
        saved.reset()
        start_rss = sampler.reset()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            metrics = original(run)
        seconds = time.perf_counter() - start
        steps.append({"seconds": seconds, "saved_peak": saved.peak,
                      "saved_peak_masks": saved.peak_masks, "saved_peak_other": saved.peak_other,
                      "rss_start": start_rss,
                      "rss_peak": max(sampler.peak, sampler.rss()),
                      "loss_per_turn": None if metrics is None else metrics["loss per turn"]})
        return metrics

    sdpa = torch.nn.functional.scaled_dot_product_attention

    def watched_sdpa(*args, **kwargs):
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        saved.mask_shape = None if mask is None else tuple(mask.shape)
        try:
            return sdpa(*args, **kwargs)
        finally:
            saved.mask_shape = None

    loop.train_step = measured_step
    torch.nn.functional.scaled_dot_product_attention = watched_sdpa
    sampler.start()
    code = pretrain_dialog.main(list(argv))
    sampler.stopped = True
    rank = int(os.environ.get("RANK", "0"))
    with open(f"{out}.rank{rank}.json", "w", encoding="utf-8") as handle:
        json.dump({"rank": rank, "exit": code, "argv": list(argv), "steps": steps}, handle)
    return code


# -- data ------------------------------------------------------------------------------------


def long_corpus(path: str, tokenizer: str, n: int, seq: int, seed: int) -> None:
    """``n`` conversations of whole turns (user LogNormal median 150 tokens, reply median 600),
    each just longer than ``seq`` tokens: ``--overlong truncate`` keeps the longest whole-turn
    prefix that fits, so every pack holds one conversation filling most of ``seq``."""
    import numpy as np
    from synthetic_corpus import TextMaker

    rng = np.random.default_rng(seed)
    maker = TextMaker(tokenizer, seed + 1)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            messages, total = [], 0
            while total <= seq:
                user = int(np.clip(rng.lognormal(np.log(150), 0.6), 8, seq // 8))
                reply = int(np.clip(rng.lognormal(np.log(600), 0.5), 8, seq // 4))
                messages += [{"role": "user", "content": maker.text(user)},
                             {"role": "assistant", "content": maker.text(reply)}]
                total += user + reply + 13  # + ChatML overhead of the pair
            handle.write(json.dumps({"messages": messages}) + "\n")


def build_dataset(work: str, n: int, seq: int, seed: int,
                  corpus_seq: Optional[int] = None) -> str:
    """The packed dataset prefix (built with tools/preprocess_dialog.py at ``seq`` from the
    corpus of conversations just longer than ``corpus_seq``, default ``seq``; reused if made
    with the same parameters)."""
    corpus_seq = corpus_seq or seq
    from synthetic_corpus import train_tokenizer

    os.makedirs(work, exist_ok=True)
    tokenizer = os.path.join(work, "synthetic_tokenizer.model")
    prefix = os.path.join(work, f"long_n{n}_s{seq}_seed{seed}"
                          + (f"_from{corpus_seq}" if corpus_seq != seq else ""))
    params = {"n": n, "seq": seq, "seed": seed, "version": 1, "corpus_seq": corpus_seq}
    sidecar = prefix + ".params.json"
    if common.made_with(sidecar, params) and os.path.isfile(tokenizer):
        return prefix
    if not os.path.isfile(tokenizer):
        train_tokenizer(tokenizer)
    corpus = os.path.join(work, f"long_n{n}_c{corpus_seq}_seed{seed}.jsonl")
    if not os.path.isfile(corpus):
        long_corpus(corpus + ".tmp", tokenizer, n, corpus_seq, seed)
        os.replace(corpus + ".tmp", corpus)
    command = [sys.executable, os.path.join(common.REPO, "tools", "preprocess_dialog.py"),
               "--input", corpus, "--tokenizer-model", tokenizer, "--template", "chatml",
               "--seq-length", str(seq), "--packing", "bfd", "--overlong", "truncate",
               "--split", "100,0", "--output-prefix", prefix, "--overwrite", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"preprocessing failed:\n{done.stdout}\n{done.stderr}")
    common.record_made_with(sidecar, params)
    return prefix


def dataset_figures(prefix: str) -> Dict[str, Any]:
    from mt_dialog.data.storage import read_metadata

    meta = read_metadata(prefix)
    split = meta["splits"]["train"]
    return {"packs": split["packs"], "conversations": split["conversations"],
            "turns": split["turns"], "tokens": split["tokens"],
            "packing_efficiency": split["packing_efficiency"],
            "vocab_size": int(meta["tokenizer"]["vocab_size"])}


# -- launching -------------------------------------------------------------------------------


def train_flags(prefix: str, args, extra: Sequence[str]) -> List[str]:
    return ["--data-path", prefix, "--micro-batch-size", "1", "--global-batch-size",
            str(args.global_batch), "--train-iters", str(args.iters), "--log-interval", "1",
            "--lr", "1e-3", "--lr-decay-iters", str(2 * args.iters), "--bf16",
            "--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(args.heads), "--seed", "1234", *extra]


def reused(nproc: int, flags: Sequence[str], out: str) -> Optional[Dict[str, Any]]:
    """The rank records of an earlier run of exactly ``flags`` on ``nproc`` ranks (``--reuse``),
    or None."""
    ranks = []
    for rank in range(nproc):
        try:
            with open(f"{out}.rank{rank}.json", encoding="utf-8") as handle:
                ranks.append(json.load(handle))
        except (OSError, ValueError):
            return None
    if os.path.exists(f"{out}.rank{nproc}.json") or any(
            r.get("argv") != list(flags) or r["exit"] != 0 for r in ranks):
        return None
    return {"ranks": ranks, "log": "", "process_seconds": float("nan"), "reused": True}


def launch(nproc: int, flags: Sequence[str], out: str, reuse: bool = False) -> Dict[str, Any]:
    """``torchrun --nproc_per_node nproc THIS --probe out -- pretrain_dialog flags``; the ranks'
    step records and rank 0's log (with ``reuse``, those of an earlier identical run)."""
    earlier = reused(nproc, flags, out) if reuse else None
    if earlier is not None:
        print("    (reused the records of an earlier identical run)", flush=True)
        return earlier
    for stale in range(3):
        if os.path.exists(f"{out}.rank{stale}.json"):
            os.remove(f"{out}.rank{stale}.json")
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    runner = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    from tests.training.launch import free_port, launch_env

    command = [*runner, "--nnodes", "1", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), os.path.abspath(__file__),
               "--probe", out, "--", *flags]
    env = launch_env({"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
    start = common.wall()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=common.REPO)
    if done.returncode:
        raise SystemExit(f"run failed: {' '.join(command)}\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    ranks = []
    for rank in range(nproc):
        with open(f"{out}.rank{rank}.json", encoding="utf-8") as handle:
            ranks.append(json.load(handle))
    return {"ranks": ranks, "log": done.stdout, "process_seconds": common.wall() - start}


def summarize(result: Dict[str, Any]) -> Dict[str, Any]:
    """Medians over the steps after the first, per rank; the run's figures are the worst
    rank's (step time: the slower rank; memory: the larger)."""
    import numpy as np

    per_rank = []
    for rank in result["ranks"]:
        timed = rank["steps"][1:] or rank["steps"]
        per_rank.append({
            "step_seconds": float(np.median([s["seconds"] for s in timed])),
            "saved_mib": float(np.median([s["saved_peak"] for s in timed])) / 2 ** 20,
            "saved_masks_mib": float(np.median([s.get("saved_peak_masks", np.nan)
                                                for s in timed])) / 2 ** 20,
            "saved_other_mib": float(np.median([s.get("saved_peak_other", np.nan)
                                                for s in timed])) / 2 ** 20,
            "rss_growth_mib": float(np.median([s["rss_peak"] - s["rss_start"]
                                               for s in timed])) / 2 ** 20,
            "rss_peak_mib": max(s["rss_peak"] for s in timed) / 2 ** 20,
            "steps_timed": len(timed)})
    losses = [s["loss_per_turn"] for s in result["ranks"][0]["steps"]]
    return {"per_rank": per_rank, "losses": losses,
            "step_seconds": max(r["step_seconds"] for r in per_rank),
            "saved_mib": max(r["saved_mib"] for r in per_rank),
            "saved_masks_mib": max(r["saved_masks_mib"] for r in per_rank),
            "saved_other_mib": max(r["saved_other_mib"] for r in per_rank),
            "rss_growth_mib": max(r["rss_growth_mib"] for r in per_rank),
            "rss_peak_mib": max(r["rss_peak_mib"] for r in per_rank),
            "step_seconds_all": [[s["seconds"] for s in r["steps"]] for r in result["ranks"]],
            "process_seconds": result["process_seconds"],
            "reused": bool(result.get("reused"))}


# -- tables ----------------------------------------------------------------------------------


def cp_table(runs: Dict[str, Dict[str, Any]]) -> str:
    rows = []
    for key, spec in CP_RUNS.items():
        r = runs[key]
        rows.append([spec["label"], f"{r['saved_mib']:,.0f}", f"{r['saved_other_mib']:,.0f}",
                     f"{r['saved_masks_mib']:,.0f}", f"{r['rss_growth_mib']:,.0f}",
                     f"{r['rss_peak_mib']:,.0f}", common.fmt_seconds(r["step_seconds"]),
                     f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"])
    return common.format_table(["run", "saved for backward MiB/rank", "of which non-mask",
                                "of which attention masks", "RSS growth MiB/rank",
                                "peak RSS MiB/rank", "step time", "loss/turn first -> last"],
                               rows)


def cp_ratios(runs: Dict[str, Dict[str, Any]]) -> Dict[str, float]:
    one, two = runs["cp1"], runs["cp2"]
    return {"activations (saved) CP2/CP1": two["saved_mib"] / one["saved_mib"],
            "activations (saved, masks excluded) CP2/CP1":
                two["saved_other_mib"] / one["saved_other_mib"],
            "RSS growth CP2/CP1": two["rss_growth_mib"] / one["rss_growth_mib"],
            "step time CP2/CP1": two["step_seconds"] / one["step_seconds"]}


def dp_table(runs: Dict[str, Dict[str, Any]]) -> str:
    base = runs["dp"]["step_seconds"]
    rows = [[DP_RUNS[k]["label"], common.fmt_seconds(r["step_seconds"]),
             f"{r['step_seconds'] / base:.2f}x",
             f"{r['losses'][0]:.4f} -> {r['losses'][-1]:.4f}"] for k, r in runs.items()]
    return common.format_table(["DP=2 run", "step time", "vs DP=2", "loss/turn first -> last"],
                               rows)


def plot(cp: Dict[str, Any], dp: Dict[str, Any], path: str, info, subtitle: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(14, 4.4))
    labels = [CP_RUNS[k]["label"] for k in cp]
    width = 0.38
    xs = range(len(labels))
    if all(math.isfinite(cp[k]["saved_other_mib"]) for k in cp):
        left.bar([x - width / 2 for x in xs], [cp[k]["saved_other_mib"] for k in cp], width,
                 label="saved for backward: non-mask")
        left.bar([x - width / 2 for x in xs], [cp[k]["saved_masks_mib"] for k in cp], width,
                 bottom=[cp[k]["saved_other_mib"] for k in cp], label="saved: attention masks")
    else:  # records made before the mask split was recorded (--reuse)
        left.bar([x - width / 2 for x in xs], [cp[k]["saved_mib"] for k in cp], width,
                 label="saved for backward")
    left.bar([x + width / 2 for x in xs], [cp[k]["rss_growth_mib"] for k in cp], width,
             label="RSS growth in a step")
    left.set_xticks(list(xs), labels)
    left.set_ylabel("MiB per rank")
    left.set_title(f"memory per rank ({subtitle})")
    left.legend(fontsize=8)
    mid.bar(labels, [cp[k]["step_seconds"] for k in cp], color=["C0", "C1"])
    mid.set_ylabel("seconds per step (slower rank)")
    mid.set_title("step time, CP")
    dlabels = [DP_RUNS[k]["label"].replace("DP=2 ", "").replace(" + ", " +\n")
               .replace("--use-", "").replace("--", "") for k in dp]
    right.bar(dlabels, [dp[k]["step_seconds"] for k in dp], color="C2")
    right.set_ylabel("seconds per step")
    right.set_title("DP=2 on gloo: overlap (correctness, not speed)")
    right.tick_params(axis="x", labelsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path, info)


# -- main ------------------------------------------------------------------------------------


def run_all(prefix: str, args, work: str) -> Dict[str, Dict[str, Any]]:
    cp, dp = {}, {}
    for key, spec in CP_RUNS.items():
        print(f"  {spec['label']} ...", flush=True)
        cp[key] = summarize(launch(spec["nproc"], train_flags(prefix, args, spec["flags"]),
                                   os.path.join(work, key), args.reuse))
    if not args.skip_dp:
        dp_args = argparse.Namespace(**{**vars(args), "hidden": args.dp_hidden})
        if args.dp_seq_length != args.seq_length:
            prefix = build_dataset(work, args.conversations, args.dp_seq_length, args.seed,
                                   args.seq_length)
        for key, spec in DP_RUNS.items():
            print(f"  {spec['label']} ...", flush=True)
            flags = [*spec["flags"], "--ddp-bucket-size", str(args.ddp_bucket_size)]
            dp[key] = summarize(launch(2, train_flags(prefix, dp_args, flags),
                                       os.path.join(work, key), args.reuse))
    return {"cp": cp, "dp": dp}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: short sequences")
    parser.add_argument("--seq-length", type=int, help="default 16384; quick 1024")
    parser.add_argument("--conversations", type=int, help="default 12; quick 8")
    parser.add_argument("--iters", type=int, help="training iterations (default 4; quick 3); "
                        "the first is not timed")
    parser.add_argument("--global-batch", type=int, default=2, help="packs per step")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, help="CP runs (default 128; quick 64)")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--dp-hidden", type=int, help="DP runs (default 128; quick 64)")
    parser.add_argument("--ddp-bucket-size", type=int, help="parameters per gradient bucket "
                        "in the DP runs (default 200000; quick 50000)")
    parser.add_argument("--dp-seq-length", type=int, help="sequence length of the DP runs "
                        "(default: --seq-length; the same conversations, truncated)")
    parser.add_argument("--skip-dp", action="store_true", help="table 1 only")
    parser.add_argument("--reuse", action="store_true", help="reuse the per-rank records of "
                        "an earlier run with the same command line (in --work-dir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", help="scratch data (default benchmarks/work/cp)")
    parser.add_argument("--results-dir", help="JSON/PNG folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, small in (("seq_length", 16384, 1024), ("conversations", 12, 8),
                              ("iters", 4, 3), ("hidden", 128, 64), ("dp_hidden", 128, 64),
                              ("ddp_bucket_size", 200000, 50000)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.dp_seq_length = args.dp_seq_length or args.seq_length
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--probe"]:
        return probe(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    args = parse_args(argv)
    info = common.machine_info()
    print(common.header("context parallelism and overlap benchmark", info, args.quick),
          flush=True)
    print(f"load average (1, 5, 15 min): {info['load_average_1_5_15']} at the start", flush=True)
    work = args.work_dir or os.path.join(common.WORK_DIR, "cp")
    start = common.wall()
    prefix = build_dataset(work, args.conversations, args.seq_length, args.seed)
    data = dataset_figures(prefix)
    print(f"dataset: {data['conversations']} conversations, {data['packs']} packs of seq "
          f"{args.seq_length} ({100 * data['packing_efficiency']:.1f}% filled), built in "
          f"{common.wall() - start:.1f} s", flush=True)
    runs = run_all(prefix, args, work)
    load_end = list(os.getloadavg())
    cp, dp = runs["cp"], runs["dp"]
    print(f"\nmodel {args.layers} layers, hidden {args.hidden}, {args.heads} heads, bf16; seq "
          f"{args.seq_length} x micro-batch 1, {args.global_batch} packs/step, {args.iters} "
          f"steps (first not timed); medians per rank, the worse rank shown")
    table = cp_table(cp)
    print(table)
    ratios = cp_ratios(cp)
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}x")
    dtable = None
    if dp:
        print(f"\nDP=2 (2 processes, gloo): hidden {args.dp_hidden}, seq {args.dp_seq_length}, "
              f"--ddp-bucket-size {args.ddp_bucket_size}, the same packs and steps")
        dtable = dp_table(dp)
        print(dtable)
    print(f"load average (1, 5, 15 min): {[round(x, 2) for x in load_end]} at the end")
    root = args.results_dir or common.RESULTS_DIR
    os.makedirs(root, exist_ok=True)
    stem = os.path.join(root, "context_parallel" + ("-quick" if args.quick else ""))
    paths = {"json": stem + ".json", "png": stem + ".png"}
    settings = {k: v for k, v in vars(args).items() if k not in ("work_dir", "results_dir")}
    common.write_json(paths["json"], {
        "benchmark": "context_parallel", "quick": args.quick, "machine": info,
        "load_average_end": load_end, "settings": settings, "dataset": data,
        "cp": cp, "ratios": ratios, "dp": dp, "table": table, "dp_table": dtable,
        "measures": {"saved": "peak bytes saved for backward (saved_tensors_hooks), params "
                     "excluded", "rss_growth": "peak RSS in a step - RSS at its start",
                     "step": "wall time of loop.train_step, median after the first step"}})
    plot(cp, dp, paths["png"], info, f"seq {args.seq_length}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
