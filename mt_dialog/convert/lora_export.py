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
                 (as the weight, common.split_qkv)   v rows (split_qkv of B)
    linear_fc1   A [r, H], B = [B_gate; B_up]           gate_proj: A, B_gate; up_proj: A, B_up
    linear_proj  A, B                                   o_proj
    linear_fc2   A, B                                   down_proj

The family (``convert.families``, ``Family.lora_targets``) gives each target's Hugging Face
modules and how its ``B`` splits. ``--merge-lora`` instead folds ``s B A`` into the weights
(``lora.merge_into_base``) and writes a plain Hugging Face model.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, List

import torch

from mt_dialog.convert.families import Family

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's prefix before the Hugging Face model's names


def _lora_targets(family: Family, model, targets):
    """The family's ``LoraTarget`` of each adapted megatron-core layer."""
    known = family.lora_targets(model)
    missing = [t for t in targets if t not in known]
    if missing:
        from mt_dialog.convert.families import ConversionError

        raise ConversionError(f"--lora-target {' '.join(missing)}: {family.architecture} has no "
                              f"Hugging Face module for it; adaptable: {' '.join(known)}")
    return {t: known[t] for t in targets}


def peft_tensors(state: Dict[str, torch.Tensor], family: Family, model, targets) -> Iterator[
        Dict[str, torch.Tensor]]:
    """PEFT adapter tensors, one dict per layer, from a TP = PP = 1 GPTModel state dict with
    adapters (``family``: the Hugging Face family written; ``model``: its ``ModelConfig``;
    ``targets``: the adapted megatron-core layers)."""
    known = _lora_targets(family, model, targets)
    for i in range(model.num_layers):
        out = {}
        for target, spec in known.items():
            mc = f"decoder.layers.{i}.{spec.mcore_parent}.{target}.lora."
            a = state[mc + "A"]
            for name, b in zip(spec.hf_names, spec.split_b(state[mc + "B"], model)):
                hf = f"{PREFIX}model.layers.{i}.{spec.hf_parent}.{name}."
                out[hf + "lora_A.weight"] = a.clone()  # shared: one copy per module
                out[hf + "lora_B.weight"] = b
        yield out


def hf_target_modules(family: Family, model, targets) -> List[str]:
    """The Hugging Face module names the adapters of ``targets`` become."""
    return [name for spec in _lora_targets(family, model, targets).values()
            for name in spec.hf_names]


def adapter_config(family: Family, model, lora, base_model: Any) -> Dict[str, Any]:
    """peft's ``adapter_config.json`` for ``lora`` (a ``LoraConfig``) of ``model`` (a
    ``family`` model) on ``base_model`` (the Hugging Face folder the base was imported from, or
    None)."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(lora.lora_rank),
            "lora_alpha": lora.alpha, "lora_dropout": float(lora.lora_dropout),
            "target_modules": hf_target_modules(family, model, lora.targets), "bias": "none",
            "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
            "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
            "base_model_name_or_path": base_model}


def write_adapter(out: str, state: Dict[str, torch.Tensor], family: Family, model, lora,
                  base_model, dtype: torch.dtype) -> int:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` into ``out``; returns the
    bytes of the tensors."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to("cpu", dtype).contiguous()
               for group in peft_tensors(state, family, model, lora.targets)
               for name, tensor in group.items()}
    save_file(tensors, os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(out, ADAPTER_CONFIG), "w", encoding="utf-8") as handle:
        json.dump(adapter_config(family, model, lora, base_model), handle, indent=2)
    return sum(t.numel() * t.element_size() for t in tensors.values())
