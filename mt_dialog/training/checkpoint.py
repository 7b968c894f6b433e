"""Checkpoints with megatron-core ``dist_checkpointing``.

    SAVE/
      latest_checkpointed_iteration.txt      the newest complete iteration (written last)
      iter_0000200/                          a distributed checkpoint: model (sharded tensors),
                                             optimizer state, scheduler, iteration, consumed
                                             samples, per-rank RNG, the run's config
        mt_dialog_config.json

Model and optimizer tensors are saved as sharded tensors of the *global* parameters, so a
checkpoint saved at one tensor/pipeline layout loads at another. RNG states are per rank and are
restored only when the layout is the same (the run has no dropout, so they never change results).

The vocabulary rows are padded to a multiple of --make-vocab-size-divisible-by x TP, so their
count can differ between the checkpoint and the model loading it (another TP size, another
tokenizer extension, a Hugging Face import which keeps the original rows). Weights-only loads
(--finetune, generation, export) fit the rows::

    checkpoint rows  [ r0 r1 ... r(V-1) ]                       V rows
    model rows       [ r0 r1 ... r(V-1) | mean mean ... ]       more rows: new rows = mean row
    model rows       [ r0 r1 ... r(P-1) ]                       fewer rows: the extra rows (never
                                                                a token id of the model) dropped

A full resume needs the same padded vocabulary (the optimizer state has its shape).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

TRACKER = "latest_checkpointed_iteration.txt"
# The distributed optimizer's canonical (layout-independent) form, reshardable over TP, PP and DP;
# the memory-efficient variant gathers the state over the gloo groups in CPU memory (no GPU copy).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "fully_reshardable",
                      "distrib_optim_fully_reshardable_mem_efficient": True}


class CheckpointError(ValueError):
    """A checkpoint is missing or unusable; the message says what to do."""


def iteration_dir(root: str, iteration: int) -> str:
    """``root/iter_0000200``: the folder of ``iteration``'s checkpoint (Megatron-LM's name)."""
    return os.path.join(root, f"iter_{iteration:07d}")


def verified(path: str) -> str:
    """``path`` (an ``iter_*`` folder) once every pickle in it passed the allow-list of
    ``safe_pickle`` (nothing in it is run); call it on any folder before megatron-core reads it.

    Raises:
        UntrustedCheckpointError (a ValueError): naming the file, entry and global refused.
    """
    from mt_dialog.training.safe_pickle import check_checkpoint_folder

    if os.path.isdir(path):
        check_checkpoint_folder(path)
    return path


def latest_iteration(root: str) -> int:
    """The newest complete iteration under ``root``: the number its tracker file
    ``latest_checkpointed_iteration.txt`` holds (written last by ``save_checkpoint``; read and
    closed here).

    Raises:
        CheckpointError: no tracker file, or one that holds no iteration number.
    """
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"--load {root}: no {TRACKER}; is it a folder written by --save? "
                              "(a first launch may give the same folder to --load and --save)")
    with open(path, encoding="utf-8") as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise CheckpointError(f"--load {root}: {path} holds {text[:40]!r}, not an iteration "
                              "number; restore it or load another checkpoint")
    return int(text)


@dataclass(frozen=True)
class StartPoint:
    """Where a training run starts (``start_point``)."""

    path: Optional[str]
    """The checkpoint folder to load; None: from scratch."""
    weights_only: bool
    """Load the weights only and start at iteration 0 (--finetune, --pretrained-checkpoint)."""
    note: Optional[str] = None
    """A line for the log when the choice was not the obvious one."""


def start_point(train) -> StartPoint:
    """The checkpoint a run (``TrainConfig``) starts from:

    --load DIR holding a checkpoint        DIR (full resume; weights only with --finetune)
    --pretrained-checkpoint BASE, and no   BASE, weights only (Megatron-LM's way to make a
      checkpoint in --load (yet)             fine-tune relaunchable: --pretrained-checkpoint BASE
                                             --load DIR --save DIR on every launch)
    --load DIR = --save DIR, empty         from scratch (a restartable job's first launch)

    Raises:
        CheckpointError: any other --load without a checkpoint (a typo must not silently train
            from scratch).
    """
    if train.load and os.path.isfile(os.path.join(train.load, TRACKER)):
        return StartPoint(train.load, bool(train.finetune))
    if train.pretrained_checkpoint:
        latest_iteration(train.pretrained_checkpoint)  # raises with the reason
        note = (f"--load {train.load}: no checkpoint there yet; starting from the weights of "
                f"--pretrained-checkpoint {train.pretrained_checkpoint}") if train.load else None
        return StartPoint(train.pretrained_checkpoint, True, note)
    if not train.load:
        return StartPoint(None, False)
    same = train.save and os.path.abspath(train.save) == os.path.abspath(train.load)
    if same and not train.finetune:
        return StartPoint(None, False, f"--load {train.load}: no checkpoint there yet (it is "
                                       "the --save folder); starting from scratch")
    latest_iteration(train.load)  # raises with the reason
    return StartPoint(train.load, bool(train.finetune))


def is_weights_only(root: str) -> bool:
    """Whether the newest checkpoint under ``root`` holds weights only (hf-to-mcore's)."""
    from megatron.core import dist_checkpointing

    common = dist_checkpointing.load_common_state_dict(
        verified(iteration_dir(root, latest_iteration(root))))
    return bool(common.get("weights_only"))


def check_save_folder(train) -> None:
    """``--save DIR`` that already holds checkpoints is accepted only when this run continues
    them (``--load DIR``, not ``--finetune``): otherwise the two runs' iterations would mix and
    the tracker would jump back to the new run's.

    Raises:
        CheckpointError: naming the newest iteration there and both ways out.
    """
    if not train.save:
        return
    newest = _tracked_iteration(train.save)
    if newest is None:
        return
    same = train.load and os.path.abspath(train.load) == os.path.abspath(train.save)
    if not same or train.finetune:
        raise CheckpointError(
            f"--save {train.save} already holds checkpoints of a run (newest: iteration "
            f"{newest}); continue that run with --load {train.save} (without --finetune), or "
            "save this run to a new folder")


# ModelConfig fields that change the function a checkpoint computes: a load refuses another value
# of any, and --use-checkpoint-args takes them from the checkpoint
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                       "num_query_groups", "kv_channels", "add_qkv_bias",
                       "qk_layernorm", "untie_embeddings_and_output_weights", "rotary_base",
                       "norm_epsilon",
                       "use_rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                       "rope_scaling_high_freq_factor", "rope_scaling_original_max_position",
                       "rotary_seq_len_interpolation_factor",
                       "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
                       "moe_router_score_function", "moe_router_pre_softmax",
                       # MoE routing of the 2026 families (ModelConfig._check_moe_routing)
                       "moe_shared_expert_intermediate_size", "moe_shared_expert_gate",
                       "moe_router_enable_expert_bias",
                       "moe_router_num_groups", "moe_router_group_topk",
                       "moe_router_topk_scaling_factor", "moe_layer_freq", "add_bias_linear",
                       # attention variants (ModelConfig._check_attention)
                       "window_size", "window_attn_skip_freq", "softmax_type",
                       "multi_latent_attention", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
                       "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor",
                       "mscale", "mscale_all_dim", "beta_fast", "beta_slow",
                       "original_max_position_embeddings")
# block features (Gemma 3, gpt-oss, partial RoPE, YaRN)
ARCHITECTURE_FIELDS += ("apply_layernorm_1p", "sandwich_norm", "scale_embeddings", "openai_gelu",
                        "quick_geglu", "glu_linear_offset", "activation_func_clamp_value",
                        "softmax_scale", "rotary_percent", "rotary_base_local",
                        "position_embedding_type", "yarn_rotary_scaling_factor",
                        "yarn_original_max_position_embeddings", "yarn_beta_fast",
                        "yarn_beta_slow", "yarn_mscale", "yarn_mscale_all_dim",
                        "yarn_correction_range_round_to_int", "final_logit_softcapping")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def architecture_fields() -> Tuple[str, ...]:
    """``ARCHITECTURE_FIELDS`` and the fields the registered Hugging Face families set
    (``convert.families``: a family's ``model_fields``), in that order."""
    from mt_dialog.convert.families.registry import checkpoint_fields

    extra = [name for name in checkpoint_fields() if name not in ARCHITECTURE_FIELDS]
    return ARCHITECTURE_FIELDS + tuple(extra)


def saved_model_config(root: str) -> Dict[str, Any]:
    """The ``model`` section of the config saved with the newest checkpoint under ``root``."""
    return dict(saved_config(root)["model"])


def saved_config(root: str) -> Dict[str, Any]:
    """The run config (model, parallel, data, optim, train sections) saved with the newest
    checkpoint under ``root``. Raises CheckpointError when it cannot be read."""
    path = os.path.join(iteration_dir(root, latest_iteration(root)), "mt_dialog_config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["model"]  # noqa: B018 - every saved config has it
        return config
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"--load {root}: cannot read the model configuration {path} "
                              f"({exc}); is it a folder written by --save or "
                              "tools/convert_checkpoint.py?") from None


def check_model_matches(root: str, model_config) -> None:
    """Refuse to load a checkpoint of another architecture (``architecture_fields``; derived
    sizes compared as derived, so an older checkpoint's saved null equals its value).

    Raises:
        CheckpointError: naming the first differing flag, both values and the fix.
    """
    import dataclasses

    from mt_dialog.training.config import ModelConfig

    saved = saved_model_config(root)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    stored = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    for name in architecture_fields():
        theirs, ours = getattr(stored, name), getattr(model_config, name)
        if theirs != ours:
            raise CheckpointError(
                f"--load {root}: the checkpoint has {name} = {theirs} but this run has "
                f"{ours}; pass --{name.replace('_', '-')} (and the checkpoint's other "
                "model flags) or --use-checkpoint-args")


def check_resume_matches(root: str, config) -> None:
    """A full resume (not --finetune) needs the optimizer state the run would save: the same
    precision and the same optimizer kind as the checkpoint (Megatron-LM fails deep inside the
    load otherwise). Converted checkpoints hold weights only and are left to ``load_checkpoint``.

    Raises:
        CheckpointError: naming the flag that differs and the fix.
    """
    saved = saved_config(root)
    optim, parallel = saved.get("optim") or {}, saved.get("parallel") or {}
    if not optim:  # hf-to-mcore: weights only
        return
    ours = {"--bf16": config.optim.bf16, "--fp16": config.optim.fp16,
            "--use-distributed-optimizer": config.parallel.use_distributed_optimizer}
    theirs = {"--bf16": bool(optim.get("bf16")), "--fp16": bool(optim.get("fp16")),
              "--use-distributed-optimizer": bool(parallel.get("use_distributed_optimizer"))}
    for flag, value in ours.items():
        if value != theirs[flag]:
            given = "with" if theirs[flag] else "without"
            raise CheckpointError(
                f"--load {root}: the checkpoint was saved {given} {flag} and its optimizer "
                f"state has that form; resume {given} {flag}, or start from its weights with "
                "--finetune")
    # megatron-core 0.16.1 groups a MoE model's optimizer state by expert-parallel layout and
    # cannot regroup it ("Different dict keys encountered in apply_factory_merges")
    saved_ep = int(parallel.get("expert_model_parallel_size") or 1)
    ours_ep = config.parallel.expert_model_parallel_size
    if config.model.num_experts and saved_ep != ours_ep:
        raise CheckpointError(
            f"--load {root}: the checkpoint's optimizer state was saved at "
            f"--expert-model-parallel-size {saved_ep}, this run has {ours_ep}; resume at "
            f"{saved_ep}, or start from its weights (any layout) with --finetune")


def checkpoint_args(root: str) -> Dict[str, Any]:
    """Model flags of the newest checkpoint under ``root`` (--use-checkpoint-args): its
    ``architecture_fields()`` as saved (None, in an older checkpoint, for a derived size).

    Raises:
        CheckpointError: no checkpoint, or its config cannot be read.
    """
    saved = saved_model_config(root)
    return {name: saved[name] for name in architecture_fields() if name in saved}


def _layout() -> Tuple[int, ...]:
    """(PP, TP, DP), and CP when above 1: the grid of per-rank RNG states."""
    from megatron.core import parallel_state as ps

    cp = ps.get_context_parallel_world_size()
    return (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size()) + ((cp,) if cp > 1 else ())


def _rng_object():
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    offset = (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
              ps.get_data_parallel_rank())
    if ps.get_context_parallel_world_size() > 1:
        offset += (ps.get_context_parallel_rank(),)
    return ShardedObject("rng_state", state, _layout(), offset, replica_id=0)


def _rng_device() -> str:
    """Where the model-parallel RNG tracker's generators live: 'cuda', or 'cpu' (CPU shims)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rng_restorable(common: Dict[str, Any]) -> bool:
    """RNG states are per rank: restored only at the same layout, and only on the device kind
    that saved them (a CPU generator state in the CUDA RNG tracker, which TE forks on every
    attention call, would be wrong). They never change results here (no dropout)."""
    saved_device = common.get("rng_device", "cpu")  # older checkpoints: written on CPU
    return (list(common.get("layout", [])) == list(_layout())
            and saved_device == _rng_device())


def _restore_rng(state: Dict[str, Any]) -> None:
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def _model_keys(model: List[torch.nn.Module]) -> List[str]:
    """Checkpoint key of each model chunk, in chunk order (megatron-LM's convention)."""
    return ["model"] if len(model) == 1 else [f"model{i}" for i in range(len(model))]


Select = Optional[Callable[[str], bool]]  # which model entries a save / load covers (None: all)


def _selected(state: Dict[str, Any], select: Select) -> Dict[str, Any]:
    return state if select is None else {k: v for k, v in state.items() if select(k)}


def _model_state(model: List[torch.nn.Module], select: Select = None) -> Dict[str, Any]:
    """Each chunk's sharded state dict (``model``: DDP-wrapped or bare chunks), keeping the
    entries ``select`` accepts (LoRA: the adapters, or the base)."""
    return {key: _selected(getattr(chunk, "module", chunk).sharded_state_dict(), select)
            for key, chunk in zip(_model_keys(model), model)}


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model, optimizer,
                    scheduler, config_dict: Dict[str, Any], select: Select = None,
                    common: Optional[Dict[str, Any]] = None,
                    record: Optional[Dict[str, Any]] = None) -> str:
    """Save everything needed to resume into ``root/iter_N``; returns that folder. Every rank
    calls it with its ``model`` chunks (DDP-wrapped), ``optimizer`` and ``scheduler``;
    ``consumed_samples`` is the packs read so far, ``config_dict`` the run config (``to_dict``)
    written beside as ``mt_dialog_config.json``. ``select`` keeps only some model entries (LoRA:
    the adapters; the optimizer holds only those); ``common`` adds entries to the common state
    (LoRA: ``lora_base``, the pointer to the base checkpoint); ``record`` the run record
    (``saved_run.run_record``) written as ``iter_N/run.json``, which chat and export read first.

    The tracker file (what ``--load`` reads) is replaced atomically by rank 0 only after every
    rank wrote its part, so a checkpoint becomes visible to ``--load`` only when complete. When
    any rank fails (disk full, a lost file system...), every rank learns it, the partial folder is
    removed and the previous checkpoint stays the one ``--load`` finds.

    Raises:
        CheckpointError: on every rank, with the first failure's reason and what to do.
    """
    path = iteration_dir(root, iteration)
    previous = _tracked_iteration(root)
    rank = torch.distributed.get_rank()
    steps = (  # (ranks that run it, step); every rank agrees on the outcome after each
        (rank == 0, lambda: os.makedirs(path, exist_ok=True)),
        (True, lambda: _save_state(path, iteration, consumed_samples, model, optimizer,
                                   scheduler, select, common)),
        (rank == 0, lambda: _publish_checkpoint(root, path, iteration, config_dict, record)),
    )
    for runs_here, step in steps:
        reason = _agree_on_failure(_attempt(step) if runs_here else None)
        if reason is not None:
            break
    else:
        return path
    if rank == 0 and previous != iteration:
        shutil.rmtree(path, ignore_errors=True)
    kept = (f"the previous checkpoint (iteration {previous}) is untouched and --load {root} "
            "resumes from it" if previous is not None else "no checkpoint was written before")
    raise CheckpointError(f"saving iteration {iteration} to {root} failed ({reason}); {kept}; "
                          "free space or fix the folder, then resume")


def _save_state(path, iteration, consumed_samples, model, optimizer, scheduler, select=None,
                common=None) -> None:
    from megatron.core import dist_checkpointing

    state = _model_state(model, select)
    state.update(common or {})
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state.update(scheduler=scheduler.state_dict(), iteration=iteration,
                 consumed_samples=consumed_samples, layout=list(_layout()),
                 rng_device=_rng_device(), rng_state=_rng_object())
    dist_checkpointing.save(state, path)


def _publish_checkpoint(root: str, path: str, iteration: int, config_dict: Dict[str, Any],
                        record: Optional[Dict[str, Any]]) -> None:
    """Rank 0, after every rank saved: the run config and run record, then the tracker (each
    replaced atomically: ``files.write_json_atomic``)."""
    from mt_dialog.files import remove_gone, temp_path, write_json_atomic
    from mt_dialog.training.saved_run import ITERATION_RECORD

    write_json_atomic(os.path.join(path, "mt_dialog_config.json"), config_dict)
    if record is not None:
        write_json_atomic(os.path.join(path, ITERATION_RECORD), record)
    tracker = os.path.join(root, TRACKER)
    remove_gone(tracker)
    tmp = temp_path(tracker)
    with open(tmp, "w") as handle:
        handle.write(str(iteration))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, tracker)


def _attempt(step) -> Optional[str]:
    """Run ``step``; the failure as one line (None when it succeeded)."""
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        step()
    except (Exception, CheckpointException) as exc:  # every failure must reach every rank
        return _one_line(exc)
    return None


def _one_line(exc: BaseException) -> str:
    """The useful line of an exception; for a checkpoint write failure, the root cause that
    megatron-core and torch bury in a multi-line CheckpointException (e.g. 'No space left')."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    causes = [line for line in lines if line.startswith(("OSError", "RuntimeError: Worker"))
              or "Errno" in line]
    return f"{type(exc).__name__}: {(causes or lines or [''])[-1]}"


def _agree_on_failure(failure: Optional[str]) -> Optional[str]:
    """Every rank's verdict, gathered: the most telling failure of any rank (the root cause, e.g.
    'No space left on device', rather than a rank's 'CheckpointException ranks: ...'), the same
    on every rank; None when every rank succeeded."""
    reasons: List[Optional[str]] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(reasons, failure)
    failures = [reason for reason in reasons if reason]
    if not failures:
        return None
    telling = [reason for reason in failures if "Errno" in reason or "Error:" in reason]
    return (telling or failures)[0]


def _tracked_iteration(root: str) -> Optional[int]:
    try:
        return latest_iteration(root)
    except CheckpointError:
        return None


def load_checkpoint(root: str, model, optimizer=None, scheduler=None,
                    finetune: bool = False, iteration: Optional[int] = None,
                    select: Select = None) -> Tuple[int, int]:
    """Load the newest checkpoint under ``root`` into the DDP-wrapped ``model`` chunks (this
    rank's, any TP/PP layout: tensors are resharded), its ``optimizer`` (megatron-core's) and
    LR ``scheduler``, and the RNG states where they were saved (``_rng_restorable``).

    Returns ``(iteration, consumed_samples)``: the optimizer steps done and the packs read (the
    next sample index). With ``finetune`` only the weights are read (vocabulary rows fitted),
    ``(0, 0)`` is returned and, when an ``optimizer`` exists, its fp32 main parameters are
    reloaded from the new weights (Megatron-LM's ``reload_model_params``: mixed-precision and
    distributed optimizers copy the model parameters when they are built, and their first
    ``step()`` would otherwise copy the stale copies back over the loaded weights).

    Raises:
    ``iteration`` picks another than the newest; ``select`` loads only the model entries it
    accepts (LoRA: the base from one checkpoint, the adapters from another).

    Raises:
        CheckpointError: no complete checkpoint, weights-only checkpoint without ``finetune``,
            another padded vocabulary on a full resume, tensors missing from the checkpoint.
    """
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, latest_iteration(root) if iteration is None else iteration)
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {root}: {path} is missing")
    common = dist_checkpointing.load_common_state_dict(verified(path))
    if not finetune and common.get("weights_only"):
        raise CheckpointError(f"--load {root}: the checkpoint holds weights only (converted "
                              "from Hugging Face, or exported); add --finetune to start from it")
    state = _model_state(model, select)
    fitted = _fit_vocabulary(state, path) if finetune else []
    if not finetune:
        from mt_dialog.training.optimizer import prepare_adam_state_for_loading

        _refuse_vocabulary_change(state, path, root)
        prepare_adam_state_for_loading(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=OPTIMIZER_METADATA)
        if _rng_restorable(common):
            state["rng_state"] = _rng_object()
    loaded = _load_model_states(state, path, root, [chunk.module for chunk in model],
                                validate=not fitted, fitted=fitted, select=select)
    if finetune:
        if optimizer is not None:
            optimizer.reload_model_params()
        return 0, 0
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return int(common["iteration"]), int(common["consumed_samples"])


def _is_extra_state(key: str) -> bool:
    """Transformer Engine modules' ``_extra_state`` (fp8 metadata; dist-checkpoint keys look like
    ``decoder.final_layernorm._extra_state/shard_0_1``): present with TE, absent without."""
    return key.split("/")[0].endswith("_extra_state")


def _absent_message(root: str, path: str, keys: List[str]) -> str:
    shown = ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")
    if all(key.startswith("optimizer.") for key in keys):
        return (f"--load {root}: {path} has no optimizer state of this run's kind ({shown}): "
                "it was saved with another precision or optimizer (--bf16 / --fp16 / "
                "--use-distributed-optimizer); resume with the flags it was saved with, or start "
                "from its weights with --finetune")
    return (f"--load {root}: {path} lacks {len(keys)} tensors this model needs ({shown}); is it "
            "a checkpoint of this model? (--use-checkpoint-args takes its model flags)")


def _load_model_states(state: Dict[str, Any], path: str, root: str,
                       modules: List[torch.nn.Module], validate: bool,
                       fitted=(), select: Select = None) -> Dict[str, Any]:
    """``dist_checkpointing.load`` of ``state``, then each model chunk's tensors into
    ``modules`` (in ``_model_keys`` order); returns the loaded dict.

    Every real tensor is strict. ``_extra_state`` entries may be missing on either side: megatron
    uses TE modules (which have them) wherever TE imports, even for the final norm of the local
    spec, so a checkpoint written without TE must load with TE and the other way round."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    with warnings.catch_warnings():  # torch.distributed.checkpoint's deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        loaded, _, absent = dist_checkpointing.load(
            state, verified(path), validate_access_integrity=validate,
            strict=StrictHandling.RETURN_UNEXPECTED)
    real = sorted(key for key in absent if not _is_extra_state(key))
    if real:
        raise CheckpointError(_absent_message(root, path, real))
    _fitted_rows(loaded, fitted)
    for key, module in zip(_model_keys(modules), modules):
        result = module.load_state_dict(loaded[key], strict=False)
        wrong = [k for k in (*result.missing_keys, *result.unexpected_keys)
                 if not _is_extra_state(k) and (select is None or select(k))]
        if wrong:
            raise CheckpointError(f"--load {root}: tensors of {path} do not match the model: "
                                  f"{', '.join(wrong[:4])}")
    return loaded


def stored_vocab_rows(path: str) -> Optional[int]:
    """Rows of the word embedding (or, untied, the output layer) stored in the checkpoint folder
    ``path`` (an ``iter_*`` folder); None when it holds neither. Reads the metadata only;
    megatron-core's errors on an unreadable folder pass through."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(verified(path))
    for key in VOCAB_KEYS:
        if key in meta:
            return int(meta[key].global_shape[0])
    return None


def _vocab_mismatches(state: Dict[str, Any], path: str):
    """(chunk key, name, ShardedTensor to load, stored metadata) of every vocabulary-sized
    tensor of ``state`` whose row count differs from the checkpoint's at ``path``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(verified(path))
    for chunk_key, chunk_state in list(state.items()):
        if not isinstance(chunk_state, dict):
            continue
        for name, target in list(chunk_state.items()):
            if not (isinstance(target, ShardedTensor) and target.key in VOCAB_KEYS):
                continue
            stored = meta.get(target.key)
            if stored is not None and stored.global_shape[0] != target.global_shape[0]:
                yield chunk_key, name, target, stored


def _fit_vocabulary(state: Dict[str, Any], path: str) -> List[Tuple[str, str, Any]]:
    """Swap vocabulary tensors whose row count differs from the checkpoint's for a full
    (unsharded) read of the stored tensor; returns what ``_fitted_rows`` must cut back."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    fitted = []
    for chunk_key, name, target, stored in _vocab_mismatches(state, path):
        full = torch.empty(tuple(stored.global_shape), dtype=target.data.dtype)
        state[chunk_key][name] = ShardedTensor.from_rank_offsets(target.key, full)
        fitted.append((chunk_key, name, target))
    return fitted


def _fitted_rows(loaded: Dict[str, Any], fitted) -> None:
    """Cut this rank's rows out of each full stored tensor, padded with the mean row."""
    for chunk_key, name, target in fitted:
        stored = loaded[chunk_key][name]
        rows = target.global_shape[0]
        if rows > stored.shape[0]:
            extra = stored.float().mean(dim=0, keepdim=True).to(stored.dtype)
            stored = torch.cat([stored, extra.expand(rows - stored.shape[0], -1)])
        start = target.global_offset[0]
        local = stored[start: start + target.local_shape[0]]
        loaded[chunk_key][name] = local.to(target.data.device).contiguous()


def _refuse_vocabulary_change(state: Dict[str, Any], path: str, root: str) -> None:
    for _, _, target, stored in _vocab_mismatches(state, path):
        raise CheckpointError(
            f"--load {root}: the checkpoint's vocabulary has {stored.global_shape[0]} rows "
            f"but this run's has {target.global_shape[0]} (the vocabulary is padded to a "
            "multiple of --make-vocab-size-divisible-by x tensor-parallel size); resume "
            "with a --make-vocab-size-divisible-by that gives the same rows, or start a new "
            "run from its weights with --finetune")


def load_weights_for_inference(root: str, model: List[torch.nn.Module],
                               iteration: Optional[int] = None, select: Select = None) -> int:
    """Weights only, into unwrapped GPTModel chunk(s) (generation, export); returns the
    iteration. Vocabulary rows are fitted and ``_extra_state`` tolerated as in
    ``load_checkpoint``. A LoRA checkpoint loads its base checkpoint first, then its adapters
    (``lora_checkpoint.load_lora_weights``; the model must have adapters).

    Raises:
        CheckpointError: no complete checkpoint, or tensors missing from it.
    """
    from mt_dialog.training import lora_checkpoint

    iteration = latest_iteration(root) if iteration is None else iteration
    path = iteration_dir(root, iteration)
    if select is None and lora_checkpoint.base_pointer_of(root, iteration):
        return lora_checkpoint.load_lora_weights(root, model, iteration)
    state = _model_state(model, select)
    fitted = _fit_vocabulary(state, path)
    _load_model_states(state, path, root, model, validate=not fitted, fitted=fitted,
                       select=select)
    return iteration
