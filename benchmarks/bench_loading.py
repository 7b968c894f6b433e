#!/usr/bin/env python
"""Data loading: packs/s of random access to the packed dataset, against the training step time.

For each sequence length, a packed dataset of the ShareGPT-like corpus (``synthetic_corpus.py``,
``tools/preprocess_dialog.py --packing bfd``) is read at seeded random pack indices:

  getitem      ``PackedDialogDataset.__getitem__`` (memory-mapped read + padding + labels,
               loss fields, position ids, cu_seqlens)
  micro-batch  what ``loop.train_step`` does per micro-batch before the model runs:
               ``SampleStream.__getitem__`` for each pack + ``flatten_micro_batch`` (isolated)

and the training step of the tiny CPU model of ``bench_training.py`` on the same dataset
(variant (c), run in its own process; loading is part of that step: ``loop.train_step`` reads its
micro-batches synchronously). "share of step" = loading time per step / step time. The dataset
files are in the page cache (they were just written): this is the steady state of an epoch.

    python benchmarks/bench_loading.py           # full run (~3 min)
    python benchmarks/bench_loading.py --quick   # smoke run

Target: loading is never the bottleneck (a small share of the step time).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402


def time_access(prefix: str, accesses: int, micro_batch: int, seed: int) -> dict:
    import numpy as np
    import torch

    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.training.data import SampleStream, flatten_micro_batch

    dataset = PackedDialogDataset(prefix, "train")
    rng = np.random.default_rng(seed)
    order = rng.integers(0, len(dataset), accesses).tolist()
    for index in order[:50]:  # warm-up
        dataset[index]
    start = common.wall()
    for index in order:
        dataset[index]
    getitem = (common.wall() - start) / accesses

    stream = SampleStream([dataset], [1.0], seed)
    cpu = torch.device("cpu")
    steps = max(1, accesses // micro_batch)
    start = common.wall()
    for step in range(steps):
        flatten_micro_batch([stream[step * micro_batch + j] for j in range(micro_batch)], True, cpu)
    per_micro_batch = (common.wall() - start) / steps
    return {"packs": len(dataset), "seq_length": dataset.seq_length, "accesses": accesses,
            "getitem_seconds": getitem, "getitem_packs_per_second": 1.0 / getitem,
            "micro_batch_size": micro_batch, "micro_batch_seconds": per_micro_batch,
            "micro_batch_packs_per_second": micro_batch / per_micro_batch}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run")
    parser.add_argument("--conversations", type=int, help="corpus size (default 4000; quick 300)")
    parser.add_argument("--seq-lengths", type=int, nargs="+",
                        help="default 2048 4096 8192; quick 2048")
    parser.add_argument("--accesses", type=int, help="random reads per measurement (default "
                        "5000; quick 500)")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--train-seconds", type=float, help="training measurement per seq length "
                        "(default 30; quick 6)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n = args.conversations or (300 if args.quick else 4000)
    seqs = args.seq_lengths or ([2048] if args.quick else [2048, 4096, 8192])
    accesses = args.accesses or (500 if args.quick else 5000)
    train_seconds = args.train_seconds or (6.0 if args.quick else 30.0)
    info = common.machine_info()
    print(common.header("data loading benchmark", info, args.quick), flush=True)
    common.quiet_warnings()

    import bench_training
    from synthetic_corpus import prepare

    work = os.path.join(common.WORK_DIR, "loading")
    corpus, tokenizer = prepare(work, n, args.seed)
    records, rows = [], []
    for seq in seqs:
        prefix = os.path.join(work, f"packed_n{n}_s{seq}")
        bench_training.preprocess(corpus, tokenizer, prefix, seq, "bfd")
        access = time_access(prefix, accesses, args.micro_batch_size, args.seed)
        print(f"seq {seq}: {access['getitem_packs_per_second']:,.0f} packs/s (getitem); "
              f"training ...", flush=True)
        train_args = argparse.Namespace(
            seconds_per_variant=train_seconds, min_steps=3,
            micro_batch_size=args.micro_batch_size, micro_batches=args.micro_batches,
            layers=2, hidden=64, heads=4, threads=1)
        step = bench_training.run_variants([("c", prefix, "isolated")], train_args,
                                           os.path.join(work, f"train_s{seq}.json"))["c"]
        step_seconds = step["step"]["mean"]
        load_per_step = access["micro_batch_seconds"] * args.micro_batches
        record = {**access, "step_seconds": step_seconds,
                  "train_packs_per_second": step["samples_per_step"] / step_seconds,
                  "load_seconds_per_step": load_per_step,
                  "load_share_of_step": load_per_step / step_seconds,
                  "headroom": (access["micro_batch_packs_per_second"]
                               / (step["samples_per_step"] / step_seconds))}
        records.append(record)
        rows.append([seq, f"{record['packs']:,}",
                     f"{access['getitem_packs_per_second']:,.0f}",
                     f"{1e6 * access['getitem_seconds']:,.0f} us",
                     f"{access['micro_batch_packs_per_second']:,.0f}",
                     f"{record['train_packs_per_second']:,.1f}",
                     f"{step_seconds:.3f} s", f"{1000 * load_per_step:.2f} ms",
                     f"{100 * record['load_share_of_step']:.2f}%",
                     f"{record['headroom']:,.0f}x"])
    table = common.format_table(
        ["seq", "packs", "getitem packs/s", "per pack", "micro-batch packs/s",
         "training packs/s", "step time", "loading per step", "share of step",
         "loading headroom"], rows)
    print()
    print(f"{n:,} conversations; micro-batch {args.micro_batch_size} x {args.micro_batches} per "
          "step; tiny model (2 layers, hidden 64) on CPU, 1 thread")
    print(table)
    worst = max(r["load_share_of_step"] for r in records)
    verdict = (f"target loading never the bottleneck: at most {100 * worst:.2f}% of a step "
               f"({'MET' if worst < 0.05 else 'CHECK'}); a GPU step that is "
               f"{min(r['headroom'] for r in records):,.0f}x faster than this CPU step would make "
               "loading as long as the step (it runs synchronously in train_step)")
    print(verdict)
    paths = common.result_paths("loading", args.quick)
    common.write_json(paths["json"], {
        "benchmark": "loading", "quick": args.quick, "machine": info,
        "command": "python benchmarks/bench_loading.py" + (" --quick" if args.quick else ""),
        "conversations": n, "results": records, "targets": [verdict], "table": table})
    plot(records, paths["png"], info)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def plot(records, path, info):
    plt = common.pyplot()
    if plt is None:
        return
    fig, axis = plt.subplots(figsize=(7, 4.4))
    labels = [str(r["seq_length"]) for r in records]
    x = range(len(records))
    width = 0.27
    axis.bar([i - width for i in x], [r["getitem_packs_per_second"] for r in records], width,
             label="getitem")
    axis.bar(list(x), [r["micro_batch_packs_per_second"] for r in records], width,
             label="stream + flatten_micro_batch")
    axis.bar([i + width for i in x], [r["train_packs_per_second"] for r in records], width,
             label="training (tiny CPU model)")
    axis.set_xticks(list(x))
    axis.set_xticklabels(labels)
    axis.set_yscale("log")
    axis.set_xlabel("sequence length")
    axis.set_ylabel("packs / s (log)")
    axis.set_title("random-access loading vs training")
    axis.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path, info)


if __name__ == "__main__":
    sys.exit(main())
