"""Staging: rendered conversations on disk between tokenization and packing.

Packing needs every conversation's length before the first pack can be written, so rendered
conversations wait on disk. The staging area is a private, temporary folder (deleted at the end of
the run), so it is plain raw arrays, not a dataset format: each process that renders
conversations appends them to its own *shard*, two flat files of equal element count::

    shard-<pid>.tokens   token ids of conversation after conversation  (staging dtype)
    shard-<pid>.counts   their loss_token_num, aligned with the ids

A conversation is addressed by ``(shard, offset, length)`` in elements (the same offset in both
files). The main process keeps only that address, plus a few per-conversation numbers
(``StageIndex``), so its memory is O(number of conversations). Only the final, packed dataset is
written with megatron-core's ``IndexedDatasetBuilder`` (``storage.PackWriter``).

A shard writer flushes after each batch, before the batch's outcomes are returned: once the main
process holds an address, the bytes behind it are in the file.
"""

from __future__ import annotations

import os
from array import array
from typing import Dict, List, Sequence, Tuple

import numpy as np

SUFFIXES = ("tokens", "counts")


def staging_dtype(max_value: int) -> np.dtype:
    """Smallest of uint16 / int32 holding ``0..max_value`` (the writer converts to the stored
    dtype that megatron-core picks; both hold every value, so nothing changes on the way)."""
    return np.dtype(np.uint16 if max_value < 2**16 else np.int32)


def shard_path(folder: str, name: str, suffix: str) -> str:
    return os.path.join(folder, f"{name}.{suffix}")


class ShardWriter:
    """Appends conversations to one shard (one per rendering process)."""

    def __init__(self, folder: str, name: str, token_dtype: str, count_dtype: str) -> None:
        self.name = name
        self.dtypes = (np.dtype(token_dtype), np.dtype(count_dtype))
        self.files = [open(shard_path(folder, name, s), "wb") for s in SUFFIXES]
        self.size = 0  # elements written to each file

    def append(self, tokens: np.ndarray, counts: np.ndarray) -> int:
        """Write one conversation; returns its offset in elements."""
        if tokens.shape != counts.shape or tokens.ndim != 1:
            raise ValueError(f"tokens {tokens.shape} and counts {counts.shape} must be equal 1-D")
        offset = self.size
        for handle, values, dtype in zip(self.files, (tokens, counts), self.dtypes):
            handle.write(np.ascontiguousarray(values, dtype=dtype).data)
        self.size += int(tokens.shape[0])
        return offset

    def flush(self) -> None:
        for handle in self.files:
            handle.flush()

    def close(self) -> None:
        for handle in self.files:
            handle.close()


class ShardReader:
    """Read-only access to finished shards (``names[i]`` is shard number ``i``).

    Each conversation is read with a positioned read per file (``os.pread``), not through a
    memory map: the pages of a map that the writer has touched stay in its resident set (its
    RSS, and a container's memory accounting, would grow by the whole staged corpus, 6 bytes per
    token at ``--seq-length`` 131072); this way the writer holds one pack at a time."""

    def __init__(self, folder: str, names: Sequence[str], token_dtype: str,
                 count_dtype: str) -> None:
        self.dtypes = (np.dtype(token_dtype), np.dtype(count_dtype))
        self.files: List[List[int]] = []
        try:
            for name in names:
                self.files.append([])
                for suffix in SUFFIXES:
                    self.files[-1].append(os.open(shard_path(folder, name, suffix), os.O_RDONLY))
        except OSError:
            self.close()
            raise

    def conversation(self, shard: int, offset: int, length: int) -> Tuple[np.ndarray, np.ndarray]:
        """``(token ids, loss_token_num)`` of the ``length`` elements at ``offset`` (in elements)
        of shard ``shard``, as arrays of the staging dtypes over freshly read bytes. Raises
        ``OSError`` when the shard is shorter than that (a staging file cut short)."""
        return tuple(_read(fd, dtype, offset, length)
                     for fd, dtype in zip(self.files[shard], self.dtypes))

    def close(self) -> None:
        for fds in self.files:
            for fd in fds:
                os.close(fd)
        self.files = []


def _read(fd: int, dtype: np.dtype, offset: int, length: int) -> np.ndarray:
    """``length`` elements of ``dtype`` at element ``offset`` of the open file ``fd`` (a
    read-only array over the bytes read)."""
    want, start = length * dtype.itemsize, offset * dtype.itemsize
    data = os.pread(fd, want, start)
    while len(data) < want:  # a short read: read on, until the end of the file
        more = os.pread(fd, want - len(data), start + len(data))
        if not more:
            raise OSError(f"staging file cut short: {want - len(data)} of {want} bytes at "
                          f"element {offset} are missing")
        data += more
    return np.frombuffer(data, dtype=dtype)


class StageIndex:
    """Per kept conversation, in arrival order: where it is staged and what the statistics need.

    About 30 bytes per conversation; the token stream itself never enters the main process.
    """

    def __init__(self) -> None:
        self.shard_names: List[str] = []
        self._shard_ids: Dict[str, int] = {}
        self.shard = array("i")
        self.offset = array("q")
        self.length = array("q")
        self.turns = array("i")
        self.loss_tokens = array("q")
        self.is_valid = array("b")

    def __len__(self) -> int:
        return len(self.length)

    def shard_id(self, name: str) -> int:
        if name not in self._shard_ids:
            self._shard_ids[name] = len(self.shard_names)
            self.shard_names.append(name)
        return self._shard_ids[name]

    def add(self, shard: int, offset: int, length: int, turns: int, loss_tokens: int,
            valid: bool) -> None:
        self.shard.append(shard)
        self.offset.append(offset)
        self.length.append(length)
        self.turns.append(turns)
        self.loss_tokens.append(loss_tokens)
        self.is_valid.append(1 if valid else 0)

    def column(self, name: str) -> np.ndarray:
        """One column as a numpy array (a copy: the index can keep growing)."""
        values = getattr(self, name)
        dtype = np.dtype(values.typecode)
        return np.frombuffer(values, dtype=dtype).copy() if len(values) else np.zeros(0, dtype)
