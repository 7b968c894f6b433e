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
    state = _model_state(model)
    if not finetune:
        _initialize_adam_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                          metadata=OPTIMIZER_METADATA)
        same_layout = list(common.get("layout", [])) == list(_layout())
        if same_layout:
            state["rng_state"] = _rng_object()
    loaded = dist_checkpointing.load(state, path)
    for key, chunk in zip(_model_keys(model), model):
        chunk.module.load_state_dict(loaded[key], strict=True)
    if finetune:
        return 0, 0
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(common["scheduler"])
    if "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    return int(common["iteration"]), int(common["consumed_samples"])


def load_weights_for_inference(root: str, model: List[torch.nn.Module],
                               iteration: Optional[int] = None) -> int:
    """Weights only, into unwrapped GPTModel chunk(s) (generation); returns the iteration."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    path = iteration_dir(root, iteration)
    keys = _model_keys(model)
    state = {key: chunk.sharded_state_dict() for key, chunk in zip(keys, model)}
    with warnings.catch_warnings():  # torch.distributed.checkpoint's deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        loaded = dist_checkpointing.load(state, path)
    for key, chunk in zip(keys, model):
        chunk.load_state_dict(loaded[key], strict=True)
    return iteration
