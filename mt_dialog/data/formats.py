"""Input record formats, normalized into a list of ``Message``.

Accepted (auto-detected per record, or forced with ``--input-format``):

===========  ====================================================================================
openai       ``{"messages": [{"role": "system|user|assistant", "content": "..."}]}`` (also HF)
sharegpt     ``{"conversations": [{"from": "system|human|gpt", "value": "..."}]}``
firefly      ``{"conversation": [{"human": "...", "assistant": "..."}], "system": "..."}``
alpaca       ``{"instruction": "...", "input": "...", "output": "...", "system": "..."}``
===========  ====================================================================================

Every problem raises ``RecordError`` with a short ``reason`` (what ``--on-error skip`` counts) and a
message saying what is wrong and how to fix it; the caller prefixes ``file:line``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

FORMATS = ("openai", "sharegpt", "firefly", "alpaca")

SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


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
    """The arguments as a JSON value (a dict for every real API): a JSON *string* in the input
    is decoded, because chat templates serialize the value themselves (``tojson``)."""
    id: Optional[str] = None
    """The call id a ``tool`` message answers with ``tool_call_id`` (may be absent)."""


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
    ``<think>...</think>`` block of ``content``); None when there is none."""
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


def detect_format(record: Dict[str, Any]) -> str:
    """Name of the format of one record, from its keys."""
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
        "(sharegpt), 'conversation' (firefly) or 'instruction'+'output' (alpaca) record, or force "
        "one with --input-format",
    )


def _string_field(obj: Dict[str, Any], key: str, where: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise RecordError("missing_field", f"{where}: field '{key}' is missing")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise RecordError(
            "bad_field_type",
            f"{where}: field '{key}' must be a string, got {type(value).__name__}",
        )
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


def _parse_openai(record: Dict[str, Any]) -> List[Message]:
    messages = []
    for index, item in enumerate(_items(record, "messages")):
        where = f"messages[{index}]"
        role = _string_field(item, "role", where)
        if role not in ("system", "user", "assistant"):
            raise RecordError(
                "unknown_role",
                f"{where}: role {role!r} is not one of system, user, assistant",
            )
        messages.append(Message(role, _string_field(item, "content", where)))
    return messages


def _parse_sharegpt(record: Dict[str, Any]) -> List[Message]:
    messages = []
    system = _string_field(record, "system", "record", required=False)
    if system:
        messages.append(Message("system", system))
    for index, item in enumerate(_items(record, "conversations")):
        where = f"conversations[{index}]"
        speaker = _string_field(item, "from", where)
        if speaker not in SHAREGPT_ROLES:
            raise RecordError(
                "unknown_role",
                f"{where}: 'from' {speaker!r} is not one of {', '.join(SHAREGPT_ROLES)}",
            )
        messages.append(Message(SHAREGPT_ROLES[speaker], _string_field(item, "value", where)))
    return messages


def _parse_firefly(record: Dict[str, Any]) -> List[Message]:
    messages = []
    system = _string_field(record, "system", "record", required=False)
    if system:
        messages.append(Message("system", system))
    for index, item in enumerate(_items(record, "conversation")):
        where = f"conversation[{index}]"
        messages.append(Message("user", _string_field(item, "human", where)))
        messages.append(Message("assistant", _string_field(item, "assistant", where)))
    return messages


def _parse_alpaca(record: Dict[str, Any]) -> List[Message]:
    messages = []
    system = _string_field(record, "system", "record", required=False)
    if system:
        messages.append(Message("system", system))
    instruction = _string_field(record, "instruction", "record")
    extra = _string_field(record, "input", "record", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages.append(Message("user", prompt))
    messages.append(Message("assistant", _string_field(record, "output", "record")))
    return messages


_PARSERS = {
    "openai": _parse_openai,
    "sharegpt": _parse_sharegpt,
    "firefly": _parse_firefly,
    "alpaca": _parse_alpaca,
}


def validate_roles(messages: List[Message]) -> None:
    """Check ``[system] user assistant (user assistant)*``; name the first message that breaks it."""
    body = messages[1:] if messages and messages[0].role == "system" else messages
    offset = len(messages) - len(body)
    for index, message in enumerate(body):
        expected = "user" if index % 2 == 0 else "assistant"
        if message.role != expected:
            raise RecordError(
                "role_order",
                f"message {index + offset} is {message.role!r} but {expected!r} was expected: "
                "roles must be an optional system message, then user and assistant alternating",
            )
        if expected == "assistant" and not message.content.strip():
            raise RecordError(
                "empty_reply",
                f"message {index + offset} (assistant) is empty; remove the turn or fill the reply",
            )
    if not any(m.role == "assistant" for m in body):
        raise RecordError(
            "no_assistant", "the conversation has no assistant reply, so nothing would be trained"
        )
    if body[-1].role != "assistant":
        raise RecordError(
            "role_order",
            f"message {len(messages) - 1} (user) has no assistant reply after it; "
            "a conversation must end with an assistant reply",
        )


def parse_record(record: Any, input_format: Optional[str] = None) -> List[Message]:
    """One JSON value into validated messages. ``input_format`` None means auto-detect."""
    if not isinstance(record, dict):
        raise RecordError(
            "bad_field_type", f"a record must be a JSON object, got {type(record).__name__}"
        )
    name = input_format or detect_format(record)
    messages = _PARSERS[name](record)
    validate_roles(messages)
    return messages
