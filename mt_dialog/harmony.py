"""Split a reply generated in OpenAI's harmony format (gpt-oss) into reasoning, content and tool
calls, as the chat template lays a reply out.

A harmony reply is a run of assistant messages, each ``<|start|>{role}{header}<|message|>{body}``
closed by ``<|end|>`` (another message follows), ``<|return|>`` (the reply is done) or
``<|call|>`` (a tool call waits for its result). The header names the message's channel,
``<|channel|>analysis`` (reasoning), ``commentary`` (tool calls and preambles) or ``final``
(the answer), and for a tool call its recipient, ``to=functions.NAME`` (before or after the
channel), with the arguments' type ``<|constrain|>json`` (or a bare ``json``). The generation
prompt ends with ``<|start|>assistant``, so the generated text starts with the first message's
header. Example::

    <|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary
    to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>

A text that does not follow this layout (cut off before its answer or call, a call whose
arguments are not a JSON object, an unknown channel or role) is given back whole as the content.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

from mt_dialog.data.formats import ToolCall

START, MESSAGE, CHANNEL = "<|start|>", "<|message|>", "<|channel|>"
END, RETURN, CALL, CONSTRAIN = "<|end|>", "<|return|>", "<|call|>", "<|constrain|>"
HARMONY_TOKENS = (START, MESSAGE, CHANNEL, END)
"""The special tokens a tokenizer must have, and its chat template write, to be harmony's."""

_CLOSERS = re.compile(re.escape(END) + "|" + re.escape(RETURN) + "|" + re.escape(CALL))
_HEADER = re.compile(
    r"\s*(?:to=(?P<before>[^\s<]+)\s*)?" + re.escape(CHANNEL) + r"(?P<channel>[A-Za-z_]+)"
    r"(?:\s+to=(?P<after>[^\s<]+))?\s*(?:(?:" + re.escape(CONSTRAIN) + r")?[\w./-]+)?\s*$")
_ROLE = re.compile(r"[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class HarmonyReply:
    """A generated reply, split."""

    content: str
    """The final (and commentary preamble) channels' text, messages joined by a blank line; the
    whole generated text when it does not follow the harmony layout."""
    reasoning: Optional[str] = None
    """The analysis channel's text (messages joined by a blank line); None when there is none."""
    tool_calls: Tuple[ToolCall, ...] = ()
    """The calls to ``functions.NAME`` (``arguments_text`` the body verbatim; no ids)."""


class _Malformed(Exception):
    pass


def is_harmony(hf_tokenizer) -> bool:
    """Whether a Hugging Face tokenizer's chat template is harmony's: the tokenizer has all of
    ``HARMONY_TOKENS`` as special tokens and its chat template writes each of them."""
    template = getattr(hf_tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return False
    specials = set(getattr(hf_tokenizer, "all_special_tokens", ()))
    specials |= {t.content for t in hf_tokenizer.added_tokens_decoder.values() if t.special}
    return all(t in specials and t in template for t in HARMONY_TOKENS)


def parse_reply(text: str) -> HarmonyReply:
    """``text`` (what was generated after the prompt's ``<|start|>assistant``, decoded with its
    special tokens; the stop token may be left off) split by channel. Never raises: a text
    that does not follow the layout comes back as ``HarmonyReply(text)``."""
    try:
        messages = _messages(text)
        reasoning: List[str] = []
        content: List[str] = []
        calls: List[ToolCall] = []
        for header, body in messages:
            _sort(header, body, reasoning, content, calls)
    except _Malformed:
        return HarmonyReply(text)
    if not content and not calls:  # cut off in the analysis: no answer to give
        return HarmonyReply(text)
    return HarmonyReply("\n\n".join(content), "\n\n".join(reasoning) if reasoning else None,
                        tuple(calls))


def _messages(text: str) -> List[Tuple[str, str]]:
    """``(header, body)`` of each message; the first has no role (the prompt wrote it)."""
    pieces = text.split(START)
    out = []
    for index, piece in enumerate(pieces):
        header, found, rest = piece.partition(MESSAGE)
        if not found:
            raise _Malformed
        if index:  # a later message names its role: only the assistant writes a reply
            role = _ROLE.match(header)
            if role is None or role.group() != "assistant":
                raise _Malformed
            header = header[role.end():]
        closer = _CLOSERS.search(rest)
        last = index == len(pieces) - 1
        if closer is None:
            if not last:
                raise _Malformed
            body = rest  # the stop token left off, or cut off
        else:
            body, after = rest[:closer.start()], rest[closer.end():]
            if after.strip() or (not last and closer.group() != END):
                raise _Malformed
        out.append((header, body))
    return out


def _sort(header: str, body: str, reasoning: List[str], content: List[str],
          calls: List[ToolCall]) -> None:
    """Put one message's body where its channel and recipient say."""
    fields = _HEADER.match(header)
    if fields is None:
        raise _Malformed
    recipient = fields.group("before") or fields.group("after")
    channel = fields.group("channel")
    if recipient is not None:
        name = recipient[len("functions."):] if recipient.startswith("functions.") else recipient
        try:
            arguments = json.loads(body)
        except json.JSONDecodeError:
            raise _Malformed from None
        if not name or not isinstance(arguments, dict):
            raise _Malformed
        calls.append(ToolCall(name, arguments, None, body))
    elif channel == "analysis":
        reasoning.append(body)
    elif channel in ("final", "commentary"):
        content.append(body)
    else:
        raise _Malformed
