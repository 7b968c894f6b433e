"""Device, backend and parallel groups, chosen in one place: ``initialize`` / ``destroy`` for a
training run (torchrun's ranks), ``initialize_single_process`` / ``destroy_single_process`` for a
checkpoint loaded into one process (generation, conversion).

    CUDA available  -> NCCL, one GPU per process (LOCAL_RANK), no shims
    otherwise       -> gloo on CPU, with mt_dialog.training.cpu_shims (megatron-core's CUDA-only
                       calls redirected to the CPU)

Parallel groups for world size 8, TP=2, PP=2 (megatron-core's default order tp-cp-ep-dp-pp;
context-parallel ranks come right after the tensor-parallel ones)::

    ranks   0 1 | 2 3   stage 0          TP groups: {0,1} {2,3} {4,5} {6,7}
            4 5 | 6 7   stage 1          DP groups: {0,2} {1,3} {4,6} {5,7}
                                         PP groups: {0,4} {1,5} {2,6} {3,7}
"""

from __future__ import annotations

import datetime
import os
import warnings

import torch


def device() -> torch.device:
    """The device this process computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def quiet_megatron_import_warnings() -> None:
    """megatron-core warns at import that TE/apex are absent; that is the expected CPU set-up."""
    for message in (".*Transformer Engine and Apex.*", "Apex is not installed.*",
                    "full scope is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", message=".*torch.jit.script_method.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="megatron")


def initialize(tensor_parallel: int, pipeline_parallel: int, virtual_pipeline: int = None,
               seed: int = 1234, expert_parallel: int = 1, context_parallel: int = 1) -> None:
    """Start torch.distributed (from torchrun's environment, or as a single process) and
    megatron-core's parallel groups (``expert_parallel``: ranks the experts of a MoE layer are
    split over, within data parallel; ``context_parallel``: ranks each sequence is split
    over); seed every generator."""
    quiet_megatron_import_warnings()
    from megatron.core import parallel_state

    cuda = torch.cuda.is_available()
    from mt_dialog.training.cpu_shims import apply_cpu_shims, define_missing_te_names

    define_missing_te_names()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    else:
        apply_cpu_shims()
        torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        torch.distributed.init_process_group(
            backend="nccl" if cuda else "gloo",
            rank=int(os.environ.get("RANK", "0")),
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            timeout=datetime.timedelta(minutes=10),
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline,
        expert_model_parallel_size=expert_parallel,
        context_parallel_size=context_parallel,
    )
    seed_everything(seed)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy, torch and megatron-core's model-parallel RNG tracker with ``seed``
    offset by ``100 x pipeline rank`` (Megatron-LM's rule: stages that build their layers from
    the same seed would start with identical layers)."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel as mcore_tp

    seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    mcore_tp.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tear down megatron-core's groups and the process group (the end of a training run)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# what initialize_single_process set up itself: destroy_single_process tears down only that
_SINGLE_PROCESS_OWNS = {"process_group": False, "model_parallel": False}


def initialize_single_process(seed: int = 1234) -> None:
    """torch.distributed with one rank and megatron-core groups of size 1 in this process, for a
    model loaded outside training (generation, conversion, checks). Idempotent; groups of
    another layout (a process that trained at TP=2) are rebuilt at TP = PP = 1.

    Raises:
        ValueError: this process is one rank of several (launched by torchrun).
    """
    from megatron.core import parallel_state as ps

    quiet_megatron_import_warnings()
    if torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world != 1:
            raise ValueError(f"a checkpoint is loaded into one process here; this one is part "
                             f"of a world of {world} (run it without torchrun)")
        if ps.model_parallel_is_initialized():
            if (ps.get_tensor_model_parallel_world_size() == 1
                    and ps.get_pipeline_model_parallel_world_size() == 1):
                return
            ps.destroy_model_parallel()
    else:
        # one rank, whatever a surrounding launcher put in the environment
        torch.distributed.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            store=torch.distributed.HashStore(), rank=0, world_size=1)
        _SINGLE_PROCESS_OWNS["process_group"] = True
    initialize(1, 1, None, seed)
    _SINGLE_PROCESS_OWNS["model_parallel"] = True


def destroy_single_process() -> None:
    """Tear down what ``initialize_single_process`` set up (for a process that goes on to train
    or to build another layout); a loaded model used again afterwards sets it up again."""
    from megatron.core import parallel_state as ps

    if _SINGLE_PROCESS_OWNS["model_parallel"] and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _SINGLE_PROCESS_OWNS["process_group"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _SINGLE_PROCESS_OWNS.update(process_group=False, model_parallel=False)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def is_logging_rank() -> bool:
    """The one rank that prints: the last one (it holds the loss on the last pipeline stage)."""
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


def log(message: str) -> None:
    if is_logging_rank():
        print(message, flush=True)
