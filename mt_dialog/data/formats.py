"""Input record formats, normalized into a ``Conversation`` (``parse_record``).

Accepted (auto-detected per record from its keys, or forced with ``--input-format``):

===========  ====================================================================================
openai       ``{"messages": [{"role": "system|user|assistant|tool", "content": "..."}],
             "tools": [...]}`` (also Hugging Face's layout). An assistant message may carry
             ``tool_calls`` (``[{"type": "function", "function": {"name", "arguments"}, "id"}]``,
             ``arguments`` a JSON object or a string of one, ``""`` for none; then ``content``
             may be null) or the legacy ``function_call`` (``{"name", "arguments"}``: one call),
             and ``reasoning_content``; a tool message ``tool_call_id`` and ``name``; the legacy
             ``{"role": "function", "name", "content"}`` is a tool result
sharegpt     ``{"conversations": [{"from": "...", "value": "..."}], "system": "...", "tools": ...}``
             with ``from`` one of ``SHAREGPT_ROLES`` (``human``, ``gpt``, ``function_call`` whose
             value is the call JSON, ``observation`` a tool result, ...); a ``function_call``
             right after an assistant item joins that message (one reply: content, then calls);
             an item may also be a ``{"role", "content"}`` message as in openai
firefly      ``{"conversation": [{"human": "...", "assistant": "..."}], "system": "..."}``
alpaca       ``{"instruction": "...", "input": "...", "output": "...", "system": "..."}``
text         ``{"text": "..."}`` (the key is ``--text-key``): a plain-text document for continued
             pretraining, every token trained (``Document``); detected when the record has
             the text key and none of the keys above
===========  ====================================================================================

Besides the text:

- **Content** (``content``, ``value``): a string, or a list of content parts (the current OpenAI /
  Hugging Face layout): text parts (``TEXT_PARTS``) are joined with a space, as ``transformers
  serve`` joins them for text-only models; any other part (image, audio, ...) is refused
  (``non_text_content``). A tool result given as a JSON object or a list that is not content
  parts is serialized with ``json.dumps(value, ensure_ascii=False)`` (``tool_result_text``),
  the serialization chat templates give tool-call arguments (``tojson``).

- **tools** (record level): a list of function descriptions, or a JSON string of one; a bare
  ``{"name", "description", "parameters"}`` is wrapped as ``{"type": "function", "function": ...}``,
  the layout chat templates document.
- **Reasoning**: an assistant's ``reasoning_content``, or a leading ``<think>...</think>`` block of
  its content, becomes ``Message.reasoning`` (newlines around it removed, as chat templates do);
  when both are given they must agree (``reasoning_conflict``).
- **Loss control**, per message: ``"weight": 0|1`` or ``"loss": false|true`` set ``Message.train``
  (any other value: ``bad_loss_control``). Only assistant messages are trained, so asking to train
  another message is refused (``train_not_assistant``). A field that looks like loss control under
  another name (``looks_like_loss_control``: a word of the name, in any case and separator
  style, is train / loss / mask / ignore / weight or a form of one, such as ``no_train``,
  ``ignoreLoss``, ``is-trainable``, ``masked``; or ``label``, ``labels``; at record level also
  ``weight`` and ``loss``) is refused naming the supported spelling (``unsupported_loss_field``):
  ignoring it would train what the data meant to mask.
- **Reply text under another name** on an assistant message (``UNREAD_REPLY_FIELDS``: OpenAI's
  ``refusal``, vLLM's ``reasoning``, ``thinking``) is refused (``unsupported_reply_field``),
  naming the field it is read from: ignored, the reply would be trained without it.
- **Other fields** are ignored and named in ``Conversation.notes`` (``ignored field 'lang'``,
  ``ignored field 'messages[].name'``). A null value is the same as an absent field (Parquet rows
  carry every column of the file).
- **Text** that cannot be encoded as UTF-8, a lone surrogate such as ``"\\ud83d"`` (valid JSON, but
  no tokenizer can encode it), is refused wherever it would be rendered (``invalid_unicode``).

Role structure (``validate_roles``; errors name the message, reason ``role_order``):

1. A system message can only be the first message: templates put the system prompt at the top
   (Llama 2 folds it into the first user message), so a later one has no faithful layout.
2. A tool result follows the assistant message that called tools, or another tool result; its
   ``tool_call_id``, when both sides have ids, is one of that message's call ids.
3. An assistant message with tool calls is followed by the results of all its calls (matched
   by ``tool_call_id`` when every call and result has an id, else counted) before the next
   user or assistant message, unless it is the last message (a conversation may end with a
   call): without the results the next reply would be trained as if the model had seen them.
4. Everything else is valid: consecutive user messages, consecutive assistant messages (each one
   a turn), a conversation that opens with an assistant greeting, empty user or tool messages.

Then, in ``parse_record``: an empty reply (no content, no tool calls) is never trained: it is kept
as untrained context (``--empty-reply context``, noted) or refused (``--empty-reply error``, reason
``empty_reply``). Messages after the last trainable reply would be untrained context that nothing
learns from: they are dropped (noted). A conversation needs a trainable reply: ``no_assistant``
(none at all), ``empty_reply`` (the only ones are empty) or ``no_trained_turn`` (all weight 0).

Every problem raises ``RecordError`` with a short ``reason`` (what ``--on-error skip`` counts) and a
message saying what is wrong and how to fix it; the caller prefixes ``file:line``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

FORMATS = ("openai", "sharegpt", "firefly", "alpaca", "text")
TEXT_FORMAT = "text"
"""The plain-text document format (``Document``); every other format is a conversation."""
DEFAULT_TEXT_KEY = "text"
"""``--text-key``: the record field holding a document's text."""
CONVERSATION_KEYS = ("messages", "conversations", "conversation", "instruction")
"""Keys that make a record a conversation even when it also has the text key."""
EMPTY_REPLY = ("context", "error")
"""``--empty-reply``: keep an empty assistant reply as untrained context, or refuse the record."""

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
"""ShareGPT ``from`` spellings (FastChat's dumps, LLaMA-Factory, Axolotl) and their roles."""
SHAREGPT_CALL = "function_call"
"""The ShareGPT speaker whose value is an assistant's tool call JSON (one call or a list)."""
_SHAREGPT_MESSAGE_ROLES = {**{k: v for k, v in SHAREGPT_ROLES.items() if k != SHAREGPT_CALL},
                           "function": "tool"}
"""Roles of ShareGPT items written as ``{"role", "content"}`` messages (read as in openai)."""

LOSS_CONTROL = ("weight", "loss")
LOSS_LOOKALIKES = frozenset({
    "mask", "masked", "loss_mask", "mask_loss", "train", "trainable", "trained", "training",
    "train_on", "do_train", "ignore", "ignored", "no_loss", "label", "labels", "loss_weight",
    "weights",
})
"""Field names that look like loss control but are not read: refused, never silently ignored
(examples; ``looks_like_loss_control`` is the rule)."""
_NAME_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")
_LOSS_WORD = re.compile(r"(?:no|not|dont|do|is|should|to|un)?(?:train|loss|mask|ignore|weight)"
                        r"[a-z]*")
TEXT_PARTS = ("text", "input_text", "output_text")
"""Content part types read as text (chat completions' and the Responses API's spellings)."""


def looks_like_loss_control(key: str) -> bool:
    """Whether a field name reads as loss control: one of ``LOSS_LOOKALIKES``, or a word of it
    (split at separators and case changes: ``no_train``, ``ignoreLoss``, ``IS-TRAINABLE``) that
    is train / loss / mask / ignore / weight or a form of one (``trained``, ``masking``,
    ``weights``), alone or after a negation or auxiliary (``notrain``, ``shouldtrain``).
    Words that merely contain the letters (``constraints``, ``gloss``) do not count."""
    return key.lower() in LOSS_LOOKALIKES or any(
        _LOSS_WORD.fullmatch(word.lower()) for word in _NAME_WORDS.findall(key))


NOTE_NULL_SYSTEM = "null system message dropped"
NOTE_EMPTY_REPLY = "empty reply kept as context"
NOTE_TRAILING = "messages after the last trainable reply dropped"
_SURROGATE = re.compile("[\ud800-\udfff]")
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class RecordError(ValueError):
    """One input record cannot be used. ``reason`` is the counter name in the summary."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class ToolCall:
    """One function call made by an assistant message (the OpenAI / Hugging Face layout
    ``{"type": "function", "function": {"name", "arguments"}, "id"}``)."""

    name: str
    """The function's name."""
    arguments: Any
    """The arguments as a JSON object (a dict; a JSON *string* in the input is decoded to check
    it and for templates that need the value)."""
    id: Optional[str] = None
    """The call id a ``tool`` message answers with ``tool_call_id`` (may be absent)."""
    arguments_text: Optional[str] = None
    """The input's JSON string of the arguments, verbatim (OpenAI's API gives them so); None
    when the input gave an object (or a blank string: no arguments). Chat templates write a
    string as it is (Qwen's: ``arguments if arguments is string else arguments | tojson``), so
    training and the exported template write this text, never a re-serialization of it."""


@dataclass(frozen=True)
class Message:
    """One message of a conversation, normalized from any input format."""

    role: str
    """One of ``ROLES``: "system", "user", "assistant" or "tool" (a tool's result)."""
    content: str
    """The text ("" for an assistant message that only calls tools). For an assistant message
    the reasoning is *not* in here (see ``reasoning``)."""
    tool_calls: Tuple[ToolCall, ...] = ()
    """Assistant only: the function calls of this message, in order."""
    reasoning: Optional[str] = None
    """Assistant only: the reasoning before the reply (``reasoning_content``, or a leading
    ``<think>...</think>`` block of ``content``), without the newlines around it; None when
    there is none, "" for an explicitly empty block."""
    train: Optional[bool] = None
    """Per-message loss control from the input (``weight`` 0/1, ``loss`` false/true): False
    never trains this message (context only), True asks for it, None leaves it to the run
    (assistant messages are trained, unless ``--train-on last``). Only assistant messages can
    be trained."""
    name: Optional[str] = None
    """Tool only: the name of the function whose result this is (may be absent)."""
    tool_call_id: Optional[str] = None
    """Tool only: the id of the call this result answers (may be absent)."""


@dataclass(frozen=True)
class Conversation:
    """A parsed record: its messages and the tools offered to the assistant."""

    messages: Tuple[Message, ...]
    tools: Tuple[Dict[str, Any], ...] = ()
    """Record-level ``tools``: JSON-schema function descriptions, passed to the chat template
    (``{"type": "function", "function": {"name", "description", "parameters"}}``)."""
    notes: Tuple[str, ...] = ()
    """What parsing changed or left out without refusing the record, one counter name each
    (e.g. an empty reply kept as context, an input field that was ignored); preprocessing
    counts them in its summary so that nothing is silently dropped."""


@dataclass(frozen=True)
class Document:
    """A parsed plain-text record (format ``text``): a document of continued pretraining, whose
    every token is trained (``render.render_document``)."""

    text: str
    """The document, as given (never empty)."""
    notes: Tuple[str, ...] = ()
    """Other fields of the record, ignored and named (``ignored field 'meta'``), as
    ``Conversation.notes``."""


def detect_format(record: Dict[str, Any], text_key: str = DEFAULT_TEXT_KEY) -> str:
    """Name of the format of one record, from its keys: ``text`` when it has ``text_key`` and
    none of ``CONVERSATION_KEYS``."""
    if text_key in record and not any(key in record for key in CONVERSATION_KEYS):
        return TEXT_FORMAT
    if "messages" in record:
        return "openai"
    if "conversations" in record:
        return "sharegpt"
    if "conversation" in record:
        return "firefly"
    if "instruction" in record and "output" in record:
        return "alpaca"
    keys = ", ".join(sorted(record)[:8]) or "none"
    raise RecordError(
        "unknown_format",
        f"unknown record format (keys: {keys}); expected a 'messages' (openai), 'conversations' "
        f"(sharegpt), 'conversation' (firefly), 'instruction'+'output' (alpaca) or '{text_key}' "
        "(text; another field name with --text-key) record, or force one with --input-format",
    )


# -- fields ---------------------------------------------------------------------------------------

Notes = Dict[str, None]
"""The notes of one record, in first-seen order (a dict used as an ordered set)."""
Entries = List[Tuple[str, "Message"]]
"""Parsed messages with where each came from in the record (``messages[3]``), for errors."""


def check_text(text: str, where: str) -> str:
    """``text`` itself; ``RecordError("invalid_unicode")`` when it holds a lone surrogate (half
    of a UTF-16 pair, e.g. an emoji cut in two: valid JSON, but not encodable as UTF-8, so no
    tokenizer can encode it)."""
    if not text.isascii():
        found = _SURROGATE.search(text)
        if found:
            raise RecordError(
                "invalid_unicode",
                f"{where} holds a lone surrogate {found.group()!r} at character {found.start()} "
                "(half of a UTF-16 pair, e.g. an emoji cut in two), which cannot be encoded as "
                "UTF-8 nor tokenized; repair or remove that text",
            )
    return text


def _check_json_text(value: Any, where: str) -> None:
    """``check_text`` on every string (keys included) inside a JSON value."""
    if isinstance(value, str):
        check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            check_text(str(key), where)
            _check_json_text(item, where)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _check_json_text(item, where)


def _optional_string(obj: Dict[str, Any], key: str, where: str) -> Optional[str]:
    """The string at ``key``; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RecordError(
            "bad_field_type",
            f"{where}: field '{key}' must be a string, got {type(value).__name__}",
        )
    if value.isascii() or not _SURROGATE.search(value):  # the common case, no message built
        return value
    return check_text(value, f"{where}: field '{key}'")


def _string_field(obj: Dict[str, Any], key: str, where: str, required: bool = True) -> str:
    value = _optional_string(obj, key, where)
    if value is None:
        if required:
            raise RecordError("missing_field", f"{where}: field '{key}' is missing")
        return ""
    return value


def _list_field(record: Dict[str, Any], key: str) -> List[Any]:
    if key not in record:
        raise RecordError("missing_field", f"field '{key}' is missing")
    value = record[key]
    if not isinstance(value, list):
        raise RecordError(
            "bad_field_type", f"field '{key}' must be a list, got {type(value).__name__}"
        )
    return value


def _items(record: Dict[str, Any], key: str) -> List[Dict[str, Any]]:
    items = _list_field(record, key)
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise RecordError(
                "bad_field_type",
                f"{key}[{index}] must be an object, got {type(item).__name__}",
            )
    return items


def _other_fields(obj: Dict[str, Any], known: Iterable[str], label: str, where: str,
                  notes: Notes) -> None:
    """Fields of ``obj`` outside ``known``: refused when the name looks like loss control
    (``looks_like_loss_control``; ``weight`` and ``loss`` too where they are not ``known``:
    they are read on messages only), else noted as ``ignored field '{label}{key}'``. Null
    values count as absent."""
    for key, value in obj.items():
        if key in known or value is None:
            continue
        if looks_like_loss_control(key):
            raise RecordError(
                "unsupported_loss_field",
                f"{where}: field '{key}' looks like loss control, which is only read as "
                "\"weight\": 0|1 or \"loss\": false|true on each message of an openai or "
                "sharegpt record (e.g. \"weight\": 0 keeps that message out of training); "
                "rename or remove it",
            )
        notes[f"ignored field '{label}{key}'"] = None


def _as_json(value: Any) -> str:
    """A value as the input spells it (JSON: ``false``, ``"0"``, ``[0, 1]``), for messages."""
    return json.dumps(value, ensure_ascii=False, default=str)


def _loss_control(item: Dict[str, Any], where: str, role: str) -> Optional[bool]:
    """``Message.train`` from ``weight`` (0/1) and ``loss`` (false/true); None when neither."""
    weight, loss = item.get("weight"), item.get("loss")
    if weight is None and loss is None:
        return None
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                               or weight not in (0, 1)):
        raise RecordError(
            "bad_loss_control",
            f"{where}: 'weight' must be 0 (not trained) or 1 (trained), got {_as_json(weight)}; "
            "fractional or per-token weights are not supported",
        )
    if loss is not None and not isinstance(loss, bool):
        raise RecordError(
            "bad_loss_control",
            f"{where}: 'loss' must be true (trained) or false (not trained), got "
            f"{_as_json(loss)}",
        )
    values = {bool(v) for v in (weight, loss) if v is not None}
    if len(values) > 1:
        raise RecordError(
            "bad_loss_control",
            f"{where}: 'weight' {_as_json(weight)} and 'loss' {_as_json(loss)} disagree; keep "
            "one of them",
        )
    train = values.pop() if values else None
    if train and role != "assistant":
        raise RecordError(
            "train_not_assistant",
            f"{where}: this {role} message asks to be trained ('weight' 1 / 'loss' true) but only "
            "assistant messages are trained; remove the field or set it to 0 / false",
        )
    return train


# -- tools, tool calls, reasoning -------------------------------------------------------------


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _decode_json(text: str, where: str, reason: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(
            reason, f"{where} is a string but not valid JSON ({exc.msg} at column {exc.colno})"
        ) from None


def _tool_call(call: Any, where: str) -> ToolCall:
    """One call: ``{"type": "function", "function": {"name", "arguments"}, "id"}`` or the flat
    ``{"name", "arguments"}`` (ShareGPT's function_call)."""
    layout = ('{"type": "function", "function": {"name": ..., "arguments": {...}}, "id": ...} '
              'or {"name": ..., "arguments": {...}}')
    if not isinstance(call, dict):
        raise RecordError("bad_tool_call",
                          f"{where} must be an object {layout}, got {type(call).__name__}")
    if call.get("type") not in (None, "function"):
        raise RecordError("bad_tool_call", f"{where}: tool call type {call['type']!r} is not "
                          "supported; only 'function' calls are")
    function = call["function"] if call.get("function") is not None else call
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or not name:
        raise RecordError("bad_tool_call", f"{where}: the function's 'name' must be a non-empty "
                          f"string, got {name!r}; a call is {layout}")
    arguments = function.get("arguments")
    if arguments is None:
        raise RecordError("bad_tool_call", f"{where}: 'arguments' is missing; write {{}} for a "
                          "call without arguments")
    text = arguments if isinstance(arguments, str) and arguments.strip() else None
    if isinstance(arguments, str):  # "" (or blank): a call without arguments
        arguments = (_decode_json(arguments, f"{where}: 'arguments'", "bad_tool_call")
                     if text is not None else {})
    if not isinstance(arguments, dict):
        raise RecordError("bad_tool_call", f"{where}: 'arguments' must be a JSON object (or a "
                          f"string of one), got {type(arguments).__name__}")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        raise RecordError("bad_tool_call", f"{where}: 'id' must be a string, got "
                          f"{type(call_id).__name__}")
    _check_json_text([name, arguments, call_id or ""], where)
    return ToolCall(name, arguments, call_id, text)


def _tool_calls(value: Any, where: str) -> Tuple[ToolCall, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RecordError("bad_tool_call", f"{where}: field 'tool_calls' must be a list, got "
                          f"{type(value).__name__}")
    return tuple(_tool_call(call, f"{where}.tool_calls[{i}]") for i, call in enumerate(value))


def parse_tools(value: Any) -> Tuple[Dict[str, Any], ...]:
    """Record-level ``tools`` (a list of function descriptions, or a JSON string of one; None
    for none) as chat templates take them: a bare function ``{"name", ...}`` wrapped as
    ``{"type": "function", "function": {...}}``. Raises ``RecordError("bad_tools")``."""
    if isinstance(value, str):
        value = _decode_json(value, "field 'tools'", "bad_tools") if value.strip() else None
    if value is None:
        return ()
    if not isinstance(value, list):
        raise RecordError("bad_tools", "field 'tools' must be a list of function descriptions "
                          f"(or a JSON string of one), got {type(value).__name__}")
    tools = []
    for index, tool in enumerate(value):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise RecordError(
                "bad_tools",
                f"tools[{index}] must be {{\"type\": \"function\", \"function\": {{\"name\", "
                "\"description\", \"parameters\"}} or the function object itself (with a string "
                f"'name'), got {_short(tool)}",
            )
        tools.append(tool if "function" in tool else {"type": "function", "function": tool})
    _check_json_text(tools, "field 'tools'")
    return tuple(tools)


def split_reasoning(content: str, reasoning: Optional[str], where: str
                    ) -> Tuple[str, Optional[str]]:
    """``(reply, reasoning)`` of an assistant message: a leading ``<think>...</think>`` block of
    ``content`` is its reasoning, as ``reasoning_content`` is (newlines around both removed, the
    reply's leading newlines too). Raises ``RecordError`` when the block is not closed
    (``bad_reasoning``) or both are given and differ (``reasoning_conflict``)."""
    given = None if reasoning is None else reasoning.strip("\n")
    stripped = content
    if not content.startswith(_THINK_OPEN):
        if not content[:1].isspace():  # the common case, without copying the text
            return content, given
        stripped = content.lstrip()
        if not stripped.startswith(_THINK_OPEN):
            return content, given
    end = stripped.find(_THINK_CLOSE)
    if end < 0:
        raise RecordError("bad_reasoning", f"{where}: the content starts with {_THINK_OPEN} but "
                          f"has no {_THINK_CLOSE}; close the reasoning block or move it to "
                          "'reasoning_content'")
    inline = stripped[len(_THINK_OPEN):end].strip("\n")
    if given is not None and given != inline:
        raise RecordError("reasoning_conflict", f"{where}: 'reasoning_content' and the "
                          f"{_THINK_OPEN} block of the content differ; keep one of them")
    return stripped[end + len(_THINK_CLOSE):].lstrip("\n"), inline


# -- messages ---------------------------------------------------------------------------------

_ROLE_FIELDS = {
    "system": (),
    "user": (),
    "assistant": ("tool_calls", "function_call", "reasoning_content"),
    "tool": ("name", "tool_call_id"),
}
OPENAI_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                "function": "tool"}
"""OpenAI ``role`` spellings and their roles: the legacy ``function`` is a tool result."""


def tool_result_text(value: Any) -> str:
    """A tool result given as a JSON object or list, as text: ``json.dumps(value,
    ensure_ascii=False)``, the one serialization of JSON values in messages (chat templates'
    ``tojson``, as they write tool-call arguments)."""
    return json.dumps(value, ensure_ascii=False)


def _text_parts(parts: List[Dict[str, Any]], where: str) -> str:
    """Content parts as text: the text parts joined with a space (what ``transformers serve``
    does for text-only models); any other part is refused (``non_text_content``)."""
    texts = []
    for index, part in enumerate(parts):
        kind, text = part.get("type"), part.get("text")
        if kind not in TEXT_PARTS:
            raise RecordError(
                "non_text_content",
                f"{where}[{index}] is a {_as_json(kind)} part, but only text parts (type "
                f"{', '.join(TEXT_PARTS)}) can be trained with a text model; remove that part "
                "or the record")
        if not isinstance(text, str):
            raise RecordError("bad_field_type", f"{where}[{index}]: 'text' must be a string, "
                              f"got {type(text).__name__}")
        texts.append(check_text(text, f"{where}[{index}]"))
    return " ".join(texts)


def _content(item: Dict[str, Any], key: str, where: str, role: str,
             required: bool = True) -> str:
    """A message's text at ``key``: a string; a list of content parts (``_text_parts``); for a
    tool result a JSON object or list serialized (``tool_result_text``). Raises
    ``RecordError``."""
    value = item.get(key)
    if value is None or isinstance(value, str):
        return _string_field(item, key, where, required)
    if isinstance(value, list) and all(isinstance(p, dict) and "type" in p for p in value):
        return _text_parts(value, f"{where}.{key}")
    if role == "tool" and isinstance(value, (dict, list)):
        return check_text(tool_result_text(value), f"{where}: field '{key}'")
    also = ", or for a tool result a JSON object" if role == "tool" else ""
    raise RecordError("bad_field_type", f"{where}: field '{key}' must be a string, got "
                      f"{type(value).__name__} (or a list of text parts [{{\"type\": \"text\", "
                      f"\"text\": \"...\"}}]{also})")


UNREAD_REPLY_FIELDS = {"refusal": "content", "reasoning": "reasoning_content",
                       "thinking": "reasoning_content"}
"""Assistant fields other APIs put reply text or reasoning in, and where it is read from."""


def _unread_reply_fields(item: Dict[str, Any], where: str) -> None:
    """Refuse (``unsupported_reply_field``) an assistant field that holds text of the reply under
    a name that is not read (OpenAI's ``refusal``, vLLM's ``reasoning``, ``thinking``): noting it
    as ignored would train the reply without it."""
    for key, instead in UNREAD_REPLY_FIELDS.items():
        if item.get(key) is not None:
            raise RecordError(
                "unsupported_reply_field",
                f"{where}: field '{key}' holds text of the reply, which is only read from "
                f"'{instead}'; move it there (or remove it)")


def _assistant_calls(item: Dict[str, Any], where: str) -> Tuple[ToolCall, ...]:
    """``tool_calls``, or the legacy ``function_call`` (``{"name", "arguments"}``) as one call."""
    calls = _tool_calls(item.get("tool_calls"), where)
    legacy = item.get("function_call")
    if legacy is None:
        return calls
    if calls:
        raise RecordError("bad_tool_call", f"{where} has both 'tool_calls' and the legacy "
                          "'function_call'; keep one of them")
    return (_tool_call(legacy, f"{where}.function_call"),)


@functools.lru_cache(maxsize=None)
def _message_fields(layout_keys: Tuple[str, ...], text_key: str, role: str) -> frozenset:
    return frozenset(layout_keys + (text_key,) + _ROLE_FIELDS[role] + LOSS_CONTROL)


def _message(item: Dict[str, Any], where: str, role: str, text_key: str,
             layout_keys: Tuple[str, ...], label: str, notes: Notes) -> Message:
    """One message whose role is known; ``text_key`` holds its text (``content``/``value``)."""
    known = _message_fields(layout_keys, text_key, role)
    if not known.issuperset(item):
        if role == "assistant":
            _unread_reply_fields(item, where)
        _other_fields(item, known, label, where, notes)
    train = _loss_control(item, where, role) if "weight" in item or "loss" in item else None
    if role == "tool":
        return Message("tool", _content(item, text_key, where, role), train=train,
                       name=_optional_string(item, "name", where),
                       tool_call_id=_optional_string(item, "tool_call_id", where))
    if role != "assistant":
        return Message(role, _content(item, text_key, where, role), train=train)
    calls = _assistant_calls(item, where)
    if text_key not in item and not calls:
        raise RecordError("missing_field", f"{where}: field '{text_key}' is missing")
    content, reasoning = split_reasoning(
        _content(item, text_key, where, role, required=False),
        _optional_string(item, "reasoning_content", where), where)
    return Message("assistant", content, calls, reasoning, train)


def _role_message(item: Dict[str, Any], where: str, label: str, notes: Notes,
                  roles: Dict[str, str]) -> Optional[Message]:
    """A ``{"role", "content", ...}`` message; None for a null system message (noted)."""
    name = _string_field(item, "role", where)
    role = roles.get(name)
    if role is None:
        raise RecordError("unknown_role",
                          f"{where}: role {name!r} is not one of {', '.join(roles)}")
    if role == "system" and item.get("content") is None:
        notes[NOTE_NULL_SYSTEM] = None
        return None
    if name == "function" and item.get("name") is None:
        raise RecordError("missing_field", f"{where}: field 'name' is missing: a legacy "
                          "'function' message is the result of the function it names")
    return _message(item, where, role, "content", ("role",), label, notes)


def message_from_dict(item: Any, where: str) -> Optional[Message]:
    """One OpenAI / Hugging Face message dict (``{"role", "content", "tool_calls", ...}``) as a
    ``Message``; None for a null system message. Raises ``RecordError``."""
    if not isinstance(item, dict):
        raise RecordError("bad_field_type", f"{where} must be an object like "
                          f"{{'role': 'user', 'content': '...'}}, got {type(item).__name__}")
    return _role_message(item, where, "", {}, OPENAI_ROLES)


def _assistant_text(text: str, where: str) -> Message:
    content, reasoning = split_reasoning(text, None, where)
    return Message("assistant", content, reasoning=reasoning)


def _system_field(record: Dict[str, Any]) -> Entries:
    system = _optional_string(record, "system", "record")
    return [("record field 'system'", Message("system", system))] if system else []


# -- formats ----------------------------------------------------------------------------------


def _parse_openai(record: Dict[str, Any], notes: Notes) -> Entries:
    _other_fields(record, ("messages", "tools"), "", "record", notes)
    entries = []
    for index, item in enumerate(_items(record, "messages")):
        where = f"messages[{index}]"
        message = _role_message(item, where, "messages[].", notes, OPENAI_ROLES)
        if message is not None:
            entries.append((where, message))
    return entries


def _sharegpt_item(item: Dict[str, Any], where: str, notes: Notes) -> Optional[Message]:
    label = "conversations[]."
    if "from" not in item and "role" in item:  # a {"role", "content"} message
        return _role_message(item, where, label, notes, _SHAREGPT_MESSAGE_ROLES)
    speaker = _string_field(item, "from", where)
    role = SHAREGPT_ROLES.get(speaker)
    if role is None:
        raise RecordError("unknown_role", f"{where}: 'from' {speaker!r} is not one of "
                          f"{', '.join(SHAREGPT_ROLES)}")
    if role == "system" and item.get("value") is None:
        notes[NOTE_NULL_SYSTEM] = None
        return None
    if speaker != SHAREGPT_CALL:
        return _message(item, where, role, "value", ("from",), label, notes)
    _other_fields(item, ("from", "value") + LOSS_CONTROL, label, where, notes)
    value = item.get("value")
    if value is None:
        raise RecordError("missing_field", f"{where}: field 'value' is missing")
    if isinstance(value, str):
        value = _decode_json(value, f"{where}: 'value'", "bad_tool_call")
    calls = value if isinstance(value, list) else [value]
    tool_calls = tuple(_tool_call(call, f"{where}.value" + (f"[{i}]" if calls is value else ""))
                       for i, call in enumerate(calls))
    return Message("assistant", "", tool_calls, train=_loss_control(item, where, "assistant"))


def _joined_call(entries: Entries, call: Message, where: str) -> Optional[Message]:
    """A ``function_call`` item right after an assistant message joins it, as OpenAI's layout
    has one message (content, then its calls): the reply and its calls are one turn, not a
    reply ended before calling. None when no assistant message precedes it. Their loss
    control must agree (``bad_loss_control``)."""
    if not entries or entries[-1][1].role != "assistant":
        return None
    before, reply = entries[-1]
    trains = {m.train for m in (reply, call)} - {None}
    if len(trains) > 1:
        raise RecordError(
            "bad_loss_control",
            f"{where} (function_call) continues the assistant message {before}, but their "
            "'weight' / 'loss' disagree: they are one reply; keep one setting")
    return dataclasses.replace(reply, tool_calls=reply.tool_calls + call.tool_calls,
                               train=trains.pop() if trains else None)


def _parse_sharegpt(record: Dict[str, Any], notes: Notes) -> Entries:
    _other_fields(record, ("conversations", "system", "tools"), "", "record", notes)
    entries = _system_field(record)
    for index, item in enumerate(_items(record, "conversations")):
        where = f"conversations[{index}]"
        message = _sharegpt_item(item, where, notes)
        if message is None:
            continue
        joined = _joined_call(entries, message, where) \
            if item.get("from") == SHAREGPT_CALL else None
        if joined is not None:
            entries[-1] = (entries[-1][0], joined)
        else:
            entries.append((where, message))
    return entries


def _parse_firefly(record: Dict[str, Any], notes: Notes) -> Entries:
    _other_fields(record, ("conversation", "system"), "", "record", notes)
    entries = _system_field(record)
    for index, item in enumerate(_items(record, "conversation")):
        where = f"conversation[{index}]"
        _other_fields(item, ("human", "assistant"), "conversation[].", where, notes)
        entries.append((f"{where}.human", Message("user", _string_field(item, "human", where))))
        entries.append((f"{where}.assistant",
                        _assistant_text(_string_field(item, "assistant", where), where)))
    return entries


def _parse_alpaca(record: Dict[str, Any], notes: Notes) -> Entries:
    _other_fields(record, ("instruction", "input", "output", "system"), "", "record", notes)
    entries = _system_field(record)
    instruction = _string_field(record, "instruction", "record")
    extra = _string_field(record, "input", "record", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    entries.append(("record field 'instruction'", Message("user", prompt)))
    entries.append(("record field 'output'",
                    _assistant_text(_string_field(record, "output", "record"), "record")))
    return entries


_PARSERS = {
    "openai": _parse_openai,
    "sharegpt": _parse_sharegpt,
    "firefly": _parse_firefly,
    "alpaca": _parse_alpaca,
}


# -- structure --------------------------------------------------------------------------------


def _check_tool_result(messages: Sequence[Message], names: Sequence[str], index: int) -> None:
    """Rule 2: a tool result follows the assistant message whose calls it answers."""
    start = index - 1
    while start >= 0 and messages[start].role == "tool":
        start -= 1
    where = f"{names[index]} (tool)"
    caller = messages[start] if start >= 0 else None
    if caller is None or caller.role != "assistant" or not caller.tool_calls:
        before = "opens the conversation" if caller is None else \
            f"follows {names[start]} ({caller.role}), which calls no tool"
        raise RecordError(
            "role_order",
            f"{where} {before}: a tool result must follow the assistant message with the tool "
            "calls it answers (or another tool result)",
        )
    ids = sorted({call.id for call in caller.tool_calls if call.id})
    wanted = messages[index].tool_call_id
    if wanted and ids and wanted not in ids:
        raise RecordError(
            "role_order",
            f"{where} answers tool_call_id {wanted!r}, but the calls of {names[start]} have ids "
            f"{', '.join(map(repr, ids))}; fix the id",
        )


def _check_results(messages: Sequence[Message], names: Sequence[str], caller: int,
                   end: int) -> None:
    """Rule 3: the tool results ``messages[caller + 1:end]`` answer every call of
    ``messages[caller]``, by ``tool_call_id`` when every call and result has an id, else by
    count; ``end`` is the index of the message that follows them (``len(messages)``: the reply
    to generate). Raises ``RecordError("role_order")`` naming the calls left unanswered."""
    calls, results = messages[caller].tool_calls, messages[caller + 1:end]
    if all(c.id for c in calls) and all(r.tool_call_id for r in results):
        answered = {r.tool_call_id for r in results}
        missing = [c for c in calls if c.id not in answered]
    else:
        missing = list(calls[len(results):])
    if not missing:
        return
    shown = ", ".join(c.name + (f" (id {c.id!r})" if c.id else "") for c in missing)
    following = (f"{names[end]} ({messages[end].role})" if end < len(messages)
                 else "the reply to generate")
    raise RecordError(
        "role_order",
        f"{names[caller]} (assistant) makes {len(calls)} tool call(s) but the result of "
        f"{shown} is missing before {following}: the results of all calls must follow them "
        "before the next user or assistant message (a conversation may end with the calls)")


def _names(messages: Sequence[Message], names: Optional[Sequence[str]]) -> List[str]:
    """Where each message came from; by default ``messages[i]``, the one way messages are named
    in errors of formats, render and render_hf."""
    return list(names) if names is not None else [f"messages[{i}]" for i in range(len(messages))]


def validate_roles(messages: Sequence[Message], names: Optional[Sequence[str]] = None) -> None:
    """Check the role structure rules of the module docstring: a system message only first, tool
    results right after the tool calls they answer, tool calls followed by the results of all
    of them unless last. ``names`` says where each message came from (default
    ``messages[index]``). Raises ``RecordError`` (``unknown_role``, ``bad_tool_call``,
    ``role_order``) for the first message that breaks a rule."""
    names = _names(messages, names)
    for index, message in enumerate(messages):
        role, name = message.role, names[index]
        if role not in ROLES:
            raise RecordError("unknown_role", f"{name}: role {role!r} is not one of "
                              f"{', '.join(ROLES)}")
        if message.tool_calls and role != "assistant":
            raise RecordError("bad_tool_call", f"{name} ({role}) has tool calls; only assistant "
                              "messages call tools")
        if role == "system" and index > 0:
            raise RecordError(
                "role_order",
                f"{name} (system) comes after {names[0]}: a system message can only be the "
                "first message (templates put the system prompt at the top); merge it into the "
                "first one or remove it",
            )
        if role == "tool":
            _check_tool_result(messages, names, index)
        if message.tool_calls and index + 1 < len(messages) and \
                messages[index + 1].role != "tool":
            raise RecordError(
                "role_order",
                f"{name} (assistant) calls tools but {names[index + 1]} "
                f"({messages[index + 1].role}) follows instead of their results: the results "
                "('tool' messages) must follow the calls (a conversation may end with a call)",
            )
        if role != "tool" and index and messages[index - 1].role == "tool":
            caller = index - 1
            while messages[caller].role == "tool":
                caller -= 1
            _check_results(messages, names, caller, index)


def validate_prompt(messages: Sequence[Message], names: Optional[Sequence[str]] = None) -> None:
    """The conversation a reply is generated for: ``validate_roles``' rules, ending with a user
    message or tool results that answer all the calls before them. Raises ``RecordError``
    (reason ``role_order``)."""
    names = _names(messages, names)
    validate_roles(messages, names)
    if not messages or messages[-1].role not in ("user", "tool"):
        last = f"{names[-1]} ({messages[-1].role}) is last" if messages else "it is empty"
        raise RecordError("role_order", "the conversation must end with a user message (or a "
                          f"tool result) to reply to, but {last}")
    caller = len(messages) - 1
    while messages[caller].role == "tool":
        caller -= 1
    if caller < len(messages) - 1:
        _check_results(messages, names, caller, len(messages))


def is_empty_reply(message: Message) -> bool:
    """An assistant message with no visible content and no tool calls (reasoning alone does not
    make a reply): never trained."""
    return (message.role == "assistant" and not message.tool_calls
            and (not message.content or message.content.isspace()))


def _trainable(entries: Entries, empty_reply: str, notes: Notes) -> List[Message]:
    """Empty replies made context (or refused), then the messages up to the last trainable
    reply. Raises ``RecordError`` when no reply can be trained."""
    messages, first_empty = [], None
    for where, message in entries:
        if is_empty_reply(message) and message.train is not False:
            if empty_reply == "error":
                raise RecordError(
                    "empty_reply",
                    f"{where} (assistant) is empty (no content, no tool calls); fill the reply "
                    "or remove the turn, or pass --empty-reply context to keep the record with "
                    "this reply as untrained context",
                )
            first_empty = first_empty or where
            message = dataclasses.replace(message, train=False)
            notes[NOTE_EMPTY_REPLY] = None
        messages.append(message)
    trainable = [i for i, m in enumerate(messages)
                 if m.role == "assistant" and m.train is not False]
    last = trainable[-1] if trainable else None
    if last is None:
        raise _nothing_to_train(messages, first_empty)
    if last + 1 < len(messages):
        notes[NOTE_TRAILING] = None
    return messages[: last + 1]


def _nothing_to_train(messages: Sequence[Message], first_empty: Optional[str]) -> RecordError:
    if not any(m.role == "assistant" for m in messages):
        return RecordError("no_assistant",
                           "the conversation has no assistant reply, so nothing would be trained")
    if first_empty is not None:
        return RecordError("empty_reply", f"{first_empty} (assistant) is empty (no content, no "
                           "tool calls) and no other reply can be trained; fill the reply or "
                           "remove the record")
    return RecordError("no_trained_turn", "every assistant message has \"weight\": 0 or "
                       "\"loss\": false, so nothing would be trained; remove the record or let "
                       "one of its replies be trained")


def parse_document(record: Dict[str, Any], text_key: str = DEFAULT_TEXT_KEY) -> Document:
    """A ``text`` record into a ``Document``: ``record[text_key]`` a non-empty string of
    encodable text; other fields noted as ignored (a loss-control lookalike refused, as in every
    format). Raises ``RecordError`` (``missing_field``, ``bad_field_type``, ``empty_text``,
    ``invalid_unicode``, ``unsupported_loss_field``)."""
    notes: Notes = {}
    _other_fields(record, (text_key,), "", "record", notes)
    text = _string_field(record, text_key, "record")
    if not text:
        raise RecordError("empty_text", f"record: field '{text_key}' is empty, so nothing would "
                          "be trained; remove the record")
    return Document(text, tuple(notes))


def parse_record(record: Any, input_format: Optional[str] = None,
                 empty_reply: str = "context", text_key: str = DEFAULT_TEXT_KEY
                 ) -> Union[Conversation, Document]:
    """One JSON value (a decoded JSONL line, JSON-array element or Parquet row) into a validated
    ``Conversation``: messages that pass ``validate_roles``, end with a trainable assistant reply
    and hold only encodable text; record-level ``tools``; ``notes`` for what was changed or
    ignored. A ``text`` record (``text_key``) becomes a ``Document`` (``parse_document``).
    ``input_format`` None detects the format; ``empty_reply`` is ``--empty-reply``
    (``EMPTY_REPLY``). Raises ``RecordError``."""
    if not isinstance(record, dict):
        raise RecordError(
            "bad_field_type", f"a record must be a JSON object, got {type(record).__name__}"
        )
    notes: Notes = {}
    name = input_format or detect_format(record, text_key)
    if name == TEXT_FORMAT:
        return parse_document(record, text_key)
    entries = _PARSERS[name](record, notes)
    tools = parse_tools(record.get("tools")) if name in ("openai", "sharegpt") else ()
    validate_roles([m for _, m in entries], [where for where, _ in entries])
    messages = _trainable(entries, empty_reply, notes)
    return Conversation(tuple(messages), tools, tuple(notes))
