"""GLM-4.5 / GLM-4.6 (``Glm4MoeForCausalLM``, ``glm4_moe``): the Llama block's attention with
q/k/v biases (``attention_bias``), optional per-head q/k RMSNorm (``use_qk_norm``) and RoPE on
the first ``partial_rotary_factor`` of each head; ``first_k_dense_replace`` dense SwiGLU layers,
then the DeepSeek-style sigmoid MoE (``moe`` module: routed experts, one shared expert block,
``e_score_correction_bias``, ``routed_scaling_factor``, ``n_group`` / ``topk_group``).

Config (transformers 5.23's ``Glm4MoeConfig``, read for the fields) -> ``ModelConfig``::

    attention_bias true        -> --add-qkv-bias (q/k/v only; o_proj has none in HF either)
    use_qk_norm                -> --qk-layernorm ([head_dim] weights, before RoPE in both)
    partial_rotary_factor p    -> --rotary-percent p (GLM-4.5: 0.5)
    head_dim                   -> --kv-channels
    tie_word_embeddings false  -> --untie-embeddings-and-output-weights
    the MoE fields             -> moe.sigmoid_moe_model_kwargs (moe module docstring)
    num_nextn_predict_layers k -> dropped: model.layers.{L}..{L+k-1}.* (multi-token prediction)
                                  are left out at import with a printed line; the export has
                                  none and says num_nextn_predict_layers 0

Partial RoPE: HF rotates ``x[..., :r]`` (r = head_dim x p) with rotate-half inside it
(``cat(-x2, x1)`` of its two halves) and passes ``x[..., r:]`` through; megatron-core's
``apply_rotary_pos_emb`` with ``rotary_percent`` does the same on the first r dimensions
(non-interleaved), with the inverse frequencies ``base ** (-2j / r)`` of both.

Layer ``i`` (H hidden, G key/value heads of q query heads each, d head size)::

    Hugging Face (model.layers.i.)            megatron-core (decoder.layers.i.)
    input_layernorm.weight                ->  input_layernorm.weight
    self_attn.{q,k,v}_proj.weight         ->  self_attention.linear_qkv.weight [G*(q+2)*d, H]
    self_attn.{q,k,v}_proj.bias           ->  self_attention.linear_qkv.bias   (grouped alike)
    self_attn.{q,k}_norm.weight [d]       ->  self_attention.{q,k}_layernorm.weight
    self_attn.o_proj.weight               ->  self_attention.linear_proj.weight
    post_attention_layernorm.weight       ->  pre_mlp_layernorm.weight
    mlp.*                                 ->  mlp.* (moe.sigmoid_moe_mlp_rules: dense or MoE)

Refused: an activation other than silu, RoPE scaling (GLM-4.5 / 4.6 ship the default RoPE;
megatron-core's partial RoPE is tested with it only), ``n_shared_experts`` 0 (HF's GLM block
always has the shared expert), and what ``moe.refuse_sigmoid_moe`` refuses (``norm_topk_prob``
false among them: megatron-core renormalizes sigmoid top-k > 1 weights always).
"""

from __future__ import annotations

from typing import Any, Dict, List

from mt_dialog.convert.families.base import (
    ConversionError,
    DocsRow,
    Family,
    ImportExtras,
    LoraTarget,
    Rule,
)
from mt_dialog.convert.families.common import (
    LLAMA_FIELDS,
    llama_attention_rules,
    llama_hf_kwargs,
    llama_model_kwargs,
)
from mt_dialog.convert.families.moe import (
    SIGMOID_MOE_FIELDS,
    attention_lora_targets,
    refuse_sigmoid_moe,
    sigmoid_moe_hf_kwargs,
    sigmoid_moe_import_extras,
    sigmoid_moe_mlp_rules,
    sigmoid_moe_model_kwargs,
)
from mt_dialog.training.config import ModelConfig



class _WholeHeadRope:
    """``config`` as ``common.rope_settings`` reads it, its partial factor taken out (the family
    maps it to ``rotary_percent`` itself)."""

    def __init__(self, config: Any) -> None:
        self._config = config

    def __getattr__(self, name: str) -> Any:
        if name == "rope_parameters":
            params = dict(getattr(self._config, "rope_parameters", None) or {})
            params.pop("partial_rotary_factor", None)
            return params
        if name == "partial_rotary_factor":
            return 1.0
        if name == "rope_scaling":
            return None  # rope_settings then reads rope_parameters
        return getattr(self._config, name)


def partial_rotary_factor(config: Any) -> float:
    """``partial_rotary_factor`` of a GLM config (``rope_parameters`` in transformers 5, the
    config itself before; Glm4MoeConfig's default 0.5)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    value = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 0.5))
    return float(value if value is not None else 1.0)


class Glm4Moe(Family):
    """GLM-4.5 / 4.6 (module docstring)."""

    architecture = "Glm4MoeForCausalLM"
    model_type = "glm4_moe"
    config_class = "Glm4MoeConfig"
    features = frozenset({"experts", "router_score_function", "expert_bias", "shared_expert"})
    optional_features = frozenset({"qkv_bias", "qk_layernorm", "partial_rope", "dense_layers",
                                   "topk_scaling", "group_routing"})
    model_fields = LLAMA_FIELDS + SIGMOID_MOE_FIELDS + ("rotary_percent",)
    fp32_hf_suffixes = ("e_score_correction_bias",)  # fp32 in GLM's files and in HF's model
    docs = DocsRow("`--add-qkv-bias` (`attention_bias`), `--qk-layernorm` (`use_qk_norm`), "
                   "`--rotary-percent` (`partial_rotary_factor`), `--num-experts`, "
                   "`--moe-router-score-function sigmoid`, `--moe-router-enable-expert-bias` "
                   "(`e_score_correction_bias`, kept as loaded), "
                   "`--moe-shared-expert-intermediate-size`, `--moe-layer-freq` "
                   "(`first_k_dense_replace`), `--moe-router-topk-scaling-factor`, "
                   "`--moe-router-num-groups` / `--moe-router-group-topk`; "
                   "`num_nextn_predict_layers` MTP layers dropped (printed)",
                   "`hidden_act` != silu, RoPE scaling, `n_shared_experts` 0, "
                   "`norm_topk_prob` false, top-k 1 with `norm_topk_prob`, `n_group` > 1 with "
                   "top-k != 2 x `topk_group`")

    def refuse(self, config: Any, path: str) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ConversionError(f"{path}: hidden_act {act!r} is not supported (GLM's SwiGLU "
                                  "uses silu)")
        kind = dict(getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
        if kind != "default":
            raise ConversionError(f"{path}: rope_parameters.rope_type {kind!r} is not supported "
                                  "for Glm4MoeForCausalLM (partial RoPE with the default "
                                  "frequencies only, as GLM-4.5 / 4.6 ship); use rope_type "
                                  "default")
        shared = int(getattr(config, "n_shared_experts", 1) or 0)
        if shared < 1:
            raise ConversionError(f"{path}: n_shared_experts {shared} is not supported: "
                                  "Glm4MoeForCausalLM always has the shared expert block; use "
                                  "n_shared_experts >= 1")
        refuse_sigmoid_moe(config, path)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        return {**llama_model_kwargs(_WholeHeadRope(config), path),
                "add_qkv_bias": bool(getattr(config, "attention_bias", False)),
                "qk_layernorm": bool(getattr(config, "use_qk_norm", False)),
                "rotary_percent": partial_rotary_factor(config),
                **sigmoid_moe_model_kwargs(config)}

    def import_extras(self, config: Any, path: str) -> ImportExtras:
        """The multi-token-prediction layers dropped (printed with their count), the expert
        bias note."""
        return sigmoid_moe_import_extras(config)

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        if model.use_rope_scaling or model.rotary_seq_len_interpolation_factor:
            raise ConversionError("--use-rope-scaling / --rotary-seq-len-interpolation-factor: "
                                  "Glm4MoeForCausalLM is exported with the default RoPE only; "
                                  "train without RoPE scaling")
        kwargs = llama_hf_kwargs(model)
        kwargs.pop("rope_scaling")
        return {**kwargs, "attention_bias": bool(model.add_qkv_bias),
                "use_qk_norm": bool(model.qk_layernorm),
                "partial_rotary_factor": float(model.rotary_percent),
                **sigmoid_moe_hf_kwargs(model),
                "num_nextn_predict_layers": 0}  # MTP layers are dropped at import

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        return llama_attention_rules(i, model) + sigmoid_moe_mlp_rules(i, model)

    def lora_targets(self, model: ModelConfig) -> Dict[str, LoraTarget]:
        return attention_lora_targets()


GLM4_MOE = Glm4Moe()
