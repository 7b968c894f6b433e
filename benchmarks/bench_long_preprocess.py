#!/usr/bin/env python
"""Long-context preprocessing: peak memory, time and tokens/s of ``tools/preprocess_dialog.py
--seq-length 131072`` on agent-like conversations of 8k-100k tokens, for corpora of 1x, 2x and 4x
the base size, then ``tools/inspect_dialog_dataset.py --verify`` on each size's output.

The corpus (seeded, ``agent_corpus``): each conversation draws a target length log-uniform in
8,000..100,000 tokens; it is a system message offering three tools (JSON schemas), a user task
(LogNormal median 150 tokens), then tool-use steps until the target is reached: an assistant
message (LogNormal median 40 tokens of content) with one tool call (a JSON query of ~20 tokens),
and that tool's result (LogNormal median 3,000 tokens, 200..20,000: file contents, search
results, logs), and a final assistant answer (LogNormal median 300 tokens). Text comes from
``synthetic_corpus.TextMaker`` with its 2,000-piece SentencePiece model, ``--template chatml``
(Hermes tool calls). A larger corpus is the smaller one followed by more conversations of the
same stream (the 2x file starts with the 1x file).

Each run is the real CLI in a fresh interpreter (this script's ``--run-tool`` mode: it calls the
tool's ``main``, then reports ``getrusage``): ``--seq-length 131072 --packing bfd --workers W
--no-progress``. Memory columns:
  peak RSS main      ``ru_maxrss`` of the main process (reads, accounts, packs; with
                     ``--workers 1`` it also renders and tokenizes)
  peak RSS child     ``ru_maxrss`` over its finished children: the largest single one of the
                     tokenizer workers (``--workers`` > 1) and the writer process, which holds
                     torch + megatron-core and copies the packs into the ``.bin/.idx``
  peak anon total    every 0.05 s the anonymous resident memory (``RssAnon``: page cache of
                     memory-mapped files left out) of the tool and all its descendants is summed;
                     the largest sum
``ru_maxrss`` counts the file pages a process has mapped and touched as well as its own memory;
the sampled anonymous total is what the processes hold together at one moment.

    python benchmarks/bench_long_preprocess.py            # full run (~3 min on 2 cores)
    python benchmarks/bench_long_preprocess.py --quick    # smoke run (tiny sizes, ~1 min)

Target (issue 21): peak memory flat in corpus size (growth from 1x to 4x well under the growth of
the corpus), ``--verify`` OK on every output.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Sequence

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
import synthetic_corpus  # noqa: E402

SEQ_LENGTH = 131072
GENERATOR_VERSION = 1
TOOLS = (
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the repository",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                       "required": ["path"]}}},
    {"type": "function", "function": {
        "name": "search", "description": "Search the code base and the web",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                       "required": ["query"]}}},
    {"type": "function", "function": {
        "name": "run", "description": "Run a shell command and return its output",
        "parameters": {"type": "object", "properties": {"command": {"type": "string"}},
                       "required": ["command"]}}},
)
ARGUMENT = {"read_file": "path", "search": "query", "run": "command"}


def _draw(rng, median: float, sigma: float, low: int, high: int) -> int:
    return int(np.clip(np.ceil(rng.lognormal(np.log(median), sigma)), low, high))


def agent_conversation(rng, maker, low: int, high: int) -> Dict:
    """One agent-like record (OpenAI ``messages`` with ``tools``, ``tool_calls`` and ``tool``
    results) of about log-uniform(``low``, ``high``) content tokens."""
    target = int(np.exp(rng.uniform(np.log(low), np.log(high))))
    messages = [{"role": "system", "content": maker.text(_draw(rng, 60, 0.5, 10, 400))},
                {"role": "user", "content": maker.text(_draw(rng, 150, 0.8, 5, 2000))}]
    used, step = 0, 0
    while used < target:
        name = TOOLS[int(rng.integers(len(TOOLS)))]["function"]["name"]
        output = min(_draw(rng, 3000, 0.9, 200, 20000), max(200, target - used))
        call = {"id": f"call_{step}", "type": "function", "function": {
            "name": name, "arguments": json.dumps({ARGUMENT[name]: maker.text(20)})}}
        messages.append({"role": "assistant", "content": maker.text(_draw(rng, 40, 0.7, 1, 400)),
                         "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"call_{step}", "name": name,
                         "content": maker.text(output)})
        used, step = used + output + 60, step + 1
    messages.append({"role": "assistant", "content": maker.text(_draw(rng, 300, 0.8, 5, 3000))})
    return {"tools": list(TOOLS), "messages": messages}


def agent_corpus(work: str, n: int, seed: int, low: int = 8000, high: int = 100000) -> Dict:
    """``{"tokenizer": model, "files": {count: jsonl}}``: the first ``count`` conversations of one
    seeded stream, for ``count`` in n, 2n, 4n (reused when made with the same parameters)."""
    os.makedirs(work, exist_ok=True)
    tokenizer = os.path.join(work, "synthetic_tokenizer.model")
    counts = (n, 2 * n, 4 * n)
    files = {c: os.path.join(work, f"agent_n{c}_seed{seed}_{low}-{high}.jsonl") for c in counts}
    sidecar = files[4 * n] + ".params.json"
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "low": low, "high": high,
              "tools": list(TOOLS), "vocab_size": synthetic_corpus.VOCAB_SIZE}
    if not (common.made_with(sidecar, params) and all(map(os.path.isfile, files.values()))
            and os.path.isfile(tokenizer)):
        if not os.path.isfile(tokenizer):
            synthetic_corpus.train_tokenizer(tokenizer)
        rng = np.random.default_rng(seed)
        maker = synthetic_corpus.TextMaker(tokenizer, seed + 1)
        handles = {c: open(path + ".tmp", "w", encoding="utf-8") for c, path in files.items()}
        for index in range(4 * n):
            line = json.dumps(agent_conversation(rng, maker, low, high)) + "\n"
            for count, handle in handles.items():
                if index < count:
                    handle.write(line)
        for count, handle in handles.items():
            handle.close()
            os.replace(files[count] + ".tmp", files[count])
        common.record_made_with(sidecar, params)
    return {"tokenizer": tokenizer, "files": files}


# -- measuring one run ---------------------------------------------------------------------------


def tool_main(argv: Sequence[str]) -> int:
    """``--run-tool ARGS``: ``tools/preprocess_dialog.py ARGS`` in this process, then one JSON
    line with ``ru_maxrss`` (KiB on Linux) of this process and of its largest finished child."""
    import contextlib
    import io
    import resource

    sys.path.insert(0, os.path.join(common.REPO, "tools"))
    import preprocess_dialog

    with contextlib.redirect_stdout(io.StringIO()):
        code = preprocess_dialog.main(list(argv))
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"code": code, "main_maxrss_kib": own.ru_maxrss,
                      "child_maxrss_kib": children.ru_maxrss,
                      "main_cpu_seconds": own.ru_utime + own.ru_stime,
                      "children_cpu_seconds": children.ru_utime + children.ru_stime}))
    return code


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(key):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _descendants(pid: int) -> List[int]:
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            with open(f"/proc/{parent}/task/{parent}/children", encoding="ascii") as handle:
                kids = [int(p) for p in handle.read().split()]
        except OSError:
            kids = []
        found += kids
        todo += kids
    return found


def run_measured(command: List[str]) -> Dict:
    """Run ``command``; its last stdout line (JSON) plus the peak sampled ``RssAnon`` sum of it
    and its descendants (MiB) and the wall time."""
    start = common.wall()
    proc = subprocess.Popen(command, cwd=common.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        pids = [proc.pid, *_descendants(proc.pid)]
        peak = max(peak, sum(_status_kib(p, "RssAnon:") for p in pids))
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = common.wall() - start
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{out[-3000:]}\n{err[-3000:]}")
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {**result, "anon_total_mib": peak / 1024, "wall_seconds": wall}


def preprocess(corpus: str, tokenizer: str, workers: int, prefix: str) -> Dict:
    command = [sys.executable, os.path.abspath(__file__), "--run-tool", "--input", corpus,
               "--tokenizer-model", tokenizer, "--template", "chatml",
               "--seq-length", str(SEQ_LENGTH), "--packing", "bfd", "--workers", str(workers),
               "--output-prefix", prefix, "--overwrite", "--no-progress"]
    result = run_measured(command)
    with open(prefix + ".meta.json", encoding="utf-8") as handle:
        summary = json.load(handle)["summary"]
    splits = summary["splits"].values()
    result.update(conversations=summary["conversations_kept"],
                  tokens=sum(s["tokens"] for s in splits), packs=sum(s["packs"] for s in splits),
                  seconds=summary["elapsed_seconds"],
                  input_mib=os.path.getsize(corpus) / 2**20)
    result["tokens_per_second"] = result["tokens"] / max(result["seconds"], 1e-9)
    return result


def verify(prefix: str) -> Dict:
    """``tools/inspect_dialog_dataset.py PREFIX --verify`` in a fresh interpreter (its peak
    sampled anonymous memory and wall time beside the verdict)."""
    command = [sys.executable, os.path.join(common.REPO, "tools", "inspect_dialog_dataset.py"),
               prefix, "--verify"]
    start = common.wall()
    proc = subprocess.Popen(command, cwd=common.REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, _status_kib(proc.pid, "RssAnon:"))
        time.sleep(0.05)
    out, err = proc.communicate()
    return {"ok": proc.returncode == 0 and "verify: OK" in out, "output": (out + err)[-2000:],
            "anon_mib": peak / 1024, "seconds": common.wall() - start}


# -- the run -------------------------------------------------------------------------------------


def measure(corpus: Dict, workers_list: Sequence[int], work: str) -> List[Dict]:
    """For each worker count, every corpus size in turn; ``--verify`` once per size, after the
    last worker count (the output's bytes do not depend on the workers)."""
    rows = []
    for workers in workers_list:
        for count, path in corpus["files"].items():
            prefix = os.path.join(work, f"long_n{count}")
            row = preprocess(path, corpus["tokenizer"], workers, prefix)
            row.update(workers=workers, size=count)
            if workers == workers_list[-1]:
                row["verify"] = verify(prefix)
            rows.append(row)
            print(f"  {count} conversations, {workers} worker(s): {row['seconds']:.1f} s",
                  file=sys.stderr)
    return rows


def table(rows: List[Dict], base: int) -> str:
    body = []
    for r in rows:
        check = r.get("verify")
        body.append([
            f"{r['size'] // base}x", common.fmt_int(r["conversations"]),
            common.fmt_int(r["tokens"]), f"{r['input_mib']:.0f}", r["workers"], common.fmt_int(r["packs"]),
            common.fmt_seconds(r["seconds"]), common.fmt_int(r["tokens_per_second"]),
            f"{r['main_maxrss_kib'] / 1024:.0f}", f"{r['child_maxrss_kib'] / 1024:.0f}",
            f"{r['anon_total_mib']:.0f}",
            "-" if check is None else ("OK" if check["ok"] else "FAILED")
            + f" ({check['anon_mib']:.0f} MiB, {common.fmt_seconds(check['seconds'])})"])
    return common.format_table(
        ["corpus", "conversations", "tokens", "input MiB", "workers", "packs", "time", "tokens/s",
         "peak RSS main MiB", "peak RSS child MiB", "peak anon total MiB",
         "--verify (anon, time)"], body)


def growth(rows: List[Dict]) -> Dict[str, Dict[str, float]]:
    """Per worker count: peak memory at the largest corpus over the smallest, for each measure,
    beside the corpus growth (tokens)."""
    out = {}
    for workers in sorted({r["workers"] for r in rows}):
        mine = sorted((r for r in rows if r["workers"] == workers), key=lambda r: r["size"])
        small, large = mine[0], mine[-1]
        out[str(workers)] = {"tokens": large["tokens"] / small["tokens"], **{
            key: large[key] / max(small[key], 1e-9)
            for key in ("main_maxrss_kib", "child_maxrss_kib", "anon_total_mib")}}
    return out


def plot(rows: List[Dict], path: str, info) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for workers, marker in zip(sorted({r["workers"] for r in rows}), "os^"):
        mine = sorted((r for r in rows if r["workers"] == workers), key=lambda r: r["tokens"])
        tokens = [r["tokens"] / 1e6 for r in mine]
        ax.plot(tokens, [r["main_maxrss_kib"] / 1024 for r in mine], marker + "-",
                label=f"peak RSS main, {workers} worker(s)")
        ax.plot(tokens, [r["child_maxrss_kib"] / 1024 for r in mine], marker + "--",
                label=f"peak RSS largest child, {workers} worker(s)")
        ax.plot(tokens, [r["anon_total_mib"] for r in mine], marker + ":",
                label=f"peak anon, all processes, {workers} worker(s)")
    ax.set_xlabel("corpus (million tokens)")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(f"preprocess_dialog.py --seq-length {SEQ_LENGTH}: memory vs corpus size")
    ax.legend(fontsize=7)
    common.save_figure(fig, path, info)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-tool"]:
        return tool_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small sizes")
    parser.add_argument("--conversations", type=int,
                        help="conversations of the 1x corpus (default 100; --quick 2)")
    parser.add_argument("--max-tokens", type=int, help="longest conversation drawn (default "
                        "100000; --quick 20000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", default=os.path.join(common.WORK_DIR, "long_preprocess"))
    parser.add_argument("--results-dir", help="where the JSON and PNG go (default "
                        "benchmarks/results)")
    args = parser.parse_args(argv)
    n = args.conversations or (2 if args.quick else 100)
    high = args.max_tokens or (20000 if args.quick else 100000)
    if args.results_dir:
        common.RESULTS_DIR = args.results_dir
    info = common.machine_info()
    print(common.header(f"long-context preprocessing, --seq-length {SEQ_LENGTH}", info,
                        args.quick))
    corpus = agent_corpus(args.work_dir, n, args.seed, high=high)
    rows = measure(corpus, args.workers, args.work_dir)
    print(table(rows, n))
    ratios = growth(rows)
    for workers, ratio in ratios.items():
        print(f"{workers} worker(s), 4x corpus over 1x: tokens {ratio['tokens']:.2f}x, peak RSS "
              f"main {ratio['main_maxrss_kib']:.2f}x, largest child "
              f"{ratio['child_maxrss_kib']:.2f}x, anon total {ratio['anon_total_mib']:.2f}x")
    failed = [r for r in rows if r.get("verify") and not r["verify"]["ok"]]
    for row in failed:
        print(f"--verify FAILED on the {row['size']}-conversation output:\n"
              f"{row['verify']['output']}")
    paths = common.result_paths("long-preprocess", args.quick)
    common.write_json(paths["json"], {
        "benchmark": "long-preprocess", "quick": args.quick, "machine": info,
        "settings": {"seq_length": SEQ_LENGTH, "conversations_1x": n, "low": 8000, "high": high,
                     "seed": args.seed, "workers": args.workers, "template": "chatml"},
        "rows": rows, "growth_4x_over_1x": ratios})
    plot(rows, paths["png"], info)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
