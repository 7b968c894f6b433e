"""Checkpoint folders from others read without running code from them.

A megatron-core ``torch_dist`` checkpoint (``iter_0000200/``) holds pickles that its readers
unpickle in full, where a pickle can name any importable function and call it::

    iter_0000200/
      .metadata        torch DCP's index: pickle.load (FileSystemReader.read_metadata)
      common.pt        iteration, scheduler, optimizer groups: torch.load (megatron-core
                       passes no weights_only)
      __0_0.distcp     tensors (torch.load(weights_only=True) per tensor) and byte entries:
                       ShardedObjects (RNG states, Transformer Engine ``_extra_state``) read by
                       DCP's planner with torch.load(weights_only=False); a non-empty TE
                       extra state is then pickle.loads-ed again by TE's set_extra_state
      *.pt             megatron-core's older per-object files: torch.load
      metadata.json, mt_dialog_config.json: JSON (no code)

``check_checkpoint_folder(path)`` reads every one of those pickles first, with unpicklers that
resolve only an allow-list of names and call nothing (``_CheckingUnpickler``: every allowed
global becomes an inert placeholder) or torch's own ``weights_only`` unpickler with numpy's
array reconstruction allowed (the RNG states hold numpy arrays). Anything else is refused by
``UntrustedCheckpointError`` naming the file, the entry and the global, before megatron-core or
torch reads the folder. What the allow-lists hold and why:

* ``.metadata``: the dataclasses and enums of ``torch.distributed.checkpoint`` (``metadata``,
  ``planner``, ``filesystem``), ``torch.Size``, torch dtypes, ``torch.serialization._get_layout``
  (a layout by name) and ``collections.OrderedDict``; byte entries must lie inside the folder and
  carry no stream transforms (this project never writes them).
* ``common.pt``, byte entries, ``*.pt``: ``torch.load(weights_only=True)`` (tensors, containers,
  numbers, strings) + numpy's ``_reconstruct``, ``ndarray``, ``dtype`` and dtype classes.
* a TE extra state: ``torch.save`` bytes (a BytesIO, or a uint8 tensor of them, TE 1.x) as
  above; a uint8 tensor of a plain pickle (TE 2.x): TE's FP8 recipe classes, tensors rebuilt by
  ``torch._utils._rebuild_tensor_v2`` from storages whose bytes pass the ``weights_only`` check.

The check runs once per folder state (cached by the files' sizes and modification times); its
cost is reading ``.metadata``, ``common.pt`` and the byte entries, not the tensors. A folder
changed between the check and the read could still pass unchecked bytes: whoever can write the
checkpoint folder while a run reads it is trusted (see docs/security.md).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import io
import os
import pickle
import re
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

import torch


class UntrustedCheckpointError(ValueError):
    """A checkpoint file holds a pickle that names a global outside the allow-list."""


# modules whose dataclasses and enums make up torch DCP's .metadata
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
_METADATA_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                     ("collections", "OrderedDict")}
# Transformer Engine's FP8 state (module.base get_extra_state): recipe dataclasses and enums
_TE_RECIPE_MODULE = "transformer_engine.common.recipe"
_TE_GLOBALS = {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
               ("collections", "OrderedDict"), ("torch", "Size"), ("torch", "device")}
_ZIP_MAGIC = b"PK\x03\x04"
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")  # torch's weights_only refusal names it so


class _Placeholder:
    """What an allowed global becomes while checking: accepts any arguments and state, runs
    nothing."""

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __setstate__(self, state) -> None:
        pass

    def __setitem__(self, key, value) -> None:
        pass

    def append(self, value) -> None:
        pass

    def extend(self, values) -> None:
        pass


class _CheckingUnpickler(pickle.Unpickler):
    """Unpickles with every global checked by ``allowed(module, name)`` and replaced by an inert
    ``_Placeholder`` class; ``special`` maps a global to a function run instead (the storage
    loader, whose bytes are checked in turn)."""

    def __init__(self, stream, allowed: Callable[[str, str], bool],
                 special: Optional[Dict[Tuple[str, str], Callable]] = None) -> None:
        super().__init__(stream)
        self._allowed, self._special = allowed, special or {}

    def find_class(self, module: str, name: str):
        if (module, name) in self._special:
            return self._special[(module, name)]
        if not self._allowed(module, name):
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return type(name, (_Placeholder,), {})

    def persistent_load(self, pid):
        raise pickle.UnpicklingError(f"persistent id {pid!r} is not allowed")


@functools.lru_cache(maxsize=None)
def _is_plain_type(module: str, name: str) -> bool:
    """A dataclass or enum defined in one of torch DCP's metadata modules (their constructors
    only store fields)."""
    import importlib

    if module not in _DCP_MODULES:
        return False
    value = getattr(importlib.import_module(module), name, None)
    return isinstance(value, type) and (dataclasses.is_dataclass(value)
                                        or issubclass(value, enum.Enum))


def _metadata_global(module: str, name: str) -> bool:
    if (module, name) in _METADATA_GLOBALS or _is_plain_type(module, name):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


@functools.lru_cache(maxsize=None)
def _is_te_recipe_type(name: str) -> bool:
    """A class of TE's recipe module (dataclasses, enums, named tuples: ``DelayedScaling``,
    ``Format``, ``_OverrideLinearPrecision``, ...); where TE is not installed (no TE module reads
    the state there), any name of the module's class naming."""
    try:
        import importlib

        return isinstance(getattr(importlib.import_module(_TE_RECIPE_MODULE), name, None), type)
    except ImportError:
        return name.lstrip("_")[:1].isupper()


def _te_global(module: str, name: str) -> bool:
    if (module, name) in _TE_GLOBALS or module == _TE_RECIPE_MODULE and _is_te_recipe_type(name):
        return True
    return module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)


def _refusal(path: str, entry: Optional[str], reason: str) -> UntrustedCheckpointError:
    where = f"{path} ({entry})" if entry else path
    return UntrustedCheckpointError(
        f"{where}: refused to read this checkpoint file: {reason}. Checkpoint pickles are read "
        "through an allow-list so that a file from someone else cannot run code; this one is "
        "not a checkpoint mt_dialog or megatron-core writes. If you made it yourself with other "
        "tools, re-save it with mt_dialog (tools/convert_checkpoint.py hf-to-mcore from a Hugging "
        "Face folder); otherwise do not use it")


def _check_pickle(data: bytes, allowed, path: str, entry: Optional[str] = None,
                  special=None) -> None:
    try:
        _CheckingUnpickler(io.BytesIO(data), allowed, special).load()
    except UntrustedCheckpointError:
        raise
    except Exception as exc:  # any malformed pickle: refused the same way
        raise _refusal(path, entry, f"{type(exc).__name__}: {exc}") from None


@functools.lru_cache(maxsize=1)
def _numpy_globals() -> Tuple[Any, ...]:
    """numpy's array reconstruction: RNG states saved by megatron-core hold numpy arrays."""
    import numpy as np

    dtypes = tuple(getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType"))
    return (np._core.multiarray._reconstruct, np.ndarray, np.dtype) + dtypes


def load_weights_only(data, path: str, entry: Optional[str] = None) -> Any:
    """``torch.load(weights_only=True)`` of ``data`` (bytes or a path) with numpy arrays allowed;
    ``UntrustedCheckpointError`` naming ``path`` (and ``entry``) and the global otherwise."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with torch.serialization.safe_globals(list(_numpy_globals())):
            return torch.load(stream, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError names the global; anything else: malformed
        found = _UNSUPPORTED_GLOBAL.search(str(exc))
        reason = (f"it names the global {found.group(1)}" if found
                  else f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        raise _refusal(path, entry, reason) from None


def _check_storage_bytes(path: str, entry: str) -> Callable[[bytes], Any]:
    def check(data: bytes) -> _Placeholder:
        load_weights_only(data, path, entry)
        return _Placeholder()
    return check


def _check_extra_state(value: Any, path: str, entry: str) -> None:
    """A Transformer Engine ``_extra_state``: empty, or FP8 state that TE reads again: a BytesIO
    or a uint8 tensor of ``torch.save`` bytes (TE 1.x: ``torch.load``), or a uint8 tensor of a
    plain pickle (TE 2.x: ``pickle.loads``)."""
    if isinstance(value, io.BytesIO):
        load_weights_only(value.getvalue(), path, entry)
    elif isinstance(value, torch.Tensor) and value.numel():
        data = value.detach().cpu().numpy().tobytes()
        if data.startswith(_ZIP_MAGIC):  # torch.save's zip format
            load_weights_only(data, path, entry)
            return
        special = {("torch.storage", "_load_from_bytes"): _check_storage_bytes(path, entry)}
        _check_pickle(data, _te_global, path, entry, special)


def _walk(value: Any, prefix: str) -> Iterable[Tuple[str, Any]]:
    yield prefix, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _walk(item, f"{prefix}.{index}")


def _read_metadata(folder: str):
    """DCP's ``.metadata``: checked, then read (only allowed names are left to resolve)."""
    path = os.path.join(folder, ".metadata")
    with open(path, "rb") as handle:
        data = handle.read()
    _check_pickle(data, _metadata_global, path)
    return path, pickle.loads(data)  # every global it names was just allowed


def _byte_entries(folder: str, metadata, path: str) -> Iterable[Tuple[str, str, int, int]]:
    """(fqn, file, offset, length) of every byte entry of the DCP index ``metadata``."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    byte_keys = {key for key, meta in metadata.state_dict_metadata.items()
                 if isinstance(meta, BytesStorageMetadata)}
    real = os.path.realpath(folder)
    for index, info in (metadata.storage_data or {}).items():
        if index.fqn not in byte_keys:
            continue
        file = os.path.realpath(os.path.join(folder, info.relative_path))
        if os.path.dirname(file) != real:
            raise _refusal(path, index.fqn, f"its data file {info.relative_path!r} lies outside "
                           "the checkpoint folder")
        if getattr(info, "transform_descriptors", None):
            raise _refusal(path, index.fqn, "its entry is stored with stream transforms "
                           f"{list(info.transform_descriptors)}, which mt_dialog never writes")
        yield index.fqn, file, int(info.offset), int(info.length)


def _check_byte_entries(folder: str) -> None:
    path, metadata = _read_metadata(folder)
    for fqn, file, offset, length in _byte_entries(folder, metadata, path):
        with open(file, "rb") as handle:
            handle.seek(offset)
            data = handle.read(length)
        value = load_weights_only(data, file, fqn)
        if "_extra_state" in fqn:
            for entry, item in _walk(value, fqn):
                _check_extra_state(item, file, entry)


def _state(folder: str) -> Tuple[Tuple[str, int, int], ...]:
    """Names, sizes and modification times of the folder's files: the check's cache key."""
    out = []
    for root, _, files in os.walk(folder):
        for name in files:
            stat = os.stat(os.path.join(root, name))
            out.append((os.path.join(root, name), stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(out))


_CHECKED: Dict[str, Tuple] = {}


def check_checkpoint_folder(folder: str) -> None:
    """Read every pickle of the checkpoint folder ``folder`` (an ``iter_*`` folder) through the
    allow-lists of the module docstring; nothing in it is run.

    Raises:
        UntrustedCheckpointError: a pickle names a global outside the allow-list, is malformed,
            or points outside the folder; the message names the file and entry.
    """
    key, state = os.path.realpath(folder), _state(folder)
    if _CHECKED.get(key) == state:
        return
    if os.path.isfile(os.path.join(folder, ".metadata")):
        _check_byte_entries(folder)
    for name, _, _ in state:
        if name.endswith(".pt"):
            load_weights_only(name, name)
    _CHECKED[key] = state
