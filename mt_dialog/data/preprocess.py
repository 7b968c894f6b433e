"""The preprocessing run: read -> render (parallel) -> stage on disk -> split -> pack -> write.

Memory stays O(number of conversations): records are streamed to the workers with a bounded
window, and rendered conversations are appended to a staging indexed dataset on disk; only their
lengths stay in RAM for packing. Outputs are written into a temporary folder beside the output
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
from mt_dialog.config_utils import to_dict
from mt_dialog.data.config import PreprocessConfig
from mt_dialog.data.packing import pack, packing_efficiency
from mt_dialog.data.readers import InputError, RawRecord, expand_inputs, iter_records
from mt_dialog.data.records import RecordProcessor, run_batch
from mt_dialog.data.render import resolve_template
from mt_dialog.data.storage import (
    FORMAT_VERSION,
    PackWriter,
    count_dtype,
    count_turns,
    open_indexed,
    output_files,
    token_dtype,
    write_metadata,
)
from mt_dialog.data.templates import HF_TEMPLATE, get_template
from mt_dialog.data.tokenizers import TokenizerError

BATCH = 64
WINDOW_PER_WORKER = 8


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


class Stage:
    """Kept conversations in arrival order: tokens on disk, lengths and splits in RAM."""

    def __init__(self, folder: str, vocab_size: int, seq_length: int) -> None:
        self.writer = PackWriter(os.path.join(folder, "stage"), "all", vocab_size, seq_length)
        self.folder = folder
        self.lengths = array("q")
        self.is_valid = array("b")

    def add(self, tokens: np.ndarray, counts: np.ndarray, valid: bool) -> None:
        self.writer.add_pack([tokens], [counts])  # one conversation per staging document
        self.lengths.append(int(tokens.shape[0]))
        self.is_valid.append(1 if valid else 0)

    def open(self):
        self.writer.finalize()
        prefix = os.path.join(self.folder, "stage.all")
        return open_indexed(prefix + ".tokens"), open_indexed(prefix + ".loss_token_num")


def _numbered(files: Sequence[Tuple[str, bool]]) -> Iterator[Tuple[int, RawRecord, bool]]:
    number = 0
    for path, valid in files:
        for record in iter_records(path):
            if record.error is None:
                number += 1
            yield number, record, valid


def _batches(stream, size: int):
    batch: List = []
    for item in stream:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _bounded_map(processor: RecordProcessor, batches, workers: int):
    """Ordered results of ``processor`` over ``batches``, at most a window of batches in flight."""
    if workers == 1:
        for batch in batches:
            yield batch, processor.process([(n, r) for n, r, _ in batch])
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        pending: deque = deque()
        for batch in batches:
            job = pool.apply_async(run_batch, (processor, [(n, r) for n, r, _ in batch]))
            pending.append((batch, job))
            if len(pending) >= workers * WINDOW_PER_WORKER:
                done, job = pending.popleft()
                yield done, job.get()
        while pending:
            done, job = pending.popleft()
            yield done, job.get()


def _account(outcome, record: RawRecord, valid: bool, tally: Tally, stage: Stage,
             on_error: str) -> None:
    status = outcome[0]
    if status == "error" and outcome[2] == "empty_file":  # a file, not a conversation
        if on_error == "raise":
            raise PreprocessError(f"{outcome[3]}; or use --on-error skip to skip empty files")
        tally.empty_files += 1
        tally.examples.setdefault("empty_file", outcome[3])
        return
    tally.read += 1
    if status == "ok":
        tally.kept += 1
        if outcome[4]:
            tally.truncated += 1
            tally.turns_removed += outcome[4]
        stage.add(outcome[2], outcome[3], valid)
        return
    reason, message = outcome[2], outcome[3]
    if status == "error" and reason == "overlong":
        raise PreprocessError(message)  # --overlong error: the message names the fixes
    if status == "error" and on_error == "raise":
        raise PreprocessError(f"{message}; or use --on-error skip to skip and count such records")
    (tally.dropped if status == "dropped" else tally.skipped)[reason] += 1
    tally.examples.setdefault(reason, message)


def _assign_splits(stage: Stage, config: PreprocessConfig) -> Dict[str, np.ndarray]:
    """Staging indices of each split (seeded random split unless --valid-input was given)."""
    flags = np.frombuffer(stage.is_valid, dtype=np.int8) if len(stage.is_valid) else np.zeros(0)
    if config.inputs.valid_input:
        return {"train": np.flatnonzero(flags == 0), "valid": np.flatnonzero(flags == 1)}
    count = len(stage.lengths)
    _, valid_fraction = config.packing.split_fractions()
    n_valid = int(round(count * valid_fraction))
    if valid_fraction > 0 and n_valid == 0 and count >= 2:
        n_valid = 1  # a requested validation split is never silently empty
    order = np.random.default_rng(config.packing.seed).permutation(count)
    return {"train": np.sort(order[n_valid:]), "valid": np.sort(order[:n_valid])}


def to_stage_indices(indices: np.ndarray, packs: List[List[int]]) -> List[List[int]]:
    """``packs`` index into ``indices`` (one split's staging indices); returns each pack's
    staging indices, with one vectorized gather instead of a loop over numpy scalars."""
    flat = np.fromiter((i for p in packs for i in p), dtype=np.int64,
                       count=sum(len(p) for p in packs))
    cuts = np.cumsum([len(p) for p in packs])[:-1]
    return [part.tolist() for part in np.split(indices[flat], cuts)]


def _write_split(name: str, indices: np.ndarray, stage: Stage, staged, tmp_prefix: str,
                 config: PreprocessConfig, vocab_size: int, progress) -> Dict[str, float]:
    """Pack one split and write it; returns its statistics."""
    seq_length = config.packing.seq_length
    lengths = np.frombuffer(stage.lengths, dtype=np.int64)[indices]
    packs = to_stage_indices(indices, pack(lengths, seq_length, config.packing.packing))
    if config.packing.shuffle:
        rng = np.random.default_rng(config.packing.seed + (0 if name == "train" else 1))
        packs = [packs[i] for i in rng.permutation(len(packs))]
    writer = PackWriter(tmp_prefix, name, vocab_size, seq_length)
    tokens_ds, counts_ds = staged
    stats = Counter()
    for members in progress(packs, desc=f"writing {name}", unit="pack"):
        tokens = [tokens_ds[m] for m in members]
        counts = [counts_ds[m] for m in members]
        writer.add_pack(tokens, counts)
        for c in counts:
            stats["turns"] += count_turns(c)
            stats["loss_tokens"] += int(np.count_nonzero(c))
    writer.finalize()
    total = int(lengths.sum())
    return {
        "conversations": int(indices.shape[0]), "turns": stats["turns"], "tokens": total,
        "loss_tokens": stats["loss_tokens"], "packs": len(packs),
        "packing_efficiency": round(packing_efficiency(lengths, packs, seq_length), 6),
        "padding_tokens": len(packs) * seq_length - total,
    }


def _progress_factory(enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a bar is never worth a crash
        tqdm = None

    def progress(iterable=None, **kwargs):
        if tqdm is None or not enabled:
            return iterable if iterable is not None else _NullBar()
        return tqdm(iterable, file=sys.stderr, dynamic_ncols=True, **kwargs)

    return progress


class _NullBar:
    def update(self, *_):
        pass

    def set_postfix_str(self, *_):
        pass

    def close(self):
        pass


def _check_destination(config: PreprocessConfig) -> None:
    prefix = config.output.output_prefix
    existing = [p for p in output_files(prefix, ("train", "valid")) if os.path.exists(p)]
    if existing and not config.output.overwrite:
        raise PreprocessError(
            f"{existing[0]} already exists; pass --overwrite to replace the dataset at "
            f"--output-prefix {prefix}, or choose another prefix"
        )
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)


def _make_processor(config: PreprocessConfig) -> Tuple[RecordProcessor, object]:
    tok = config.tokenizer
    processor = RecordProcessor(
        tokenizer_type=tok.tokenizer_type,
        tokenizer_location=tok.tokenizer_location,
        template_name=tok.template,
        input_format=None if config.inputs.input_format == "auto" else config.inputs.input_format,
        seq_length=config.packing.seq_length,
        overlong=config.packing.overlong,
    )
    try:
        tokenizer = processor.setup()  # appends missing special tokens once, here
    except (TokenizerError, ValueError) as exc:
        raise PreprocessError(str(exc)) from None
    processor.token_dtype = np.dtype(token_dtype(tokenizer.vocab_size)).name
    processor.count_dtype = np.dtype(count_dtype(config.packing.seq_length)).name
    if tok.template == HF_TEMPLATE and not tokenizer.chat_template:
        raise PreprocessError(
            f"--template hf: the tokenizer in {tok.tokenizer_path} has no chat template; "
            "choose a built-in --template"
        )
    return processor, tokenizer


def _input_files(config: PreprocessConfig) -> List[Tuple[str, bool]]:
    try:
        train = expand_inputs(config.inputs.input)
        valid = expand_inputs(config.inputs.valid_input) if config.inputs.valid_input else []
    except InputError as exc:
        raise PreprocessError(str(exc)) from None
    return [(p, False) for p in train] + [(p, True) for p in valid]


def _stage_all(files, processor, stage: Stage, config: PreprocessConfig, progress) -> Tally:
    tally = Tally()
    total_bytes = sum(os.path.getsize(p) for p, _ in files)
    bar = progress(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")
    try:
        batches = _batches(_numbered(files), BATCH)
        for batch, outcomes in _bounded_map(processor, batches, config.output.workers):
            for (_, record, valid), outcome in zip(batch, outcomes):
                _account(outcome, record, valid, tally, stage, config.inputs.on_error)
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
        "conversations_read": tally.read,
        "conversations_kept": tally.kept,
        "skipped": dict(sorted(tally.skipped.items())),
        "dropped": dict(sorted(tally.dropped.items())),
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
    template = None
    if config.tokenizer.template != HF_TEMPLATE:
        template = resolve_template(get_template(config.tokenizer.template), tokenizer)
    return {
        "format_version": FORMAT_VERSION,
        "mt_dialog_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": list(argv) if argv is not None else None,
        "config": to_dict(config),
        "tokenizer": to_dict(info),
        "template": config.tokenizer.template,
        "seq_length": config.packing.seq_length,
        "special_ids": {
            "bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
            "end_of_turn": template.end_of_turn if template else tokenizer.eos_id,
            "added": info.added_tokens,
        },
        "packing": config.packing.packing,
        "seed": config.packing.seed,
        "shuffle": config.packing.shuffle,
        "splits": {k: v for k, v in summary["splits"].items() if v["packs"] > 0},
        "summary": summary,
    }


def _publish(tmp_prefix: str, prefix: str, splits: Sequence[str]) -> None:
    """Move finished files into place: old metadata out first, new metadata in last."""
    for stale in output_files(prefix, ("train", "valid"))[::-1]:
        if os.path.exists(stale):
            os.remove(stale)
    for source, target in zip(output_files(tmp_prefix, splits), output_files(prefix, splits)):
        os.replace(source, target)


def run_preprocess(config: PreprocessConfig, argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the whole pipeline; returns the metadata written beside the data."""
    start = time.time()
    progress = _progress_factory(config.output.progress)
    _check_destination(config)
    files = _input_files(config)
    processor, tokenizer = _make_processor(config)
    prefix = config.output.output_prefix
    tmp_dir = f"{prefix}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        stage = Stage(tmp_dir, tokenizer.vocab_size, config.packing.seq_length)
        tally = _stage_all(files, processor, stage, config, progress)
        if tally.kept == 0:
            raise PreprocessError(
                f"no conversation was kept ({tally.read} read, skipped: {dict(tally.skipped)}, "
                f"dropped: {dict(tally.dropped)}); nothing to write"
            )
        staged = stage.open()
        tmp_prefix = os.path.join(tmp_dir, os.path.basename(prefix))
        splits = {
            name: _write_split(name, indices, stage, staged, tmp_prefix, config,
                               tokenizer.vocab_size, progress)
            for name, indices in _assign_splits(stage, config).items()
            if indices.size
        }
        del staged
        summary = _summary(tally, splits, time.time() - start)
        metadata = _metadata(config, tokenizer, processor, summary, argv)
        write_metadata(tmp_prefix, metadata)
        _publish(tmp_prefix, prefix, list(splits))
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return metadata


def format_summary(summary: Dict) -> str:
    """The final summary table, as printed by the tool."""
    rows = [("conversations read", f"{summary['conversations_read']:,}"),
            ("  kept", f"{summary['conversations_kept']:,}")]
    rows += [(f"  skipped: {k}", f"{v:,}") for k, v in summary["skipped"].items()]
    rows += [(f"  dropped: {k}", f"{v:,}") for k, v in summary["dropped"].items()]
    rows.append(("  truncated (kept, whole turns removed)",
                 f"{summary['truncated']:,} ({summary['turns_removed_by_truncation']:,} turns)"))
    if summary["empty_files"]:
        rows.append(("empty files skipped", f"{summary['empty_files']:,}"))
    for name, split in summary["splits"].items():
        rows += [
            (f"{name}: conversations / turns", f"{split['conversations']:,} / {split['turns']:,}"),
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
