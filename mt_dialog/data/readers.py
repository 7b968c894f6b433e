"""Stream raw records from JSONL files, JSON arrays and Parquet files, never holding a whole file
in memory.

``expand_inputs`` turns ``--input`` items (files, folders, globs) into a sorted file list.
``iter_records`` yields ``RawRecord``\\ s in file order. A JSONL record is handed on as undecoded
bytes (parsing happens in the worker processes); a JSON-array element is decoded here, because
finding where it ends needs the parser. Whether a file is JSONL or a JSON array is decided by its
first non-blank byte (``[`` means array), not by its name. A Parquet file (a Hugging Face dataset
download: ``.parquet``, or any file starting with the Parquet magic ``PAR1``) is streamed one
batch of rows at a time with ``pyarrow``; each row is a record, its nested list/struct columns
the lists and dicts JSON would give (struct fields that are null, which Parquet stores for every
field of the column's schema, are left out as JSON leaves out absent keys), and errors name
``file:row N`` (counted from 0, as ``datasets`` and pandas index rows).
"""

from __future__ import annotations

import codecs
import glob
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional, Sequence

from mt_dialog.data.formats import RecordError

INPUT_SUFFIXES = (".jsonl", ".json", ".parquet")
PARQUET_SUFFIX = ".parquet"
_PARQUET_MAGIC = b"PAR1"
_PARQUET_BATCH = 1024
_CHUNK = 1 << 20
_MAX_RECORD_CHARS = 64 << 20  # one JSON array record, in characters
MAX_LINE_BYTES = 64 << 20  # one JSONL line: longer lines are skipped unread (line_too_long)


class InputError(ValueError):
    """An input path or file that cannot be read at all (fatal in every --on-error mode)."""


@dataclass
class RawRecord:
    """One record as read: where it is, and its bytes (JSONL) or decoded value (array)."""

    path: str
    line: int
    raw: Optional[bytes] = None
    value: Any = None
    error: Optional[RecordError] = None  # a problem found while reading (e.g. empty file)
    nbytes: int = 0  # bytes of input this record advanced the file (for the progress bar)
    row: bool = False  # ``line`` is a Parquet row number (from 0), not a line number

    @property
    def where(self) -> str:
        return f"{self.path}:row {self.line}" if self.row else f"{self.path}:{self.line}"


def expand_inputs(items: Sequence[str]) -> List[str]:
    """Files named by ``items``: a file, a folder (its *.jsonl / *.json / *.parquet, recursively)
    or a glob. Raises ``InputError`` for a path that names nothing."""
    files: List[str] = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(item)
                for name in names
                if name.endswith(INPUT_SUFFIXES)
            )
            if not found:
                raise InputError(f"--input {item}: folder has no .jsonl, .json or .parquet "
                                 "files")
            files.extend(found)
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
            if not found:
                raise InputError(f"--input {item}: the pattern matches no file")
            files.extend(found)
        elif os.path.isfile(item):
            files.append(item)
        else:
            raise InputError(f"--input {item}: no such file or folder")
    return list(dict.fromkeys(files))


def _first_byte(path: str) -> Optional[bytes]:
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(4096)
            if not chunk:
                return None
            stripped = chunk.lstrip()
            if stripped.startswith(codecs.BOM_UTF8):
                stripped = stripped[len(codecs.BOM_UTF8):].lstrip()
            if stripped:
                return stripped[:1]


def iter_records(path: str) -> Iterator[RawRecord]:
    """All records of one file, in order. An empty file yields one record carrying an error.
    Raises ``InputError`` when the file cannot be read at all."""
    if _is_parquet(path):
        yield from _iter_parquet(path)
        return
    first = _first_byte(path)
    if first is None:
        yield RawRecord(
            path, 1, error=RecordError("empty_file", "the file is empty; remove it from --input"),
            nbytes=os.path.getsize(path),
        )
    elif first == b"[":
        yield from _iter_json_array(path)
    else:
        yield from _iter_jsonl(path)


def _iter_jsonl(path: str) -> Iterator[RawRecord]:
    """The non-blank lines of a JSONL file; a line longer than ``MAX_LINE_BYTES`` is read past
    in chunks (never held whole) and yields a record carrying a ``line_too_long`` error."""
    with open(path, "rb") as handle:
        number = 0
        while True:
            line = handle.readline(MAX_LINE_BYTES + 1)
            if not line:
                break
            number += 1
            if len(line) > MAX_LINE_BYTES:
                yield _overlong_line(path, number, len(line) + _skip_line(handle))
                continue
            if number == 1 and line.startswith(codecs.BOM_UTF8):
                line = line[len(codecs.BOM_UTF8):]
            if line.strip():
                yield RawRecord(path, number, raw=line, nbytes=len(line))


def _skip_line(handle) -> int:
    """Read past the rest of the current line in ``_CHUNK`` pieces; the bytes skipped."""
    skipped = 0
    while True:
        piece = handle.readline(_CHUNK)
        skipped += len(piece)
        if not piece or piece.endswith(b"\n"):
            return skipped


def _overlong_line(path: str, number: int, size: int) -> RawRecord:
    return RawRecord(path, number, nbytes=size, error=RecordError(
        "line_too_long", f"the line has {size:,} bytes, over the {MAX_LINE_BYTES:,}-byte limit "
        "of one record (a whole file minified onto one line?); write one record per line, or "
        "split the record"))


class _ArrayStream:
    """A growing text window over a file with line bookkeeping, for the array parser."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.handle = open(path, "rb")
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0
        self.base_line = 1  # line number of text[0]
        self.bytes_read = 0
        self.eof = False

    def line_at(self, pos: int) -> int:
        return self.base_line + self.text.count("\n", 0, pos)

    def more(self) -> bool:
        """Append the next chunk; False at end of file."""
        if self.eof:
            return False
        chunk = self.handle.read(_CHUNK)
        start = 0
        if self.bytes_read == 0 and chunk.startswith(codecs.BOM_UTF8):
            start = len(codecs.BOM_UTF8)  # skip it here, so byte offsets stay file offsets
        try:
            self.text += self.decoder.decode(chunk[start:], final=not chunk)
        except UnicodeDecodeError as exc:
            bad = start + exc.start
            line = self.line_at(len(self.text)) + chunk[:bad].count(b"\n")
            raise InputError(
                f"{self.path}:{line}: invalid UTF-8 (byte offset {self.bytes_read + bad}); "
                "re-encode the file as UTF-8"
            ) from None
        self.bytes_read += len(chunk)
        self.eof = not chunk
        return bool(chunk)

    def skip_blank(self) -> Optional[str]:
        """Next non-blank character (not consumed), or None at end of file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.more():
                return None

    def compact(self) -> None:
        if self.pos > _CHUNK:
            self.base_line += self.text.count("\n", 0, self.pos)
            self.text = self.text[self.pos:]
            self.pos = 0

    def fail(self, what: str) -> InputError:
        return InputError(
            f"{self.path}:{self.line_at(self.pos)}: {what} in a JSON array; the rest of the array "
            "cannot be read reliably: fix the file (or convert it to JSONL, one record a line, so "
            "that --on-error skip can step over bad lines)"
        )


def _decode_value(stream: _ArrayStream, decoder: json.JSONDecoder) -> Any:
    while True:
        try:
            value, end = decoder.raw_decode(stream.text, stream.pos)
            break
        except RecursionError:
            raise stream.fail(f"a record nested deeper than {sys.getrecursionlimit()} levels "
                              "(Python's JSON parser stops there); flatten it") from None
        except json.JSONDecodeError as exc:
            # The window may end inside this record (a literal, an escape, a number cut by the
            # chunk boundary): read on, and call it malformed only at end of file or past the cap.
            too_big = len(stream.text) - stream.pos > _MAX_RECORD_CHARS
            if too_big or not stream.more():
                raise stream.fail(f"malformed JSON ({exc.msg})") from None
    stream.pos = end
    return value


def _iter_json_array(path: str) -> Iterator[RawRecord]:
    stream = _ArrayStream(path)
    decoder = json.JSONDecoder()
    try:
        stream.skip_blank()
        stream.pos += 1  # the opening '['
        count = 0
        while True:
            char = stream.skip_blank()
            if char is None:
                raise stream.fail("unexpected end of file (missing ']')")
            if char == "]":
                if count:
                    raise stream.fail("trailing ',' before ']'")
                stream.pos += 1  # the ']' of an empty array
                break
            line, before = stream.line_at(stream.pos), stream.bytes_read
            value = _decode_value(stream, decoder)
            count += 1
            yield RawRecord(path, line, value=value, nbytes=max(0, stream.bytes_read - before))
            char = stream.skip_blank()
            if char == ",":
                stream.pos += 1
            elif char == "]":
                stream.pos += 1
                break
            else:
                raise stream.fail("expected ',' or ']' after a record")
            stream.compact()
        if stream.skip_blank() is not None:
            raise stream.fail("text after the closing ']'")
        if count == 0:
            yield RawRecord(
                path, 1, error=RecordError("empty_file", "the JSON array is empty; remove the file"),
                nbytes=stream.bytes_read,
            )
    finally:
        stream.handle.close()


def _is_parquet(path: str) -> bool:
    if path.endswith(PARQUET_SUFFIX):
        return True
    with open(path, "rb") as handle:
        return handle.read(len(_PARQUET_MAGIC)) == _PARQUET_MAGIC


def _without_nulls(value: Any) -> Any:
    """A Parquet row as JSON would have it: null struct fields left out, recursively."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _open_parquet(path: str):
    try:
        import pyarrow
        import pyarrow.parquet as parquet
    except ImportError:
        raise InputError(f"{path}: reading Parquet files needs pyarrow: pip install -e "
                         "'.[parquet]' (or pip install pyarrow)") from None
    try:
        return parquet.ParquetFile(path), pyarrow.ArrowException
    except (OSError, pyarrow.ArrowException) as exc:
        raise InputError(f"{path}: not a readable Parquet file ({exc}); re-download it, or "
                         "convert it to JSONL") from None


def _iter_parquet(path: str) -> Iterator[RawRecord]:
    """Rows of a Parquet file, one batch in memory at a time; ``nbytes`` spreads the file's
    size over its rows."""
    handle, arrow_error = _open_parquet(path)
    size, rows = os.path.getsize(path), handle.metadata.num_rows
    if rows == 0:
        handle.close()
        yield RawRecord(path, 1, error=RecordError(
            "empty_file", "the Parquet file has no rows; remove it from --input"), nbytes=size)
        return
    row = done = 0
    try:
        for batch in handle.iter_batches(batch_size=_PARQUET_BATCH):
            for value in batch.to_pylist():
                consumed = size * (row + 1) // rows
                yield RawRecord(path, row, value=_without_nulls(value), nbytes=consumed - done,
                                row=True)
                row, done = row + 1, consumed
    except arrow_error as exc:
        raise InputError(f"{path}:row {row}: the Parquet data cannot be read ({exc}); "
                         "re-download the file, or convert it to JSONL") from None
    finally:
        handle.close()
