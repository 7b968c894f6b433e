"""LoRA adapters on megatron-core's tensor-parallel linear layers (``--lora-rank``).

Each targeted layer ``W`` (``linear_qkv``, ``linear_proj``, ``linear_fc1``, ``linear_fc2`` of every
transformer layer) stays megatron-core's own module, frozen, with the same state-dict keys; an
adapter ``lora`` (``A`` [rank, in], ``B`` [out, rank]) is attached as its child and a forward hook
adds ``scaling * B(A(dropout(x)))`` (``scaling = alpha / rank``) to the layer's output, which
stays ``(output, bias)``. Tensor parallelism (TP ranks r = 0 .. T-1) follows the layer::

    column-parallel (linear_qkv, linear_fc1: W_r = rows r of W, input replicated)
        A [rank, in]        replicated       a = A x, then copy_to_tensor_model_parallel_region
        B_r [out/T, rank]   rows r of B      out_r += scaling * B_r a   (B sharded like W)
        backward: da is all-reduced over TP (rank-sized), so dA is whole on every rank
    row-parallel (linear_proj, linear_fc2: W_r = columns r of W, input sharded)
        A_r [rank, in/T]    columns r of A   a = sum_r A_r x_r  (reduce_from_tensor_model_
        B [out, rank]       replicated                            parallel_region, rank-sized)
                                             out += scaling * B a

With sequence parallelism the mappings are the sequence-parallel ones (gather / reduce-scatter
of ``a``) and the adapter half that sees only a slice of the sequence is marked
``sequence_parallel``, so megatron-core's ``finalize_model_grads`` sums its gradient over TP.
``linear_fc1`` is ``[gate; up]`` with ``partition_stride`` 2 (rank r holds ``[gate_r; up_r]``):
its ``B`` is too, and its checkpoint entry goes through megatron-core's
``apply_swiglu_sharded_factory`` like the weight's. Transformer Engine's
``TELayerNormColumnParallelLinear`` normalizes its input inside; the adapter applies the same
RMSNorm (the module's own ``layer_norm_weight``) to the input it sees.

``apply_lora`` freezes every base parameter *before* megatron-core's DDP and optimizer are built,
so only adapters get gradient buffers, optimizer state and the data-parallel all-reduce.
Initialization is peft's: ``A`` uniform in +-1/sqrt(in) (kaiming-uniform, a = sqrt(5)) drawn
whole from a generator seeded by (seed, layer, target) and sliced, so it does not depend on the
layout; ``B`` = 0, so the adapted model starts equal to the base.

Checkpoint keys (``sharded_state_dict``): ``decoder.layers.{i}.self_attention.linear_qkv.lora.A``,
``...linear_qkv.lora.B`` and so on, global shapes, resharded by ``dist_checkpointing`` like any
weight.
"""

from __future__ import annotations

import math
import types
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F

COLUMN_TARGETS = ("linear_qkv", "linear_fc1")
ROW_TARGETS = ("linear_proj", "linear_fc2")
TARGETS = COLUMN_TARGETS + ROW_TARGETS
ADAPTER = "lora"  # the child module's name: keys ...linear_qkv.lora.A / .lora.B


def is_adapter_key(key: str) -> bool:
    """Whether a (sharded) state-dict key belongs to an adapter (``...linear_qkv.lora.A``)."""
    return f".{ADAPTER}." in key


class LoraAdapter(torch.nn.Module):
    """The low-rank update of one tensor-parallel linear layer (module docstring).

    Args:
        column: the base layer is column-parallel (else row-parallel).
        in_local, out_local: the base weight's local shape is [out_local, in_local].
        rank, alpha, dropout: LoRA rank, scaling numerator (scaling = alpha / rank), dropout
            probability on the adapter's input.
        tp_size: tensor-parallel size; tp_rank: this rank.
        gated: the base is ``linear_fc1`` of a gated MLP ([gate; up], partition stride 2).
        sequence_parallel: megatron's sequence parallelism is on.
        generator_seed: seed of the whole ``A`` drawn before slicing.
        dtype, device: of the parameters (the model's).
    """

    def __init__(self, column: bool, in_local: int, out_local: int, rank: int, alpha: float,
                 dropout: float, tp_size: int, tp_rank: int, gated: bool,
                 sequence_parallel: bool, generator_seed: int, dtype: torch.dtype,
                 device) -> None:
        super().__init__()
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        self.column, self.gated, self.rank = column, gated, rank
        self.scaling = alpha / rank
        self.dropout = torch.nn.Dropout(dropout) if dropout > 0 else torch.nn.Identity()
        self.sequence_parallel = sequence_parallel and tp_size > 1
        in_full = in_local if column else in_local * tp_size
        generator = torch.Generator().manual_seed(generator_seed)
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform_(a=sqrt(5)), as peft and nn.Linear
        full_a = torch.empty(rank, in_full).uniform_(-bound, bound, generator=generator)
        local_a = full_a if column else full_a.chunk(tp_size, dim=1)[tp_rank]
        self.A = torch.nn.Parameter(local_a.to(device=device, dtype=dtype).contiguous())
        self.B = torch.nn.Parameter(torch.zeros(out_local, rank, device=device, dtype=dtype))
        if tp_size > 1:  # the half sharded like the base weight
            sharded, dim = (self.B, 0) if column else (self.A, 1)
            set_tensor_model_parallel_attributes(sharded, True, dim, 2 if gated else 1)
        # the replicated half that sees a slice of the sequence: its gradient is partial
        replicated_on_slice = self.A if column else self.B
        replicated_on_slice.sequence_parallel = self.sequence_parallel

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's addition to the base output: [s, b, in_local] -> [s, b, out_local]
        (column: out/T rows of this rank; row: the whole output, already reduced)."""
        from megatron.core import tensor_parallel as tp

        a = F.linear(self._dropout(x), self.A)
        if self.column:
            a = (tp.gather_from_sequence_parallel_region(a) if self.sequence_parallel
                 else tp.copy_to_tensor_model_parallel_region(a))
        else:
            a = (tp.reduce_scatter_to_sequence_parallel_region(a) if self.sequence_parallel
                 else tp.reduce_from_tensor_model_parallel_region(a))
        return F.linear(a, self.B) * self.scaling

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        """Dropout; on a row-parallel layer's input (a different slice on each TP rank) drawn
        from megatron's model-parallel RNG, as megatron draws dropout on sharded activations."""
        if isinstance(self.dropout, torch.nn.Identity) or not self.training or self.column:
            return self.dropout(x)
        from megatron.core.tensor_parallel import get_cuda_rng_tracker

        with get_cuda_rng_tracker().fork():
            return self.dropout(x)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in fp32: this rank's part of the weight update (the shape of the
        base weight's local shard)."""
        return (self.B.float() @ self.A.float()) * self.scaling


def _te_norm_input(module, x: torch.Tensor) -> torch.Tensor:
    """The input TE's ``LayerNormLinear`` feeds its GEMM: RMSNorm with the module's weight."""
    weight = module.layer_norm_weight
    if getattr(module, "zero_centered_gamma", False):
        weight = weight + 1
    normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + module.eps)
    return (normed * weight.float()).to(x.dtype)


def _forward_hook(module, args, output):
    out, bias = output
    x = args[0]
    if hasattr(module, "layer_norm_weight"):  # TE: the norm is fused into this layer
        x = _te_norm_input(module, x)
    return out + module.lora.delta(x).to(out.dtype), bias


def _sharded_state_dict_with_adapter(self, prefix: str = "", sharded_offsets=(), metadata=None):
    """The base layer's own ``sharded_state_dict`` with the adapter's entries sharded as
    ``LoraAdapter`` holds them (the base method takes them for replicated tensors)."""
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
    from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

    state = self._lora_base_sharded_state_dict(prefix, sharded_offsets, metadata)
    adapter = self.lora
    axis = {"B": 0} if adapter.column else {"A": 1}
    entries = make_sharded_tensors_for_checkpoint(
        {"A": adapter.A, "B": adapter.B}, f"{prefix}{ADAPTER}.", axis, sharded_offsets,
        tp_group=getattr(self, "tp_group", None),
        dp_cp_group=(metadata or {}).get("dp_cp_group"))
    if adapter.gated:
        key = f"{prefix}{ADAPTER}.B"
        entries[key] = apply_swiglu_sharded_factory(entries[key], sharded_offsets)
    state.update(entries)
    return state


def attach_adapter(base: torch.nn.Module, column: bool, gated: bool, lora, sequence_parallel:
                   bool, generator_seed: int) -> LoraAdapter:
    """Give megatron-core's layer ``base`` an adapter ``base.lora`` (``lora``: a ``LoraConfig``),
    its forward hook and its checkpoint entries. Returns the adapter."""
    from megatron.core import parallel_state as ps

    out_local, in_local = base.weight.shape
    adapter = LoraAdapter(
        column, in_local, out_local, lora.lora_rank, lora.alpha, lora.lora_dropout,
        ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), gated,
        sequence_parallel, generator_seed, base.weight.dtype, base.weight.device)
    base.add_module(ADAPTER, adapter)
    base.register_forward_hook(_forward_hook)
    base._lora_base_sharded_state_dict = base.sharded_state_dict
    base.sharded_state_dict = types.MethodType(_sharded_state_dict_with_adapter, base)
    return adapter


def targeted_layers(chunk: torch.nn.Module, targets) -> Iterator[Tuple[int, str,
                                                                       torch.nn.Module]]:
    """(global layer number from 1, target name, megatron layer) of a GPTModel chunk."""
    gpt = chunk.module if hasattr(chunk, "module") else chunk
    for layer in getattr(gpt, "decoder").layers:
        for name in targets:
            parent = layer.self_attention if name in ("linear_qkv", "linear_proj") else layer.mlp
            yield layer.layer_number, name, getattr(parent, name)


def apply_lora(chunks: List[torch.nn.Module], lora, tconfig, seed: int) -> None:
    """Freeze every parameter of the GPTModel ``chunks`` and attach an adapter to each targeted
    layer (``lora``: an enabled ``LoraConfig``; ``tconfig``: the TransformerConfig). Call before
    ``wrap_ddp`` and ``build_optimizer``."""
    for chunk in chunks:
        for param in chunk.parameters():
            param.requires_grad_(False)
        for number, name, base in targeted_layers(chunk, lora.targets):
            attach_adapter(base, name in COLUMN_TARGETS,
                           name == "linear_fc1" and tconfig.gated_linear_unit, lora,
                           tconfig.sequence_parallel,
                           generator_seed=seed * 1000003 + number * 8 + TARGETS.index(name))


def adapters(chunks: List[torch.nn.Module]) -> Dict[str, LoraAdapter]:
    """Every adapter of the (bare or DDP-wrapped) chunks by its module name."""
    found = {}
    for chunk in chunks:
        for name, module in chunk.named_modules():
            if isinstance(module, LoraAdapter):
                found[name] = module
    return found


def parameter_counts(chunks: List[torch.nn.Module]) -> Tuple[int, int]:
    """(trainable, total) parameters of the whole model, over every rank: a TP-sharded tensor
    counts each shard, a replicated one once, the tied output-layer copy of the last pipeline
    stage not at all; Mixture-of-Experts weights (megatron-core marks them ``allreduce=False``)
    count each expert-parallel rank's experts once, from expert-data-parallel rank 0. Collective
    over every rank."""
    from megatron.core import parallel_state as ps

    trainable = total = 0
    dense_rank = ps.get_data_parallel_rank(with_context_parallel=True) == 0 and ps.get_tensor_model_parallel_rank() == 0
    for chunk in chunks:
        for param in chunk.parameters():
            if getattr(param, "shared_embedding", False) and not \
                    ps.is_pipeline_first_stage(ignore_virtual=True):
                continue
            if not getattr(param, "allreduce", True):  # an expert's weight
                counted = ps.get_expert_data_parallel_rank() == 0 and (
                    getattr(param, "tensor_model_parallel", False)
                    or ps.get_expert_tensor_parallel_rank() == 0)
            else:
                counted = ps.get_data_parallel_rank(with_context_parallel=True) == 0 and (
                    getattr(param, "tensor_model_parallel", False) or dense_rank)
            if counted:
                total += param.numel()
                trainable += param.numel() if param.requires_grad else 0
    counts = torch.tensor([trainable, total], dtype=torch.float64)
    if torch.distributed.is_initialized():
        from mt_dialog.training.distributed import device

        counts = counts.to(device())
        torch.distributed.all_reduce(counts)
    return int(counts[0].item()), int(counts[1].item())


def merge_into_base(chunks: List[torch.nn.Module]) -> None:
    """Fold every adapter into its base weight (``W += scaling * B A``, in the weight's dtype
    after an fp32 product) and detach the adapters' effect by zeroing ``B``. For export."""
    for chunk in chunks:
        for module in chunk.modules():
            adapter = getattr(module, ADAPTER, None)
            if isinstance(adapter, LoraAdapter):
                with torch.no_grad():
                    module.weight.copy_((module.weight.float() + adapter.delta_weight())
                                        .to(module.weight.dtype))
                    adapter.B.zero_()


__all__ = ["ADAPTER", "COLUMN_TARGETS", "LoraAdapter", "ROW_TARGETS", "TARGETS", "adapters",
           "apply_lora", "attach_adapter", "is_adapter_key", "merge_into_base",
           "parameter_counts", "targeted_layers"]

