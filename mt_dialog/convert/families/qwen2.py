"""Qwen2 (``Qwen2ForCausalLM``): the Llama block with biases on the q, k and v projections
(``--add-qkv-bias``, grouped like the weights); sliding windows refused."""

from __future__ import annotations

from typing import Any, Dict

from mt_dialog.convert.families.base import DocsRow
from mt_dialog.convert.families.common import refuse_sliding_window
from mt_dialog.convert.families.llama import Llama


class Qwen2(Llama):
    """Llama + QKV bias."""

    architecture = "Qwen2ForCausalLM"
    model_type = "qwen2"
    config_class = "Qwen2Config"
    features = frozenset({"qkv_bias"})
    docs = DocsRow("`--add-qkv-bias`", "`use_sliding_window`")

    def refuse(self, config: Any, path: str) -> None:
        super().refuse(config, path)
        refuse_sliding_window(config, path, qwen_style=True)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return {**super().model_kwargs(config, path), "add_qkv_bias": True}


QWEN2 = Qwen2()
