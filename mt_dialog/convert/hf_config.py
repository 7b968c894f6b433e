"""Hugging Face ``config.json`` <-> the library's ``ModelConfig``.

Supported families (the Llama block: RMSNorm, SwiGLU MLP, RoPE without interleaving, grouped-query
attention, no biases except Qwen2's on q/k/v; Qwen3 adds an RMSNorm on each query and key head):

    architecture         bias     q/k norm   RoPE scaling (rope_type)   refused
    LlamaForCausalLM     none     no         default, linear, llama3    attention_bias, mlp_bias
    MistralForCausalLM   none     no         default, linear, llama3    sliding_window
    Qwen2ForCausalLM     q, k, v  no         default, linear, llama3    use_sliding_window
    Qwen3ForCausalLM     none     yes        default, linear, llama3    use_sliding_window,
                                                                        attention_bias
    Qwen3MoeForCausalLM  none     yes        default, linear, llama3    as Qwen3; mlp_only_layers,
                                                                        decoder_sparse_step != 1
    MixtralForCausalLM   none     no         default, linear, llama3    sliding_window

The two Mixture-of-Experts families map onto ``--num-experts`` (every layer a MoE layer, no shared
experts), ``--moe-router-topk`` (``num_experts_per_tok``), ``--moe-ffn-hidden-size``
(Qwen3-MoE's ``moe_intermediate_size``, Mixtral's ``intermediate_size``) and the routing:
Mixtral takes the softmax over all experts, keeps the top k and renormalizes them, which is the
softmax over the k chosen logits (megatron-core's default); Qwen3-MoE does the same with
``norm_topk_prob`` true and keeps the unrenormalized top-k probabilities with false
(``--moe-router-pre-softmax``).

Anything else a config asks for (another architecture, activation, RoPE type, partial rotary,
sliding windows) is refused by ``ConversionError`` naming the field and its value.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

from mt_dialog.training.config import ModelConfig

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                 "Qwen3MoeForCausalLM", "MixtralForCausalLM")
MOE_ARCHITECTURES = ("Qwen3MoeForCausalLM", "MixtralForCausalLM")
# what tells the families apart in a ModelConfig: (QKV bias, q/k layernorm, experts); Mistral
# is Llama's
SIGNATURES = {"LlamaForCausalLM": (False, False, False), "MistralForCausalLM": (False, False, False),
              "Qwen2ForCausalLM": (True, False, False), "Qwen3ForCausalLM": (False, True, False),
              "Qwen3MoeForCausalLM": (False, True, True), "MixtralForCausalLM": (False, False, True)}
DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


class ConversionError(ValueError):
    """A checkpoint cannot be converted; the message names the file, field and fix."""


@dataclass
class HFModel:
    """What a Hugging Face config says, in the library's terms."""

    architecture: str
    model: ModelConfig
    vocab_size: int  # rows of the embedding (may exceed the tokenizer's vocabulary)
    max_position_embeddings: int
    dtype: str  # fp32 / bf16 / fp16
    bos_token_id: Optional[int] = None
    eos_token_id: Any = None
    pad_token_id: Optional[int] = None


def _load(folder: str):
    try:
        from transformers import AutoConfig
    except ImportError:
        raise ConversionError("converting Hugging Face checkpoints needs transformers: "
                              "pip install -e '.[hf]'") from None
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{folder}: no config.json; pass a Hugging Face model folder "
                              "(the one save_pretrained writes)")
    try:
        with open(path, encoding="utf-8") as handle:
            raw = json.load(handle)
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{path}: unreadable ({exc})") from None
    architectures = raw.get("architectures") or []
    if len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise ConversionError(f"{path}: architectures {architectures} is not supported; "
                              f"supported: {', '.join(ARCHITECTURES)}")
    try:
        return architectures[0], AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConversionError(f"{path}: transformers cannot read it ({exc})") from None


def rope_settings(config, path: str) -> Dict[str, Any]:
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


def _refuse_unsupported(architecture: str, config, path: str) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ConversionError(f"{path}: hidden_act {act!r} is not supported (SwiGLU with silu)")
    for name in ("attention_bias", "mlp_bias"):
        if getattr(config, name, False):
            raise ConversionError(f"{path}: {name} true is not supported (Llama blocks here "
                                  "have no biases; Qwen2 has q/k/v biases only)")
    if architecture in ("MistralForCausalLM", "MixtralForCausalLM") and getattr(
            config, "sliding_window", None):
        raise ConversionError(f"{path}: sliding_window {config.sliding_window} (sliding-window "
                              "attention) is not supported; only full attention")
    if architecture == "Qwen3MoeForCausalLM":
        sparse, dense = getattr(config, "decoder_sparse_step", 1), getattr(
            config, "mlp_only_layers", None) or []
        if sparse != 1 or dense:
            raise ConversionError(f"{path}: decoder_sparse_step {sparse} / mlp_only_layers "
                                  f"{list(dense)}: dense MLP layers between the MoE layers are "
                                  "not supported; only decoder_sparse_step 1 and no "
                                  "mlp_only_layers (every layer a MoE layer)")
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        if getattr(config, "use_sliding_window", False) or layer_types != {"full_attention"}:
            raise ConversionError(f"{path}: use_sliding_window / layer_types {sorted(layer_types)}"
                                  " (sliding-window attention) is not supported")


def moe_settings(architecture: str, config) -> Dict[str, Any]:
    """``ModelConfig`` MoE fields of a Qwen3-MoE or Mixtral config (module docstring); {}
    for a dense family."""
    if architecture not in MOE_ARCHITECTURES:
        return {}
    qwen = architecture == "Qwen3MoeForCausalLM"
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts")
    return {"num_experts": int(experts), "moe_router_topk": int(config.num_experts_per_tok),
            "moe_ffn_hidden_size": int(config.moe_intermediate_size if qwen
                                       else config.intermediate_size),
            "moe_router_pre_softmax": qwen and not getattr(config, "norm_topk_prob", False)}


def read_hf_config(folder: str) -> HFModel:
    """The model a Hugging Face folder holds, or ``ConversionError`` naming what is unsupported."""
    architecture, config = _load(folder)
    path = os.path.join(folder, "config.json")
    _refuse_unsupported(architecture, config, path)
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None)
    groups = getattr(config, "num_key_value_heads", None) or heads
    try:
        model = ModelConfig(
            num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
            ffn_hidden_size=int(config.intermediate_size), num_attention_heads=heads,
            num_query_groups=int(groups),
            kv_channels=int(head_dim) if head_dim else None,  # None: hidden / heads
            norm_epsilon=float(config.rms_norm_eps),
            untie_embeddings_and_output_weights=not getattr(config, "tie_word_embeddings", False),
            add_qkv_bias=architecture == "Qwen2ForCausalLM",
            qk_layernorm=architecture in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
            init_method_std=float(getattr(config, "initializer_range", 0.02)),
            **rope_settings(config, path), **moe_settings(architecture, config))
    except ValueError as exc:
        raise ConversionError(f"{path}: {exc}") from None
    dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
                or "float32").replace("torch.", "")
    return HFModel(architecture, model, int(config.vocab_size),
                   int(getattr(config, "max_position_embeddings", 4096)), DTYPES.get(dtype, "fp32"),
                   getattr(config, "bos_token_id", None), getattr(config, "eos_token_id", None),
                   getattr(config, "pad_token_id", None))


def guess_architecture(model: ModelConfig) -> str:
    """Qwen2 when the QKV projection has a bias, Qwen3 with q/k layernorm, Llama otherwise;
    with experts Qwen3-MoE (q/k layernorm) or Mixtral."""
    if model.num_experts:
        return "Qwen3MoeForCausalLM" if model.qk_layernorm else "MixtralForCausalLM"
    if model.add_qkv_bias:
        return "Qwen2ForCausalLM"
    return "Qwen3ForCausalLM" if model.qk_layernorm else "LlamaForCausalLM"


def _signature(model: ModelConfig):
    return model.add_qkv_bias, model.qk_layernorm, bool(model.num_experts)


def fits(model: ModelConfig, architecture: str) -> bool:
    """Whether ``architecture`` has the QKV bias, q/k layernorm and experts ``model`` has."""
    return SIGNATURES[architecture] == _signature(model)


def _refuse_mismatch(model: ModelConfig, architecture: str) -> None:
    """``ConversionError`` when the architecture lacks (or needs) the model's QKV bias or q/k
    layernorm, naming the one that fits."""
    if architecture not in ARCHITECTURES:
        raise ConversionError(f"--architecture {architecture} is not supported; supported: "
                              f"{', '.join(ARCHITECTURES)}")
    if fits(model, architecture):
        _refuse_routing(model, architecture)
        return
    if model.num_experts or SIGNATURES[architecture][2]:
        raise ConversionError(
            f"--architecture {architecture} {'has' if SIGNATURES[architecture][2] else 'lacks'} "
            f"experts, q/k layernorm {SIGNATURES[architecture][1]}, but this model has "
            f"--num-experts {model.num_experts} and q/k layernorm {model.qk_layernorm}; "
            f"use --architecture {guess_architecture(model)}")
    if model.add_qkv_bias and model.qk_layernorm:
        raise ConversionError("the model has both a QKV bias (--add-qkv-bias) and q/k layernorm "
                              "(--qk-layernorm); no supported Hugging Face architecture has both "
                              "(Qwen2ForCausalLM: the bias only, Qwen3ForCausalLM: the norms only)")
    bias, norm, _ = SIGNATURES[architecture]
    has = lambda flag: "has" if flag else "lacks"  # noqa: E731
    raise ConversionError(
        f"--architecture {architecture} {has(bias)} a QKV bias and {has(norm)} q/k layernorm, "
        f"but this model {has(model.add_qkv_bias)} a QKV bias (--add-qkv-bias) and "
        f"{has(model.qk_layernorm)} q/k layernorm (--qk-layernorm); use --architecture "
        f"{guess_architecture(model)}")


def _refuse_routing(model: ModelConfig, architecture: str) -> None:
    """A MoE family computes its routing one way (module docstring): a model routed otherwise
    would give other outputs there."""
    if not model.num_experts:
        return
    if model.moe_router_score_function != "softmax":
        raise ConversionError(f"--architecture {architecture} routes with a softmax; this model "
                              f"has --moe-router-score-function {model.moe_router_score_function}")
    if architecture == "MixtralForCausalLM" and model.moe_router_pre_softmax:
        raise ConversionError("--architecture MixtralForCausalLM renormalizes the top-k "
                              "probabilities; this model has --moe-router-pre-softmax (use "
                              "--architecture Qwen3MoeForCausalLM, whose norm_topk_prob false "
                              "matches it, if it has q/k layernorm)")


def _rope_for_hf(model: ModelConfig) -> Optional[Dict[str, Any]]:
    if model.use_rope_scaling:
        return {"rope_type": "llama3", "factor": model.rope_scaling_factor,
                "low_freq_factor": model.rope_scaling_low_freq_factor,
                "high_freq_factor": model.rope_scaling_high_freq_factor,
                "original_max_position_embeddings": model.rope_scaling_original_max_position}
    if model.rotary_seq_len_interpolation_factor:
        return {"rope_type": "linear", "factor": model.rotary_seq_len_interpolation_factor}
    return None


def _moe_for_hf(model: ModelConfig, architecture: str) -> Dict[str, Any]:
    if architecture == "MixtralForCausalLM":
        return {"num_local_experts": model.num_experts,
                "num_experts_per_tok": model.moe_router_topk}
    if architecture == "Qwen3MoeForCausalLM":
        return {"num_experts": model.num_experts, "num_experts_per_tok": model.moe_router_topk,
                "moe_intermediate_size": model.moe_ffn_hidden_size,
                "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": 1,
                "mlp_only_layers": []}
    return {}


def hf_config(model: ModelConfig, architecture: str, vocab_size: int, max_position: int,
              dtype: str, bos_token_id: Optional[int], eos_token_id: Any,
              pad_token_id: Optional[int] = None):
    """A transformers config object for ``model`` (``save_pretrained`` writes config.json)."""
    import torch
    import transformers

    _refuse_mismatch(model, architecture)
    cls = getattr(transformers, {"LlamaForCausalLM": "LlamaConfig",
                                 "MistralForCausalLM": "MistralConfig",
                                 "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                                 "Qwen3MoeForCausalLM": "Qwen3MoeConfig",
                                 "MixtralForCausalLM": "MixtralConfig"}[architecture])
    config = cls(vocab_size=vocab_size, hidden_size=model.hidden_size,
                 intermediate_size=(model.moe_ffn_hidden_size if architecture ==
                                    "MixtralForCausalLM" else model.ffn_hidden_size),
                 num_hidden_layers=model.num_layers, **_moe_for_hf(model, architecture),
                 num_attention_heads=model.num_attention_heads,
                 num_key_value_heads=model.num_query_groups, head_dim=model.kv_channels,
                 max_position_embeddings=max_position, rms_norm_eps=model.norm_epsilon,
                 rope_theta=model.rotary_base, rope_scaling=_rope_for_hf(model),
                 tie_word_embeddings=not model.untie_embeddings_and_output_weights,
                 initializer_range=model.init_method_std, hidden_act="silu",
                 bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                 pad_token_id=pad_token_id)
    config.architectures = [architecture]
    config.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    return config

