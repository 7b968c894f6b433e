#!/usr/bin/env python
"""Preprocessing memory: peak anonymous memory of ``tools/preprocess_dialog.py`` as the input
grows, to show that inputs are streamed (RAM is O(conversations), not O(bytes of input)).

Each size of the ShareGPT-like corpus (``synthetic_corpus.py``) is preprocessed in a subprocess
(``--workers 2``); every 0.1 s the resident anonymous memory (``RssAnon`` in /proc, page cache of
memory-mapped files excluded) of the main process and of its child processes (2 tokenizer
workers, the writer process) is sampled. The baseline is a process that only imports what the
main process imports (mt_dialog's preprocessing, sentencepiece, numpy; torch and megatron-core
are imported by the writer process only). Growth per conversation = (peak main - baseline) /
conversations.

    python benchmarks/bench_memory.py           # full run (~4 min)
    python benchmarks/bench_memory.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import synthetic_corpus  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORK = os.path.join(ROOT, "benchmarks", "work", "memory")
BASELINE = ("import sys; sys.path.insert(0, %r); import mt_dialog.data.preprocess; "
            "import sentencepiece, time; time.sleep(1.5)" % ROOT)


def _rss_anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _children(pid: int) -> List[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def peak_memory(command: List[str]) -> Dict[str, float]:
    """Run ``command``; peak RssAnon (MiB) of the process and of the process plus children."""
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    main_peak = total_peak = 0
    start = time.perf_counter()
    while proc.poll() is None:
        main = _rss_anon_kb(proc.pid)
        total = main + sum(_rss_anon_kb(c) for c in _children(proc.pid))
        main_peak, total_peak = max(main_peak, main), max(total_peak, total)
        time.sleep(0.1)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {proc.stderr.read()[-2000:]}")
    return {"main_mib": main_peak / 1024, "total_mib": total_peak / 1024,
            "seconds": time.perf_counter() - start}


def run_size(n: int, seed: int) -> Dict[str, float]:
    corpus, tokenizer = synthetic_corpus.prepare(WORK, n, seed)
    prefix = os.path.join(WORK, f"packed_n{n}")
    command = [sys.executable, "tools/preprocess_dialog.py", "--input", corpus,
               "--tokenizer-model", tokenizer, "--template", "chatml", "--seq-length", "4096",
               "--overlong", "drop", "--workers", "2", "--output-prefix", prefix,
               "--overwrite", "--no-progress"]
    result = peak_memory(command)
    result.update(conversations=n, input_mib=os.path.getsize(corpus) / 2**20)
    return result


def plot(rows: List[Dict[str, float]], baseline: float, path: str, info) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    sizes = [r["input_mib"] for r in rows]
    ax.plot(sizes, [r["main_mib"] for r in rows], "o-", label="main process")
    ax.plot(sizes, [r["total_mib"] for r in rows], "s-", label="main + 2 workers + writer")
    ax.plot(sizes, sizes, ":", color="gray", label="input size (for scale)")
    ax.axhline(baseline, color="black", lw=0.8, label="baseline: imports only")
    ax.set_xlabel("input JSONL (MiB)")
    ax.set_ylabel("peak anonymous memory (MiB)")
    ax.set_title("preprocess_dialog.py memory vs input size")
    ax.legend()
    common.save_figure(fig, path, info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--sizes", type=int, nargs="+", help="numbers of conversations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    sizes = args.sizes or ([1000, 4000] if args.quick else [5000, 20000, 60000])
    info = common.machine_info()
    print(common.header("preprocessing memory", info, args.quick))
    baseline = peak_memory([sys.executable, "-c", BASELINE])["main_mib"]
    rows = [run_size(n, args.seed) for n in sizes]
    table = [[common.fmt_int(r["conversations"]), f"{r['input_mib']:.0f}", f"{r['main_mib']:.0f}",
              f"{r['total_mib']:.0f}", f"{1024 * (r['main_mib'] - baseline) / r['conversations']:.2f}",
              common.fmt_seconds(r["seconds"])] for r in rows]
    print(f"baseline (imports only): {baseline:.0f} MiB")
    print(common.format_table(["conversations", "input MiB", "peak main MiB", "peak + children MiB",
                               "main KiB/conversation over baseline", "wall"], table))
    paths = common.result_paths("memory", args.quick)
    common.write_json(paths["json"], {"benchmark": "memory", "quick": args.quick, "machine": info,
                                      "baseline_mib": baseline, "rows": rows})
    plot(rows, baseline, paths["png"], info)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
