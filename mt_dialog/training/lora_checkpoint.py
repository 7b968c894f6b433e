"""LoRA checkpoints: the adapters (and their optimizer state) plus a pointer to the base.

    SAVE/iter_0000200/       dist_checkpointing: only the ``...lora.A`` / ``...lora.B`` tensors
                             (sharded like any weight: a TP=2 save loads at PP=2), the optimizer
                             state of those, scheduler, RNG, and in the common state
                             ``lora_base = {"path", "iteration", "fingerprint"}``

The base is the checkpoint the LoRA run started from (``--load BASE --finetune`` or
``--pretrained-checkpoint BASE``; a LoRA checkpoint started from passes its own base on). Every
load (resume, chat, export) reads the base weights from ``path`` at ``iteration`` after checking
its ``fingerprint``, then the adapters from the LoRA checkpoint.

The fingerprint is a sha256 over the base iteration folder's files (sorted): name, size, and the
content of each file up to 1 MiB, else its first and last MiB (the tensors' bytes). It is cheap
for a 70B base (no full read) and catches a base that was retrained, re-saved or replaced.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Dict, List, Optional, Tuple

from mt_dialog.training.checkpoint import (
    CheckpointError,
    StartPoint,
    iteration_dir,
    latest_iteration,
    load_checkpoint,
    load_weights_for_inference,
)
from mt_dialog.training.lora import is_adapter_key

_MIB = 1 << 20


def is_base_key(key: str) -> bool:
    return not is_adapter_key(key)


def fingerprint(path: str) -> str:
    """sha256 (hex) of the checkpoint folder ``path`` (module docstring)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            size = os.path.getsize(full)
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode())
            with open(full, "rb") as handle:
                if size <= 2 * _MIB:
                    digest.update(handle.read())
                else:
                    digest.update(handle.read(_MIB))
                    handle.seek(size - _MIB)
                    digest.update(handle.read(_MIB))
    return digest.hexdigest()


def base_pointer(root: str, iteration: Optional[int] = None) -> Dict[str, Any]:
    """``{"path", "iteration", "fingerprint"}`` of the checkpoint ``root`` (newest iteration by
    default), the path absolute."""
    iteration = latest_iteration(root) if iteration is None else iteration
    return {"path": os.path.abspath(root), "iteration": int(iteration),
            "fingerprint": fingerprint(iteration_dir(root, iteration))}


def base_pointer_of(root: str, iteration: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The ``lora_base`` pointer a LoRA checkpoint saved, None for any other checkpoint."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    common = dist_checkpointing.load_common_state_dict(iteration_dir(root, iteration))
    return common.get("lora_base")


def check_base(root: str, pointer: Dict[str, Any]) -> None:
    """Refuse a base that is gone or changed since the LoRA checkpoint ``root`` was saved.

    Raises:
        CheckpointError: naming the base, what differs and what to do.
    """
    path, iteration = pointer["path"], int(pointer["iteration"])
    folder = iteration_dir(path, iteration)
    if not os.path.isdir(folder):
        raise CheckpointError(f"--load {root}: its base checkpoint {folder} (the weights the "
                              "adapters were trained on) is missing; restore it at that path")
    found = fingerprint(folder)
    if found != pointer["fingerprint"]:
        raise CheckpointError(
            f"--load {root}: its base checkpoint {folder} changed since the adapters were "
            f"trained on it (fingerprint {found[:12]} != {pointer['fingerprint'][:12]}); "
            "restore the original base, or start a new LoRA run from this one with --finetune")


def check_lora_start(start: StartPoint, config) -> None:
    """Before any model is built: LoRA needs a checkpoint to start from, and a LoRA checkpoint
    needs LoRA flags of its own shape.

    Raises:
        CheckpointError: naming the flag and the fix.
    """
    from mt_dialog.training.checkpoint import saved_config

    lora = config.lora
    pointer = base_pointer_of(start.path) if start.path else None
    if lora.enabled and not start.path:
        raise CheckpointError("lora_rank: LoRA trains adapters on a pretrained base; give "
                              "--load BASE --finetune or --pretrained-checkpoint BASE")
    if lora.enabled and not pointer and not start.weights_only:
        raise CheckpointError(f"--load {start.path}: not a LoRA checkpoint, so a LoRA run "
                              "starts from its weights: add --finetune (or pass it as "
                              "--pretrained-checkpoint)")
    if not pointer:
        return
    saved = saved_config(start.path).get("lora") or {}
    if not lora.enabled:
        raise CheckpointError(
            f"--load {start.path}: it is a LoRA checkpoint (rank {saved.get('lora_rank')} on "
            f"{' '.join(saved.get('lora_target') or [])}); pass its --lora-rank and "
            "--lora-target, or export it merged (tools/convert_checkpoint.py mcore-to-hf "
            "--merge-lora) to train the whole model")
    from mt_dialog.training.config import LoraConfig

    theirs = LoraConfig(**saved)
    if (theirs.lora_rank, theirs.targets) != (lora.lora_rank, lora.targets):
        raise CheckpointError(
            f"--load {start.path}: its adapters have rank {theirs.lora_rank} on "
            f"{','.join(theirs.targets)} but this run asks for rank {lora.lora_rank} on "
            f"{','.join(lora.targets)}; pass --lora-rank {theirs.lora_rank} --lora-target "
            f"{' '.join(theirs.targets)}")


def load_lora_start(start: StartPoint, model: List, optimizer, scheduler
                    ) -> Tuple[int, int, Dict[str, Any]]:
    """Load a LoRA run's starting point into its DDP-wrapped ``model`` chunks: a base
    checkpoint (weights only: the adapters start fresh) or a LoRA checkpoint (its base after
    ``check_base``, then its adapters, with optimizer, scheduler and position on a resume).
    Returns ``(iteration, consumed_samples, base pointer)``."""
    pointer = base_pointer_of(start.path)
    if pointer is None:  # a base: every non-adapter tensor of it
        pointer = base_pointer(start.path)
        load_checkpoint(start.path, model, optimizer, finetune=True, select=is_base_key)
        return 0, 0, pointer
    check_base(start.path, pointer)
    load_checkpoint(pointer["path"], model, optimizer, finetune=True,
                    iteration=int(pointer["iteration"]), select=is_base_key)
    iteration, consumed = load_checkpoint(start.path, model, optimizer, scheduler,
                                          finetune=start.weights_only, select=is_adapter_key)
    return iteration, consumed, pointer


def load_lora_weights(root: str, model: List, iteration: int) -> int:
    """Base then adapter weights of the LoRA checkpoint ``root`` at ``iteration`` into bare
    GPTModel chunk(s) with adapters (generation, export); returns ``iteration``."""
    pointer = base_pointer_of(root, iteration)
    check_base(root, pointer)
    load_weights_for_inference(pointer["path"], model, int(pointer["iteration"]),
                               select=is_base_key)
    load_weights_for_inference(root, model, iteration, select=is_adapter_key)
    return iteration
