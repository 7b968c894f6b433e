"""Context parallelism (``--context-parallel-size N``) for packed conversations: how a flattened
micro-batch is split over the N ranks of a context-parallel group, and the collectives the
local (CPU) attention and validation need.

Layout: Transformer Engine's THD context parallelism (``thd_get_partitioned_indices``, used by
megatron-core's ``get_thd_batch_on_this_cp_rank``). Every attention segment (a conversation, or a
pack's padding) is padded at its end to a multiple of ``2N`` and cut into ``2N`` equal chunks;
rank ``r`` keeps chunks ``r`` and ``2N - 1 - r`` of every segment (causal load balance: an early
chunk has little to attend to, a late one much). Conversation A (6 tokens) and B (3 tokens, one
pad ``p``) at N = 2::

    global (padded)   A0 A1 | A2 A3 | A4 A5 | A6 p  || B0 | B1 | B2 | p
    chunks              0       1       2       3   ||  0    1    2   3
    rank 0            A0 A1 A6 p  B0 p                  (chunks 0 and 3)
    rank 1            A2 A3 A4 A5 B1 B2                 (chunks 1 and 2)

    cu_seqlens_q        [0, 7, 10]     real tokens (global offsets, as TE takes them)
    cu_seqlens_q_padded [0, 8, 12]     padded offsets; rank r's segment i is at
                                       [padded[i] / N, padded[i + 1] / N) of its local tensor

The padding is applied here, when a micro-batch is read (``split_micro_batch``), never baked into
a dataset, so one dataset serves any context-parallel size. The padded positions carry no loss
(``loss_mask`` 0) and come after a segment's real tokens, so causal attention never lets a real
token see them.

Exactness of the loss: every per-position quantity that needs the whole sequence (a turn's
length, where a turn or a conversation ends, a conversation's loss-token count) is computed by
``loss.position_weights`` on the full micro-batch *before* the split, and travels with the
tokens; each rank's ``(loss_sum, count)`` is then a plain sum over its positions, and the ranks'
sums add up to the full micro-batch's exactly (``finalize_model_grads`` reduces the count over
data x context parallel). A rank without any loss token returns ``(0.0, 0)``, never a NaN.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "gather_full",
    "global_order",
    "padded_cu_seqlens",
    "partition_indices",
    "split_micro_batch",
]


def padded_cu_seqlens(cu_seqlens: np.ndarray, multiple: int) -> np.ndarray:
    """Segment offsets after padding every segment of ``cu_seqlens`` (``[segments + 1]`` ints,
    ``cu[0] = 0``) up to a multiple of ``multiple`` (``2N``, or ``2N x TP`` with sequence
    parallelism); int64 ``[segments + 1]``."""
    lengths = np.diff(np.asarray(cu_seqlens, dtype=np.int64))
    padded = -(-lengths // multiple) * multiple
    return np.concatenate([[0], np.cumsum(padded)]).astype(np.int64)


def source_positions(cu_seqlens: np.ndarray, cu_padded: np.ndarray) -> np.ndarray:
    """For each global padded position, its index in the unpadded sequence, -1 for padding:
    int64 ``[cu_padded[-1]]`` (position p of segment i lands at ``cu_padded[i] + p -
    cu_seqlens[i]``)."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    cu_padded = np.asarray(cu_padded, dtype=np.int64)
    lengths = np.diff(cu)
    source = np.full(int(cu_padded[-1]), -1, dtype=np.int64)
    source[np.repeat(cu_padded[:-1] - cu[:-1], lengths) + np.arange(int(cu[-1]))] = \
        np.arange(int(cu[-1]))
    return source


def partition_indices(cu_padded: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    """The global (padded) positions rank ``cp_rank`` holds, in its local order: for each
    segment, chunk ``cp_rank`` then chunk ``2 * cp_size - 1 - cp_rank`` (module docstring; the
    layout of TE's ``thd_get_partitioned_indices``). int64 ``[cu_padded[-1] / cp_size]``."""
    pieces = []
    for start, end in zip(cu_padded[:-1].tolist(), cu_padded[1:].tolist()):
        chunk = (end - start) // (2 * cp_size)
        for index in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(np.arange(start + index * chunk, start + (index + 1) * chunk))
    return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, np.int64)


def global_order(cu_padded: np.ndarray, cp_size: int) -> np.ndarray:
    """Where each global (padded) position sits in the concatenation of every rank's local
    tensor (rank 0's first): int64 ``[cu_padded[-1]]``, so ``gathered[global_order(...)]`` is
    the sequence in global order."""
    held = np.concatenate([partition_indices(cu_padded, cp_size, r) for r in range(cp_size)])
    order = np.empty_like(held)
    order[held] = np.arange(held.size)
    return order


def split_micro_batches(batches: List[Dict], layout: tuple) -> List[Dict]:
    """This rank's part of each of a step's flattened micro-batches (``split_micro_batch``),
    all padded to the same length, the longest padded one's rounded up so that each rank holds
    a multiple of 32 positions (FP8 GEMMs need 16, MXFP8 32): the pipeline stages exchange
    activations of one fixed shape per step (every stage and context-parallel rank computes the
    same length from the same packs). ``layout``: ``layout(ParallelConfig)``; size 1
    returns ``batches`` as they are."""
    size, rank, multiple = layout
    if size == 1:
        return batches
    total = max(int(padded_cu_seqlens(b["cu_seqlens"].cpu().numpy(), multiple)[-1])
                for b in batches)
    step = math.lcm(multiple, 32 * size)  # each rank: a multiple of 32 positions (MXFP8 GEMMs)
    total = -(-total // step) * step
    return [split_micro_batch(b, size, rank, multiple, total) for b in batches]


def split_micro_batch(batch: Dict, cp_size: int, cp_rank: int, multiple: Optional[int] = None,
                      total: Optional[int] = None) -> Dict:
    """This context-parallel rank's part of a flattened micro-batch
    (``data.flatten_micro_batch``'s dict, whole): every ``[1, T]`` per-position tensor (tokens,
    labels, masks, loss weights, dataset ids) padded per attention segment and cut as in the
    module docstring, to ``[1, T_padded / cp_size]``; ``packed_seq_params`` with
    ``cu_seqlens_q/kv`` (real lengths) and ``cu_seqlens_q/kv_padded`` in global offsets and
    ``max_seqlen`` the longest padded segment (the RoPE table's length). Adds
    ``cp_positions`` (int64 ``[T_padded / cp_size]``: each local position's index in the
    unsplit micro-batch, -1 for padding), ``cp_full`` (the unsplit batch, for validation's
    ``gather_full``) and ``cp_size`` / ``cp_rank``. Counts (``num_tokens``, ``turn_num``,
    ``packs``) stay the whole micro-batch's. ``multiple``: the padding multiple (default
    ``2 * cp_size``); ``total``: the padded length to reach (a multiple of ``multiple``; the
    last segment takes the extra padding), default the segments' own padded length."""
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    multiple = multiple or 2 * cp_size
    cu = batch["cu_seqlens"].cpu().numpy().astype(np.int64)
    cu_padded = padded_cu_seqlens(cu, multiple)
    if total is not None and total > cu_padded[-1]:
        cu_padded[-1] = total
    mine = source_positions(cu, cu_padded)[partition_indices(cu_padded, cp_size, cp_rank)]
    device = batch["tokens"].device
    index = torch.as_tensor(np.maximum(mine, 0), device=device)
    real = torch.as_tensor(mine >= 0, device=device)

    def split(values: Dict) -> Dict:
        out = dict(values)
        for key, tensor in values.items():
            if isinstance(tensor, Tensor) and tensor.dim() == 2 and tensor.shape[1] == cu[-1]:
                picked = tensor[0, index]  # padding: 0 (no loss, no weight, token id 0)
                out[key] = torch.where(real, picked, torch.zeros_like(picked))[None, :]
        return out

    local = split(batch)
    local["loss_weights"] = split(batch["loss_weights"])
    params = packed_seq_params_from_cu_seqlens(
        batch["cu_seqlens"], max_seqlen=int(np.max(np.diff(cu_padded))))
    params.cu_seqlens_q_padded = params.cu_seqlens_kv_padded = torch.as_tensor(
        cu_padded, dtype=torch.int32, device=device)
    local.update(packed_seq_params=params, cp_positions=torch.as_tensor(mine, device=device),
                 cp_full=batch, cp_size=cp_size, cp_rank=cp_rank)
    return local


class _GatherSequence(torch.autograd.Function):
    """All-gather along dim 0 over a group (rank 0's part first); the backward sums each
    rank's gradient of the whole result and keeps this rank's part (an all-reduce: gloo has no
    reduce-scatter)."""

    @staticmethod
    def forward(ctx, tensor: Tensor, group) -> Tensor:
        ctx.group = group
        size = torch.distributed.get_world_size(group)
        parts = [torch.empty_like(tensor) for _ in range(size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        torch.distributed.all_reduce(grad, group=ctx.group)
        size = torch.distributed.get_world_size(ctx.group)
        rank = torch.distributed.get_rank(ctx.group)
        return grad.chunk(size, dim=0)[rank].contiguous(), None


def gather_sequence(tensor: Tensor, cu_padded: Tensor, group) -> Tensor:
    """The whole padded sequence in global order from every rank's local ``tensor``
    (``[T_padded / N, ...]``, this rank's positions as ``partition_indices`` orders them):
    ``[T_padded, ...]``, differentiable (the gradient of a position reaches the rank holding
    it). Used by the local attention for keys and values (``attention.PackedSDPAttention``)."""
    size = torch.distributed.get_world_size(group)
    order = _cached_order(tuple(cu_padded.tolist()), size)
    gathered = _GatherSequence.apply(tensor, group)
    return gathered[torch.as_tensor(order, device=tensor.device)]


_ORDERS: Dict = {}


def _cached_order(cu_padded: tuple, cp_size: int) -> np.ndarray:
    """``global_order`` memoized for the layers of one micro-batch (same boundaries)."""
    key = (cu_padded, cp_size)
    if key not in _ORDERS:
        if len(_ORDERS) > 64:
            _ORDERS.clear()
        _ORDERS[key] = global_order(np.asarray(cu_padded, dtype=np.int64), cp_size)
    return _ORDERS[key]


def local_positions(cu_padded: List[int], cp_size: int, cp_rank: int) -> List[tuple]:
    """Per segment ``(local start, chunk, positions)``: where the segment's two chunks start in
    this rank's local tensor, the chunk length, and the positions within the segment of its
    ``2 * chunk`` local tokens (int64 numpy)."""
    out = []
    for start, end in zip(cu_padded[:-1], cu_padded[1:]):
        chunk = (end - start) // (2 * cp_size)
        positions = np.concatenate([np.arange(cp_rank * chunk, (cp_rank + 1) * chunk),
                                    np.arange((2 * cp_size - 1 - cp_rank) * chunk,
                                              (2 * cp_size - cp_rank) * chunk)])
        out.append((start // cp_size, chunk, positions))
    return out


def gather_full(local: Tensor, batch: Dict) -> Tensor:
    """A per-position tensor of the whole (unsplit) micro-batch from every context-parallel
    rank's ``local`` part (``[1, T_padded / N, ...]`` or ``[T_padded / N, ...]``, e.g.
    per-token losses, greedy hits, logits): ``[1, T, ...]`` in ``local``'s dtype, padding
    dropped (not differentiable; validation and checks)."""
    from megatron.core import parallel_state as ps

    group = ps.get_context_parallel_group()
    size = batch["cp_size"]
    positions = batch["cp_positions"].numel()
    trailing = tuple(local.shape[2:] if local.dim() >= 2 and local.shape[0] == 1
                     and local.shape[1] == positions else local.shape[1:])
    flat = local.reshape(positions, -1).contiguous()
    parts = [torch.empty_like(flat) for _ in range(size)]
    torch.distributed.all_gather(parts, flat, group=group)
    total = int(batch["cp_full"]["tokens"].shape[1])
    full = flat.new_zeros(total, flat.shape[1])
    cu_padded = batch["packed_seq_params"].cu_seqlens_q_padded.cpu().numpy().astype(np.int64)
    source = source_positions(batch["cu_seqlens"].cpu().numpy(), cu_padded)
    for rank, part in enumerate(parts):
        where = torch.as_tensor(source[partition_indices(cu_padded, size, rank)],
                                device=flat.device)
        keep = where >= 0
        full[where[keep]] = part[keep]
    return full.reshape(1, total, *trailing)


def layout(parallel) -> tuple:
    """``(size, rank, padding multiple)`` of this process's context-parallel group for
    ``data.flatten_micro_batch`` (``parallel``: ``ParallelConfig``): every attention segment
    is padded to a multiple of ``2 x size`` (x the tensor-parallel size with sequence
    parallelism, whose sequence split must be even too)."""
    from megatron.core import parallel_state as ps

    size = parallel.context_parallel_size
    if size == 1:
        return (1, 0, 2)
    multiple = 2 * size * (parallel.tensor_model_parallel_size if parallel.sequence_parallel
                           else 1)
    return (size, ps.get_context_parallel_rank(), multiple)
