"""Gemma 3, text (``Gemma3ForCausalLM``, ``gemma3_text``): the Llama block's attention with
q/k norms, GeGLU with the tanh GELU, four (1 + w) RMSNorms per layer, embeddings scaled by
sqrt(hidden), sliding-window layers with their own RoPE base between full-attention layers.

Config (transformers 5.23 ``Gemma3TextConfig``) -> flags::

    hidden_activation gelu_pytorch_tanh      --openai-gelu (GeGLU, fc1 = [gate; up])
    Gemma3RMSNorm: x_hat * (1 + w)           --apply-layernorm-1p (weights copied as they are)
    post_attention / post_feedforward norms  --sandwich-norm
    embed_scale = sqrt(hidden_size)          --scale-embeddings
    q_norm / k_norm                          --qk-layernorm
    query_pre_attn_scalar s                  --softmax-scale s ** -0.5
    sliding_window W                         --window-size W-1 0 (a query sees itself and the
                                             W-1 tokens before it, as HF's mask)
    layer_types                              --window-attn-skip-freq N when layer i (from 0) is
                                             full exactly when (i + 1) % N == 0 (megatron-core's
                                             rule; Gemma 3: 6), else one 0/1 value per layer
    rope_parameters["full_attention"]        --rotary-base (linear scaling: factor ->
                                             --rotary-seq-len-interpolation-factor)
    rope_parameters["sliding_attention"]     --rotary-base-local (default RoPE only; older
      (rope_local_base_freq before 5.x)        configs' rope_local_base_freq is read by
                                             transformers into this entry)
    final_logit_softcapping c                --final-logit-softcapping c
    tie_word_embeddings                      tied unless false (lm_head then)

Refused: the multimodal ``Gemma3ForConditionalGeneration`` (``gemma3``; the registry's
``REFUSED``), ``attn_logit_softcapping`` (Gemma 2's; megatron-core has no attention-score
capping), ``use_bidirectional_attention``, ``attention_bias``, other activations, RoPE types
other than default / linear (full) and default (sliding).

Tensors of layer ``i`` (the names of megatron-core's local layer specs at TP = PP = 1)::

    Hugging Face (model.layers.i.)            megatron-core (decoder.layers.i.)
    input_layernorm.weight [H]          same  input_layernorm.weight
    self_attn.{q,k,v}_proj.weight      group  self_attention.linear_qkv.weight (Llama's)
    self_attn.o_proj.weight             same  self_attention.linear_proj.weight
    self_attn.q_norm / k_norm [d]       same  self_attention.q_layernorm / k_layernorm
    post_attention_layernorm [H]        same  post_self_attn_layernorm.weight (AFTER attention)
    pre_feedforward_layernorm [H]       same  pre_mlp_layernorm.weight
    mlp.gate_proj / up_proj [F, H]   cat_rows mlp.linear_fc1.weight [2F, H]
    mlp.down_proj.weight                same  mlp.linear_fc2.weight
    post_feedforward_layernorm [H]      same  post_mlp_layernorm.weight

The embedding's ``embed_scale`` buffer is not persistent (HF recomputes it from the hidden size).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

from mt_dialog.convert.families.base import ConversionError, DocsRow, Family, Rule, same
from mt_dialog.convert.families.common import (
    LLAMA_FIELDS,
    llama_hf_kwargs,
    llama_layer_rules,
    llama_model_kwargs,
)
from mt_dialog.training.config import ModelConfig

GEMMA3_FIELDS = LLAMA_FIELDS + (
    "apply_layernorm_1p", "sandwich_norm", "scale_embeddings", "openai_gelu", "softmax_scale",
    "rotary_base_local", "final_logit_softcapping", "window_size", "window_attn_skip_freq")
FULL, SLIDING = "full_attention", "sliding_attention"
MULTIMODAL = ("Gemma3ForConditionalGeneration (model_type gemma3, text + vision) is not "
              "supported; only the text model Gemma3ForCausalLM (model_type gemma3_text): "
              "save its language model alone (lm = Gemma3ForCausalLM(mm.config.text_config); "
              "lm.model.load_state_dict(mm.model.language_model.state_dict()); "
              "lm.save_pretrained(DIR), with the tokenizer) and convert DIR")


def _refuse_fields(config: Any, path: str) -> None:
    """Config fields with no megatron-core counterpart here."""
    act = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", None)
    if act != "gelu_pytorch_tanh":
        raise ConversionError(f"{path}: hidden_activation {act!r} is not supported; Gemma 3 "
                              "here is GeGLU with gelu_pytorch_tanh (--openai-gelu)")
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap is not None:
        raise ConversionError(f"{path}: attn_logit_softcapping {cap} is not supported "
                              "(megatron-core has no attention-score soft-capping); set it to "
                              "null (Gemma 3 checkpoints do) or use another model")
    for name, fix in (("use_bidirectional_attention", "set it to false (causal attention)"),
                      ("attention_bias", "Gemma 3 here has no attention biases")):
        if getattr(config, name, False):
            raise ConversionError(f"{path}: {name} {getattr(config, name)!r} is not supported; "
                                  f"{fix}")


def _rope_parts(config: Any, path: str) -> Dict[str, Dict[str, Any]]:
    """``rope_parameters`` {full_attention: ..., sliding_attention: ...}, types checked."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if set(params) - {FULL, SLIDING} or FULL not in params:
        raise ConversionError(f"{path}: rope_parameters {params} is not Gemma 3's layout "
                              f"({{{FULL!r}: ..., {SLIDING!r}: ...}}); re-save the config with "
                              "transformers >= 5")
    allowed = {FULL: ("default", "linear"), SLIDING: ("default",)}
    for kind, types in allowed.items():
        rope = params.get(kind) or {}
        rope_type = rope.get("rope_type", "default")
        if rope_type not in types:
            raise ConversionError(f"{path}: rope_parameters[{kind!r}] rope_type {rope_type!r} "
                                  f"is not supported; supported: {', '.join(types)}")
    return params


def sliding_flags(layer_types: List[str]) -> List[int]:
    """HF ``layer_types`` -> one 0/1 value per layer (1: sliding window)."""
    return [int(kind == SLIDING) for kind in layer_types]


def skip_freq(flags: List[int]) -> Optional[List[int]]:
    """``--window-attn-skip-freq`` of per-layer 0/1 ``flags``: None when every layer slides,
    ``[N]`` when layer i (from 0) is full exactly when (i + 1) % N == 0 (megatron-core's
    ``is_layer_window_attention``), else the list itself."""
    if all(flags):
        return None
    n = flags.index(0) + 1
    if all(flag == int((i + 1) % n != 0) for i, flag in enumerate(flags)):
        return [n]
    return list(flags)


def layer_types_of(model: ModelConfig) -> List[str]:
    """HF ``layer_types`` of ``model`` (megatron-core's window rule, layers numbered from 1)."""
    from megatron.core.transformer.utils import is_layer_window_attention

    window, freq = model.window_size, model.window_attn_skip_freq
    freq = None if freq is None else freq[0] if len(freq) == 1 else list(freq)
    return [SLIDING if is_layer_window_attention(window and tuple(window), freq, i + 1) else FULL
            for i in range(model.num_layers)]


def _window_kwargs(config: Any, path: str, params: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """``window_size`` / ``window_attn_skip_freq`` / ``rotary_base_local`` of the sliding
    layers (none when every layer is full)."""
    layer_types = list(getattr(config, "layer_types", None) or [])
    if len(layer_types) != config.num_hidden_layers or set(layer_types) - {FULL, SLIDING}:
        raise ConversionError(f"{path}: layer_types {layer_types} must name {FULL!r} or "
                              f"{SLIDING!r} for each of the {config.num_hidden_layers} layers")
    flags = sliding_flags(layer_types)
    if not any(flags):
        return {}
    window = getattr(config, "sliding_window", None)
    if not window or window < 1:
        raise ConversionError(f"{path}: sliding_window {window!r} with sliding_attention "
                              "layers; set sliding_window to the window (>= 1 tokens)")
    local = params.get(SLIDING) or {}
    return {"window_size": [int(window) - 1, 0], "window_attn_skip_freq": skip_freq(flags),
            "rotary_base_local": float(local.get("rope_theta", 10000.0))}


def _rope_kwargs(params: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    full = params[FULL]
    out: Dict[str, Any] = {"rotary_base": float(full.get("rope_theta", 1e6)),
                           "rotary_seq_len_interpolation_factor": None}
    if full.get("rope_type", "default") == "linear":
        out["rotary_seq_len_interpolation_factor"] = float(full["factor"])
    return out


class Gemma3(Family):
    """Gemma 3 text (module docstring)."""

    architecture = "Gemma3ForCausalLM"
    model_type = "gemma3_text"
    config_class = "Gemma3TextConfig"
    features = frozenset({"qk_layernorm", "layernorm_1p", "sandwich_norm", "scale_embeddings",
                          "gelu_gate"})
    optional_features = frozenset({"window", "rotary_base_local", "softmax_scale",
                                   "logit_softcapping"})
    model_fields = GEMMA3_FIELDS
    docs = DocsRow("`--qk-layernorm`, `--apply-layernorm-1p`, `--sandwich-norm`, "
                   "`--scale-embeddings`, `--openai-gelu`, `--softmax-scale` "
                   "(`query_pre_attn_scalar`), `--window-size` / `--window-attn-skip-freq` "
                   "(`sliding_window`, `layer_types`), `--rotary-base-local`, "
                   "`--final-logit-softcapping`",
                   "`Gemma3ForConditionalGeneration` (multimodal), `attn_logit_softcapping`, "
                   "`use_bidirectional_attention`, `attention_bias`, RoPE types but default / "
                   "linear")

    def refuse(self, config: Any, path: str) -> None:
        model_type = getattr(config, "model_type", self.model_type)
        if model_type != self.model_type:
            raise ConversionError(f"{path}: model_type {model_type!r}: {MULTIMODAL}")
        _refuse_fields(config, path)
        _rope_parts(config, path)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        params = _rope_parts(config, path)
        base = {k: v for k, v in llama_model_kwargs(config, path).items()
                if not k.startswith(("rotary_", "use_rope", "rope_"))}
        cap = getattr(config, "final_logit_softcapping", None)
        return {**base, **_rope_kwargs(params), **_window_kwargs(config, path, params),
                "qk_layernorm": True, "apply_layernorm_1p": True, "sandwich_norm": True,
                "scale_embeddings": True, "openai_gelu": True,
                "softmax_scale": float(config.query_pre_attn_scalar) ** -0.5,
                "final_logit_softcapping": None if cap is None else float(cap)}

    def misfit(self, model: ModelConfig) -> Optional[str]:
        reason = super().misfit(model)
        if reason is None and model.quick_geglu:
            return "needs --openai-gelu (gelu_pytorch_tanh), not --quick-geglu"
        if reason is None and model.use_rope_scaling:
            return "does not support this model's llama3 RoPE scaling (--use-rope-scaling)"
        if reason is None and model.window_size is not None and model.rotary_base_local is None:
            return ("needs --rotary-base-local with --window-size (Gemma 3's sliding layers "
                    "have their own RoPE base)")
        return reason

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        kwargs = llama_hf_kwargs(model)
        for name in ("rope_theta", "rope_scaling", "hidden_act"):
            kwargs.pop(name)
        full = {"rope_type": "default", "rope_theta": model.rotary_base}
        if model.rotary_seq_len_interpolation_factor:
            full.update(rope_type="linear", factor=model.rotary_seq_len_interpolation_factor)
        local = model.rotary_base_local or 10000.0
        head_dim = model.kv_channels or model.hidden_size // model.num_attention_heads
        scalar = model.softmax_scale ** -2 if model.softmax_scale is not None else head_dim
        # HF builds a sliding mask even when no layer uses it: keep its default window then
        window = {} if model.window_size is None else {"sliding_window": model.window_size[0] + 1}
        return {**kwargs, "head_dim": head_dim, "hidden_activation": "gelu_pytorch_tanh",
                "rope_parameters": {FULL: full, SLIDING: {"rope_type": "default",
                                                          "rope_theta": local}},
                "query_pre_attn_scalar": _as_number(scalar), **window,
                "layer_types": layer_types_of(model), "attn_logit_softcapping": None,
                "final_logit_softcapping": model.final_logit_softcapping}

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
        rules = [r for r in llama_layer_rules(i, model)
                 if r.hf != (hf + "post_attention_layernorm.weight",)]
        return rules + [
            same(hf + "post_attention_layernorm.weight", mc + "post_self_attn_layernorm.weight"),
            same(hf + "pre_feedforward_layernorm.weight", mc + "pre_mlp_layernorm.weight"),
            same(hf + "post_feedforward_layernorm.weight", mc + "post_mlp_layernorm.weight")]


def _as_number(value: float):
    """An integer when ``value`` is one up to rounding (``query_pre_attn_scalar`` is an int in
    HF configs: 24 ** -0.5 squared back gives 24.000000000000004)."""
    rounded = round(value)
    return int(rounded) if math.isclose(value, rounded, rel_tol=1e-9) else value


GEMMA3 = Gemma3()
