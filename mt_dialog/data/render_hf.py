"""Render conversations with a Hugging Face tokenizer's own Jinja chat template (``--template hf``).

The template renders *text*; what is trained is located in that text by rendering variants that
differ only in one reply. For a sample (a conversation, or with ``--reasoning per-turn`` one view
of it) and each trained assistant message k::

    full      the template's rendering of the sample (messages, tools) - one render
    blank_k   the same with message k emptied (no content, calls, reasoning) - one render each

``full`` and ``blank_k`` agree before message k's text and after it, so their first difference
lies in it. Reply k starts right after the generation prompt's opening (the text
``add_generation_prompt`` adds, e.g. ``<|im_start|>assistant\\n``, found on a probe
conversation) that precedes that difference, and ends at the template's end-of-turn token (the
special token it puts after every reply, ``<|im_end|>``, also found on the probe). Its trained
tokens are exactly what the template writes for it *in the whole conversation* - reasoning where
the template keeps it, content as the template trims it, tool calls as it serializes them - and
the end-of-turn, also for templates that are not prefix-consistent (Qwen3 leaves out earlier
turns' reasoning; Llama 3 trims content). ``full`` is tokenized once, as
``apply_chat_template(..., tokenize=True)`` tokenizes it, and each located span is checked to
begin on a token boundary and to end right before the end-of-turn token: for a byte-level BPE
(Llama 3, Qwen, GPT-2 style) by its tokens' byte lengths (``tokenizers.ByteLevelSpans``), for
any other tokenizer, or to name a fault, by the back-end's character offsets. Cost: one render
per sample, one per trained reply, one tokenization.

Templates without one end token (found on the probe, ``ChatTemplateInfo``): a template that
ends a reply where the next message's tag begins (GLM-4.5, ``follows``) trains each reply with
that tag (``<|observation|>``, ``<|user|>``), the sample's last reply with the tag a next user
message opens with, appended; a template that closes the last reply otherwise than the history's
(gpt-oss: ``<|return|>`` / ``<|end|>``, ``turn_views``) trains each user turn's replies in the
rendering cut after them (one sample per user turn). ``ChatTemplateInfo.stops`` lists every id
a trained reply may end with. A record's reasoning is passed where the template reads it
(``REASONING_FORMS``, probed).

A record is refused (``RecordError``) only when its replies cannot be located, with the cause:
``special_token_in_text`` (text that would become a control token), ``template_error`` (the
template raises), ``template_no_tools`` / ``template_no_reasoning`` (the template ignores them,
as found on probe conversations), ``reply_not_rendered`` (the template leaves a trained reply out
of the history), ``reply_opening_not_found``, ``reply_token_boundary``, ``end_of_turn_mismatch``,
``reasoning_dropped`` (``--reasoning keep`` with a template that drops it), ``no_trained_turn``.
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Tuple, Union

import numpy as np

from mt_dialog.data.formats import Conversation, Message, RecordError, ToolCall
from mt_dialog.data.render import (
    RenderedConversation,
    RenderOptions,
    as_conversation,
    has_reply,
    layout_names,
    no_trained_turn,
    sample_views,
    trained_messages,
    turn_lengths,
)
from mt_dialog.data.templates import ReasoningLayout
from mt_dialog.data.tokenizers import ByteLevelSpans, DialogTokenizer, TokenizerError

Dicts = List[Dict[str, Any]]
Tools = Optional[List[Dict[str, Any]]]
_BLANK = {"role": "assistant", "content": ""}
# per-turn views as for a template that leaves earlier turns' reasoning out (the Jinja decides
# what it shows in each view; the views are those of the built-in templates)
_USER_TURN_VIEWS = SimpleNamespace(reasoning=ReasoningLayout(wrap=("", ""), drops_earlier=True))


REASONING_FORMS = ("reasoning_content", "thinking", "inline")
"""Where a chat template may read a reply's reasoning: ``reasoning_content`` (Qwen3, GLM),
``thinking`` (gpt-oss), or ``inline``, a ``<think>\\n...\\n</think>\\n\\n`` block at the start of
``content`` (DeepSeek-R1 distills, QwQ). ``chat_template_info`` probes which one a template
renders."""


def hf_messages(messages: Sequence[Message], reasoning_form: str = "reasoning_content") -> Dicts:
    """Messages as Hugging Face chat templates take them (``apply_chat_template(messages,
    tools=...)``): ``{"role", "content"}``; an assistant's ``tool_calls`` as ``[{"type":
    "function", "function": {"name", "arguments"}, "id"}]`` (the arguments as the input gave
    them: a dict, or its JSON string verbatim) and its reasoning in ``reasoning_form`` (one of
    ``REASONING_FORMS``: the template's, ``ChatTemplateInfo.reasoning_form``);
    a tool result's ``tool_call_id`` and ``name``. Absent values are left out (templates test
    ``is defined``)."""
    out = []
    for m in messages:
        entry: Dict[str, Any] = {"role": m.role, "content": m.content}
        if m.tool_calls:
            entry["tool_calls"] = [
                {"type": "function", "function": {"name": c.name, "arguments": (
                    c.arguments if c.arguments_text is None else c.arguments_text)},
                 **({"id": c.id} if c.id is not None else {})} for c in m.tool_calls]
        if m.reasoning is not None and reasoning_form == "inline":
            entry["content"] = f"<think>\n{m.reasoning}\n</think>\n\n{m.content}"
        elif m.reasoning is not None:
            entry[reasoning_form] = m.reasoning
        if m.name is not None:
            entry["name"] = m.name
        if m.tool_call_id is not None:
            entry["tool_call_id"] = m.tool_call_id
        out.append(entry)
    return out


def _apply(hf_tokenizer, dicts: Dicts, tools: Tools, add_generation_prompt: bool = False,
           **template_kwargs) -> str:
    """The template's text (``template_kwargs``: extra template variables, e.g.
    ``enable_thinking``); a template that refuses the conversation is a ``RecordError``."""
    import jinja2

    try:
        return hf_tokenizer.apply_chat_template(dicts, tools=tools, tokenize=False,
                                                add_generation_prompt=add_generation_prompt,
                                                **template_kwargs)
    except (jinja2.TemplateError, TypeError, ValueError) as exc:
        raise RecordError("template_error",
                          f"the chat template refuses this conversation ({exc})") from None


# -- what a chat template does, found once on probe conversations -------------------------------

@dataclass(frozen=True)
class ChatTemplateInfo:
    """What ``--template hf`` needs to know about a tokenizer's chat template."""

    template: str
    """The Jinja source it was found for."""
    end_of_turn: int
    """Id of the special token the template puts right after every reply."""
    end_text: str
    """Its text."""
    opening: str
    """What ``add_generation_prompt`` adds (``<|im_start|>assistant\\n``); "" when nothing."""
    opener: Optional[str]
    """The special token ``opening`` starts with (``<|im_start|>``), which opens every message:
    never inside a reply."""
    specials: "re.Pattern[str]"
    """Matches the text of any special token of the tokenizer (longest first)."""
    renders: FrozenSet[str] = frozenset()
    """Which of "tools", "tool_calls", "tool_results", "reasoning" the template renders."""
    marks: bool = False
    """Whether reply contents can be located by one rendering with marked contents
    (``_marked_contents`` worked on the probe); else each reply takes a blanked rendering."""
    follows: bool = False
    """Whether the template closes no reply with an end token: a reply ends where the next
    message's role tag begins (GLM: ``<|user|>``, ``<|observation|>``). Each reply is then
    trained with the tag that follows it, the last one of a sample with ``end_text`` (the tag
    a next user message opens with), appended after the template's text."""
    turn_views: bool = False
    """Whether the template closes the last reply with another token than it closes replies
    in the history (gpt-oss: ``<|return|>`` last, ``<|end|>`` before): each user turn's replies
    are then trained in a sample that ends with them, closed as the model closes them."""
    stop_texts: Tuple[str, ...] = ()
    """The texts of every token a trained reply may end with (``end_text`` first): generation
    stops at each."""
    stops: Tuple[int, ...] = ()
    """Their ids (``end_of_turn`` first)."""
    reasoning_form: str = "reasoning_content"
    """Where the template reads a reply's reasoning (one of ``REASONING_FORMS``, the first
    that it renders on a probe; "reasoning_content" when it renders none)."""


_PROBE = (Message("user", "Hello!"), Message("assistant", "Hi."),
          Message("user", "How are you?"), Message("assistant", "Fine, thanks."))
_INFO: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _special_pattern(hf_tokenizer) -> "re.Pattern[str]":
    texts = {t for t in hf_tokenizer.all_special_tokens if t}
    texts |= {t.content for t in hf_tokenizer.added_tokens_decoder.values()
              if t.special and t.content}
    ordered = sorted(texts, key=len, reverse=True)
    return re.compile("|".join(re.escape(t) for t in ordered) or "(?!)")


def chat_template_info(hf_tokenizer) -> ChatTemplateInfo:
    """Find (once per tokenizer and template; cached) the end-of-turn token, the generation
    prompt's opening and what the chat template renders, on probe conversations, and check that
    the probe's last reply can be located.

    Raises ``TokenizerError`` when the tokenizer has no chat template, the template cannot lay
    out the probe, or ends its replies with different special tokens."""
    template = getattr(hf_tokenizer, "chat_template", None)
    if not template or not isinstance(template, str):
        raise TokenizerError("--template hf: the tokenizer has no chat template; choose a "
                             "built-in --template")
    cached = _INFO.get(hf_tokenizer)
    if cached is not None and cached.template == template:
        return cached
    specials = _special_pattern(hf_tokenizer)
    try:
        end_text, follows, turn_views, stop_texts = _probe_end_of_turn(hf_tokenizer, specials)
        dicts = hf_messages(_PROBE[:3])
        prompt = _apply(hf_tokenizer, dicts, None, add_generation_prompt=True)
        plain = _apply(hf_tokenizer, dicts, None)
        opening = prompt[len(plain):] if prompt.startswith(plain) else ""
        opener = specials.match(opening)
        stops = tuple(hf_tokenizer.convert_tokens_to_ids(t) for t in stop_texts)
        info = ChatTemplateInfo(template, stops[0], end_text, opening,
                                opener.group() if opener else None, specials, follows=follows,
                                turn_views=turn_views, stop_texts=stop_texts, stops=stops)
        _render(Conversation(_PROBE), hf_tokenizer, RenderOptions(train_on="last"), info)
    except RecordError as exc:
        raise TokenizerError(f"--template hf: the chat template cannot be used on the probe "
                             f"conversation {[m.content for m in _PROBE]}: {exc.message}") from None
    probe = hf_messages(_PROBE)
    marks = bool(_marked_contents(_apply(hf_tokenizer, probe, None), probe, None, [1, 3],
                                  hf_tokenizer))
    renders, form = _probe_renders(hf_tokenizer)
    info = replace(info, renders=renders, marks=marks, reasoning_form=form)
    if follows or turn_views:  # how a tool-call reply ends is a stop too
        info = _with_tool_stop(info, hf_tokenizer)
    _INFO[hf_tokenizer] = info
    return info


def _probe_end_of_turn(hf_tokenizer, specials: "re.Pattern[str]"
                       ) -> Tuple[str, bool, bool, Tuple[str, ...]]:
    """``(end text, follows, turn views, stop texts)``: the special token the template puts
    after each reply of ``_PROBE`` (the first special token where the rendering with that reply
    emptied stops differing). A template that puts it only where the next message begins (the
    rendering cut after the reply ends right before it, and the last reply is followed by
    nothing) closes replies with the next message's tag: ``follows``, the end text is the tag
    that a next user message opens with. A template that closes the last reply with another
    token than the earlier one, and closes that one too with it when it is last (the rendering
    cut after it ends with it): ``turn views``, the end text is the last reply's."""
    dicts = hf_messages(_PROBE)
    full = _apply(hf_tokenizer, dicts, None)
    found, follows = [], []
    for k in (1, 3):
        other = _apply(hf_tokenizer, _blanked(dicts, k), None)
        if other != full:  # a template may leave earlier replies out: use the others
            closing = _closing_special(full, _differing(full, other)[1], specials)
            found.append(closing.group() if closing else None)
            cut = _apply(hf_tokenizer, dicts[:k + 1], None)
            follows.append(closing is None or closing.start() == len(cut))
    if found and all(follows) and found[-1] is None:  # GLM: the next message's tag ends it
        tag = _next_tag(hf_tokenizer, dicts, None, {"role": "user", "content": "Next."},
                        specials)
        if tag is not None and all(t in (None, tag) for t in found):
            return tag, True, False, (tag,)
    if len(found) == 2 and None not in found and found[0] != found[1] \
            and _apply(hf_tokenizer, dicts[:2], None).rstrip().endswith(found[1]):
        return found[1], False, True, (found[1],)  # gpt-oss: <|end|> in the history only
    texts = sorted(set(found), key=str)
    if texts == [None] or not texts:
        raise TokenizerError("--template hf: the chat template puts no special token after the "
                             "replies of a probe conversation; training needs an end-of-turn "
                             "token (generation stops at it): choose a built-in --template")
    if len(texts) != 1 or None in texts:
        ids = [hf_tokenizer.convert_tokens_to_ids(t) if t else None for t in texts]
        pieces = ", ".join(f"{t!r} (id {i})" if t else "no special token"
                           for t, i in zip(texts, ids))
        raise TokenizerError(
            f"--template hf: the chat template ends replies with different special tokens "
            f"({pieces}) on a probe conversation; training needs one end-of-turn token "
            "(generation stops at it): fix the chat template or choose a built-in --template")
    return texts[0], False, False, (texts[0],)


def _next_tag(hf_tokenizer, dicts: Dicts, tools: Tools, message: Dict[str, Any],
              specials: "re.Pattern[str]") -> Optional[str]:
    """The special token ``message`` opens with when it follows ``dicts`` (None when the
    rendering with it does not continue that of ``dicts`` with a special token)."""
    try:
        before = _apply(hf_tokenizer, dicts, tools)
        after = _apply(hf_tokenizer, dicts + [message], tools)
    except RecordError:
        return None
    tag = specials.match(after, len(before)) if after.startswith(before) else None
    return tag.group() if tag else None


def _with_tool_stop(info: ChatTemplateInfo, hf_tokenizer) -> ChatTemplateInfo:
    """``info`` with what closes a tool-call reply among its stops, where the template lays
    out tool results: for a ``follows`` template the tag a tool result opens with (GLM's
    ``<|observation|>``), for ``turn_views`` the special token that ends the rendering cut
    after the call (gpt-oss's ``<|call|>``)."""
    if "tool_results" not in info.renders:
        return info
    call = hf_messages(_tool_probe().messages)
    if info.follows:
        tag = _next_tag(hf_tokenizer, call[:2], [_WEATHER], call[2], info.specials)
    else:
        cut = _apply(hf_tokenizer, call[:2], [_WEATHER]).rstrip()
        last = [m for m in info.specials.finditer(cut) if m.end() == len(cut)]
        tag = last[0].group() if last else None
    if tag is None or tag in info.stop_texts:
        return info
    return replace(info, stop_texts=info.stop_texts + (tag,),
                   stops=info.stops + (hf_tokenizer.convert_tokens_to_ids(tag),))


_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _tool_probe(city="Paris", result="22", reasoning="Look it up.") -> Conversation:
    return Conversation((Message("user", "Weather in Paris?"),
                         Message("assistant", "", (ToolCall("get_weather", {"city": city},
                                                            "call_1"),)),
                         Message("tool", result, name="get_weather", tool_call_id="call_1"),
                         Message("assistant", "22 degrees.", reasoning=reasoning)),
                        (_WEATHER,))


def _probe_renders(hf_tokenizer) -> Tuple[FrozenSet[str], str]:
    """Which inputs the template renders, each probed by two conversations that differ only
    in it (a template that ignores it, or refuses it, renders them alike), and the first of
    ``REASONING_FORMS`` in which it renders reasoning."""
    other_tool = {"type": "function", "function": dict(_WEATHER["function"], name="get_time")}
    pairs = {
        "tools": (Conversation(_PROBE[:2], (_WEATHER,)), Conversation(_PROBE[:2], (other_tool,))),
        "tool_calls": (_tool_probe(), _tool_probe(city="Rome")),
        "tool_results": (_tool_probe(), _tool_probe(result="18")),
    }
    reasoning = (Conversation((_PROBE[0], replace(_PROBE[1], reasoning="Greet back."))),
                 Conversation((_PROBE[0], replace(_PROBE[1], reasoning="Be polite."))))
    renders, form = set(), "reasoning_content"
    for what, pair in list(pairs.items()) + [(f, reasoning) for f in REASONING_FORMS]:
        if what in REASONING_FORMS and "reasoning" in renders:
            break
        try:
            texts = [_apply(hf_tokenizer, hf_messages(c.messages, what if what in
                                                      REASONING_FORMS else form),
                            list(c.tools) or None) for c in pair]
        except RecordError:
            continue
        if texts[0] != texts[1] and (what != "inline" or _reads_inline(hf_tokenizer)):
            renders.add("reasoning" if what in REASONING_FORMS else what)
            form = what if what in REASONING_FORMS else form
    return frozenset(renders), form


def _reads_inline(hf_tokenizer) -> bool:
    """Whether the template reads a ``<think>`` block of the content as reasoning, rather than
    copying it as any text (which would make every template a reasoning template): a
    conversation of two replies with inline reasoning renders otherwise than the same with the
    block's tags renamed (``<think>`` -> ``<thinq>``) once the names are put back."""
    replies = (replace(_PROBE[1], reasoning="Greet back."),
               replace(_PROBE[3], reasoning="Answer."))
    dicts = hf_messages((_PROBE[0], replies[0], _PROBE[2], replies[1]), "inline")
    renamed = [dict(d, content=d["content"].replace("<think>", "<thinq>").replace(
        "</think>", "</thinq>")) for d in dicts]
    try:
        read, copied = (_apply(hf_tokenizer, d, None) for d in (dicts, renamed))
    except RecordError:
        return False
    return read != copied.replace("<thinq>", "<think>").replace("</thinq>", "</think>")


# -- locating a reply ---------------------------------------------------------------------------

def _blanked(dicts: Dicts, k: int) -> Dicts:
    return dicts[:k] + [_BLANK] + dicts[k + 1:]


def _common_prefix(x: str, y: str) -> int:
    """Length of the common prefix (binary search on slices: C-speed comparisons)."""
    low, high = 0, min(len(x), len(y))
    while low < high:
        mid = (low + high + 1) // 2
        if x[low:mid] == y[low:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def _differing(full: str, other: str) -> Tuple[int, int]:
    """``(first, last)``: ``full[:first]`` and ``full[last:]`` are also ``other``'s prefix and
    suffix (the longest such), so ``full[first:last]`` holds everything that differs."""
    first = _common_prefix(full, other)
    limit = min(len(full), len(other)) - first
    suffix = _common_prefix(full[::-1][:limit], other[::-1][:limit])
    return first, len(full) - suffix


def _closing_special(full: str, last: int, specials: "re.Pattern[str]"):
    """The special token occurrence that contains position ``last`` of ``full``, else the
    first one after it (None when there is none)."""
    match = specials.search(full, max(0, last - 64))
    while match is not None and match.end() <= last:
        match = specials.search(full, match.end())
    return match


def _reply_start(full: str, first: int, low: int, k: int, dicts: Dicts, tools: Tools,
                 hf_tokenizer, info: ChatTemplateInfo) -> int:
    """Where reply k starts in ``full``: after the generation prompt's opening, matched from
    the message opener (``<|im_start|>``) closest before ``first`` (the reply's first differing
    character; after ``low``) as far as the history writes it (DeepSeek-R1-style templates open
    the prompt with ``<think>\\n`` but not the history); without an opener special token, after
    the last whole opening; for templates whose generation prompt adds no text, after the
    generation prompt of messages[:k] when ``full`` starts with it.
    Raises ``RecordError("reply_opening_not_found")``."""
    if info.opener:
        at = full.rfind(info.opener, low, first)
        if at >= 0:
            return at + _common_prefix(full[at:first], info.opening)
    elif info.opening:
        at = full.rfind(info.opening, low, first)
        if at >= 0:
            return at + len(info.opening)
    prompt = _apply(hf_tokenizer, dicts[:k], tools, add_generation_prompt=True)
    if full.startswith(prompt) and low <= len(prompt) <= first:
        return len(prompt)
    shown = repr(info.opening) if info.opening else "the generation prompt of the history"
    raise RecordError(
        "reply_opening_not_found",
        f"messages[{k}]: the chat template does not open this reply with {shown} in the whole "
        "conversation (it writes the history differently from the generation prompt), so where "
        "the reply starts cannot be told; use a built-in --template")


def _locate(full: str, dicts: Dicts, tools: Tools, k: int, low: int, hf_tokenizer,
            info: ChatTemplateInfo, content: Optional[Tuple[int, int]] = None
            ) -> Optional[Tuple[int, int]]:
    """``(start, end)``: the characters of ``full`` the template writes for reply k, up to its
    end-of-turn token (at ``end``); None when it writes the same as for an empty reply.
    ``content``: where the reply's content lies in ``full`` when already known (from
    ``_marked_contents``); otherwise it is bounded by rendering the conversation with reply k
    blanked (``_differing``)."""
    if content is None:
        other = _apply(hf_tokenizer, _blanked(dicts, k), tools)
        if other == full:
            return None
        content = _differing(full, other)
    first, last = content
    start = _reply_start(full, first, low, k, dicts, tools, hf_tokenizer, info)
    closing = _closing_special(full, last, info.specials)
    if info.follows:  # ended by the next message's tag, or by the end of the sample's text
        if closing is None:
            return start, len(full)
        if closing.start() < last or closing.group() not in info.stop_texts:
            raise _end_mismatch(k, closing.group(), hf_tokenizer, info)
        return start, closing.start()
    straddles = closing is not None and closing.start() < last
    ends = [at for at in (full.find(t, max(start, last - len(t) + 1)) for t in info.stop_texts)
            if at >= 0]
    end = min(ends) if ends else -1
    if (straddles and closing.group() not in info.stop_texts) or end < 0:
        raise _end_mismatch(k, closing.group() if closing else None, hf_tokenizer, info)
    if _next_message_opens(full, start, end, info):
        # the next message opens before this end-of-turn: the reply ended with another token
        raise _end_mismatch(k, closing.group() if closing else None, hf_tokenizer, info)
    return start, end


def _next_message_opens(full: str, start: int, end: int, info: ChatTemplateInfo) -> bool:
    """Whether a message other than the reply's own continuation opens in ``full[start:end]``:
    an opener (``<|start|>``) not followed by the generation prompt's opening (gpt-oss writes
    a reply as several assistant messages, ``<|start|>assistant<|channel|>...``)."""
    if not info.opener:
        return False
    at = full.find(info.opener, start, end)
    while at >= 0:
        if not full.startswith(info.opening, at):
            return True
        at = full.find(info.opener, at + 1, end)
    return False


# Unicode private-use characters (plane 15): no tokenizer's special token, never in the inputs
# where they are used (checked: they must not be in the rendering)
_MARKS = ("\U000FFFF0", "\U000FFFF1")


def _marked_contents(full: str, dicts: Dicts, tools: Tools, ks: Sequence[int], hf_tokenizer
                     ) -> Dict[int, Tuple[int, int]]:
    """Where the contents of the plain replies among ``ks`` (text only: no tool calls, no
    reasoning) lie in ``full``, found with ONE more rendering in which each such content is
    wrapped in ``_MARKS``: ``{k: (first, last)}`` with ``full[first:last]`` the content.

    The rendering is used only when removing the marks gives back ``full`` exactly and every
    marked content appears once, in order, so the template wrote each content verbatim and
    nothing else depends on it; otherwise ``{}`` and each reply is located by a blanked
    rendering of its own (``_locate``), as are replies with tool calls or reasoning.
    This is the same located text at ~2 renderings per conversation instead of 1 + one per
    trained reply. Contents with leading or trailing whitespace are not marked (templates that
    trim contents, as Llama 3's does, would keep the whitespace inside the marks)."""
    plain = [k for k in ks if set(dicts[k]) == {"role", "content"} and dicts[k]["content"]
             and dicts[k]["content"] == dicts[k]["content"].strip()]  # as trim leaves it
    if len(plain) < 2 or _MARKS[0] in full or _MARKS[1] in full:
        return {}
    marked = [dict(d) for d in dicts]
    for k in plain:
        marked[k]["content"] = _MARKS[0] + marked[k]["content"] + _MARKS[1]
    text = _apply(hf_tokenizer, marked, tools)
    pieces = re.split(f"([{_MARKS[0]}{_MARKS[1]}])", text)
    if len(pieces) != 4 * len(plain) + 1 or "".join(pieces[::2]) != full:
        return {}
    found, at = {}, 0
    for index, piece in enumerate(pieces):
        if index % 2 == 0:
            at += len(piece)
        elif piece != _MARKS[(index // 2) % 2]:
            return {}
        elif piece == _MARKS[0]:
            found[plain[index // 4]] = (at, at + len(pieces[index + 1]))
    return found


def _end_mismatch(k: int, piece: Optional[str], hf_tokenizer, info: ChatTemplateInfo
                  ) -> RecordError:
    wanted = " or ".join(f"{t!r} (id {i})" for t, i in zip(info.stop_texts, info.stops))
    found = (f"{piece!r} (id {hf_tokenizer.convert_tokens_to_ids(piece)})" if piece
             else "no special token")
    return RecordError(
        "end_of_turn_mismatch",
        f"messages[{k}]: the chat template ends this reply with {found} but replies end with "
        f"{wanted} elsewhere; training needs one end-of-turn token (generation stops at it): "
        "fix the chat template or use a built-in --template")


# -- checks of the input ------------------------------------------------------------------------

_NEEDS = {"tools": ("template_no_tools", "tools"),
          "tool_calls": ("template_no_tools", "tool calls"),
          "tool_results": ("template_no_tools", "tool results"),
          "reasoning": ("template_no_reasoning", "reasoning")}


def _check_inputs(conversation: Conversation, info: ChatTemplateInfo) -> None:
    """Refuse text holding a special token's text (the tokenizer would make it a control
    token), and tools, tool calls, tool results or reasoning the template does not render
    (they would be silently left out of training). Raises ``RecordError``."""
    found = []  # (what the template must render, message index or None, text to search)
    if conversation.tools:
        found.append(("tools", None, json.dumps(list(conversation.tools), ensure_ascii=False,
                                                default=str)))
    for index, m in enumerate(conversation.messages):
        found.append((None, index, m.content))
        if m.tool_calls:
            found.append(("tool_calls", index, json.dumps(
                [[c.name, c.arguments] for c in m.tool_calls], ensure_ascii=False, default=str)))
        if m.role == "tool":
            found.append(("tool_results", index, m.name or ""))
        if m.reasoning is not None:
            found.append(("reasoning" if m.reasoning.strip() else None, index, m.reasoning))
    for what, index, text in found:
        where = "the record's tools" if index is None else f"messages[{index}]"
        hit = info.specials.search(text)
        if hit:
            raise RecordError(
                "special_token_in_text",
                f"{where} contains the special token text {hit.group()!r}, which the tokenizer "
                "would turn into a control token inside the chat template's text; remove it or "
                "use a built-in --template")
        if what is not None and what not in info.renders:
            reason, label = _NEEDS[what]
            raise RecordError(
                reason,
                f"{where} has {label}, but the tokenizer's chat template does not render "
                f"{label} (checked on a probe conversation): training would silently leave "
                f"out what the record holds; use a chat template that lays out {label}, or "
                f"--template {layout_names(what if what == 'reasoning' else 'tools')}")


def _check_reasoning_kept(full: str, dicts: Dicts, tools: Tools, messages: Sequence[Message],
                          hf_tokenizer, info: ChatTemplateInfo) -> None:
    """``--reasoning keep``: every message's reasoning must be in the rendering (a variant
    without it renders differently). Raises ``RecordError("reasoning_dropped")``."""
    for k, message in enumerate(messages):
        if message.role != "assistant" or not (message.reasoning or "").strip():
            continue
        without = hf_messages([replace(message, reasoning=None)], info.reasoning_form)
        if _apply(hf_tokenizer, dicts[:k] + without + dicts[k + 1:], tools) == full:
            raise RecordError(
                "reasoning_dropped",
                f"messages[{k}]: --reasoning keep, but the chat template leaves this message's "
                "reasoning out of the conversation (templates such as Qwen3's keep only the "
                "reasoning after the last user message); use --reasoning template (train what "
                "the template renders) or per-turn (one sample per user turn with reasoning, "
                "each in the view the model has when it writes that turn)")


# -- samples ------------------------------------------------------------------------------------

def _render(conversation: Conversation, hf_tokenizer, options: RenderOptions,
            info: ChatTemplateInfo) -> Tuple[RenderedConversation, ...]:
    """The samples of a checked conversation: the views of ``render.sample_views`` (one, or one
    per user turn with reasoning under "per-turn"), each cut after its last trained reply and
    rendered whole by the template."""
    messages = conversation.messages
    samples = []
    trained_here = trained_messages(messages, options)
    views = (_turn_views(messages, trained_here) if info.turn_views else
             [t for t, _ in sample_views(messages, _USER_TURN_VIEWS, options, trained_here)])
    for trained in views:
        shown = [t and has_reply(m, True) for m, t in zip(messages, trained)]
        if not any(shown):
            continue
        stop = max(i for i, t in enumerate(shown) if t) + 1
        view = replace(conversation, messages=messages[:stop])
        sample = _render_sample(view, shown[:stop], hf_tokenizer, info,
                                options.reasoning == "keep")
        if sample is not None:
            samples.append(sample)
    if not samples:
        raise no_trained_turn(options, ", or is left out by the chat template")
    return tuple(samples)


def _turn_views(messages: Sequence[Message], trained: List[bool]) -> List[List[bool]]:
    """For a ``turn_views`` template: per user turn with trained replies, those replies (the
    sample is cut after the last of them, so that it ends as the model ends it)."""
    turn, users = [], 0
    for message in messages:
        users += message.role == "user"
        turn.append(users)
    closing = sorted({turn[i] for i, t in enumerate(trained) if t})
    return [[t and turn[i] == u for i, t in enumerate(trained)] for u in closing]


def _render_sample(conversation: Conversation, trained: Sequence[bool], hf_tokenizer,
                   info: ChatTemplateInfo, keep: bool) -> Optional[RenderedConversation]:
    """One sample: the template's rendering of ``conversation``, tokenized, with the replies
    ``trained[k]`` located and trained; None when the template writes none of them."""
    messages = conversation.messages
    dicts = hf_messages(messages, info.reasoning_form)
    tools = list(conversation.tools) or None
    full = _apply(hf_tokenizer, dicts, tools)
    if keep:
        _check_reasoning_kept(full, dicts, tools, messages, hf_tokenizer, info)
    spans, low = [], 0
    ks = [i for i, t in enumerate(trained) if t]
    plain = [k for k in ks if messages[k].reasoning is None]
    contents = _marked_contents(full, dicts, tools, plain, hf_tokenizer) if info.marks else {}
    for k in ks:
        span = _locate(full, dicts, tools, k, low, hf_tokenizer, info, contents.get(k))
        if span is None:
            if messages[k].content.strip() or messages[k].tool_calls:
                raise RecordError(
                    "reply_not_rendered",
                    f"messages[{k}]: the chat template writes nothing for this reply in the whole "
                    "conversation (it leaves earlier replies out of the history), so it cannot "
                    "be trained; use --train-on last, mark the reply \"weight\": 0, or use a "
                    "built-in --template")
            continue  # reasoning alone, left out of this view: context
        spans.append((k,) + span)
        low = span[1] + (0 if info.follows else _stop_length(full, span[1], info))
    return _tokenize(full, spans, hf_tokenizer, info) if spans else None


def _stop_length(full: str, end: int, info: ChatTemplateInfo) -> int:
    """Length of the stop text at ``end`` of ``full`` (the end text's when none is there)."""
    return next((len(t) for t in info.stop_texts if full.startswith(t, end)),
                len(info.end_text))


_SPANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_EMPTY_THINK = "<think>\n\n</think>\n\n"  # an empty inline block, as hf_messages writes one


def _byte_spans(hf_tokenizer) -> Optional[ByteLevelSpans]:
    """``tokenizers.ByteLevelSpans`` of the tokenizer (found once; None when it has none)."""
    if hf_tokenizer not in _SPANS:
        _SPANS[hf_tokenizer] = (ByteLevelSpans.of(hf_tokenizer),)
    return _SPANS[hf_tokenizer][0]


def _tokenize(full: str, spans: List[Tuple[int, int, int]], hf_tokenizer,
              info: ChatTemplateInfo) -> RenderedConversation:
    """Tokenize ``full`` (as ``apply_chat_template(..., tokenize=True)`` does) and train each
    ``(k, start, end)`` span plus the end-of-turn token at ``end``, checking that the span
    starts on a token boundary and that ``end`` is the end-of-turn token. A byte-level BPE
    tokenizer maps characters to tokens by its tokens' byte lengths (``_tokenize_by_bytes``);
    any other, or a check that fails there, by the back-end's offsets (which also name the
    fault)."""
    if info.follows and spans[-1][2] == len(full):  # the sample's last reply: its stop tag
        full += info.end_text
    byte_spans = _byte_spans(hf_tokenizer)
    if byte_spans is not None:
        rendered = _tokenize_by_bytes(full, spans, byte_spans, info)
        if rendered is not None:
            return rendered
    encoded = hf_tokenizer(full, add_special_tokens=False)
    ids = encoded["input_ids"]
    encoding = encoded.encodings[0] if getattr(encoded, "encodings", None) else None
    if encoding is None:
        raise TokenizerError("--template hf needs a fast tokenizer (a tokenizer.json) to map the "
                             "chat template's text to tokens")
    replies, turn_ends = [], []
    for k, start, end in spans:
        first, closing = encoding.char_to_token(start), encoding.char_to_token(end)
        if closing is None or ids[closing] not in info.stops \
                or encoding.token_to_chars(closing)[0] != end:
            raise RecordError("end_of_turn_mismatch", f"messages[{k}]: the end-of-turn text "
                              f"{info.stop_texts} after this reply is not tokenized as the "
                              f"end-of-turn token (ids {info.stops}); fix the tokenizer")
        if first is None or encoding.token_to_chars(first)[0] != start:
            raise _boundary_error(k, full, start, first, encoding, ids, hf_tokenizer)
        replies.append((first, closing + 1 - first))
        after = None if info.follows else \
            info.specials.search(full, end + _stop_length(full, end, info))
        turn_ends.append(closing + 1 if info.follows else
                         encoding.char_to_token(after.start()) if after else len(ids))
    return RenderedConversation(np.asarray(ids, dtype=np.int64),
                                turn_lengths(replies, len(ids)), tuple(turn_ends))


def _tokenize_by_bytes(full: str, spans: List[Tuple[int, int, int]], byte_spans: ByteLevelSpans,
                       info: ChatTemplateInfo) -> Optional[RenderedConversation]:
    """``_tokenize`` with token starts from byte lengths (no offsets); None when a span does
    not start on a token boundary, an ``end`` is not the end-of-turn token, or the byte
    lengths do not add up (``_tokenize``'s offsets then say what is wrong)."""
    ids = byte_spans.encode(full)
    starts = byte_spans.starts(ids, full) if ids else None
    if starts is None:
        return None
    ascii_text = full.isascii()

    def token_at(char: int) -> Optional[int]:  # the token that starts at this character
        at = char if ascii_text else len(full[:char].encode("utf-8"))
        index = int(np.searchsorted(starts, at))
        return index if index < len(ids) and starts[index] == at else None

    replies, turn_ends = [], []
    for _, start, end in spans:
        first, closing = token_at(start), token_at(end)
        if first is None or closing is None or ids[closing] not in info.stops:
            return None
        replies.append((first, closing + 1 - first))
        after = None if info.follows else \
            info.specials.search(full, end + _stop_length(full, end, info))
        turn_end = closing + 1 if info.follows else token_at(after.start()) if after else len(ids)
        if turn_end is None:
            return None
        turn_ends.append(turn_end)
    return RenderedConversation(np.asarray(ids, dtype=np.int64),
                                turn_lengths(replies, len(ids)), tuple(turn_ends))


def _boundary_error(k: int, full: str, start: int, token: Optional[int], encoding, ids,
                    hf_tokenizer) -> RecordError:
    shown = (f" into one token {hf_tokenizer.convert_ids_to_tokens(ids[token])!r}"
             if token is not None else "")
    return RecordError(
        "reply_token_boundary",
        f"messages[{k}]: the tokenizer joins the end of the reply's opening "
        f"({full[max(0, start - 12):start]!r}) and the start of the reply "
        f"({full[start:start + 12]!r}){shown}, so the reply does not start on a token boundary "
        "(the prompt at inference ends inside that token); remove the reply's leading "
        "whitespace or use a built-in --template")


# -- public entry points ------------------------------------------------------------------------

def render_with_chat_template(conversation: Union[Conversation, Sequence[Message]], hf_tokenizer,
                              options: Optional[RenderOptions] = None
                              ) -> Tuple[RenderedConversation, ...]:
    """The training samples of one conversation rendered by ``hf_tokenizer``'s own Jinja chat
    template (``--template hf``), with the same ``options`` as built-in templates
    (``--train-on``, ``--reasoning``: "template" trains what the Jinja renders, "keep" refuses
    a template that drops some reasoning, "per-turn" renders one view per user turn with
    reasoning, as ``render.render_conversation``).

    Each sample: ``input_ids`` int64 [n] are the template's text tokenized as
    ``apply_chat_template(messages, tools=..., tokenize=True)`` tokenizes it;
    ``loss_token_num`` int32 [n] is, on each trained reply's tokens (what the template writes
    for it in that sample, then its end-of-turn token), the reply's token count, 0 elsewhere;
    ``turn_ends`` the token offset after each trained reply (up to the next message).
    ``conversation``: a ``Conversation`` (messages, tools) or a sequence of ``Message``.

    Raises ``RecordError`` (reasons in the module docstring) for a record that cannot be
    trained as rendered; ``TokenizerError`` when the template cannot be used at all."""
    conversation = as_conversation(conversation)
    info = chat_template_info(hf_tokenizer)
    _check_inputs(conversation, info)
    return _render(conversation, hf_tokenizer, options or RenderOptions(), info)


def render_prompt_with_chat_template(conversation: Union[Conversation, Sequence[Message]],
                                     hf_tokenizer, enable_thinking: bool = True) -> List[int]:
    """Ids of the generation prompt (a conversation ending with a user message or tool results,
    then ``add_generation_prompt``) laid out by the tokenizer's chat template and tokenized as
    ``render_with_chat_template`` tokenizes training samples. ``enable_thinking`` False is
    passed to the template (Qwen3's switch: an empty ``<think>`` block after the opener).
    Raises ``RecordError`` (the template refuses the conversation, special-token text) or
    ``TokenizerError``."""
    conversation = as_conversation(conversation)
    _check_inputs(conversation, chat_template_info(hf_tokenizer))
    switch = {} if enable_thinking else {"enable_thinking": False}
    info = chat_template_info(hf_tokenizer)
    text = _apply(hf_tokenizer, hf_messages(conversation.messages, info.reasoning_form),
                  list(conversation.tools) or None, add_generation_prompt=True, **switch)
    if not enable_thinking and info.reasoning_form == "inline" and \
            text == _apply(hf_tokenizer, hf_messages(conversation.messages, "inline"),
                           list(conversation.tools) or None, add_generation_prompt=True):
        text += _EMPTY_THINK  # a template without the switch: the reply opens with no reasoning
    return list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_template_end_of_turn(hf_tokenizer) -> int:
    """Id of the special token a Hugging Face chat template puts right after every reply
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3): the token training trains at the
    end of each reply and generation stops at. It is not ``eos_token_id`` in general (a base
    model's ChatML tokenizer has eos ``<|endoftext|>``). Found on a probe conversation (cached
    per tokenizer and template, ``chat_template_info``); ``render_with_chat_template`` then
    checks every trained reply against it. Raises ``TokenizerError``."""
    return chat_template_info(hf_tokenizer).end_of_turn


def hf_stop_ids(tokenizer: DialogTokenizer) -> Tuple[int, ...]:
    """``render.stop_ids`` for ``--template hf``: every id a trained reply may end with
    (``ChatTemplateInfo.stops``; the end-of-turn first). Raises ``TokenizerError``."""
    hf_end_of_turn_id(tokenizer)
    return chat_template_info(tokenizer.hf).stops


def hf_end_of_turn_id(tokenizer: DialogTokenizer) -> int:
    """``render.end_of_turn_id`` for ``--template hf``: the end-of-turn of the tokenizer's own
    chat template (``chat_template_end_of_turn``). Raises ``TokenizerError`` when it has none."""
    if not getattr(tokenizer, "chat_template", None):
        raise TokenizerError(f"--template hf: the tokenizer in {tokenizer.path} has no chat "
                             "template; choose a built-in --template")
    return chat_template_end_of_turn(tokenizer.hf)
