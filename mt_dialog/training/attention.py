"""Core attention that attends per conversation inside a packed sequence.

``PackedSDPAttention`` replaces megatron-core's local ``DotProductAttention`` as the
``core_attention`` submodule of ``get_gpt_layer_local_spec()`` (see ``get_packed_gpt_layer_local_spec``).
It runs ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` on each segment given
by ``packed_seq_params.cu_seqlens_q``, so its cost is sum(len_i^2) instead of s^2 and no
``[b, 1, s, s]`` mask is ever built; without packed params it is plain causal attention.

Conventions (megatron-core 0.16.1)
----------------------------------
* In 0.16.1 ``SelfAttention.__init__`` *calls* ``submodules.core_attention(config=..., layer_number=...,
  attn_mask_type=..., attention_type=..., cp_comm_type=..., softmax_scale=..., pg_collection=...)``
  directly (no ``build_module``), so the submodule must be the class itself (or any callable), not a
  ``ModuleSpec`` instance.
* ``forward(query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
  packed_seq_params=None)`` is the signature of ``DotProductAttention.forward`` in 0.16.1.
* Inputs are already split across tensor-parallel ranks: ``query`` carries the
  ``num_attention_heads / tp`` local heads, ``key``/``value`` the ``num_query_groups / tp`` local
  groups (megatron builds core attention with ``num_query_groups = tp`` when there are fewer groups
  than TP ranks). Query head ``j`` uses key/value group ``j // (np / ng)``, megatron's
  ``repeat_interleave`` convention, which is also ``enable_gqa=True``'s convention in SDPA.

Packed layout (micro-batch size b > 1): the THD convention
----------------------------------------------------------
A micro-batch of ``b`` packs of length ``s`` is *flattened* into one sequence of ``T = b*s`` tokens
before it enters the model: ``input_ids``/``labels``/``loss_mask`` of shape ``[1, b*s]`` (row-major,
pack 0 first), ``PackedSeqParams(qkv_format='thd', cu_seqlens_q=cu_seqlens_kv=cu, max_seqlen_q=
max_seqlen_kv=max segment length (python int))`` where ``cu`` (int32, ``[n_segments + 1]``) are the
cumulative segment lengths over the concatenated ``b*s`` tokens, with ``cu[0] = 0`` and
``cu[-1] = b*s``: every conversation is a segment, and the padding at the end of each pack is a
segment of its own (so segments tile the whole batch and never cross a pack boundary).
This is what megatron-core and Transformer Engine expect for 'thd': ``SelfAttention.forward``
``squeeze(1)``s query/key/value (which requires the batch dimension to be 1), RoPE is applied per
segment, and the core attention output is reshaped back to ``[t, 1, h]``.
With pipeline parallelism the p2p tensor shape is ``(seq_length, micro_batch_size, hidden)``, so
the schedule must be called with ``seq_length = b*s`` and ``micro_batch_size = 1``.

RoPE with packing (why 'thd' is required for restarting positions)
-----------------------------------------------------------------
``GPTModel`` with ``position_embedding_type='rope'`` ignores ``position_ids`` (they only feed a
learned absolute position embedding). It builds the rotary table with
``RotaryEmbedding.get_rotary_seq_len``, which returns ``max(max_seqlen_q, max_seqlen_kv)`` when
packed params are given. ``SelfAttention.forward`` passes ``cu_seqlens`` to
``apply_rotary_pos_emb`` *only* when ``qkv_format == 'thd'``; then ``_apply_rotary_pos_emb_thd``
gives every segment the positions ``0 .. len_i - 1`` (positions restart per conversation; with
``cu_seqlens_q_padded`` set, segment boundaries come from the padded offsets). With 'sbhd' (or any
other format) and packed params, RoPE uses positions ``0 .. s-1`` of each row, i.e. *not* restarting,
and the table has ``max_seqlen`` rows, which only broadcasts against ``[s, b, ...]`` when
``max_seqlen == s``. This module
accepts 'sbhd' packed params (cu_seqlens over the batch-major flattened ``b*s`` tokens) for models
without RoPE, but the training path must use 'thd'. The same holds on the Transformer Engine path:
TE's ``TEDotProductAttention`` needs 'thd' + cu_seqlens, and RoPE (unfused or
``fused_apply_rotary_pos_emb_thd``) restarts positions per ``cu_seqlens`` segment.

``cu_seqlens_q_padded`` (optional) follows TE: segment ``i`` starts at ``cu_seqlens_q_padded[i]`` and
has ``cu_seqlens_q[i+1] - cu_seqlens_q[i]`` real tokens; tokens in the gaps get a zero output.

Attention variants (megatron-core 0.16.1 ``TransformerConfig`` fields)
--------------------------------------------------------------------
* Sliding window ``window_size = (left, 0)`` on the layers ``is_layer_window_attention`` picks
  (``window_attn_skip_freq``): query ``i`` attends keys ``i - left .. i`` *of its own segment*,
  the convention of Transformer Engine and megatron-core's ``get_sliding_window_causal_mask``;
  Hugging Face's ``sliding_window`` W (``kv_idx > q_idx - W`` in transformers 5.23's
  ``sliding_window_overlay``, gpt_oss and gemma3_text alike) is ``left = W - 1``. A pack of two
  conversations A (4 tokens) and B (5 tokens), ``window_size = (2, 0)`` (x = attends)::

                keys  a0 a1 a2 a3 | b0 b1 b2 b3 b4
        query a0      x           |
              a1      x  x        |
              a2      x  x  x     |
              a3         x  x  x  |
              b0                  | x
              b1                  | x  x
              b2                  | x  x  x
              b3                  |    x  x  x
              b4                  |       x  x  x

  The window never reaches back into A: b0 sees only itself.
* Attention sinks ``softmax_type = "learnable"``: the parameter ``softmax_offset`` [np / tp] (one
  logit per local head, split by head over TP ranks, as megatron-core's and TE's
  ``DotProductAttention`` name and split it) joins every row's softmax denominator:
  ``p_ij = exp(s_ij) / (exp(sink_h) + sum_k exp(s_ik))`` (gpt-oss's ``sinks``); per segment, so
  each conversation's rows see only their own keys plus the sink. ``"off-by-one"``: sink 0.
* MLA (``MLASelfAttention``): query/key head size ``qk_head_dim + qk_pos_emb_head_dim`` differs
  from the value head size ``v_head_dim``; MLA passes ``k_channels`` / ``v_channels`` and its
  ``softmax_scale`` (YaRN: ``mscale(factor, mscale_all_dim)^2 / sqrt(q head size)``), and applies
  RoPE per ``cu_seqlens`` segment with 'thd' (positions restart per conversation).
Plain causal segments use SDPA's ``is_causal``; a window a boolean mask; sinks an explicit fp32
softmax over ``[scores, sink]``.
"""

from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron.core import parallel_state, tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

__all__ = [
    "PackedSDPAttention",
    "causal_window_mask",
    "get_packed_gpt_layer_local_spec",
    "packed_seq_params_from_cu_seqlens",
]


class PackedSDPAttention(MegatronModule):
    """Per-segment causal SDPA; drop-in ``core_attention`` for megatron-core's local layer spec.

    Takes megatron-core's ``window_size`` / ``window_attn_skip_freq`` (sliding windows),
    ``softmax_type`` (attention sinks: ``softmax_offset`` [np / tp]) and MLA's head sizes (query /
    key size != value size; MLA passes its YaRN ``softmax_scale``)."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
        k_channels: Optional[int] = None,
        v_channels: Optional[int] = None,
    ):
        """``k_channels`` / ``v_channels``: the query/key and value head sizes MLA passes
        (default ``kv_channels``); the value size is read from ``value`` in ``forward``."""
        super().__init__(config=config)
        assert attention_type == "self", "PackedSDPAttention implements self-attention only"
        assert attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal), (
            f"PackedSDPAttention is causal; got {attn_mask_type}"
        )
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        head_dim = k_channels or config.kv_channels
        # apply_query_key_layer_scaling divides the scale by layer_number and multiplies the scores
        # back in fp32 softmax in megatron: the net scale is unchanged, so it is ignored here.
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        self.window = layer_window(config, self.layer_number)
        self.tp_group = getattr(pg_collection, "tp", None)
        # context parallelism: keys and values all-gathered over this group (cp_comm_type is
        # Transformer Engine's choice of collective; this CPU stand-in always all-gathers)
        self.cp_group = getattr(pg_collection, "cp", None)
        if self.cp_group is None and config.context_parallel_size > 1:
            self.cp_group = parallel_state.get_context_parallel_group()
        self._init_softmax_offset(config)

    def _init_softmax_offset(self, config: TransformerConfig) -> None:
        """``softmax_offset`` [np / tp] (one sink logit per local head), as megatron-core's and
        Transformer Engine's ``DotProductAttention`` name it: a parameter for 'learnable', zeros
        for 'off-by-one' (a buffer, not saved), None for 'vanilla'."""
        softmax_type = getattr(config, "softmax_type", "vanilla")
        if softmax_type == "vanilla":
            self.softmax_offset = None
            return
        if softmax_type not in ("off-by-one", "learnable"):
            raise ValueError(f"softmax_type: {softmax_type!r} is not one of vanilla, off-by-one, "
                             "learnable")
        tp = self.tp_group.size() if self.tp_group is not None else \
            parallel_state.get_tensor_model_parallel_world_size()
        heads = divide(config.num_attention_heads, tp)
        offset = torch.zeros(heads, dtype=config.params_dtype)
        if softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", offset, persistent=False)
            return
        self.softmax_offset = torch.nn.Parameter(offset)
        # split over tensor-parallel ranks by head (dim 0): its gradient is not summed over TP
        # and the gradient norm counts every rank's part
        tensor_parallel.set_tensor_model_parallel_attributes(self.softmax_offset, True, 0, 1)
        if config.perform_initialization:
            config.init_method(self.softmax_offset.data)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """The learnable ``softmax_offset`` saved as one tensor [np] split by head over TP ranks
        (the same key and layout as megatron-core's ``DotProductAttention``)."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint)

        state = {}
        if isinstance(self.softmax_offset, torch.nn.Parameter):
            state = {"softmax_offset": self.softmax_offset}
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"softmax_offset": 0}, sharded_offsets,
            tp_group=self.tp_group or parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=metadata["dp_cp_group"])

    # ------------------------------------------------------------------------------------------
    def _attend(self, q: Tensor, k: Tensor, v: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        """q: [B, np, L, dk]; k: [B, ng, L, dk]; v: [B, ng, L, dv] -> [B, np, L, dv].

        ``allowed``: bool, broadcastable to [B, np, L, L], True = attend; None = causal (with the
        layer's window). Plain causal attention runs SDPA's ``is_causal``; a window is a bool mask;
        sinks take the explicit path ``_attend_with_sinks``."""
        if allowed is None and (self.window is not None or self.softmax_offset is not None):
            allowed = causal_window_mask(q.size(2), self.window, q.device)
        if self.softmax_offset is not None:
            return self._attend_with_sinks(q, k, v, allowed)
        dropout_p = self.dropout_p if self.training else 0.0
        gqa = q.size(1) != k.size(1)
        if gqa:
            assert q.size(1) % k.size(1) == 0, (q.shape, k.shape)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=self.softmax_scale,
            enable_gqa=gqa, is_causal=allowed is None)

    def _attend_with_sinks(self, q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
        """Softmax over [scores, sink]: head h's sink logit ``softmax_offset[h]`` joins every
        row's denominator and is dropped after (gpt-oss; megatron-core's ``SoftmaxOne``), so
        the row's weights sum to < 1. Scores and softmax in fp32; the result in v's dtype."""
        groups = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.softmax_scale
        scores = scores.masked_fill(~allowed, float("-inf"))
        sink = self.softmax_offset.float().view(1, -1, 1, 1).expand(q.size(0), -1, q.size(2), 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
        if self.training and self.dropout_p > 0:
            probs = F.dropout(probs, p=self.dropout_p)
        return torch.matmul(probs.to(v.dtype), v)

    def _rng_context(self):
        # Same as megatron's DotProductAttention: attention dropout under the TP RNG tracker, so
        # the heads held by different TP ranks get different dropout masks.
        if self.training and self.dropout_p > 0 and not self.config.sequence_parallel:
            return tensor_parallel.get_cuda_rng_tracker().fork()
        return contextlib.nullcontext()

    def _attend_segments(
        self, q: Tensor, k: Tensor, v: Tensor, starts: List[int], lengths: List[int]
    ) -> Tensor:
        """q, k: [T, np | ng, dk]; v: [T, ng, dv] -> [T, np, dv], causal (and windowed) within
        each segment."""
        total = q.size(0)
        pieces = []
        pos = 0
        for start, length in zip(starts, lengths):
            if length <= 0:
                continue
            assert start >= pos, "segments must be sorted and must not overlap"
            if start > pos:  # gap (padded layout): no real token there
                pieces.append(v.new_zeros(start - pos, q.size(1), v.size(2)))
            end = start + length
            assert end <= total, f"segment [{start}, {end}) exceeds the {total} tokens"
            out = self._attend(*(x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v)))
            pieces.append(out[0].transpose(0, 1))
            pos = end
        if pos < total:
            pieces.append(v.new_zeros(total - pos, q.size(1), v.size(2)))
        return torch.cat(pieces, dim=0) if len(pieces) > 1 else pieces[0]

    def _attend_context_parallel(self, q: Tensor, k: Tensor, v: Tensor,
                                 packed_seq_params: PackedSeqParams) -> Tensor:
        """Context parallelism on the local path (``context_parallel`` module docstring): q, k
        ([t, np | ng, dk]) and v ([t, ng, dv]) hold this rank's two chunks of every segment;
        keys and values of the whole sequence are all-gathered over the context-parallel group
        (differentiable), and each local query attends the keys of its own segment at global
        positions up to its own (and within the layer's window). Padded queries (after a
        segment's real tokens) get a zero output. Returns [t, np, dv]."""
        from mt_dialog.training.context_parallel import gather_sequence, local_positions

        padded = packed_seq_params.cu_seqlens_q_padded
        assert padded is not None, "context parallelism needs cu_seqlens_q_padded"
        k_all = gather_sequence(k, padded, self.cp_group)
        v_all = gather_sequence(v, padded, self.cp_group)
        cu = packed_seq_params.cu_seqlens_q.tolist()
        cu_padded = padded.tolist()
        size, rank = self.cp_group.size(), self.cp_group.rank()
        where, pieces = [], []
        for i, (start, chunk, positions) in enumerate(local_positions(cu_padded, size, rank)):
            real = cu[i + 1] - cu[i]
            qpos = torch.as_tensor(positions, device=q.device)
            rows = torch.nonzero(qpos < real).reshape(-1)
            if rows.numel() == 0:
                continue
            kpos = torch.arange(real, device=q.device)
            allowed = kpos[None, :] <= qpos[rows, None]
            if self.window is not None:
                allowed = allowed & (kpos[None, :] >= qpos[rows, None] - self.window[0])
            segment = slice(cu_padded[i], cu_padded[i] + real)
            qs = q[start: start + 2 * chunk][rows]
            o = self._attend(qs.transpose(0, 1).unsqueeze(0),
                             k_all[segment].transpose(0, 1).unsqueeze(0),
                             v_all[segment].transpose(0, 1).unsqueeze(0), allowed)
            where.append(start + rows)
            pieces.append(o[0].transpose(0, 1))
        out = v.new_zeros(q.size(0), q.size(1), v.size(2))
        if not pieces:
            return out + 0 * (k_all.sum() + v_all.sum())  # keep the collectives' backward
        return out.index_copy(0, torch.cat(where), torch.cat(pieces).to(out.dtype))

    @staticmethod
    def _segments(packed_seq_params: PackedSeqParams) -> Tuple[List[int], List[int]]:
        cu = packed_seq_params.cu_seqlens_q
        assert cu is not None, "packed_seq_params.cu_seqlens_q is required"
        cu_kv = packed_seq_params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu:
            assert torch.equal(cu_kv.cpu(), cu.cpu()), "self-attention needs cu_seqlens_kv == cu_seqlens_q"
        cu_list = cu.tolist()
        lengths = [b - a for a, b in zip(cu_list[:-1], cu_list[1:])]
        padded = packed_seq_params.cu_seqlens_q_padded
        starts = padded.tolist()[:-1] if padded is not None else cu_list[:-1]
        return starts, lengths

    # ------------------------------------------------------------------------------------------
    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> Tensor:
        """query [s, b, np, hn] (or [t, np, hn] for 'thd'); key/value with ng groups.

        Returns [s, b, np*hn] (or [t, np*hn] for 'thd').
        """
        assert attention_bias is None, "attention_bias is not supported"
        with self._rng_context():
            if packed_seq_params is None:
                return self._forward_dense(query, key, value, attention_mask)
            starts, lengths = self._segments(packed_seq_params)
            if packed_seq_params.qkv_format == "thd":
                if query.dim() == 4:  # [t, 1, np, hn] if the caller did not squeeze
                    assert query.size(1) == 1, "'thd' needs the batch flattened into one sequence"
                    query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
                if self.config.context_parallel_size > 1:
                    out = self._attend_context_parallel(query, key, value, packed_seq_params)
                else:
                    out = self._attend_segments(query, key, value, starts, lengths)
                return out.reshape(out.size(0), -1)
            # 'sbhd' (or unset) with packed params: cu_seqlens over the batch-major b*s tokens.
            s, b = query.size(0), query.size(1)
            flat = lambda x: x.transpose(0, 1).reshape(b * s, x.size(2), x.size(3))
            out = self._attend_segments(flat(query), flat(key), flat(value), starts, lengths)
            return out.reshape(b, s, -1).transpose(0, 1).contiguous()

    def _forward_dense(self, query, key, value, attention_mask):
        # [s, b, n, hn] -> [b, n, s, hn]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        if attention_mask is None:
            out = self._attend(q, k, v)
        else:
            # megatron's mask convention: True = masked out; SDPA's bool mask: True = attend.
            # As in megatron's DotProductAttention, an explicit mask is used as given (and
            # narrowed to the layer's window).
            allowed = ~attention_mask.bool()
            if self.window is not None:
                allowed = allowed & window_band(q.size(2), self.window, q.device)
            out = self._attend(q, k, v, allowed)
        s, b = query.size(0), query.size(1)
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def layer_window(config: TransformerConfig, layer_number: int) -> Optional[Tuple[int, int]]:
    """The (left, right) window of layer ``layer_number`` (1-based), or None for full attention:
    megatron-core's ``is_layer_window_attention`` rule (``window_attn_skip_freq`` N: every N-th
    layer full; a 0/1 list: 1 = windowed)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    window = getattr(config, "window_size", None)
    if not is_layer_window_attention(window, getattr(config, "window_attn_skip_freq", None),
                                     layer_number):
        return None
    return int(window[0]), int(window[1])


def window_band(length: int, window: Tuple[int, int], device=None) -> Tensor:
    """[L, L] bool, True where key j is within query i's window: i - left <= j <= i + right
    (Transformer Engine's and megatron-core's ``window_size`` convention)."""
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    return (j >= i - window[0]) & (j <= i + window[1])


def causal_window_mask(length: int, window: Optional[Tuple[int, int]], device=None) -> Tensor:
    """[L, L] bool, True = query i attends key j: j <= i, and j >= i - window[0] with a window
    (query i sees itself and the ``window[0]`` tokens before it)."""
    i = torch.arange(length, device=device).unsqueeze(1)
    j = torch.arange(length, device=device).unsqueeze(0)
    allowed = j <= i
    return allowed & (j >= i - window[0]) if window is not None else allowed


def get_packed_gpt_layer_local_spec(**kwargs):
    """``get_gpt_layer_local_spec(**kwargs)`` with ``PackedSDPAttention`` as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(**kwargs)
    spec.submodules.self_attention.submodules.core_attention = PackedSDPAttention
    return spec


def packed_seq_params_from_cu_seqlens(cu_seqlens: Tensor, max_seqlen: Optional[int] = None) -> PackedSeqParams:
    """'thd' PackedSeqParams for self-attention over the flattened batch (see module docstring)."""
    cu_seqlens = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu_seqlens,
        cu_seqlens_kv=cu_seqlens,
        max_seqlen_q=int(max_seqlen),
        max_seqlen_kv=int(max_seqlen),
    )
