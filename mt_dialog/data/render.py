"""Render one conversation into token ids and per-token loss fields.

``render_conversation`` is the single place where a conversation becomes training data with a
built-in template, and ``render_prompt`` (the generation prompt) is built from the same renderer
(``_render``). A *turn* is one trained assistant message: its reply (reasoning where shown,
content, tool calls as the template writes them) and its end-of-turn token. System, user and
tool-result text and untrained assistant messages are context (loss_token_num 0, not turns).
For the ``firefly`` template and a two-turn conversation (ids shortened)::

    text      <s> Hi </s> Hello! </s> 2+2? </s>  4  </s>
    input_ids  1  306  2   15043 2   29906  2  29946  2
    loss_mask  0   0   0    1    1     0    0    1    1     <- replies + their end-of-turn token
    loss_token_num 0 0 0    2    2     0    0    2    2     <- length of the token's turn, else 0
    turn_ends                      ^5                   ^9  <- token offset after each turn

The fields are aligned with ``input_ids`` (the token itself is the target); the dataset applies
the next-token shift. The first token of a conversation is never trained, so shifting a whole
pack never trains across a conversation boundary. ``loss_mask == (loss_token_num > 0)`` always.

A plain-text document (``formats.Document``, continued pretraining) is rendered by
``render_document``: the tokenizer's document prefix (its BOS where it puts one), the text, the
tokenizer's eos; every token is trained but the first, which has no earlier token to be
predicted from. A document longer than the sequence length is cut into pieces
(``split_document``; each piece after the first repeats the last token of the one before as its
untrained first token, so every token but the document's first is trained once): a piece is one
*turn*, its ``loss_token_num`` the number of its trained tokens (its length - 1)::

    text      <s>  The  cat  sat  .  </s>
    loss_token_num  0  5  5  5  5  5        <- one turn of 5 trained tokens
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from mt_dialog.data.formats import Conversation, Document, Message, RecordError
from mt_dialog.data.templates import (
    BOS,
    EOS,
    HF_TEMPLATE,
    TEMPLATES,
    ChatTemplate,
    Pieces,
    ReasoningLayout,
    Special,
    ToolLayout,
    get_template,
)
from mt_dialog.data.tokenizers import DialogTokenizer, TokenizerError

Encode = Callable[[str], List[int]]
ResolvedPieces = Tuple[Union[str, int], ...]
_PLACEHOLDER = re.compile(r"\{(content|system)\}")

TRAIN_ON = ("all", "last")
REASONING_MODES = ("template", "keep", "per-turn")


@dataclass(frozen=True)
class RenderOptions:
    """What is trained (``--train-on``) and how reasoning is kept (``--reasoning``).

    ``train_on``: "all" trains every assistant message, "last" only the conversation's last one;
    a message's own ``train`` (``weight`` / ``loss`` in the input) overrides both. ``reasoning``:
    "template" renders the history as the template does (Qwen3 leaves out the reasoning of
    assistant messages before the last user message; one sample), "keep" keeps every message's
    reasoning (one sample), "per-turn" gives one sample per user turn whose trained replies have
    reasoning, each in the view the model has when it writes that turn (history reasoning left
    out), so that every trained message is trained exactly once, in its inference view.

    Raises ``ValueError`` naming the value and the choices."""

    train_on: str = "all"
    reasoning: str = "template"

    def __post_init__(self) -> None:
        if self.train_on not in TRAIN_ON:
            raise ValueError(f"--train-on {self.train_on!r} is not one of {', '.join(TRAIN_ON)}")
        if self.reasoning not in REASONING_MODES:
            raise ValueError(f"--reasoning {self.reasoning!r} is not one of "
                             f"{', '.join(REASONING_MODES)}")


def as_conversation(value: Union[Conversation, Sequence[Message]]) -> Conversation:
    """``value`` if it is a ``Conversation``, else its messages as one (no tools)."""
    return value if isinstance(value, Conversation) else Conversation(tuple(value))


@dataclass(frozen=True)
class RenderedConversation:
    """One conversation as tokens. Arrays have equal length."""

    input_ids: np.ndarray  # int64 token ids
    loss_token_num: np.ndarray  # int32: length of the token's turn on trained tokens, else 0
    turn_ends: Tuple[int, ...]  # token offset just after each trained turn (close included)

    @property
    def loss_mask(self) -> np.ndarray:
        return (self.loss_token_num > 0).astype(np.int8)

    @property
    def turn_num(self) -> int:
        return len(self.turn_ends)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(np.count_nonzero(self.loss_token_num))


@dataclass(frozen=True)
class ResolvedTemplate:
    """A ``ChatTemplate`` whose special tokens are replaced by the tokenizer's ids."""

    name: str
    prefix: ResolvedPieces
    system: ResolvedPieces
    user: ResolvedPieces
    first_user_with_system: Optional[ResolvedPieces]
    assistant_open: ResolvedPieces
    end_of_turn: int
    assistant_close: ResolvedPieces
    default_system: Optional[str]
    tools: Optional[ToolLayout] = None
    """The template's tool layout, its ``results`` pieces resolved to ids."""
    reasoning: Optional[ReasoningLayout] = None


def _special_id(special: Special, tokenizer: DialogTokenizer) -> int:
    if special in (BOS, EOS):
        token = tokenizer.bos_id if special == BOS else tokenizer.eos_id
        if token is None:
            raise TokenizerError(
                f"the template needs a {special.piece} token but {tokenizer.path} defines none; "
                "choose another --template"
            )
        return token
    return tokenizer.special_id(special.piece)


def resolve_template(template: ChatTemplate, tokenizer: DialogTokenizer) -> ResolvedTemplate:
    """Look up (or append) every special token of ``template`` in ``tokenizer``."""

    def resolve(pieces: Optional[Pieces]) -> Optional[ResolvedPieces]:
        if pieces is None:
            return None
        return tuple(
            _special_id(p, tokenizer) if isinstance(p, Special) else p for p in pieces
        )

    return ResolvedTemplate(
        name=template.name,
        prefix=resolve(template.prefix),
        system=resolve(template.system),
        user=resolve(template.user),
        first_user_with_system=resolve(template.first_user_with_system),
        assistant_open=resolve(template.assistant_open),
        end_of_turn=_special_id(template.end_of_turn, tokenizer),
        assistant_close=resolve(template.assistant_close),
        default_system=template.default_system,
        tools=(replace(template.tools, results=resolve(template.tools.results))
               if template.tools is not None else None),
        reasoning=template.reasoning,
    )


def _emit(out: List[int], pieces: ResolvedPieces, encode: Encode, **values: str) -> None:
    for piece in pieces:
        if isinstance(piece, int):
            out.append(piece)
        else:
            out.extend(encode(_PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), piece)))


def layout_names(kind: str) -> str:
    """The built-in templates that have a ``kind`` layout ("tools" or "reasoning"), in words."""
    names = [name for name, t in TEMPLATES.items() if getattr(t, kind) is not None]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


def _check_layouts(conversation: Conversation, template: ResolvedTemplate) -> None:
    """Refuse tools or reasoning that ``template`` has no layout for (``RecordError``)."""
    messages = conversation.messages
    if template.tools is None:
        index = next((i for i, m in enumerate(messages) if m.role == "tool" or m.tool_calls),
                     None)
        if index is not None or conversation.tools:
            what = ("the record offers tools" if index is None else f"messages[{index}] is a "
                    "tool " + ("result" if messages[index].role == "tool" else "call"))
            raise RecordError(
                "template_no_tools",
                f"{what}, but --template {template.name} has no layout for tools; use --template "
                f"{layout_names('tools')} (or hf with a chat template that lays out tools)")
    if template.reasoning is None:
        index = next((i for i, m in enumerate(messages) if (m.reasoning or "").strip()), None)
        if index is not None:
            raise RecordError(
                "template_no_reasoning",
                f"messages[{index}] has reasoning, but --template {template.name} has no place "
                f"for it; use --template {layout_names('reasoning')} (or hf with a chat "
                "template that lays out reasoning)")


def _system_text(conversation: Conversation, template: ResolvedTemplate) -> Tuple[str, int]:
    """(the system text, the tools described in it; index of the first message after the
    system message)."""
    messages = conversation.messages
    leading = bool(messages) and messages[0].role == "system"
    system = messages[0].content if leading else (template.default_system or "")
    if conversation.tools:
        layout = template.tools
        described = layout.tool_separator.join(
            json.dumps(tool, ensure_ascii=False, indent=layout.tool_indent)
            for tool in conversation.tools)
        tools = layout.tools[0] + described + layout.tools[1]
        system = f"{system}\n\n{tools}" if system else tools
    return system, int(leading)


def shows_block(message: Message, layout: Optional[ReasoningLayout], keep_reasoning: bool,
                final: bool) -> bool:
    """Whether an assistant message is written with its reasoning block: where the view keeps
    its reasoning (``keep_reasoning``), when it has some, or when it is the conversation's
    ``final`` message and the layout writes an empty block there (Qwen3)."""
    if layout is None or not keep_reasoning:
        return False
    return bool((message.reasoning or "").strip("\n")) or (final and layout.empty_final)


def _reply_text(message: Message, template: ResolvedTemplate, block: bool) -> str:
    """The text of an assistant message as trained: [reasoning block] content [tool calls]; with
    the block, the reasoning and the content lose their newlines at the joins (Qwen3)."""
    content = message.content
    text = content.lstrip("\n") if block else content
    for number, call in enumerate(message.tool_calls):
        layout = template.tools
        if call.arguments_text is None:
            body = json.dumps({"name": call.name, layout.arguments_key: call.arguments},
                              ensure_ascii=False)
        else:  # as given: what the exported Jinja template writes for a string too
            body = (f"{{\"name\": {json.dumps(call.name, ensure_ascii=False)}, "
                    f"{json.dumps(layout.arguments_key)}: {call.arguments_text}}}")
        text += ("\n" if content or number else "") + layout.call[0] + body + layout.call[1]
    if block:
        before, after = template.reasoning.wrap
        text = before + (message.reasoning or "").strip("\n") + after + text
    return text


def has_reply(message: Message, keep_reasoning: bool) -> bool:
    """An assistant message with nothing to say (empty reply, no call, no reasoning shown) is
    never trained."""
    shown = keep_reasoning and (message.reasoning or "").strip()
    return bool(message.content.strip() or message.tool_calls or shown)


def _render(conversation: Conversation, template: ResolvedTemplate, encode: Encode,
            trained: Sequence[bool], keep: Sequence[bool]
            ) -> Tuple[List[int], List[Tuple[int, int]], List[int]]:
    """The one renderer: ids of every message of ``conversation``, ``(start, length)`` of each
    reply with ``trained[i]`` (its end-of-turn included), the token offset after each of those
    turns. ``keep[i]``: message i's reasoning is shown."""
    messages = conversation.messages
    ids: List[int] = []
    _emit(ids, template.prefix, encode)
    system, start = _system_text(conversation, template)
    fold = bool(system) and template.first_user_with_system is not None
    if system and not fold:
        _emit(ids, template.system, encode, content=system)
    replies: List[Tuple[int, int]] = []
    turn_ends: List[int] = []
    results: List[str] = []
    for index in range(start, len(messages)):
        message = messages[index]
        if message.role == "assistant":
            _emit(ids, template.assistant_open, encode)
            if trained[index] and not ids:  # packing relies on untrained first tokens
                raise RecordError("role_order", f"messages[{index}]: --template {template.name} "
                                  "has nothing before a reply that opens the conversation, so "
                                  "it cannot be trained; start with a user message or give "
                                  "this reply weight 0")
            block = shows_block(message, template.reasoning, keep[index],
                                final=index == len(messages) - 1)
            reply = encode(_reply_text(message, template, block))
            reply.append(template.end_of_turn)
            if trained[index]:
                replies.append((len(ids), len(reply)))
            ids.extend(reply)
            _emit(ids, template.assistant_close, encode)
            if trained[index]:
                turn_ends.append(len(ids))
        elif message.role == "tool":
            layout = template.tools
            results.append(layout.result[0] + message.content + layout.result[1])
            following = messages[index + 1].role if index + 1 < len(messages) else None
            if following != "tool" or not layout.join_results:
                _emit(ids, layout.results, encode, content="".join(results))
                results = []
        elif message.role == "user":
            pieces = template.first_user_with_system if fold else template.user
            _emit(ids, pieces, encode, content=message.content, system=system)
            fold = False
        else:
            raise RecordError("role_order", f"messages[{index}] is a system message after the "
                              "start; only the first message can be a system message")
    if fold:
        raise RecordError("role_order", f"--template {template.name} puts the system message "
                          "into the first user message, and this conversation has none")
    return ids, replies, turn_ends


def trained_messages(messages: Sequence[Message], options: RenderOptions) -> List[bool]:
    """Per message: an assistant message the run trains (before emptiness is looked at)."""
    last = max((i for i, m in enumerate(messages) if m.role == "assistant"), default=-1)
    return [m.role == "assistant" and (m.train if m.train is not None
                                       else options.train_on == "all" or i == last)
            for i, m in enumerate(messages)]


def sample_views(messages: Sequence[Message], template: ResolvedTemplate,
                 options: RenderOptions, trained: List[bool]
                 ) -> List[Tuple[List[bool], List[bool]]]:
    """Per sample of the conversation: (trained, reasoning shown) per message.

    A *user turn* is a user message and the messages after it up to the next user message
    (tool calls, results and replies included). Templates that leave earlier reasoning out show
    only the last user turn's reasoning ("template"); "keep" shows all; "per-turn" closes a
    sample after every user turn with reasoning and trained replies, showing that turn's
    reasoning only, training the replies of the user turns since the previous sample."""
    count = len(messages)
    layout = template.reasoning
    if layout is None or not layout.drops_earlier or options.reasoning == "keep":
        return [(trained, [True] * count)]
    turn, users = [], 0
    for message in messages:
        users += message.role == "user"
        turn.append(users)
    if options.reasoning == "template":
        return [(trained, [t == turn[-1] for t in turn])]
    thinking = {turn[i] for i, m in enumerate(messages) if m.reasoning is not None}
    closing = sorted({turn[i] for i in range(count) if trained[i]} & thinking | {turn[-1]})
    views, done = [], -1
    for last in closing:
        views.append(([trained[i] and done < turn[i] <= last for i in range(count)],
                      [t == last for t in turn]))
        done = last
    return views


def render_conversation(
    conversation: Union[Conversation, Sequence[Message]], template: ResolvedTemplate,
    encode: Encode, options: Optional[RenderOptions] = None,
) -> Tuple[RenderedConversation, ...]:
    """The training samples of one conversation: token ids, per-token turn lengths, turn ends.

    One sample, or with ``options.reasoning == "per-turn"`` one per user turn with reasoning
    (see ``RenderOptions``, ``sample_views``). A trained assistant message's reply (reasoning where
    shown, content, tool calls) and its end-of-turn are trained; everything else (system, user,
    tool results, untrained or empty replies) is context with loss_token_num 0. A sample ends
    with its last trained turn (what follows would train nothing). ``conversation``: a
    ``Conversation`` or a sequence of ``Message``; ``encode`` turns text into ids without
    adding special tokens.

    Raises ``RecordError``: ``template_no_tools`` / ``template_no_reasoning`` (the template has
    no layout for them), ``no_trained_turn`` (nothing would be trained), ``role_order``.
    """
    conversation = as_conversation(conversation)
    options = options or RenderOptions()
    _check_layouts(conversation, template)
    messages = conversation.messages
    samples = []
    trained_here = trained_messages(messages, options)
    for trained, keep in sample_views(messages, template, options, trained_here):
        shown = [t and has_reply(m, k) for m, t, k in zip(messages, trained, keep)]
        if not any(shown):
            continue
        stop = max(i for i, t in enumerate(shown) if t) + 1
        view = replace(conversation, messages=tuple(messages[:stop]))
        ids, replies, turn_ends = _render(view, template, encode, shown, keep)
        samples.append(RenderedConversation(np.fromiter(ids, dtype=np.int64, count=len(ids)),
                                            turn_lengths(replies, len(ids)), tuple(turn_ends)))
    if not samples:
        raise no_trained_turn(options)
    return tuple(samples)


def no_trained_turn(options: RenderOptions, also: str = "") -> RecordError:
    """The refusal of a conversation in which nothing would be trained (reason
    ``no_trained_turn``); ``also`` names a renderer's own further cause."""
    last = ", or is not the last one (--train-on last)" if options.train_on == "last" else ""
    return RecordError(
        "no_trained_turn",
        f"no assistant message is trained (each one is marked weight 0 / loss false, is "
        f"empty{last}{also}); nothing would be trained")


def turn_lengths(replies: List[Tuple[int, int]], total: int) -> np.ndarray:
    """loss_token_num: each reply's length on its tokens, 0 elsewhere (one np.repeat)."""
    values, runs, position = [], [], 0
    for start, length in replies:
        values += [0, length]
        runs += [start - position, length]
        position = start + length
    values.append(0)
    runs.append(total - position)
    return np.repeat(np.asarray(values, dtype=np.int32), runs)


def render_prompt(
    conversation: Union[Conversation, Sequence[Message]], template: ResolvedTemplate,
    encode: Encode, options: Optional[RenderOptions] = None, enable_thinking: bool = True,
) -> List[int]:
    """Ids of a conversation that ends with a user message or a tool result, plus the reply
    opener: the generation prompt, laid out by the one renderer exactly as training laid out
    the history of the next reply (reasoning shown as ``options.reasoning`` shows it; "per-turn"
    as "template", the view it trains each turn in). ``enable_thinking`` False (Qwen3's switch,
    for a template with a reasoning layout) ends the prompt with an empty reasoning block, so
    that the model replies without thinking. Raises ``ValueError`` (``RecordError`` for what
    the template cannot lay out)."""
    conversation = as_conversation(conversation)
    messages = conversation.messages
    if not messages or messages[-1].role not in ("user", "tool"):
        raise ValueError("a generation prompt must end with a user message or a tool result")
    _check_layouts(conversation, template)
    untrained = [False] * len(messages)
    kept = options is not None and options.reasoning == "keep"
    view = RenderOptions(reasoning="keep" if kept else "template")
    [(_, keep)] = sample_views(messages, template, view, untrained)
    ids, _, _ = _render(conversation, template, encode, untrained, keep)
    _emit(ids, template.assistant_open, encode)
    if not enable_thinking and template.reasoning is not None:
        ids.extend(encode("".join(template.reasoning.wrap)))
    return ids


def truncate_to_turns(
    rendered: RenderedConversation, max_tokens: int
) -> Optional[RenderedConversation]:
    """The longest prefix made of whole turns that fits in ``max_tokens``; None if no turn fits."""
    kept = [end for end in rendered.turn_ends if end <= max_tokens]
    if not kept:
        return None
    end = kept[-1]
    return RenderedConversation(
        rendered.input_ids[:end], rendered.loss_token_num[:end], tuple(kept)
    )


def stop_ids(template_name: str, tokenizer: DialogTokenizer) -> Tuple[int, ...]:
    """Every id a trained reply may end with, ``end_of_turn_id``'s first: for a built-in
    template that one; for ``hf`` also the other tags that close replies of a template that
    ends each reply with the next message's tag (GLM: ``<|user|>``, ``<|observation|>``;
    ``render_hf.hf_stop_ids``). Generation stops at each; the metadata records them
    (``special_ids["stops"]``). Raises ``TokenizerError`` or ``ValueError``."""
    if template_name == HF_TEMPLATE:
        from mt_dialog.data.render_hf import hf_stop_ids

        return hf_stop_ids(tokenizer)
    return (end_of_turn_id(template_name, tokenizer),)


def end_of_turn_id(template_name: str, tokenizer: DialogTokenizer) -> int:
    """The id that ends every trained reply with ``--template template_name``: the built-in
    template's ``end_of_turn`` (appended to the vocabulary if missing), or for ``hf`` the token
    the tokenizer's own chat template puts after each reply
    (``render_hf.chat_template_end_of_turn``). The one way the end-of-turn is resolved: the
    dataset metadata records it and generation, ``--verify`` and the Hugging Face export use it.
    Raises ``TokenizerError`` or ``ValueError`` (unknown template)."""
    if template_name == HF_TEMPLATE:
        from mt_dialog.data.render_hf import hf_end_of_turn_id

        return hf_end_of_turn_id(tokenizer)
    return resolve_template(get_template(template_name), tokenizer).end_of_turn


def document_piece(ids: Sequence[int]) -> RenderedConversation:
    """One packed unit of a text document, ``ids`` (>= 2 ids): every token trained but the first
    (the first token of a pack's unit has no earlier token of its own to be predicted from, so it
    is never a label), each carrying the piece's trained tokens, ``len(ids) - 1``; one turn."""
    count = len(ids)
    loss_token_num = np.full(count, count - 1, dtype=np.int32)
    loss_token_num[0] = 0
    return RenderedConversation(np.asarray(ids, dtype=np.int64), loss_token_num, (count,))


def render_document(document: Document, encode: Encode, prefix: Sequence[int],
                    eos: Optional[int]) -> RenderedConversation:
    """A text document as one training unit: ``prefix`` (``DialogTokenizer.document_prefix``:
    the BOS a tokenizer puts before text, or nothing), ``encode(document.text)``, then ``eos``
    (trained: the model learns where documents end); see ``document_piece``. A document longer
    than the sequence length is cut by ``split_document``.

    Raises ``RecordError`` ``no_eos`` when the tokenizer has no eos token."""
    if eos is None:
        raise RecordError("no_eos", "the tokenizer defines no eos token, which ends every text "
                          "document; use a tokenizer with one")
    return document_piece([*prefix, *encode(document.text), eos])


def split_document(rendered: RenderedConversation, max_tokens: int
                   ) -> Tuple[RenderedConversation, ...]:
    """``--overlong split``: a rendered document cut into pieces of at most ``max_tokens`` ids,
    each a ``document_piece`` (its own unit: positions restart, attention isolated, its first
    token untrained). Each piece after the first starts with the last id of the piece before
    (as Megatron-LM's GPT samples overlap by one token), as context only, so every id of the
    document but its first is trained exactly once, and nothing is lost at a cut::

        ids     b  t1 t2 t3 t4 t5 t6 e            (max_tokens 4)
        pieces  [b  t1 t2 t3] [t3 t4 t5 t6] [t6 e]
        trained     ^  ^  ^       ^  ^  ^       ^

    Dropping each later piece's first id and joining gives the document's ids back.

    Raises ``RecordError`` ``overlong`` when ``max_tokens`` < 2 (a piece trains nothing)."""
    ids = rendered.input_ids
    count = ids.shape[0]
    if count <= max_tokens:
        return (rendered,)
    if max_tokens < 2:
        raise RecordError("overlong", f"the document has {count} tokens, and pieces of "
                          f"--seq-length {max_tokens} token train nothing; use --seq-length 2 "
                          "or more")
    starts = range(0, count - 1, max_tokens - 1)  # each piece trains ids start+1 .. start+max-1
    return tuple(document_piece(ids[start:start + max_tokens]) for start in starts)
