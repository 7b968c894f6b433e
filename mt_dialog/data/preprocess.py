"""The preprocessing run: read -> render (parallel) -> stage on disk -> split -> pack -> write.

Processes (``--workers N``)::

    main process    reads the inputs, hands batches of raw lines to the renderers, accounts for
                    every record, packs, writes the metadata and publishes the files
    renderers       with --workers 1 the main process itself; else N pool workers. Each appends
                    the conversations it renders to its own staging shard (``staging.py``) and
                    returns only (offset, length, a few counts) per conversation
    writer          a process started first (``writer.py``): it imports torch + megatron-core
                    while the others render, then copies the packs from the shards into the
                    output with megatron-core's IndexedDatasetBuilder. Inline instead when
                    megatron-core is already imported in this process

Memory stays O(number of conversations): records are streamed to the renderers with a bounded
window (batches of at most ``BATCH`` records and ``BATCH_BYTES`` bytes of input, so that long
conversations, 100k tokens of agent transcript in one record, do not make a window of
``workers x WINDOW_PER_WORKER`` batches hundreds of MiB), rendered conversations go to the
shards on disk, and the main process keeps about 40 bytes per conversation (``StageIndex`` and
``Tally.record_of_sample``). Outputs are written into a temporary folder beside the output
prefix and moved into place only when everything succeeded, metadata last.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from mt_dialog import __version__
from mt_dialog.files import leftovers, temp_path
from mt_dialog.config_utils import to_dict
from mt_dialog.data.config import PreprocessConfig
from mt_dialog.data.packing import pack, packing_efficiency
from mt_dialog.data.progress import progress_factory
from mt_dialog.data.readers import InputError, RawRecord, expand_inputs, iter_records
from mt_dialog.data.records import (
    Kept,
    Outcome,
    RecordProcessor,
    RenderTimeout,
    init_worker,
    run_batch,
    time_limit,
)
from mt_dialog.data.render import end_of_turn_id, stop_ids
from mt_dialog.data.staging import ShardWriter, StageIndex, staging_dtype
from mt_dialog.data.storage import (
    FORMAT_VERSION,
    file_records,
    metadata_path,
    output_files,
    write_metadata,
)
from mt_dialog.data.tokenizers import TokenizerError
from mt_dialog.data.writer import SplitPlan, WriteJob, WriterError, open_writer

BATCH = 64
BATCH_BYTES = 1 << 20
"""A batch closes at ``BATCH`` records or once it holds ``BATCH_BYTES`` bytes of input (a record
larger than that is a batch of its own): what a renderer holds at once (the raw records, their
texts and ids) and the main process's window of batches in flight stay bounded by bytes, not
only by records, whatever the conversations' length."""
WINDOW_PER_WORKER = 8
WINDOW_BYTES_PER_WORKER = 4 << 20
"""With several workers, batches in flight (sent, their outcomes not yet taken) are at most
``workers x WINDOW_PER_WORKER`` batches and, once more than one is in flight, about
``workers x WINDOW_BYTES_PER_WORKER`` bytes of input: the main process's memory for them does
not grow with the length of the conversations (short ones meet the first limit, long ones the
second)."""


class PreprocessError(Exception):
    """A fatal, user-facing problem: printed as one message, never as a traceback."""


@dataclass
class Tally:
    """Where every input conversation went."""

    read: int = 0
    kept: int = 0
    truncated: int = 0
    turns_removed: int = 0
    empty_files: int = 0
    skipped: Counter = field(default_factory=Counter)
    dropped: Counter = field(default_factory=Counter)
    examples: Dict[str, str] = field(default_factory=dict)
    notes: Counter = field(default_factory=Counter)
    """Kept records per note of ``Conversation.notes`` (what parsing changed or ignored)."""
    record_of_sample: array = field(default_factory=lambda: array("q"))
    """Per staged sample, the number of its record among the kept ones (a record gives several
    samples with --reasoning per-turn, a text document one per piece; they go to the same
    split)."""
    kind: Optional[str] = None
    """``records.KINDS``: what the kept records are (one kind per dataset), and where the first
    one is (``first``)."""
    first: str = ""
    documents_split: int = 0
    """Text documents cut into several pieces (``--overlong split``)."""


def _numbered(files: Sequence[Tuple[str, bool]]) -> Iterator[Tuple[int, RawRecord, bool]]:
    number = 0
    for path, valid in files:
        for record in iter_records(path):
            if record.error is None:
                number += 1
            yield number, record, valid


def _batches(stream, size: int, max_bytes: int = BATCH_BYTES):
    """Lists of consecutive ``(number, RawRecord, valid)`` items, each closed at ``size`` items
    or once its records' input bytes (``RawRecord.nbytes``) reach ``max_bytes``."""
    batch: List = []
    held = 0
    for item in stream:
        batch.append(item)
        held += item[1].nbytes
        if len(batch) == size or held >= max_bytes:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def _bounded_map(processor: RecordProcessor, batches, workers: int, folder: str):
    """``(batch, shard name, outcomes)`` of ``processor.stage`` over ``batches``, in input order;
    with several workers at most a window of batches is in flight (``WINDOW_PER_WORKER``,
    ``WINDOW_BYTES_PER_WORKER``)."""
    if workers == 1:
        shard = ShardWriter(folder, f"shard-{os.getpid()}", processor.token_dtype,
                            processor.count_dtype)
        try:
            for batch in batches:
                yield batch, shard.name, processor.stage([(n, r) for n, r, _ in batch], shard)
        finally:
            shard.close()
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=init_worker, initargs=(processor, folder)) as pool:
        pending: deque = deque()
        held = 0  # input bytes of the batches in flight
        for batch in batches:
            job = pool.apply_async(run_batch, ([(n, r) for n, r, _ in batch],))
            pending.append((batch, job))
            held += sum(record.nbytes for _, record, _ in batch)
            while len(pending) >= workers * WINDOW_PER_WORKER or (
                    len(pending) > 1 and held >= workers * WINDOW_BYTES_PER_WORKER):
                done, job = pending.popleft()
                held -= sum(record.nbytes for _, record, _ in done)
                yield (done, *job.get())
        while pending:
            done, job = pending.popleft()
            yield (done, *job.get())


def _account(outcome: Outcome, record: RawRecord, valid: bool, tally: Tally,
             index: StageIndex, shard: int, on_error: str) -> None:
    """Count one record's outcome (``records.Kept`` / ``records.Refused``) and index its staged
    samples; raises ``PreprocessError`` for a refusal that stops the run."""
    if outcome.status == "error" and outcome.reason == "empty_file":  # a file, not a record
        if on_error == "raise":
            raise PreprocessError(f"{outcome.message}; or use --on-error skip to skip empty files")
        tally.empty_files += 1
        tally.examples.setdefault("empty_file", outcome.message)
        return
    tally.read += 1
    if isinstance(outcome, Kept):
        _check_kind(outcome, record, tally)
        tally.kept += 1
        tally.documents_split += outcome.kind == "text" and len(outcome.samples) > 1
        tally.notes.update(outcome.notes)
        if outcome.turns_removed:
            tally.truncated += 1
            tally.turns_removed += outcome.turns_removed
        for sample in outcome.samples:  # several: --reasoning per-turn
            index.add(shard, sample.offset, sample.length, sample.turn_num,
                      sample.num_loss_tokens, valid)
            tally.record_of_sample.append(tally.kept - 1)
        return
    if outcome.status == "error" and outcome.reason == "overlong":
        raise PreprocessError(outcome.message)  # --overlong error: the message names the fixes
    if outcome.status == "error" and on_error == "raise":
        raise PreprocessError(f"{outcome.message}; or use --on-error skip to skip and count "
                              "such records")
    (tally.dropped if outcome.status == "dropped" else tally.skipped)[outcome.reason] += 1
    tally.examples.setdefault(outcome.reason, outcome.message)


def _check_kind(outcome: Kept, record: RawRecord, tally: Tally) -> None:
    """One dataset holds one kind of record (its metadata's ``kind``: ``inspect --verify`` checks
    a text dataset's pieces and a conversation dataset's turns by different rules); raises
    ``PreprocessError`` at the first record of the other kind."""
    if tally.kind is None:
        tally.kind, tally.first = outcome.kind, record.where
    elif outcome.kind != tally.kind:
        raise PreprocessError(
            f"{record.where} is a {outcome.kind} record but {tally.first} is a {tally.kind} "
            "record: a dataset holds one kind; preprocess the text documents and the "
            "conversations into two datasets (two --output-prefix) and train on both with "
            "--data-path W1 TEXT W2 CHAT (one loss normalization, each dataset's loss logged)")


def _assign_splits(index: StageIndex, config: PreprocessConfig,
                   record_of_sample: np.ndarray) -> Dict[str, np.ndarray]:
    """Staging indices of each split (seeded random split of the kept records unless
    --valid-input was given; all samples of a record, ``record_of_sample``, go to its split)."""
    if config.inputs.valid_input:
        flags = index.column("is_valid")
        return {"train": np.flatnonzero(flags == 0), "valid": np.flatnonzero(flags == 1)}
    count = int(record_of_sample[-1]) + 1 if record_of_sample.size else 0
    _, valid_fraction = config.packing.split_fractions()
    n_valid = int(round(count * valid_fraction))
    if valid_fraction > 0 and n_valid == 0 and count >= 2:
        n_valid = 1  # a requested validation split is never silently empty
    order = np.random.default_rng(config.packing.seed).permutation(count)
    valid = np.isin(record_of_sample, order[:n_valid])
    return {"train": np.flatnonzero(~valid), "valid": np.flatnonzero(valid)}


def to_stage_indices(indices: np.ndarray, packs: List[List[int]]) -> List[List[int]]:
    """``packs`` index into ``indices`` (one split's staging indices); returns each pack's
    staging indices, with one vectorized gather instead of a loop over numpy scalars."""
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64,
                       count=sum(len(p) for p in packs))
    cuts = np.cumsum([len(p) for p in packs])[:-1]
    return [part.tolist() for part in np.split(indices[flat], cuts)]


def _plan_split(name: str, indices: np.ndarray, index: StageIndex, config: PreprocessConfig,
                documents: Optional[np.ndarray] = None) -> Tuple[SplitPlan, Dict[str, float]]:
    """Pack one split: what the writer writes, in order, and the split's statistics.
    ``documents``: for a text dataset, per staged sample whether it ends its document (the
    split's ``documents``)."""
    seq_length = config.packing.seq_length
    lengths = index.column("length")[indices]
    packs = to_stage_indices(indices, pack(lengths, seq_length, config.packing.packing))
    if config.packing.shuffle:
        rng = np.random.default_rng(config.packing.seed + (0 if name == "train" else 1))
        packs = [packs[i] for i in rng.permutation(len(packs))]
    sizes = np.fromiter((len(p) for p in packs), dtype=np.int64, count=len(packs))
    members = np.fromiter((i for p in packs for i in p), dtype=np.int64, count=int(sizes.sum()))
    total = int(lengths.sum())
    stats = {
        "conversations": int(indices.shape[0]),
        "turns": int(index.column("turns")[indices].sum()), "tokens": total,
        "loss_tokens": int(index.column("loss_tokens")[indices].sum()), "packs": len(packs),
        "packing_efficiency": round(packing_efficiency(lengths, packs, seq_length), 6),
        "padding_tokens": len(packs) * seq_length - total,
    }
    if documents is not None:
        stats["documents"] = int(documents[indices].sum())
    return SplitPlan(name, members, sizes), stats


def _check_destination(config: PreprocessConfig) -> None:
    prefix = config.output.output_prefix
    _clear_leftovers(prefix)
    existing = [p for p in output_files(prefix, ("train", "valid")) if os.path.exists(p)]
    if existing and not config.output.overwrite:
        partial = "" if os.path.exists(metadata_path(prefix)) else (
            " (without its metadata: files of a run stopped while it published them)")
        raise PreprocessError(
            f"{existing[0]} already exists{partial}; pass --overwrite to replace the dataset at "
            f"--output-prefix {prefix}, or choose another prefix"
        )
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)


def _clear_leftovers(prefix: str) -> None:
    """Temporary folders ``PREFIX.tmp-HOST-PID`` (``files``) of runs killed on this host
    (SIGKILL, an OOM) are removed, and named; one whose process still runs, or one of another
    host (a node of a shared file system: running or not, this host cannot tell), is another run
    writing this prefix, which is refused."""
    for leftover in leftovers(prefix):
        if not os.path.isdir(leftover.path):
            continue
        if leftover.state == "alive":
            raise PreprocessError(
                f"{leftover.path} belongs to a preprocessing run that is still running (pid "
                f"{leftover.pid}) and writes --output-prefix {prefix}; wait for it, or stop it "
                "and run again")
        if leftover.state == "elsewhere":
            raise PreprocessError(
                f"{leftover.path} belongs to a preprocessing run on host {leftover.host} (pid "
                f"{leftover.pid}) that writes --output-prefix {prefix} or was killed there; "
                f"wait for it, or remove {leftover.path} once that run is gone")
        shutil.rmtree(leftover.path, ignore_errors=True)
        print(f"removed {leftover.path}, left by an interrupted run (pid {leftover.pid})",
              file=sys.stderr)


def _make_processor(config: PreprocessConfig) -> Tuple[RecordProcessor, object]:
    tok = config.tokenizer
    processor = RecordProcessor(
        tokenizer_type=tok.tokenizer_type,
        tokenizer_location=tok.tokenizer_location,
        template_name=tok.template,
        input_format=None if config.inputs.input_format == "auto" else config.inputs.input_format,
        seq_length=config.packing.seq_length,
        overlong=config.packing.overlong,
        empty_reply=config.inputs.empty_reply,
        text_key=config.inputs.text_key,
        train_on=config.tokenizer.train_on,
        reasoning=config.tokenizer.reasoning,
        template_timeout=config.tokenizer.template_timeout,
    )
    try:
        tokenizer = processor.setup()  # appends missing special tokens once, here
    except (TokenizerError, ValueError) as exc:
        raise PreprocessError(str(exc)) from None
    processor.vocab_size = int(tokenizer.vocab_size)
    processor.token_dtype = staging_dtype(tokenizer.vocab_size - 1).name
    processor.count_dtype = staging_dtype(config.packing.seq_length).name
    if config.output.workers > 1:
        processor.share_encoder()  # workers of a built-in template then skip transformers
    try:  # --template hf: the chat template's end-of-turn, found (or refused) before reading
        with time_limit(10 * tok.template_timeout):  # the probe renders a few dozen times
            end_of_turn_id(tok.template, tokenizer)
    except (TokenizerError, ValueError) as exc:
        raise PreprocessError(str(exc)) from None
    except RenderTimeout:
        raise PreprocessError(
            f"--tokenizer-path {tok.tokenizer_path}: its chat template did not finish rendering "
            f"the probe conversations in {10 * tok.template_timeout:g} s (10 x "
            "--template-timeout): a loop that never ends? Fix the template") from None
    return processor, tokenizer


def _input_files(config: PreprocessConfig) -> List[Tuple[str, bool]]:
    try:
        train = expand_inputs(config.inputs.input)
        valid = expand_inputs(config.inputs.valid_input) if config.inputs.valid_input else []
    except InputError as exc:
        raise PreprocessError(str(exc)) from None
    return [(p, False) for p in train] + [(p, True) for p in valid]


def _stage_all(files, processor, index: StageIndex, folder: str, config: PreprocessConfig,
               progress) -> Tally:
    tally = Tally()
    total_bytes = sum(os.path.getsize(p) for p, _ in files)
    bar = progress(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")
    try:
        batches = _batches(_numbered(files), BATCH)
        for batch, shard, outcomes in _bounded_map(processor, batches, config.output.workers,
                                                   folder):
            shard_id = index.shard_id(shard)
            for (_, record, valid), outcome in zip(batch, outcomes):
                _account(outcome, record, valid, tally, index, shard_id, config.inputs.on_error)
                bar.update(record.nbytes)
            bar.set_postfix_str(f"{tally.read:,} conversations")
    except InputError as exc:
        raise PreprocessError(str(exc)) from None
    finally:
        bar.close()
    return tally


def _summary(tally: Tally, splits: Dict[str, Dict], elapsed: float) -> Dict:
    tokens = sum(s["tokens"] for s in splits.values())
    return {
        "kind": tally.kind,
        "documents_split": tally.documents_split,
        "conversations_read": tally.read,
        "conversations_kept": tally.kept,
        "samples_kept": len(tally.record_of_sample),
        "skipped": dict(sorted(tally.skipped.items())),
        "dropped": dict(sorted(tally.dropped.items())),
        "notes": dict(sorted(tally.notes.items())),
        "truncated": tally.truncated,
        "turns_removed_by_truncation": tally.turns_removed,
        "empty_files": tally.empty_files,
        "examples": tally.examples,
        "splits": splits,
        "elapsed_seconds": round(elapsed, 3),
        "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else 0.0,
    }


def _metadata(config, tokenizer, processor, summary, argv) -> Dict:
    info = tokenizer.info()
    return {
        "format_version": FORMAT_VERSION,
        "mt_dialog_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(argv) if argv is not None else None,
        "config": to_dict(config),
        "tokenizer": to_dict(info),
        "template": config.tokenizer.template,
        "kind": summary["kind"],
        "seq_length": config.packing.seq_length,
        "special_ids": {
            "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
            "end_of_turn": end_of_turn_id(config.tokenizer.template, tokenizer),
            "stops": list(stop_ids(config.tokenizer.template, tokenizer)),
            "added": info.added_tokens,
        },
        "packing": config.packing.packing,
        "seed": config.packing.seed,
        "shuffle": config.packing.shuffle,
        "splits": {k: v for k, v in summary["splits"].items() if v["packs"] > 0},
        "summary": summary,
    }


def _publish(tmp_prefix: str, prefix: str, splits: Sequence[str]) -> None:
    """Move the finished files into place, the new metadata last. With ``--overwrite`` the old
    dataset's files are first moved into the staging folder (old metadata first: a reader never
    sees it with new files), and removed with it only after the new ones are in place."""
    aside = os.path.join(os.path.dirname(tmp_prefix), "replaced")
    for stale in output_files(prefix, ("train", "valid"))[::-1]:
        if os.path.exists(stale):
            os.makedirs(aside, exist_ok=True)
            os.replace(stale, os.path.join(aside, os.path.basename(stale)))
    for source, target in zip(output_files(tmp_prefix, splits), output_files(prefix, splits)):
        os.replace(source, target)


def _write(writer, index: StageIndex, plans: List[SplitPlan], folder: str, tmp_prefix: str,
           processor: RecordProcessor, vocab_size: int, config: PreprocessConfig) -> None:
    job = WriteJob(
        stage_folder=folder, shard_names=list(index.shard_names),
        token_dtype=processor.token_dtype, count_dtype=processor.count_dtype,
        shard=index.column("shard"), offset=index.column("offset"),
        length=index.column("length"), splits=plans, prefix=tmp_prefix, vocab_size=vocab_size,
        seq_length=config.packing.seq_length, progress=config.output.progress,
    )
    try:
        writer.write(job)
    except WriterError as exc:
        raise PreprocessError(str(exc)) from None


def run_preprocess(config: PreprocessConfig, argv: Optional[Sequence[str]] = None,
                   separate_writer: Optional[bool] = None) -> Dict:
    """Run the whole pipeline; returns the metadata written beside the data.

    ``separate_writer``: write the packed files in a writer process that imports megatron-core
    while the conversations are rendered (True), in this process (False), or decide (None: a
    writer process unless megatron-core's indexed_dataset is already imported here)."""
    start = time.time()
    progress = progress_factory(config.output.progress)
    _check_destination(config)
    files = _input_files(config)
    prefix = config.output.output_prefix
    tmp_dir = temp_path(prefix)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    writer = None
    try:
        writer = open_writer(separate_writer)  # first: its import overlaps everything below
        processor, tokenizer = _make_processor(config)
        index = StageIndex()
        tally = _stage_all(files, processor, index, tmp_dir, config, progress)
        if tally.kept == 0:
            raise PreprocessError(
                f"no conversation was kept ({tally.read} read, skipped: {dict(tally.skipped)}, "
                f"dropped: {dict(tally.dropped)}); nothing to write"
            )
        tmp_prefix = os.path.join(tmp_dir, os.path.basename(prefix))
        records = np.frombuffer(tally.record_of_sample, dtype=np.int64)
        ends = np.r_[records[1:] != records[:-1], True] if tally.kind == "text" else None
        planned = {name: _plan_split(name, indices, index, config, ends)
                   for name, indices in _assign_splits(index, config, records).items()
                   if indices.size}
        _write(writer, index, [plan for plan, _ in planned.values()], tmp_dir, tmp_prefix,
               processor, tokenizer.vocab_size, config)
        splits = {name: stats for name, (_, stats) in planned.items()}
        summary = _summary(tally, splits, time.time() - start)
        metadata = _metadata(config, tokenizer, processor, summary, argv)
        metadata["files"] = file_records(tmp_prefix, list(splits))  # sizes and sha256
        write_metadata(tmp_prefix, metadata)
        _publish(tmp_prefix, prefix, list(splits))
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return metadata


def format_summary(summary: Dict) -> str:
    """The final summary table, as printed by the tool (a text dataset's records are documents,
    its samples their pieces)."""
    text = summary.get("kind") == "text"
    unit = "documents" if text else "conversations"
    rows = [(f"{unit} read", f"{summary['conversations_read']:,}"),
            ("  kept", f"{summary['conversations_kept']:,}")]
    samples = summary.get("samples_kept", summary["conversations_kept"])
    if text:
        rows.append(("  pieces kept (documents cut by --overlong split)",
                     f"{samples:,} ({summary.get('documents_split', 0):,} documents cut)"))
    elif samples != summary["conversations_kept"]:
        rows.append(("  samples kept (--reasoning per-turn)", f"{samples:,}"))
    rows += [(f"  skipped: {k}", f"{v:,}") for k, v in summary["skipped"].items()]
    rows += [(f"  dropped: {k}", f"{v:,}") for k, v in summary["dropped"].items()]
    rows += [(f"  kept, note: {k}", f"{v:,} records") for k, v in summary.get("notes", {}).items()]
    rows.append(("  truncated (kept, first piece only)" if text else
                 "  truncated (kept, whole turns removed)",
                 f"{summary['truncated']:,} ({summary['turns_removed_by_truncation']:,} "
                 f"{'pieces' if text else 'turns'})"))
    if summary["empty_files"]:
        rows.append(("empty files skipped", f"{summary['empty_files']:,}"))
    for name, split in summary["splits"].items():
        counted = (f"{name}: documents / pieces", f"{split.get('documents', 0):,} / "
                   f"{split['conversations']:,}") if text else (
            f"{name}: conversations / turns", f"{split['conversations']:,} / {split['turns']:,}")
        rows += [
            counted,
            (f"{name}: tokens / loss tokens", f"{split['tokens']:,} / {split['loss_tokens']:,}"),
            (f"{name}: packs / efficiency",
             f"{split['packs']:,} / {100 * split['packing_efficiency']:.2f}%"),
        ]
    rows += [("elapsed", f"{summary['elapsed_seconds']:.2f} s"),
             ("tokens/s", f"{summary['tokens_per_second']:,.0f}")]
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
    for reason, example in summary["examples"].items():
        lines.append(f"e.g. {reason}: {example}")
    return "\n".join(lines)
