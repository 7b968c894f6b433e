"""A LoRA checkpoint's adapters as a PEFT adapter folder (``mcore-to-hf`` of a LoRA checkpoint).

    ADAPTER_DIR/
      adapter_config.json          peft's LoraConfig: r, lora_alpha, target_modules (Hugging
                                   Face names), base_model_name_or_path (the imported folder)
      adapter_model.safetensors    base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight
                                   ... lora_B.weight, one pair per adapted Hugging Face module

so that ``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), DIR)``
computes what mt_dialog trained. megatron-core fuses layers that Hugging Face keeps apart; a fused
layer's adapter ``W x + s B A x`` splits exactly, the rows of ``B`` going with the rows of ``W``
and ``A`` shared::

    linear_qkv   A [r, H], B grouped per query group   q_proj, k_proj, v_proj: A, and B's q / k /
                 (as the weight, hf_weights.split_qkv)   v rows (split_qkv of B)
    linear_fc1   A [r, H], B = [B_gate; B_up]           gate_proj: A, B_gate; up_proj: A, B_up
    linear_proj  A, B                                   o_proj
    linear_fc2   A, B                                   down_proj

``--merge-lora`` instead folds ``s B A`` into the weights (``lora.merge_into_base``) and writes a
plain Hugging Face model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List, Tuple

import torch

from mt_dialog.convert.hf_weights import Shapes, split_qkv

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix before the Hugging Face model's names
# megatron-core target -> (Hugging Face module path in a layer, the modules it splits into)
HF_MODULES = {"linear_qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")),
              "linear_proj": ("self_attn", ("o_proj",)),
              "linear_fc1": ("mlp", ("gate_proj", "up_proj")),
              "linear_fc2": ("mlp", ("down_proj",))}
MCORE_PARENT = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
                "linear_fc1": "mlp", "linear_fc2": "mlp"}


def _split_b(target: str, b: torch.Tensor, shapes: Shapes) -> Tuple[torch.Tensor, ...]:
    """``B`` of a megatron-core target split into its Hugging Face modules' ``B``s."""
    if target == "linear_qkv":
        return split_qkv(b, shapes)
    if target == "linear_fc1":
        return tuple(part.contiguous() for part in torch.chunk(b, 2, dim=0))
    return (b,)


def peft_tensors(state: Dict[str, torch.Tensor], model, targets) -> Iterator[
        Dict[str, torch.Tensor]]:
    """PEFT adapter tensors, one dict per layer, from a TP = PP = 1 GPTModel state dict with
    adapters (``model``: its ``ModelConfig``; ``targets``: the adapted megatron-core layers)."""
    shapes = Shapes.of(model)
    for i in range(model.num_layers):
        out = {}
        for target in targets:
            mc = f"decoder.layers.{i}.{MCORE_PARENT[target]}.{target}.lora."
            parent, names = HF_MODULES[target]
            a = state[mc + "A"]
            for name, b in zip(names, _split_b(target, state[mc + "B"], shapes)):
                hf = f"{PREFIX}model.layers.{i}.{parent}.{name}."
                out[hf + "lora_A.weight"] = a.clone()  # shared: one copy per module
                out[hf + "lora_B.weight"] = b
        yield out


def hf_target_modules(targets) -> List[str]:
    return [name for target in targets for name in HF_MODULES[target][1]]


def adapter_config(lora, base_model: Any) -> Dict[str, Any]:
    """peft's ``adapter_config.json`` for ``lora`` (a ``LoraConfig``) on ``base_model`` (the
    Hugging Face folder the base was imported from, or None)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora.lora_rank),
            "lora_alpha": lora.alpha, "lora_dropout": float(lora.lora_dropout),
            "target_modules": hf_target_modules(lora.targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base_model}


def write_adapter(out: str, state: Dict[str, torch.Tensor], model, lora, base_model,
                  dtype: torch.dtype) -> int:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out``; returns the
    bytes of the tensors."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu", dtype).contiguous()
               for group in peft_tensors(state, model, lora.targets)
               for name, tensor in group.items()}
    save_file(tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w", encoding="utf-8") as handle:
        json.dump(adapter_config(lora, base_model), handle, indent=2)
    return sum(t.numel() * t.element_size() for t in tensors.values())
