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

from typing import Any, Dict, List

from mt_dialog.convert.families.base import (
    ConversionError,
    ImportExtras,
    LoraTarget,
    Rule,
    same,
)
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


# -- DeepSeek-V3 / GLM-4.5 MoE: sigmoid router with an expert bias, shared experts, groups ------
#
# The MoE block DeepSeek-V3 (Kimi K2) and GLM-4.5 share (transformers 5.23's DeepseekV3MoE /
# Glm4MoeMoE, read for the layout). Config fields -> ModelConfig (megatron-core flags):
#
#   n_routed_experts           -> --num-experts
#   num_experts_per_tok        -> --moe-router-topk
#   moe_intermediate_size      -> --moe-ffn-hidden-size (the dense layers keep intermediate_size)
#   n_shared_experts * moe_intermediate_size -> --moe-shared-expert-intermediate-size (no gate)
#   (sigmoid scores)           -> --moe-router-score-function sigmoid
#   e_score_correction_bias    -> --moe-router-enable-expert-bias, --moe-router-bias-update-rate 0
#                                 (a buffer in HF; kept as loaded, never trained)
#   n_group / topk_group       -> --moe-router-num-groups / --moe-router-group-topk (n_group 1:
#                                 no group routing)
#   routed_scaling_factor      -> --moe-router-topk-scaling-factor (1.0: none)
#   first_k_dense_replace k    -> --moe-layer-freq [0]*k + [1]*(L-k)
#   norm_topk_prob true        -> megatron-core's renormalization (always on for sigmoid, top-k>1)
#
# Layer i's MLP (dense when i < k, else MoE; with any dense layer megatron-core saves the layers
# one by one, under the same names)::
#
#   Hugging Face (model.layers.i.mlp.)       megatron-core (decoder.layers.i.mlp.)
#   gate_proj, up_proj [F, H]  (i < k)  ---> linear_fc1 [2F, H] = [gate; up]
#   down_proj [H, F]           (i < k)  ---> linear_fc2
#   gate.weight [E, H]                  ---> router.weight
#   gate.e_score_correction_bias [E]    ---> router.expert_bias (fp32 buffer, both ways)
#   experts.e.{gate,up}_proj [f, H]     ---> experts.local_experts.e.linear_fc1 [2f, H]
#   experts.e.down_proj [H, f]          ---> experts.local_experts.e.linear_fc2
#   shared_experts.{gate,up}_proj [S, H] --> shared_experts.linear_fc1 [2S, H], S = n_shared * f
#   shared_experts.down_proj [H, S]     ---> shared_experts.linear_fc2

# the architecture fields (--use-checkpoint-args takes them); the bias update rate is a training
# setting (import sets it to its default, 0; a fine-tune may pass another)
SIGMOID_MOE_FIELDS = MOE_FIELDS + (
    "moe_shared_expert_intermediate_size", "moe_router_score_function",
    "moe_router_enable_expert_bias", "moe_router_num_groups", "moe_router_group_topk",
    "moe_router_topk_scaling_factor", "moe_layer_freq")


def refuse_sigmoid_moe(config: Any, path: str) -> None:
    """``ConversionError`` for the routing settings megatron-core computes differently:
    softmax / other scoring or top-k methods, ``norm_topk_prob`` false (megatron-core always
    renormalizes sigmoid top-k > 1 weights), top-k 1 with ``norm_topk_prob`` true (HF divides
    the one weight by itself; megatron-core keeps it), ``n_group`` > 1 with
    ``num_experts_per_tok / topk_group`` != 2 (HF ranks a group by its top-2 scores,
    megatron-core by its top ``topk // group_topk``), ``first_k_dense_replace`` beyond the
    layers."""
    scoring = getattr(config, "scoring_func", "sigmoid")
    if scoring != "sigmoid":
        raise ConversionError(f"{path}: scoring_func {scoring!r} is not supported; only sigmoid "
                              "(DeepSeek-V3 / GLM-4.5 routing)")
    method = getattr(config, "topk_method", "noaux_tc")
    if method != "noaux_tc":
        raise ConversionError(f"{path}: topk_method {method!r} is not supported; only noaux_tc "
                              "(sigmoid scores + e_score_correction_bias)")
    topk, norm = int(config.num_experts_per_tok), bool(getattr(config, "norm_topk_prob", True))
    if topk > 1 and not norm:
        raise ConversionError(f"{path}: norm_topk_prob false with num_experts_per_tok {topk}: "
                              "megatron-core always renormalizes the top-k sigmoid weights; "
                              "only norm_topk_prob true is supported")
    if topk == 1 and norm:
        raise ConversionError(f"{path}: norm_topk_prob true with num_experts_per_tok 1: HF "
                              "divides the weight by itself (1.0), megatron-core keeps the "
                              "sigmoid score; set norm_topk_prob false or use top-k > 1")
    groups, group_topk = int(getattr(config, "n_group", 1) or 1), getattr(config, "topk_group", 1)
    if groups > 1 and (not group_topk or topk % int(group_topk) or topk // int(group_topk) != 2):
        raise ConversionError(f"{path}: n_group {groups} with num_experts_per_tok {topk} and "
                              f"topk_group {group_topk}: HF ranks each group by its top-2 scores,"
                              " megatron-core by its top num_experts_per_tok / topk_group; only "
                              "num_experts_per_tok = 2 x topk_group (or n_group 1) is supported")
    dense = int(getattr(config, "first_k_dense_replace", 0) or 0)
    if not 0 <= dense < int(config.num_hidden_layers):
        raise ConversionError(f"{path}: first_k_dense_replace {dense} must be between 0 and "
                              f"num_hidden_layers - 1 ({int(config.num_hidden_layers) - 1}): "
                              "at least one MoE layer")


def sigmoid_moe_model_kwargs(config: Any) -> Dict[str, Any]:
    """``ModelConfig`` kwargs of the sigmoid MoE (``SIGMOID_MOE_FIELDS``; after
    ``refuse_sigmoid_moe``). The expert bias is kept as loaded (bias update rate 0)."""
    layers, dense = int(config.num_hidden_layers), int(getattr(config, "first_k_dense_replace",
                                                               0) or 0)
    size, shared = int(config.moe_intermediate_size), int(getattr(config, "n_shared_experts",
                                                                  0) or 0)
    groups = int(getattr(config, "n_group", 1) or 1)
    scale = float(getattr(config, "routed_scaling_factor", 1.0) or 1.0)
    return {"num_experts": int(config.n_routed_experts),
            "moe_router_topk": int(config.num_experts_per_tok), "moe_ffn_hidden_size": size,
            "moe_shared_expert_intermediate_size": shared * size or None,
            "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
            "moe_router_bias_update_rate": 0.0,
            "moe_router_num_groups": groups if groups > 1 else None,
            "moe_router_group_topk": int(config.topk_group) if groups > 1 else None,
            "moe_router_topk_scaling_factor": scale if scale != 1.0 else None,
            "moe_layer_freq": [0] * dense + [1] * (layers - dense) if dense else 1}


def first_dense_layers(model: ModelConfig) -> int:
    """HF ``first_k_dense_replace`` of ``model``: its leading dense layers, or ConversionError
    when its dense layers are not all first (HF has no other pattern)."""
    pattern = model.moe_layer_pattern()
    if pattern is None:
        return 0
    dense = pattern.index(1)
    if 0 in pattern[dense:]:
        raise ConversionError(f"--moe-layer-freq {pattern}: Hugging Face's first_k_dense_replace "
                              "has the dense layers first, then MoE layers only; use "
                              "--moe-layer-freq '([0]*K+[1]*N)'")
    return dense


def sigmoid_moe_hf_kwargs(model: ModelConfig) -> Dict[str, Any]:
    """transformers config kwargs of the sigmoid MoE (``sigmoid_moe_model_kwargs`` reversed);
    ConversionError for a shared expert that is not a whole number of routed-expert sizes."""
    size, shared = model.moe_ffn_hidden_size, model.moe_shared_expert_intermediate_size or 0
    if shared % size:
        raise ConversionError(f"--moe-shared-expert-intermediate-size {shared} is not a multiple "
                              f"of --moe-ffn-hidden-size {size}: Hugging Face's shared expert is "
                              "n_shared_experts x moe_intermediate_size")
    return {"n_routed_experts": model.num_experts, "num_experts_per_tok": model.moe_router_topk,
            "moe_intermediate_size": size, "n_shared_experts": shared // size,
            "n_group": model.moe_router_num_groups or 1,
            "topk_group": model.moe_router_group_topk or 1,
            "routed_scaling_factor": model.moe_router_topk_scaling_factor or 1.0,
            "norm_topk_prob": True, "first_k_dense_replace": first_dense_layers(model)}


def sigmoid_moe_mlp_rules(i: int, model: ModelConfig) -> List[Rule]:
    """Layer ``i``'s MLP (block comment above): a SwiGLU MLP for a dense layer, else the
    router, its expert bias buffer, the routed experts and the shared expert."""
    hf, mc = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
    if i < first_dense_layers(model):
        return swiglu_rules(hf, mc, "gate_proj", "up_proj", "down_proj")
    rules = moe_layer_rules(i, model, "mlp", "gate_proj", "up_proj", "down_proj")
    rules.append(same(hf + "gate.e_score_correction_bias", mc + "router.expert_bias"))
    if model.moe_shared_expert_intermediate_size:
        rules += swiglu_rules(hf + "shared_experts.", mc + "shared_experts.", "gate_proj",
                              "up_proj", "down_proj")
    return rules


EXPERT_BIAS_NOTE = ("the expert bias (e_score_correction_bias) is kept as loaded, never trained: "
                    "--moe-router-bias-update-rate 0 (pass a rate > 0 to update it towards "
                    "balance)")


def sigmoid_moe_import_extras(config: Any, adapt=None) -> ImportExtras:
    """What an import of a DeepSeek-style checkpoint adds: the ``num_nextn_predict_layers``
    multi-token-prediction layers (tensors ``model.layers.{L+k}.*``) dropped with a printed
    reason, the expert-bias note, and ``adapt`` (a tensor adapter, e.g. DeepSeek's rope rows)."""
    layers = int(config.num_hidden_layers)
    mtp = int(getattr(config, "num_nextn_predict_layers", 0) or 0)
    return ImportExtras(
        adapt=adapt, dropped_prefixes=tuple(f"model.layers.{layers + k}." for k in range(mtp)),
        dropped_reason=f"the {mtp} multi-token-prediction layer(s) (num_nextn_predict_layers; "
        "mt_dialog trains next-token prediction only; the export has none)",
        notes=(EXPERT_BIAS_NOTE,))
