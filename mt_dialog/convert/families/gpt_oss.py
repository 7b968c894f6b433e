"""gpt-oss (``GptOssForCausalLM``, ``gpt_oss``): grouped-query attention with biases and learnable
sinks, sliding-window layers alternating with full ones, YaRN RoPE, and a MoE layer in every layer
(a biased router, experts with biases and a clamped SwiGLU). Source of each mapping: transformers
5.23 ``models/gpt_oss/modeling_gpt_oss.py`` (read, not copied), checked by
``tests/convert/test_family_gpt_oss.py`` (logits equal Hugging Face's).

Config (``GptOssConfig`` -> ``ModelConfig``):

* the Llama sizes, ``head_dim`` -> ``--kv-channels``, ``rms_norm_eps``, ``tie_word_embeddings``;
* ``attention_bias`` (must be true) -> ``--add-bias-linear``: biases on q/k/v/o, the router and
  each expert's fc1/fc2 (megatron-core scales an expert's fc2 bias by the routing weight, as
  ``GptOssExperts`` does);
* ``self_attn.sinks`` -> ``--softmax-type learnable``;
* ``sliding_window`` W and ``layer_types`` -> ``--window-size W-1 0`` (HF's window holds the token
  and W-1 before it) and ``--window-attn-skip-freq``: ``2`` for gpt-oss's [sliding, full, ...]
  (megatron-core's layer n, from 1, is full when n % 2 == 0), else one 0/1 value per layer;
  every layer full: no window;
* ``num_local_experts`` / ``num_experts_per_tok`` / ``intermediate_size`` -> ``--num-experts`` /
  ``--moe-router-topk`` / ``--moe-ffn-hidden-size``; the router takes the top k logits and a
  softmax over them: megatron-core's default routing;
* ``swiglu_limit`` L (``swiglu_alpha`` must be 1.702) -> ``--quick-geglu --glu-linear-offset 1
  --activation-func-clamp-value L``: ``(clamp(up, -L, L) + 1) * g * sigmoid(1.702 g)`` with
  ``g = clamp(gate, max=L)``;
* ``rope_parameters`` yarn -> ``--position-embedding-type yarn`` with ``factor``,
  ``original_max_position_embeddings``, ``beta_fast`` / ``beta_slow``, ``truncate`` (->
  ``--[no-]yarn-correction-range-round-to-int``), ``mscale`` / ``mscale_all_dim`` when both are
  set; ``default`` / ``linear`` / ``llama3`` as the Llama families.

Tensors of layer ``i`` (H hidden, E experts, F expert inner size)::

    Hugging Face (model.layers.i.)              megatron-core (decoder.layers.i.)
    input_layernorm.weight                      input_layernorm.weight
    self_attn.{q,k,v}_proj.{weight,bias}   ->   self_attention.linear_qkv.{weight,bias} (grouped)
    self_attn.o_proj.{weight,bias}              self_attention.linear_proj.{weight,bias}
    self_attn.sinks [heads]                     self_attention.core_attention.softmax_offset
    post_attention_layernorm.weight             pre_mlp_layernorm.weight
    mlp.router.{weight [E, H], bias [E]}        mlp.router.{weight, bias}
    mlp.experts.gate_up_proj [E, H, 2F]    ->   mlp.experts.local_experts.e.linear_fc1.weight
      columns interleaved: 2j gate j,             [2F, H] = [W[e][:, 0::2].T; W[e][:, 1::2].T]
      2j+1 up j                                   (gate rows, then up rows)
    mlp.experts.gate_up_proj_bias [E, 2F]  ->   ... .e.linear_fc1.bias = [b[e][0::2]; b[e][1::2]]
    mlp.experts.down_proj [E, F, H]        ->   ... .e.linear_fc2.weight [H, F] = down_proj[e].T
    mlp.experts.down_proj_bias [E, H]      ->   ... .e.linear_fc2.bias = down_proj_bias[e]

LoRA adapts the attention (``q/k/v_proj``, ``o_proj``); the experts get none.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mt_dialog.convert.families.base import ConversionError, DocsRow, Family, LoraTarget, Rule, same
from mt_dialog.convert.families.common import (
    LLAMA_FIELDS,
    llama_outer_rules,
    qkv_rule,
    rope_for_hf,
    rope_settings,
)
from mt_dialog.convert.families.moe import MOE_FIELDS, attention_lora_targets
from mt_dialog.training.config import ModelConfig

SWIGLU_ALPHA = 1.702  # megatron-core's quick_gelu: x * sigmoid(1.702 x)
LAYER_TYPES = ("sliding_attention", "full_attention")
YARN_FIELDS = ("position_embedding_type", "yarn_rotary_scaling_factor",
               "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
               "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int")
GPT_OSS_FIELDS = ("window_size", "window_attn_skip_freq", "softmax_type", "add_bias_linear",
                  "quick_geglu", "glu_linear_offset", "activation_func_clamp_value") + YARN_FIELDS


# -- config ------------------------------------------------------------------------------------

def _rope_parameters(config: Any) -> Dict[str, Any]:
    return dict(getattr(config, "rope_parameters", None) or {})


def refuse_gpt_oss(config: Any, path: str) -> None:
    """What a gpt-oss config may ask that the mapping cannot give (module docstring)."""
    quant = getattr(config, "quantization_config", None)
    if quant:
        method = quant.get("quant_method") if isinstance(quant, dict) else quant
        raise ConversionError(
            f"{path}: quantization_config {method!r}: quantized experts (MXFP4 blocks/scales) "
            "are not read; dequantize first: load it with transformers' Mxfp4Config(dequantize="
            "True) and save_pretrained the bf16 model, then convert that folder")
    if not getattr(config, "attention_bias", True):
        raise ConversionError(f"{path}: attention_bias false is not supported (gpt-oss maps to "
                              "--add-bias-linear, which gives the attention biases too); only "
                              "attention_bias true")
    alpha = getattr(config, "swiglu_alpha", SWIGLU_ALPHA)
    if alpha != SWIGLU_ALPHA:
        raise ConversionError(f"{path}: swiglu_alpha {alpha} is not supported; megatron-core's "
                              f"quick GELU gate has alpha {SWIGLU_ALPHA} (gpt-oss's)")
    limit = getattr(config, "swiglu_limit", None)
    if limit is None or limit <= 0:
        raise ConversionError(f"{path}: swiglu_limit {limit} must be a positive clamp "
                              "(gpt-oss: 7.0)")
    types = list(getattr(config, "layer_types", None) or [])
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown:
        raise ConversionError(f"{path}: layer_types {unknown} are not supported; only "
                              f"{', '.join(LAYER_TYPES)}")
    if "sliding_attention" in types and not getattr(config, "sliding_window", None):
        raise ConversionError(f"{path}: layer_types has sliding_attention layers but "
                              f"sliding_window is {getattr(config, 'sliding_window', None)}; "
                              "set the window (gpt-oss: 128)")
    params = _rope_parameters(config)
    if params.get("rope_type") == "yarn" and params.get("attention_factor") is not None:
        raise ConversionError(f"{path}: rope_parameters attention_factor "
                              f"{params['attention_factor']} is not supported (megatron-core "
                              "derives YaRN's factor from factor, mscale and mscale_all_dim); "
                              "drop it to use 0.1 ln(factor) + 1")


def window_kwargs(config: Any) -> Dict[str, Any]:
    """``--window-size`` / ``--window-attn-skip-freq`` of ``sliding_window`` and ``layer_types``
    (every layer full: none)."""
    types = list(getattr(config, "layer_types", None) or [])
    windowed = [1 if t == "sliding_attention" else 0 for t in types]
    if not any(windowed):
        return {}
    out: Dict[str, Any] = {"window_size": [int(config.sliding_window) - 1, 0]}
    if all(windowed):
        return out
    for every in range(2, len(windowed) + 1):  # every N-th layer full (from 1)
        if windowed == [int((n + 1) % every != 0) for n in range(len(windowed))]:
            out["window_attn_skip_freq"] = [every]
            return out
    out["window_attn_skip_freq"] = windowed
    return out


def layer_types_for_hf(model: ModelConfig) -> Tuple[List[str], Optional[int]]:
    """(``layer_types``, ``sliding_window``) of ``model`` (``window_kwargs`` reversed)."""
    if model.window_size is None:
        return ["full_attention"] * model.num_layers, None
    freq = model.window_attn_skip_freq
    if freq is None:
        windowed: Sequence[int] = [1] * model.num_layers
    elif len(freq) == 1:
        windowed = [int((n + 1) % freq[0] != 0) for n in range(model.num_layers)]
    else:
        windowed = freq
    return [LAYER_TYPES[0] if w else LAYER_TYPES[1] for w in windowed], model.window_size[0] + 1


def yarn_kwargs(config: Any, path: str) -> Dict[str, Any]:
    """``ModelConfig`` RoPE fields: YaRN's (``position_embedding_type`` yarn), or the Llama
    families' for the other RoPE types."""
    params = _rope_parameters(config)
    if params.get("rope_type") != "yarn":
        return rope_settings(config, path)
    if params.get("partial_rotary_factor") not in (None, 1, 1.0):
        raise ConversionError(f"{path}: partial_rotary_factor {params['partial_rotary_factor']} "
                              "is not supported with gpt-oss (RoPE on the whole head)")
    if not params.get("factor"):
        raise ConversionError(f"{path}: rope_parameters yarn without factor is not supported; "
                              "give factor (gpt-oss: 32.0)")
    out = {"rotary_base": float(params["rope_theta"]), "position_embedding_type": "yarn",
           "yarn_rotary_scaling_factor": float(params["factor"]),
           "yarn_original_max_position_embeddings": int(
               params["original_max_position_embeddings"]),
           "yarn_beta_fast": float(params.get("beta_fast") or 32.0),
           "yarn_beta_slow": float(params.get("beta_slow") or 1.0),
           "yarn_correction_range_round_to_int": bool(params.get("truncate", True))}
    if params.get("mscale") and params.get("mscale_all_dim"):  # HF uses them only together
        out.update(yarn_mscale=float(params["mscale"]),
                   yarn_mscale_all_dim=float(params["mscale_all_dim"]))
    return out


def rope_parameters_for_hf(model: ModelConfig) -> Dict[str, Any]:
    """``rope_parameters`` of the HF config (``yarn_kwargs`` reversed)."""
    if model.position_embedding_type != "yarn":
        return {"rope_type": "default", **(rope_for_hf(model) or {}),
                "rope_theta": model.rotary_base}
    out = {"rope_type": "yarn", "rope_theta": model.rotary_base,
           "factor": model.yarn_rotary_scaling_factor,
           "original_max_position_embeddings": model.yarn_original_max_position_embeddings,
           "beta_fast": model.yarn_beta_fast, "beta_slow": model.yarn_beta_slow,
           "truncate": model.yarn_correction_range_round_to_int}
    if model.yarn_mscale is not None:
        out.update(mscale=model.yarn_mscale, mscale_all_dim=model.yarn_mscale_all_dim)
    return out


def gpt_oss_model_kwargs(config: Any, path: str) -> Dict[str, Any]:
    """``ModelConfig`` kwargs of a gpt-oss config (after ``refuse_gpt_oss``)."""
    heads = int(config.num_attention_heads)
    experts = int(config.num_local_experts)
    return dict(
        num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
        ffn_hidden_size=int(config.intermediate_size), num_attention_heads=heads,
        num_query_groups=int(getattr(config, "num_key_value_heads", None) or heads),
        kv_channels=int(config.head_dim) if getattr(config, "head_dim", None) else None,
        norm_epsilon=float(config.rms_norm_eps),
        untie_embeddings_and_output_weights=not getattr(config, "tie_word_embeddings", False),
        init_method_std=float(getattr(config, "initializer_range", 0.02)),
        num_experts=experts, moe_router_topk=int(config.num_experts_per_tok),
        moe_ffn_hidden_size=int(config.intermediate_size), moe_router_pre_softmax=False,
        add_bias_linear=True, softmax_type="learnable", quick_geglu=True,
        glu_linear_offset=1.0, activation_func_clamp_value=float(config.swiglu_limit),
        **window_kwargs(config), **yarn_kwargs(config, path))


def gpt_oss_hf_kwargs(model: ModelConfig) -> Dict[str, Any]:
    """``GptOssConfig`` kwargs of ``model`` (``gpt_oss_model_kwargs`` reversed)."""
    layer_types, window = layer_types_for_hf(model)
    return dict(hidden_size=model.hidden_size, intermediate_size=model.moe_ffn_hidden_size,
                num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
                num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                rms_norm_eps=model.norm_epsilon, rope_parameters=rope_parameters_for_hf(model),
                tie_word_embeddings=not model.untie_embeddings_and_output_weights,
                initializer_range=model.init_method_std, num_local_experts=model.num_experts,
                num_experts_per_tok=model.moe_router_topk, sliding_window=window,
                layer_types=layer_types, swiglu_limit=model.activation_func_clamp_value,
                swiglu_alpha=SWIGLU_ALPHA, attention_bias=True)


def gpt_oss_misfit(model: ModelConfig) -> Optional[str]:
    """What a ``ModelConfig`` with gpt-oss's features still lacks: the exact gate (quick GELU,
    offset 1, a clamp), learnable sinks (not off-by-one), softmax-over-top-k routing."""
    wrong = []
    if model.openai_gelu or model.glu_linear_offset != 1.0 \
            or model.activation_func_clamp_value is None:
        wrong.append("--quick-geglu --glu-linear-offset 1 --activation-func-clamp-value L "
                     f"(this model: --glu-linear-offset {model.glu_linear_offset}, "
                     f"--activation-func-clamp-value {model.activation_func_clamp_value})")
    if model.softmax_type != "learnable":
        wrong.append(f"--softmax-type learnable (this model: {model.softmax_type})")
    if wrong:
        return f"needs {' and '.join(wrong)}"
    return None


# -- tensors -----------------------------------------------------------------------------------

def deinterleave(gate_up: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """HF ``gate_up_proj`` [E, H, 2F] (or its bias [E, 2F]; columns 2j gate j, 2j+1 up j) ->
    each expert's ``linear_fc1`` weight [2F, H] (or bias [2F]): gate rows, then up rows."""
    fc1 = torch.cat([gate_up[..., 0::2], gate_up[..., 1::2]], dim=-1)  # [E, (H,) 2F]
    if fc1.dim() == 3:
        fc1 = fc1.transpose(1, 2)
    return tuple(t.contiguous() for t in fc1.unbind(0))


def interleave(*fc1: torch.Tensor) -> Tuple[torch.Tensor]:
    """Each expert's ``linear_fc1`` weight [2F, H] (or bias [2F]) -> HF ``gate_up_proj``
    [E, H, 2F] (or [E, 2F]) with gate and up interleaved (``deinterleave`` reversed)."""
    stacked = torch.stack(fc1)  # [E, 2F(, H)]
    if stacked.dim() == 3:
        stacked = stacked.transpose(1, 2)  # [E, H, 2F]
    gate, up = stacked.chunk(2, dim=-1)
    return (torch.stack([gate, up], dim=-1).flatten(-2).contiguous(),)


def _transposed(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.transpose(-1, -2).contiguous() for t in tensors)


def _unstack_transposed(down: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return _transposed(*down.unbind(0))


def _stack_transposed(*fc2: torch.Tensor) -> Tuple[torch.Tensor]:
    return (torch.stack(_transposed(*fc2)),)


def _unstack(tensor: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.contiguous() for t in tensor.unbind(0))


def _stack(*tensors: torch.Tensor) -> Tuple[torch.Tensor]:
    return (torch.stack(tensors),)


def gpt_oss_expert_rules(i: int, model: ModelConfig) -> List[Rule]:
    """Router and experts of layer ``i`` (module docstring's table)."""
    hf, mc = f"model.layers.{i}.mlp.", f"decoder.layers.{i}.mlp."
    experts = [f"{mc}experts.local_experts.{e}." for e in range(model.num_experts)]
    return [same(hf + "router.weight", mc + "router.weight"),
            same(hf + "router.bias", mc + "router.bias"),
            Rule((hf + "experts.gate_up_proj",), tuple(e + "linear_fc1.weight" for e in experts),
                 to_mcore=deinterleave, to_hf=interleave),
            Rule((hf + "experts.gate_up_proj_bias",), tuple(e + "linear_fc1.bias" for e in experts),
                 to_mcore=deinterleave, to_hf=interleave),
            Rule((hf + "experts.down_proj",), tuple(e + "linear_fc2.weight" for e in experts),
                 to_mcore=_unstack_transposed, to_hf=_stack_transposed),
            Rule((hf + "experts.down_proj_bias",), tuple(e + "linear_fc2.bias" for e in experts),
                 to_mcore=_unstack, to_hf=_stack)]


def gpt_oss_attention_rules(i: int, model: ModelConfig) -> List[Rule]:
    """Norms, biased attention and sinks of layer ``i``."""
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    proj = tuple(f"{hf}self_attn.{p}_proj" for p in "qkv")
    rules = [same(hf + "input_layernorm.weight", mc + "input_layernorm.weight"),
             same(hf + "self_attn.sinks", mc + "self_attention.core_attention.softmax_offset"),
             same(hf + "post_attention_layernorm.weight", mc + "pre_mlp_layernorm.weight")]
    for kind in ("weight", "bias"):
        rules += [qkv_rule(tuple(f"{p}.{kind}" for p in proj),
                           f"{mc}self_attention.linear_qkv.{kind}", model),
                  same(f"{hf}self_attn.o_proj.{kind}", f"{mc}self_attention.linear_proj.{kind}")]
    return rules


class GptOss(Family):
    """gpt-oss (module docstring)."""

    architecture = "GptOssForCausalLM"
    model_type = "gpt_oss"
    config_class = "GptOssConfig"
    features = frozenset({"experts", "softmax_type", "linear_bias", "gelu_gate"})
    optional_features = frozenset({"window", "yarn"})  # layer_types all full / other RoPE
    model_fields = LLAMA_FIELDS + MOE_FIELDS + GPT_OSS_FIELDS
    docs = DocsRow("`--num-experts`, `--add-bias-linear`, `--softmax-type learnable`, "
                   "`--window-size` / `--window-attn-skip-freq` (`sliding_window`, `layer_types`)"
                   ", `--quick-geglu --glu-linear-offset 1 --activation-func-clamp-value` "
                   "(`swiglu_limit`), `--position-embedding-type yarn` and `--yarn-*`",
                   "`quantization_config` (MXFP4: dequantize first), `attention_bias` false, "
                   "`swiglu_alpha` != 1.702, yarn `attention_factor`, `partial_rotary_factor`")

    def refuse(self, config: Any, path: str) -> None:
        refuse_gpt_oss(config, path)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return gpt_oss_model_kwargs(config, path)

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        return gpt_oss_hf_kwargs(model)

    def misfit(self, model: ModelConfig) -> Optional[str]:
        return super().misfit(model) or gpt_oss_misfit(model)

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        return gpt_oss_attention_rules(i, model) + gpt_oss_expert_rules(i, model)

    def outer_rules(self, model: ModelConfig, rows: Optional[int]) -> List[Rule]:
        return llama_outer_rules(model, rows)

    def lora_targets(self, model: ModelConfig) -> Dict[str, LoraTarget]:
        return attention_lora_targets()


GPT_OSS = GptOss()
