"""LoRA checkpoints: the adapters (and their optimizer state) plus a pointer to the base.

    SAVE/iter_0000200/       dist_checkpointing: only the ``...lora.A`` / ``...lora.B`` tensors
                             (sharded like any weight: a TP=2 save loads at PP=2), the optimizer
                             state of those, scheduler, RNG, and in the common state
                             ``lora_base = {"path", "iteration", "fingerprint"}``

The base is the checkpoint the LoRA run started from (``--load BASE --finetune`` or
``--pretrained-checkpoint BASE``; a LoRA checkpoint started from passes its own base on). Every
load (resume, chat, export) reads the base weights from ``path`` at ``iteration`` after checking
its ``fingerprint``, then the adapters from the LoRA checkpoint.

The pointer records every file of the base iteration folder: ``files = {name: [size,
mtime_ns, sha256 of every byte]}``, and ``fingerprint``, a sha256 over the sorted (name, sha256)
pairs. torch's ``.metadata`` (where each tensor lies in which file) counts without its
``storage_meta``, the only part that differs between two saves of the same weights (the save's
random id and the folder it was written to), its tables compared in sorted order: re-importing
the same Hugging Face model to the same path restores a base.

Cost: the pointer is made once per LoRA run start and reads the whole base (sha256 runs at about
1-2 GB/s per core: a 16 GB 8B base in ~10 s, a 140 GB 70B base in ~1.5 min). A check (resume,
chat, export) re-reads only the files whose size or modification time changed since (a file
written again, e.g. a re-import or a copy without ``cp -p``) and compares their full hash, so a
base changed anywhere in a file is refused while an untouched base costs one ``stat`` per file.
(Restoring a file's modification time by hand after editing it is tampering, not an accident;
the pointer lives in the LoRA checkpoint, which whoever can do that can edit too.) Pointers
saved before this rule hold only ``fingerprint`` over each file's size and first and last MiB
(and, earliest, every byte of ``.metadata``); they are still checked by that rule.
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
    verified,
)
from mt_dialog.training.lora import is_adapter_key

_MIB = 1 << 20


def is_base_key(key: str) -> bool:
    return not is_adapter_key(key)


def _torch_metadata(folder: str) -> Optional[bytes]:
    """The ``.metadata`` of ``folder`` without its per-save ``storage_meta`` (module docstring),
    None when it cannot be read (then its bytes count as they are)."""
    from torch.distributed.checkpoint import FileSystemReader

    verified(folder)  # its pickles through the allow-list first (an UntrustedCheckpointError)
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception:  # not torch's format: hash the bytes
        return None
    fields = []  # dicts sorted: the writer threads finish in any order
    for key, value in sorted(vars(metadata).items()):
        if key != "storage_meta":
            fields.append((key, sorted(map(repr, value.items())) if isinstance(value, dict)
                           else repr(value)))
    return repr(fields).encode()


def _sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(8 * _MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def file_records(path: str) -> Dict[str, List]:
    """``{name: [size, mtime_ns, sha256]}`` of every file under the checkpoint folder ``path``
    (every byte read; ``.metadata`` by its layout: module docstring)."""
    records = {}
    for folder, _, files in os.walk(path):
        for name in files:
            full = os.path.join(folder, name)
            stat = os.stat(full)
            layout = _torch_metadata(folder) if name == ".metadata" else None
            sha = hashlib.sha256(layout).hexdigest() if layout is not None else _sha256_file(full)
            records[os.path.relpath(full, path)] = [stat.st_size, stat.st_mtime_ns, sha]
    return records


def records_fingerprint(records: Dict[str, List]) -> str:
    """sha256 (hex) over the sorted (name, sha256) pairs of ``file_records``."""
    return hashlib.sha256(repr(sorted((k, v[2]) for k, v in records.items())).encode()
                          ).hexdigest()


def changed_files(path: str, records: Dict[str, List]) -> List[str]:
    """Names of files under ``path`` that differ from ``records`` (added, missing, or of
    another content); a file of the same size and modification time is taken as unchanged,
    any other is hashed in full."""
    found = {os.path.relpath(os.path.join(folder, name), path)
             for folder, _, files in os.walk(path) for name in files}
    changed = sorted(found ^ set(records))
    for name in sorted(found & set(records)):
        full, (size, mtime, sha) = os.path.join(path, name), records[name]
        stat = os.stat(full)
        if name == ".metadata" or (stat.st_size, stat.st_mtime_ns) != (size, mtime):
            layout = _torch_metadata(os.path.dirname(full)) if name == ".metadata" else None
            now = hashlib.sha256(layout).hexdigest() if layout is not None \
                else _sha256_file(full)
            if now != sha:
                changed.append(name)
    return changed


def fingerprint(path: str, legacy: bool = False) -> str:
    """The older rule's sha256 (hex) of the checkpoint folder ``path`` (each file's size, and its
    content up to 2 MiB, else its first and last MiB; module docstring), kept to check pointers
    saved before ``file_records``; ``legacy``: every byte of ``.metadata``, the earliest rule."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            size = os.path.getsize(full)
            layout = None if legacy or name != ".metadata" else _torch_metadata(folder)
            if layout is not None:
                digest.update(f"{os.path.relpath(full, path)}\0layout\0".encode() + layout)
                continue
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
    records = file_records(iteration_dir(root, iteration))
    return {"path": os.path.abspath(root), "iteration": int(iteration),
            "fingerprint": records_fingerprint(records), "files": records}


def base_pointer_of(root: str, iteration: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """The ``lora_base`` pointer a LoRA checkpoint saved, None for any other checkpoint."""
    from megatron.core import dist_checkpointing

    iteration = latest_iteration(root) if iteration is None else iteration
    common = dist_checkpointing.load_common_state_dict(verified(iteration_dir(root, iteration)))
    return common.get("lora_base")


def check_base(root: str, pointer: Dict[str, Any], flag: str = "--load") -> None:
    """Refuse a base that is gone or changed since the LoRA checkpoint ``root`` (given as
    ``flag``) was saved.

    Raises:
        CheckpointError: naming the base, what differs and what to do.
    """
    path, iteration = pointer["path"], int(pointer["iteration"])
    folder = iteration_dir(path, iteration)
    if not os.path.isdir(folder):
        raise CheckpointError(
            f"{flag} {root}: its base checkpoint {folder} (the weights the adapters were "
            "trained on) is missing; restore it at that path (a base imported from Hugging "
            "Face: import the same model there again)")
    if "files" in pointer:
        changed = changed_files(folder, pointer["files"])
        what = f"{len(changed)} file(s) differ: {', '.join(changed[:3])}" if changed else None
        if records_fingerprint(pointer["files"]) != pointer["fingerprint"]:
            what = "the pointer's fingerprint does not match its own file records"
    else:  # a pointer of the older rule
        found = fingerprint(folder)
        what = None if pointer["fingerprint"] in (found, fingerprint(folder, legacy=True)) \
            else f"fingerprint {found[:12]} != {pointer['fingerprint'][:12]}"
    if what:
        raise CheckpointError(
            f"{flag} {root}: its base checkpoint {folder} changed since the adapters were "
            f"trained on it ({what}); restore the original base, or start a new LoRA run from "
            "this one with --finetune")


def checked_base(root: str, iteration: Optional[int] = None, flag: str = "--load"
                 ) -> Optional[Dict[str, Any]]:
    """The base pointer of the LoRA checkpoint ``root`` (given as ``flag``; newest iteration by
    default) after ``check_base``; None for any other checkpoint. Resume, generation and
    export all read a base through this.

    Raises:
        CheckpointError: the base is missing or changed (``check_base``).
    """
    pointer = base_pointer_of(root, iteration)
    if pointer:
        check_base(root, pointer, flag)
    return pointer


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
    _check_scaling(start, theirs, lora)


def _check_scaling(start: StartPoint, theirs, lora) -> None:
    """The adapters' alpha (their scaling alpha / rank) must be the checkpoint's; on a resume
    (not --finetune) the dropout too. ``theirs``/``lora``: the saved and the asked LoraConfig.

    Raises:
        CheckpointError: naming the checkpoint's values and the flags to pass.
    """
    differ = theirs.alpha != lora.alpha or (
        not start.weights_only and theirs.lora_dropout != lora.lora_dropout)
    if differ:
        omitted = " (the rank: --lora-alpha omitted)" if lora.lora_alpha is None else ""
        raise CheckpointError(
            f"--load {start.path}: its adapters were trained with alpha {theirs.alpha:g} "
            f"(scaling alpha / rank) and dropout {theirs.lora_dropout:g}, but this run asks for "
            f"alpha {lora.alpha:g}{omitted} and dropout {lora.lora_dropout:g}; pass "
            f"--lora-alpha {theirs.alpha:g} --lora-dropout {theirs.lora_dropout:g}")


def load_lora_start(start: StartPoint, model: List, optimizer, scheduler
                    ) -> Tuple[int, int, Dict[str, Any]]:
    """Load a LoRA run's starting point into its DDP-wrapped ``model`` chunks: a base
    checkpoint (weights only: the adapters start fresh) or a LoRA checkpoint (its base after
    ``check_base``, then its adapters, with optimizer, scheduler and position on a resume).
    Returns ``(iteration, consumed_samples, base pointer)``."""
    pointer = checked_base(start.path)
    if pointer is None:  # a base: every non-adapter tensor of it
        pointer = base_pointer(start.path)
        load_checkpoint(start.path, model, optimizer, finetune=True, select=is_base_key)
        return 0, 0, pointer
    load_checkpoint(pointer["path"], model, optimizer, finetune=True,
                    iteration=int(pointer["iteration"]), select=is_base_key)
    iteration, consumed = load_checkpoint(start.path, model, optimizer, scheduler,
                                          finetune=start.weights_only, select=is_adapter_key)
    return iteration, consumed, pointer


def load_lora_weights(root: str, model: List, iteration: int) -> int:
    """Base then adapter weights of the LoRA checkpoint ``root`` at ``iteration`` into bare
    GPTModel chunk(s) with adapters (generation, export); returns ``iteration``."""
    pointer = checked_base(root, iteration)
    load_weights_for_inference(pointer["path"], model, int(pointer["iteration"]),
                               select=is_base_key)
    load_weights_for_inference(root, model, iteration, select=is_adapter_key)
    return iteration
