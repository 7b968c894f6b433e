#!/usr/bin/env python
"""Training throughput: one epoch of the same conversations, four ways, through the real training
path (megatron-core GPTModel built by ``mt_dialog.training``, ``pretrain_dialog.make_forward_step``
and ``mt_dialog.training.loop.train_step``; one process, CPU, fp32, ``OMP_NUM_THREADS=1``):

  (a) split   every n-turn conversation becomes n samples (sample k = history + reply k, only
              reply k trained), one sample per sequence, padded; plain causal attention
  (b) padded  one conversation per sequence, padded, all turns trained; plain causal attention
  (c) packed  best-fit-decreasing packs, isolated attention per conversation, turn-normalized (ours)
  (d) packed  the same packs with plain causal attention over the whole pack

All four use the same tiny model, seed, sequence length and micro-batch size (the same token
budget per micro-batch), the same micro-batches per step and the turn-normalized loss; each
trains exactly the same assistant turns (checked), so useful (loss) tokens per epoch are equal and
"useful tokens/s" compares like with like.

Datasets: (b), (c)/(d) come from ``tools/preprocess_dialog.py`` (``--packing none`` / ``bfd``,
``--overlong truncate``, ``--split 100,0``) on the ShareGPT-like corpus of
``synthetic_corpus.py`` with its own SentencePiece tokenizer (no download needed). (a) is derived
from (b): the library has no "one sample per turn" mode, so each padded conversation is cut after
each of its turns and the loss_token_num of every other turn zeroed (earlier replies become
context), and written with ``mt_dialog.data.storage.PackWriter`` plus (b)'s metadata.

Epoch time = steps per epoch x mean step time, the mean taken over the steps measured after 2
warm-up steps; a variant whose epoch does not fit in ``--seconds-per-variant`` is measured on its
first steps (a uniform random sample of its packs: the stream is a seeded permutation) and
extrapolated; the table says how many steps were measured. The four runs live in one worker
process (same seed, so the same initial weights) and take their steps in turn, round-robin, so a
change in machine load affects every variant alike.

    python benchmarks/bench_training.py           # full run (~8-9 min on 2 cores)
    python benchmarks/bench_training.py --quick   # smoke run (~1 min)

Target: (c) at least 5x faster than (a) and 2x faster than (b).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

VARIANTS = {
    "a": {"label": "(a) split per turn, padded", "data": "split", "attention": "causal"},
    "b": {"label": "(b) conversation, padded", "data": "padded", "attention": "causal"},
    "c": {"label": "(c) packed, isolated (ours)", "data": "packed", "attention": "isolated"},
    "d": {"label": "(d) packed, causal", "data": "packed", "attention": "causal"},
}
WARMUP = 2
TARGETS = {"a": 5.0, "b": 2.0}


# -- datasets --------------------------------------------------------------------------------


def preprocess(corpus, tokenizer, prefix, seq, packing, workers=1) -> None:
    command = [sys.executable, os.path.join(common.REPO, "tools", "preprocess_dialog.py"),
               "--input", corpus, "--tokenizer-model", tokenizer, "--template", "chatml",
               "--seq-length", str(seq), "--packing", packing, "--overlong", "truncate",
               "--split", "100,0", "--output-prefix", prefix, "--overwrite", "--no-progress",
               "--workers", str(workers)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"preprocessing failed:\n{done.stdout}\n{done.stderr}")


def turn_runs(counts):
    """[(start, stop)] of each trained turn (maximal runs of loss_token_num > 0)."""
    import numpy as np

    trained = np.concatenate([[0], (counts > 0).astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(trained))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def derive_split_per_turn(padded_prefix: str, prefix: str) -> None:
    """Variant (a) from the padded dataset (b): sample k = tokens up to the end of turn k, only
    turn k trained. Written with PackWriter, one sample per pack, (b)'s metadata adapted."""
    import numpy as np

    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.data.storage import PackWriter, read_metadata, write_metadata

    source = PackedDialogDataset(padded_prefix, "train")
    meta = read_metadata(padded_prefix)
    seq = int(meta["seq_length"])
    writer = PackWriter(prefix, "train", int(meta["tokenizer"]["vocab_size"]), seq)
    samples = tokens = loss_tokens = turns = 0
    for index in range(len(source)):
        ids, counts, _ = source.raw_pack(index)
        for start, stop in turn_runs(counts):
            sample_counts = np.zeros(stop, dtype=counts.dtype)
            sample_counts[start:stop] = counts[start:stop]
            writer.add_pack([ids[:stop]], [sample_counts])
            samples += 1
            tokens += stop
            loss_tokens += stop - start
            turns += 1
    writer.finalize()
    split = {"conversations": samples, "turns": turns, "tokens": tokens,
             "loss_tokens": loss_tokens, "packs": samples,
             "packing_efficiency": round(tokens / (samples * seq), 6),
             "padding_tokens": samples * seq - tokens}
    meta["splits"] = {"train": split}
    meta["summary"]["splits"] = {"train": split}
    meta["packing"] = "none, one sample per turn (derived by benchmarks/bench_training.py)"
    write_metadata(prefix, meta)


def dataset_figures(prefix: str, attention: str, model: dict) -> dict:
    """Packs, tokens, loss tokens, turns, padding share of slots and of model FLOPs."""
    import numpy as np

    from mt_dialog.data.dataset import PackedDialogDataset

    data = PackedDialogDataset(prefix, "train")
    seq = data.seq_length
    lengths = data.tokens.sequence_lengths.astype(np.int64)
    docs = data.documents.astype(np.int64)
    pack_of = np.repeat(np.arange(len(data)), np.diff(docs))
    used = np.bincount(pack_of, weights=lengths, minlength=len(data)).astype(np.int64)
    pad = seq - used
    loss_tokens = turns = 0
    for index in range(len(data.loss_token_num)):
        c = data.loss_token_num[index]
        trained = c[c > 0].astype(np.float64)
        loss_tokens += trained.size
        turns += int(round(float(np.sum(1.0 / trained)))) if trained.size else 0
    h, layers, f, vocab = model["hidden"], model["layers"], model["ffn"], model["vocab_padded"]
    linear = 2 * (layers * (4 * h * h + 3 * h * f) + h * vocab)  # forward FLOPs per token
    attn_pair = 4 * h * layers  # forward FLOPs per (query, key) pair: QK^T and AV
    if attention == "isolated":
        real_pairs = float(np.sum(lengths * (lengths + 1) / 2))
        pad_pairs = float(np.sum(pad * (pad + 1) / 2))
    else:  # one causal mask over each sequence: padding rows attend to everything before them
        real_pairs = float(np.sum(used * (used + 1) / 2))
        pad_pairs = float(np.sum(seq * (seq + 1) / 2 - used * (used + 1) / 2))
    slots = len(data) * seq
    real_flops = 3 * (used.sum() * linear + real_pairs * attn_pair)  # forward + backward
    pad_flops = 3 * (pad.sum() * linear + pad_pairs * attn_pair)
    return {"prefix": prefix, "packs": len(data), "sequences": int(lengths.size),
            "tokens": int(used.sum()), "slots": int(slots), "loss_tokens": int(loss_tokens),
            "turns": int(turns), "padding_share_slots": float(pad.sum() / slots),
            "model_flops": float(real_flops + pad_flops),
            "padding_share_flops": float(pad_flops / (real_flops + pad_flops))}


# -- worker: all variants in one process, steps interleaved ---------------------------------


def _config(data: str, attention: str, args):
    from mt_dialog.training.config import (DataConfig, DialogTrainingConfig, ModelConfig,
                                           OptimConfig, ParallelConfig, TrainConfig)

    return DialogTrainingConfig(
        ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                    num_attention_heads=args.heads, packed_attention=attention,
                    transformer_impl="local"),
        ParallelConfig(),
        DataConfig(data_path=[data], micro_batch_size=args.micro_batch_size,
                   global_batch_size=args.micro_batch_size * args.micro_batches,
                   loss_normalization="turn"),
        OptimConfig(lr=3e-4),
        TrainConfig(train_epochs=1.0, seed=1234, log_interval=10 ** 9),
    )


def worker(args) -> int:
    """Build one run per variant (same seed: same initial weights) and step them round-robin,
    one ``loop.train_step`` each per round, so that a change in machine load hits all variants
    alike. A variant stops after its epoch, or once ``--seconds`` of measured steps (and at
    least ``--min-steps``) are done."""
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    common.quiet_warnings()
    import numpy as np
    import torch
    from megatron.core import tensor_parallel

    import pretrain_dialog
    from mt_dialog.training import distributed, loop
    from mt_dialog.training.checkpoint import StartPoint
    from mt_dialog.training.data import inspect_datasets, open_datasets

    with open(args.plan, encoding="utf-8") as handle:
        plan = json.load(handle)  # [[key, data prefix, attention], ...]
    distributed.initialize(1, 1, None, 1234)
    runs, state = {}, {}
    for key, data, attention in plan:
        config = _config(data, attention, args)
        info = inspect_datasets(config)
        torch.manual_seed(config.train.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)
        runs[key] = loop._setup(config, info, open_datasets(config, info), StartPoint(None, False),
                                pretrain_dialog.make_forward_step("turn"), 1)
        state[key] = {"times": [], "losses": [], "measured": 0.0, "done": False}
    while not all(s["done"] for s in state.values()):
        for key, run in runs.items():
            s = state[key]
            if s["done"]:
                continue
            start = common.wall()
            metrics = loop.train_step(run)
            elapsed = common.wall() - start
            s["times"].append(elapsed)
            s["losses"].append(metrics["loss per turn"])
            step = len(s["times"])
            if step > WARMUP:
                s["measured"] += elapsed
            s["done"] = step == run.train_iters or (
                s["measured"] >= args.seconds and step - WARMUP >= args.min_steps)
    results = {}
    for key, run in runs.items():
        s = state[key]
        timed = s["times"][WARMUP:] if len(s["times"]) > WARMUP else s["times"]
        results[key] = {
            "variant": key, "steps_per_epoch": run.train_iters, "steps_run": len(s["times"]),
            "warmup_steps": min(WARMUP, len(s["times"])), "step_seconds": s["times"],
            "step": common.stats(timed), "loss_per_turn_first": s["losses"][0],
            "loss_per_turn_last": s["losses"][-1], "samples_per_step": run.global_batch,
            "threads": torch.get_num_threads(), "full_epoch": len(s["times"]) == run.train_iters,
            "finite": bool(np.isfinite(s["losses"]).all())}
    with open(args.out, "w", encoding="utf-8") as handle:
        json.dump(results, handle)
    distributed.destroy()
    return 0


def run_variants(plan, args, out: str) -> dict:
    """Run ``plan`` ([(key, prefix, attention)]) in one worker process; results by key."""
    plan_path = out + ".plan.json"
    with open(plan_path, "w", encoding="utf-8") as handle:
        json.dump([list(p) for p in plan], handle)
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--plan", plan_path,
               "--out", out, "--seconds", str(args.seconds_per_variant),
               "--min-steps", str(args.min_steps),
               "--micro-batch-size", str(args.micro_batch_size),
               "--micro-batches", str(args.micro_batches), "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--heads", str(args.heads),
               "--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    start = common.wall()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"training worker failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    with open(out, encoding="utf-8") as handle:
        results = json.load(handle)
    for result in results.values():
        result["process_seconds"] = common.wall() - start
    return results


# -- main ------------------------------------------------------------------------------------


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small corpus, short")
    parser.add_argument("--conversations", type=int, help="corpus size (default 1000; quick 120)")
    parser.add_argument("--seq-length", type=int, help="tokens per sequence (default 4096; "
                        "quick 1024)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--seconds-per-variant", type=float, help="measuring budget per variant "
                        "after warm-up (default 100; quick 6)")
    parser.add_argument("--min-steps", type=int, default=3)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    n = args.conversations or (120 if args.quick else 1000)
    seq = args.seq_length or (1024 if args.quick else 4096)
    if args.seconds_per_variant is None:
        args.seconds_per_variant = 6.0 if args.quick else 100.0

    info = common.machine_info()
    print(common.header("training throughput benchmark", info, args.quick), flush=True)
    from synthetic_corpus import prepare

    work = os.path.join(common.WORK_DIR, "training")
    corpus, tokenizer = prepare(work, n, args.seed)
    prefixes = {"packed": os.path.join(work, f"packed_n{n}_s{seq}"),
                "padded": os.path.join(work, f"padded_n{n}_s{seq}"),
                "split": os.path.join(work, f"split_n{n}_s{seq}")}
    start = common.wall()
    preprocess(corpus, tokenizer, prefixes["packed"], seq, "bfd")
    preprocess(corpus, tokenizer, prefixes["padded"], seq, "none")
    derive_split_per_turn(prefixes["padded"], prefixes["split"])
    print(f"datasets built in {common.wall() - start:.1f} s ({n:,} conversations, seq {seq})",
          flush=True)

    from mt_dialog.data.storage import read_metadata
    from mt_dialog.training.config import ModelConfig
    from mt_dialog.training.model import padded_vocab_size

    vocab = int(read_metadata(prefixes["packed"])["tokenizer"]["vocab_size"])
    model = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
             "ffn": ModelConfig(hidden_size=args.hidden, num_attention_heads=args.heads).ffn_hidden_size,
             "vocab": vocab, "vocab_padded": padded_vocab_size(vocab, 128, 1)}
    figures = {k: dataset_figures(prefixes[v["data"]], v["attention"], model)
               for k, v in VARIANTS.items()}
    loss_tokens = {k: f["loss_tokens"] for k, f in figures.items()}
    turns = {k: f["turns"] for k, f in figures.items()}
    if len(set(loss_tokens.values())) != 1 or len(set(turns.values())) != 1:
        raise SystemExit(f"the variants do not train the same turns: {loss_tokens} {turns}")

    print(f"training {', '.join(VARIANTS[k]['label'] for k in args.variants)}, steps "
          f"interleaved, up to {args.seconds_per_variant:.0f} s of measured steps each ...",
          flush=True)
    plan = [(k, prefixes[VARIANTS[k]["data"]], VARIANTS[k]["attention"]) for k in args.variants]
    results = run_variants(plan, args, os.path.join(work, "result.json"))
    for key in args.variants:
        r = results[key]
        r["epoch_seconds"] = r["steps_per_epoch"] * r["step"]["mean"]
        r["epoch_seconds_sem"] = r["steps_per_epoch"] * r["step"]["sem"]
        r["loss_tokens_per_second"] = figures[key]["loss_tokens"] / r["epoch_seconds"]
        print(f"  {key}: {r['steps_run']} of {r['steps_per_epoch']} steps run, "
              f"{r['step']['mean']:.3f} s/step -> epoch {r['epoch_seconds']:.1f} s, loss/turn "
              f"{r['loss_per_turn_first']:.3f} -> {r['loss_per_turn_last']:.3f}", flush=True)

    rows = []
    ours = results.get("c")
    for key, r in results.items():
        f = figures[key]
        measured = r["steps_run"] - r["warmup_steps"]
        speedup = (r["epoch_seconds"] / ours["epoch_seconds"]) if ours else float("nan")
        predicted = (f["model_flops"] / figures["c"]["model_flops"])
        rows.append([
            VARIANTS[key]["label"], f"{f['packs']:,}", f"{r['steps_per_epoch']:,}",
            f"{measured} ({100 * measured / r['steps_per_epoch']:.0f}%)",
            f"{r['step']['mean']:.3f} s", common.fmt_seconds(r["epoch_seconds"]),
            f"{r['loss_tokens_per_second']:,.0f}", f"{100 * f['padding_share_slots']:.1f}%",
            f"{100 * f['padding_share_flops']:.1f}%", f"{predicted:.2f}x",
            f"{speedup:.2f}x" if key != "c" else "1.00x"])
    table = common.format_table(
        ["variant", "sequences", "steps/epoch", "steps measured", "step time", "epoch time",
         "loss tokens/s", "padding (slots)", "padding (FLOPs)", "FLOPs vs (c)",
         "(c) is faster by"], rows)
    print()
    print(f"corpus: {n:,} ShareGPT-like conversations, {figures['c']['turns']:,} assistant turns, "
          f"{figures['c']['tokens']:,} tokens ({figures['c']['loss_tokens']:,} loss tokens); seq "
          f"{seq} x micro-batch {args.micro_batch_size}, {args.micro_batches} micro-batches/step;"
          f" model {args.layers} layers, hidden {args.hidden}, {args.heads} heads, vocab "
          f"{model['vocab_padded']}; {args.threads} thread(s) per process")
    print(table)
    target_lines = []
    for key, goal in TARGETS.items():
        if ours and key in results:
            value = results[key]["epoch_seconds"] / ours["epoch_seconds"]
            verdict = "MET" if value >= goal else f"MISSED by {goal / value:.2f}x"
            target_lines.append(f"target (c) >= {goal:.0f}x faster than ({key}): {value:.2f}x "
                                f"{verdict}")
    if args.quick:
        target_lines = [f"[quick run: seq {seq}, {n} conversations, not the benchmark setting] "
                        + line for line in target_lines]
    for line in target_lines:
        print(line)
    paths = common.result_paths("training", args.quick)
    common.write_json(paths["json"], {
        "benchmark": "training", "quick": args.quick, "machine": info,
        "command": "python benchmarks/bench_training.py" + (" --quick" if args.quick else ""),
        "settings": {"conversations": n, "seq_length": seq,
                     "micro_batch_size": args.micro_batch_size,
                     "micro_batches_per_step": args.micro_batches,
                     "seconds_per_variant": args.seconds_per_variant, "warmup_steps": WARMUP,
                     "threads": args.threads, "model": model, "loss_normalization": "turn",
                     "tokenizer": "synthetic SentencePiece BPE (benchmarks/synthetic_corpus.py)"},
        "datasets": figures, "variants": {k: {**VARIANTS[k], **results[k]} for k in results},
        "targets": target_lines, "table": table})
    plot(results, figures, paths["png"], info, f"{n:,} conversations, seq {seq}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def plot(results, figures, path, info, subtitle):
    plt = common.pyplot()
    if plt is None:
        return
    keys = list(results)
    labels = [VARIANTS[k]["label"].replace(", ", ",\n", 1) for k in keys]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(14, 4.6))
    epoch = [results[k]["epoch_seconds"] for k in keys]
    err = [results[k]["epoch_seconds_sem"] for k in keys]
    colors = ["C3", "C1", "C0", "C2"][: len(keys)]
    left.bar(labels, epoch, yerr=err, color=colors)
    left.set_ylabel("seconds per epoch")
    left.set_title(f"one epoch ({subtitle})")
    mid.bar(labels, [results[k]["loss_tokens_per_second"] for k in keys], color=colors)
    mid.set_ylabel("loss tokens / s")
    mid.set_title("useful throughput")
    right.bar(labels, [100 * figures[k]["padding_share_slots"] for k in keys], color=colors,
              label="token slots")
    right.plot(labels, [100 * figures[k]["padding_share_flops"] for k in keys], "ko",
               label="model FLOPs")
    right.set_ylabel("% spent on padding")
    right.set_ylim(0, 100)
    right.legend(fontsize=8)
    right.set_title("padding")
    for axis in (left, mid, right):
        axis.tick_params(axis="x", labelsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path, info)


if __name__ == "__main__":
    sys.exit(main())
