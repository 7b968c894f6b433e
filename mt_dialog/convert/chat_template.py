"""A built-in chat template as a Hugging Face Jinja ``chat_template`` (for exported models).

A served model must see prompts laid out as in training. ``jinja_chat_template`` writes the
resolved template (special tokens by their vocabulary text) as Jinja, e.g. for ``chatml``::

    {{ '<|im_start|>' }}{{ 'user\\n' + content }}{{ '<|im_end|>' }}{{ '\\n' }} ...

Training encodes each template piece separately while a server tokenizes the rendered string
as a whole; with byte-level BPE tokenizers the two agree; SentencePiece tokenizers start every
encoding with a word-start marker, which the exported tokenizer adds after every special token
(``LlamaTokenizer`` with ``legacy: true``) and a space between adjacent text pieces reproduces
(``word_start``). ``layout_differences`` compares training's ids with ``apply_chat_template``'s on
probe conversations so that the export can say whether the layout is reproduced token for token.
"""

from __future__ import annotations

import json
import re
from typing import Callable, Dict, List, Optional, Sequence

from mt_dialog.data.formats import Message
from mt_dialog.data.render import (
    ResolvedTemplate,
    render_conversation,
    render_prompt,
    render_prompt_with_chat_template,
    render_with_chat_template,
)

_PLACEHOLDER = re.compile(r"\{(content|system)\}")
PROBES: Sequence[Sequence[Message]] = (
    (Message("user", "Hello!"), Message("assistant", "Hi there."),
     Message("user", "What is 2 plus 2?")),
    (Message("system", "You are terse."), Message("user", "Count from 1 to 3."),
     Message("assistant", "1 2 3"), Message("user", "Thanks! 谢谢")),
)


def _text_expr(text: str, names: Dict[str, str]) -> str:
    """``'lit' + var + 'lit'`` for a text piece with ``{content}`` / ``{system}``."""
    parts, last = [], 0
    for match in _PLACEHOLDER.finditer(text):
        if match.start() > last:
            parts.append(json.dumps(text[last:match.start()], ensure_ascii=False))
        parts.append(names[match.group(1)])
        last = match.end()
    if last < len(text) or not parts:
        parts.append(json.dumps(text[last:], ensure_ascii=False))
    return " + ".join(parts)


def _emit(pieces, token_text: Callable[[int], str], **names: str) -> str:
    """Jinja for pieces; ``ns.text`` says whether the last thing written was text (see
    ``jinja_chat_template``'s ``word_start``)."""
    out = []
    for piece in pieces or ():
        if isinstance(piece, int):
            out.append("{{ " + json.dumps(token_text(piece), ensure_ascii=False)
                       + " }}{%- set ns.text = false -%}")
        else:
            out.append(_text(_text_expr(piece, names)))
    return "".join(out)


def _text(expr: str) -> str:
    return ("{%- set piece = " + expr + " -%}{%- if piece -%}"
            "{{ (word_start if ns.text else '') + piece }}{%- set ns.text = true -%}"
            "{%- endif -%}")


def jinja_chat_template(template: ResolvedTemplate, token_text: Callable[[int], str],
                        word_start: bool = False) -> str:
    """The Jinja equivalent of ``render_prompt`` / ``render_conversation`` for ``template``;
    ``token_text(id)`` is a special token's text in the tokenizer. ``word_start``: training
    encoded each text piece separately with a SentencePiece tokenizer that starts every encoding
    with a word-start marker; a space between two adjacent text pieces reproduces it."""
    default = json.dumps(template.default_system, ensure_ascii=False) \
        if template.default_system else "none"
    user = _emit(template.user, token_text, content="content", system="system")
    if template.first_user_with_system is not None:
        first = _emit(template.first_user_with_system, token_text, content="content",
                      system="system")
        user = ("{%- if loop.first and system -%}" + first + "{%- else -%}" + user
                + "{%- endif -%}")
        system_block = ""
    else:
        system_block = ("{%- if system -%}" + _emit(template.system, token_text,
                                                    content="system") + "{%- endif -%}")
    reply = (_emit(template.assistant_open, token_text) + _text("content")
             + _emit((template.end_of_turn,), token_text)
             + _emit(template.assistant_close, token_text))
    return "".join([
        "{%- set word_start = " + ("' '" if word_start else "''") + " -%}",
        "{%- set ns = namespace(text=false) -%}",
        "{%- set system = " + default + " -%}",
        "{%- set body = messages -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system = messages[0]['content'] -%}{%- set body = messages[1:] -%}",
        "{%- endif -%}",
        _emit(template.prefix, token_text),
        system_block,
        "{%- for message in body -%}{%- set content = message['content'] -%}",
        "{%- if message['role'] == 'user' -%}", user, "{%- else -%}", reply, "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}", _emit(template.assistant_open, token_text),
        "{%- endif -%}",
    ])


TrainingIds = Callable[[Sequence[Message], bool], List[int]]


def training_layout(template: Optional[ResolvedTemplate], tokenizer) -> TrainingIds:
    """``ids(messages, add_generation_prompt)``: the ids training gave a conversation (the
    generation prompt when ``add_generation_prompt``, as ``tools/chat.py`` builds it) with the
    built-in ``template``, or with the Hugging Face ``tokenizer``'s own chat template when
    ``template`` is None (``--template hf``)."""
    def ids(messages: Sequence[Message], add_generation_prompt: bool) -> List[int]:
        if template is None:
            if add_generation_prompt:
                return render_prompt_with_chat_template(messages, tokenizer.hf)
            return render_with_chat_template(messages, tokenizer.hf).input_ids.tolist()
        if add_generation_prompt:
            return render_prompt(list(messages), template, tokenizer.encode)
        return render_conversation(list(messages), template, tokenizer.encode).input_ids.tolist()

    return ids


def chat_template_ids(hf_tokenizer, messages: Sequence[Message],
                      add_generation_prompt: bool) -> List[int]:
    """``hf_tokenizer.apply_chat_template(messages, add_generation_prompt=...)``'s ids, called
    as users call it (no other argument; transformers 5 returns a dict, 4 a list)."""
    dicts = [{"role": m.role, "content": m.content} for m in messages]
    out = hf_tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def layout_differences(hf_tokenizer, training_ids: TrainingIds) -> Optional[str]:
    """None when ``hf_tokenizer.apply_chat_template`` gives exactly ``training_ids`` (see
    ``training_layout``) on the probe conversations, prompt and whole conversation (a system
    message included); else where the first difference is, with the two tokens."""
    for number, probe in enumerate(PROBES):
        full = list(probe) + [Message("assistant", "Sure.")]
        for kind, messages, prompt in (("prompt", probe, True), ("conversation", full, False)):
            ours = list(training_ids(messages, prompt))
            theirs = chat_template_ids(hf_tokenizer, messages, prompt)
            if ours == theirs:
                continue
            at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                      min(len(ours), len(theirs)))
            shown = [f"{hf_tokenizer.convert_ids_to_tokens(ids[at])!r} (id {ids[at]})"
                     if at < len(ids) else "the end" for ids in (ours, theirs)]
            return (f"probe {number} ({kind}): training ids and the chat template's ids first "
                    f"differ at token {at} of {len(ours)}: {shown[0]} in training, {shown[1]} "
                    "from the exported tokenizer")
    return None
