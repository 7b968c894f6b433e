"""The family table (``FAMILIES``, keyed by Hugging Face architecture) and what reads it: the
config and tensor conversions of ``hf-to-mcore`` / ``mcore-to-hf``, the export's choice of
architecture, the fields ``--use-checkpoint-args`` takes, the docs' family table."""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch

from mt_dialog.convert.families.base import ConversionError, Family, HFModel, Rule
from mt_dialog.convert.families.common import (
    DTYPES,
    SafetensorsFolder,
    alias_config,
    auto_config,
    read_raw_config,
)
from mt_dialog.convert.families.deepseek import DEEPSEEK_V3
from mt_dialog.convert.families.gemma3 import GEMMA3, MULTIMODAL as GEMMA3_MULTIMODAL
from mt_dialog.convert.families.glm import GLM4_MOE
from mt_dialog.convert.families.gpt_oss import GPT_OSS
from mt_dialog.convert.families.llama import LLAMA, MISTRAL
from mt_dialog.convert.families.mixtral import MIXTRAL
from mt_dialog.convert.families.qwen2 import QWEN2
from mt_dialog.convert.families.qwen3 import QWEN3
from mt_dialog.convert.families.qwen3_moe import QWEN3_MOE
from mt_dialog.training.config import ModelConfig

# one line per family; --architecture auto tries them in this order
FAMILIES: Dict[str, Family] = {f.architecture: f for f in (
    LLAMA, MISTRAL, QWEN2, QWEN3, QWEN3_MOE, MIXTRAL, DEEPSEEK_V3, GLM4_MOE, GEMMA3,
    GPT_OSS)}
ARCHITECTURES = tuple(FAMILIES)

_DELTANET = ("megatron-core 0.16.1's gated DeltaNet refuses packed sequences and needs GPU "
             "kernels (fla, causal_conv1d); not supported; use Qwen3 / Qwen3-MoE")
# architectures refused by name, with the reason; model_type prefixes the same
REFUSED = {"Qwen3NextForCausalLM": _DELTANET, "Qwen3_5ForCausalLM": _DELTANET,
           "Qwen3_5MoeForCausalLM": _DELTANET,
           "Gemma3ForConditionalGeneration": GEMMA3_MULTIMODAL}
REFUSED_MODEL_TYPES = {"qwen3_next": _DELTANET, "qwen3_5": _DELTANET}


def family(architecture: str, flag: str = "--architecture") -> Family:
    """The registered family of ``architecture``, or ConversionError listing them."""
    if architecture in REFUSED:
        raise ConversionError(f"{flag} {architecture}: {REFUSED[architecture]}")
    if architecture not in FAMILIES:
        raise ConversionError(f"{flag} {architecture} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)}")
    return FAMILIES[architecture]


def config_family(raw: Dict[str, Any], path: str) -> Family:
    """The family a config.json (``raw``, read from ``path``) names, refusing the
    architectures and model types mt_dialog cannot convert."""
    architectures = raw.get("architectures") or []
    model_type = str(raw.get("model_type") or "")
    for prefix, reason in REFUSED_MODEL_TYPES.items():
        if model_type.startswith(prefix):
            raise ConversionError(f"{path}: model_type {model_type!r} "
                                  f"(architectures {architectures}): {reason}")
    if len(architectures) == 1 and architectures[0] in REFUSED:
        raise ConversionError(f"{path}: architectures {architectures}: "
                              f"{REFUSED[architectures[0]]}")
    if len(architectures) != 1 or architectures[0] not in FAMILIES:
        raise ConversionError(f"{path}: architectures {architectures} is not supported; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    return FAMILIES[architectures[0]]


def read_hf_config(folder: str) -> HFModel:
    """The model a Hugging Face folder holds, or ``ConversionError`` naming what is unsupported."""
    path, raw = read_raw_config(folder)
    fam = config_family(raw, path)
    if raw.get("model_type") in fam.alias_model_types:
        config = alias_config(folder, path, fam.config_class)
    else:
        config = auto_config(folder, path)
    fam.refuse(config, path)
    try:
        model = ModelConfig(**fam.model_kwargs(config, path))
    except ValueError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                or "float32").replace("torch.", "")
    return HFModel(fam.architecture, model, int(config.vocab_size),
                   int(getattr(config, "max_position_embeddings", 4096)), DTYPES.get(dtype, "fp32"),
                   getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None),
                   getattr(config, "pad_token_id", None), fam.import_extras(config, path))


# -- export: which architecture ----------------------------------------------------------------

def fitting_architecture(model: ModelConfig) -> str:
    """The first registered family (``export_default``) that ``model`` is one of; else
    ConversionError saying what each lacks."""
    for fam in FAMILIES.values():
        if fam.export_default and fam.misfit(model) is None:
            return fam.architecture
    reasons = "; ".join(f"{fam.architecture} {fam.misfit(model)}" for fam in FAMILIES.values()
                        if fam.export_default)
    raise ConversionError(f"no supported Hugging Face architecture fits this model: {reasons}")


def export_architecture(model: ModelConfig, requested: str = "auto",
                        imported: Optional[str] = None) -> str:
    """``requested`` when it fits ``model`` (ConversionError naming the one that fits
    otherwise); for ``auto`` the ``imported`` one when it fits, else ``fitting_architecture``."""
    if requested == "auto":
        if imported in FAMILIES and FAMILIES[imported].misfit(model) is None:
            return imported
        return fitting_architecture(model)
    reason = family(requested).misfit(model)
    if reason is None:
        return requested
    try:
        fix = f"use --architecture {fitting_architecture(model)}"
    except ConversionError as exc:
        fix = str(exc)
    raise ConversionError(f"--architecture {requested} {reason}; {fix}")


def hf_config(model: ModelConfig, architecture: str, vocab_size: int, max_position: int,
              dtype: str, bos_token_id: Optional[int], eos_token_id: Any,
              pad_token_id: Optional[int] = None):
    """A transformers config object for ``model`` (``save_pretrained`` writes config.json)."""
    import transformers

    fam = FAMILIES[export_architecture(model, architecture)]
    config = getattr(transformers, fam.config_class)(
        vocab_size=vocab_size, max_position_embeddings=max_position, bos_token_id=bos_token_id,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, **fam.hf_config_kwargs(model))
    config.architectures = [fam.architecture]
    config.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return config


# -- tensors -----------------------------------------------------------------------------------

def _rules(fam: Family, model: ModelConfig, rows: Optional[int]) -> Iterator[List[Rule]]:
    """The family's rules, one list per layer, then the outer ones."""
    for i in range(model.num_layers):
        yield fam.layer_rules(i, model)
    yield fam.outer_rules(model, rows)


def expected_hf_names(fam: Family, model: ModelConfig) -> List[str]:
    """Every HF tensor name (weights and buffers) a ``model`` of family ``fam`` has."""
    return [name for rules in _rules(fam, model, None) for rule in rules for name in rule.hf]


def check_names(folder: SafetensorsFolder, fam: Family, model: ModelConfig,
                dropped_prefixes: Tuple[str, ...] = ()) -> List[str]:
    """Every tensor the config implies is there, and nothing else (a tied ``lm_head`` is fine);
    returns the names left out on purpose (those starting with ``dropped_prefixes``)."""
    expected = set(expected_hf_names(fam, model))
    present = {n for n in folder.names() if not n.endswith(fam.ignored_hf_suffixes)}
    dropped = sorted(n for n in present if dropped_prefixes and n.startswith(dropped_prefixes))
    present -= set(dropped)
    missing = sorted(expected - present)
    if missing:
        raise ConversionError(f"{folder.folder}: {len(missing)} tensor(s) the config implies are "
                              f"missing, e.g. {', '.join(missing[:4])}")
    unexpected = sorted(present - expected - {"lm_head.weight"})
    if unexpected:
        raise ConversionError(f"{folder.folder}: {len(unexpected)} tensor(s) this converter does "
                              f"not know, e.g. {', '.join(unexpected[:4])}; is it a plain "
                              f"{fam.architecture} checkpoint?")
    return dropped


def _apply(rules: List[Rule], get: Callable[[str], torch.Tensor], to_mcore: bool):
    out: Dict[str, torch.Tensor] = {}
    for rule in rules:
        sources, targets = (rule.hf, rule.mcore) if to_mcore else (rule.mcore, rule.hf)
        tensors = (rule.to_mcore if to_mcore else rule.to_hf)(*(get(n) for n in sources))
        if len(tensors) != len(targets):
            raise ConversionError(f"internal: the rule for {sources} gave {len(tensors)} "
                                  f"tensors for {len(targets)} names")
        out.update(zip(targets, tensors))
    return out


def iter_hf_to_mcore(fam: Family, get: Callable[[str], torch.Tensor],
                     model: ModelConfig) -> Iterator[Dict[str, torch.Tensor]]:
    """megatron-core tensors, one dict per layer then the outer ones; ``get(name)`` reads one
    HF tensor."""
    for rules in _rules(fam, model, None):
        yield _apply(rules, get, to_mcore=True)


def iter_mcore_to_hf(fam: Family, state: Dict[str, torch.Tensor], model: ModelConfig,
                     rows: int) -> Iterator[Dict[str, torch.Tensor]]:
    """HF tensors from a TP = PP = 1 GPTModel state dict, one dict per layer then the outer
    ones (the embedding and output layer cut or zero-padded to ``rows``)."""
    for rules in _rules(fam, model, rows):
        yield _apply(rules, state.__getitem__, to_mcore=False)


# -- what other parts read ---------------------------------------------------------------------

def checkpoint_fields() -> List[str]:
    """The ``ModelConfig`` fields the families' configs set (``--use-checkpoint-args`` takes
    them from a checkpoint with the training's own architecture fields)."""
    fields: Dict[str, None] = {}
    for fam in FAMILIES.values():
        fields.update(dict.fromkeys(fam.model_fields))
    return list(fields)


def docs_table() -> str:
    """The table of supported families in docs/huggingface.md (markdown)."""
    lines = ["| architecture (`model_type`) | maps to (beyond the Llama block) | refused |",
             "|---|---|---|"] + [fam.docs_line() for fam in FAMILIES.values()]
    return "\n".join(lines)
