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
import warnings
from typing import Any, Dict, List, Optional, Tuple

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
    return os.path.join(root, f"iter_{iteration:07d}")


def latest_iteration(root: str) -> int:
    path = os.path.join(root, TRACKER)
    if not os.path.isfile(path):
        raise CheckpointError(f"--load {root}: no {TRACKER}; is it a folder written by --save?")
    return int(open(path).read().strip())


# ModelConfig fields that change the function a checkpoint computes
ARCHITECTURE_FIELDS = ("num_layers", "hidden_size", "ffn_size", "num_attention_heads",
                       "query_groups", "head_size", "add_qkv_bias",
                       "untie_embeddings_and_output_weights", "rotary_base", "norm_epsilon",
                       "use_rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                       "rope_scaling_high_freq_factor", "rope_scaling_original_max_position",
                       "rotary_seq_len_interpolation_factor")
# the fields --use-checkpoint-args takes from the checkpoint (the dataclass fields behind the above)
CHECKPOINT_ARGS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                   "num_query_groups", "kv_channels", "add_qkv_bias",
                   "untie_embeddings_and_output_weights", "rotary_base", "norm_epsilon",
                   "use_rope_scaling", "rope_scaling_factor", "rope_scaling_low_freq_factor",
                   "rope_scaling_high_freq_factor", "rope_scaling_original_max_position",
                   "rotary_seq_len_interpolation_factor")
VOCAB_KEYS = ("embedding.word_embeddings.weight", "output_layer.weight")


def saved_model_config(root: str) -> Dict[str, Any]:
    """The ``model`` section of the config saved with the newest checkpoint under ``root``."""
    path = os.path.join(iteration_dir(root, latest_iteration(root)), "mt_dialog_config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return dict(json.load(handle)["model"])
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"--load {root}: cannot read the model configuration {path} "
                              f"({exc}); is it a folder written by --save or "
                              "tools/convert_checkpoint.py?") from None


def _architecture(model_config) -> Dict[str, Any]:
    values = {name: getattr(model_config, name, None) for name in ARCHITECTURE_FIELDS
              if name != "head_size"}
    values["head_size"] = (model_config.kv_channels
                           or model_config.hidden_size // model_config.num_attention_heads)
    return values


def check_model_matches(root: str, model_config) -> None:
    """Refuse to load a checkpoint of another architecture, naming the first differing flag."""
    import dataclasses

    from mt_dialog.training.config import ModelConfig

    saved = saved_model_config(root)
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    stored = ModelConfig(**{k: v for k, v in saved.items() if k in names})
    theirs, ours = _architecture(stored), _architecture(model_config)
    for name in ARCHITECTURE_FIELDS:
        if theirs[name] != ours[name]:
            flag = {"ffn_size": "ffn_hidden_size", "query_groups": "num_query_groups",
                    "head_size": "kv_channels"}.get(name, name)
            raise CheckpointError(
                f"--load {root}: the checkpoint has {name} = {theirs[name]} but this run has "
                f"{ours[name]}; pass --{flag.replace('_', '-')} (and the checkpoint's other "
                "model flags) or --use-checkpoint-args")


def source_info(root: str) -> Dict[str, Any]:
    """What ``CKPT/config.json`` says about the Hugging Face model the run descends from
    (architecture, vocabulary rows, max positions...; written by hf-to-mcore and carried on by
    every run that loads it); empty when there is none."""
    try:
        with open(os.path.join(root, "config.json"), encoding="utf-8") as handle:
            return dict(json.load(handle).get("source") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def checkpoint_args(root: str) -> Dict[str, Any]:
    """Model flags of the checkpoint (--use-checkpoint-args)."""
    saved = saved_model_config(root)
    return {name: saved[name] for name in CHECKPOINT_ARGS if name in saved}


def _layout() -> Tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size(),
            ps.get_data_parallel_world_size())


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
    return ShardedObject("rng_state", state, _layout(), offset, replica_id=0)


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


def _model_state(model: List[torch.nn.Module]) -> Dict[str, Any]:
    return {key: chunk.module.sharded_state_dict()
            for key, chunk in zip(_model_keys(model), model)}


def save_checkpoint(root: str, iteration: int, consumed_samples: int, model, optimizer,
                    scheduler, config_dict: Dict[str, Any]) -> str:
    """Save everything needed to resume; returns the iteration folder."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, iteration)
    rank = torch.distributed.get_rank()
    if rank == 0:
        os.makedirs(path, exist_ok=True)
    torch.distributed.barrier()
    state = _model_state(model)
    state["optimizer"] = optimizer.sharded_state_dict(state, metadata=OPTIMIZER_METADATA)
    state.update(scheduler=scheduler.state_dict(), iteration=iteration,
                 consumed_samples=consumed_samples, layout=list(_layout()),
                 rng_state=_rng_object())
    dist_checkpointing.save(state, path)
    if rank == 0:
        with open(os.path.join(path, "mt_dialog_config.json"), "w") as handle:
            json.dump(config_dict, handle, indent=2)
        tmp = os.path.join(root, TRACKER + ".tmp")
        with open(tmp, "w") as handle:
            handle.write(str(iteration))
        os.replace(tmp, os.path.join(root, TRACKER))
    torch.distributed.barrier()
    return path


def _initialize_adam_state(optimizer) -> None:
    """Give every parameter an (empty) Adam state with a ``step`` before loading into it.

    megatron-core 0.16.1's distributed optimizer reads ``step`` from every parameter state when
    building the state dict to load into; with torch's Adam (no apex/TE) its own state
    initializer creates ``exp_avg``/``exp_avg_sq`` but no ``step``, so a fresh optimizer fails.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(param.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param.data))


def load_checkpoint(root: str, model, optimizer=None, scheduler=None,
                    finetune: bool = False) -> Tuple[int, int]:
    """Load the newest checkpoint under ``root``. Returns ``(iteration, consumed_samples)``;
    with ``finetune`` only the weights are read and ``(0, 0)`` is returned."""
    from megatron.core import dist_checkpointing

    path = iteration_dir(root, latest_iteration(root))
    if not os.path.isdir(path):
        raise CheckpointError(f"--load {root}: {path} is missing")
    common = dist_checkpointing.load_common_state_dict(path)
    if not finetune and common.get("weights_only"):
        raise CheckpointError(f"--load {root}: the checkpoint holds weights only (converted "
                              "from Hugging Face, or exported); add --finetune to start from it")
    state = _model_state(model)
    fitted = _fit_vocabulary(state, path) if finetune else []
    if not finetune:
        _refuse_vocabulary_change(state, path, root)
    if not finetune:
        _initialize_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=OPTIMIZER_METADATA)
        same_layout = list(common.get("layout", [])) == list(_layout())
        if same_layout:
            state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, path, validate_access_integrity=not fitted)
    _fitted_rows(loaded, fitted)
    for key, chunk in zip(_model_keys(model), model):
        chunk.module.load_state_dict(loaded[key], strict=True)
    if finetune:
        return 0, 0
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return int(common["iteration"]), int(common["consumed_samples"])


def stored_vocab_rows(path: str) -> Optional[int]:
    """Rows of the word embedding in the checkpoint folder ``path`` (an ``iter_*`` folder)."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(path)
    for key in VOCAB_KEYS:
        if key in meta:
            return int(meta[key].global_shape[0])
    return None


def _vocab_mismatches(state: Dict[str, Any], path: str):
    """(chunk key, name, ShardedTensor to load, stored metadata) of every vocabulary-sized
    tensor of ``state`` whose row count differs from the checkpoint's at ``path``."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    meta = dist_checkpointing.load_tensors_metadata(path)
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
                               iteration: Optional[int] = None) -> int:
    """Weights only, into unwrapped GPTModel chunk(s) (generation); returns the iteration."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    path = iteration_dir(root, iteration)
    keys = _model_keys(model)
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(keys, model)}
    fitted = _fit_vocabulary(state, path)
    with warnings.catch_warnings():  # torch.distributed.checkpoint's deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        loaded = dist_checkpointing.load(state, path, validate_access_integrity=not fitted)
    _fitted_rows(loaded, fitted)
    for key, chunk in zip(keys, model):
        chunk.load_state_dict(loaded[key], strict=True)
    return iteration
