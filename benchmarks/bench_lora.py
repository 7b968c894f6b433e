#!/usr/bin/env python
"""LoRA vs full fine-tuning: trainable parameters, optimizer-state bytes, checkpoint bytes and
step time on the same tiny model and data, as ratios in one run; and the projected memory per
GPU of a Llama-2-70B-sized model at TP=8 for both, by formula.

Measured in one process (megatron-core groups of size 1, CPU or one GPU): the model of
``training.model`` with and without ``--lora-rank`` (every target), megatron-core's optimizer,
``loop.train_step`` on random packed conversations with the turn-normalized loss, and
``checkpoint.save_checkpoint`` (LoRA: adapters + their optimizer state only).

Projection (per GPU, TP=8, PP=1, no distributed optimizer; activations, buffers and framework
overhead excluded): full fine-tuning in bf16 with megatron's mixed precision keeps per trained
parameter 2 B (bf16 weight) + 4 B (fp32 gradient, grad_reduce_in_fp32) + 4 B (fp32 main weight)
+ 8 B (Adam moments) = 18 B; LoRA keeps 2 B per frozen base parameter and 18 B per adapter
parameter. TP shards: column-parallel adapters hold A whole and B / 8, row-parallel ones A / 8
and B whole; norms are replicated, embeddings and output layer split over TP.

    python benchmarks/bench_lora.py           # full run (~1 min)
    python benchmarks/bench_lora.py --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import types
from typing import Dict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402

LLAMA2_70B = {"layers": 80, "hidden": 8192, "heads": 64, "groups": 8, "ffn": 28672,
              "vocab": 32000}
FULL_BYTES, FROZEN_BYTES = 18, 2  # per parameter (module docstring)


def projected_memory(rank: int, tp: int = 8, m: Dict[str, int] = LLAMA2_70B) -> Dict[str, float]:
    """Per-GPU parameter, gradient and optimizer-state bytes of full and LoRA (all four targets,
    ``rank``) fine-tuning at tensor-parallel size ``tp`` (module docstring), and the counts."""
    h, f, layers = m["hidden"], m["ffn"], m["layers"]
    qkv_out = h + 2 * m["groups"] * (h // m["heads"])
    linear = h * qkv_out + h * h + h * 2 * f + f * h  # qkv, proj, fc1, fc2 weights per layer
    norms = 2 * h
    per_gpu_base = layers * (linear / tp + norms) + 2 * m["vocab"] * h / tp + h  # untied + final
    total_base = layers * (linear + norms) + 2 * m["vocab"] * h + h
    column = [(h, qkv_out), (h, 2 * f)]  # (in, out) of linear_qkv, linear_fc1
    row = [(h, h), (f, h)]  # linear_proj, linear_fc2
    adapter_gpu = layers * rank * (sum(i + o / tp for i, o in column)
                                   + sum(i / tp + o for i, o in row))
    adapter_total = layers * rank * sum(i + o for i, o in column + row)
    return {"parameters": total_base, "adapter_parameters": adapter_total,
            "full_bytes_per_gpu": FULL_BYTES * per_gpu_base,
            "lora_bytes_per_gpu": FROZEN_BYTES * per_gpu_base + FULL_BYTES * adapter_gpu}


def _config(lora_rank, hidden: int, layers: int, seq: int):
    from mt_dialog.training.config import (
        DataConfig, DialogTrainingConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig,
        TrainConfig)

    return DialogTrainingConfig(
        ModelConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=4,
                    transformer_impl="local", make_vocab_size_divisible_by=1),
        ParallelConfig(), DataConfig(data_path=["-"], seq_length=seq, micro_batch_size=2),
        OptimConfig(lr=1e-3, lr_decay_style="constant"), TrainConfig(train_iters=10 ** 6),
        lora=LoraConfig(lora_rank=lora_rank))


def _packs(count: int, seq: int, vocab: int):
    """Random packs of conversations (ids, one trained reply each), as training samples."""
    import numpy as np

    from mt_dialog.data.dataset import build_sample

    rng = np.random.default_rng(0)
    samples = []
    for _ in range(count):
        lengths = [seq // 4] * 3
        counts = np.concatenate([np.r_[np.zeros(n - 8, np.int64), np.full(8, 8)]
                                 for n in lengths])
        tokens = rng.integers(3, vocab, size=sum(lengths))
        samples.append(build_sample(tokens, counts, np.array(lengths), seq, 0))
    return samples


def _optimizer_state_bytes(optimizer) -> int:
    """Bytes of the optimizer's own tensors: Adam moments and fp32 main parameters."""
    from mt_dialog.training.optimizer import inner_optimizers

    total = 0
    for inner in inner_optimizers(optimizer):
        for group in inner.param_groups:
            for param in group["params"]:
                total += sum(t.numel() * t.element_size() for t in inner.state[param].values()
                             if hasattr(t, "numel") and t.dim() > 0)
    return total


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(path)
               for n in files)


def measure(lora_rank, hidden: int, layers: int, seq: int, steps: int) -> Dict[str, float]:
    """One variant (``lora_rank`` None: full fine-tuning): counts, bytes, seconds per step."""
    from megatron.core.distributed import finalize_model_grads

    from mt_dialog.config_utils import to_dict
    from mt_dialog.training import distributed, loop
    from mt_dialog.training.checkpoint import save_checkpoint
    from mt_dialog.training.data import DataInfo
    from mt_dialog.training.lora import is_adapter_key, parameter_counts
    from mt_dialog.training.model import build_model_chunks, transformer_config, wrap_ddp
    from mt_dialog.training.optimizer import build_optimizer
    from pretrain_dialog import make_forward_step

    vocab = 512
    config = _config(lora_rank, hidden, layers, seq)
    distributed.initialize_single_process(1234)
    tconfig = transformer_config(config)
    model = wrap_ddp(build_model_chunks(config, tconfig, vocab, seq), tconfig, config)
    tconfig.no_sync_func, tconfig.finalize_model_grads_func = model[0].no_sync, finalize_model_grads
    optimizer, scheduler = build_optimizer(config, model, 10 ** 6)
    info = DataInfo(prefixes=["-"], weights=[1.0], valid_prefixes=[], seq_length=seq,
                    vocab_size=vocab, tokenizer={}, special_ids={"pad": 0})
    stream = _packs(4 * (steps + 1), seq, vocab)
    run = loop.Run(config, info, model, optimizer, scheduler, stream, [],
                   make_forward_step("turn"), 1, 4, steps + 1)
    loop.train_step(run)  # warm-up (and the optimizer state exists)
    started = common.wall()
    for _ in range(steps):
        loop.train_step(run)
    step_s = (common.wall() - started) / steps
    trainable, total = parameter_counts(model)
    folder = tempfile.mkdtemp(prefix="bench_lora_")
    try:
        lora = {"select": is_adapter_key, "common": {"lora_base": {}}} if lora_rank else {}
        path = save_checkpoint(folder, run.iteration, run.consumed, model, optimizer, scheduler,
                               to_dict(config), **lora)
        checkpoint = _folder_bytes(path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    distributed.destroy_single_process()
    return {"trainable": trainable, "total": total, "optimizer_bytes":
            _optimizer_state_bytes(optimizer), "checkpoint_bytes": checkpoint, "step_s": step_s}


def _plot(full, lora, ratios, projection, path, info) -> None:
    plt = common.pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = list(ratios)
    left.bar(names, [ratios[n] for n in names], color="tab:blue")
    left.set_yscale("log")
    left.set_ylabel("LoRA / full (log)")
    left.set_title("tiny model, measured")
    left.tick_params(axis="x", labelrotation=20)
    right.bar(["full", "LoRA"], [projection["full_bytes_per_gpu"] / 2 ** 30,
                                 projection["lora_bytes_per_gpu"] / 2 ** 30],
              color=["tab:gray", "tab:green"])
    right.set_ylabel("GiB per GPU (params + grads + optimizer)")
    right.set_title("70B at TP=8, by formula")
    fig.tight_layout()
    common.save_figure(fig, path, info)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: smaller model, 2 steps")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
    parser.add_argument("--results-dir", default=None, help="where the JSON and PNG go "
                        "(default: benchmarks/results)")
    args = parser.parse_args(argv)
    common.quiet_warnings()
    hidden, layers, seq, steps = (64, 2, 128, 2) if args.quick else (256, 4, 512, 10)
    info = common.machine_info()
    print(common.header("LoRA vs full fine-tuning", info, args.quick))
    full = measure(None, hidden, layers, seq, steps)
    lora = measure(args.rank, hidden, layers, seq, steps)
    ratios = {name: lora[key] / full[key] for name, key in (
        ("trainable parameters", "trainable"), ("optimizer state", "optimizer_bytes"),
        ("checkpoint", "checkpoint_bytes"), ("step time", "step_s"))}
    print(f"model: {layers} layers, hidden {hidden}, {full['total']:,} parameters; packs of "
          f"{seq} tokens, micro-batch 2, 4 packs per step; LoRA rank {args.rank} on all targets")
    rows = [["trainable parameters", common.fmt_int(full["trainable"]),
             common.fmt_int(lora["trainable"])],
            ["optimizer state bytes", common.fmt_int(full["optimizer_bytes"]),
             common.fmt_int(lora["optimizer_bytes"])],
            ["checkpoint bytes", common.fmt_int(full["checkpoint_bytes"]),
             common.fmt_int(lora["checkpoint_bytes"])],
            ["step time", common.fmt_seconds(full["step_s"]), common.fmt_seconds(lora["step_s"])]]
    for row, ratio in zip(rows, ratios.values()):
        row.append(f"{ratio:.4f}")
    print(common.format_table(["measure", "full", "LoRA", "LoRA / full"], rows))
    projection = projected_memory(16)
    gib = 2 ** 30
    print(f"projected per GPU, Llama-2-70B-sized ({projection['parameters'] / 1e9:.2f} B "
          "parameters) at TP=8, bf16 + fp32 Adam, LoRA rank 16 on all targets "
          f"({projection['adapter_parameters'] / 1e6:.1f} M adapter parameters): full "
          f"{projection['full_bytes_per_gpu'] / gib:.1f} GiB, LoRA "
          f"{projection['lora_bytes_per_gpu'] / gib:.1f} GiB (activations excluded)")
    out_dir = args.results_dir or common.RESULTS_DIR
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "lora" + ("-quick" if args.quick else ""))
    common.write_json(stem + ".json", {
        "benchmark": "lora", "quick": args.quick, "machine": info, "rank": args.rank,
        "model": {"layers": layers, "hidden": hidden, "seq_length": seq, "steps": steps},
        "full": full, "lora": lora, "ratios": ratios, "projection_70b_tp8": projection})
    _plot(full, lora, ratios, projection, stem + ".png", info)
    print(f"wrote {stem}.json and {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
