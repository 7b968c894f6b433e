"""DeepSeek-V3 / Kimi K2 (``DeepseekV3ForCausalLM``, model_type ``deepseek_v3``): multi-latent
attention (MLA) and the sigmoid MoE with shared experts and dense first layers (``moe`` module:
``sigmoid_moe_*``). Read from transformers 5.23's ``modeling_deepseek_v3`` (the layouts
only). Kimi K2's config (model_type ``kimi_k2``) is DeepSeek-V3's, read with
``DeepseekV3Config``.

Config -> ``ModelConfig`` (Megatron-LM flags)::

    q_lora_rank (null: one full q_proj, the Lite models) -> --q-lora-rank
    kv_lora_rank / qk_nope_head_dim / qk_rope_head_dim / v_head_dim
        -> --kv-lora-rank / --qk-head-dim / --qk-pos-emb-head-dim / --v-head-dim
    (q_a_layernorm, kv_a_layernorm: the latent RMSNorms)           -> --qk-layernorm
    rope_parameters rope_theta                                       -> --rotary-base
    rope_parameters yarn: factor, mscale, mscale_all_dim, beta_fast, beta_slow,
        original_max_position_embeddings -> --rope-type yarn --rotary-scaling-factor --mscale
        --mscale-all-dim --beta-fast --beta-slow --original-max-position-embeddings
    the MoE fields -> moe.sigmoid_moe_model_kwargs (expert bias kept frozen: update rate 0)

Layer ``i``'s attention (H hidden, n heads, dn = qk_nope_head_dim, dr = qk_rope_head_dim, dv =
v_head_dim, rq = q_lora_rank, rkv = kv_lora_rank), one to one under ``self_attn.`` /
``self_attention.``::

    Hugging Face (model.layers.i.)                 megatron-core (decoder.layers.i.)
    input_layernorm [H]                       ---> input_layernorm
    q_proj [n*(dn+dr), H]        (rq null)    ---> linear_q_proj
    q_a_proj [rq, H]                          ---> linear_q_down_proj
    q_a_layernorm [rq]                        ---> q_layernorm
    q_b_proj [n*(dn+dr), rq]                  ---> linear_q_up_proj
    kv_a_proj_with_mqa [rkv+dr, H]            ---> linear_kv_down_proj
    kv_a_layernorm [rkv]                      ---> kv_layernorm
    kv_b_proj [n*(dn+dv), rkv]                ---> linear_kv_up_proj
    o_proj [H, n*dv]                          ---> linear_proj
    post_attention_layernorm [H]              ---> pre_mlp_layernorm

megatron-core's MLA reads each head's dr rope rows as interleaved pairs, as HF does with
``rope_interleave`` true (DeepSeek-V3's default). With ``rope_interleave`` false HF rotates the
halves, so import permutes the rope rows (each head's last dr rows of q_proj / q_b_proj, the
last dr rows of kv_a_proj_with_mqa): HF row j of the first half -> 2j, of the second half ->
2j+1; export always writes ``rope_interleave`` true (the same model, rows as stored).

Multi-token-prediction layers (``num_nextn_predict_layers``; tensors ``model.layers.{L+k}.*``
of real checkpoints, which transformers does not load either) are dropped at import with a
printed line; export writes ``num_nextn_predict_layers`` 0.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from mt_dialog.convert.families.base import (
    ConversionError,
    DocsRow,
    Family,
    ImportExtras,
    LoraTarget,
    Rule,
    same,
)
from mt_dialog.convert.families.common import llama_lora_targets
from mt_dialog.convert.families.moe import (
    SIGMOID_MOE_FIELDS,
    refuse_sigmoid_moe,
    sigmoid_moe_hf_kwargs,
    sigmoid_moe_import_extras,
    sigmoid_moe_mlp_rules,
    sigmoid_moe_model_kwargs,
)
from mt_dialog.training.config import MLA_FIELDS, YARN_FIELDS, ModelConfig

DEEPSEEK_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "norm_epsilon", "untie_embeddings_and_output_weights",
                   "qk_layernorm", "rotary_base", "multi_latent_attention") + MLA_FIELDS + \
    YARN_FIELDS + SIGMOID_MOE_FIELDS
# HF yarn key -> ModelConfig field
_YARN = {"factor": "rotary_scaling_factor", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
         "beta_fast": "beta_fast", "beta_slow": "beta_slow",
         "original_max_position_embeddings": "original_max_position_embeddings"}


def _rope_parameters(config: Any) -> Dict[str, Any]:
    params = dict(getattr(config, "rope_parameters", None) or {})
    params.update(getattr(config, "rope_scaling", None) or {})
    return params


def refuse_mla_rope(config: Any, path: str) -> None:
    """RoPE of MLA: default or YaRN as megatron-core computes it (correction range rounded, the
    cos/sin factor ``mscale(f, mscale) / mscale(f, mscale_all_dim)``, no set attention_factor)."""
    params = _rope_parameters(config)
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConversionError(f"{path}: rope_parameters rope_type {kind!r} is not supported with "
                              "multi-latent attention; supported: default, yarn")
    if kind != "yarn":
        return
    if params.get("attention_factor") is not None:
        raise ConversionError(f"{path}: rope_parameters attention_factor "
                              f"{params['attention_factor']} is not supported; megatron-core "
                              "derives it from factor, mscale and mscale_all_dim: drop it")
    if params.get("truncate", True) is False:
        raise ConversionError(f"{path}: rope_parameters truncate false is not supported (MLA's "
                              "YaRN rounds the correction range); drop it")
    if params.get("mscale_all_dim") and not params.get("mscale"):
        raise ConversionError(f"{path}: rope_parameters mscale_all_dim "
                              f"{params['mscale_all_dim']} without mscale: HF then scales cos/sin "
                              "by mscale(factor) alone, megatron-core by a ratio; give mscale")


def mla_rope_kwargs(config: Any) -> Dict[str, Any]:
    """``ModelConfig`` RoPE fields of MLA (after ``refuse_mla_rope``)."""
    params = _rope_parameters(config)
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    out: Dict[str, Any] = {"rotary_base": float(theta)}
    if params.get("rope_type", params.get("type", "default")) != "yarn":
        return out
    values = {key: params.get(key) for key in _YARN}
    if values["original_max_position_embeddings"] is None:
        values["original_max_position_embeddings"] = int(config.max_position_embeddings)
    if values["factor"] is None:  # HF: max_position_embeddings / original (as DeepSeek-V3)
        values["factor"] = (int(config.max_position_embeddings)
                            / values["original_max_position_embeddings"])
    if not (values["mscale"] and values["mscale_all_dim"]):  # HF: cos/sin by mscale(factor)
        values["mscale"], values["mscale_all_dim"] = 1.0, 0.0
    out["rope_type"] = "yarn"
    for key, field in _YARN.items():
        if values[key] is not None:
            cast = int if key == "original_max_position_embeddings" else float
            out[field] = cast(values[key])
    return out


def mla_rope_hf(model: ModelConfig) -> Dict[str, Any]:
    """``rope_parameters`` of the HF config (``mla_rope_kwargs`` reversed)."""
    params: Dict[str, Any] = {"rope_type": "default", "rope_theta": model.rotary_base}
    if model.rope_type == "yarn":
        params.update({"rope_type": "yarn", **{key: getattr(model, field)
                                               for key, field in _YARN.items()}})
    return params


def _interleave(rows: torch.Tensor) -> torch.Tensor:
    """Rope rows [dr, ...] in HF's rotate-half order -> interleaved pairs (row j -> 2j, row
    dr/2 + j -> 2j + 1)."""
    half = rows.shape[0] // 2
    order = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()
    return rows[order]


def interleave_rope_rows(name: str, tensor: torch.Tensor, heads: int, rope: int) -> torch.Tensor:
    """HF tensor ``name`` of a ``rope_interleave`` false checkpoint with its rope rows
    interleaved (module docstring); other tensors as they are."""
    if name.endswith(("self_attn.q_proj.weight", "self_attn.q_b_proj.weight")):
        per_head = tensor.reshape(heads, -1, tensor.shape[-1]).clone()
        for h in range(heads):
            per_head[h, -rope:] = _interleave(per_head[h, -rope:])
        return per_head.reshape(tensor.shape)
    if name.endswith("self_attn.kv_a_proj_with_mqa.weight"):
        out = tensor.clone()
        out[-rope:] = _interleave(tensor[-rope:])
        return out
    return tensor


def mla_attention_rules(i: int, model: ModelConfig) -> List[Rule]:
    """Layer ``i``'s norms and MLA projections (module docstring)."""
    hf, mc = f"model.layers.{i}.", f"decoder.layers.{i}."
    att, sa = hf + "self_attn.", mc + "self_attention."
    pairs = [("kv_a_proj_with_mqa", "linear_kv_down_proj"), ("kv_a_layernorm", "kv_layernorm"),
             ("kv_b_proj", "linear_kv_up_proj"), ("o_proj", "linear_proj")]
    if model.q_lora_rank is None:
        pairs.insert(0, ("q_proj", "linear_q_proj"))
    else:
        pairs[:0] = [("q_a_proj", "linear_q_down_proj"), ("q_a_layernorm", "q_layernorm"),
                     ("q_b_proj", "linear_q_up_proj")]
    return [same(hf + "input_layernorm.weight", mc + "input_layernorm.weight"),
            *(same(f"{att}{h}.weight", f"{sa}{m}.weight") for h, m in pairs),
            same(hf + "post_attention_layernorm.weight", mc + "pre_mlp_layernorm.weight")]


class DeepseekV3(Family):
    """MLA + sigmoid MoE (module docstring)."""

    architecture = "DeepseekV3ForCausalLM"
    model_type = "deepseek_v3"
    config_class = "DeepseekV3Config"
    features = frozenset({"mla", "qk_layernorm", "experts", "router_score_function",
                          "expert_bias"})
    optional_features = frozenset({"shared_expert", "group_routing", "topk_scaling",
                                   "dense_layers"})
    model_fields = DEEPSEEK_FIELDS
    alias_model_types = ("kimi_k2",)  # Kimi K2: DeepSeek-V3's config under its own name
    # HF keeps the expert bias fp32 (_keep_in_fp32_modules_strict); read by export once the
    # glm branch's Family.fp32_hf_suffixes is merged
    fp32_hf_suffixes = ("e_score_correction_bias",)
    docs = DocsRow(
        "`--multi-latent-attention --qk-layernorm` (`--q-lora-rank`, `--kv-lora-rank`, "
        "`--qk-head-dim`, `--qk-pos-emb-head-dim`, `--v-head-dim`; YaRN: `--rope-type yarn` "
        "`--rotary-scaling-factor` `--mscale` `--mscale-all-dim` `--beta-fast` `--beta-slow` "
        "`--original-max-position-embeddings`), `--num-experts`, "
        "`--moe-shared-expert-intermediate-size`, `--moe-router-score-function sigmoid "
        "--moe-router-enable-expert-bias` (bias update rate 0: kept as loaded), "
        "`--moe-router-num-groups/--moe-router-group-topk`, `--moe-router-topk-scaling-factor`, "
        "`--moe-layer-freq` (`first_k_dense_replace`); MTP layers dropped (printed)",
        "`num_key_value_heads` != heads, `attention_bias`, `hidden_act` other than silu, "
        "`norm_topk_prob` false (top-k > 1) or true (top-k 1), `n_group` > 1 unless top-k = 2 x "
        "`topk_group`, `scoring_func`/`topk_method` other than sigmoid/noaux_tc, rope types "
        "other than default/yarn, yarn `attention_factor` / `truncate` false")

    def refuse(self, config: Any, path: str) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ConversionError(f"{path}: hidden_act {act!r} is not supported (SwiGLU with "
                                  "silu)")
        if getattr(config, "attention_bias", False):
            raise ConversionError(f"{path}: attention_bias true is not supported (MLA here has "
                                  "no biases)")
        heads = int(config.num_attention_heads)
        groups = getattr(config, "num_key_value_heads", None) or heads
        if int(groups) != heads:
            raise ConversionError(f"{path}: num_key_value_heads {groups} != num_attention_heads "
                                  f"{heads}: MLA gives every head its own key and value; set "
                                  f"num_key_value_heads {heads}")
        experts = getattr(config, "n_routed_experts", None)
        if not experts:
            raise ConversionError(f"{path}: n_routed_experts {experts}: a DeepSeek-V3 model "
                                  "needs routed experts (set n_routed_experts >= 2)")
        refuse_mla_rope(config, path)
        refuse_sigmoid_moe(config, path)

    def model_kwargs(self, config: Any, path: str) -> Dict[str, Any]:
        heads = int(config.num_attention_heads)
        q_rank = getattr(config, "q_lora_rank", None)
        return dict(
            num_layers=int(config.num_hidden_layers), hidden_size=int(config.hidden_size),
            ffn_hidden_size=int(config.intermediate_size), num_attention_heads=heads,
            num_query_groups=heads, norm_epsilon=float(config.rms_norm_eps),
            untie_embeddings_and_output_weights=not getattr(config, "tie_word_embeddings", False),
            init_method_std=float(getattr(config, "initializer_range", 0.02)),
            multi_latent_attention=True, qk_layernorm=True,
            q_lora_rank=int(q_rank) if q_rank else None, kv_lora_rank=int(config.kv_lora_rank),
            qk_head_dim=int(config.qk_nope_head_dim),
            qk_pos_emb_head_dim=int(config.qk_rope_head_dim), v_head_dim=int(config.v_head_dim),
            **mla_rope_kwargs(config), **sigmoid_moe_model_kwargs(config))

    def import_extras(self, config: Any, path: str) -> ImportExtras:
        """Rope rows interleaved when ``rope_interleave`` is false; MTP layers dropped; the
        expert bias note."""
        adapt = None
        if not getattr(config, "rope_interleave", True):
            heads, rope = int(config.num_attention_heads), int(config.qk_rope_head_dim)
            adapt = lambda name, tensor: interleave_rope_rows(name, tensor, heads, rope)  # noqa
        return sigmoid_moe_import_extras(config, adapt)

    def hf_config_kwargs(self, model: ModelConfig) -> Dict[str, Any]:
        return dict(
            hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
            num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
            num_key_value_heads=model.num_attention_heads, rms_norm_eps=model.norm_epsilon,
            tie_word_embeddings=not model.untie_embeddings_and_output_weights,
            initializer_range=model.init_method_std, hidden_act="silu", attention_bias=False,
            q_lora_rank=model.q_lora_rank, kv_lora_rank=model.kv_lora_rank,
            qk_nope_head_dim=model.qk_head_dim, qk_rope_head_dim=model.qk_pos_emb_head_dim,
            v_head_dim=model.v_head_dim, rope_interleave=True,
            rope_parameters=mla_rope_hf(model), num_nextn_predict_layers=0,
            **sigmoid_moe_hf_kwargs(model))

    def layer_rules(self, i: int, model: ModelConfig) -> List[Rule]:
        return mla_attention_rules(i, model) + sigmoid_moe_mlp_rules(i, model)

    def lora_targets(self, model: ModelConfig) -> Dict[str, LoraTarget]:
        """MLA has no ``linear_qkv`` and its own projections get no adapters; the MLP is the
        experts (no adapters): ``linear_proj`` (o_proj) only."""
        return {"linear_proj": llama_lora_targets()["linear_proj"]}


DEEPSEEK_V3 = DeepseekV3()
