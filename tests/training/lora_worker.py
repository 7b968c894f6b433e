"""torchrun worker (2 processes): LoRA training through the LIBRARY path at several layouts in
one launch, against plain-PyTorch references on the gathered full weights.

    torchrun --nproc_per_node 2 tests/training/lora_worker.py --json OUT.json [--ckpt DIR]

For each layout (TP=2; PP=2; DP=2, which is TP = PP = 1 with the distributed optimizer; and,
gradient only, PP=2 with 2 chunks per stage: 4 layers, 4 micro-batches) the megatron-core groups
are rebuilt in the same processes, and:

  gradient   the model of ``training.model.build_model_chunks`` with ``LoraConfig`` (every target,
             rank 4, alpha 8), adapters set to seeded full tensors sliced per rank (B nonzero, so
             A gets a gradient), one ``loop.train_step`` over 3 micro-batches with the
             turn-normalized loss; the optimizer is a recorder gathering the reduced adapter
             gradients, compared with ``reference.reference_grads`` on base + scaled B A
  structure  only adapters require grad and have DDP ``main_grad``; gathered adapters equal the
             full tensors they were sliced from (sharding and fc1's [gate; up] stride)
  training   megatron-core's optimizer (bf16 at TP=2), 2 steps: every base tensor bit-identical
             afterwards, adapters changed, losses finite
  checkpoint (--ckpt) the TP=2 run saves its LoRA checkpoint; the PP=2 layout loads it and its
             gathered adapters equal the saved ones (TP=2 -> PP=2 reshard)

Rank 0 writes everything to --json; the pass/fail decisions are the test's.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import warnings

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import pretrain_dialog  # noqa: E402
from mt_dialog.data.dataset import build_sample  # noqa: E402
from mt_dialog.training import distributed, loop  # noqa: E402
from mt_dialog.training.config import (  # noqa: E402
    DataConfig, DialogTrainingConfig, LoraConfig, ModelConfig, OptimConfig, ParallelConfig,
    TrainConfig, validate_world,
)
from mt_dialog.training.data import DataInfo  # noqa: E402
from mt_dialog.training.lora import adapters  # noqa: E402
from mt_dialog.training.model import build_model_chunks, transformer_config, wrap_ddp  # noqa: E402
from tests.training import reference as ref  # noqa: E402
from tests.training.equivalence_worker import GradRecorder  # noqa: E402

SEQ, MBS, SEED, MICRO = 64, 2, 1234, 3
RANK, ALPHA = 4, 8.0
LAYOUTS = (("tp2", 2, 1, False, True), ("pp2", 1, 2, False, True), ("dp2", 1, 1, True, False))
SAVED = {}  # what the TP=2 layout saved, for the PP=2 layout to load


def make_config(tp, pp, distributed_optimizer=False, bf16=False, vpp=None
                ) -> DialogTrainingConfig:
    return DialogTrainingConfig(
        ModelConfig(num_layers=4 if vpp else 2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                    num_query_groups=2, init_method_std=0.08, make_vocab_size_divisible_by=4,
                    transformer_impl="local"),
        ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                       virtual_pipeline_model_parallel_size=vpp,
                       use_distributed_optimizer=distributed_optimizer),
        DataConfig(data_path=["unused"], seq_length=SEQ, micro_batch_size=MBS),
        OptimConfig(lr=1e-2, bf16=bf16, weight_decay=0.0, lr_decay_style="constant"),
        TrainConfig(train_iters=2, seed=SEED),
        lora=LoraConfig(lora_rank=RANK, lora_alpha=ALPHA))


def build(config, world):
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import finalize_model_grads

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    dp = validate_world(config, world)
    par = config.parallel
    distributed.initialize(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                           par.virtual_pipeline_model_parallel_size, SEED)
    tconfig = transformer_config(config)
    model = wrap_ddp(build_model_chunks(config, tconfig, ref.VOCAB, SEQ), tconfig, config)
    tconfig.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
    tconfig.finalize_model_grads_func = finalize_model_grads
    return model, tconfig, dp


def full_adapter_tensors(names) -> dict:
    """Seeded full A [4, in] and B [out, 4] of every adapter (global names), the same on every
    rank and layout."""
    sizes = {"linear_qkv": (64, 128), "linear_proj": (64, 64), "linear_fc1": (64, 256),
             "linear_fc2": (128, 64)}  # (in, out): qkv = 2 groups x (2 q + k + v) x 16
    gen = torch.Generator().manual_seed(99)
    out = {}
    for name in sorted(names):
        target = name.split(".")[-3]
        size_in, size_out = sizes[target]
        if name.endswith(".A"):
            out[name] = torch.randn(RANK, size_in, generator=gen) * 0.2
        else:
            out[name] = torch.randn(size_out, RANK, generator=gen) * 0.2
    return out


def names_of(model) -> dict:
    """Global parameter names of every model chunk (``reference.global_names``)."""
    return {k: v for chunk in model for k, v in ref.global_names(chunk).items()}


def set_adapters(model, full) -> None:
    """Each rank's slice of the full adapter tensors into its adapters."""
    from megatron.core import parallel_state as ps

    tp, r = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    for name, param in names_of(model).items():
        if ".lora." not in name:
            continue
        value = full[name]
        if getattr(param, "tensor_model_parallel", False) and tp > 1:
            dim, stride = param.partition_dim, param.partition_stride
            parts = value.chunk(stride, dim=dim)  # [gate; up] for fc1's B
            value = torch.cat([p.chunk(tp, dim=dim)[r] for p in parts], dim=dim)
        with torch.no_grad():
            param.copy_(value.to(param.dtype))


def gather_names(names) -> list:
    """Every rank's names, so that the seeded full tensors are drawn in the same order on all
    ranks (each pipeline stage holds only its own layers). Collective."""
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, list(names))
    return sorted({n for part in everyone for n in part})


def effective_weights(leaves: dict) -> dict:
    """Base weights + (alpha / rank) B A where an adapter exists (reference_grads' hook)."""
    out = dict(leaves)
    for name in leaves:
        if name.endswith(".lora.A"):
            base = name[: -len(".lora.A")]
            out[base + ".weight"] = leaves[base + ".weight"] + \
                (ALPHA / RANK) * leaves[base + ".lora.B"] @ leaves[name]
    return out


def make_run(config, model, dp, optimizer, scheduler, micro=MICRO):
    info = DataInfo(prefixes=["unused"], weights=[1.0], valid_prefixes=[], seq_length=SEQ,
                    vocab_size=ref.VOCAB, tokenizer={}, special_ids={"pad": ref.PAD})
    batch = dp * micro * MBS
    packs = ref.make_packs(seed=103, n_packs=2 * batch, seq=SEQ)  # two steps' worth
    stream = [build_sample(*p.triple(), SEQ, ref.PAD) for p in packs]
    run = loop.Run(config=config, info=info, model=model, optimizer=optimizer,
                   scheduler=scheduler, train_stream=stream, valid_sets=[],
                   forward_step=pretrain_dialog.make_forward_step("turn"), dp_size=dp,
                   global_batch=batch, train_iters=2)
    return run, [c for p in packs[:batch] for c in p.conversations]  # the first step's


def gradient_check(name, tp, pp, world, vpp=None) -> dict:
    config = make_config(tp, pp, vpp=vpp)
    model, _, dp = build(config, world)
    names = [n for n in names_of(model) if ".lora." in n]
    full = full_adapter_tensors(gather_names(names))
    set_adapters(model, full)
    W = ref.gather_chunks(model, "data")
    res = {"tp": tp, "pp": pp, "dp": dp, "vpp": vpp, "chunks": len(model)}
    res["gathered_adapter_max_abs"] = max(float((W[n] - full[n]).abs().max()) for n in names)
    trainable = {n for n, p in names_of(model).items() if p.requires_grad}
    with_grad = {n for n, p in names_of(model).items() if hasattr(p, "main_grad")}
    res["trainable_not_adapter"] = sorted(n for n in trainable if ".lora." not in n)
    res["main_grad_not_adapter"] = sorted(n for n in with_grad if ".lora." not in n)
    res["adapters_here"] = len(adapters(model))
    recorder = GradRecorder(model)
    run, convs = make_run(config, model, dp, recorder,
                          types.SimpleNamespace(step=lambda increment=1: None),
                          # interleaving: a multiple of PP, more than PP so that 1F1B's
                          # steady state runs (model.batch_p2p_comm: why batching is off there)
                          micro=4 if vpp else MICRO)
    metrics = loop.train_step(run)
    G = recorder.grads
    if dist.get_rank() == 0:
        Wref = {k: v for k, v in W.items() if k != "output_layer.weight"}  # tied copy
        loss, g = ref.reference_grads(Wref, convs, "turn", config.model, True, effective_weights)
        want = {k: v for k, v in g.items() if ".lora." in k}
        res["grad_names"] = sorted(G)
        res["reference_adapter_grads"] = len(want)
        res["max_rel_err"], res["worst"] = ref.max_rel_err({k: G[k] for k in want}, want)
        res["rel_err"] = {k: ref.max_rel_err({k: G[k]}, {k: want[k]})[0] for k in want}
        res["loss_ref"] = loss
    res["logged_loss_per_turn"] = last_stage_value(metrics and metrics["loss per turn"])
    return res


def last_stage_value(value):
    """The value of the ranks that have one (the last pipeline stage's metrics), on every
    rank. Collective."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value if value != [None, None] else None)
    return next(v for v in values if v is not None)


def training_check(name, tp, pp, distributed_optimizer, bf16, world, ckpt) -> dict:
    from mt_dialog.training.lora import parameter_counts
    from mt_dialog.training.optimizer import build_optimizer

    config = make_config(tp, pp, distributed_optimizer, bf16)
    model, tconfig, dp = build(config, world)
    set_adapters(model, full_adapter_tensors(gather_names(
        [n for n in names_of(model) if ".lora." in n])))
    optimizer, scheduler = build_optimizer(config, model, 2)
    tconfig.grad_scale_func = optimizer.scale_loss
    res = {}
    if ckpt and name == "pp2":
        res.update(load_resharded(model, optimizer, scheduler, ckpt))
    before = ref.gather_chunks(model, "data")
    run, _ = make_run(config, model, dp, optimizer, scheduler)
    losses = [loop.train_step(run) for _ in range(2)]
    after = ref.gather_chunks(model, "data")
    trainable, total = parameter_counts(model)
    res.update({"bf16": bf16, "distributed_optimizer": distributed_optimizer,
           "dtype": str(next(iter(adapters(model).values())).A.dtype),
           "trainable": trainable, "total": total,
           "base_changed": sorted(k for k in before if ".lora." not in k
                                  and not torch.equal(before[k], after[k])),
           "base_tensors": sum(".lora." not in k for k in before),
           "adapters_unchanged": sorted(k for k in before if ".lora." in k
                                        and torch.equal(before[k], after[k])),
           "losses": last_stage_value([m and m["loss per turn"] for m in losses])})
    if ckpt and name == "tp2":
        save_base_and_adapters(config, run, ckpt)
        SAVED["weights"] = after
    return res


def save_base_and_adapters(config, run, ckpt) -> None:
    """The TP=2 model's base as a weights-only checkpoint (as hf-to-mcore writes one) and its
    adapters + optimizer state as the LoRA checkpoint pointing to it (as training saves)."""
    from megatron.core import dist_checkpointing

    from mt_dialog.config_utils import to_dict
    from mt_dialog.training.checkpoint import TRACKER, _model_state, iteration_dir, save_checkpoint
    from mt_dialog.training.lora import is_adapter_key
    from mt_dialog.training.lora_checkpoint import base_pointer, is_base_key

    base, lora = os.path.join(ckpt, "base"), os.path.join(ckpt, "lora")
    state = _model_state(run.model, is_base_key)
    state.update(weights_only=True, iteration=0, consumed_samples=0, layout=[1, 2, 1])
    if dist.get_rank() == 0:
        os.makedirs(iteration_dir(base, 0))
    dist.barrier()
    dist_checkpointing.save(state, iteration_dir(base, 0))
    if dist.get_rank() == 0:
        with open(os.path.join(base, TRACKER), "w") as handle:
            handle.write("0")
    dist.barrier()
    save_checkpoint(lora, run.iteration, run.consumed, run.model, run.optimizer, run.scheduler,
                    to_dict(config), select=is_adapter_key,
                    common={"lora_base": base_pointer(base)})


def load_resharded(model, optimizer, scheduler, ckpt) -> dict:
    """Load the TP=2 LoRA checkpoint (base through its pointer, then adapters, optimizer,
    scheduler) into this PP=2 model; compare every gathered tensor with what TP=2 saved."""
    from mt_dialog.training.checkpoint import StartPoint
    from mt_dialog.training.lora_checkpoint import load_lora_start

    iteration, consumed, pointer = load_lora_start(
        StartPoint(os.path.join(ckpt, "lora"), False), model, optimizer, scheduler)
    loaded, saved = ref.gather_chunks(model, "data"), SAVED["weights"]
    differ = []
    for key, value in loaded.items():
        if key == "output_layer.weight":  # the tied copy on the last stage
            continue
        rows = min(value.shape[0], saved[key].shape[0])  # vocabulary padding differs
        if not torch.equal(value[:rows], saved[key][:rows]):
            differ.append(key)
    return {"reshard_iteration": iteration, "reshard_consumed": consumed,
            "reshard_tensors": len(loaded) - 1, "reshard_differ": differ,
            "reshard_adapters": sum(".lora." in k for k in loaded)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--ckpt", default=None)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    out = {}
    for name, tp, pp, dist_opt, bf16 in LAYOUTS:
        out[name] = {"gradient": gradient_check(name, tp, pp, world),
                     "training": training_check(name, tp, pp, dist_opt, bf16, world, args.ckpt)}
    out["vpp2"] = {"gradient": gradient_check("vpp2", 1, 2, world, vpp=2)}
    if dist.get_rank() == 0:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=1)
        print(json.dumps(out), flush=True)
    dist.barrier()
    distributed.destroy()


if __name__ == "__main__":
    main()
