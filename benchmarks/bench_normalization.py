#!/usr/bin/env python
"""Loss normalization: does the turn-normalized loss learn short replies better than a token mean?

The same tiny Llama-style model, data, steps, learning-rate schedule and seed are trained three
times, with ``--loss-normalization token`` (every loss token weighs the same), ``turn`` (every
reply weighs the same: each token's loss divided by its reply's length) and ``conversation``
(every conversation weighs the same), and on request ``--normalizations power0.5`` (``power
--loss-turn-exponent 0.5``: each token weighs 1 / sqrt(its reply's length); also power0.25 and
power0.75), for each of several seeds (a seed sets the initial weights
and the data order; for one seed the three normalizations start from the same weights and see the
same packs in the same order). The corpus (``normalization_corpus.py``) is the same for every
run: short exact answers (facts recalled across turns, sums) and medium replies next to long
templated explanations that hold most of the tokens.

Pipeline: the corpus and its SentencePiece tokenizer, ``tools/preprocess_dialog.py`` once
(ChatML, held-out validation split ``--split 90,10``), then per run ``torchrun --standalone
--nproc_per_node 1 pretrain_dialog.py ... --loss-normalization NORM --eval-interval N --save DIR``
(one process, ``OMP_NUM_THREADS=1``, ``--parallel`` runs at a time). Each validation writes
``DIR/validation/iter_NNNNNNN.json`` (``mt_dialog.training.turn_metrics``): on the held-out
conversations, loss per turn, greedy teacher-forced accuracy and the share of exactly right
replies, overall, by reply length (``--eval-reply-length-buckets``) and by turn index. The table
gives the final validation of every normalization as the mean over seeds and (min-max).

    python benchmarks/bench_normalization.py           # full run (~20 min on 2 cores)
    python benchmarks/bench_normalization.py --quick   # smoke run (< 1 min)
    python benchmarks/bench_normalization.py --normalizations token turn power0.5 \
        --results-name normalization-power                # the 'power' study (README section 5)
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

NORMALIZATIONS = ("token", "turn", "conversation")  # the default runs
# --normalizations may also name 'power' with its exponent: --loss-normalization power
# --loss-turn-exponent P (P = 0: token, 1: turn; 0.5: each token weighs 1/sqrt(reply length))
POWERS = ("power0.25", "power0.5", "power0.75")
CHOICES = (*NORMALIZATIONS, *POWERS)
PARTS = ("loss per turn", "accuracy", "exact turns")
OVERALL = "all replies"
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")
# full run / --quick defaults of the size settings (None on the command line: take these)
SIZES = {
    "conversations": (6000, 300), "seeds": ([1, 2, 3], [1]), "train_iters": (1000, 20),
    "evals": (2, 1), "warmup": (20, 5), "parallel": (2, 3),
}


# -- settings --------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line; size settings left out take the full-run or --quick default."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 300 "
                        "conversations, 20 steps, the 3 runs at once; writes "
                        "normalization-quick.json/png")
    parser.add_argument("--conversations", type=int, help="corpus size (default 6000; quick 300)")
    parser.add_argument("--corpus-seed", type=int, default=0, help="seed of the corpus, the same "
                        "for every run (default 0)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (weights, data "
                        "order) (default 1 2 3; quick 1)")
    parser.add_argument("--normalizations", nargs="+", default=list(NORMALIZATIONS),
                        choices=CHOICES, help="default: token turn conversation; powerP: "
                        "--loss-normalization power --loss-turn-exponent P")
    parser.add_argument("--train-iters", type=int, help="steps per run (default 1000; quick 20)")
    parser.add_argument("--evals", type=int, help="validations per run, evenly spaced, the last "
                        "at the end (default 2; quick 1)")
    parser.add_argument("--warmup", type=int, help="learning-rate warm-up steps (default 20; "
                        "quick 5)")
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--global-batch-size", type=int, default=2, help="packs per step")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--min-lr", type=float, default=1e-4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--buckets", type=int, nargs="+", default=[4, 16, 64, 256],
                        help="--eval-reply-length-buckets (upper edges, tokens)")
    parser.add_argument("--parallel", type=int, help="runs at a time, one thread each "
                        "(default 2; quick 3)")
    parser.add_argument("--work-dir", help="scratch folder (default benchmarks/work/"
                        "normalization[-quick])")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR,
                        help="where the JSON and PNG go (default benchmarks/results)")
    parser.add_argument("--results-name", help="file name of the JSON and PNG, without the "
                        "extension (default normalization[-quick])")
    parser.add_argument("--reuse", metavar="JSON", help="a results JSON of this benchmark with "
                        "the same settings (but the normalizations and runs at a time): its "
                        "runs of --normalizations x --seeds are taken as they are, only the "
                        "others are trained (the runs are deterministic on one machine)")
    parser.add_argument("--paired", nargs=2, action="append", metavar=("BASE", "OTHER"),
                        help="a seed-by-seed table of OTHER - BASE (repeatable; default: turn "
                        "vs token, and each power run vs token and vs turn)")
    args = parser.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.train_iters < 1 or not 1 <= args.evals <= args.train_iters:
        parser.error("--train-iters must be >= 1 and --evals between 1 and --train-iters")
    if args.train_iters % args.evals:
        parser.error(f"--train-iters {args.train_iters} is not a multiple of --evals "
                     f"{args.evals} (validations are every train-iters / evals steps)")
    if args.parallel < 1 or args.conversations < 20:
        parser.error("--parallel must be >= 1 and --conversations >= 20 (10% are held out)")
    args.work_dir = args.work_dir or os.path.join(
        common.WORK_DIR, "normalization" + ("-quick" if args.quick else ""))
    return args


def settings_of(args: argparse.Namespace) -> Dict:
    """The settings recorded in the JSON."""
    return {"conversations": args.conversations, "corpus_seed": args.corpus_seed,
            "seeds": args.seeds, "normalizations": args.normalizations,
            "train_iters": args.train_iters, "validations": args.evals,
            "eval_interval": args.train_iters // args.evals, "seq_length": args.seq_length,
            "micro_batch_size": 1, "global_batch_size": args.global_batch_size,
            "lr": args.lr, "min_lr": args.min_lr, "lr_warmup_iters": args.warmup,
            "lr_decay_style": "cosine",
            "model": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads},
            "reply_length_buckets": args.buckets, "split": "90,10", "template": "chatml",
            "parallel_runs": args.parallel, "threads_per_run": 1}


# -- data ------------------------------------------------------------------------------------


def build_dataset(args: argparse.Namespace) -> Dict:
    """Corpus + tokenizer (``normalization_corpus.prepare``) and the packed dataset with a
    held-out validation split; returns paths, the split figures and reply-length shares."""
    from normalization_corpus import prepare, reply_lengths

    from mt_dialog.data.storage import read_metadata

    corpus, tokenizer = prepare(args.work_dir, args.conversations, args.corpus_seed)
    prefix = os.path.join(args.work_dir, f"dialog_n{args.conversations}_seed{args.corpus_seed}"
                                         f"_s{args.seq_length}")
    command = [sys.executable, os.path.join(common.REPO, "tools", "preprocess_dialog.py"),
               "--input", corpus, "--tokenizer-model", tokenizer, "--template", "chatml",
               "--seq-length", str(args.seq_length), "--overlong", "truncate",
               "--split", "90,10", "--output-prefix", prefix, "--overwrite", "--no-progress",
               "--workers", "1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO)
    if done.returncode:
        raise SystemExit(f"preprocessing failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n"
                         f"{done.stderr[-3000:]}")
    splits = read_metadata(prefix)["splits"]
    if not splits.get("valid", {}).get("packs"):
        raise SystemExit(f"the validation split of {prefix} is empty: use more --conversations")
    return {"corpus": corpus, "tokenizer": tokenizer, "prefix": prefix, "splits": splits,
            "reply_lengths": length_shares(reply_lengths(corpus, tokenizer), args.buckets)}


def length_shares(content_lengths: List[int], edges: Sequence[int]) -> Dict[str, Dict]:
    """Replies and reply tokens per length bucket (end-of-turn token included, as the
    validation counts them), over the whole corpus."""
    lengths = [n + 1 for n in content_lengths]
    total_replies, total_tokens = len(lengths), sum(lengths)
    shares, low = {}, 1
    for high in [*edges, None]:
        group = [n for n in lengths if n >= low and (high is None or n <= high)]
        name = f"{low}+" if high is None else f"{low}-{high}"
        shares[name] = {"replies": len(group), "share_of_replies": len(group) / total_replies,
                        "share_of_reply_tokens": sum(group) / total_tokens}
        low = (high or 0) + 1
    return shares


# -- runs ------------------------------------------------------------------------------------


def train_command(args: argparse.Namespace, prefix: str, norm: str, seed: int, save: str
                  ) -> List[str]:
    """``torchrun --standalone --nproc_per_node 1 pretrain_dialog.py ...`` of one run."""
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    runner = [exe] if os.path.exists(exe) else [sys.executable, "-m", "torch.distributed.run"]
    return [*runner, "--standalone", "--nproc_per_node", "1", "pretrain_dialog.py",
            "--num-layers", str(args.layers), "--hidden-size", str(args.hidden),
            "--num-attention-heads", str(args.heads), "--data-path", prefix,
            "--micro-batch-size", "1", "--global-batch-size", str(args.global_batch_size),
            "--lr", str(args.lr), "--min-lr", str(args.min_lr),
            "--lr-warmup-iters", str(args.warmup), "--lr-decay-style", "cosine",
            "--train-iters", str(args.train_iters),
            "--log-interval", str(max(1, args.train_iters // 10)),
            "--eval-interval", str(args.train_iters // args.evals),
            "--eval-reply-length-buckets", *map(str, args.buckets),
            "--seed", str(seed), *normalization_flags(norm), "--save", save]


def normalization_flags(norm: str) -> List[str]:
    """The pretrain_dialog.py flags of a benchmark normalization name (``power0.5``:
    ``--loss-normalization power --loss-turn-exponent 0.5``)."""
    if norm.startswith("power"):
        return ["--loss-normalization", "power", "--loss-turn-exponent", norm[len("power"):]]
    return ["--loss-normalization", norm]


def run_all(jobs: List[Dict], parallel: int) -> None:
    """Run the jobs (``command``, ``save``, ``log``), ``parallel`` at a time, one thread each;
    adds ``seconds`` to each. A failed run stops the benchmark with its log's tail."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [common.REPO, env.get("PYTHONPATH")]))
    waiting, running, finished = list(jobs), [], 0
    while waiting or running:
        while waiting and len(running) < parallel:
            job = waiting.pop(0)
            shutil.rmtree(job["save"], ignore_errors=True)  # no stale validation files
            with open(job["log"], "w", encoding="utf-8") as log:
                job["process"] = subprocess.Popen(job["command"], cwd=common.REPO, env=env,
                                                  stdout=log, stderr=subprocess.STDOUT)
            job["started"] = common.wall()
            running.append(job)
        time.sleep(0.5)
        for job in [j for j in running if j["process"].poll() is not None]:
            running.remove(job)
            job["seconds"] = common.wall() - job["started"]
            code = job.pop("process").returncode
            if code:
                for other in running:
                    other["process"].kill()
                with open(job["log"], encoding="utf-8") as log:
                    tail = log.read()[-4000:]
                raise SystemExit(f"run {job['name']} failed (exit {code}): "
                                 f"{' '.join(job['command'])}\n{tail}")
            finished += 1
            print(f"  {job['name']}: {job['seconds']:.0f} s ({finished}/{len(jobs)} runs done)",
                  flush=True)


def read_validations(save: str) -> List[Dict]:
    """Every ``SAVE/validation/iter_*.json`` of a run, by iteration (NaN for null)."""
    found = []
    for path in sorted(glob.glob(os.path.join(save, "validation", "iter_*.json"))):
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
        metrics = {k: (math.nan if v is None else float(v)) for k, v in record["metrics"].items()}
        found.append({"iteration": int(record["iteration"]), "metrics": metrics})
    if not found:
        raise SystemExit(f"no validation metrics in {save}/validation: the run wrote no "
                         "iter_*.json (is mt_dialog's per-turn validation in this tree?)")
    return sorted(found, key=lambda r: r["iteration"])


# -- summary ---------------------------------------------------------------------------------


def metric_key(group: str, part: str) -> str:
    """The validation JSON's key of ``part`` ("accuracy", "turns", ...) in ``group``."""
    return part if group == OVERALL else f"{group}: {part}"


def groups_of(metrics: Dict[str, float]) -> List[str]:
    """The groups a validation reported: all replies, reply-length buckets (shortest first),
    turn indices (first first)."""
    names = [k[: -len(": turns")] for k in metrics if k.endswith(": turns")]

    def first_number(name: str) -> int:
        return int(name.split()[-1].split("-")[0].rstrip("+"))

    lengths = sorted((n for n in names if n.startswith("reply length ")), key=first_number)
    turns = sorted((n for n in names if n.startswith("turn ")), key=first_number)
    if not lengths or not turns:
        raise SystemExit(f"the validation metrics have no per-turn groups: {sorted(metrics)}")
    return [OVERALL, *lengths, *turns]


def _finite(value: float) -> Optional[float]:
    return value if isinstance(value, float) and math.isfinite(value) else None


def aggregate(finals: Dict[str, Dict[int, Dict[str, float]]], groups: List[str]) -> Dict:
    """``summary[norm][group]``: the group's validation turns and, per part, the mean, min, max
    and std over seeds of the final validation (None where the group is empty)."""
    summary = {}
    for norm, by_seed in finals.items():
        summary[norm] = {}
        for group in groups:
            entry = {"turns": next(iter(by_seed.values())).get(metric_key(group, "turns"))}
            for part in PARTS:
                values = [m[metric_key(group, part)] for m in by_seed.values()]
                values = [v for v in values if math.isfinite(v)]
                stats = common.stats(values)
                entry[part] = {"n": stats["n"], "mean": _finite(stats["mean"]),
                               "min": _finite(stats.get("min", math.nan)),
                               "max": _finite(stats.get("max", math.nan)),
                               "std": _finite(stats["std"]), "per_seed": values}
            summary[norm][group] = entry
    return summary


def cell(stat: Dict, part: str) -> str:
    """``mean (min-max)`` over seeds (only the mean for one seed); '-' for an empty group."""
    if stat["mean"] is None:
        return "-"
    if part == "loss per turn":
        show = "{:.3f}".format
    else:
        show = (lambda v: f"{100 * v:.1f}")
    text = show(stat["mean"]) + ("%" if part != "loss per turn" else "")
    if stat["n"] > 1:
        text += f" ({show(stat['min'])}-{show(stat['max'])})"
    return text


def main_table(summary: Dict, groups: List[str]) -> str:
    """One row per group x normalization: validation turns, loss per turn, accuracy, exact
    turns (final validation, mean (min-max) over seeds)."""
    rows = []
    for group in groups:
        for norm, by_group in summary.items():
            entry = by_group[group]
            turns = entry["turns"]
            rows.append([group, norm, "-" if turns is None else common.fmt_int(turns),
                         *(cell(entry[part], part) for part in PARTS)])
    return common.format_table(["group", "normalization", "turns", "loss per turn",
                                "accuracy", "exact turns"], rows)


def paired_table(summary: Dict, groups: List[str], base: str = "token",
                 other: str = "turn") -> Optional[str]:
    """Per group, ``other`` minus ``base`` seed by seed (the same initial weights and data
    order): the mean difference of loss per turn and of exact turns, and in how many seeds
    ``other`` was better; None when either normalization was not run."""
    if base not in summary or other not in summary:
        return None
    rows = []
    for group in groups:
        row = [group]
        for part, better in (("loss per turn", -1), ("exact turns", 1)):
            a = summary[base][group][part]["per_seed"]
            b = summary[other][group][part]["per_seed"]
            if not a or len(a) != len(b):
                row += ["-", "-"]
                continue
            diffs = [y - x for x, y in zip(a, b)]
            mean = sum(diffs) / len(diffs)
            wins = sum(1 for d in diffs if d * better > 0)
            row += [f"{mean:+.3f}" if part == "loss per turn" else f"{100 * mean:+.1f} pts",
                    f"{wins}/{len(diffs)}"]
        rows.append(row)
    return common.format_table(
        ["group", f"loss per turn, {other} - {base}", f"{other} lower in",
         f"exact turns, {other} - {base}", f"{other} higher in"], rows)


# -- main ------------------------------------------------------------------------------------


def plot(summary: Dict, groups: List[str], path: str, info: Dict, subtitle: str) -> None:
    """Loss per turn, accuracy and exact turns by reply length (top) and by turn index
    (bottom): one bar per normalization, error bars min-max over seeds."""
    plt = common.pyplot()
    if plt is None:
        return
    rows = [[g for g in groups if g.startswith("reply length ")],
            [g for g in groups if g.startswith("turn ")]]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    norms = list(summary)
    width = 0.8 / len(norms)
    for r, row_groups in enumerate(rows):
        for c, part in enumerate(PARTS):
            axis = axes[r][c]
            for k, norm in enumerate(norms):
                stats = [summary[norm][g][part] for g in row_groups]
                scale = 1.0 if part == "loss per turn" else 100.0
                means = [scale * s["mean"] if s["mean"] is not None else math.nan for s in stats]
                low = [m - scale * s["min"] if s["mean"] is not None else 0
                       for m, s in zip(means, stats)]
                high = [scale * s["max"] - m if s["mean"] is not None else 0
                        for m, s in zip(means, stats)]
                xs = [i + (k - (len(norms) - 1) / 2) * width for i in range(len(row_groups))]
                axis.bar(xs, means, width, yerr=[low, high], capsize=3, label=norm,
                         color=f"C{CHOICES.index(norm)}")
            axis.set_xticks(range(len(row_groups)))
            axis.set_xticklabels([g.replace("reply length ", "") for g in row_groups])
            axis.set_xlabel("reply length (tokens)" if r == 0 else "turn index")
            axis.set_ylabel(part if part == "loss per turn" else f"{part} (%)")
            axis.set_title(f"held-out {part}")
            if part != "loss per turn":
                axis.set_ylim(0, 105)
            axis.legend(fontsize=8)
    fig.suptitle(f"loss normalization: {' vs '.join(norms)} ({subtitle})")
    fig.tight_layout(rect=(0, 0.03, 1, 0.96))
    common.save_figure(fig, path, info)


def run_benchmark(args: argparse.Namespace, data: Dict) -> Dict:
    """Train every (seed, normalization); returns the runs with their validations."""
    runs_dir = os.path.join(args.work_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    jobs, reused = [], reusable_runs(args)
    for seed in args.seeds:
        for norm in args.normalizations:
            save = os.path.join(runs_dir, f"{norm}_seed{seed}")
            jobs.append({"name": f"{norm} seed {seed}", "norm": norm, "seed": seed,
                         "save": save, "log": save + ".log",
                         "command": train_command(args, data["prefix"], norm, seed, save)})
            jobs[-1].update(reused.get((norm, seed), {}))
    todo = [job for job in jobs if "validations" not in job]
    print(f"training {len(todo)} runs ({len(args.normalizations)} normalizations x "
          f"{len(args.seeds)} seeds, {args.train_iters} steps each; {len(jobs) - len(todo)} "
          f"taken from --reuse), {args.parallel} at a time ...", flush=True)
    run_all(todo, args.parallel)
    for job in todo:
        job["validations"] = read_validations(job["save"])
        last = job["validations"][-1]["iteration"]
        if last != args.train_iters:
            raise SystemExit(f"run {job['name']}: last validation at iteration {last}, not "
                             f"{args.train_iters} ({job['log']})")
    return {"jobs": jobs}


def reusable_runs(args: argparse.Namespace) -> Dict:
    """``{(normalization, seed): {"validations", "seconds", "reused"}}`` of the ``--reuse``
    JSON (empty without it); its settings must be this run's but for the normalizations, seeds
    and runs at a time."""
    if not args.reuse:
        return {}
    with open(args.reuse, encoding="utf-8") as handle:
        old = json.load(handle)
    loose = ("normalizations", "seeds", "parallel_runs")
    mine = {k: v for k, v in settings_of(args).items() if k not in loose}
    theirs = {k: v for k, v in old["settings"].items() if k not in loose}
    if mine != theirs:
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        raise SystemExit(f"--reuse {args.reuse}: other settings ({', '.join(differ)})")
    return {(r["normalization"], r["seed"]): {"validations": [_nan_back(v) for v in
                                                              r["validations"]],
                                              "seconds": r["seconds"], "reused": args.reuse}
            for r in old["runs"]}


def _nan_back(validation: Dict) -> Dict:
    """A validation of a results JSON with its nulls (an empty group) NaN again."""
    return {**validation, "metrics": {k: math.nan if v is None else v
                                      for k, v in validation.get("metrics", {}).items()}}


def report(args: argparse.Namespace, data: Dict, jobs: List[Dict]) -> Dict:
    """Aggregate the final validations, print the tables; returns what the JSON keeps."""
    finals = {norm: {j["seed"]: j["validations"][-1]["metrics"] for j in jobs if j["norm"] == norm}
              for norm in args.normalizations}
    groups = groups_of(jobs[0]["validations"][-1]["metrics"])
    summary = aggregate(finals, groups)
    table = main_table(summary, groups)
    pairs = args.paired or [("token", "turn"), *((base, n) for n in args.normalizations
                                                  if n.startswith("power")
                                                  for base in ("token", "turn"))]
    paired = {f"{other} vs {base}": paired_table(summary, groups, base, other)
              for base, other in pairs}
    paired = {name: table for name, table in paired.items() if table}
    valid = data["splits"]["valid"]
    spread = "mean (min-max) over seeds " + ", ".join(map(str, args.seeds)) \
        if len(args.seeds) > 1 else f"seed {args.seeds[0]}"
    print(f"\nheld-out validation after {args.train_iters} steps ({valid['conversations']:,} "
          f"conversations, {valid['turns']:,} replies); {spread}:")
    print(table)
    for name, text in paired.items():
        print(f"\n{name}, seed by seed (the same initial weights and data order):")
        print(text)
    return {"groups": groups, "summary": summary, "table": table,
            "paired_table": paired.get("turn vs token"), "paired_tables": paired}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Build the data, train every run, print and write the results."""
    args = parse_args(argv)
    started = common.wall()
    info = common.machine_info()
    print(common.header("loss normalization benchmark", info, args.quick), flush=True)
    data = build_dataset(args)
    train = data["splits"]["train"]
    print(f"corpus: {args.conversations:,} conversations (seed {args.corpus_seed}); train "
          f"{train['conversations']:,} conversations / {train['turns']:,} replies / "
          f"{train['loss_tokens']:,} loss tokens; valid {data['splits']['valid']['turns']:,} "
          "replies", flush=True)
    for name, share in data["reply_lengths"].items():
        print(f"  replies of {name} tokens: {share['share_of_replies']:.1%} of replies, "
              f"{share['share_of_reply_tokens']:.1%} of reply tokens")
    jobs = run_benchmark(args, data)["jobs"]
    results = report(args, data, jobs)
    name = args.results_name or "normalization" + ("-quick" if args.quick else "")
    paths = {"json": os.path.join(args.results_dir, name + ".json")}
    paths["png"] = paths["json"][: -len(".json")] + ".png"
    os.makedirs(args.results_dir, exist_ok=True)
    shown = list(sys.argv[1:] if argv is None else argv)
    runs = [{"normalization": j["norm"], "seed": j["seed"], "seconds": j["seconds"],
             "command": " ".join(j["command"]), "validations": j["validations"],
             **({"reused_from": j["reused"]} if "reused" in j else {})} for j in jobs]
    common.write_json(paths["json"], _no_nan({
        "benchmark": "normalization", "quick": args.quick, "machine": info,
        "command": " ".join(["python", "benchmarks/bench_normalization.py", *shown]),
        "settings": settings_of(args), "elapsed_seconds": common.wall() - started,
        "dataset": {"splits": data["splits"], "reply_lengths_corpus": data["reply_lengths"]},
        **results, "runs": runs}))
    plot(results["summary"], results["groups"], paths["png"], info,
         f"{len(args.seeds)} seed(s), {args.train_iters} steps, error bars min-max")
    print(f"wrote {paths['json']} and {paths['png']} ({common.wall() - started:.0f} s in all)")
    return 0


def _no_nan(value):
    """``value`` with every non-finite float as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
