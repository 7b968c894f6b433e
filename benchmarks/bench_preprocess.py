#!/usr/bin/env python
"""Preprocessing: conversations/s and tokens/s of ``tools/preprocess_dialog.py`` with 1 and 2
workers, beside a bare loop that only tokenizes the same texts with the same tokenizer.

Inputs:
  synthetic          the ShareGPT-like corpus of ``synthetic_corpus.py`` with its own 2,000-piece
                     SentencePiece model, ``--template chatml`` (runs on a fresh clone)
  synthetic+llama2   the same corpus with ``../shared/data/llama2_tokenizer.model``, ``--template llama2``
  firefly+llama2     ``../shared/data/firefly_multiturn_zh.jsonl`` (33 real Chinese conversations)
                     repeated ``--firefly-repeat`` times into one file so that start-up does not
                     dominate, Llama 2 tokenizer, ``--template firefly``
  hf                 the same corpus at ``--hf-conversations`` (5,000) conversations with a
                     6,000-piece byte-level BPE Hugging Face tokenizer that the script trains on it
                     with the ``tokenizers`` library (``synthetic_corpus.prepare_hf``: GPT-2 style
                     pre-tokenizer, eos ``<|im_end|>``, pad ``<|endoftext|>``, a ChatML Jinja chat
                     template), ``--template chatml`` and ``--template hf``
The two Llama 2 rows are skipped with a message when ``../shared`` is absent.

Each tool run is a fresh interpreter calling the tool's ``main`` with ``--seq-length 4096
--packing bfd --overlong truncate --no-progress`` (default split). Its processes: the main process
(reads, accounts, packs; with ``--workers 1`` it also renders and tokenizes), with ``--workers N``
(N > 1) N tokenizer worker processes, and always one writer process that imports torch +
megatron-core while the others tokenize, then writes the packed ``.bin/.idx`` files from the
staging shards (``mt_dialog/data/writer.py``). Columns:
  time        the tool's own ``elapsed_seconds``: from reading the first file to the metadata
              written (megatron-core's import overlaps it, in the writer process), interpreter
              start-up excluded
  wall        the same plus interpreter start-up and the end of the child processes
  CPU         CPU seconds of the main process / of its children: the tokenizer workers and the
              writer process (whose import of torch + megatron-core, measured alone and printed
              below the table, is most of its share)
  CPU vs tokenize-only  (main + children CPU) / tokenize-only time: what the overlap hides
"tokenize only" loads every message text into memory first (not timed), then times
``sp.EncodeAsIds(text)`` over them in one process. tokens/s counts the tokens each produced (the
pipeline's include the template's, minus turns removed by ``--overlong truncate``).

Each input gets ``--repeats`` interleaved rounds (tokenize only, then the pipeline with each worker
count), so that the machine's slow spells hit every mode alike; the table shows each mode's median
run and the JSON keeps every run's seconds (``all_seconds``).

The Hugging Face rows (a table of their own) compare the pipeline with two bare baselines, each
run in a fresh interpreter that loads the tokenizer with ``AutoTokenizer`` (not timed; its time is
printed below the table: the pipeline's time includes it) and holds every message text in memory:
  encode loop               ``tokenizer.encode(text, add_special_tokens=False)`` per message, the
                            call the renderer needs (one thread)
  encode_batch, 2 threads   one ``backend_tokenizer.encode_batch(texts, add_special_tokens=False)``
                            (``RAYON_NUM_THREADS=2``): the tokenizer's own parallelism
"vs reference": ``--template chatml`` with 1 worker against the encode loop, with 2 workers
against the 2-thread batch encode; ``--template hf`` against ``--template chatml`` with as many
workers.

    python benchmarks/bench_preprocess.py           # full run (~10-11 min on 2 cores)
    python benchmarks/bench_preprocess.py --quick   # smoke run
    python benchmarks/bench_preprocess.py --inputs hf   # only the Hugging Face rows (~4 min);
                                                    #   writes results/preprocess-hf.json/png
    python benchmarks/bench_preprocess.py --breakdown  # only: the Firefly cost, stage by stage
    python benchmarks/bench_preprocess.py --profile # + where the 1-worker pipeline spends its time
                                                    #   (in-process, megatron-core imported first,
                                                    #   so the packed files are written inline)

Targets: pipeline (1 worker) within 1.25x of tokenize-only; near-linear scaling with workers.
Hugging Face tokenizer (issue 10): ``--template chatml`` with 1 worker within 1.2x of the encode
loop and with 2 workers within 1.2x of the 2-thread batch encode; ``--template hf`` within 1.3x of
``--template chatml``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

TARGET_RATIO = 1.25
TARGET_HF_LOOP = 1.2  # chatml, 1 worker, vs the bare per-message encode loop
TARGET_HF_BATCH = 1.2  # chatml, 2 workers, vs the bare 2-thread encode_batch
TARGET_HF_TEMPLATE = 1.3  # --template hf vs --template chatml, same workers
INPUTS = ("synthetic", "llama2", "firefly", "hf")


def message_texts(path: str):
    """Every message text of a JSONL corpus (OpenAI ``messages`` or Firefly records)."""
    texts = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "messages" in record:
                texts += [m["content"] for m in record["messages"]]
            else:
                if record.get("system"):
                    texts.append(record["system"])
                for turn in record["conversation"]:
                    texts += [turn["human"], turn["assistant"]]
    return texts


def tokenize_only(path: str, model: str, repeats: int):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(model)
    texts = message_texts(path)
    best, tokens = float("inf"), 0
    for _ in range(repeats):
        start = common.wall()
        tokens = 0
        for text in texts:
            tokens += len(sp.EncodeAsIds(text))
        best = min(best, common.wall() - start)
    return best, tokens, len(texts)


def tokenizer_args(model: str):
    """The tool's tokenizer flags for ``model``: a Hugging Face tokenizer folder, or a
    SentencePiece ``.model`` file."""
    if os.path.isdir(model):
        return ["--tokenizer-type", "huggingface", "--tokenizer-path", model]
    return ["--tokenizer-model", model]


def run_tool(path, model, template, workers, prefix):
    """One ``tools/preprocess_dialog.py`` run in a fresh interpreter (``--run-tool`` mode of this
    script: it calls the tool's ``main`` and reports the CPU time of the main process and of its
    worker processes)."""
    command = [sys.executable, os.path.abspath(__file__), "--run-tool",
               "--input", path, *tokenizer_args(model), "--template", template,
               "--seq-length", "4096", "--packing", "bfd", "--overlong", "truncate",
               "--output-prefix", prefix, "--overwrite", "--no-progress",
               "--workers", str(workers)]
    start = common.wall()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = common.wall() - start
    if done.returncode:
        raise SystemExit(f"preprocessing failed:\n{done.stdout}\n{done.stderr}")
    usage = json.loads(done.stdout.strip().splitlines()[-1])
    with open(prefix + ".meta.json", encoding="utf-8") as handle:
        summary = json.load(handle)["summary"]
    tokens = sum(s["tokens"] for s in summary["splits"].values())
    return {"workers": workers, "wall_seconds": wall, "seconds": summary["elapsed_seconds"],
            "conversations": summary["conversations_kept"], "tokens": tokens, **usage}


def tool_main(argv) -> int:
    """``--run-tool ARGS``: ``tools/preprocess_dialog.py ARGS``, then one JSON line with the CPU
    seconds of this (main) process and of its finished children (pool workers, writer)."""
    import contextlib
    import io
    import resource

    sys.path.insert(0, os.path.join(common.REPO, "tools"))
    import preprocess_dialog

    with contextlib.redirect_stdout(io.StringIO()):
        code = preprocess_dialog.main(argv)
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({"main_cpu_seconds": own.ru_utime + own.ru_stime,
                      "children_cpu_seconds": children.ru_utime + children.ru_stime}))
    return code


# -- Hugging Face tokenizer rows -----------------------------------------------------------------

HF_MODES = ("encode loop", "encode_batch, 2 threads")


def bare_main(argv) -> int:
    """``--run-bare MODE CORPUS FOLDER``, in a fresh interpreter: load the Hugging Face tokenizer
    of FOLDER as the tool does (``AutoTokenizer``; timed apart as ``load_seconds``), read every
    message text of CORPUS into memory (not timed), then time MODE over them: ``loop``,
    ``tokenizer.encode(text, add_special_tokens=False)`` per message (one thread); ``batch``, one
    ``tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)`` (the threads
    ``RAYON_NUM_THREADS`` allows). Prints one JSON line."""
    mode, corpus, folder = argv
    start = common.wall()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                              trust_remote_code=False)
    load = common.wall() - start
    texts = message_texts(corpus)
    cpu, start = time.process_time(), common.wall()
    if mode == "loop":
        tokens = sum(len(tokenizer.encode(text, add_special_tokens=False)) for text in texts)
    else:
        encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        tokens = sum(len(e.ids) for e in encodings)
    seconds, cpu = common.wall() - start, time.process_time() - cpu
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tokens": tokens,
                      "messages": len(texts), "load_seconds": load}))
    return 0


def run_bare(mode: str, path: str, folder: str, threads: int) -> dict:
    """``bare_main`` in a fresh interpreter (a fresh tokenizer: its word cache starts empty, as
    in every tool run) with ``threads`` tokenizer threads."""
    env = dict(os.environ, RAYON_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="true" if threads > 1 else "false")
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--run-bare", mode, path,
                           folder], capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"bare {mode} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_hf(name, path, folder, workers_list, rounds, work):
    """``rounds`` interleaved rounds of: the bare encode loop, the bare 2-thread batch encode,
    the pipeline with ``--template chatml`` and ``--template hf`` with each worker count; one
    record per mode (its median run)."""
    conversations = sum(1 for _ in open(path, encoding="utf-8"))
    keys = list(HF_MODES) + [(t, w) for t in ("chatml", "hf") for w in workers_list]
    runs = {key: [] for key in keys}
    for round_index in range(rounds):
        print(f"{name}: round {round_index + 1}/{rounds}: encode loop, encode_batch (2 threads), "
              f"pipeline chatml and hf with {', '.join(map(str, workers_list))} worker(s) ...",
              flush=True)
        for mode, bare, threads in zip(HF_MODES, ("loop", "batch"), (1, 2)):
            result = run_bare(bare, path, folder, threads)
            runs[mode].append({"mode": mode, "template": "-", "workers": threads,
                               "wall_seconds": result["seconds"], **result})
        for template, workers in keys[len(HF_MODES):]:
            result = run_tool(path, folder, template, workers, os.path.join(work, "out"))
            runs[(template, workers)].append({"mode": "pipeline", "template": template,
                                              **result})
    base = {"input": name, "path": path, "tokenizer": folder, "conversations": conversations}
    return [{**base, **_median(group)} for group in runs.values()]


def hf_ratios(group, workers_list):
    """Each row's reference and ratio (chatml: the bare loop with 1 worker, the 2-thread batch
    encode with more; hf: chatml with as many workers), and the target lines."""
    find = {(r["mode"], r.get("template"), r["workers"]): r for r in group}
    loop, batch = find[(HF_MODES[0], "-", 1)], find[(HF_MODES[1], "-", 2)]
    lines = []
    for r in group:
        if r["mode"] != "pipeline":
            r["reference"], r["ratio"] = None, None
            continue
        chatml = find[("pipeline", "chatml", r["workers"])]
        if r["template"] == "hf":
            reference, limit = chatml, TARGET_HF_TEMPLATE
        else:
            reference = loop if r["workers"] == 1 else batch
            limit = TARGET_HF_LOOP if r["workers"] == 1 else TARGET_HF_BATCH
        r["ratio"] = r["seconds"] / reference["seconds"]
        r["reference"] = ("chatml" if reference is chatml else reference["mode"])
        if r["template"] == "chatml" and r["workers"] not in (1, 2):
            continue
        what = (f"--template hf, {r['workers']} worker(s) <= {limit}x --template chatml"
                if r["template"] == "hf" else
                f"--template chatml, {r['workers']} worker(s) <= {limit}x {r['reference']}")
        lines.append(f"target HF tokenizer: {what}: {r['ratio']:.2f}x " +
                     ("MET" if r["ratio"] <= limit else f"MISSED by {r['ratio'] / limit:.2f}x"))
    return lines


def hf_table(group) -> str:
    rows = []
    for r in group:
        pipeline = r["mode"] == "pipeline"
        rows.append([
            r["mode"], r["template"], r["workers"], f"{r['tokens']:,}",
            common.fmt_seconds(r["seconds"]),
            common.fmt_seconds(r["wall_seconds"]) if pipeline else "-",
            (f"{r['main_cpu_seconds']:.1f} / {r['children_cpu_seconds']:.1f} s" if pipeline
             else f"{r['cpu_seconds']:.1f} s"),
            f"{r['conversations'] / r['seconds']:,.0f}", f"{r['tokens'] / r['seconds']:,.0f}",
            f"{r['ratio']:.2f}x {r['reference']}" if r.get("ratio") else "-"])
    return common.format_table(["mode", "template", "workers", "tokens", "time", "wall",
                                "CPU (main / children)", "conv/s", "tokens/s", "vs reference"],
                               rows)


def _median(runs):
    """The run of median ``seconds`` (the lower middle one for an even count), with every
    run's seconds attached."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["all_seconds"] = [r["seconds"] for r in runs]
    return chosen


def measure_input(name, path, model, template, workers_list, rounds, work):
    """``rounds`` interleaved rounds of (tokenize only, pipeline with each worker count), so that
    a slow spell of the machine hits every mode alike; one record per mode: its median run."""
    conversations = sum(1 for _ in open(path, encoding="utf-8"))
    runs = {mode: [] for mode in ["tokenize only"] + list(workers_list)}
    texts = 0
    for round_index in range(rounds):
        print(f"{name}: round {round_index + 1}/{rounds}: tokenize only, pipeline with "
              f"{', '.join(map(str, workers_list))} worker(s) ...", flush=True)
        seconds, tokens, texts = tokenize_only(path, model, 1)
        runs["tokenize only"].append({"mode": "tokenize only", "workers": 1, "seconds": seconds,
                                      "wall_seconds": seconds, "tokens": tokens})
        for workers in workers_list:
            result = run_tool(path, model, template, workers, os.path.join(work, "out"))
            runs[workers].append({"mode": "pipeline", **result})
    base = {"input": name, "path": path, "tokenizer": model, "template": template,
            "conversations": conversations, "messages": texts}
    return [{**base, **_median(group)} for group in runs.values()]


def import_cost(repeats: int = 2) -> float:
    """Seconds a fresh interpreter needs to import what the writer process imports first:
    megatron-core's ``indexed_dataset`` (torch + megatron.core), via
    ``mt_dialog.data.storage.indexed_dataset_module`` (median of ``repeats`` runs)."""
    code = ("import time, warnings; warnings.filterwarnings('ignore'); t = time.perf_counter(); "
            "from mt_dialog.data.storage import indexed_dataset_module; indexed_dataset_module(); "
            "print(time.perf_counter() - t)")
    times = []
    for _ in range(repeats):
        done = subprocess.run([sys.executable, "-c", code], cwd=common.REPO, capture_output=True,
                              text=True, check=True)
        times.append(float(done.stdout.strip().splitlines()[-1]))
    return sorted(times)[len(times) // 2]


def repeat_file(source: str, target: str, times: int) -> str:
    with open(source, "rb") as handle:
        data = handle.read()
    if not data.endswith(b"\n"):
        data += b"\n"
    with open(target, "wb") as handle:
        for _ in range(times):
            handle.write(data)
    return target


def profile_pipeline(path, model, template, work) -> list:
    """cProfile of one in-process 1-worker run: (function, own seconds) of the top entries."""
    import cProfile
    import pstats

    common.quiet_warnings()
    sys.path.insert(0, os.path.join(common.REPO, "tools"))
    import preprocess_dialog
    from mt_dialog.data.storage import indexed_dataset_module

    indexed_dataset_module()  # imported before profiling: the profile shows the steady state

    profiler = cProfile.Profile()
    argv = ["--input", path, *tokenizer_args(model), "--template", template,
            "--seq-length", "4096", "--overlong", "truncate", "--output-prefix",
            os.path.join(work, "profiled"), "--overwrite", "--no-progress"]
    profiler.enable()
    import io
    from contextlib import redirect_stdout

    with redirect_stdout(io.StringIO()):
        preprocess_dialog.main(argv)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt
    rows = []
    for (filename, line, name), (_, calls, own, cum, _) in stats.stats.items():
        rows.append((own, cum, calls, f"{os.path.relpath(filename, common.REPO) if filename.startswith(common.REPO) else os.path.basename(filename)}:{line}({name})"))
    rows.sort(reverse=True)
    return [{"function": r[3], "own_seconds": r[0], "cumulative_seconds": r[1], "calls": r[2],
             "share": r[0] / total} for r in rows[:20]], total


def run_profiles(args, corpus, synthetic_model, hf_input, work):
    """``--profile``: one in-process 1-worker run of each profiled input, printed; returns
    {name: {"total_seconds", "top"}}."""
    runs = [("synthetic", corpus, synthetic_model, "chatml")] * ("synthetic" in args.inputs)
    if hf_input:
        runs += [(f"{hf_input[0]}, --template {t}", hf_input[1], hf_input[2], t)
                 for t in ("chatml", "hf")]
    profiles = {}
    for name, path, model, template in runs:
        entries, total = profile_pipeline(path, model, template, work)
        profiles[name] = {"total_seconds": total, "top": entries}
        print(f"\nprofile of one in-process 1-worker run ({name}, {total:.1f} s under cProfile):")
        print(common.format_table(
            ["function", "own s", "share", "calls"],
            [[e["function"][:90], f"{e['own_seconds']:.2f}", f"{100 * e['share']:.1f}%",
              f"{e['calls']:,}"] for e in entries]))
    return profiles


def cost_breakdown(path: str, model: str, template_name: str, rounds: int = 3):
    """Where the 1-worker pipeline's time goes beyond tokenizing, in one process: the same
    records through cumulative stages (interleaved rounds, median seconds of each):

      tokenize only        sp.EncodeAsIds over every message text (texts already in memory)
      + read, JSON, parse  each JSONL line decoded and parsed into messages, then encoded
      + ids to array       the conversation's ids collected and converted to one numpy array
      + render, stage      render_conversation (template, loss_token_num) and the staging write
    The pipeline adds to the last one its batching and accounting, packing, and copying the
    staged tokens into megatron-core's .bin/.idx after packing."""
    import numpy as np

    from mt_dialog.data.formats import parse_record
    from mt_dialog.data.records import decode_json_line
    from mt_dialog.data.render import render_conversation, resolve_template
    from mt_dialog.data.templates import get_template
    from mt_dialog.data.tokenizers import SentencePieceTokenizer

    with open(path, "rb") as handle:
        lines = handle.read().splitlines()
    tokenizer = SentencePieceTokenizer(model)
    template = resolve_template(get_template(template_name), tokenizer)
    encode, sp = tokenizer.encode, tokenizer._sp
    texts = [m.content for line in lines
             for m in parse_record(decode_json_line(line), None).messages]
    stage = open(os.devnull, "wb")

    def messages():
        return (parse_record(decode_json_line(line), None).messages for line in lines)

    def to_array():
        for conversation in messages():
            ids = []
            for message in conversation:
                ids.extend(encode(message.content))
            np.fromiter(ids, dtype=np.int64, count=len(ids))

    def rendered():
        for conversation in messages():
            for r in render_conversation(conversation, template, encode):
                stage.write(r.input_ids.astype(np.uint16).data)
                stage.write(r.loss_token_num.astype(np.uint16).data)

    def tokenize_texts():
        for text in texts:
            sp.EncodeAsIds(text)

    def parsed():
        for conversation in messages():
            for message in conversation:
                encode(message.content)

    stages = [("tokenize only", tokenize_texts), ("+ read, JSON, parse", parsed),
              ("+ ids to array", to_array), ("+ render, stage", rendered)]
    times = {name: [] for name, _ in stages}
    for _ in range(rounds):
        for name, run in stages:
            start = common.wall()
            run()
            times[name].append(common.wall() - start)
    stage.close()
    medians = {name: sorted(v)[(len(v) - 1) // 2] for name, v in times.items()}
    base = medians["tokenize only"]
    return [{"stage": name, "seconds": sec, "vs_tokenize_only": sec / base}
            for name, sec in medians.items()]


def run_breakdown(inputs, skipped, info, argv) -> int:
    if skipped:
        print(f"--breakdown needs the Firefly input: {skipped}")
        return 0
    name, path, model, template = inputs[-1]
    breakdown = cost_breakdown(path, model, template)
    table = common.format_table(["stage", "time", "vs tokenize-only"], [
        [b["stage"], common.fmt_seconds(b["seconds"]), f"{b['vs_tokenize_only']:.2f}x"]
        for b in breakdown])
    print(f"cost breakdown, {name}, one process, median of 3 interleaved rounds:\n{table}")
    path = os.path.join(common.RESULTS_DIR, "preprocess-breakdown.json")
    common.write_json(path, {"benchmark": "preprocess-breakdown", "machine": info,
                             "command": " ".join(["python benchmarks/bench_preprocess.py", *argv]),
                             "input": name, "stages": breakdown, "table": table})
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--run-tool"]:
        return tool_main(argv[1:])
    if argv[:1] == ["--run-bare"]:
        return bare_main(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small inputs")
    parser.add_argument("--conversations", type=int, help="synthetic corpus size (default 20000; "
                        "quick 1000)")
    parser.add_argument("--firefly-repeat", type=int, help="copies of the 33 Firefly "
                        "conversations (default 300; quick 3)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--profile", action="store_true", help="also profile a 1-worker run "
                        "of the synthetic corpus in-process (cProfile) and print the top functions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown", action="store_true", help="instead: break the 1-worker "
                        "pipeline's cost on the Firefly input into stages, in one process")
    parser.add_argument("--repeats", type=int, help="interleaved rounds of every mode; the "
                        "median run of each is reported (default 3; quick 1)")
    parser.add_argument("--inputs", nargs="+", choices=INPUTS, default=list(INPUTS),
                        help="which inputs to measure (default: all)")
    parser.add_argument("--hf-conversations", type=int, help="synthetic corpus size of the "
                        "Hugging Face tokenizer rows (default 5000; quick 500)")
    args = parser.parse_args(argv)
    n = args.conversations or (1000 if args.quick else 20000)
    repeat = args.firefly_repeat or (3 if args.quick else 300)
    info = common.machine_info()
    print(common.header("preprocessing benchmark", info, args.quick), flush=True)

    from synthetic_corpus import prepare

    work = os.path.join(common.WORK_DIR, "preprocess")
    corpus, synthetic_model = prepare(work, n, args.seed)
    inputs = [("synthetic", corpus, synthetic_model, "chatml")] * ("synthetic" in args.inputs)
    skipped = common.shared_data_status()
    if skipped:
        print(f"synthetic+llama2, firefly+llama2: {skipped}")
    else:
        firefly = repeat_file(common.FIREFLY_JSONL, os.path.join(work, f"firefly_x{repeat}.jsonl"),
                              repeat)
        inputs += [("synthetic+llama2", corpus, common.LLAMA2_MODEL, "llama2")] * (
            "llama2" in args.inputs)
        inputs += [(f"firefly+llama2 (x{repeat})", firefly, common.LLAMA2_MODEL, "firefly")] * (
            "firefly" in args.inputs or args.breakdown)
    hf_input = None
    if "hf" in args.inputs and not args.breakdown:
        from synthetic_corpus import HF_VOCAB_SIZE, prepare_hf

        hf_n = args.hf_conversations or (500 if args.quick else 5000)
        hf_corpus, hf_folder = prepare_hf(work, hf_n, args.seed)
        hf_input = (f"synthetic x{hf_n:,} + HF byte-level BPE {HF_VOCAB_SIZE:,}", hf_corpus,
                    hf_folder)

    if args.breakdown:
        return run_breakdown(inputs, skipped, info, argv)
    rounds = args.repeats or (1 if args.quick else 3)
    records = []
    for name, path, model, template in inputs:
        records += measure_input(name, path, model, template, args.workers, rounds, work)
    hf_records = (measure_hf(*hf_input, args.workers, rounds, work) if hf_input else [])
    print("import cost of megatron-core's indexed_dataset in a fresh interpreter ...", flush=True)
    imports = import_cost()
    by_input, table, lines = sentencepiece_report(records, info) if records else ({}, "", [])
    if hf_records:
        hf_lines = hf_ratios(hf_records, args.workers)
        table += ("\n\n" if table else "") + hf_table(hf_records)
        by_input[hf_records[0]["input"]] = hf_records
        loads = [r["load_seconds"] for r in hf_records if r["mode"] != "pipeline"]
        hf_lines.append(
            f"fixed cost in every HF pipeline run, not in the bare rows: loading the tokenizer "
            f"(import transformers + AutoTokenizer) took {sorted(loads)[len(loads) // 2]:.2f} s "
            f"(median) in the bare rows' fresh interpreters")
        lines += [f"{hf_records[0]['input']}: {line}" for line in hf_lines]
    print()
    print(table)
    if args.quick:
        lines = ["[quick run: inputs too small, fixed costs dominate] " + line for line in lines]
    lines.append(f"fixed cost of every pipeline run: importing megatron-core's indexed_dataset "
                 f"(torch + megatron.core) takes {imports:.2f} s here; the writer process does it "
                 "while the others tokenize (it is in the children's CPU, not on the critical "
                 "path unless tokenizing is shorter)")
    for line in lines:
        print(line)
    records += hf_records

    profile = run_profiles(args, corpus, synthetic_model, hf_input, work) if args.profile else None

    # a run of some inputs only gets its own files, so that it never replaces a full run's
    name = "preprocess" + ("" if set(args.inputs) == set(INPUTS) else "-" + "-".join(args.inputs))
    paths = common.result_paths(name, args.quick)
    common.write_json(paths["json"], {
        "benchmark": "preprocess", "quick": args.quick, "machine": info,
        "command": " ".join(["python benchmarks/bench_preprocess.py", *argv]),
        "skipped": skipped, "import_seconds": imports, "results": records, "targets": lines, "profile": profile,
        "table": table})
    plot(by_input, paths["png"], info)
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


def sentencepiece_report(records, info):
    """(records by input, the table, the target lines) of the SentencePiece inputs."""
    by_input, rows = {}, []
    for r in records:
        by_input.setdefault(r["input"], []).append(r)
    for name, group in by_input.items():
        only = next(r for r in group if r["mode"] == "tokenize only")
        one = next((r for r in group if r["mode"] == "pipeline" and r["workers"] == 1), None)
        for r in group:
            r["vs_tokenize_only"] = r["seconds"] / only["seconds"]
            r["cpu_vs_tokenize_only"] = (
                (r["main_cpu_seconds"] + r["children_cpu_seconds"]) / only["seconds"]
                if r["mode"] == "pipeline" else 1.0)
            r["speedup_vs_1_worker"] = (one["seconds"] / r["seconds"]) if (
                one and r["mode"] == "pipeline") else None
            rows.append([
                name, r["mode"], r["workers"], f"{r['conversations']:,}", f"{r['tokens']:,}",
                common.fmt_seconds(r["seconds"]),
                common.fmt_seconds(r["wall_seconds"]) if r["mode"] == "pipeline" else "-",
                (f"{r['main_cpu_seconds']:.1f} / {r['children_cpu_seconds']:.1f} s"
                 if r["mode"] == "pipeline" else "-"),
                f"{r['conversations'] / r['seconds']:,.0f}", f"{r['tokens'] / r['seconds']:,.0f}",
                f"{r['vs_tokenize_only']:.2f}x",
                f"{r['cpu_vs_tokenize_only']:.2f}x",
                f"{r['speedup_vs_1_worker']:.2f}x" if r["speedup_vs_1_worker"] else "-"])
    table = common.format_table(
        ["input", "mode", "workers", "conversations", "tokens", "time", "wall",
         "CPU main / children", "conv/s",
         "tokens/s", "vs tokenize-only", "CPU vs tokenize-only", "vs 1 worker"], rows)
    lines = []
    for name, group in by_input.items():
        one = next((r for r in group if r["mode"] == "pipeline" and r["workers"] == 1), None)
        if one:
            ratio = one["vs_tokenize_only"]
            lines.append(f"target {name}: pipeline (1 worker) <= {TARGET_RATIO}x tokenize-only: "
                         f"{ratio:.2f}x " + ("MET" if ratio <= TARGET_RATIO else
                                             f"MISSED by {ratio / TARGET_RATIO:.2f}x"))
        two = next((r for r in group if r["mode"] == "pipeline" and r["workers"] == 2), None)
        if one and two:
            lines.append(f"scaling {name}: 2 workers {two['speedup_vs_1_worker']:.2f}x of 1 "
                         f"worker (linear: 2.00x); CPU main {two['main_cpu_seconds']:.1f} s + "
                         f"children {two['children_cpu_seconds']:.1f} s on {info['usable_cores']} "
                         f"cores (load average at start {info['load_average_1_5_15']})")
    return by_input, table, lines


def plot(by_input, path, info):
    plt = common.pyplot()
    if plt is None:
        return
    names = list(by_input)
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4.4), squeeze=False)
    for axis, name in zip(axes[0], names):
        group = by_input[name]
        labels = [(r["mode"].replace(", ", "\n") if r["mode"] != "pipeline" else
                   (f"{r['template']}\n" if r.get("template") else "pipeline\n")
                   + f"{r['workers']} worker{'s' if r['workers'] > 1 else ''}")
                  for r in group]
        values = [r["conversations"] / r["seconds"] for r in group]
        colors = iter(["C0", "C1", "C2", "C3", "C4", "C5"])
        bars = axis.bar(labels, values, color=["0.6" if r["mode"] != "pipeline" else next(colors)
                                               for r in group])
        axis.tick_params(axis="x", labelsize=7)
        for bar, r in zip(bars, group):
            axis.annotate(f"{r['tokens'] / r['seconds'] / 1e3:,.0f}k tok/s",
                          (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=7)
        axis.set_ylabel("conversations / s")
        axis.set_title(name, fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path, info)


if __name__ == "__main__":
    sys.exit(main())
