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

import json
import os
import warnings
from typing import Any, Dict, Sequence

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
    """A memory-mapped megatron ``IndexedDataset`` at ``prefix``."""
    return indexed_dataset_module().IndexedDataset(prefix)


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


def write_metadata(prefix: str, metadata: Dict[str, Any]) -> None:
    with open(metadata_path(prefix), "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2, ensure_ascii=False)
        handle.write("\n")


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
    return metadata
