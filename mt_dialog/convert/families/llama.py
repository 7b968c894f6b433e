"""Llama (``LlamaForCausalLM``) and Mistral (``MistralForCausalLM``, the same block; its
``sliding_window`` refused): RMSNorm, SwiGLU, RoPE (default / linear / llama3), grouped-query
attention, no biases."""

from __future__ import annotations

from typing import Any, Dict, List

from mt_dialog.convert.families.base import DocsRow, Family, Rule
from mt_dialog.convert.families.common import (
    LLAMA_FIELDS,
    llama_hf_kwargs,
    llama_layer_rules,
    llama_model_kwargs,
    refuse_llama_block,
    refuse_sliding_window,
)
from mt_dialog.training.config import ModelConfig

BIAS_NOTE = "Llama blocks here have no biases; Qwen2 has q/k/v biases only"


class Llama(Family):
    """The Llama block every other family here starts from."""

    architecture = "LlamaForCausalLM"
    model_type = "llama"
    config_class = "LlamaConfig"
    model_fields = LLAMA_FIELDS
    docs = DocsRow("nothing", "`attention_bias`, `mlp_bias`")

    def refuse(self, config: Any, path: str) -> None:
        refuse_llama_block(config, path, BIAS_NOTE)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return llama_model_kwargs(config, path)

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        return llama_hf_kwargs(model)

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        return llama_layer_rules(i, model)


class Mistral(Llama):
    """Llama's block under Mistral's name; sliding-window attention refused."""

    architecture = "MistralForCausalLM"
    model_type = "mistral"
    config_class = "MistralConfig"
    export_default = False  # a Llama-block model exports as Llama unless imported as Mistral
    docs = DocsRow("nothing", "`sliding_window`")

    def refuse(self, config: Any, path: str) -> None:
        super().refuse(config, path)
        refuse_sliding_window(config, path, qwen_style=False)


LLAMA = Llama()
MISTRAL = Mistral()
