"""Mixture-of-Experts helpers the MoE families share: the router and experts' tensor rules and
the routing fields.

Every layer of Qwen3-MoE and Mixtral is a MoE layer with no shared expert: ``--num-experts``,
``--moe-router-topk`` (``num_experts_per_tok``), ``--moe-ffn-hidden-size``. Mixtral takes the
softmax over all experts, keeps the top k and renormalizes them, which is the softmax over the
k chosen logits (megatron-core's default); Qwen3-MoE does the same with ``norm_topk_prob`` true
and keeps the unrenormalized top-k probabilities with false (``--moe-router-pre-softmax``).
Expert ``e`` of layer ``i``::

    model.layers.i.{block}.gate.weight [E, H]       decoder.layers.i.mlp.router.weight
    model.layers.i.{block}.experts.e.{gate, up}     ... .mlp.experts.local_experts.e.linear_fc1
      (Qwen3-MoE: mlp, gate_proj / up_proj;            = [gate; up]
       Mixtral: block_sparse_moe, w1 / w3)
    model.layers.i.{block}.experts.e.{down} (w2)    ... .mlp.experts.local_experts.e.linear_fc2
"""

from __future__ import annotations

from typing import Dict, List

from mt_dialog.convert.families.base import LoraTarget, Rule, same
from mt_dialog.convert.families.common import llama_lora_targets, swiglu_rules
from mt_dialog.training.config import ModelConfig

MOE_FIELDS = ("num_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_router_pre_softmax")


def moe_layer_rules(i: int, model: ModelConfig, block: str, gate: str, up: str,
                    down: str) -> List[Rule]:
    """Router and experts of layer ``i``: HF ``model.layers.i.{block}.gate`` and
    ``{block}.experts.e.{gate,up,down}``."""
    hf, mc = f"model.layers.{i}.{block}.", f"decoder.layers.{i}.mlp."
    rules = [same(hf + "gate.weight", mc + "router.weight")]
    for e in range(model.num_experts):
        rules += swiglu_rules(f"{hf}experts.{e}.", f"{mc}experts.local_experts.{e}.", gate, up,
                              down)
    return rules


def attention_lora_targets() -> Dict[str, LoraTarget]:
    """LoRA on a MoE model adapts attention only (the experts get no adapters)."""
    targets = llama_lora_targets()
    return {name: targets[name] for name in ("linear_qkv", "linear_proj")}
