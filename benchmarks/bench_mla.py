#!/usr/bin/env python
"""Multi-latent attention (MLA, DeepSeek-V3's) vs grouped-query attention (GQA) of the same
parameter count: step time on the same packs, as a ratio of one run.

Two runs of the real training path (``mt_dialog.training``: megatron-core GPTModel on the local
spec with the packed core attention, ``pretrain_dialog.make_forward_step``, ``loop.train_step``
with DDP, the turn-normalized loss; CPU, gloo, fp32, ``OMP_NUM_THREADS=1``) in ONE ``torchrun
--nproc_per_node 2`` launch (data-parallel size 2), stepping in turn (round-robin) so that a
change in machine load hits both alike; the first ``WARMUP`` steps are not timed:

  gqa   H hidden, A heads of size d, G key/value groups: q, k, v, o projections
        (attention parameters per layer: 2 H A d + 2 H G d)
  mla   the same heads with MLA's projections (``--multi-latent-attention``, no query rank as in
        the Lite models): q [H -> A (n + r)], kv_down [H -> c + r], kv_norm [c], kv_up
        [c -> A (n + v)], o [A v -> H] with n = --qk-head-dim, r = --qk-pos-emb-head-dim,
        v = --v-head-dim, c = --kv-lora-rank; the SwiGLU inner size is set so that the whole
        model has the GQA model's parameter count (3 H x inner-size difference per layer, the
        nearest integer: the counts are printed)

    python benchmarks/bench_mla.py           # full run (a few minutes on 2 cores)
    python benchmarks/bench_mla.py --quick   # smoke run (~30 s)
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from bench_moe import prepare_data  # noqa: E402  (the same packed synthetic corpus)

WARMUP = 2
VARIANTS = {"gqa": "GQA", "mla": "MLA (no query rank)"}
SIZES = {  # quick / full
    True: {"hidden": 64, "heads": 4, "groups": 2, "head_dim": 16, "ffn": 128, "layers": 2,
           "kv_lora_rank": 32, "qk_head_dim": 16, "qk_pos_emb_head_dim": 8, "v_head_dim": 16,
           "conversations": 60, "seq": 512, "steps": 6},
    False: {"hidden": 256, "heads": 8, "groups": 2, "head_dim": 32, "ffn": 512, "layers": 2,
            "kv_lora_rank": 128, "qk_head_dim": 32, "qk_pos_emb_head_dim": 16,
            "v_head_dim": 32, "conversations": 400, "seq": 1024, "steps": 30},
}


def attention_parameters(args, mla: bool) -> int:
    """Attention weights of one layer (module docstring; MLA's kv_norm included)."""
    h, a = args.hidden, args.heads
    if not mla:
        return 2 * h * a * args.head_dim + 2 * h * args.groups * args.head_dim
    n, r, v, c = args.qk_head_dim, args.qk_pos_emb_head_dim, args.v_head_dim, args.kv_lora_rank
    return h * a * (n + r) + h * (c + r) + c + c * a * (n + v) + a * v * h


def mla_ffn(args) -> int:
    """The MLA model's SwiGLU inner size: the GQA one's, corrected by the attention's parameter
    difference (3 H weights per unit of inner size)."""
    difference = attention_parameters(args, False) - attention_parameters(args, True)
    return args.ffn + round(difference / (3 * args.hidden))


def _config(key: str, args):
    from mt_dialog.training.config import (DataConfig, DialogTrainingConfig, ModelConfig,
                                           OptimConfig, ParallelConfig, TrainConfig)

    attention = dict(num_query_groups=args.groups, kv_channels=args.head_dim,
                     ffn_hidden_size=args.ffn)
    if key == "mla":
        attention = dict(multi_latent_attention=True, qk_layernorm=True,
                         kv_lora_rank=args.kv_lora_rank, qk_head_dim=args.qk_head_dim,
                         qk_pos_emb_head_dim=args.qk_pos_emb_head_dim,
                         v_head_dim=args.v_head_dim, ffn_hidden_size=mla_ffn(args))
    return DialogTrainingConfig(
        ModelConfig(num_layers=args.layers, hidden_size=args.hidden,
                    num_attention_heads=args.heads, transformer_impl="local", **attention),
        ParallelConfig(),
        DataConfig(data_path=[args.data], micro_batch_size=1, global_batch_size=4,
                   loss_normalization="turn"),
        OptimConfig(lr=2e-3), TrainConfig(train_iters=args.steps, seed=1234, log_interval=10 ** 9))


def worker(args) -> int:
    """Build both runs, step them round-robin, write rank 0's step times, losses and parameter
    counts to ``--out``."""
    common.quiet_warnings()
    import torch
    from megatron.core import tensor_parallel

    import pretrain_dialog
    from mt_dialog.training import distributed, loop
    from mt_dialog.training.checkpoint import StartPoint
    from mt_dialog.training.config import validate_world
    from mt_dialog.training.data import inspect_datasets, open_datasets

    distributed.initialize(1, 1, None, 1234)
    runs = {}
    for key in VARIANTS:
        config = _config(key, args)
        info = inspect_datasets(config)
        dp = validate_world(config, torch.distributed.get_world_size())
        torch.manual_seed(config.train.seed)
        tensor_parallel.model_parallel_cuda_manual_seed(config.train.seed)
        run = loop._setup(config, info, open_datasets(config, info), StartPoint(None, False),
                          pretrain_dialog.make_forward_step("turn"), dp)
        params = sum(p.numel() for p in run.model[0].module.parameters())
        runs[key] = {"run": run, "params": int(params), "times": [], "losses": [],
                     "tokens_per_step": run.global_batch * info.seq_length,
                     "ffn": config.model.ffn_hidden_size}
    for _ in range(args.steps):
        for entry in runs.values():
            torch.distributed.barrier()
            start = common.wall()
            metrics = loop.train_step(entry["run"])
            entry["times"].append(common.wall() - start)
            entry["losses"].append(metrics["loss per turn"] if metrics else float("nan"))
    if torch.distributed.get_rank() == 0:
        out = {key: {"params": e["params"], "ffn": e["ffn"], "step_seconds": e["times"],
                     "step": common.stats(e["times"][WARMUP:]), "losses": e["losses"],
                     "tokens_per_step": e["tokens_per_step"]} for key, e in runs.items()}
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(out, handle)
    distributed.destroy()
    return 0


def table(results: dict) -> str:
    rows = []
    for key, r in results.items():
        step = r["step"]
        rows.append([VARIANTS[key], common.fmt_int(r["params"]), r["ffn"],
                     f"{step['mean'] * 1000:.0f} ± {step['sem'] * 1000:.0f} ms",
                     common.fmt_int(r["tokens_per_step"] / step["mean"]),
                     f"{step['mean'] / results['gqa']['step']['mean']:.2f}x",
                     f"{r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"])
    return common.format_table(["attention", "parameters", "SwiGLU inner", "step time",
                                "tokens/s", "vs GQA", "loss/turn first -> last"], rows)


def plot(results: dict, path: str, info: dict, subtitle: str) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, axis = plt.subplots(figsize=(6, 4))
    keys = list(results)
    axis.bar([VARIANTS[k] for k in keys], [results[k]["step"]["mean"] * 1000 for k in keys],
             yerr=[results[k]["step"]["sem"] * 1000 for k in keys], color=["C0", "C1"])
    axis.set_ylabel("step time (ms, mean ± sem)")
    axis.set_title(f"MLA vs GQA, same parameters ({subtitle})", fontsize=9)
    fig.tight_layout()
    common.save_figure(fig, path, info)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: small model and data")
    parser.add_argument("--work-dir", help="scratch data (default benchmarks/work/mla)")
    parser.add_argument("--results-dir", default=common.RESULTS_DIR,
                        help="where mla[-quick].json / .png go")
    for name in SIZES[True]:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help="default: see SIZES (quick / full)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, value in SIZES[args.quick].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.steps <= WARMUP + 1:
        parser.error(f"--steps {args.steps}: needs at least {WARMUP + 2} ({WARMUP} warm-up)")
    if mla_ffn(args) < 1:
        parser.error("the MLA sizes hold more parameters than the whole GQA model's attention "
                     "and MLP: raise --ffn or lower the MLA sizes")
    args.work_dir = args.work_dir or os.path.join(common.WORK_DIR, "mla")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    info = common.machine_info()
    print(common.header("MLA vs GQA step time", info, args.quick), flush=True)
    os.makedirs(args.work_dir, exist_ok=True)
    prefix = prepare_data(args)
    print(f"training GQA / MLA round-robin, {args.steps} steps each ({WARMUP} warm-up), "
          "2 processes ...", flush=True)
    worker_args = ["--data", prefix]
    for name in SIZES[True]:
        worker_args += [f"--{name.replace('_', '-')}", getattr(args, name)]
    results = common.run_torchrun_worker(__file__, worker_args,
                                         os.path.join(args.work_dir, "mla_result.json"))
    load_end = common.machine_info()["load_average_1_5_15"]
    ratio = results["mla"]["step"]["mean"] / results["gqa"]["step"]["mean"]
    text = table(results)
    setting = (f"{args.layers} layers, hidden {args.hidden}, {args.heads} heads; GQA: "
               f"{args.groups} groups of head size {args.head_dim}; MLA: kv rank "
               f"{args.kv_lora_rank}, qk {args.qk_head_dim} + rope {args.qk_pos_emb_head_dim}, "
               f"v {args.v_head_dim}; seq {args.seq}, 2 micro-batches per rank, DP=2")
    print(f"\n{setting}\n{text}\nratio mla / gqa: {ratio:.2f}x")
    print(f"load average (1, 5, 15 min): {info['load_average_1_5_15']} at the start, {load_end} "
          f"at the end, on {info['usable_cores']} usable cores")
    paths = common.result_paths("mla", args.quick)
    if args.results_dir != common.RESULTS_DIR:
        paths = {k: os.path.join(args.results_dir, os.path.basename(v)) for k, v in paths.items()}
    os.makedirs(args.results_dir, exist_ok=True)
    common.write_json(paths["json"], {
        "benchmark": "mla", "quick": args.quick, "machine": info, "load_average_end": load_end,
        "command": "python benchmarks/bench_mla.py" + (" --quick" if args.quick else ""),
        "settings": {name: getattr(args, name) for name in SIZES[True]}, "setting": setting,
        "warmup_steps": WARMUP, "variants": results, "ratio_mla_over_gqa": ratio,
        "table": text})
    plot(results, paths["png"], info, f"seq {args.seq}")
    print(f"wrote {paths['json']} and {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
