"""Look inside a packed dataset: summary, a pack rendered with its trained tokens highlighted,
and ``verify``, which re-checks every invariant the training loss relies on.

A text dataset (``storage.dataset_kind``) holds document pieces instead of conversations; its
invariants: every token of a piece trained but the first, each carrying the piece's trained
tokens (one turn per piece); the eos only as a piece's last token; a piece that does not end
with it is a cut one (``--overlong split``), which fills its pack (``seq_length`` tokens); the
pieces ending with eos are the split's documents (under ``--overlong truncate`` every piece is
one document: its first piece, the rest left out)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.storage import (
    REPLY_LENGTH_EDGES,
    bucket_names,
    check_recorded_files,
    count_turns,
    dataset_kind,
    overlong_of,
)
from mt_dialog.data.tokenizers import DialogTokenizer

GREEN, RESET = "\033[1;32m", "\033[0m"
MAX_PROBLEMS = 20


def _segments(counts: np.ndarray):
    """(start, stop, trained) runs of equal trained-ness, a trained run cut into its turns (a
    turn of n tokens carries n on each: two replies can be adjacent, e.g. consecutive assistant
    messages with the firefly template)."""
    trained = counts > 0
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), counts.shape[0]]
    segments = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        while trained[a] and a + int(counts[a]) < b:  # a turn, then more trained tokens
            segments.append((a, a + int(counts[a]), True))
            a += int(counts[a])
        segments.append((a, b, bool(trained[a])))
    return segments


def _special_ids(metadata: Dict, tokenizer: Optional[DialogTokenizer]) -> set:
    """Every special token id: the metadata's and the tokenizer's own (control tokens of the
    base vocabulary, such as ``<|im_start|>`` in a SentencePiece model, included)."""
    ids = metadata["special_ids"]
    found = {ids.get("bos"), ids.get("eos"), ids.get("end_of_turn"), *ids.get("stops", ())}
    found |= set(ids.get("added", {}).values())
    if tokenizer is not None:
        found |= tokenizer.special_ids()
    return {int(i) for i in found if i is not None}


def _decode_visible(ids: List[int], tokenizer: Optional[DialogTokenizer], specials: set) -> str:
    """Text of ``ids`` with special tokens shown as their pieces (decoders usually hide them)."""
    if tokenizer is None:
        return " ".join(map(str, ids))
    out, run = [], []
    for token in ids + [None]:
        if token is None or token in specials:
            if run:
                out.append(tokenizer.decode(run))
                run = []
            if token is not None:
                out.append(tokenizer.id_to_piece(token))
        else:
            run.append(token)
    return "".join(out)


def render_pack(dataset: PackedDialogDataset, index: int, tokenizer: Optional[DialogTokenizer],
                color: bool) -> str:
    """Pack ``index`` as text, conversation by conversation; trained spans are green (color) or
    wrapped in ``[[ ]]`` with their turn length."""
    tokens, counts, lengths = dataset.raw_pack(index)
    text = dataset_kind(dataset.metadata) == "text"
    unit = "document pieces" if text else "conversations"
    lines = [f"pack {index} of {len(dataset)} ({dataset.split}): {len(lengths)} {unit}, "
             f"{int(lengths.sum()):,}/{dataset.seq_length:,} tokens, {count_turns(counts)} turns"]
    specials = _special_ids(dataset.metadata, tokenizer)
    eos = dataset.metadata["special_ids"].get("eos")
    cut = ("truncated: the rest of the document is left out"
           if overlong_of(dataset.metadata) == "truncate" else "cut: continues in another piece")
    start = 0
    for number, length in enumerate(lengths.tolist()):
        conv_tokens, conv_counts = tokens[start:start + length], counts[start:start + length]
        start += length
        if text:
            end = ("document end" if int(conv_tokens[-1]) == eos else cut)
            lines.append(f"--- document piece {number} ({length} tokens, {end}) ---")
        else:
            lines.append(f"--- conversation {number} ({length} tokens, "
                         f"{count_turns(conv_counts)} turns) ---")
        parts: List[str] = []
        for a, b, trained in _segments(conv_counts):
            ids = conv_tokens[a:b].tolist()
            shown = _decode_visible(ids, tokenizer, specials)
            if not trained:
                parts.append(shown)
            elif color:
                parts.append(f"{GREEN}{shown}{RESET}")
            else:
                parts.append(f"[[{shown}]](n={int(conv_counts[a])})")
        lines.append("".join(parts))
    return "\n".join(lines)


def _check_pack(tokens, counts, lengths, seq_length, vocab, end_of_turn, where,
                eos: Optional[int] = None) -> List[str]:
    """The invariants of one pack (``end_of_turn``: the set of ids a trained turn may end
    with); ``eos`` given: a text dataset's (``_check_pieces``)."""
    problems = []
    if int(lengths.sum()) > seq_length:
        problems.append(f"{where}: {int(lengths.sum())} tokens > seq length {seq_length}")
    if tokens.size and (int(tokens.max()) >= vocab or int(tokens.min()) < 0):
        problems.append(f"{where}: token id outside 0..{vocab - 1}")
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    if np.any(counts[starts] != 0):
        problems.append(f"{where}: a {'piece' if eos is not None else 'conversation'}'s first "
                        "token is trained")
    if eos is not None:
        return problems + _check_pieces(tokens, counts, starts, lengths, seq_length, eos, where)
    for a, b, trained in _segments(counts):
        if not trained:
            continue
        if np.any(counts[a:b] != b - a):
            problems.append(f"{where}: tokens {a}..{b - 1} carry loss_token_num "
                            f"{int(counts[a])} but the turn has {b - a} tokens")
        if int(tokens[b - 1]) not in end_of_turn:
            problems.append(f"{where}: turn ending at token {b - 1} does not end with the "
                            f"end-of-turn id {' or '.join(map(str, end_of_turn))}")
    return problems


def _check_pieces(tokens, counts, starts, lengths, seq_length, eos, where) -> List[str]:
    """A text pack's pieces (module docstring): all trained but the first token, each token
    carrying the piece's trained tokens; eos only last; a piece without it fills the pack."""
    problems = []
    for a, length in zip(starts.tolist(), lengths.tolist()):
        b = a + length
        if np.any(counts[a + 1:b] != length - 1):
            problems.append(f"{where}: piece at tokens {a}..{b - 1} does not train every token "
                            f"but its first with loss_token_num {length - 1}")
        if np.any(tokens[a:b - 1] == eos):
            problems.append(f"{where}: piece at tokens {a}..{b - 1} holds the eos id {eos} "
                            "before its end")
        if int(tokens[b - 1]) != eos and length != seq_length:
            problems.append(f"{where}: piece at tokens {a}..{b - 1} neither ends with the eos "
                            f"id {eos} nor fills the pack (a cut piece has {seq_length} tokens)")
    return problems


def verify_split(dataset: PackedDialogDataset) -> List[str]:
    """Every invariant of one split, and its totals against the metadata."""
    meta = dataset.metadata
    vocab = int(meta["tokenizer"]["vocab_size"])
    # every id a reply may end with (older metadata: the end-of-turn alone)
    end_of_turn = {int(i) for i in meta["special_ids"].get("stops")
                   or [meta["special_ids"]["end_of_turn"]]}
    text = dataset_kind(meta) == "text"
    eos = int(meta["special_ids"]["eos"]) if text else None
    truncated = text and overlong_of(meta) == "truncate"
    problems: List[str] = []
    totals = {"conversations": 0, "turns": 0, "tokens": 0, "loss_tokens": 0}
    if text:
        totals["documents"] = 0
    for index in range(len(dataset)):
        tokens, counts, lengths = dataset.raw_pack(index)
        if lengths.size == 0 or lengths.min() <= 0:
            problems.append(f"{dataset.split} pack {index}: empty pack or conversation")
            continue
        problems += _check_pack(tokens, counts, lengths, dataset.seq_length, vocab, end_of_turn,
                                f"{dataset.split} pack {index}", eos)
        if truncated:  # each piece is all that is kept of its document
            totals["documents"] += int(lengths.size)
        elif text:
            totals["documents"] += int(np.count_nonzero(tokens[np.cumsum(lengths) - 1] == eos))
        totals["conversations"] += int(lengths.size)
        totals["turns"] += count_turns(counts)
        totals["tokens"] += int(lengths.sum())
        totals["loss_tokens"] += int(np.count_nonzero(counts))
        if len(problems) >= MAX_PROBLEMS:
            return problems
    recorded = meta["splits"][dataset.split]
    totals["packs"] = len(dataset)
    for key, value in totals.items():
        if int(recorded[key]) != value:
            problems.append(f"{dataset.split}: metadata says {key} = {recorded[key]} but the data "
                            f"holds {value}")
    return problems


def verify_dataset(prefix: str) -> List[str]:
    """All splits, plus the accounting of input conversations."""
    problems: List[str] = []
    metadata = None
    for split in ("train", "valid"):
        try:
            dataset = PackedDialogDataset(prefix, split, probe_files=False)
        except ValueError as exc:
            if "has no" in str(exc) and split == "valid":
                continue
            return [str(exc)]
        metadata = dataset.metadata
        try:  # every byte against the checksums recorded at preprocessing
            check_recorded_files(prefix, metadata, split, checksums=True,
                                 hint="copy it again or rebuild it with tools/preprocess_dialog.py")
        except ValueError as exc:
            problems.append(str(exc))  # and go on: the invariants say what changed
        problems += verify_split(dataset)
    summary = metadata["summary"]
    accounted = (summary["conversations_kept"] + sum(summary["skipped"].values())
                 + sum(summary["dropped"].values()))
    if accounted != summary["conversations_read"]:
        problems.append(f"accounting: {summary['conversations_read']} read but {accounted} "
                        "kept + skipped + dropped")
    stored = sum(s["conversations"] for s in metadata["splits"].values())
    samples = summary.get("samples_kept", summary["conversations_kept"])  # per-turn: several
    if stored != samples:
        problems.append(f"accounting: {samples} samples kept but the splits hold {stored}")
    return problems


# -- how much the loss normalization matters for a dataset --------------------------------------

TURN_COUNT_EDGES = (1, 2, 3, 4, 8)


def turn_statistics(dataset: PackedDialogDataset, chunk: int = 1 << 16
                    ) -> Tuple[np.ndarray, np.ndarray]:
    """``(reply lengths, turns per conversation)`` of a split: the length in tokens (end-of-turn
    included) of every trained turn ([turns] int64) and the number of trained turns of every
    conversation ([conversations] int64), read from ``loss_token_num`` a chunk of conversations
    at a time (each turn adds ``1 / loss_token_num`` per token: ``turn_metrics``' numbering)."""
    field = dataset.loss_token_num
    lengths = field.sequence_lengths.astype(np.int64)
    pointers, dtype = field.index.sequence_pointers, field.index.dtype
    replies, turns = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for first in range(0, len(lengths), chunk):
        part = lengths[first:first + chunk]
        flat = field.bin_reader.read(dtype, int(part.sum()), int(pointers[first]))
        flat = flat.astype(np.int64)
        weight = np.where(flat > 0, 1.0 / np.maximum(flat, 1), 0.0)
        ends = np.cumsum(weight)
        masked = np.flatnonzero(flat > 0)
        number = np.floor(ends[masked] - weight[masked] + 1e-6)
        starts = masked[np.r_[True, number[1:] != number[:-1]]] if masked.size else masked
        replies.append(flat[starts])
        totals = np.rint(ends[np.cumsum(part) - 1]) if part.size else np.zeros(0)
        turns.append(np.diff(np.r_[0.0, totals]).astype(np.int64))
    return np.concatenate(replies), np.concatenate(turns)


def _histogram(values: np.ndarray, edges: Sequence[int], weights: Dict[str, np.ndarray],
               width: int = 30) -> List[str]:
    """Rows ``bucket  count  share  bar  (share of each weighting)``."""
    index = np.searchsorted(np.asarray(edges), values)  # bucket k: edges[k-1] < v <= edges[k]
    rows, total = [], max(int(values.size), 1)
    for k, name in enumerate(bucket_names(edges)):
        inside = index == k
        count = int(inside.sum())
        shares = "  ".join(f"{label} {w[inside].sum() / max(w.sum(), 1e-300):6.1%}"
                           for label, w in weights.items())
        bar = "#" * round(width * count / total)
        rows.append(f"  {name:>9}  {count:>10,}  {count / total:6.1%}  {bar:<{width}}  "
                    f"{shares}".rstrip())
    return rows


def format_turn_statistics(replies: np.ndarray, turns: np.ndarray, text: bool = False) -> str:
    """Text histograms of reply lengths (with the share of the loss each bucket gets under
    ``--loss-normalization token``, ``power`` (p = 0.5) and ``turn``) and of trained turns per
    conversation; for a ``text`` dataset the lengths are the pieces' trained tokens (a piece is one turn)."""
    if not replies.size:
        return "no trained turns"
    lengths = replies.astype(np.float64)
    what = ("piece lengths: {:,} document pieces, median {:.0f} trained tokens" if text else
            "reply lengths: {:,} trained turns, median {:.0f} tokens (end-of-turn included)")
    lines = [what.format(replies.size, np.median(replies)) + ";\n  the share of the loss each "
             "bucket weighs under --loss-normalization token (its tokens), power (p = 0.5: "
             "sqrt of its lengths) and turn (its turns):"]
    lines += _histogram(replies, REPLY_LENGTH_EDGES,
                        {"token": lengths, "power": np.sqrt(lengths),
                         "turn": np.ones_like(lengths)})
    if text:  # one turn per piece, always
        return "\n".join(lines)
    lines.append(f"trained turns per conversation: {turns.size:,} conversations, mean "
                 f"{turns.mean():.2f}:" if turns.size else "trained turns per conversation: -")
    lines += _histogram(turns, TURN_COUNT_EDGES, {}) if turns.size else []
    return "\n".join(lines)
