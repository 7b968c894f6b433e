"""The model-family interface: one ``Family`` per Hugging Face architecture, registered in
``families.registry.FAMILIES`` (keyed by architecture), which import (``hf-to-mcore``), export
(``mcore-to-hf``, PEFT adapters), ``--use-checkpoint-args`` and the docs' family table read.

How to add a family (``gemma3.py`` say):

1. Write ``mt_dialog/convert/families/gemma3.py`` with a ``Family`` subclass (or an instance of a
   subclass another module defines) that sets the class attributes (``architecture``,
   ``model_type``, ``config_class``, ``features``, ``model_fields``, ``docs``) and overrides:

   * ``refuse(config, path)``: ``ConversionError`` for what the config asks and mt_dialog cannot
     do (the message names the file, the field, its value and the fix);
   * ``model_kwargs(config, path)``: the ``ModelConfig`` keyword arguments (``common.
     llama_model_kwargs`` has the Llama block's: sizes, heads, RoPE, norms, tying);
   * ``hf_config_kwargs(model)``: the transformers config class's keyword arguments
     (``common.llama_hf_kwargs``);
   * ``layer_rules(i, model)``: the ``Rule`` list of decoder layer ``i`` (a function of the
     index: dense first layers, MoE layers, MLA, extra norms, buffers all fit);
   * ``outer_rules(model, rows)`` when the embedding / final norm / output layer differ;
   * ``lora_targets(model)`` when the attention / MLP module names differ.

   ``features`` names what a ``ModelConfig`` of the family has (``common.FEATURES``: QKV bias,
   q/k layernorm, experts, ...); a model with a feature the family neither has nor allows
   (``optional_features``) or lacking one it needs is refused at export, naming the family that
   fits. A new ``ModelConfig`` capability gets its entry in ``common.FEATURES``, so that the
   families without it refuse it.
2. Add one line to ``registry.FAMILIES``, and the family's tests. The docs' table is generated
   from ``docs`` (``python -m mt_dialog.convert.families`` prints it; a test checks it).

One ``Rule`` maps HF tensors onto megatron-core tensors both ways. Llama's layer ``i`` (H hidden,
G query groups of q heads, d head size)::

    Hugging Face (model.layers.i.)           Rule                 megatron-core (decoder.layers.i.)
    input_layernorm.weight        ---------- same -------------> input_layernorm.weight
    self_attn.q_proj.weight [G*q*d, H] \\
    self_attn.k_proj.weight [G*d, H]    >--- group_qkv --------> self_attention.linear_qkv.weight
    self_attn.v_proj.weight [G*d, H]   /  <-- split_qkv ---       [G*(q+2)*d, H]: per group its q
                                                                  heads, then its k and v head
    self_attn.o_proj.weight       ---------- same -------------> self_attention.linear_proj.weight
    post_attention_layernorm.weight -------- same -------------> pre_mlp_layernorm.weight
    mlp.gate_proj.weight [F, H] \\--- cat_rows (fc1 = [gate; up]) -> mlp.linear_fc1.weight [2F, H]
    mlp.up_proj.weight   [F, H] /  <-- chunk_rows(2) ----
    mlp.down_proj.weight          ---------- same -------------> mlp.linear_fc2.weight

i.e. ``Rule(("...q_proj.weight", "...k_proj.weight", "...v_proj.weight"),
("...linear_qkv.weight",), to_mcore=group, to_hf=split)``. The names are those of
megatron-core's GPTModel on its local layer specs at TP = PP = 1 (the conversion model); HF
buffers (a router's ``e_score_correction_bias``) are rules too, the rotary ``inv_freq`` is ignored.
A layer whose kind depends on its index (dense first layers, then MoE with a shared expert and a
router bias buffer) is one ``if`` in ``layer_rules``::

    def layer_rules(self, i, model):
        rules = mla_attention_rules(i, model)            # q_a_proj, kv_a_proj_with_mqa, ...
        if i < first_dense_layers(model):
            return rules + swiglu_rules(f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp.",
                                        "gate_proj", "up_proj", "down_proj")
        return rules + moe_layer_rules(i, model, "mlp", "gate_proj", "up_proj", "down_proj") + [
            same(f"model.layers.{i}.mlp.gate.e_score_correction_bias",
                 f"decoder.layers.{i}.mlp.router.expert_bias"), *shared_expert_rules(i)]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch

from mt_dialog.training.config import ModelConfig


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, field and fix."""


@dataclass
class ImportExtras:
    """What a family's import does beyond the rules, from the HF config (``Family.
    import_extras``): tensors read in another layout, tensors left out, lines to print."""

    adapt: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None  # (name, HF tensor) ->
    # the tensor in the layout the rules expect (DeepSeek's rope_interleave false: rows permuted)
    dropped_prefixes: Tuple[str, ...] = ()  # HF tensor name prefixes import leaves out (MTP)
    dropped_reason: str = ""  # why, printed with the count of dropped tensors
    notes: Tuple[str, ...] = ()  # lines the import prints (what is kept frozen, ...)


@dataclass
class HFModel:
    """What a Hugging Face config says, in the library's terms."""

    architecture: str  # the HF class name (a FAMILIES key)
    model: ModelConfig  # the model flags
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's vocabulary)
    max_position_embeddings: int  # longest sequence the config allows
    dtype: str  # fp32 / bf16 / fp16
    bos_token_id: Optional[int] = None  # config.json's, as it is
    eos_token_id: Any = None  # an int or a list of ints
    pad_token_id: Optional[int] = None  # config.json's, as it is
    extras: ImportExtras = field(default_factory=ImportExtras)  # the family's import_extras


def _same(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tensors


@dataclass(frozen=True)
class Rule:
    """HF tensors <-> megatron-core tensors (full names), with the layout transforms.

    ``to_mcore(*hf_tensors)`` returns the megatron-core tensors in ``mcore`` order, ``to_hf(
    *mcore_tensors)`` the HF ones in ``hf`` order; both default to a copy (equal counts)."""

    hf: Tuple[str, ...]  # HF tensor names (weights and buffers), in to_mcore's argument order
    mcore: Tuple[str, ...]  # megatron-core state-dict names, in to_hf's argument order
    to_mcore: Callable[..., Sequence[torch.Tensor]] = _same  # HF tensors -> mcore tensors
    to_hf: Callable[..., Sequence[torch.Tensor]] = _same  # mcore tensors -> HF tensors


def same(hf: str, mcore: str) -> Rule:
    """A tensor copied as it is."""
    return Rule((hf,), (mcore,))


@dataclass(frozen=True)
class LoraTarget:
    """How one adapted megatron-core layer appears in the HF model (PEFT module names)."""

    mcore_parent: str  # the layer's parent in a megatron-core decoder layer (self_attention)
    hf_parent: str  # the HF modules' parent in a layer (self_attn)
    hf_names: Tuple[str, ...]  # the HF modules the fused layer splits into (q_proj, k_proj, ...)
    split_b: Callable[[torch.Tensor, ModelConfig], Tuple[torch.Tensor, ...]]  # B -> their Bs


@dataclass(frozen=True)
class DocsRow:
    """The family's row of the docs/huggingface.md table (markdown cells)."""

    maps: str  # the model flags its config sets beyond the Llama block (``--qk-layernorm``)
    refused: str  # the config fields it refuses


class Family:
    """One Hugging Face architecture (module docstring); subclasses set the attributes."""

    architecture: str = ""  # HF class name, config.json's "architectures"
    model_type: str = ""  # config.json's "model_type"
    config_class: str = ""  # the transformers config class export builds
    features: FrozenSet[str] = frozenset()  # common.FEATURES a model of this family has
    optional_features: FrozenSet[str] = frozenset()  # features it may or may not have
    export_default: bool = True  # --architecture auto may pick it (Mistral: Llama's twin, no)
    model_fields: Tuple[str, ...] = ()  # ModelConfig fields model_kwargs sets (checkpoint args)
    docs: DocsRow = DocsRow("", "")
    ignored_hf_suffixes: Tuple[str, ...] = ("rotary_emb.inv_freq",)  # recomputed buffers
    # other config.json model types of this architecture that transformers has no class for
    # (Kimi K2's kimi_k2, whose config is DeepSeek-V3's): read with ``config_class``, never
    # with the folder's own Python (auto_map)
    alias_model_types: Tuple[str, ...] = ()
    # HF tensors export writes in fp32 whatever --dtype (HF keeps them fp32 too:
    # _keep_in_fp32_modules_strict; GLM / DeepSeek's e_score_correction_bias, whose small
    # differences between experts decide the routing)
    fp32_hf_suffixes: Tuple[str, ...] = ()

    # -- config ---------------------------------------------------------------------------
    def refuse(self, config: Any, path: str) -> None:
        """``ConversionError`` for what ``config`` (a transformers config read from ``path``)
        asks that this family's mapping cannot give."""

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        """``ModelConfig`` keyword arguments of ``config`` (after ``refuse``)."""
        raise NotImplementedError

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        """Keyword arguments of ``transformers.<config_class>`` for ``model`` (without the
        vocabulary, positions and special token ids the registry adds)."""
        raise NotImplementedError

    def misfit(self, model: ModelConfig) -> Optional[str]:
        """None when ``model`` is one of this family's, else what differs (``features``)."""
        from mt_dialog.convert.families.common import describe_misfit

        return describe_misfit(self.features, self.optional_features, model)

    def import_extras(self, config: Any, path: str) -> ImportExtras:
        """Import's extras for ``config`` (after ``refuse``): none by default."""
        return ImportExtras()

    # -- tensors --------------------------------------------------------------------------
    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        """The rules of decoder layer ``i``."""
        raise NotImplementedError

    def outer_rules(self, model: ModelConfig, rows: Optional[int]) -> List[Rule]:
        """Embedding, final norm, output layer; ``rows``: the HF rows export writes (the
        embedding is cut or zero-padded to them), None on import."""
        from mt_dialog.convert.families.common import llama_outer_rules

        return llama_outer_rules(model, rows)

    def lora_targets(self, model: ModelConfig) -> Dict[str, LoraTarget]:
        """megatron-core LoRA target (``linear_qkv``...) -> its HF modules."""
        from mt_dialog.convert.families.common import llama_lora_targets

        return llama_lora_targets()

    def docs_line(self) -> str:
        return (f"| `{self.architecture}` (`{self.model_type}`) | {self.docs.maps} | "
                f"{self.docs.refused} |")
