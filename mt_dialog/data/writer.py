"""Write the packed splits from the staging shards, in a writer process or in this one.

The ``.bin/.idx`` files are written with megatron-core's ``IndexedDatasetBuilder``
(``storage.PackWriter``). Importing it (torch + megatron-core) takes seconds, a fixed cost of
every run that the tokenizing does not need. So a run starts a ``WriterProcess`` first: it imports
megatron-core while the main process (and its workers) render conversations, then receives one
``WriteJob`` (which staged conversations go into which pack, in order), copies them from the shards
into the output and reports back. The token stream is written once into the shards and read once
from them; the main process never holds it.

When megatron-core is already imported in the calling process (a training script, a test
session) there is nothing to overlap, and ``InlineWriter`` writes in the calling process.
Both produce the same bytes: the job fully determines the output.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

from mt_dialog.data.progress import progress_factory
from mt_dialog.data.staging import ShardReader
from mt_dialog.data.storage import PackWriter, indexed_dataset_module

INDEXED_DATASET_MODULE = "megatron.core.datasets.indexed_dataset"


class WriterError(RuntimeError):
    """Writing the packed dataset failed (a full disk, the writer process killed, ...)."""


@dataclass
class SplitPlan:
    """One split's packs, in the order they are written."""

    name: str
    members: np.ndarray  # staging indices of the conversations, pack after pack
    sizes: np.ndarray  # conversations per pack


@dataclass
class WriteJob:
    """Everything the writer needs; arrays are indexed by staging index (arrival order)."""

    stage_folder: str
    shard_names: List[str]
    token_dtype: str  # staging dtypes (the output's are megatron-core's choice)
    count_dtype: str
    shard: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    splits: List[SplitPlan]
    prefix: str  # output prefix inside the run's temporary folder
    vocab_size: int
    seq_length: int
    progress: bool = False


def write_job(job: WriteJob) -> None:
    """Write every split of ``job`` (in the calling process)."""
    reader = ShardReader(job.stage_folder, job.shard_names, job.token_dtype, job.count_dtype)
    progress = progress_factory(job.progress)
    try:
        for plan in job.splits:
            _write_split(job, plan, reader, progress)
    finally:
        reader.close()


def _write_split(job: WriteJob, plan: SplitPlan, reader: ShardReader, progress) -> None:
    writer = PackWriter(job.prefix, plan.name, job.vocab_size, job.seq_length)
    shards, offsets, lengths = (column[plan.members]
                                for column in (job.shard, job.offset, job.length))
    start = 0
    for end in progress(np.cumsum(plan.sizes).tolist(), desc=f"writing {plan.name}",
                        unit="pack"):
        parts = [reader.conversation(s, o, n) for s, o, n in zip(
            shards[start:end].tolist(), offsets[start:end].tolist(), lengths[start:end].tolist())]
        writer.add_pack([tokens for tokens, _ in parts], [counts for _, counts in parts])
        start = end
    writer.finalize()


class InlineWriter:
    """Writes in the calling process."""

    def write(self, job: WriteJob) -> None:
        try:
            write_job(job)
        except OSError as exc:
            raise WriterError(f"writing the dataset failed: {exc}") from None

    def close(self) -> None:
        pass


class WriterProcess:
    """A fresh interpreter (``python -c``, so the caller's main module is not re-imported as with
    multiprocessing's spawn) that imports megatron-core at once, then writes one job. Job and
    answer are pickles on its stdin and stdout; what it prints goes to stderr. It runs in its own
    session (Ctrl-C is the main process's to handle) and exits when its stdin closes."""

    def __init__(self) -> None:
        # stdout is kept for the answer, anything printed goes to stderr; the module search
        # path is the caller's (as multiprocessing's spawn passes it on)
        code = (f"import os, sys; answer = os.dup(1); os.dup2(2, 1); sys.path[:] = "
                f"{list(sys.path)!r}; import {__name__} as w; w.serve(answer)")
        self._process = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, start_new_session=True)
        self._written = False

    def write(self, job: WriteJob) -> None:
        try:
            pickle.dump(job, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.close()
        except OSError:
            pass  # the writer stopped early: its reason, if any, is waiting on its stdout
        try:
            status, message = pickle.load(self._process.stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            code = self._process.wait()
            raise WriterError(
                f"the writer process stopped unexpectedly (exit code {code}) before the dataset "
                "was written; nothing was written at --output-prefix"
            ) from None
        if status != "ok":
            raise WriterError(f"writing the dataset failed: {message}")
        self._written = True

    def close(self) -> None:
        """Let a process that wrote its job exit; stop one that did not at once (the run
        failed or was interrupted, possibly while it was still importing)."""
        if self._written:
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            stream.close()


def serve(answer_fd: int) -> None:
    """Body of the writer process: import, read one job from stdin, write it, answer on
    ``answer_fd`` (the original stdout)."""
    answer = os.fdopen(answer_fd, "wb")
    try:
        indexed_dataset_module()  # the import this process exists to overlap
        job = pickle.load(sys.stdin.buffer)
        write_job(job)
        result = ("ok", "")
    except EOFError:
        return  # the main process is gone or gave up: nothing to write
    except Exception as exc:  # reported to the main process, which prints it as one line
        result = ("error", str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}")
    pickle.dump(result, answer)
    answer.close()
    os._exit(0)  # everything is written and closed: skip tearing down torch (up to a second)


def open_writer(separate: Optional[bool] = None):
    """A ``WriterProcess`` (``separate``), or an ``InlineWriter``; by default a process unless
    megatron-core's indexed_dataset is already imported here (then there is nothing to overlap)
    or there is no interpreter to start (``sys.executable`` empty: an embedded Python)."""
    if separate is None:
        separate = INDEXED_DATASET_MODULE not in sys.modules and bool(sys.executable)
    return WriterProcess() if separate else InlineWriter()
