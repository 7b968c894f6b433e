#!/usr/bin/env python
"""Mixture of Experts step time: a tiny MoE vs a dense model of the same ACTIVE parameters, and
expert parallelism EP=2 vs EP=1, as ratios of one run.

Three runs of the real training path (``mt_dialog.training``: megatron-core GPTModel on the local
spec, ``pretrain_dialog.make_forward_step``, ``loop.train_step`` with DDP, the turn-normalized
loss; CPU, gloo, fp32, ``OMP_NUM_THREADS=1``), all in ONE ``torchrun --nproc_per_node 2`` launch
(data-parallel size 2), on the same packs in the same order:

  dense      SwiGLU MLP of ``k x F`` inner size (the same active MLP parameters per token as
             the MoE: k experts of F each)
  moe ep1    E experts of inner size F, top k, alltoall dispatcher, every expert on both ranks
  moe ep2    the same MoE with the experts split over the two ranks (--expert-model-parallel-size
             2): each rank holds E/2 experts and tokens travel by all-to-all

The runs take their steps in turn, round-robin (so a change in machine load hits all alike);
the first ``WARMUP`` steps of each are not timed. The step time is rank 0's wall time of
``loop.train_step`` after a barrier. Megatron-core's expert-parallel groups are process-wide, so
the worker builds the EP=1 runs, re-creates the model-parallel groups at EP=2 and builds the EP=2
run (every module keeps the groups it was built with; the data-parallel group has the same ranks
both times).

    python benchmarks/bench_moe.py           # full run (a few minutes on 2 cores)
    python benchmarks/bench_moe.py --quick   # smoke run (~30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

WARMUP = 2
VARIANTS = {  # key -> (label, MoE?, expert-parallel size)
    "dense": ("dense, same active parameters", False, 1),
    "moe_ep1": ("MoE, EP=1", True, 1),
    "moe_ep2": ("MoE, EP=2", True, 2),
}
SIZES = {  # quick / full: model and data
    True: {"hidden": 64, "experts": 4, "topk": 2, "expert_ffn": 64, "layers": 2, "heads": 4,
           "conversations": 60, "seq": 512, "steps": 6},
    False: {"hidden": 128, "experts": 8, "topk": 2, "expert_ffn": 128, "layers": 2, "heads": 4,
            "conversations": 400, "seq": 1024, "steps": 30},
}


# -- worker (under torchrun) -------------------------------------------------------------------


def _config(key: str, args):
    from mt_dialog.training.config import (DataConfig, DialogTrainingConfig, ModelConfig,
                                           OptimConfig, ParallelConfig, TrainConfig)

    _, moe, ep = VARIANTS[key]
    experts = dict(num_experts=args.experts, moe_router_topk=args.topk,
                   moe_ffn_hidden_size=args.expert_ffn, moe_aux_loss_coeff=0.01,
                   moe_token_dispatcher_type="alltoall") if moe else {}
    return DialogTrainingConfig(
        ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                    num_attention_heads=args.heads, ffn_hidden_size=args.topk * args.expert_ffn,
                    transformer_impl="local", **experts),
        ParallelConfig(expert_model_parallel_size=ep),
        DataConfig(data_path=[args.data], micro_batch_size=args.micro_batch_size,
                   global_batch_size=args.micro_batch_size * args.micro_batches * 2,
                   loss_normalization="turn"),
        OptimConfig(lr=2e-3), TrainConfig(train_iters=args.steps, seed=1234, log_interval=10 ** 9))


def _parameters(run, moe: bool, args) -> dict:
    """Total and per-token active parameters of the whole model (all ranks' experts), the
    expert-parallel size the model was built with and the experts per layer on this rank."""
    from megatron.core import parallel_state as ps

    local = expert = here = 0
    for name, p in run.model[0].module.named_parameters():
        local += p.numel()
        expert += p.numel() if ".experts." in name else 0
        here += name.endswith("linear_fc1.weight") and ".local_experts." in name
    ep = ps.get_expert_model_parallel_world_size() if moe else 1
    total = local + (ep - 1) * expert  # the other ranks' experts
    active = total - (expert * ep) * (args.experts - args.topk) // args.experts if moe else total
    return {"total": int(total), "active": int(active), "expert_parallel": ep,
            "experts_on_rank0": int(here) // args.layers}


def _build(keys, ep: int, args, runs: dict) -> None:
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    import pretrain_dialog
    from mt_dialog.training import distributed, loop
    from mt_dialog.training.checkpoint import StartPoint
    from mt_dialog.training.config import validate_world
    from mt_dialog.training.data import inspect_datasets, open_datasets

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    distributed.initialize(1, 1, None, 1234, expert_parallel=ep)
    for key in keys:
        config = _config(key, args)
        info = inspect_datasets(config)
        dp = validate_world(config, torch.distributed.get_world_size())
        torch.manual_seed(config.train.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)
        run = loop._setup(config, info, open_datasets(config, info), StartPoint(None, False),
                          pretrain_dialog.make_forward_step("turn"), dp)
        runs[key] = {"run": run, "params": _parameters(run, VARIANTS[key][1], args),
                     "times": [], "losses": [], "tokens_per_step": run.global_batch * info.seq_length}


def worker(args) -> int:
    """Build the runs (EP=1 ones first, then EP=2), step them round-robin, write rank 0's
    step times and losses to ``--out``."""
    common.quiet_warnings()
    import torch

    from mt_dialog.training import distributed, loop

    runs = {}
    _build([k for k in VARIANTS if VARIANTS[k][2] == 1], 1, args, runs)
    _build([k for k in VARIANTS if VARIANTS[k][2] == 2], 2, args, runs)
    for _ in range(args.steps):
        for key, entry in runs.items():
            torch.distributed.barrier()
            start = common.wall()
            metrics = loop.train_step(entry["run"])
            entry["times"].append(common.wall() - start)
            entry["losses"].append(metrics["loss per turn"] if metrics else float("nan"))
    if torch.distributed.get_rank() == 0:
        out = {key: {"params": e["params"], "step_seconds": e["times"],
                     "step": common.stats(e["times"][WARMUP:]), "losses": e["losses"],
                     "tokens_per_step": e["tokens_per_step"]} for key, e in runs.items()}
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(out, handle)
    distributed.destroy()
    return 0


# -- main --------------------------------------------------------------------------------------


def prepare_data(args) -> str:
    """The synthetic ShareGPT-like corpus and its tokenizer (``synthetic_corpus.py``), packed
    (best-fit decreasing, ChatML, ``--overlong truncate``); returns the dataset prefix."""
    from synthetic_corpus import prepare

    corpus, tokenizer = prepare(args.work_dir, args.conversations, 0)
    prefix = os.path.join(args.work_dir, f"packed_n{args.conversations}_s{args.seq}")
    command = [sys.executable, os.path.join(common.REPO, "tools", "preprocess_dialog.py"),
               "--input", corpus, "--tokenizer-model", tokenizer, "--template", "chatml",
               "--seq-length", str(args.seq), "--packing", "bfd", "--overlong", "truncate",
               "--split", "100,0", "--output-prefix", prefix, "--overwrite", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"preprocessing failed:\n{done.stdout}\n{done.stderr}")
    return prefix


def launch_worker(args, prefix: str) -> dict:
    """The three runs in one ``torchrun --nproc_per_node 2`` launch; rank 0's results."""
    worker_args = ["--data", prefix, "--steps", args.steps, "--micro-batch-size",
                   args.micro_batch_size, "--micro-batches", args.micro_batches]
    for name in ("hidden", "experts", "topk", "expert_ffn", "layers", "heads"):
        worker_args += [f"--{name.replace('_', '-')}", getattr(args, name)]
    return common.run_torchrun_worker(__file__, worker_args,
                                      os.path.join(args.work_dir, "moe_result.json"))


def ratios(results: dict) -> dict:
    """Mean step-time ratios: MoE (EP=1) over dense, EP=2 over EP=1, MoE (EP=2) over dense."""
    mean = {key: r["step"]["mean"] for key, r in results.items()}
    return {"moe_ep1 / dense": mean["moe_ep1"] / mean["dense"],
            "moe_ep2 / moe_ep1": mean["moe_ep2"] / mean["moe_ep1"],
            "moe_ep2 / dense": mean["moe_ep2"] / mean["dense"]}


def table(results: dict) -> str:
    rows = []
    for key, r in results.items():
        step = r["step"]
        rows.append([VARIANTS[key][0], common.fmt_int(r["params"]["total"]),
                     common.fmt_int(r["params"]["active"]),
                     f"{step['mean'] * 1000:.0f} ± {step['sem'] * 1000:.0f} ms",
                     common.fmt_int(r["tokens_per_step"] / step["mean"]),
                     f"{step['mean'] / results['dense']['step']['mean']:.2f}x",
                     f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"])
    return common.format_table(["model", "parameters", "active / token", "step time",
                                "tokens/s", "vs dense", "loss/turn first -> last"], rows)


def plot(results: dict, found: dict, path: str, info: dict, subtitle: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    keys = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    means = [results[k]["step"]["mean"] * 1000 for k in keys]
    errors = [results[k]["step"]["sem"] * 1000 for k in keys]
    left.bar([VARIANTS[k][0].replace(", ", ",\n") for k in keys], means, yerr=errors,
             color=["C7", "C0", "C1"])
    left.set_ylabel("step time (ms, mean ± sem)")
    left.set_title(f"step time ({subtitle})", fontsize=9)
    names = list(found)
    right.barh(names, [found[n] for n in names], color="C2")
    right.axvline(1.0, color="0.3", lw=0.8)
    for y, name in enumerate(names):
        right.text(found[name], y, f" {found[name]:.2f}x", va="center", fontsize=8)
    right.set_xlim(0, max(found.values()) * 1.18)
    right.set_title("step-time ratios (same packs, same run)", fontsize=9)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    common.save_figure(fig, path, info)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small model and data")
    parser.add_argument("--work-dir", help="scratch data (default benchmarks/work/moe)")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR,
                        help="where moe[-quick].json / .png go")
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=2, help="per rank and step")
    for name in ("hidden", "experts", "topk", "expert-ffn", "layers", "heads", "conversations",
                 "seq", "steps"):
        parser.add_argument(f"--{name}", type=int, help="default: see SIZES (quick / full)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in SIZES[args.quick].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps {args.steps}: needs at least {WARMUP + 2} ({WARMUP} warm-up)")
    if args.experts % 2 or not 1 <= args.topk <= args.experts:
        parser.error(f"--experts {args.experts} --topk {args.topk}: EP=2 needs an even number "
                     "of experts and 1 <= top k <= experts")
    args.work_dir = args.work_dir or os.path.join(common.WORK_DIR, "moe")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    info = common.machine_info()
    print(common.header("Mixture-of-Experts step time", info, args.quick), flush=True)
    os.makedirs(args.work_dir, exist_ok=True)
    prefix = prepare_data(args)
    print(f"training dense / MoE EP=1 / MoE EP=2 round-robin, {args.steps} steps each "
          f"({WARMUP} warm-up), 2 processes ...", flush=True)
    results = launch_worker(args, prefix)
    load_end = common.machine_info()["load_average_1_5_15"]
    found = ratios(results)
    text = table(results)
    setting = (f"{args.layers} layers, hidden {args.hidden}, {args.experts} experts of inner size "
               f"{args.expert_ffn}, top {args.topk} (dense: inner size "
               f"{args.topk * args.expert_ffn}); seq {args.seq} x micro-batch "
               f"{args.micro_batch_size}, {args.micro_batches} micro-batches per rank, DP=2")
    print(f"\n{setting}\n{text}")
    for name, value in found.items():
        print(f"ratio {name}: {value:.2f}x")
    print(f"load average (1, 5, 15 min): {info['load_average_1_5_15']} at the start, {load_end} "
          f"at the end, on {info['usable_cores']} usable cores")
    paths = {"json": os.path.join(args.results_dir, "moe" + ("-quick" if args.quick else "")
                                  + ".json")}
    paths["png"] = paths["json"][:-5] + ".png"
    os.makedirs(args.results_dir, exist_ok=True)
    common.write_json(paths["json"], {
        "benchmark": "moe", "quick": args.quick, "machine": info, "load_average_end": load_end,
        "command": "python benchmarks/bench_moe.py" + (" --quick" if args.quick else ""),
        "settings": {name: getattr(args, name) for name in (*SIZES[True], "micro_batch_size",
                                                            "micro_batches")},
        "setting": setting, "warmup_steps": WARMUP, "variants": results, "ratios": found,
        "table": text})
    plot(results, found, paths["png"], info, f"seq {args.seq}, {args.experts} experts top "
         f"{args.topk}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
