"""Tensor names and layouts: Hugging Face Llama/Qwen2/Qwen3 <-> megatron-core GPTModel
(TP = PP = 1).

Per layer ``i`` (H hidden, G query groups, q = heads / G query heads per group, d head size)::

    model.layers.i.input_layernorm.weight          decoder.layers.i.input_layernorm.weight
    model.layers.i.self_attn.{q,k,v}_proj.weight   decoder.layers.i.self_attention.linear_qkv.weight
      q [G*q*d, H], k [G*d, H], v [G*d, H]           [G*(q+2)*d, H], grouped per query group:
                                                     [ q heads of group 0 | k0 | v0 | q heads of
                                                       group 1 | k1 | v1 | ... ]
    model.layers.i.self_attn.{q,k,v}_proj.bias     ... .linear_qkv.bias (same grouping; Qwen2)
    model.layers.i.self_attn.{q,k}_norm.weight     ... .self_attention.{q,k}_layernorm.weight
      [d] (Qwen3: one RMSNorm per head)              [d], the same on every TP rank
    model.layers.i.self_attn.o_proj.weight         ... .self_attention.linear_proj.weight
    model.layers.i.post_attention_layernorm.weight ... .pre_mlp_layernorm.weight
    model.layers.i.mlp.{gate,up}_proj.weight       ... .mlp.linear_fc1.weight = [gate; up]
    model.layers.i.mlp.down_proj.weight            ... .mlp.linear_fc2.weight
    model.embed_tokens.weight                      embedding.word_embeddings.weight
    model.norm.weight                              decoder.final_layernorm.weight
    lm_head.weight                                 output_layer.weight (untied embeddings only)

Mixture of Experts (``--num-experts``), instead of the MLP rows above, expert ``e``::

    Qwen3MoeForCausalLM                            megatron-core
    model.layers.i.mlp.gate.weight [E, H]          ... .mlp.router.weight
    model.layers.i.mlp.experts.e.gate_proj.weight  ... .mlp.experts.local_experts.e.linear_fc1.weight
    model.layers.i.mlp.experts.e.up_proj.weight      = [gate; up]
    model.layers.i.mlp.experts.e.down_proj.weight  ... .mlp.experts.local_experts.e.linear_fc2.weight
    MixtralForCausalLM: model.layers.i.block_sparse_moe.gate.weight, and experts.e.w1 (gate),
    w3 (up), w2 (down) under block_sparse_moe.

A ModelConfig tells the two apart as it tells the dense families apart: Qwen3-MoE has q/k norms.
Both sides rotate halves for RoPE (no interleaving), so q and k rows are copied as they are.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch

from mt_dialog.convert.hf_config import ConversionError
from mt_dialog.training.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# buffers some exporters write beside the weights; recomputed, never needed
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Shapes:
    """Attention geometry needed to (un)group the QKV projection."""

    groups: int
    per_group: int  # query heads per group
    head_dim: int

    @classmethod
    def of(cls, model: ModelConfig) -> "Shapes":
        groups = model.num_query_groups
        return cls(groups, model.num_attention_heads // groups, model.kv_channels)


class SafetensorsFolder:
    """Tensors of a Hugging Face folder: ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``; each tensor is read on demand."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as handle:
                    self.files = dict(json.load(handle)["weight_map"])
            except (OSError, ValueError, KeyError) as exc:
                raise ConversionError(f"{index}: unreadable weight map ({exc})") from None
        elif os.path.isfile(single):
            self.files = {name: SINGLE for name in self._names(single)}
        else:
            legacy = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (f" (found {', '.join(sorted(legacy)[:3])}: re-save the model with "
                    "save_pretrained(..., safe_serialization=True))" if legacy else "")
            raise ConversionError(f"{folder}: no {SINGLE} or {INDEX}; only safetensors "
                                  f"checkpoints are read{hint}")
        self._open: Dict[str, object] = {}

    @staticmethod
    def _names(path: str) -> List[str]:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a safetensors file ({exc})") from None

    def names(self) -> List[str]:
        return [n for n in self.files if not n.endswith(IGNORED_SUFFIXES)]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise ConversionError(f"{self.folder}: tensor {name} is missing")
        file = self.files[name]
        if file not in self._open:
            path = os.path.join(self.folder, file)
            if not os.path.isfile(path):
                raise ConversionError(f"{self.folder}: {file} (listed in {INDEX}) is missing")
            self._open[file] = safe_open(path, framework="pt")
        return self._open[file].get_tensor(name)


def moe_names(model: ModelConfig) -> Tuple[str, str, str, str]:
    """(block, gate, up, down) of a MoE model's HF names: Qwen3-MoE's (the family with q/k
    norms) or Mixtral's."""
    if model.qk_layernorm:
        return "mlp", "gate_proj", "up_proj", "down_proj"
    return "block_sparse_moe", "w1", "w3", "w2"


def _hf_mlp_names(model: ModelConfig) -> List[str]:
    if not model.num_experts:
        return ["mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"]
    block, *projections = moe_names(model)
    return [f"{block}.gate.weight"] + [f"{block}.experts.{e}.{p}.weight"
                                       for e in range(model.num_experts) for p in projections]


def hf_layer_names(i: int, qkv_bias: bool, qk_norm: bool = False,
                   model: Optional[ModelConfig] = None) -> List[str]:
    """The HF tensor names of layer ``i`` (with Qwen2's q/k/v biases, Qwen3's q/k norms; a MoE
    ``model``'s router and experts)."""
    prefix = f"model.layers.{i}."
    names = [prefix + n for n in (
        "input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
        "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight",
        *_hf_mlp_names(model or ModelConfig()))]
    if qkv_bias:
        names += [prefix + f"self_attn.{p}_proj.bias" for p in "qkv"]
    if qk_norm:
        names += [prefix + f"self_attn.{p}_norm.weight" for p in "qk"]
    return names


def expected_hf_names(model: ModelConfig) -> List[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if model.untie_embeddings_and_output_weights:
        names.append("lm_head.weight")
    for i in range(model.num_layers):
        names += hf_layer_names(i, model.add_qkv_bias, model.qk_layernorm, model)
    return names


def check_names(folder: SafetensorsFolder, model: ModelConfig) -> None:
    """Every tensor the config implies is there, and nothing else (a tied ``lm_head`` is fine)."""
    expected = set(expected_hf_names(model))
    present = set(folder.names())
    missing = sorted(expected - present)
    if missing:
        raise ConversionError(f"{folder.folder}: {len(missing)} tensor(s) the config implies are "
                              f"missing, e.g. {', '.join(missing[:4])}")
    unexpected = sorted(present - expected - {"lm_head.weight"})
    if unexpected:
        raise ConversionError(f"{folder.folder}: {len(unexpected)} tensor(s) this converter does "
                              f"not know, e.g. {', '.join(unexpected[:4])}; is it a plain "
                              "Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Mixtral checkpoint?")


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shapes: Shapes) -> torch.Tensor:
    """HF q, k, v (weights [rows, H] or biases [rows]) -> megatron's grouped QKV."""
    g, d = shapes.groups, shapes.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(g, shapes.per_group * d, *tail), k.reshape(g, d, *tail),
             v.reshape(g, d, *tail))
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, shapes: Shapes) -> Tuple[torch.Tensor, ...]:
    """megatron's grouped QKV -> HF q, k, v."""
    g, d = shapes.groups, shapes.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (shapes.per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [shapes.per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def hf_to_mcore_layer(get, i: int, model: ModelConfig) -> Dict[str, torch.Tensor]:
    """megatron-core tensors of layer ``i``; ``get(name)`` reads one HF tensor."""
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    shapes = Shapes.of(model)
    out = {
        mc + "input_layernorm.weight": get(hf + "input_layernorm.weight"),
        mc + "self_attention.linear_qkv.weight": group_qkv(
            *(get(hf + f"self_attn.{p}_proj.weight") for p in "qkv"), shapes),
        mc + "self_attention.linear_proj.weight": get(hf + "self_attn.o_proj.weight"),
        mc + "pre_mlp_layernorm.weight": get(hf + "post_attention_layernorm.weight"),
        **_hf_to_mcore_mlp(get, hf, mc, model),
    }
    if model.add_qkv_bias:
        out[mc + "self_attention.linear_qkv.bias"] = group_qkv(
            *(get(hf + f"self_attn.{p}_proj.bias") for p in "qkv"), shapes)
    if model.qk_layernorm:  # [head_dim], applied to every head: copied as it is
        for p in "qk":
            out[mc + f"self_attention.{p}_layernorm.weight"] = get(
                hf + f"self_attn.{p}_norm.weight")
    return out


def _mlp_pairs(hf: str, mc: str, model: ModelConfig) -> List[Tuple[str, str, str, str]]:
    """(HF gate, HF up, HF down, megatron MLP prefix) of each MLP (each expert) of a layer."""
    if not model.num_experts:
        return [(hf + "mlp.gate_proj.weight", hf + "mlp.up_proj.weight",
                 hf + "mlp.down_proj.weight", mc + "mlp.")]
    block, gate, up, down = moe_names(model)
    return [tuple(f"{hf}{block}.experts.{e}.{p}.weight" for p in (gate, up, down))
            + (f"{mc}mlp.experts.local_experts.{e}.",) for e in range(model.num_experts)]


def _hf_to_mcore_mlp(get, hf: str, mc: str, model: ModelConfig) -> Dict[str, torch.Tensor]:
    out = {}
    for gate, up, down, prefix in _mlp_pairs(hf, mc, model):
        out[prefix + "linear_fc1.weight"] = torch.cat([get(gate), get(up)])
        out[prefix + "linear_fc2.weight"] = get(down)
    if model.num_experts:
        out[mc + "mlp.router.weight"] = get(f"{hf}{moe_names(model)[0]}.gate.weight")
    return out


def _mcore_to_hf_mlp(state, hf: str, mc: str, model: ModelConfig) -> Dict[str, torch.Tensor]:
    out = {}
    for gate, up, down, prefix in _mlp_pairs(hf, mc, model):
        gate_rows, up_rows = torch.chunk(state[prefix + "linear_fc1.weight"], 2, dim=0)
        out.update({gate: gate_rows.contiguous(), up: up_rows.contiguous(),
                    down: state[prefix + "linear_fc2.weight"]})
    if model.num_experts:
        out[f"{hf}{moe_names(model)[0]}.gate.weight"] = state[mc + "mlp.router.weight"]
    return out


def hf_to_mcore_outer(get, model: ModelConfig) -> Dict[str, torch.Tensor]:
    """Embedding, final norm and (untied) output layer."""
    out = {"embedding.word_embeddings.weight": get("model.embed_tokens.weight"),
           "decoder.final_layernorm.weight": get("model.norm.weight")}
    if model.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = get("lm_head.weight")
    return out


def mcore_to_hf_layer(state: Dict[str, torch.Tensor], i: int,
                      model: ModelConfig) -> Dict[str, torch.Tensor]:
    """HF tensors of layer ``i`` from a TP = PP = 1 GPTModel state dict."""
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    shapes = Shapes.of(model)
    q, k, v = split_qkv(state[mc + "self_attention.linear_qkv.weight"], shapes)
    out = {
        hf + "input_layernorm.weight": state[mc + "input_layernorm.weight"],
        hf + "self_attn.q_proj.weight": q, hf + "self_attn.k_proj.weight": k,
        hf + "self_attn.v_proj.weight": v,
        hf + "self_attn.o_proj.weight": state[mc + "self_attention.linear_proj.weight"],
        hf + "post_attention_layernorm.weight": state[mc + "pre_mlp_layernorm.weight"],
        **_mcore_to_hf_mlp(state, hf, mc, model),
    }
    if model.add_qkv_bias:
        for name, tensor in zip("qkv", split_qkv(state[mc + "self_attention.linear_qkv.bias"],
                                                 shapes)):
            out[hf + f"self_attn.{name}_proj.bias"] = tensor
    if model.qk_layernorm:
        for p in "qk":
            out[hf + f"self_attn.{p}_norm.weight"] = state[
                mc + f"self_attention.{p}_layernorm.weight"]
    return out


def mcore_to_hf_outer(state: Dict[str, torch.Tensor], model: ModelConfig,
                      rows: int) -> Dict[str, torch.Tensor]:
    """Embedding and output layer cut (or zero-padded) to ``rows``, and the final norm."""
    def fit(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.shape[0] >= rows:
            return tensor[:rows].contiguous()
        pad = tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])
        return torch.cat([tensor, pad])

    out = {"model.embed_tokens.weight": fit(state["embedding.word_embeddings.weight"]),
           "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if model.untie_embeddings_and_output_weights:
        out["lm_head.weight"] = fit(state["output_layer.weight"])
    return out


def iter_mcore_to_hf(state: Dict[str, torch.Tensor], model: ModelConfig,
                     rows: int) -> Iterator[Dict[str, torch.Tensor]]:
    """HF tensors, one group per layer then the outer ones (for progress and sharding)."""
    for i in range(model.num_layers):
        yield mcore_to_hf_layer(state, i, model)
    yield mcore_to_hf_outer(state, model, rows)
