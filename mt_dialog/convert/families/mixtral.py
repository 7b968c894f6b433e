"""Mixtral (``MixtralForCausalLM``): Mistral's attention and a MoE layer in every layer
(``moe`` module docstring; ``block_sparse_moe``, experts ``w1`` gate, ``w3`` up, ``w2`` down);
its top-k probabilities are renormalized (megatron-core's default routing)."""

from __future__ import annotations

from typing import Any, Dict, List

from mt_dialog.convert.families.base import DocsRow, LoraTarget, Rule
from mt_dialog.convert.families.common import LLAMA_FIELDS, llama_attention_rules
from mt_dialog.convert.families.llama import Mistral
from mt_dialog.convert.families.moe import MOE_FIELDS, attention_lora_targets, moe_layer_rules
from mt_dialog.training.config import ModelConfig


class Mixtral(Mistral):
    """Mistral + experts."""

    architecture = "MixtralForCausalLM"
    model_type = "mixtral"
    config_class = "MixtralConfig"
    features = frozenset({"experts"})
    export_default = True
    model_fields = LLAMA_FIELDS + MOE_FIELDS
    docs = DocsRow("`--num-experts`", "`sliding_window`")

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return {**super().model_kwargs(config, path),
                "num_experts": int(getattr(config, "num_local_experts", None)
                                   or config.num_experts),
                "moe_router_topk": int(config.num_experts_per_tok),
                "moe_ffn_hidden_size": int(config.intermediate_size),
                "moe_router_pre_softmax": False}

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        return {**super().hf_config_kwargs(model), "intermediate_size": model.moe_ffn_hidden_size,
                "num_local_experts": model.num_experts,
                "num_experts_per_tok": model.moe_router_topk}

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        return llama_attention_rules(i, model) + moe_layer_rules(
            i, model, "block_sparse_moe", "w1", "w3", "w2")

    def lora_targets(self, model: ModelConfig) -> Dict[str, LoraTarget]:
        return attention_lora_targets()


MIXTRAL = Mixtral()
