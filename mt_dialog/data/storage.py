"""On-disk layout of a packed dialogue dataset, written and read with megatron-core's
``indexed_dataset`` (``IndexedDatasetBuilder`` / ``IndexedDataset``).

For ``--output-prefix OUT``::

    OUT.meta.json                       metadata: version, tokenizer, template, stats, command
    OUT.train.tokens.{bin,idx}          token ids            (uint16 if the vocab fits, else int32)
    OUT.train.loss_token_num.{bin,idx}  per-token turn length (uint16 if seq length fits, else int32)
    OUT.valid.tokens.{bin,idx}          the same for the validation split (when it has packs)
    OUT.valid.loss_token_num.{bin,idx}

In both indexed datasets a *document is a pack* and its *sequences are the pack's conversations*
(``document_indices`` delimit packs, ``sequence_lengths`` are conversation lengths)::

    pack 0 = document 0:  | conv 7 (812 tok) | conv 2 (3,100 tok) | conv 9 (180 tok) |  (4,092 <= 4,096)
    pack 1 = document 1:  | conv 4 (4,000 tok) | conv 5 (90 tok) |

``loss_mask`` is not stored: it is ``loss_token_num > 0``. Padding is not stored either: the
dataset pads each pack to the sequence length when reading.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

FORMAT_VERSION = 1
FIELDS = ("tokens", "loss_token_num")
SPLITS = ("train", "valid")


class DatasetFormatError(ValueError):
    """A packed dataset is missing, of another version, or does not match the run."""


def metadata_path(prefix: str) -> str:
    return f"{prefix}.meta.json"


def field_prefix(prefix: str, split: str, field: str) -> str:
    return f"{prefix}.{split}.{field}"


def output_files(prefix: str, splits: Sequence[str]) -> list:
    """Every file a dataset at ``prefix`` with these splits consists of (metadata last)."""
    files = [
        field_prefix(prefix, split, field) + suffix
        for split in splits
        for field in FIELDS
        for suffix in (".bin", ".idx")
    ]
    return files + [metadata_path(prefix)]


def indexed_dataset_module():
    """megatron-core's ``indexed_dataset`` module, imported without the TE/apex notices that
    megatron-core prints when it loads on a machine without them (they do not apply here)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
        from megatron.core.datasets import indexed_dataset
    return indexed_dataset


def open_indexed(prefix: str):
    """A memory-mapped megatron ``IndexedDataset`` at ``prefix``, checked to be whole: the
    ``.idx`` readable and of the size its header implies, the ``.bin`` exactly the bytes the index
    points into (a copy cut short or padded is caught here, not mid-training).

    Raises:
        DatasetFormatError: naming the file, the expected and found sizes, and the fix.
    """
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for path in (idx, bin_):
        if not os.path.isfile(path):
            raise DatasetFormatError(f"{path} is missing; {rebuild_hint(prefix)}")
    _check_index_header(idx)  # megatron's reader would fail with an assert (and a noisy __del__)
    dataset = indexed_dataset_module().IndexedDataset(prefix)
    index = dataset.index
    end = (int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size
           if index.sequence_count else 0)
    _expect_size(bin_, end, f"its index {os.path.basename(idx)}")
    return dataset


INDEX_MAGIC = b"MMIDIDX\x00\x00"  # megatron-core indexed_dataset: magic, version 1, dtype code,
INDEX_HEADER = struct.Struct("<9sQBQQ")  # sequence count, document count (then the arrays)


def _check_index_header(idx: str) -> None:
    """The ``.idx`` header is megatron's (magic, version 1, a known dtype) and the file is as long
    as the arrays it announces (int32 lengths + int64 pointers per sequence, int64 per document).

    Raises:
        DatasetFormatError: naming the file, what is wrong, and the fix.
    """
    with open(idx, "rb") as handle:
        header = handle.read(INDEX_HEADER.size)
    if len(header) < INDEX_HEADER.size:
        raise DatasetFormatError(f"{idx} is damaged (only {len(header)} bytes, shorter than an "
                                 f"index header); {rebuild_hint(idx)}")
    magic, version, code, sequences, documents = INDEX_HEADER.unpack(header)
    codes = {member.value for member in indexed_dataset_module().DType}
    if magic != INDEX_MAGIC or version != 1 or code not in codes:
        raise DatasetFormatError(f"{idx} is damaged (not a megatron-core version-1 index: "
                                 f"header {magic!r}, version {version}, dtype code {code}); "
                                 f"{rebuild_hint(idx)}")
    _expect_size(idx, INDEX_HEADER.size + sequences * 12 + documents * 8, "its header")


def rebuild_hint(path: str) -> str:
    """The fix for a damaged file of the dataset that ``path`` (a dataset, split-field or file
    prefix) belongs to."""
    prefix = path
    for suffix in (".bin", ".idx"):
        prefix = prefix[: -len(suffix)] if prefix.endswith(suffix) else prefix
    for split in SPLITS:
        for field in FIELDS:
            prefix = prefix.split(f".{split}.{field}")[0]
    return (f"check it with tools/inspect_dialog_dataset.py {prefix} --verify, then copy it "
            "again or rebuild it with tools/preprocess_dialog.py")


def _expect_size(path: str, expected: int, source: str, hint: Optional[str] = None) -> None:
    found = os.path.getsize(path)
    if found != expected:
        how = "cut short" if found < expected else "too long"
        raise DatasetFormatError(f"{path} has {found:,} bytes but {source} says {expected:,} "
                                 f"({how}: a damaged, partial or swapped copy?); "
                                 f"{hint or rebuild_hint(path)}")


PROBE_BYTES = 1 << 16  # read from each end of a file for its cheap identity (``probe_sha256``)


def probe_sha256(path: str) -> str:
    """SHA-256 of a file's first and last ``PROBE_BYTES`` (its size is checked beside it): cheap
    enough for every open, and a file swapped in from another build of the same size (other
    packing, shuffle, split) differs there."""
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        digest.update(handle.read(PROBE_BYTES))
        if size > PROBE_BYTES:
            handle.seek(max(PROBE_BYTES, size - PROBE_BYTES))
            digest.update(handle.read(PROBE_BYTES))
    return digest.hexdigest()


def file_records(prefix: str, splits: Sequence[str]) -> Dict[str, Dict]:
    """``{file name: {"bytes", "probe_sha256", "sha256"}}`` of a dataset's data files, recorded
    in the metadata at preprocessing so that a damaged, swapped or edited file is told from a
    good one: size and probe when the dataset is opened, every byte by ``--verify``."""
    from mt_dialog.data.tokenizers import file_sha256

    records = {}
    for path in output_files(prefix, splits)[:-1]:
        records[os.path.basename(path)[len(os.path.basename(prefix)):].lstrip(".")] = {
            "bytes": os.path.getsize(path), "probe_sha256": probe_sha256(path),
            "sha256": file_sha256(path)}
    return records


def check_recorded_files(prefix: str, metadata: Dict[str, Any], split: str,
                         checksums: bool = False, hint: Optional[str] = None) -> None:
    """Compare one split's files with what the metadata recorded: size and probe (cheap, at
    every open) and, with ``checksums``, the SHA-256 of every byte; datasets written before the
    records existed are not checked. ``hint``: the fix to name (default ``rebuild_hint``).

    Raises:
        DatasetFormatError: the first file that differs, with both values and the fix.
    """
    from mt_dialog.data.tokenizers import file_sha256

    recorded = metadata.get("files") or {}
    for field in FIELDS:
        for suffix in (".bin", ".idx"):
            name = f"{split}.{field}{suffix}"
            if name not in recorded:
                continue
            path = field_prefix(prefix, split, field) + suffix
            fix = hint or rebuild_hint(path)
            _expect_size(path, int(recorded[name]["bytes"]), "the dataset's metadata", fix)
            for key, digest, what in (("probe_sha256", probe_sha256, "its first and last bytes"),
                                      ("sha256", file_sha256 if checksums else None, "its bytes")):
                if digest is None or not recorded[name].get(key):
                    continue
                found = digest(path)
                if found != recorded[name][key]:
                    raise DatasetFormatError(
                        f"{path}: {what} differ from what preprocessing recorded (sha256 "
                        f"{found[:12]}... instead of {recorded[name][key][:12]}...; same size: "
                        f"a swapped or edited file); {fix}")


def token_dtype(vocab_size: int) -> type:
    return indexed_dataset_module().DType.optimal_dtype(vocab_size)


def count_dtype(seq_length: int) -> type:
    return indexed_dataset_module().DType.optimal_dtype(seq_length + 1)


class PackWriter:
    """Writes packs of one split: two indexed datasets with the same index structure."""

    def __init__(self, prefix: str, split: str, vocab_size: int, seq_length: int) -> None:
        builder = indexed_dataset_module().IndexedDatasetBuilder
        self.prefixes = {f: field_prefix(prefix, split, f) for f in FIELDS}
        dtypes = {"tokens": token_dtype(vocab_size), "loss_token_num": count_dtype(seq_length)}
        self.builders = {
            f: builder(self.prefixes[f] + ".bin", dtype=dtypes[f]) for f in FIELDS
        }

    def add_pack(self, tokens: Sequence[np.ndarray], loss_token_num: Sequence[np.ndarray]) -> None:
        lengths = [int(t.shape[0]) for t in tokens]
        self.builders["tokens"].add_document(np.concatenate(tokens), lengths)
        self.builders["loss_token_num"].add_document(np.concatenate(loss_token_num), lengths)

    def finalize(self) -> None:
        for field, builder in self.builders.items():
            builder.finalize(self.prefixes[field] + ".idx")


def count_turns(counts: np.ndarray) -> int:
    """Turns with at least one loss token: each turn of n tokens carries n on n tokens."""
    trained = counts[counts > 0].astype(np.float64)
    return int(round(float(np.sum(1.0 / trained)))) if trained.size else 0


REPLY_LENGTH_EDGES = (4, 16, 64, 256)
"""Default upper edges (tokens, end-of-turn included) of the reply-length buckets of the
per-turn validation (``--eval-reply-length-buckets``) and of inspect's reply-length histogram."""


def bucket_names(edges: Sequence[int]) -> List[str]:
    """Names of the buckets of increasing upper ``edges``: (4, 16) -> ["1-4", "5-16", "17+"];
    a one-value bucket by its value ((1, 2) -> ["1", "2", "3+"]). Value v falls in bucket
    ``searchsorted(edges, v)`` (the first edge >= v)."""
    names, low = [], 1
    for edge in edges:
        names.append(f"{low}-{edge}" if edge > low else f"{edge}")
        low = edge + 1
    return names + [f"{low}+"]


METADATA_CHECKSUM = "metadata_sha256"


def _metadata_digest(metadata: Dict[str, Any]) -> str:
    """SHA-256 of the metadata's canonical JSON (sorted keys), its own checksum left out."""
    body = {key: value for key, value in metadata.items() if key != METADATA_CHECKSUM}
    text = json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_metadata(prefix: str, metadata: Dict[str, Any]) -> None:
    """Write ``PREFIX.meta.json`` with a checksum of its own content (``metadata_sha256``), so
    that a metadata edited after preprocessing (vocabulary, sequence length, template...) is
    refused when read instead of training on data it no longer describes."""
    metadata = dict(metadata, **{METADATA_CHECKSUM: _metadata_digest(metadata)})
    with open(metadata_path(prefix), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


KINDS = ("conversation", "text")


def dataset_kind(metadata: Dict[str, Any]) -> str:
    """What a dataset's records are (``KINDS``): "text" for plain-text documents (continued
    pretraining: each sequence of a pack is a document piece, every token trained but its
    first), "conversation" otherwise (and for datasets written before text existed)."""
    return metadata.get("kind") or "conversation"


def overlong_of(metadata: Dict[str, Any]) -> str:
    """The ``--overlong`` mode that took effect when the dataset was built: the recorded flag, or
    its default for the dataset's kind ("split" for text, "error" for conversations)."""
    packing = (metadata.get("config") or {}).get("packing") or {}
    default = "split" if dataset_kind(metadata) == "text" else "error"
    return packing.get("overlong") or default


def render_options_of(metadata: Dict[str, Any]) -> Dict[str, str]:
    """The ``--train-on`` / ``--reasoning`` a dataset was built with (its recorded preprocessing
    config), as ``RenderOptions`` keywords; empty for datasets that predate them."""
    tokenizer = (metadata.get("config") or {}).get("tokenizer") or {}
    return {key: tokenizer[key] for key in ("train_on", "reasoning") if key in tokenizer}


def read_metadata(prefix: str) -> Dict[str, Any]:
    """The metadata of the dataset at ``prefix``; refuses a missing file or another version."""
    path = metadata_path(prefix)
    if not os.path.isfile(path):
        raise DatasetFormatError(
            f"{path} not found: is {prefix!r} the --output-prefix of tools/preprocess_dialog.py "
            "(without the .train.tokens.bin suffix)?"
        )
    try:
        with open(path, encoding="utf-8") as handle:
            metadata = json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetFormatError(f"{path}: unreadable metadata ({exc}); rebuild the dataset") from None
    version = metadata.get("format_version")
    if version != FORMAT_VERSION:
        raise DatasetFormatError(
            f"{path}: format version {version} but this mt_dialog reads version {FORMAT_VERSION}; "
            "rebuild the dataset with this version's tools/preprocess_dialog.py"
        )
    recorded = metadata.get(METADATA_CHECKSUM)
    if recorded is not None and recorded != _metadata_digest(metadata):
        raise DatasetFormatError(
            f"{path} was edited after preprocessing (its content no longer matches its "
            f"{METADATA_CHECKSUM}); the files it describes were built with the original: "
            "restore it, or rebuild the dataset with tools/preprocess_dialog.py")
    return metadata
