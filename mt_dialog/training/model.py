"""The Llama-style GPT on megatron-core: TransformerConfig, layer spec, model chunks, DDP.

Layer implementation: Transformer Engine when it is installed and CUDA is present (packed
conversations go to TE's THD attention through ``PackedSeqParams``), megatron-core's local torch
layers otherwise, with ``PackedSDPAttention`` as core attention (per-conversation SDPA).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch

from mt_dialog.training.config import DialogTrainingConfig, ParallelConfig


def transformer_engine_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def use_transformer_engine(impl: str) -> bool:
    if impl == "transformer_engine" and not transformer_engine_usable():
        raise ValueError("transformer_impl: transformer_engine needs CUDA and the "
                         "transformer-engine package (pip install -e '.[gpu]'); use local")
    return impl == "transformer_engine" or (impl == "auto" and transformer_engine_usable())


# Transformer Engine gained an fp32 attention backend for packed (THD) sequences in 2.12
TE_FP32_THD_VERSION = "2.12"


def te_thd_precision_problem(te_version: str, dtype: torch.dtype) -> Optional[str]:
    """Why TE ``te_version`` cannot run packed-sequence (THD) attention in ``dtype``, or None.
    Before TE 2.12 only the fused / flash backends take THD input, and they need fp16/bf16."""
    from packaging.version import Version

    if dtype in (torch.bfloat16, torch.float16):
        return None
    if Version(te_version).release >= Version(TE_FP32_THD_VERSION).release:
        return None
    return (f"Transformer Engine {te_version} has no fp32 attention backend for packed "
            f"conversations (THD layout; it arrives in TE {TE_FP32_THD_VERSION}); train with "
            "--bf16 (the usual choice on GPUs), or use --transformer-impl local")


def check_precision(config: DialogTrainingConfig) -> None:
    """Refuse, before any model is built, a precision the chosen layers cannot run.

    Raises:
        ValueError: fp32 with Transformer Engine older than 2.12 (see ``te_thd_precision_problem``).
    """
    if not use_transformer_engine(config.model.transformer_impl):
        return
    import transformer_engine

    problem = te_thd_precision_problem(transformer_engine.__version__, config.optim.params_dtype)
    if problem:
        raise ValueError(f"transformer_impl: {problem}")


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel: int) -> int:
    multiple = divisible_by * tensor_parallel
    return -(-vocab_size // multiple) * multiple


def transformer_config(config: DialogTrainingConfig, dtype: Optional[torch.dtype] = None,
                       initialize: bool = True):
    """megatron-core's TransformerConfig of the run. ``dtype`` overrides the parameter dtype
    (default: ``OptimConfig.params_dtype``: bf16 / fp16 with --bf16 / --fp16, else fp32, on GPU
    and CPU alike); ``initialize=False`` leaves the weights uninitialized (they are about to be
    overwritten, e.g. by a checkpoint conversion)."""
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig, TransformerConfig)

    from mt_dialog.training.fp8 import transformer_config_settings

    model, par, optim = config.model, config.parallel, config.optim
    cuda = torch.cuda.is_available()
    if dtype is None:
        dtype = optim.params_dtype
    te = use_transformer_engine(model.transformer_impl)
    if par.sequence_parallel and not te:
        raise ValueError("sequence_parallel: needs the Transformer Engine layers (CUDA + "
                         "transformer-engine); megatron-core's torch norm refuses it")
    config_class = MLATransformerConfig if model.multi_latent_attention else TransformerConfig
    return config_class(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups, ffn_hidden_size=model.ffn_hidden_size,
        kv_channels=model.kv_channels, normalization="RMSNorm",
        layernorm_epsilon=model.norm_epsilon, gated_linear_unit=True,
        add_qkv_bias=model.add_qkv_bias, qk_layernorm=model.qk_layernorm,
        hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=model.init_method_std,
        use_cpu_initialization=not cuda, params_dtype=dtype, pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        perform_initialization=initialize,
        tensor_model_parallel_size=par.tensor_model_parallel_size,
        pipeline_model_parallel_size=par.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel, calculate_per_token_loss=True,
        masked_softmax_fusion=te, persist_layer_norm=te,
        gradient_accumulation_fusion=False, cross_entropy_loss_fusion=False,
        rotary_interleaved=False, batch_p2p_comm=batch_p2p_comm(par),
        expert_model_parallel_size=par.expert_model_parallel_size,
        **context_parallel_settings(par),  # context_parallel_size, cp_comm_type
        **model.recompute_settings(),  # recompute_granularity, _method, _num_layers
        **model.moe_settings(),  # num_moe_experts, moe_router_topk, ... (MoE models only)
        **model.attention_settings(),  # window_size, softmax_type, MLA sizes (MLA models only)
        **model.moe_routing_settings(),  # add_bias_linear; shared experts, expert bias, groups
        **model.block_settings(te),  # activation_func, fusions, zero-centered gamma, softmax scale
        **transformer_config_settings(config),  # fp8, fp8_recipe, ..., tp_comm_overlap
    )


def context_parallel_settings(par: ParallelConfig) -> dict:
    """TransformerConfig fields of context parallelism (the micro-batches of a step all have
    one length, ``context_parallel.split_micro_batches``, so pipeline stages need no shape
    exchange)."""
    if par.context_parallel_size == 1:
        return {}
    return {"context_parallel_size": par.context_parallel_size, "cp_comm_type": par.cp_comm_type}


def batch_p2p_comm(par: ParallelConfig) -> bool:
    """megatron-core's ``batch_p2p_comm`` for the layout (``par``: ``ParallelConfig``): False only
    for the interleaved schedule at pipeline-parallel size 2, where batching gives wrong
    activations and gradients, on any backend.

    There megatron-core 0.16.1's interleaved 1F1B steady state calls
    ``P2PCommunicator.send_forward_backward_recv_forward_backward``, whose batched path
    (``p2p_communication._batched_p2p_ops``) issues ``[send_prev (grad), recv_prev (activation),
    send_next (activation), recv_next (grad)]`` in one ``batch_isend_irecv``, every op with tag 0;
    at PP=2 the previous and the next stage are the same rank, and same-peer ops pair in issue
    order (gloo matches by peer and tag; NCCL ignores tags and runs a group's calls to one peer
    in order), so the peer's grad lands in ``recv_prev`` and its activation in ``recv_next``:
    the two swap silently (same shape). The unbatched ``_p2p_ops`` posts both directions in the
    same order on both ranks. Megatron-LM's ``validate_args`` refuses this combination
    (interleaved, PP=2, no p2p overlap, i.e. batched). Non-interleaved schedules send at most
    one tensor each way per call, so they keep batching."""
    return not (par.virtual_pipeline_model_parallel_size and par.pipeline_model_parallel_size == 2)


# checkpoint keys of the local MLA layer -> those of megatron-core's TE MLA spec, where the latent
# norms are fused into the up-projections and the dense MLP's norm into linear_fc1 (a MoE layer
# keeps pre_mlp_layernorm: popped below, as for the other layers)
MLA_LOCAL_TO_TE_KEYS = {
    "self_attention.q_layernorm.": "self_attention.linear_q_up_proj.layer_norm_",
    "self_attention.kv_layernorm.": "self_attention.linear_kv_up_proj.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def layer_spec(config: DialogTrainingConfig, dense: bool = False):
    """megatron-core's layer spec: Transformer Engine's or the local one with packed attention.
    ``--qk-layernorm`` gives ``self_attention.q_layernorm`` / ``k_layernorm`` (TE's norm or
    ``torch.nn.RMSNorm`` of the head size, replicated over tensor-parallel ranks; megatron-core's
    ``finalize_model_grads`` sums their gradients over the TP group). ``--num-experts`` makes
    every MLP a ``MoELayer`` with ``moe.DialogRouter``: TE's grouped-GEMM experts with Transformer
    Engine, megatron-core's ``SequentialMLP`` (one SwiGLU MLP per local expert) otherwise; both
    save the experts as ``mlp.experts.experts.linear_fc{1,2}.weight`` [layers, experts, ...]
    (whatever the expert-parallel size) and the MLP norm as ``pre_mlp_layernorm.weight``.
    ``--multi-latent-attention`` gives megatron-core's ``MLASelfAttention`` (``linear_q_proj`` or
    ``linear_q_down_proj`` / ``linear_q_up_proj``, ``linear_kv_down_proj``, ``linear_kv_up_proj``;
    ``--qk-layernorm`` there is the latent norms ``q_layernorm`` [q_lora_rank] and
    ``kv_layernorm`` [kv_lora_rank]), with the packed core attention on the local path.
    ``dense=True``: a dense layer's spec on a MoE model (``--moe-layer-freq``), see
    ``decoder_spec``."""
    from mt_dialog.training.block import block_layer_spec

    qk_layernorm = config.model.qk_layernorm
    experts = None if dense else config.model.num_experts
    mla = config.model.multi_latent_attention
    te = use_transformer_engine(config.model.transformer_impl)
    if te:
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        spec = get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=experts is not None, qk_layernorm=qk_layernorm,
            multi_latent_attention=mla)
    else:
        from mt_dialog.training.attention import get_packed_gpt_layer_local_spec

        spec = get_packed_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_layernorm,
                                               num_experts=experts, multi_latent_attention=mla)
        if mla:  # save the norms under TE's MLA spec keys (its norms are fused into linears)
            spec.submodules.sharded_state_dict_keys_map = dict(MLA_LOCAL_TO_TE_KEYS)
    if experts is not None:
        from mt_dialog.training.moe import DialogRouter

        spec.submodules.mlp.submodules.router = DialogRouter
        # a MoE layer has no fc1 to fuse the norm into: the local spec would save the norm as
        # mlp.linear_fc1.layer_norm_weight, TE's MoE spec as pre_mlp_layernorm.weight; keep TE's
        spec.submodules.sharded_state_dict_keys_map.pop("pre_mlp_layernorm.", None)
    return block_layer_spec(spec, config.model, te)  # (1 + w) norms, sandwich norms, local RoPE


def decoder_spec(config: DialogTrainingConfig, tconfig, vp_stage: Optional[int]):
    """The decoder's spec for ``GPTModel``: ``layer_spec`` when every layer is alike; with dense
    layers between MoE layers (``ModelConfig.moe_layer_pattern``) megatron-core's
    ``TransformerBlockSubmodules`` holding this pipeline chunk's layers, each the MoE or the
    dense ``layer_spec`` (as ``get_gpt_decoder_block_spec`` slices them). megatron-core then
    saves every layer under its own number (``decoder.layers.<i>.``: ``TransformerBlock.
    sharded_state_dict``'s non-homogeneous layers) instead of one tensor stacked over layers."""
    from megatron.core.transformer.transformer_block import (
        _get_block_submodules,
        get_num_layers_to_build,
    )
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    pattern = config.model.moe_layer_pattern()
    if pattern is None:
        return layer_spec(config)
    moe, dense = layer_spec(config), layer_spec(config, dense=True)
    block = _get_block_submodules(tconfig, moe, vp_stage=vp_stage)  # megatron's final norm
    offset = get_transformer_layer_offset(tconfig, vp_stage=vp_stage)
    count = get_num_layers_to_build(tconfig, vp_stage=vp_stage)
    block.layer_specs = [moe if pattern[i] else dense for i in range(offset, offset + count)]
    return block


def build_model_chunks(config: DialogTrainingConfig, tconfig, vocab_size: int,
                       seq_length: int) -> List[torch.nn.Module]:
    """This rank's GPTModel chunk(s) (several with a virtual pipeline), on its device; with
    ``config.lora`` enabled, base parameters frozen and adapters attached (``training.lora``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt.gpt_model import GPTModel

    from mt_dialog.training.block import add_model_hooks, block_decoder_spec, set_yarn_attributes
    from mt_dialog.training.distributed import device
    from mt_dialog.training.expert_bias import copy_expert_outputs
    from mt_dialog.training.fp8 import initialize_tp_communicators

    # --tp-comm-overlap: TE's userbuffers exist before TE's layers are built (inert without it)
    initialize_tp_communicators(config, seq_length, tconfig.params_dtype)
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    set_yarn_attributes(tconfig, config.model)
    te = use_transformer_engine(config.model.transformer_impl)
    chunks = []
    for stage in range(vpp or 1):
        vp_stage = stage if vpp else None
        model = GPTModel(
            config=tconfig, transformer_layer_spec=block_decoder_spec(
                decoder_spec(config, tconfig, vp_stage), config.model, tconfig, vp_stage, te),
            vocab_size=padded_vocab_size(vocab_size, config.model.make_vocab_size_divisible_by,
                                         config.parallel.tensor_model_parallel_size),
            max_sequence_length=seq_length,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=not vpp, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=not vpp, vp_stage=vp_stage),
            share_embeddings_and_output_weights=not config.model.untie_embeddings_and_output_weights,
            position_embedding_type=config.model.position_embedding_type,
            rotary_percent=config.model.rotary_percent,
            rotary_base=int(config.model.rotary_base), vp_stage=vp_stage,
            seq_len_interpolation_factor=config.model.rotary_seq_len_interpolation_factor,
        )
        if config.model.use_rope_scaling:
            rotary = model.rotary_pos_emb
            rotary.inv_freq = llama3_scaled_inv_freq(rotary.inv_freq, config.model)
        add_model_hooks(model, config.model)  # --scale-embeddings, --final-logit-softcapping
        copy_expert_outputs(model)  # biased experts at EP = TP = 1 (training.expert_bias)
        chunks.append(_to_params_dtype(model.to(device()), tconfig.params_dtype))
    if config.lora.enabled:  # frozen base + adapters, before DDP and the optimizer see them
        from mt_dialog.training.lora import apply_lora

        apply_lora(chunks, config.lora, tconfig, config.train.seed)
    return chunks


def _to_params_dtype(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Every parameter in ``dtype``, as Megatron-LM's ``Float16Module`` makes them
    (``module.bfloat16()`` / ``.half()``): megatron-core's local torch norms are created in fp32
    whatever ``params_dtype`` says. The RoPE frequencies (a plain attribute) stay fp32. The
    wrapper's other work is a no-op here: inputs are integer ids and megatron's cross entropy
    computes the loss from ``logits.float()``."""
    if dtype == torch.bfloat16:
        return model.bfloat16()
    if dtype == torch.float16:
        return model.half()
    return model


def llama3_scaled_inv_freq(inv_freq: torch.Tensor, model) -> torch.Tensor:
    """Llama 3.1 RoPE scaling of the inverse frequencies (``--use-rope-scaling``).

    With wavelength ``w = 2 pi / f`` and ``L`` = --rope-scaling-original-max-position:

        w < L / high_freq_factor  ->  f                       (short wavelengths: kept)
        w > L / low_freq_factor   ->  f / factor              (long wavelengths: stretched)
        otherwise                 ->  (1 - s) f / factor + s f,  s = (L / w - low) / (high - low)
    """
    factor, low = model.rope_scaling_factor, model.rope_scaling_low_freq_factor
    high, original = model.rope_scaling_high_freq_factor, model.rope_scaling_original_max_position
    wavelength = 2 * math.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, blended)
    return torch.where(wavelength < original / high, inv_freq, scaled)


def sync_functions(model: List, tconfig, par: ParallelConfig) -> None:
    """The schedule's hooks on megatron-core's ``TransformerConfig``, as Megatron-LM's
    ``training.py`` sets them: ``no_sync_func`` (no reduction before a chunk's last micro-batch),
    with --overlap-grad-reduce ``grad_sync_func`` (each chunk's reduction starts as soon as its
    last backward ends: Megatron-LM's default --align-grad-reduce), with --overlap-param-gather
    under the interleaved schedule ``param_sync_func`` (the schedule starts each chunk's gather
    before its first micro-batch: Megatron-LM's default --align-param-gather, which it turns off
    for the other schedules, where the DDP's forward pre-hooks start the gathers)."""
    def per_chunk(name: str):
        hooks = [getattr(chunk, name) for chunk in model]
        return hooks if len(hooks) > 1 else hooks[0]

    tconfig.no_sync_func = per_chunk("no_sync")
    if par.overlap_grad_reduce:
        tconfig.grad_sync_func = per_chunk("start_grad_sync")
    if _align_param_gather(par):
        tconfig.param_sync_func = per_chunk("start_param_sync")


def _align_param_gather(par: ParallelConfig) -> bool:
    return par.overlap_param_gather and par.virtual_pipeline_model_parallel_size is not None


def finish_param_gather(model: List) -> None:
    """With --overlap-param-gather, bring every parameter up to date now (a synchronous
    all-gather of the distributed optimizer's updated shards): after ``optimizer.step()`` only
    this rank's shard of each parameter is updated until the next forward's pre-hooks gather
    the others, so a save or a validation in between would read partly stale weights. Megatron-LM
    forces the same gather before saving and before evaluating. A no-op without the flag."""
    for chunk in model:
        if getattr(chunk, "use_forward_hook", False):
            chunk.start_param_sync(force_sync=True)


def wrap_ddp(chunks: List[torch.nn.Module], tconfig, config: DialogTrainingConfig):
    """megatron-core DDP: sums gradients over data parallel (the loss divides once, globally),
    with --overlap-grad-reduce, --overlap-param-gather and --ddp-bucket-size as Megatron-LM
    passes them (``sync_functions`` gives the schedule its hooks)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    par = config.parallel
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=par.overlap_grad_reduce,
        bucket_size=par.ddp_bucket_size,
        use_distributed_optimizer=par.use_distributed_optimizer,
        overlap_param_gather=par.overlap_param_gather,
        align_param_gather=_align_param_gather(par),
        average_in_collective=False,
    )
    return [
        DistributedDataParallel(config=tconfig, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=index > 0)
        for index, chunk in enumerate(chunks)
    ]
