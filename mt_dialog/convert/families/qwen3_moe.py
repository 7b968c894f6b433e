"""Qwen3-MoE (``Qwen3MoeForCausalLM``): Qwen3's attention (q/k layernorm) and a MoE layer in
every layer (``moe`` module docstring); dense layers between them (``decoder_sparse_step`` != 1,
``mlp_only_layers``) refused."""

from __future__ import annotations

from typing import Any, Dict, List

from mt_dialog.convert.families.base import ConversionError, DocsRow, LoraTarget, Rule
from mt_dialog.convert.families.common import LLAMA_FIELDS, llama_attention_rules
from mt_dialog.convert.families.moe import MOE_FIELDS, attention_lora_targets, moe_layer_rules
from mt_dialog.convert.families.qwen3 import Qwen3
from mt_dialog.training.config import ModelConfig


class Qwen3Moe(Qwen3):
    """Qwen3 + experts."""

    architecture = "Qwen3MoeForCausalLM"
    model_type = "qwen3_moe"
    config_class = "Qwen3MoeConfig"
    features = frozenset({"qk_layernorm", "experts"})
    optional_features = frozenset({"router_pre_softmax"})  # norm_topk_prob false
    model_fields = LLAMA_FIELDS + MOE_FIELDS
    docs = DocsRow("`--qk-layernorm`, `--num-experts` (`--moe-router-pre-softmax` when "
                   "`norm_topk_prob` is false)",
                   "as Qwen3; `mlp_only_layers`, `decoder_sparse_step` != 1")

    def refuse(self, config: Any, path: str) -> None:
        sparse = getattr(config, "decoder_sparse_step", 1)
        dense = getattr(config, "mlp_only_layers", None) or []
        if sparse != 1 or dense:
            raise ConversionError(f"{path}: decoder_sparse_step {sparse} / mlp_only_layers "
                                  f"{list(dense)}: dense MLP layers between the MoE layers are "
                                  "not supported; only decoder_sparse_step 1 and no "
                                  "mlp_only_layers (every layer a MoE layer)")
        super().refuse(config, path)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return {**super().model_kwargs(config, path),
                "num_experts": int(config.num_experts),
                "moe_router_topk": int(config.num_experts_per_tok),
                "moe_ffn_hidden_size": int(config.moe_intermediate_size),
                "moe_router_pre_softmax": not getattr(config, "norm_topk_prob", False)}

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        return {**super().hf_config_kwargs(model), "num_experts": model.num_experts,
                "num_experts_per_tok": model.moe_router_topk,
                "moe_intermediate_size": model.moe_ffn_hidden_size,
                "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": 1,
                "mlp_only_layers": []}

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        return llama_attention_rules(i, model) + moe_layer_rules(
            i, model, "mlp", "gate_proj", "up_proj", "down_proj")

    def lora_targets(self, model: ModelConfig) -> Dict[str, LoraTarget]:
        return attention_lora_targets()


QWEN3_MOE = Qwen3Moe()
