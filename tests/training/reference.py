"""Plain-PyTorch reference of the training model, synthetic packed conversations, and gathering of
megatron-core TP/PP shards into full tensors. Used by ``equivalence_worker.py``.

The reference re-implements the Llama-style GPT that ``mt_dialog.training.model`` builds (RMSNorm,
SwiGLU, non-interleaved RoPE, grouped-query attention) from the *full* weights, with megatron's
weight layouts:

* ``linear_qkv`` rows are grouped per query group as ``[q heads of the group (np/ng*hn), k (hn),
  v (hn)]``; query head ``j`` uses group ``j // (np/ng)``.
* ``linear_fc1`` is ``[gate; up]`` (``partition_stride=2``: TP rank r holds ``[gate_r; up_r]``).
* RoPE: ``emb = cat(freqs, freqs)``, ``rotate_half(x) = cat(-x2, x1)``.
* QKV, fc1, the output layer and the word embeddings are split along dim 0 over TP,
  ``linear_proj`` and ``fc2`` along dim 1.
"""

from __future__ import annotations

import math
import random
import zlib
from dataclasses import dataclass, field, replace
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from mt_dialog.data.formats import Message, ToolCall

VOCAB = 100  # before padding to make_vocab_size_divisible_by x TP
PAD, BOS, EOT = 0, 1, 2  # BOS starts every conversation (never trained); EOT ends every reply
REPLY_LENGTHS = (1, 2, 2, 3, 4, 7, 11, 13)  # trained tokens per reply, end-of-turn included
POWER_P = 0.5  # --loss-turn-exponent of the 'power' normalization the equivalence suite checks


# ---------------------------------------------------------------------------------------------
# Synthetic conversations and packs
# ---------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    tokens: List[int]
    replies: List[Tuple[int, int]] = field(default_factory=list)  # [a, e): content + EOT
    split: List[Tuple[List[int], int, int]] = field(default_factory=list)
    """The "split into n samples" baseline's samples (tokens, a, e), one per trained reply;
    empty: ``tokens[:e]`` for each reply [a, e)."""
    untrained_replies: int = 0
    tool_messages: int = 0

    @property
    def counts(self) -> List[int]:
        """Per-token loss_token_num aligned with ``tokens`` (the reply's length on its tokens)."""
        out = [0] * len(self.tokens)
        for a, e in self.replies:
            out[a:e] = [e - a] * (e - a)
        return out

    def samples(self) -> List[Tuple[List[int], int, int]]:
        """(tokens, a, e) of each sample of the split baseline: reply [a, e) trained alone."""
        return self.split or [(self.tokens[:e], a, e) for a, e in self.replies]


@dataclass
class Pack:
    conversations: List[Conversation]

    def triple(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, counts, lengths) as ``mt_dialog.data.dataset.build_sample`` takes them."""
        tokens = np.array([t for c in self.conversations for t in c.tokens], dtype=np.int64)
        counts = np.array([n for c in self.conversations for n in c.counts], dtype=np.int64)
        lengths = np.array([len(c.tokens) for c in self.conversations], dtype=np.int64)
        return tokens, counts, lengths

    def __len__(self) -> int:
        return sum(len(c.tokens) for c in self.conversations)


def _content(rng: random.Random, n: int) -> List[int]:
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _reply(rng: random.Random, toks: List[int], length: int) -> Tuple[int, int]:
    a = len(toks)
    toks += _content(rng, length - 1) + [EOT]
    return a, len(toks)


def make_conversation(rng: random.Random, max_len: int) -> Conversation:
    """BOS + optional system tokens, then 1-4 (user, reply) turns; at most ``max_len`` tokens."""
    while True:
        toks = [BOS] + _content(rng, rng.randint(0, 3))
        replies = []
        for _ in range(rng.randint(1, 4)):
            toks += _content(rng, rng.randint(1, 5))  # user
            replies.append(_reply(rng, toks, rng.choice(REPLY_LENGTHS)))
        if len(toks) <= max_len:
            return Conversation(toks, replies)


def exact_conversation(rng: random.Random, length: int) -> Conversation:
    """One turn, exactly ``length`` (>= 3) tokens: fills a pack to the last slot."""
    reply = min(rng.choice(REPLY_LENGTHS), length - 2)
    toks = [BOS] + _content(rng, length - 1 - reply)
    return Conversation(toks, [_reply(rng, toks, reply)])


def text_piece(rng: random.Random, max_len: int, length: int = 0) -> Conversation:
    """A plain-text document piece as preprocessing stores it (``render.document_piece``): one
    "turn" of every token but the first; a document start (BOS) or a cut piece's continuation,
    ending with the eos (EOT here) or, cut, filling ``max_len``; ``length`` (>= 2) exactly."""
    length = length or min(max_len, rng.choice((2, 3, 9, 20, 41, max_len)))
    start = [BOS] if rng.random() < 0.5 else _content(rng, 1)
    cut = length == max_len and rng.random() < 0.5
    toks = start + _content(rng, length - 1 - (not cut)) + ([] if cut else [EOT])
    return Conversation(toks[:length], [(1, length)])


def make_packs(seed: int, n_packs: int, seq: int, make=make_conversation,
               fill=None) -> List[Pack]:
    """Greedy packs of whole conversations (``make(rng, max_len)``). Even-numbered packs end in
    padding (unless the greedy fill happens to be exact), odd-numbered ones are often filled to
    the last slot (``fill(rng, length)``: ``exact_conversation``), so every micro-batch of 2
    packs has padding."""
    fill = fill or exact_conversation
    rng = random.Random(seed)
    packs = []
    for i in range(n_packs):
        convs, used = [], 0
        while True:
            conv = make(rng, seq)
            if used + len(conv.tokens) > seq:
                break
            convs.append(conv)
            used += len(conv.tokens)
            if rng.random() < 0.15:  # leave more padding
                break
        if i % 2 and seq - used >= 3 and rng.random() < 0.6:
            convs.append(fill(rng, seq - used))
        packs.append(Pack(convs))
    return packs


# ---------------------------------------------------------------------------------------------
# Conversations rendered by the library: untrained replies and tool messages
# ---------------------------------------------------------------------------------------------


class WordTokenizer:
    """Just enough of a tokenizer for the library's renderer with ids below ``VOCAB``: each
    whitespace-separated word is one id in 4..VOCAB-1; ``<|im_start|>`` is 3, ``<|im_end|>``
    is EOT."""

    bos_id, eos_id = BOS, EOT
    SPECIALS = {"<|im_start|>": 3, "<|im_end|>": EOT}

    def special_id(self, piece: str) -> int:
        return self.SPECIALS[piece]

    @staticmethod
    def encode(text: str) -> List[int]:
        return [4 + zlib.crc32(word.encode()) % (VOCAB - 4) for word in text.split()]


def _agent_messages(rng: random.Random) -> Tuple[Message, ...]:
    """1-3 user turns; each answered by a reply, a reply with weight 0, or tool calls (trained
    or not), their results and a reply; the last reply is trained."""
    def words(n: int) -> str:
        return " ".join(f"w{rng.randrange(1000)}" for _ in range(max(n, 1)))

    messages: List[Message] = []
    turns = rng.randint(1, 3)
    for turn in range(turns):
        messages.append(Message("user", words(rng.randint(1, 3))))
        kind = rng.choice(("reply", "untrained", "tool", "tool"))
        if kind == "tool":
            calls = tuple(ToolCall("f", {"x": rng.randrange(9)}) for _ in range(rng.randint(1, 2)))
            messages.append(Message("assistant", "", calls,
                                    train=False if rng.random() < 0.3 else None))
            messages += [Message("tool", words(rng.randint(1, 2))) for _ in calls]
        untrained = kind == "untrained" and turn < turns - 1
        messages.append(Message("assistant", words(rng.choice(REPLY_LENGTHS) - 1),
                                train=False if untrained else None))
    return tuple(messages)


def rendered_conversation(rng: random.Random, max_len: int) -> Conversation:
    """An agent conversation rendered by ``render_conversation`` with the chatml template (Hermes
    tool calls and results), stored as preprocessing stores it; its split baseline: one sample
    per trained reply, rendered by the library with only that reply trained."""
    from mt_dialog.data.render import render_conversation, resolve_template
    from mt_dialog.data.templates import get_template

    template = resolve_template(get_template("chatml"), WordTokenizer())
    while True:
        messages = _agent_messages(rng)
        (sample,) = render_conversation(messages, template, WordTokenizer.encode)
        if sample.num_tokens <= max_len:
            break
    counts, replies, a = sample.loss_token_num.tolist(), [], 0
    while a < len(counts):  # a trained turn of n tokens carries n on each
        if counts[a]:
            replies.append((a, a + counts[a]))
        a += counts[a] or 1
    split = []
    for k, message in enumerate(messages):
        if message.role != "assistant" or message.train is False:  # what the data trains
            continue
        alone = tuple(replace(m, train=False) if m.role == "assistant" and i != k else m
                      for i, m in enumerate(messages[:k + 1]))
        (one,) = render_conversation(alone, template, WordTokenizer.encode)
        start = int(np.argmax(one.loss_mask))  # the sample ends with its one trained turn
        split.append((one.input_ids.tolist(), start, one.num_tokens))
    return Conversation(sample.input_ids.tolist(), replies, split,
                        sum(m.role == "assistant" and m.train is False for m in messages),
                        sum(m.role == "tool" for m in messages))


# ---------------------------------------------------------------------------------------------
# Plain-PyTorch forward from full weights
# ---------------------------------------------------------------------------------------------


def _rms(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, positions, base):
    hn = x.size(-1)
    inv_freq = 1.0 / (base ** (torch.arange(0, hn, 2, dtype=torch.float32) / hn))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat([freqs, freqs], -1)[:, None, :]
    x1, x2 = x.chunk(2, dim=-1)
    return x * emb.cos() + torch.cat([-x2, x1], -1) * emb.sin()


def reference_logits(W: Dict[str, torch.Tensor], tokens: torch.Tensor, mcfg, tied: bool):
    """tokens [L] (one sequence from position 0) -> logits [L, padded vocab].

    ``mcfg`` is a ``mt_dialog.training.config.ModelConfig``."""
    L = tokens.numel()
    heads, groups = mcfg.num_attention_heads, mcfg.num_query_groups
    hn = mcfg.hidden_size // heads
    qpg = heads // groups
    eps, base = mcfg.norm_epsilon, mcfg.rotary_base
    pos = torch.arange(L)
    x = W["embedding.word_embeddings.weight"][tokens]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    for i in range(mcfg.num_layers):
        p = f"decoder.layers.{i}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        if getattr(mcfg, "multi_latent_attention", False):
            x = x + _mla(W, p + "self_attention.", h, pos, causal, mcfg)
        else:
            qkv = (h @ W[p + "self_attention.linear_qkv.weight"].t()).view(L, groups, qpg + 2,
                                                                         hn)
            q = qkv[:, :, :qpg].reshape(L, heads, hn)
            k, v = qkv[:, :, qpg], qkv[:, :, qpg + 1]
            q, k = _rope(q, pos, base), _rope(k, pos, base)
            k, v = k.repeat_interleave(qpg, dim=1), v.repeat_interleave(qpg, dim=1)
            scores = torch.einsum("qnd,knd->nqk", q, k) / math.sqrt(hn)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            ctx = torch.einsum("nqk,knd->qnd", probs, v).reshape(L, heads * hn)
            x = x + ctx @ W[p + "self_attention.linear_proj.weight"].t()
        h = _rms(x, W[p + "pre_mlp_layernorm.weight"], eps)
        if _is_moe_layer(mcfg, i):
            x = x + reference_moe(W, p + "mlp.", h, mcfg)
        else:
            x = x + _swiglu(W, p + "mlp.", h)
    x = _rms(x, W["decoder.final_layernorm.weight"], eps)
    out_w = W["embedding.word_embeddings.weight"] if tied else W["output_layer.weight"]
    return x @ out_w.t()


def _mla(W, a: str, h, pos, causal, mcfg):
    """Multi-latent attention (DeepSeek-V2/V3), plain RoPE, from the paper's equations: the
    query from ``linear_q_proj`` (or down-projection, RMSNorm, up-projection), keys and values
    from a shared latent (``linear_kv_down_proj``: [latent rkv; rope key dr]), RMSNorm, then
    ``linear_kv_up_proj`` per head [no-rope key dn; value dv]; each head's query / key is
    [no-rope part; rope part] with the rope part's rows read as interleaved pairs (x0, x1),
    (x2, x3)...; scale 1 / sqrt(dn + dr)."""
    L, n, eps = h.size(0), mcfg.num_attention_heads, mcfg.norm_epsilon
    dn, dr, dv = mcfg.qk_head_dim, mcfg.qk_pos_emb_head_dim, mcfg.v_head_dim
    if mcfg.q_lora_rank is None:
        q = h @ W[a + "linear_q_proj.weight"].t()
    else:
        q = _rms(h @ W[a + "linear_q_down_proj.weight"].t(), W[a + "q_layernorm.weight"], eps)
        q = q @ W[a + "linear_q_up_proj.weight"].t()
    q_nope, q_rot = q.view(L, n, dn + dr).split([dn, dr], -1)
    latent, k_rot = (h @ W[a + "linear_kv_down_proj.weight"].t()).split(
        [mcfg.kv_lora_rank, dr], -1)
    kv = _rms(latent, W[a + "kv_layernorm.weight"], eps) @ W[a + "linear_kv_up_proj.weight"].t()
    k_nope, v = kv.view(L, n, dn + dv).split([dn, dv], -1)

    def rotate(x):  # interleaved pairs: the even rows then the odd ones, then rotate-half
        return _rope(torch.cat([x[..., 0::2], x[..., 1::2]], -1), pos, mcfg.rotary_base)

    q = torch.cat([q_nope, rotate(q_rot)], -1)
    k = torch.cat([k_nope, rotate(k_rot[:, None, :]).expand(L, n, dr)], -1)
    scores = torch.einsum("qnd,knd->nqk", q, k) / math.sqrt(dn + dr)
    probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    ctx = torch.einsum("nqk,knd->qnd", probs, v).reshape(L, n * dv)
    return ctx @ W[a + "linear_proj.weight"].t()


def _swiglu(W, p: str, h):
    gate, up = (h @ W[p + "linear_fc1.weight"].t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ W[p + "linear_fc2.weight"].t()


def _is_moe_layer(mcfg, i: int) -> bool:
    """Layer ``i`` (0-based) has a MoE block: a MoE model's layer where ``--moe-layer-freq``
    (``ModelConfig.moe_layer_pattern``) does not make it dense."""
    if not getattr(mcfg, "num_experts", None):
        return False
    pattern = mcfg.moe_layer_pattern() if hasattr(mcfg, "moe_layer_pattern") else None
    return pattern is None or bool(pattern[i])


def _sigmoid_topk(W, p: str, logits, mcfg):
    """Sigmoid routing (DeepSeek-V3's, in the paper's terms): experts chosen by score + expert
    bias (``router.expert_bias`` if in ``W``), within the ``moe_router_group_topk`` groups of
    highest (sum of top k / group-topk choice scores) when group-limited; weights the chosen
    plain scores renormalized over the k (k > 1)."""
    k = mcfg.moe_router_topk
    scores = torch.sigmoid(logits)
    choice = scores + W[p + "router.expert_bias"] if p + "router.expert_bias" in W else scores
    groups = getattr(mcfg, "moe_router_num_groups", None)
    if groups:
        per_group = choice.detach().view(-1, groups, choice.size(-1) // groups)
        best = per_group.topk(k // mcfg.moe_router_group_topk, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(best).scatter(1, best.topk(mcfg.moe_router_group_topk)[1], 1)
        keep = keep.bool()[:, :, None].expand_as(per_group).reshape(choice.shape)
        choice = choice.masked_fill(~keep, float("-inf"))
    idx = choice.detach().topk(k, dim=-1)[1]
    probs = scores.gather(1, idx)
    return (probs / probs.sum(-1, keepdim=True) if k > 1 else probs), idx


def reference_moe(W, p: str, h, mcfg):
    """A MoE layer ``p`` (``...mlp.``) on tokens ``h`` [L, H]: router logits in fp32, top-k
    (softmax over the k chosen logits; with ``moe_router_pre_softmax`` softmax over all experts
    first; sigmoid: ``_sigmoid_topk``), times ``moe_router_topk_scaling_factor`` if set; each
    token's output the probability-weighted sum of its experts' SwiGLU (``experts.local_experts.
    <e>.linear_fc1/2``, global numbers), plus the shared expert's SwiGLU (``shared_experts.``)
    if the model has one."""
    k = mcfg.moe_router_topk
    logits = h.float() @ W[p + "router.weight"].float().t()
    if mcfg.moe_router_score_function == "sigmoid":
        probs, idx = _sigmoid_topk(W, p, logits, mcfg)
    elif mcfg.moe_router_pre_softmax:
        probs, idx = logits.softmax(-1).topk(k, dim=-1)
    else:
        top, idx = logits.topk(k, dim=-1)
        probs = top.softmax(-1)
    if getattr(mcfg, "moe_router_topk_scaling_factor", None):
        probs = probs * mcfg.moe_router_topk_scaling_factor
    out = torch.zeros_like(h)
    for e in range(mcfg.num_experts):
        weight = (probs * (idx == e)).sum(-1).to(h.dtype)  # [L]: 0 where e is not chosen
        rows = (idx == e).any(-1)
        if bool(rows.any()):
            expert = _swiglu(W, f"{p}experts.local_experts.{e}.", h[rows])
            out = out.index_add(0, rows.nonzero().view(-1), weight[rows, None] * expert)
    if getattr(mcfg, "moe_shared_expert_intermediate_size", None):
        out = out + _swiglu(W, p + "shared_experts.", h)
    return out


def reference_grads(W_full: Dict[str, torch.Tensor], convs: List[Conversation], normalization: str,
                    mcfg, tied: bool, effective=None):
    """(loss, grads) over the global batch, in plain PyTorch.

    'turn': the "split into n samples" baseline: each (conversation, reply k) is one sample =
    history + reply k, run alone from position 0; its loss is the mean over reply k's tokens (EOT
    included); the step loss is the mean over all samples. 'token': sum of all reply-token losses
    over the number of reply tokens. 'power' (``POWER_P``): each reply token's loss divided by
    its reply's length to the power p, summed, over the sum of the replies' lengths to the power
    1 - p. ``effective(leaves)`` (optional) maps the leaf tensors to
    the weights the model computes with (LoRA: base + scaled B A); grads are the leaves'.
    """
    leaves = {k: v.detach().clone().requires_grad_(True) for k, v in W_full.items()}
    W = effective(leaves) if effective else leaves
    if normalization == "turn":
        terms = []
        for conv in convs:
            for tokens, a, e in conv.samples():
                sample = torch.tensor(tokens)
                ce = F.cross_entropy(reference_logits(W, sample[:-1], mcfg, tied), sample[1:],
                                     reduction="none")
                terms.append(ce[a - 1:e - 1].mean())
        loss = torch.stack(terms).mean()
    elif normalization == "token":
        total, count = 0.0, 0
        for conv in convs:
            t = torch.tensor(conv.tokens)
            ce = F.cross_entropy(reference_logits(W, t[:-1], mcfg, tied), t[1:], reduction="none")
            idx = torch.tensor([j - 1 for a, e in conv.replies for j in range(a, e)])
            total = total + ce[idx].sum()
            count += idx.numel()
        loss = total / count
    elif normalization == "power":
        numerator, denominator = 0.0, 0.0
        for conv in convs:
            t = torch.tensor(conv.tokens)
            ce = F.cross_entropy(reference_logits(W, t[:-1], mcfg, tied), t[1:], reduction="none")
            for a, e in conv.replies:  # reply [a, e): its labels sit at positions a-1 .. e-2
                numerator = numerator + ce[a - 1:e - 1].sum() / (e - a) ** POWER_P
                denominator += (e - a) ** (1 - POWER_P)
        loss = numerator / denominator
    else:
        raise ValueError(normalization)
    loss.backward()
    return float(loss), {k: v.grad for k, v in leaves.items() if v.grad is not None}


def reference_token_losses(W_full, conv: Conversation, mcfg, tied: bool) -> torch.Tensor:
    """Per-token cross entropy [len - 1] of a conversation run alone."""
    t = torch.tensor(conv.tokens)
    with torch.no_grad():
        return F.cross_entropy(reference_logits(W_full, t[:-1], mcfg, tied), t[1:], reduction="none")


# ---------------------------------------------------------------------------------------------
# Gathering TP x PP shards (DP rank 0's copy) into full tensors
# ---------------------------------------------------------------------------------------------


def global_names(model) -> Dict[str, torch.nn.Parameter]:
    """Parameter name -> param with global layer numbers (``model``: DDP-wrapped or bare)."""
    gpt = model.module if hasattr(model, "module") else model
    local_to_global = {}
    if hasattr(gpt, "decoder"):
        for li, layer in enumerate(gpt.decoder.layers):
            local_to_global[li] = layer.layer_number - 1
    out = {}
    for name, p in gpt.named_parameters():
        if name.startswith("decoder.layers."):
            li, tail = name[len("decoder.layers."):].split(".", 1)
            name = f"decoder.layers.{local_to_global[int(li)]}.{_global_expert(gpt, tail)}"
        out[name] = p
    return out


def _global_expert(gpt, tail: str) -> str:
    """``mlp.experts.local_experts.<local>.`` -> ``<global>`` (expert-parallel rank x experts
    per rank + local); other names unchanged."""
    marker = "mlp.experts.local_experts."
    if not tail.startswith(marker):
        return tail
    from megatron.core import parallel_state as ps

    local, rest = tail[len(marker):].split(".", 1)
    per_rank = gpt.config.num_moe_experts // ps.get_expert_model_parallel_world_size()
    return f"{marker}{ps.get_expert_model_parallel_rank() * per_rank + int(local)}.{rest}"


def gather_full(model, what: str = "data") -> Dict[str, torch.Tensor]:
    """Full parameter data ('data') or DDP ``main_grad`` ('grad') on every rank. Collective.

    A name present on two pipeline stages (the tied output-layer copy lives on the last stage as
    ``output_layer.weight``, so it does not collide) gets an ``@pp<rank>`` suffix. MoE experts
    come from expert-data-parallel rank 0 of each expert-parallel rank, under their global
    numbers (``global_names``)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    entries = []
    for name, p in global_names(model).items():
        if what == "grad" and not p.requires_grad:  # frozen (LoRA base): no gradient
            continue
        expert = ".local_experts." in name
        first = (ps.get_expert_data_parallel_rank() if expert
                 else ps.get_data_parallel_rank()) == 0
        if first:
            t = p.main_grad if what == "grad" else p.data
            tp = (ps.get_expert_tensor_parallel_rank() if expert
                  else ps.get_tensor_model_parallel_rank())
            entries.append(dict(
                name=name, t=t.detach().clone().float().cpu(),
                tp=tp, pp=ps.get_pipeline_model_parallel_rank(),
                is_tp=bool(getattr(p, "tensor_model_parallel", False)),
                dim=getattr(p, "partition_dim", 0), stride=getattr(p, "partition_stride", 1)))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entries)
    by_name: Dict[Tuple[str, int], Dict[int, dict]] = {}
    for ents in gathered:
        for e in ents:
            by_name.setdefault((e["name"], e["pp"]), {})[e["tp"]] = e
    full: Dict[str, torch.Tensor] = {}
    for (name, pp_rank), shards in sorted(by_name.items()):
        e0 = shards[0]
        if e0["is_tp"] and len(shards) > 1:
            parts = [shards[r]["t"] for r in sorted(shards)]
            s, dim = e0["stride"], e0["dim"]
            chunks = [pt.chunk(s, dim=dim) for pt in parts]
            t = torch.cat([chunks[r][j] for j in range(s) for r in range(len(parts))], dim=dim)
        else:
            t = e0["t"]
        full[name if name not in full else f"{name}@pp{pp_rank}"] = t
    return full


def gather_chunks(model_chunks, what: str = "data") -> Dict[str, torch.Tensor]:
    """``gather_full`` of every model chunk (a virtual pipeline has several, with global layer
    numbers), merged. Collective."""
    return {k: v for chunk in model_chunks for k, v in gather_full(chunk, what).items()}


def max_rel_err(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> Tuple[float, str]:
    """max over b's tensors of ||a - b|| / ||b||, and the worst tensor's name."""
    worst, worst_name = 0.0, ""
    for k, vb in b.items():
        e = float((a[k] - vb).norm() / vb.norm().clamp(min=1e-30))
        if e > worst:
            worst, worst_name = e, k
    return worst, worst_name
