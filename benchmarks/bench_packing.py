#!/usr/bin/env python
"""Packing: efficiency (real tokens / pack slots) and time of every algorithm of
``mt_dialog.data.packing`` for 10k, 100k and 1M conversations at sequence lengths 2048, 4096, 8192.

Lengths are the rendered token lengths of ShareGPT-like conversations
(``synthetic_corpus.sample_lengths``: the corpus model of the other benchmarks, ChatML overhead
included), truncated to whole turns that fit like ``--overlong truncate``. Each call
``pack(lengths, seq_length, algorithm)`` is timed with ``time.perf_counter`` in this process pinned
to one core (median of several repeats for the smaller sizes). "bound" is the best efficiency any
packer could reach: total / (ceil(total / seq_length) x seq_length).

    python benchmarks/bench_packing.py            # full table (~1 min on one core)
    python benchmarks/bench_packing.py --quick    # smoke run (10k and 50k conversations)

Targets (best-fit decreasing): >= 99% efficiency at 4096 from 10k conversations; 1M conversations
packed in < 10 s on one core.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

import common  # noqa: E402
from synthetic_corpus import sample_lengths  # noqa: E402

from mt_dialog.data.packing import ALGORITHMS, pack, packing_efficiency  # noqa: E402

TARGET_EFFICIENCY = 0.99
TARGET_SECONDS_1M = 10.0


def repeats_for(n: int) -> int:
    return 5 if n <= 20_000 else 3 if n <= 200_000 else 1


def time_pack(lengths: np.ndarray, seq: int, algorithm: str, repeats: int):
    times, packs = [], None
    for _ in range(repeats):
        gc.collect()
        start = common.wall()
        packs = pack(lengths, seq, algorithm)
        times.append(common.wall() - start)
    return float(np.median(times)), packs


def remap_cost(lengths: np.ndarray, packs) -> float:
    """Time of the index remapping ``preprocess._write_split`` does after ``pack()``
    (``preprocess.to_stage_indices``)."""
    from mt_dialog.data.preprocess import to_stage_indices

    indices = np.arange(lengths.shape[0], dtype=np.int64)
    start = common.wall()
    to_stage_indices(indices, packs)
    return common.wall() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of conversations")
    parser.add_argument("--seq-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS), choices=ALGORITHMS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([10_000, 50_000] if args.quick else [10_000, 100_000, 1_000_000])
    info = common.machine_info()
    info["pinned_core"] = common.pin_to_one_core()
    print(common.header("packing benchmark", info, args.quick), flush=True)
    pack(sample_lengths(1000, 4096, args.seed), 4096, "bfd")  # warm-up (imports, caches)

    rows, records = [], []
    for n in sizes:
        for seq in args.seq_lengths:
            lengths = sample_lengths(n, seq, args.seed)
            total = int(lengths.sum())
            bound = total / (math.ceil(total / seq) * seq)
            for algorithm in args.algorithms:
                seconds, packs = time_pack(lengths, seq, algorithm, repeats_for(n))
                eff = packing_efficiency(lengths, packs, seq)
                record = {"conversations": n, "kept": int(lengths.shape[0]), "seq_length": seq,
                          "algorithm": algorithm, "packs": len(packs), "tokens": total,
                          "efficiency": eff, "bound": bound, "seconds": seconds,
                          "conversations_per_second": lengths.shape[0] / seconds,
                          "repeats": repeats_for(n)}
                if algorithm == "bfd" and n == max(sizes) and seq == 4096:
                    record["preprocess_remap_seconds"] = remap_cost(lengths, packs)
                records.append(record)
                rows.append([f"{n:,}", seq, algorithm, f"{len(packs):,}", f"{100 * eff:.2f}%",
                             f"{100 * bound:.2f}%", common.fmt_seconds(seconds),
                             f"{lengths.shape[0] / seconds:,.0f}"])
                print(f"  {n:>9,} x {seq}  {algorithm:<10} {100 * eff:6.2f}%  "
                      f"{common.fmt_seconds(seconds)}", flush=True)
                del packs
    table = common.format_table(
        ["conversations", "seq", "algorithm", "packs", "efficiency", "bound", "time",
         "conv/s"], rows)
    print()
    print(table)

    targets = check_targets(records, sizes)
    for line in targets["lines"]:
        print(line)
    remap = [r for r in records if "preprocess_remap_seconds" in r]
    if remap:
        r = remap[0]
        print(f"note: preprocess.to_stage_indices (the remap after pack() in _write_split): "
              f"{common.fmt_seconds(r['preprocess_remap_seconds'])} for "
              f"{r['kept']:,} conversations (pack itself: {common.fmt_seconds(r['seconds'])})")

    paths = common.result_paths("packing", args.quick)
    common.write_json(paths["json"], {
        "benchmark": "packing", "quick": args.quick, "machine": info,
        "command": "python benchmarks/bench_packing.py" + (" --quick" if args.quick else ""),
        "length_model": "synthetic_corpus.sample_lengths (ShareGPT-like, ChatML overhead)",
        "results": records, "targets": targets, "table": table})
    plot(records, paths["png"], info)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def check_targets(records, sizes):
    lines, out = [], {}
    eff = [r for r in records if r["algorithm"] == "bfd" and r["seq_length"] == 4096
           and r["conversations"] == 10_000]
    if eff:
        value = eff[0]["efficiency"]
        out["bfd_efficiency_10k_4096"] = value
        ok = value >= TARGET_EFFICIENCY
        lines.append(f"target bfd efficiency at 4096 from 10k >= 99%: {100 * value:.2f}% "
                     f"{'MET' if ok else 'MISSED by %.2f points' % (100 * (TARGET_EFFICIENCY - value))}")
    big = [r for r in records if r["algorithm"] == "bfd" and r["conversations"] == 1_000_000]
    if big:
        worst = max(r["seconds"] for r in big)
        out["bfd_seconds_1M_worst"] = worst
        ok = worst < TARGET_SECONDS_1M
        lines.append(f"target bfd 1M conversations < 10 s on one core: worst {worst:.2f} s over "
                     f"seq lengths {'MET' if ok else 'MISSED (%.1fx over)' % (worst / 10)}")
    else:
        lines.append("target bfd 1M < 10 s: not measured in this run (sizes "
                     f"{', '.join(f'{s:,}' for s in sizes)})")
    out["lines"] = lines
    return out


def plot(records, path, info):
    plt = common.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    colors = {"bfd": "C0", "ffd": "C1", "sequential": "C2", "none": "C3"}
    styles = {2048: ":", 4096: "-", 8192: "--"}
    for algorithm in colors:
        for seq, style in styles.items():
            rs = sorted((r for r in records if r["algorithm"] == algorithm
                         and r["seq_length"] == seq), key=lambda r: r["conversations"])
            if not rs:
                continue
            x = [r["conversations"] for r in rs]
            left.plot(x, [100 * r["efficiency"] for r in rs], style, marker="o",
                      color=colors[algorithm], label=f"{algorithm} {seq}")
            right.plot(x, [r["seconds"] for r in rs], style, marker="o",
                       color=colors[algorithm], label=f"{algorithm} {seq}")
    left.set_xscale("log")
    left.set_xlabel("conversations")
    left.set_ylabel("packing efficiency (%)")
    left.axhline(99, color="0.5", lw=0.8)
    left.set_title("efficiency (real / slots)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.axhline(10, color="0.5", lw=0.8)
    right.set_xlabel("conversations")
    right.set_ylabel("seconds (one core)")
    right.set_title("packing time")
    right.legend(fontsize=6, ncol=2)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path, info)


if __name__ == "__main__":
    sys.exit(main())
