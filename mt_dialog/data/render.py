"""Render one conversation into token ids and per-token loss fields.

``render_conversation`` is the single place where a conversation becomes training data. For the
``firefly`` template and a two-turn conversation (ids shortened)::

    text      <s> Hi </s> Hello! </s> 2+2? </s>  4  </s>
    input_ids  1  306  2   15043 2   29906  2  29946  2
    loss_mask  0   0   0    1    1     0    0    1    1     <- replies + their end-of-turn token
    loss_token_num 0 0 0    2    2     0    0    2    2     <- length of the token's turn, else 0
    turn_ends                      ^5                   ^9  <- token offset after each turn

The fields are aligned with ``input_ids`` (the token itself is the target); the dataset applies
the next-token shift. The first token of a conversation is never trained, so shifting a whole
pack never trains across a conversation boundary. ``loss_mask == (loss_token_num > 0)`` always.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

from mt_dialog.data.formats import Message, RecordError
from mt_dialog.data.templates import (
    BOS,
    EOS,
    HF_TEMPLATE,
    ChatTemplate,
    Pieces,
    Special,
    get_template,
)
from mt_dialog.data.tokenizers import DialogTokenizer, TokenizerError

Encode = Callable[[str], List[int]]
ResolvedPieces = Tuple[Union[str, int], ...]
_PLACEHOLDER = re.compile(r"\{(content|system)\}")


@dataclass(frozen=True)
class RenderedConversation:
    """One conversation as tokens. Arrays have equal length."""

    input_ids: np.ndarray  # int64 token ids
    loss_token_num: np.ndarray  # int32: length of the token's turn on trained tokens, else 0
    turn_ends: Tuple[int, ...]  # token offset just after each assistant turn (close included)

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
    )


def _emit(out: List[int], pieces: ResolvedPieces, encode: Encode, **values: str) -> None:
    for piece in pieces:
        if isinstance(piece, int):
            out.append(piece)
        else:
            out.extend(encode(_PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), piece)))


def _render_context(
    messages: Sequence[Message], template: ResolvedTemplate, encode: Encode
) -> Tuple[List[int], Sequence[Message], Optional[ResolvedPieces], str]:
    """Prefix and system block; returns ids, the remaining messages, first-user pieces."""
    ids: List[int] = []
    _emit(ids, template.prefix, encode)
    system = template.default_system
    body = messages
    if messages and messages[0].role == "system":
        system, body = messages[0].content, messages[1:]
    first_user = None
    if system and template.first_user_with_system is not None:
        first_user = template.first_user_with_system
    elif system:
        _emit(ids, template.system, encode, content=system)
    return ids, body, first_user, system or ""


def render_conversation(
    messages: Sequence[Message], template: ResolvedTemplate, encode: Encode
) -> RenderedConversation:
    """Token ids, per-token turn lengths and turn ends of a validated conversation.

    ``messages`` must follow ``[system] user assistant (user assistant)*`` (see
    ``formats.validate_roles``); ``encode`` turns text into ids without adding special tokens.
    """
    ids, body, first_user, system = _render_context(messages, template, encode)
    replies: List[Tuple[int, int]] = []  # (start, length) of each trained reply
    turn_ends: List[int] = []
    for index, message in enumerate(body):
        if message.role == "user":
            pieces = first_user if (index == 0 and first_user is not None) else template.user
            _emit(ids, pieces, encode, content=message.content, system=system)
            continue
        _emit(ids, template.assistant_open, encode)
        reply = encode(message.content)
        reply.append(template.end_of_turn)
        replies.append((len(ids), len(reply)))
        ids.extend(reply)
        _emit(ids, template.assistant_close, encode)
        turn_ends.append(len(ids))
    return RenderedConversation(
        np.fromiter(ids, dtype=np.int64, count=len(ids)),
        _turn_lengths(replies, len(ids)), tuple(turn_ends)
    )


def _turn_lengths(replies: List[Tuple[int, int]], total: int) -> np.ndarray:
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
    messages: Sequence[Message], template: ResolvedTemplate, encode: Encode
) -> List[int]:
    """Ids of a conversation that ends with a user message, plus the reply opener: the
    generation prompt, laid out exactly as in training."""
    if not messages or messages[-1].role != "user":
        raise ValueError("a generation prompt must end with a user message")
    ids, body, first_user, system = _render_context(messages, template, encode)
    for index, message in enumerate(body):
        if message.role == "user":
            pieces = first_user if (index == 0 and first_user is not None) else template.user
            _emit(ids, pieces, encode, content=message.content, system=system)
        else:
            _emit(ids, template.assistant_open, encode)
            ids.extend(encode(message.content) + [template.end_of_turn])
            _emit(ids, template.assistant_close, encode)
    _emit(ids, template.assistant_open, encode)
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


def render_with_chat_template(messages: Sequence[Message], hf_tokenizer) -> RenderedConversation:
    """Render with a Hugging Face tokenizer's own Jinja chat template.

    The template renders text, so the assistant spans are *derived by rendering*: for reply k,
    ``prompt_k`` = messages[:k] with the generation prompt and ``upto_k`` = messages[:k+1]; the
    full text must start with ``upto_k`` and ``upto_k`` with ``prompt_k``. The reply's tokens are
    those starting inside the content, plus the first token after it, which must be the chat
    template's end-of-turn token (``chat_template_end_of_turn``). Anything else is refused
    rather than guessed: ``RecordError`` with reason ``special_token_in_text``,
    ``template_mismatch``, ``end_of_turn_mismatch`` or ``template_error`` (``TokenizerError``
    when the template cannot be used at all).
    """
    expected = chat_template_end_of_turn(hf_tokenizer)
    rendered, enders = _render_replies(messages, hf_tokenizer)
    for k, token in enders:
        if token != expected:
            piece, wanted = hf_tokenizer.convert_ids_to_tokens([token, expected])
            raise RecordError(
                "end_of_turn_mismatch",
                f"message {k}: the chat template ends this reply with {piece!r} (id {token}) "
                f"but replies end with {wanted!r} (id {expected}) elsewhere; training needs one "
                "end-of-turn token (generation stops at it): fix the chat template or use a "
                "built-in --template",
            )
    return rendered


def _render_replies(messages: Sequence[Message], hf_tokenizer
                    ) -> Tuple[RenderedConversation, List[Tuple[int, int]]]:
    """The rendering and, per assistant message k, ``(k, id of the special token after it)``."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    specials = [s for s in hf_tokenizer.all_special_tokens if s]
    for index, message in enumerate(messages):
        hit = next((s for s in specials if s in message.content), None)
        if hit:
            raise RecordError(
                "special_token_in_text",
                f"message {index} contains the special token text {hit!r}, which the chat "
                "template would turn into a control token; remove it or use a built-in --template",
            )
    full = _apply_chat_template(hf_tokenizer, dicts)
    encoded = hf_tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    starts = [span[0] for span in encoded["offset_mapping"]]
    special_ids = set(hf_tokenizer.all_special_ids)
    ltn = [0] * len(ids)
    turn_ends: List[int] = []
    enders: List[Tuple[int, int]] = []
    for k, message in enumerate(messages):
        if message.role != "assistant":
            continue
        span = _assistant_span(dicts, k, full, hf_tokenizer)
        trained = [i for i, s in enumerate(starts) if span[0] <= s < span[1]]
        after = next((i for i, s in enumerate(starts) if s >= span[1]), None)
        aligned = bool(trained) and starts[trained[0]] == span[0]
        if not aligned or after is None or ids[after] not in special_ids:
            raise RecordError(
                "template_mismatch",
                f"message {k}: the chat template's rendering of this reply is not followed by a "
                "special end-of-turn token; use a built-in --template for this tokenizer",
            )
        trained.append(after)
        enders.append((k, ids[after]))
        for i in trained:
            ltn[i] = len(trained)
        upto_end = span[2]
        turn_ends.append(next((i for i, s in enumerate(starts) if s >= upto_end), len(ids)))
    rendered = RenderedConversation(
        np.asarray(ids, dtype=np.int64), np.asarray(ltn, dtype=np.int32), tuple(turn_ends)
    )
    return rendered, enders


def _apply_chat_template(hf_tokenizer, dicts, add_generation_prompt: bool = False) -> str:
    """The template's text; a template that refuses the conversation is a ``RecordError``."""
    import jinja2

    try:
        return hf_tokenizer.apply_chat_template(dicts, tokenize=False,
                                                add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as exc:
        raise RecordError("template_error",
                          f"the chat template refuses this conversation ({exc})") from None


def render_prompt_with_chat_template(messages: Sequence[Message], hf_tokenizer) -> List[int]:
    """Ids of the generation prompt (a conversation ending with a user message) laid out by the
    tokenizer's chat template, tokenized as ``render_with_chat_template`` tokenizes training
    conversations. Raises ``RecordError`` when the template refuses the conversation."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    text = _apply_chat_template(hf_tokenizer, dicts, add_generation_prompt=True)
    return list(hf_tokenizer(text, add_special_tokens=False)["input_ids"])


_PROBE = (Message("user", "Hello!"), Message("assistant", "Hi."),
          Message("user", "How are you?"), Message("assistant", "Fine, thanks."))
_END_OF_TURN: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def chat_template_end_of_turn(hf_tokenizer) -> int:
    """Id of the special token a Hugging Face chat template puts right after every reply
    (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3): the token training trains at the
    end of each reply and generation stops at. It is not ``eos_token_id`` in general (a base
    model's ChatML tokenizer has eos ``<|endoftext|>``). Found by rendering a probe conversation
    of two replies (cached per tokenizer and template); ``render_with_chat_template`` then checks
    every reply of every conversation against it.

    Raises ``TokenizerError`` when the tokenizer has no chat template, the template cannot lay
    out the probe, or ends its replies with different special tokens."""
    template = getattr(hf_tokenizer, "chat_template", None)
    if not template:
        raise TokenizerError("--template hf: the tokenizer has no chat template; choose a "
                             "built-in --template")
    cached = _END_OF_TURN.get(hf_tokenizer)
    if cached is not None and cached[0] == template:
        return cached[1]
    try:
        _, enders = _render_replies(_PROBE, hf_tokenizer)
    except RecordError as exc:
        raise TokenizerError(f"--template hf: the chat template cannot be used on the probe "
                             f"conversation {[m.content for m in _PROBE]}: {exc.message}") from None
    tokens = sorted({token for _, token in enders})
    if len(tokens) != 1:
        pieces = ", ".join(f"{p!r} (id {t})" for p, t in
                           zip(hf_tokenizer.convert_ids_to_tokens(tokens), tokens))
        raise TokenizerError(
            f"--template hf: the chat template ends replies with different special tokens "
            f"({pieces}) on a probe conversation; training needs one end-of-turn token "
            "(generation stops at it): fix the chat template or choose a built-in --template")
    _END_OF_TURN[hf_tokenizer] = (template, tokens[0])
    return tokens[0]


def end_of_turn_id(template_name: str, tokenizer: DialogTokenizer) -> int:
    """The id that ends every trained reply with ``--template template_name``: the built-in
    template's ``end_of_turn`` (appended to the vocabulary if missing), or for ``hf`` the token
    the tokenizer's own chat template puts after each reply (``chat_template_end_of_turn``).
    The one way the end-of-turn is resolved: the dataset metadata records it and generation,
    ``--verify`` and the Hugging Face export use it. Raises ``TokenizerError`` or ``ValueError``
    (unknown template)."""
    if template_name == HF_TEMPLATE:
        if not getattr(tokenizer, "chat_template", None):
            raise TokenizerError(f"--template hf: the tokenizer in {tokenizer.path} has no chat "
                                 "template; choose a built-in --template")
        return chat_template_end_of_turn(tokenizer.hf)
    return resolve_template(get_template(template_name), tokenizer).end_of_turn


def _assistant_span(dicts, k: int, full: str, hf_tokenizer) -> Tuple[int, int, int]:
    """(content start, content end, end of the rendered turn) in ``full``'s characters."""
    prompt = _apply_chat_template(hf_tokenizer, dicts[:k], add_generation_prompt=True)
    upto = _apply_chat_template(hf_tokenizer, dicts[: k + 1])
    content = dicts[k]["content"]
    at = upto.find(content, len(prompt))
    if not (full.startswith(upto) and upto.startswith(prompt)) or at < 0:
        raise RecordError(
            "template_mismatch",
            f"message {k}: the chat template does not render prefixes of the conversation as "
            "prefixes of the whole, so the reply cannot be located; use a built-in --template",
        )
    return at, at + len(content), len(upto)
