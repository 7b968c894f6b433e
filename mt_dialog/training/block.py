"""Transformer-block features of Gemma 3 and gpt-oss on megatron-core 0.16.1 (local and TE layers).

What megatron-core configures itself (set through ``ModelConfig.block_settings()``):
``layernorm_zero_centered_gamma`` (the (1 + w) RMSNorm, --apply-layernorm-1p: TE's norms take it,
megatron-core's torch norm refuses it, so the local path uses ``LocalRMSNorm``),
``softmax_scale`` (Gemma 3: ``query_pre_attn_scalar ** -0.5``), ``glu_linear_offset`` and
``activation_func_clamp_value`` with ``quick_gelu`` (gpt-oss's clamped SwiGLU), ``rotary_percent``
and ``position_embedding_type="yarn"`` (GPTModel arguments).

What megatron-core 0.16.1 has no field for, added here without copying its code:
* sandwich norms (Gemma 3's ``post_attention_layernorm`` after attention and
  ``post_feedforward_layernorm`` after the MLP, each before the residual add):
  ``BlockTransformerLayer`` builds ``post_self_attn_layernorm`` / ``post_mlp_layernorm`` from its
  spec and applies them to the attention / MLP output with forward hooks;
* a second RoPE base for sliding-window layers (Gemma 3's ``rope_local_base_freq``): the same
  layer recomputes the rotary angles with ``--rotary-base-local`` on the layers megatron-core
  runs with a window (``is_layer_window_attention(window_size, window_attn_skip_freq, layer)``,
  the fields the sliding-window settings fill), the GPTModel's rotary embedding serving the others;
* embeddings times sqrt(hidden) in the embedding dtype (``Gemma3TextScaledWordEmbedding``) and
  final logit soft-capping ``cap * tanh(logits / cap)``: forward hooks on ``embedding`` /
  ``output_layer`` (``add_model_hooks``);
* YaRN on GQA attention: ``GPTModel(position_embedding_type="yarn")`` reads ``yarn_*``
  attributes that ``TransformerConfig`` 0.16.1 does not declare (``set_yarn_attributes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)
from megatron.core.transformer.utils import is_layer_window_attention


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (HF ``gelu_pytorch_tanh``), Gemma's GeGLU gate."""
    return F.gelu(x, approximate="tanh")


class LocalRMSNorm(torch.nn.Module):
    """RMSNorm of the local path, in fp32 as HF ``Gemma3RMSNorm`` computes it:
    ``y = (x / sqrt(mean(x^2) + eps)) * (1 + w)`` with ``--apply-layernorm-1p`` (``w`` starts at 0),
    ``* w`` otherwise (``w`` starts at 1); the result is cast back to ``x``'s dtype.

    Args: megatron-core's norm signature (``config``, ``hidden_size``, ``eps``); x: [..., hidden].
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **kwargs):
        super().__init__()
        self.eps = eps
        self.zero_centered = config.layernorm_zero_centered_gamma
        init = torch.zeros if self.zero_centered else torch.ones
        self.weight = torch.nn.Parameter(init(hidden_size, dtype=config.params_dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float()
        return (y * (1.0 + w if self.zero_centered else w)).type_as(x)


@dataclass
class BlockLayerSubmodules(TransformerLayerSubmodules):
    """``TransformerLayerSubmodules`` plus Gemma 3's sandwich norms (IdentityOp: absent)."""

    post_self_attn_layernorm: Union[ModuleSpec, type] = IdentityOp
    post_mlp_layernorm: Union[ModuleSpec, type] = IdentityOp


class BlockTransformerLayer(TransformerLayer):
    """megatron-core's ``TransformerLayer`` with optional sandwich norms and a local RoPE base.

    ``post_self_attn_layernorm`` normalizes the attention output and ``post_mlp_layernorm`` the
    MLP output, before the residual add (HF Gemma 3 ``post_attention_layernorm`` /
    ``post_feedforward_layernorm``); a linear bias, if any, is added before the norm.
    ``rotary_base_local``: on layers with a sliding window, the rotary angles [s, 1, 1, d] are
    recomputed with this base (no position scaling), as HF Gemma 3 does for its local layers.
    """

    def __init__(self, config, submodules: BlockLayerSubmodules, layer_number: int = 1,
                 rotary_base_local: Optional[float] = None, rotary_percent: float = 1.0,
                 **kwargs):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         **kwargs)
        for name in ("post_self_attn_layernorm", "post_mlp_layernorm"):
            norm = build_module(getattr(submodules, name), config=config,
                                hidden_size=config.hidden_size, eps=config.layernorm_epsilon)
            setattr(self, name, norm)
        if not isinstance(self.post_self_attn_layernorm, IdentityOp):
            self.self_attention.register_forward_hook(self._post_norm_hook)
        if not isinstance(self.post_mlp_layernorm, IdentityOp):
            self.mlp.register_forward_hook(self._post_norm_hook)
        self.local_rotary = None
        sliding = is_layer_window_attention(config.window_size, config.window_attn_skip_freq,
                                            self.layer_number)
        if rotary_base_local is not None and sliding:
            from megatron.core.models.common.embeddings.rotary_pos_embedding import (
                RotaryEmbedding,
            )

            self.local_rotary = RotaryEmbedding(
                kv_channels=config.kv_channels, rotary_percent=rotary_percent,
                rotary_interleaved=config.rotary_interleaved, rotary_base=rotary_base_local,
                use_cpu_initialization=config.use_cpu_initialization)

    def _post_norm_hook(self, module, inputs, output):
        out, bias = output
        norm = (self.post_self_attn_layernorm if module is self.self_attention
                else self.post_mlp_layernorm)
        return norm(out if bias is None else out + bias), None

    def _forward_attention(self, *args, **kwargs):
        emb = kwargs.get("rotary_pos_emb")
        if self.local_rotary is not None and emb is not None:
            kwargs["rotary_pos_emb"] = self.local_rotary(emb.size(0))
        return super()._forward_attention(*args, **kwargs)


def _swap_norms(submodules, norm) -> None:
    """Replace megatron-core's torch norm (``WrappedTorchNorm``) by ``norm`` in a layer's spec."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(submodules, name) is WrappedTorchNorm:
            setattr(submodules, name, norm)
    attention = submodules.self_attention.submodules
    for name in ("q_layernorm", "k_layernorm"):
        if getattr(attention, name, None) is WrappedTorchNorm:
            setattr(attention, name, norm)


def block_layer_spec(spec: ModuleSpec, model, te: bool) -> ModuleSpec:
    """``spec`` (megatron-core's TE or local GPT layer spec) with the block features of
    ``model`` (``ModelConfig``): ``LocalRMSNorm`` for every norm of the local path with
    --apply-layernorm-1p, ``BlockTransformerLayer`` with --sandwich-norm / --rotary-base-local.
    Unchanged for a Llama-style model."""
    if not te and model.apply_layernorm_1p:
        _swap_norms(spec.submodules, LocalRMSNorm)
    if not (model.sandwich_norm or model.rotary_base_local is not None):
        return spec
    if te:
        from megatron.core.extensions.transformer_engine import TENorm as norm
    else:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm

        norm = LocalRMSNorm if model.apply_layernorm_1p else WrappedTorchNorm
    fields = {name: getattr(spec.submodules, name)
              for name in TransformerLayerSubmodules.__dataclass_fields__}
    post = norm if model.sandwich_norm else IdentityOp
    submodules = BlockLayerSubmodules(**fields, post_self_attn_layernorm=post,
                                      post_mlp_layernorm=post)
    params = {"rotary_base_local": model.rotary_base_local,
              "rotary_percent": model.rotary_percent}
    return ModuleSpec(module=BlockTransformerLayer, submodules=submodules, params=params)


def block_decoder_spec(spec, model, tconfig, vp_stage: Optional[int], te: bool):
    """The decoder spec GPTModel gets: ``spec`` (a layer spec, or ``model.decoder_spec``'s
    ``TransformerBlockSubmodules`` of dense and MoE layers) itself, or on the local path with
    --apply-layernorm-1p with ``LocalRMSNorm`` as final norm (megatron-core would build its
    torch norm there, which refuses zero-centered gamma).

    Raises:
        ValueError: --rotary-base-local on a model without sliding-window layers."""
    if model.rotary_base_local is not None and not tconfig.window_size:
        raise ValueError("rotary_base_local: --rotary-base-local is the RoPE base of the "
                         "sliding-window layers, and this model has none; give the window "
                         "settings (--window-size, --window-attn-skip-freq) or drop the flag")
    if te or not model.apply_layernorm_1p:
        return spec
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    if isinstance(spec, TransformerBlockSubmodules):
        spec.layer_norm = LocalRMSNorm
        return spec
    layers = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=LocalRMSNorm)


def set_yarn_attributes(tconfig, model) -> None:
    """Give ``tconfig`` the ``yarn_*`` attributes megatron-core 0.16.1's GPTModel (YaRN rotary
    embedding) and attention (its concentration factor ``mscale`` on cos/sin) read with
    ``getattr`` but ``TransformerConfig`` does not declare. No-op unless
    --position-embedding-type yarn."""
    if model.position_embedding_type != "yarn":
        return
    tconfig.yarn_rotary_scaling_factor = model.yarn_rotary_scaling_factor
    tconfig.yarn_original_max_position_embeddings = model.yarn_original_max_position_embeddings
    tconfig.yarn_beta_fast = model.yarn_beta_fast
    tconfig.yarn_beta_slow = model.yarn_beta_slow
    # 0 reads as "not given", as HF's rope_parameters read mscale / mscale_all_dim
    tconfig.yarn_mscale = model.yarn_mscale or None
    tconfig.yarn_mscale_all_dim = model.yarn_mscale_all_dim or None
    tconfig.yarn_correction_range_round_to_int = model.yarn_correction_range_round_to_int


def add_model_hooks(gpt_model, model) -> None:
    """Embedding scale (``--scale-embeddings``: output times sqrt(hidden) cast to the output's
    dtype, as HF's ``Gemma3TextScaledWordEmbedding`` multiplies in the weight dtype) and
    ``--final-logit-softcapping`` (``cap * tanh(logits / cap)``, elementwise, so the same on
    vocab-parallel shards) as forward hooks on ``gpt_model`` (a GPTModel chunk)."""
    if model.scale_embeddings and getattr(gpt_model, "pre_process", False):
        scale = math.sqrt(model.hidden_size)

        def scale_hook(module, inputs, output):
            return output * torch.tensor(scale, dtype=torch.float32).to(output.dtype)

        gpt_model.embedding.register_forward_hook(scale_hook)
    cap = model.final_logit_softcapping
    if cap is not None and getattr(gpt_model, "post_process", False):

        def softcap_hook(module, inputs, output):
            logits, bias = output
            return torch.tanh(logits / cap) * cap, bias

        gpt_model.output_layer.register_forward_hook(softcap_hook)
