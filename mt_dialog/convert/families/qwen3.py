"""Qwen3 (``Qwen3ForCausalLM``, dense): the Llama block with an RMSNorm of the head size on
every query and key head before RoPE (``q_norm`` / ``k_norm`` -> megatron-core's
``--qk-layernorm``, ``self_attention.q_layernorm`` / ``k_layernorm``); no biases, sliding
windows refused."""

from __future__ import annotations

from typing import Any, Dict

from mt_dialog.convert.families.base import DocsRow
from mt_dialog.convert.families.common import refuse_sliding_window
from mt_dialog.convert.families.llama import Llama


class Qwen3(Llama):
    """Llama + q/k layernorm."""

    architecture = "Qwen3ForCausalLM"
    model_type = "qwen3"
    config_class = "Qwen3Config"
    features = frozenset({"qk_layernorm"})
    docs = DocsRow("`--qk-layernorm`", "`use_sliding_window`, `attention_bias`")

    def refuse(self, config: Any, path: str) -> None:
        super().refuse(config, path)
        refuse_sliding_window(config, path, qwen_style=True)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return {**super().model_kwargs(config, path), "qk_layernorm": True}


QWEN3 = Qwen3()
