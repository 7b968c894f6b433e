"""What the families share: reading a Hugging Face folder (config.json, safetensors), the Llama
block's config mapping (sizes, heads, RoPE, RMSNorm, tying) and tensor rules, the QKV grouping
and the SwiGLU ``linear_fc1 = [gate; up]`` layout, and the model features that tell families
apart (``FEATURES``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Tuple

import torch

from mt_dialog.convert.families.base import ConversionError, LoraTarget, Rule, same
from mt_dialog.training.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# buffers some exporters write beside the weights; recomputed, never needed
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# -- reading a folder --------------------------------------------------------------------------


def read_raw_config(folder: str) -> Tuple[str, Dict[str, Any]]:
    """(path, dict) of ``folder/config.json``."""
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no config.json; pass a Hugging Face model folder "
                              "(the one save_pretrained writes)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: unreadable ({exc})") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path}: not a JSON object")
    return path, raw


def auto_config(folder: str, path: str):
    """transformers' config object of ``folder``."""
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConversionError("converting Hugging Face checkpoints needs transformers: "
                              "pip install -e '.[hf]'") from None
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(f"{path}: transformers cannot read it ({exc})") from None


def alias_config(folder: str, path: str, config_class: str):
    """``folder``'s config.json read by ``transformers.<config_class>`` (a model type that
    transformers does not register, e.g. Kimi K2's ``kimi_k2``: DeepSeek-V3's config)."""
    import transformers

    try:
        return getattr(transformers, config_class).from_pretrained(folder,
                                                                   local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConversionError(f"{path}: {config_class} cannot read it ({exc})") from None


class SafetensorsFolder:
    """Tensors of a Hugging Face folder: ``model.safetensors`` or shards listed in
    ``model.safetensors.index.json``; each tensor is read on demand."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        index, single = os.path.join(folder, INDEX), os.path.join(folder, SINGLE)
        if os.path.isfile(index):
            try:
                with open(index, encoding="utf-8") as handle:
                    self.files = dict(json.load(handle)["weight_map"])
            except (OSError, ValueError, KeyError) as exc:
                raise ConversionError(f"{index}: unreadable weight map ({exc})") from None
        elif os.path.isfile(single):
            self.files = {name: SINGLE for name in self._names(single)}
        else:
            legacy = [n for n in os.listdir(folder) if n.endswith((".bin", ".pt", ".pth"))]
            hint = (f" (found {', '.join(sorted(legacy)[:3])}: re-save the model with "
                    "save_pretrained(..., safe_serialization=True))" if legacy else "")
            raise ConversionError(f"{folder}: no {SINGLE} or {INDEX}; only safetensors "
                                  f"checkpoints are read{hint}")
        self._open: Dict[str, object] = {}

    @staticmethod
    def _names(path: str) -> List[str]:
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as handle:
                return list(handle.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise ConversionError(f"{path}: not a safetensors file ({exc})") from None

    def names(self) -> List[str]:
        return [n for n in self.files if not n.endswith(IGNORED_SUFFIXES)]

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise ConversionError(f"{self.folder}: tensor {name} is missing")
        file = self.files[name]
        if file not in self._open:
            path = os.path.join(self.folder, file)
            if not os.path.isfile(path):
                raise ConversionError(f"{self.folder}: {file} (listed in {INDEX}) is missing")
            self._open[file] = safe_open(path, framework="pt")
        return self._open[file].get_tensor(name)


# -- features: what tells families apart in a ModelConfig --------------------------------------

# name -> (what it is, with its flag; whether a ModelConfig has it). A ModelConfig capability
# added later gets an entry here so that the families without it refuse it at export.
FEATURES: Dict[str, Tuple[str, Callable[[ModelConfig], bool]]] = {
    "qkv_bias": ("QKV bias (--add-qkv-bias)", lambda m: bool(m.add_qkv_bias)),
    "qk_layernorm": ("q/k layernorm (--qk-layernorm)", lambda m: bool(m.qk_layernorm)),
    "experts": ("experts (--num-experts)", lambda m: bool(m.num_experts)),
    "router_pre_softmax": ("unrenormalized top-k probabilities (--moe-router-pre-softmax)",
                           lambda m: bool(m.num_experts and m.moe_router_pre_softmax)),
    "router_score_function": ("router score function other than softmax "
                              "(--moe-router-score-function)",
                              lambda m: bool(m.num_experts)
                              and m.moe_router_score_function != "softmax"),
    # attention variants
    "window": ("sliding-window attention (--window-size)", lambda m: m.window_size is not None),
    "softmax_type": ("attention sinks (--softmax-type)", lambda m: m.softmax_type != "vanilla"),
    "mla": ("multi-latent attention (--multi-latent-attention)",
            lambda m: bool(m.multi_latent_attention)),
    # MoE routing of the 2026 families
    "shared_expert": ("a shared expert (--moe-shared-expert-intermediate-size)",
                      lambda m: bool(m.num_experts and m.moe_shared_expert_intermediate_size)),
    "shared_expert_gate": ("a gated shared expert (--moe-shared-expert-gate)",
                           lambda m: bool(m.num_experts and m.moe_shared_expert_gate)),
    "expert_bias": ("an expert bias (--moe-router-enable-expert-bias)",
                    lambda m: bool(m.num_experts and m.moe_router_enable_expert_bias)),
    "group_routing": ("group-limited routing (--moe-router-num-groups)",
                      lambda m: bool(m.num_experts and m.moe_router_num_groups)),
    "topk_scaling": ("scaled expert weights (--moe-router-topk-scaling-factor)",
                     lambda m: bool(m.num_experts) and m.moe_router_topk_scaling_factor
                     not in (None, 1.0)),
    "dense_layers": ("dense layers between MoE layers (--moe-layer-freq)",
                     lambda m: bool(m.num_experts) and m.moe_layer_freq != 1),
    "linear_bias": ("biases on every linear layer (--add-bias-linear)",
                    lambda m: bool(m.add_bias_linear)),
    # block features
    "layernorm_1p": ("(1 + w) norms (--apply-layernorm-1p)", lambda m: bool(m.apply_layernorm_1p)),
    "sandwich_norm": ("sandwich norms (--sandwich-norm)", lambda m: bool(m.sandwich_norm)),
    "scale_embeddings": ("scaled embeddings (--scale-embeddings)",
                         lambda m: bool(m.scale_embeddings)),
    "gelu_gate": ("a GELU gate (--openai-gelu / --quick-geglu)",
                  lambda m: bool(m.openai_gelu or m.quick_geglu)),
    "softmax_scale": ("a set softmax scale (--softmax-scale)", lambda m: m.softmax_scale is not None),
    "partial_rope": ("partial RoPE (--rotary-percent)", lambda m: m.rotary_percent != 1.0),
    "rotary_base_local": ("a second RoPE base (--rotary-base-local)",
                          lambda m: m.rotary_base_local is not None),
    "yarn": ("YaRN RoPE (--position-embedding-type yarn)",
             lambda m: m.position_embedding_type == "yarn"),
    "logit_softcapping": ("soft-capped logits (--final-logit-softcapping)",
                          lambda m: m.final_logit_softcapping is not None),
}


def model_features(model: ModelConfig) -> FrozenSet[str]:
    """The ``FEATURES`` ``model`` has."""
    return frozenset(name for name, (_, has) in FEATURES.items() if has(model))


def describe_misfit(needed: FrozenSet[str], optional: FrozenSet[str],
                    model: ModelConfig) -> Optional[str]:
    """None when ``model`` has every ``needed`` feature and no other but ``optional`` ones;
    else what differs, in words."""
    has = model_features(model)
    missing, extra = sorted(needed - has), sorted(has - needed - optional)
    parts = []
    if missing:
        parts.append(f"needs {' and '.join(FEATURES[n][0] for n in missing)}, which this model "
                     "lacks")
    if extra:
        parts.append(f"does not support this model's "
                     f"{' and '.join(FEATURES[n][0] for n in extra)}")
    return ", and ".join(parts) or None


# -- config: the Llama block -------------------------------------------------------------------

LLAMA_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                "num_query_groups", "kv_channels", "norm_epsilon",
                "untie_embeddings_and_output_weights", "add_qkv_bias", "qk_layernorm",
                "rotary_base", "rotary_seq_len_interpolation_factor", "use_rope_scaling",
                "rope_scaling_factor", "rope_scaling_low_freq_factor",
                "rope_scaling_high_freq_factor", "rope_scaling_original_max_position")


def refuse_llama_block(config: Any, path: str, note: str) -> None:
    """The Llama block is SwiGLU with silu and no biases (``note``: what the family has)."""
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{path}: hidden_act {act!r} is not supported (SwiGLU with silu)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            raise ConversionError(f"{path}: {name} true is not supported ({note})")


def refuse_sliding_window(config: Any, path: str, qwen_style: bool) -> None:
    """Sliding-window attention: Mistral/Mixtral's ``sliding_window``, Qwen's
    ``use_sliding_window`` / ``layer_types``."""
    if not qwen_style:
        if getattr(config, "sliding_window", None):
            raise ConversionError(f"{path}: sliding_window {config.sliding_window} (sliding-"
                                  "window attention) is not supported; only full attention")
        return
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if getattr(config, "use_sliding_window", False) or layer_types != {"full_attention"}:
        raise ConversionError(f"{path}: use_sliding_window / layer_types {sorted(layer_types)}"
                              " (sliding-window attention) is not supported")


def rope_settings(config: Any, path: str) -> Dict[str, Any]:
    """``ModelConfig`` RoPE fields from ``rope_parameters`` (transformers 5) or ``rope_theta`` +
    ``rope_scaling`` (transformers 4)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    scaling = dict(getattr(config, "rope_scaling", None) or params)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ConversionError(f"{path}: partial_rotary_factor {partial} is not supported (RoPE "
                              "on the whole head only)")
    out: Dict[str, Any] = {"rotary_base": float(theta)}
    if kind == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(scaling["factor"])
    elif kind == "llama3":
        out.update(use_rope_scaling=True, rope_scaling_factor=float(scaling["factor"]),
                   rope_scaling_low_freq_factor=float(scaling["low_freq_factor"]),
                   rope_scaling_high_freq_factor=float(scaling["high_freq_factor"]),
                   rope_scaling_original_max_position=int(
                       scaling["original_max_position_embeddings"]))
    elif kind != "default":
        raise ConversionError(f"{path}: rope_type {kind!r} is not supported; supported: "
                              "default, linear, llama3")
    return out


def rope_for_hf(model: ModelConfig) -> Optional[Dict[str, Any]]:
    """``rope_scaling`` of the HF config (None: default RoPE)."""
    if model.use_rope_scaling:
        return {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                "low_freq_factor": model.rope_scaling_low_freq_factor,
                "high_freq_factor": model.rope_scaling_high_freq_factor,
                "original_max_position_embeddings": model.rope_scaling_original_max_position}
    if model.rotary_seq_len_interpolation_factor:
        return {"rope_type": "linear", "factor": model.rotary_seq_len_interpolation_factor}
    return None


def llama_model_kwargs(config: Any, path: str) -> Dict[str, Any]:
    """``ModelConfig`` kwargs of the Llama block: layers, sizes, heads, head size, RMSNorm eps,
    tying, init std, RoPE (``LLAMA_FIELDS``)."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None)
    groups = getattr(config, "num_key_value_heads", None) or heads
    return dict(
        num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
        ffn_hidden_size=int(config.intermediate_size), num_attention_heads=heads,
        num_query_groups=int(groups),
        kv_channels=int(head_dim) if head_dim else None,  # None: hidden / heads
        norm_epsilon=float(config.rms_norm_eps),
        untie_embeddings_and_output_weights=not getattr(config, "tie_word_embeddings", False),
        init_method_std=float(getattr(config, "initializer_range", 0.02)),
        **rope_settings(config, path))


def llama_hf_kwargs(model: ModelConfig) -> Dict[str, Any]:
    """transformers config kwargs of the Llama block (``llama_model_kwargs`` reversed)."""
    return dict(hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
                num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
                num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                rms_norm_eps=model.norm_epsilon, rope_theta=model.rotary_base,
                rope_scaling=rope_for_hf(model),
                tie_word_embeddings=not model.untie_embeddings_and_output_weights,
                initializer_range=model.init_method_std, hidden_act="silu")


# -- tensors -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shapes:
    """Attention geometry needed to (un)group the QKV projection."""

    groups: int  # query groups (key/value heads)
    per_group: int  # query heads per group
    head_dim: int  # d

    @classmethod
    def of(cls, model: ModelConfig) -> "Shapes":
        groups = model.num_query_groups
        return cls(groups, model.num_attention_heads // groups, model.kv_channels)


def group_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shapes: Shapes) -> torch.Tensor:
    """HF q, k, v (weights [rows, H] or biases [rows]) -> megatron's grouped QKV."""
    g, d = shapes.groups, shapes.head_dim
    tail = q.shape[1:]
    parts = (q.reshape(g, shapes.per_group * d, *tail), k.reshape(g, d, *tail),
             v.reshape(g, d, *tail))
    return torch.cat(parts, dim=1).reshape(-1, *tail)


def split_qkv(qkv: torch.Tensor, shapes: Shapes) -> Tuple[torch.Tensor, ...]:
    """megatron's grouped QKV -> HF q, k, v."""
    g, d = shapes.groups, shapes.head_dim
    tail = qkv.shape[1:]
    grouped = qkv.reshape(g, (shapes.per_group + 2) * d, *tail)
    q, k, v = torch.split(grouped, [shapes.per_group * d, d, d], dim=1)
    return tuple(t.reshape(-1, *tail).contiguous() for t in (q, k, v))


def cat_rows(*tensors: torch.Tensor) -> Tuple[torch.Tensor]:
    """SwiGLU: HF gate, up -> megatron's ``linear_fc1`` = [gate; up]."""
    return (torch.cat(tensors),)


def chunk_rows(fc1: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """megatron's ``linear_fc1`` -> HF gate, up."""
    return tuple(part.contiguous() for part in torch.chunk(fc1, 2, dim=0))


def qkv_rule(hf_names: Tuple[str, str, str], mcore: str, model: ModelConfig) -> Rule:
    """q/k/v projections (weights or biases) <-> the grouped ``linear_qkv``."""
    shapes = Shapes.of(model)
    return Rule(hf_names, (mcore,), to_mcore=lambda q, k, v: (group_qkv(q, k, v, shapes),),
                to_hf=lambda qkv: split_qkv(qkv, shapes))


def swiglu_rules(hf: str, mc: str, gate: str, up: str, down: str) -> List[Rule]:
    """One SwiGLU MLP: HF ``{hf}{gate}``/``{up}``/``{down}`` <-> ``{mc}linear_fc1``/``fc2``."""
    return [Rule((f"{hf}{gate}.weight", f"{hf}{up}.weight"), (f"{mc}linear_fc1.weight",),
                 to_mcore=cat_rows, to_hf=chunk_rows),
            same(f"{hf}{down}.weight", f"{mc}linear_fc2.weight")]


def llama_attention_rules(i: int, model: ModelConfig) -> List[Rule]:
    """Layer ``i``'s norms and attention (Qwen2's q/k/v biases, Qwen3's per-head q/k norms
    when ``model`` has them); the MLP is the family's."""
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    proj = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
    rules = [same(hf + "input_layernorm.weight", mc + "input_layernorm.weight"),
             qkv_rule(tuple(p + ".weight" for p in proj),
                      mc + "self_attention.linear_qkv.weight", model),
             same(hf + "self_attn.o_proj.weight", mc + "self_attention.linear_proj.weight"),
             same(hf + "post_attention_layernorm.weight", mc + "pre_mlp_layernorm.weight")]
    if model.add_qkv_bias:
        rules.append(qkv_rule(tuple(p + ".bias" for p in proj),
                              mc + "self_attention.linear_qkv.bias", model))
    if model.qk_layernorm:  # [head_dim], applied to every head: copied as it is
        rules += [same(f"{hf}self_attn.{p}_norm.weight", f"{mc}self_attention.{p}_layernorm.weight")
                  for p in "qk"]
    return rules


def llama_layer_rules(i: int, model: ModelConfig) -> List[Rule]:
    """A dense Llama block (attention + SwiGLU MLP)."""
    return llama_attention_rules(i, model) + swiglu_rules(
        f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp.", "gate_proj", "up_proj",
        "down_proj")


def fit_rows(rows: Optional[int]) -> Callable[[torch.Tensor], Tuple[torch.Tensor]]:
    """An embedding cut (or zero-padded) to ``rows`` rows (None: as it is)."""
    def fit(tensor: torch.Tensor) -> Tuple[torch.Tensor]:
        if rows is None:
            return (tensor,)
        if tensor.shape[0] >= rows:
            return (tensor[:rows].contiguous(),)
        return (torch.cat([tensor, tensor.new_zeros(rows - tensor.shape[0], tensor.shape[1])]),)
    return fit


def llama_outer_rules(model: ModelConfig, rows: Optional[int]) -> List[Rule]:
    """Embedding, final norm and (untied) output layer."""
    fit = fit_rows(rows)
    rules = [Rule(("model.embed_tokens.weight",), ("embedding.word_embeddings.weight",),
                  to_hf=fit),
             same("model.norm.weight", "decoder.final_layernorm.weight")]
    if model.untie_embeddings_and_output_weights:
        rules.append(Rule(("lm_head.weight",), ("output_layer.weight",), to_hf=fit))
    return rules


def _split_qkv_b(b: torch.Tensor, model: ModelConfig) -> Tuple[torch.Tensor, ...]:
    return split_qkv(b, Shapes.of(model))


def llama_lora_targets() -> Dict[str, LoraTarget]:
    """LoRA's megatron-core targets in a Llama block and the HF modules they split into: a
    fused layer's ``B`` rows go with the rows of its weight, ``A`` is shared."""
    return {"linear_qkv": LoraTarget("self_attention", "self_attn",
                                     ("q_proj", "k_proj", "v_proj"), _split_qkv_b),
            "linear_proj": LoraTarget("self_attention", "self_attn", ("o_proj",),
                                      lambda b, m: (b,)),
            "linear_fc1": LoraTarget("mlp", "mlp", ("gate_proj", "up_proj"),
                                     lambda b, m: chunk_rows(b)),
            "linear_fc2": LoraTarget("mlp", "mlp", ("down_proj",), lambda b, m: (b,))}
