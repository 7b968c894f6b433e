"""FP8 training (``--fp8-format``, ``--fp8-recipe``) and tensor-parallel communication overlap
(``--tp-comm-overlap``): what they need, decided in one place, and what they set.

Both run inside Transformer Engine (TE): FP8 in TE's linear layers (megatron-core's
``TransformerBlock`` enters TE's ``fp8_autocast`` around the layers), the overlap in TE's
userbuffers. mt_dialog's loss is untouched by either: the output layer, the logits and the
per-token cross entropy stay outside the FP8 region (``training/loss.py`` computes in fp32).

``probe()`` reads the machine (TE version, CUDA devices, compute capability); ``check(config)``
refuses, with the flag, the value, why and the fix, what that machine or the config cannot run;
``transformer_config_settings`` gives megatron-core's ``TransformerConfig`` fields;
``initialize_tp_communicators`` allocates TE's userbuffers before the model is built (as
Megatron-LM's ``initialize.py`` does when ``--tp-comm-overlap`` is given).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

FP8_FORMATS = ("e4m3", "hybrid")
# megatron-core 0.16.1 ``Fp8Recipe`` without "custom" (it needs a quantizer factory module)
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")
FP8_AMAX_ALGOS = ("most_recent", "max")
# the compute capability each recipe needs: FP8 tensor cores arrive with Ada / Hopper (8.9);
# per-block scales with Hopper (9.0); MXFP8 with Blackwell (10.0)
RECIPE_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0),
                     "mxfp8": (10, 0)}
RECIPE_GPUS = {"delayed": "Ada, Hopper, Blackwell", "tensorwise": "Ada, Hopper, Blackwell",
               "blockwise": "Hopper, Blackwell", "mxfp8": "Blackwell"}
# the TE version megatron-core 0.16.1's ``get_fp8_recipe`` builds each recipe from
RECIPE_TE_VERSION = {"delayed": "1.0", "tensorwise": "2.2", "blockwise": "2.3", "mxfp8": "2.1"}
# TE's FP8 GEMMs take 2-D inputs whose sizes are multiples of 16 (TE ``assert_dim_for_fp8_exec``:
# rows by 8, columns by 16; the token dimension is the inner one of the weight-gradient GEMM);
# MXFP8 scales blocks of 32 values
FP8_MULTIPLE = {"mxfp8": 32}
FP8_DEFAULT_MULTIPLE = 16
# TE's initialize_ub takes bootstrap_backend (torch.distributed) from 1.9 on
UB_TE_VERSION = "1.9"


@dataclass(frozen=True)
class Capability:
    """What this machine offers FP8 and the userbuffers.

    Fields:
        te_version: transformer-engine's version, None when it does not import.
        te_error: why it does not import (None when it does).
        gpus: CUDA devices visible to this process (0 without CUDA).
        compute_capability: (major, minor) of the current CUDA device, None without CUDA.
        te_refusals: (recipe, reason) for each recipe TE's own support check refuses on this
            device (empty where TE or CUDA is absent, or TE has no such check).
    """

    te_version: Optional[str]
    te_error: Optional[str]
    gpus: int
    compute_capability: Optional[Tuple[int, int]]
    te_refusals: Tuple[Tuple[str, str], ...] = ()

    def describe(self) -> str:
        te = f"transformer-engine {self.te_version}" if self.te_version else (
            f"no transformer-engine ({self.te_error})")
        gpu = (f"{self.gpus} CUDA device(s), compute capability "
               f"{'.'.join(map(str, self.compute_capability))}" if self.gpus else "no CUDA GPU")
        return f"{te}, {gpu}"


def probe() -> Capability:
    """This process's ``Capability`` (imports TE; touches no GPU memory)."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    # the device this rank will use (distributed.initialize sets LOCAL_RANK's later); reading its
    # properties selects no device
    index = int(os.environ.get("LOCAL_RANK", "0")) % gpus if gpus else 0
    capability = tuple(torch.cuda.get_device_capability(index)) if gpus else None
    try:
        import transformer_engine
        from importlib import metadata

        version = getattr(transformer_engine, "__version__", None) or \
            metadata.version("transformer-engine")
        error = None
    except Exception as exc:  # ImportError, or OSError when a CUDA library is missing
        version, error = None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    refusals = _te_refusals() if version and gpus else ()
    return Capability(version, error, gpus, capability, refusals)


# TE's own checks of the device (``(supported, reason)``), by recipe; TE 2.x has them in
# transformer_engine.pytorch.fp8, later versions also in .quantization
TE_SUPPORT_CHECKS = {"delayed": "check_fp8_support", "tensorwise": "check_fp8_support",
                     "blockwise": "check_fp8_block_scaling_support",
                     "mxfp8": "check_mxfp8_support"}


def _te_refusals() -> Tuple[Tuple[str, str], ...]:
    import importlib

    refusals = []
    for recipe, name in TE_SUPPORT_CHECKS.items():
        for module in ("transformer_engine.pytorch.fp8", "transformer_engine.pytorch.quantization"):
            try:
                supported, reason = getattr(importlib.import_module(module), name)()
            except Exception:  # no such module / function in this TE version
                continue
            if not supported:
                refusals.append((recipe, str(reason)))
            break
    return tuple(refusals)


def _older(version: str, minimum: str) -> bool:
    from packaging.version import Version

    return Version(version).release < Version(minimum).release


def fp8_machine_problem(recipe: str, cap: Capability) -> Optional[str]:
    """Why ``cap`` cannot train with FP8 ``recipe``, or None."""
    need = RECIPE_CAPABILITY[recipe]
    if cap.te_version is None or not cap.gpus:
        return (f"FP8 needs Transformer Engine and a CUDA GPU of compute capability "
                f"{need[0]}.{need[1]} or more, but this machine has {cap.describe()}; run on "
                "such a GPU (pip install -e '.[gpu]'), or train with --bf16 alone")
    if tuple(cap.compute_capability) < need:
        have = ".".join(map(str, cap.compute_capability))
        other = (", or --fp8-recipe delayed (8.9+)" if tuple(cap.compute_capability) >= (8, 9)
                 else "")
        return (f"--fp8-recipe {recipe} needs a GPU of compute capability {need[0]}.{need[1]} "
                f"or more ({RECIPE_GPUS[recipe]}), this one has {have}; train with --bf16 "
                f"alone{other}")
    if _older(cap.te_version, RECIPE_TE_VERSION[recipe]):
        return (f"--fp8-recipe {recipe} needs transformer-engine {RECIPE_TE_VERSION[recipe]} "
                f"or newer (this is {cap.te_version}); upgrade it or use --fp8-recipe delayed")
    refused = dict(cap.te_refusals).get(recipe)
    if refused:
        return (f"transformer-engine {cap.te_version} refuses it on this GPU ({refused}); train "
                "with --bf16 alone" + ("" if recipe == "delayed" else " or another --fp8-recipe"))
    return None


def tp_comm_overlap_machine_problem(cap: Capability) -> Optional[str]:
    """Why ``cap`` cannot overlap tensor-parallel communication with GEMMs, or None."""
    if cap.te_version is None or not cap.gpus:
        return (f"the overlap runs in Transformer Engine's userbuffers on CUDA GPUs, but this "
                f"machine has {cap.describe()}; run on GPUs with transformer-engine, or drop "
                "--tp-comm-overlap")
    if _older(cap.te_version, UB_TE_VERSION):
        return (f"transformer-engine {cap.te_version} bootstraps its userbuffers with MPI only; "
                f"mt_dialog uses TE {UB_TE_VERSION}+'s torch.distributed bootstrap: upgrade "
                "transformer-engine or drop --tp-comm-overlap")
    return None


def check(config, seq_length: Optional[int] = None, capability: Optional[Capability] = None
          ) -> None:
    """Refuse --fp8-format / --tp-comm-overlap where they cannot run: the machine (``probe()``,
    or ``capability``), the layers, and the GEMM sizes (``seq_length``: tokens per pack, when
    known). Nothing is probed when neither flag is given.

    Raises:
        ValueError: ``field: flag value ... why; fix`` (one line).
    """
    optim, par = config.optim, config.parallel
    if not (optim.fp8_format or par.tp_comm_overlap):
        return
    cap = capability or probe()
    if optim.fp8_format:
        problem = fp8_machine_problem(optim.fp8_recipe, cap) or _fp8_model_problem(config)
        if problem:
            raise ValueError(f"fp8_format: --fp8-format {optim.fp8_format} --fp8-recipe "
                             f"{optim.fp8_recipe}: {problem}")
        problem = fp8_size_problem(config, seq_length)
        if problem:
            raise ValueError(f"fp8_format: {problem}")
    if par.tp_comm_overlap:
        problem = tp_comm_overlap_machine_problem(cap) or _overlap_model_problem(config, cap)
        if problem:
            raise ValueError(f"tp_comm_overlap: --tp-comm-overlap: {problem}")


def _fp8_model_problem(config) -> Optional[str]:
    """FP8 needs the TE layers; MoE experts would need megatron-core's router padding."""
    if config.model.transformer_impl == "local":
        return ("FP8 runs in Transformer Engine's layers, not megatron-core's local ones; use "
                "--transformer-impl transformer_engine (or auto)")
    if config.model.num_experts:
        return ("FP8 on Mixture-of-Experts layers needs each expert's token count padded to a "
                "multiple of 16 (megatron-core's --moe-router-padding-for-quantization, not "
                "wired in mt_dialog); train MoE models with --bf16")
    return None


def _overlap_model_problem(config, cap: Capability) -> Optional[str]:
    """The TE layers; no MLA; one micro-batch shape; ordered CUDA queues before Blackwell."""
    if config.model.transformer_impl == "local":
        return ("the overlap runs in Transformer Engine's layers, not megatron-core's local "
                "ones; use --transformer-impl transformer_engine (or auto)")
    if config.model.multi_latent_attention:
        return ("megatron-core 0.16.1 has no userbuffers for multi-latent attention's "
                "projections (it would switch the overlap off for the whole model); drop "
                "--tp-comm-overlap")
    mbs, train = config.data.micro_batch_size, config.train
    if mbs > 1 and (train.eval_interval or train.eval_iters):
        return (f"the userbuffers hold one micro-batch shape (--micro-batch-size {mbs} packs), "
                "but validation runs one pack per micro-batch; use --micro-batch-size 1 (more "
                "micro-batches per step give the same global batch) or no validation")
    # Megatron-LM's rule: before Blackwell (compute capability 10) the kernels of one GPU run in
    # the order they were queued only with one hardware queue
    if cap.compute_capability[0] < 10 and os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS") != "1":
        return ("on GPUs before Blackwell the overlap needs the GEMMs and the communication "
                "queued in order: export CUDA_DEVICE_MAX_CONNECTIONS=1 before launching (as "
                "Megatron-LM's examples do)")
    return None


def gemm_sizes(model, tp: int) -> Dict[str, int]:
    """The per-tensor-parallel-rank sizes of the weights TE runs in FP8 (name -> size)."""
    sizes = {"--hidden-size": model.hidden_size,
             "--ffn-hidden-size / TP": model.ffn_hidden_size // tp}
    if model.multi_latent_attention:
        heads = model.num_attention_heads // tp
        sizes.update({"--kv-lora-rank + --qk-pos-emb-head-dim":
                      model.kv_lora_rank + model.qk_pos_emb_head_dim,
                      "heads / TP x --v-head-dim": heads * model.v_head_dim,
                      "heads / TP x (--qk-head-dim + --qk-pos-emb-head-dim)":
                      heads * (model.qk_head_dim + model.qk_pos_emb_head_dim)})
        if model.q_lora_rank:
            sizes["--q-lora-rank"] = model.q_lora_rank
    else:
        sizes["heads / TP x head size"] = model.num_attention_heads // tp * model.kv_channels
        sizes["query groups / TP x head size"] = max(
            1, model.num_query_groups // tp) * model.kv_channels
    return sizes


def fp8_size_problem(config, seq_length: Optional[int]) -> Optional[str]:
    """A GEMM size FP8 cannot take (``seq_length``: tokens per pack; a training micro-batch has
    micro-batch size x that many, a validation micro-batch one pack), or None."""
    recipe = config.optim.fp8_recipe
    multiple = FP8_MULTIPLE.get(recipe, FP8_DEFAULT_MULTIPLE)
    if seq_length is not None and seq_length % multiple:
        fixed = -(-seq_length // multiple) * multiple
        return (f"FP8 GEMMs ({recipe}) need the tokens of every micro-batch to be a multiple of "
                f"{multiple}, but --seq-length is {seq_length} (a validation micro-batch is one "
                f"pack); rebuild the dataset with tools/preprocess_dialog.py --seq-length "
                f"{fixed}, or train with --bf16")
    bad = [f"{name} = {size}" for name, size in
           gemm_sizes(config.model, config.parallel.tensor_model_parallel_size).items()
           if size % multiple]
    if bad:
        return (f"FP8 GEMMs ({recipe}) need every weight size to be a multiple of {multiple}, "
                f"but {', '.join(bad)}; change those sizes or train with --bf16")
    return None


def transformer_config_settings(config) -> Dict[str, Any]:
    """megatron-core ``TransformerConfig`` fields: ``fp8`` (None: off), ``fp8_recipe``,
    ``fp8_margin``, ``fp8_amax_history_len``, ``fp8_amax_compute_algo``, ``tp_comm_overlap``."""
    optim = config.optim
    settings: Dict[str, Any] = {"tp_comm_overlap": config.parallel.tp_comm_overlap}
    if optim.fp8_format:
        settings.update(fp8=optim.fp8_format, fp8_recipe=optim.fp8_recipe,
                        fp8_margin=optim.fp8_margin,
                        fp8_amax_history_len=optim.fp8_amax_history_len,
                        fp8_amax_compute_algo=optim.fp8_amax_compute_algo)
    return settings


def userbuffer_shape(config, seq_length: int) -> List[int]:
    """[tokens of a training micro-batch, hidden size]: the whole (sequence-parallel gathered)
    activation a TE layer's userbuffers hold; packs of one micro-batch are flattened into one
    sequence of micro-batch size x ``seq_length`` tokens (``training/data.py``)."""
    return [config.data.micro_batch_size * seq_length, config.model.hidden_size]


def initialize_tp_communicators(config, seq_length: int, dtype) -> bool:
    """With ``--tp-comm-overlap``: TE's ``initialize_ub`` for ``userbuffer_shape`` (once per
    process, before the model is built; torch.distributed and megatron-core's groups must be up).
    Returns whether it ran (False without the flag: inert, e.g. on CPU)."""
    if not config.parallel.tp_comm_overlap:
        return False
    from transformer_engine.pytorch.module import base as te_base

    te_base.initialize_ub(shape=userbuffer_shape(config, seq_length),
                          tp_size=config.parallel.tensor_model_parallel_size,
                          use_fp8=config.optim.fp8_format is not None, dtype=dtype,
                          ub_cfgs={}, bootstrap_backend="nccl")
    return True
