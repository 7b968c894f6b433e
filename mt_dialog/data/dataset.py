"""Memory-mapped reader of packed dialogue datasets: one training sample per pack.

A pack of two conversations A (5 tokens) and B (4 tokens), ``seq_length`` 12, pad id P::

    position        0  1  2  3  4 | 5  6  7  8 | 9 10 11
    tokens          a0 a1 a2 a3 a4| b0 b1 b2 b3| P  P  P
    labels          a1 a2 a3 a4 b0| b1 b2 b3 P | P  P  P     (next token; pack-wide shift)
    loss_mask       0  1  1  0  0 | 0  1  1  0 | 0  0  0     (label is a trained reply token)
    loss_token_num  0  2  2  0  0 | 0  2  2  0 | 0  0  0     (length of the label's turn)
    position_ids    0  1  2  3  4 | 0  1  2  3 | 0  1  2     (restart per conversation)
    cu_seqlens      [0, 5, 9, 12]                           (padding is a segment of its own)
    turn_num        2                                       (assistant turns with a loss token)

The label of a conversation's last token is the next conversation's first token, which is never
trained (a conversation starts with prompt tokens), so the shift never trains across a boundary.
"""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import torch

from mt_dialog.data.storage import (
    DatasetFormatError,
    check_recorded_files,
    count_dtype,
    count_turns,
    field_prefix,
    open_indexed,
    read_metadata,
    rebuild_hint,
    token_dtype,
)


class PackedDialogDataset(torch.utils.data.Dataset):
    """Packs of one split of a dataset built by ``tools/preprocess_dialog.py``.

    Args:
        prefix: the ``--output-prefix`` the dataset was built with.
        split: ``"train"`` or ``"valid"``.
        seq_length: if given, must equal the dataset's sequence length.
        vocab_size: if given (the model's vocabulary), must cover the dataset's vocabulary.
        tokenizer_sha256: if given, must equal the hash of the tokenizer the dataset was built with.
        probe_files: compare each file's size and first/last bytes with the metadata's record
            (``storage.check_recorded_files``); ``--verify`` turns it off to report them itself.

    Raises:
        DatasetFormatError: a missing, damaged, swapped or edited file or metadata, or a dataset
            that does not match the arguments; the message names the file and the fix.
    """

    def __init__(
        self,
        prefix: str,
        split: str = "train",
        seq_length: Optional[int] = None,
        vocab_size: Optional[int] = None,
        tokenizer_sha256: Optional[str] = None,
        probe_files: bool = True,
    ) -> None:
        self.prefix = prefix
        self.split = split
        self.metadata = read_metadata(prefix)
        _check_metadata(self.metadata, prefix, split, seq_length, vocab_size, tokenizer_sha256)
        self.seq_length = int(self.metadata["seq_length"])
        self.pad_id = int(self.metadata["special_ids"]["pad"])
        if probe_files:  # (``--verify`` reads every byte itself, then checks the invariants)
            check_recorded_files(prefix, self.metadata, split)
        self.tokens = open_indexed(field_prefix(prefix, split, "tokens"))
        self.loss_token_num = open_indexed(field_prefix(prefix, split, "loss_token_num"))
        self.documents = self.tokens.document_indices
        self.vocab_size = int(self.metadata["tokenizer"]["vocab_size"])
        _check_layout(self, prefix, split)

    def __len__(self) -> int:
        return int(self.documents.shape[0]) - 1

    def raw_pack(self, index: int):
        """(tokens, loss_token_num, conversation lengths) of pack ``index``, unpadded."""
        if not 0 <= index < len(self):
            raise IndexError(f"pack {index} out of range (0..{len(self) - 1})")
        start, stop = int(self.documents[index]), int(self.documents[index + 1])
        tokens = np.concatenate(self.tokens[start:stop])
        counts = np.concatenate(self.loss_token_num[start:stop])
        lengths = self.tokens.sequence_lengths[start:stop].astype(np.int64)
        self._check_ids(tokens, index)
        return tokens, counts, lengths

    def _check_ids(self, tokens: np.ndarray, index: int) -> None:
        """Every id of pack ``index`` inside the dataset's vocabulary (the model's covers it,
        ``_check_metadata``): a damaged ``.bin`` never reaches the embedding, where
        megatron-core zeroes an out-of-range id's row at TP > 1 and masks its target, silently.
        One min and one max per pack: 10 us for 4,096 uint16 ids against 316 us for a whole
        ``__getitem__`` at seq length 512 (timeit, 2 busy CPU cores), about 3%."""
        if tokens.size and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            bad = int(tokens.max()) if int(tokens.max()) >= self.vocab_size else int(tokens.min())
            raise DatasetFormatError(
                f"{field_prefix(self.prefix, self.split, 'tokens')}.bin: pack {index} holds token "
                f"id {bad}, outside the dataset's vocabulary of {self.vocab_size} ids: the file "
                f"is damaged; {rebuild_hint(self.prefix)}")

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        tokens, counts, lengths = self.raw_pack(index)
        return build_sample(tokens, counts, lengths, self.seq_length, self.pad_id)


def build_sample(
    tokens: np.ndarray, counts: np.ndarray, lengths: np.ndarray, seq_length: int, pad_id: int
) -> Dict[str, np.ndarray]:
    """The training fields of one pack (see the module docstring for a drawn example)."""
    used = int(tokens.shape[0])
    padded = np.full(seq_length + 1, pad_id, dtype=np.int64)
    padded[:used] = tokens
    shifted_counts = np.zeros(seq_length + 1, dtype=np.int64)
    shifted_counts[: used - 1] = counts[1:used]
    boundaries = np.concatenate([[0], np.cumsum(lengths)])
    if used < seq_length:
        boundaries = np.concatenate([boundaries, [seq_length]])
    segment_lengths = np.diff(boundaries)
    starts = np.repeat(boundaries[:-1], segment_lengths)
    loss_token_num = shifted_counts[:seq_length]
    return {
        "tokens": padded[:seq_length],
        "labels": padded[1 : seq_length + 1],
        "loss_mask": (loss_token_num > 0).astype(np.float32),
        "loss_token_num": loss_token_num,
        "position_ids": np.arange(seq_length, dtype=np.int64) - starts,
        "cu_seqlens": boundaries.astype(np.int32),
        "turn_num": np.int64(count_turns(counts)),
        "num_tokens": np.int64(used),
    }


def _check_layout(dataset: PackedDialogDataset, prefix: str, split: str) -> None:
    """Cheap checks at open (no data read): tokens and loss_token_num have one index structure,
    the dtypes the vocabulary and sequence length imply, and the counts the metadata records."""
    tokens, counts = dataset.tokens, dataset.loss_token_num
    where = f"{prefix}.{split}"
    if not np.array_equal(dataset.documents, counts.document_indices) or not (
            np.array_equal(tokens.sequence_lengths, counts.sequence_lengths)):
        raise DatasetFormatError(f"{where}: the tokens and loss_token_num indexes describe "
                                 f"different packs; {rebuild_hint(prefix)}")
    meta = dataset.metadata
    wanted = {"tokens": token_dtype(int(meta["tokenizer"]["vocab_size"])),
              "loss_token_num": count_dtype(int(meta["seq_length"]))}
    for name, data in (("tokens", tokens), ("loss_token_num", counts)):
        if np.dtype(data.index.dtype) != np.dtype(wanted[name]):
            raise DatasetFormatError(
                f"{where}.{name}.idx stores {np.dtype(data.index.dtype).name} but this dataset's "
                f"metadata implies {np.dtype(wanted[name]).name} (a file of another dataset?); "
                f"{rebuild_hint(prefix)}")
    stats = meta["splits"][split]
    found = {"packs": len(dataset), "conversations": int(tokens.sequence_lengths.shape[0]),
             "tokens": int(tokens.sequence_lengths.sum(dtype=np.int64))}
    for key, value in found.items():
        if key in stats and int(stats[key]) != value:
            raise DatasetFormatError(
                f"{where}: the files hold {value:,} {key} but the metadata {prefix}.meta.json "
                f"records {int(stats[key]):,} (files of another dataset, or edited metadata?); "
                f"{rebuild_hint(prefix)}")


def _check_metadata(metadata, prefix, split, seq_length, vocab_size, tokenizer_sha256) -> None:
    where = f"dataset {prefix!r}"
    if split not in metadata.get("splits", {}):
        have = ", ".join(metadata.get("splits", {})) or "none"
        raise DatasetFormatError(f"{where} has no {split!r} split (it has: {have})")
    if seq_length is not None and int(metadata["seq_length"]) != seq_length:
        raise DatasetFormatError(
            f"{where} was packed for --seq-length {metadata['seq_length']} but the run uses "
            f"--seq-length {seq_length}; train with --seq-length {metadata['seq_length']} or "
            f"rebuild it with tools/preprocess_dialog.py --seq-length {seq_length}"
        )
    data_vocab = int(metadata["tokenizer"]["vocab_size"])
    if vocab_size is not None and data_vocab > vocab_size:
        raise DatasetFormatError(
            f"{where} uses token ids up to {data_vocab - 1} (vocabulary {data_vocab}) but the "
            f"model's vocabulary is {vocab_size}; use the tokenizer the dataset was built with"
        )
    data_hash = metadata["tokenizer"].get("sha256")
    if tokenizer_sha256 is not None and data_hash != tokenizer_sha256:
        raise DatasetFormatError(
            f"{where} was built with tokenizer {metadata['tokenizer']['path']} "
            f"(sha256 {str(data_hash)[:12]}...), not the one given (sha256 "
            f"{tokenizer_sha256[:12]}...); rebuild it or pass the same tokenizer"
        )
