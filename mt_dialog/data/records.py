"""Turn raw records into rendered conversations (in the tokenizer worker processes, or in the
main process with ``--workers 1``).

A ``RecordProcessor`` is built in the main process, sent to each worker once (``init_worker``) and
set up there (tokenizer loaded, the main process's appended special tokens restored, template
resolved), so all processes produce identical ids. ``process`` maps a batch of
``(number, RawRecord)`` to outcomes, named tuples that say what happened to each record:

- ``Kept("ok", number, samples, turns_removed, notes)``: ``samples`` are
  ``((input_ids, loss_token_num), ...)``, one, or with ``--reasoning per-turn`` one per user turn
  with reasoning (``render.render_conversation``); ``notes`` are the record's
  ``Conversation.notes``, counted in the summary;
- ``Refused("error", number, reason, message)`` for a record that cannot be used (the message
  starts with ``file:line``), an overlong one included under ``--overlong error``;
- ``Refused("dropped", number, reason, message)`` for an overlong conversation under
  ``--overlong drop`` (reason ``overlong``) or ``truncate`` when not even its first turn fits
  (``overlong_no_turn_fits``).

A plain-text record (``formats.Document``) is rendered by ``render.render_document`` and, longer
than ``--seq-length``, cut into pieces (``--overlong split``, the default for text:
``render.split_document``), each one sample; ``Kept.kind`` says which the record was.

``stage`` does the same but appends each kept sample to a staging shard
(``staging.ShardWriter``) and gives ``Kept`` samples as ``StagedSample(offset, length, turn_num,
num_loss_tokens)`` instead, so only a few numbers per sample cross the process boundary.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import (Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import numpy as np

from mt_dialog.data.formats import (
    DEFAULT_TEXT_KEY,
    Conversation,
    Document,
    RecordError,
    parse_record,
)
from mt_dialog.data.readers import RawRecord
from mt_dialog.data.render import (
    RenderedConversation,
    RenderOptions,
    ResolvedTemplate,
    render_conversation,
    render_document,
    resolve_template,
    split_document,
    truncate_to_turns,
)
from mt_dialog.data.render_hf import render_with_chat_template
from mt_dialog.data.staging import ShardWriter
from mt_dialog.data.templates import HF_TEMPLATE, get_template
from mt_dialog.data.tokenizers import BackendEncoder, DialogTokenizer, load_tokenizer

class StagedSample(NamedTuple):
    """A kept sample, appended to a staging shard (``staging.ShardWriter``)."""

    offset: int
    """Its first token's position in the shard."""
    length: int
    """Its tokens."""
    turn_num: int
    """Its trained turns."""
    num_loss_tokens: int
    """Its trained tokens."""


class Kept(NamedTuple):
    """A record whose conversation is kept (maybe truncated to whole turns)."""

    status: str
    """Always "ok"."""
    number: int
    """The record's number in the input (0-based)."""
    samples: tuple
    """``process``: ``((input_ids, loss_token_num), ...)`` arrays; ``stage``:
    ``StagedSample``s."""
    turns_removed: int
    """Turns ``--overlong truncate`` removed (0: the whole conversation is kept)."""
    notes: Tuple[str, ...]
    """The record's ``Conversation.notes`` (counted in the summary)."""
    kind: str = "conversation"
    """``KINDS``: "conversation", or "text" for a plain-text document (its samples are its
    pieces)."""


class Refused(NamedTuple):
    """A record that is not kept."""

    status: str
    """"error" (skipped under ``--on-error skip``, else it stops the run) or "dropped"
    (``--overlong drop`` / ``truncate``)."""
    number: int
    """The record's number in the input (0-based)."""
    reason: str
    """The counter it is counted under (``RecordError.reason``: ``malformed_json``, ...)."""
    message: str
    """What is wrong, starting with ``file:line``, and how to fix it."""


Outcome = Union[Kept, Refused]
KINDS = ("conversation", "text")
"""What a kept record is: a conversation (replies trained) or a text document (all trained)."""
Parsed = Union[Conversation, Document]


def decode_json_line(raw: bytes):
    """Parse one JSONL line; bad UTF-8 or JSON become ``RecordError``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecordError(
            "invalid_utf8",
            f"invalid UTF-8 at byte {exc.start} of the line; re-encode the file as UTF-8",
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            "malformed_json", f"malformed JSON ({exc.msg} at column {exc.colno})"
        ) from None
    except RecursionError:
        raise too_deep() from None


def too_deep() -> RecordError:
    """A record nested past Python's recursion limit (its JSON parser and every walk of the
    value stop there)."""
    return RecordError("too_deeply_nested", f"the record is nested deeper than "
                       f"{sys.getrecursionlimit()} levels, where Python's JSON parser stops; "
                       "flatten it (no chat format nests that deep)")


@dataclass
class RecordProcessor:
    """Everything a worker needs to render records, in picklable form."""

    tokenizer_type: str
    tokenizer_location: str
    template_name: str
    input_format: Optional[str]
    seq_length: int
    overlong: Optional[str]
    """``--overlong``; None: ``split`` for text documents, ``error`` for conversations."""
    added_tokens: Dict[str, int] = field(default_factory=dict)
    token_dtype: str = "int64"
    """dtype of the staged token ids (set by the main process once the vocabulary is known)."""
    vocab_size: Optional[int] = None
    template_timeout: Optional[float] = None
    """``--template-timeout``: seconds one record may take to render (``time_limit``)."""
    """The tokenizer's vocabulary, appended tokens included (set with ``token_dtype``): a
    rendered id outside ``0..vocab_size - 1`` refuses its record (``_out_of_vocabulary``)."""
    count_dtype: str = "int32"
    """dtype of the staged loss_token_num."""
    empty_reply: str = "context"
    """``--empty-reply``: an empty assistant reply is kept as untrained context, or refused."""
    train_on: str = "all"
    """``--train-on``: every assistant reply is trained, or only the last one."""
    reasoning: str = "template"
    """``--reasoning``: template, keep or per-turn (``render.RenderOptions``)."""
    encoder: Optional[BackendEncoder] = None
    """Set by the main process (``share_encoder``) for a built-in template and a Hugging Face
    tokenizer: its ``tokenizers.BackendEncoder``, with which worker processes encode without
    loading transformers."""
    resolved: Optional[ResolvedTemplate] = None
    """The template as the main process resolved it (sent with ``encoder``)."""
    text_key: str = DEFAULT_TEXT_KEY
    """``--text-key``: the field of a plain-text record."""
    document_ids: Optional[Tuple[Tuple[int, ...], Optional[int]]] = None
    """``(prefix, eos)`` of text documents (``DialogTokenizer.document_prefix``, ``eos_id``),
    set by ``setup`` from the tokenizer (sent to the workers with ``encoder``)."""

    def __post_init__(self) -> None:
        self._tokenizer: Optional[DialogTokenizer] = None
        self._template = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = state["_template"] = None
        return state

    def setup(self) -> Union[DialogTokenizer, BackendEncoder]:
        """Load the tokenizer and resolve the template (once per process); returns the
        tokenizer. In a worker given the main process's ``encoder`` (when it gives the ids that
        transformers gave on the probe texts): that encoder and ``resolved`` instead (all that
        rendering with a built-in template needs: ``encode``, ``encode_many``)."""
        if self._tokenizer is None and self.encoder is not None and self.encoder.matches_probe():
            self._tokenizer, self._template = self.encoder, self.resolved
        if self._tokenizer is None:
            tokenizer = load_tokenizer(self.tokenizer_type, self.tokenizer_location)
            tokenizer.added_tokens = dict(self.added_tokens)
            if self.template_name != HF_TEMPLATE:
                self._template = resolve_template(get_template(self.template_name), tokenizer)
            self.added_tokens = dict(tokenizer.added_tokens)
            self._tokenizer = tokenizer
            self.document_ids = (tuple(tokenizer.document_prefix()), tokenizer.eos_id)
        return self._tokenizer

    @property
    def options(self) -> RenderOptions:
        return RenderOptions(train_on=self.train_on, reasoning=self.reasoning)

    def share_encoder(self) -> None:
        """In the main process, after ``setup``: let worker processes encode with the
        tokenizer's ``BackendEncoder`` (a Hugging Face tokenizer and a built-in template)."""
        encoder = getattr(self.setup(), "backend_encoder", None)
        if encoder is not None and self.template_name != HF_TEMPLATE:
            self.encoder, self.resolved = encoder, self._template

    def render(self, conversation: Parsed,
               encode: Optional[Callable[[str], List[int]]] = None
               ) -> Tuple[RenderedConversation, ...]:
        """The samples of one parsed record (several only with ``--reasoning per-turn``; a
        document whole, one sample, cut later by ``_fit``); ``encode``: the tokenizer's
        (default) or ``batch_encode``'s."""
        tokenizer = self.setup()
        if isinstance(conversation, Document):
            prefix, eos = self.document_ids
            return (render_document(conversation, encode or tokenizer.encode, prefix, eos),)
        if self.template_name == HF_TEMPLATE:
            return render_with_chat_template(conversation, tokenizer.hf, self.options)
        return render_conversation(conversation, self._template, encode or tokenizer.encode,
                                   self.options)

    def batch_encode(self, conversations: Sequence[Parsed]) -> Callable[[str], List[int]]:
        """An ``encode`` for rendering ``conversations`` with a built-in template that returns
        the ids of ``tokenizer.encode``, looked up: the texts the renderer will encode (found by
        rendering once without encoding) are encoded in one ``encode_many`` call. A text not
        looked up is encoded then. The tokenizer's own ``encode`` when batching gains nothing
        (``batch_encoding`` False: SentencePiece) or when the batch call refuses a text (each
        record then meets its own error)."""
        tokenizer = self.setup()
        if not tokenizer.batch_encoding or self.template_name == HF_TEMPLATE:
            return tokenizer.encode
        wanted: Dict[str, None] = {}
        for conversation in conversations:
            if isinstance(conversation, Document):
                wanted.setdefault(conversation.text)
                continue
            try:
                render_conversation(conversation, self._template,
                                    lambda text: wanted.setdefault(text) or [], self.options)
            except RecordError:
                pass  # raised again when it is rendered
        try:
            found = dict(zip(wanted, tokenizer.encode_many(list(wanted))))
        except UnicodeError:
            return tokenizer.encode

        def encode(text: str) -> List[int]:
            ids = found.get(text)  # copied: the renderer appends to what it gets
            return list(ids) if ids is not None else tokenizer.encode(text)
        return encode

    def process(self, batch: List[Tuple[int, RawRecord]]) -> List[Outcome]:
        return [self._one(number, record) for number, record in batch]

    def stage(self, batch: List[Tuple[int, RawRecord]], shard: ShardWriter) -> List[Outcome]:
        """``process``, with kept samples appended to ``shard`` (flushed before returning) and
        their ``Kept`` samples given as ``StagedSample``s. The batch's texts are encoded together (``batch_encode``)."""
        parsed = [self._parse(number, record) for number, record in batch]
        encode = self.batch_encode([p for p in parsed if isinstance(p, (Conversation, Document))])
        outcomes = []
        for (number, record), conversation in zip(batch, parsed):
            failure, samples, removed, notes = self._attempt(number, record, conversation,
                                                             encode)
            if samples is not None:
                staged = tuple(StagedSample(shard.append(s.input_ids, s.loss_token_num),
                                            s.num_tokens, s.turn_num, s.num_loss_tokens)
                               for s in samples)
                failure = Kept("ok", number, staged, removed, notes, _kind(conversation))
            outcomes.append(failure)
        shard.flush()
        return outcomes

    def _one(self, number: int, record: RawRecord) -> Outcome:
        parsed = self._parse(number, record)
        failure, samples, removed, notes = self._attempt(number, record, parsed)
        if samples is None:
            return failure
        arrays = tuple((s.input_ids.astype(self.token_dtype, copy=False),
                        s.loss_token_num.astype(self.count_dtype, copy=False)) for s in samples)
        return Kept("ok", number, arrays, removed, notes, _kind(parsed))

    def _parse(self, number: int, record: RawRecord) -> Union[Parsed, Outcome]:
        """The record's conversation, or its failure outcome."""
        if record.error is not None:  # a problem with the file itself (e.g. empty)
            return Refused("error", number, record.error.reason,
                           f"{record.where}: {record.error.message}")
        try:
            value = decode_json_line(record.raw) if record.raw is not None else record.value
            return parse_record(value, self.input_format, self.empty_reply, self.text_key)
        except RecordError as exc:
            return Refused("error", number, exc.reason,
                           f"{record.where}: conversation {number}: {exc.message}")
        except UnicodeError as exc:  # parse_record checks text; never a traceback all the same
            return _unicode_error(number, f"{record.where}: conversation {number}", exc)
        except RecursionError:  # a deep value walked by parse_record
            return Refused("error", number, "too_deeply_nested",
                           f"{record.where}: conversation {number}: {too_deep().message}")

    def _attempt(self, number: int, record: RawRecord,
                 parsed: Union[Parsed, Outcome, None] = None,
                 encode: Optional[Callable[[str], List[int]]] = None) -> Tuple[
            Optional[Outcome], Optional[Tuple[RenderedConversation, ...]], int, Tuple[str, ...]]:
        """``(failure outcome, None, 0, ())``, or ``(None, the kept samples, turns removed,
        the record's notes)``. Every kept turn carries loss tokens (its end-of-turn at least), so
        ``turn_num`` is the number of trained turns. ``parsed``: ``_parse``'s answer, when
        already known; ``encode``: see ``render``."""
        conversation = self._parse(number, record) if parsed is None else parsed
        if not isinstance(conversation, (Conversation, Document)):
            return conversation, None, 0, ()
        text = isinstance(conversation, Document)
        where = f"{record.where}: {'document' if text else 'conversation'} {number}"
        try:
            with time_limit(self.template_timeout):
                samples = self.render(conversation, encode)
        except RenderTimeout:
            return Refused("error", number, "template_timeout", (
                f"{where}: rendering it took over --template-timeout {self.template_timeout:g} "
                "s and was stopped (a chat template whose loops never end?); fix the template, "
                "raise the limit for very long conversations, or skip such records with "
                "--on-error skip")), None, 0, ()
        except RecordError as exc:
            return Refused("error", number, exc.reason, f"{where}: {exc.message}"), None, 0, ()
        except UnicodeError as exc:  # parse_record checks text; never a traceback all the same
            return _unicode_error(number, where, exc), None, 0, ()
        except RecursionError:  # e.g. deep tool-call arguments written back as JSON
            return (Refused("error", number, "too_deeply_nested", f"{where}: {too_deep().message}"),
                    None, 0, ())
        bad = _out_of_vocabulary(samples, self.vocab_size)
        if bad is not None:
            return Refused("error", number, "token_id_out_of_range", (
                f"{where}: the tokenizer gave token id {bad}, outside its vocabulary of "
                f"{self.vocab_size:,} ids (its ids are not contiguous: an added token numbered "
                "past its size); stored, it would become another token. Use a tokenizer whose "
                "added tokens have ids below len(tokenizer)")), None, 0, ()
        if text:
            return (*self._fit_document(number, where, samples[0]), conversation.notes)
        return (*self._fit_samples(number, where, samples), conversation.notes)

    def _fit_document(self, number: int, where: str, rendered: RenderedConversation
                      ) -> Tuple[Optional[Outcome], Optional[Tuple[RenderedConversation, ...]],
                                 int]:
        """``--overlong`` for a text document (default ``split``): ``(None, its pieces, pieces
        left out)`` (``truncate`` keeps the first piece only), or ``(failure, None, 0)``."""
        mode = self.overlong or "split"
        if rendered.num_tokens <= self.seq_length or mode in ("split", "truncate"):
            try:
                pieces = split_document(rendered, self.seq_length)
            except RecordError as exc:
                return Refused("error", number, exc.reason, f"{where}: {exc.message}"), None, 0
            kept = pieces[:1] if mode == "truncate" else pieces
            return None, kept, len(pieces) - len(kept)
        too_long = f"{where} has {rendered.num_tokens:,} tokens > --seq-length {self.seq_length:,}"
        if mode == "drop":
            return Refused("dropped", number, "overlong", f"{too_long}; it was dropped"), None, 0
        return Refused("error", number, "overlong", f"{too_long}; use --overlong split (cut it "
                       "into pieces of --seq-length tokens, the default for text), --overlong "
                       "drop, or a longer --seq-length"), None, 0

    def _fit_samples(self, number: int, where: str, samples) -> Tuple[
            Optional[Outcome], Optional[Tuple[RenderedConversation, ...]], int]:
        """``_fit`` on each sample of a record: ``(None, the samples kept, turns removed)``, or
        the first failure. Under ``--overlong truncate`` a sample none of whose turns fits is
        left out (its turns counted as removed) as long as another sample is kept."""
        kept, removed, dropped = [], 0, None
        for sample in samples:
            failure, fitted, lost = self._fit(number, where, sample)
            if fitted is not None:
                kept.append(fitted)
                removed += lost
            elif failure.status == "dropped" and self.overlong == "truncate":
                dropped, removed = failure, removed + sample.turn_num
            else:
                return failure, None, 0
        if not kept:
            return dropped, None, 0
        return None, tuple(kept), removed

    def _fit(self, number: int, where: str, rendered: RenderedConversation) -> Tuple[
            Optional[Outcome], Optional[RenderedConversation], int]:
        """``--overlong``: ``(None, the conversation or its longest whole-turn prefix that fits,
        turns removed)``, or ``(failure outcome, None, 0)``."""
        if rendered.num_tokens <= self.seq_length:
            return None, rendered, 0
        too_long = (
            f"{where} has {rendered.num_tokens:,} tokens > --seq-length {self.seq_length:,}"
        )
        if self.overlong == "split":
            return Refused("error", number, "overlong", f"{too_long}; --overlong split cuts only "
                           "text documents (a piece of a conversation would lose the context of "
                           "its replies): use --overlong truncate (keep the whole turns that "
                           "fit), --overlong drop, or a longer --seq-length"), None, 0
        if self.overlong == "truncate":
            kept = truncate_to_turns(rendered, self.seq_length)
            if kept is not None:
                return None, kept, rendered.turn_num - kept.turn_num
            return Refused("dropped", number, "overlong_no_turn_fits",
                           f"{too_long} and even its first turn does not fit; it was dropped"
                           ), None, 0
        if self.overlong == "drop":
            return Refused("dropped", number, "overlong", f"{too_long}; it was dropped"), None, 0
        return Refused("error", number, "overlong",
                f"{too_long}; use --overlong truncate (keep the whole turns that fit), "
                "--overlong drop, or a longer --seq-length"), None, 0


class RenderTimeout(BaseException):
    """Raised in the rendering process by ``time_limit``'s alarm (a BaseException, so that no
    ``except Exception`` in a template engine swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Raise ``RenderTimeout`` in this process when the block runs longer than ``seconds``
    (SIGALRM with ``setitimer``; a no-op off the main thread, where signals cannot be used, or
    for None). Preprocessing renders each conversation in the main thread of its process."""
    usable = (seconds is not None and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def stop(signum, frame):
        raise RenderTimeout()

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _out_of_vocabulary(samples, vocab_size: Optional[int]) -> Optional[int]:
    """The first id of ``samples`` outside ``0..vocab_size - 1``, or None (always None without
    a ``vocab_size``)."""
    for sample in samples if vocab_size else ():
        ids = np.asarray(sample.input_ids)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            return int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
    return None


def _kind(parsed: Parsed) -> str:
    """The ``Kept.kind`` of a parsed record."""
    return "text" if isinstance(parsed, Document) else "conversation"


def _unicode_error(number: int, where: str, exc: UnicodeError) -> Outcome:
    return Refused("error", number, "invalid_unicode", f"{where}: text the tokenizer cannot encode "
            f"({exc}); repair or remove it")


_WORKER: Dict[str, Any] = {}


def init_worker(processor: RecordProcessor, stage_folder: str) -> None:
    """Pool initializer: keep the processor for the life of the worker (its tokenizer is then
    loaded once per worker, not once per batch). Nothing here can fail; ``run_batch`` sets up.
    Ctrl-C is left to the main process, which stops the pool (no traceback per worker)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER.clear()
    _WORKER.update(processor=processor, folder=stage_folder)


def run_batch(batch) -> Tuple[str, List[Outcome]]:
    """Pool task: stage one batch into this worker's own shard; returns (shard name, outcomes)."""
    shard = _WORKER.get("shard")
    if shard is None:
        processor = _WORKER["processor"]
        shard = ShardWriter(_WORKER["folder"], f"shard-{os.getpid()}", processor.token_dtype,
                            processor.count_dtype)
        _WORKER["shard"] = shard
    return shard.name, _WORKER["processor"].stage(batch, shard)
