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
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mt_dialog.data.formats import Conversation, Message, ToolCall
from mt_dialog.data.render import (
    RenderOptions,
    ResolvedTemplate,
    as_conversation,
    render_conversation,
    render_prompt,
)
from mt_dialog.data.render_hf import (  # noqa: F401 (hf_messages: this module's API too)
    hf_messages,
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


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _no_tools(template: ResolvedTemplate) -> str:
    return ("{{ raise_exception('this model was trained with the " + template.name
            + " chat template, which has no layout for tools') }}")


def _jinja_system(template: ResolvedTemplate) -> str:
    """Sets ``system`` (the tools described in it, as ``render._system_text``) and ``body``."""
    default = _literal(template.default_system) if template.default_system else "''"
    out = ["{%- set system = " + default + " -%}{%- set body = messages -%}",
           "{%- if messages and messages[0]['role'] == 'system' -%}",
           "{%- set system = messages[0]['content'] -%}{%- set body = messages[1:] -%}",
           "{%- endif -%}"]
    layout = template.tools
    if layout is None:
        return "".join(out + ["{%- if tools -%}", _no_tools(template), "{%- endif -%}"])
    indent = "none" if layout.tool_indent is None else str(layout.tool_indent)
    return "".join(out + [
        "{%- if tools -%}{%- set ns.described = '' -%}{%- for tool in tools -%}",
        "{%- set ns.described = ns.described + ('' if loop.first else "
        + _literal(layout.tool_separator) + ") + (tool | tojson(indent=" + indent + ")) -%}",
        "{%- endfor -%}",
        "{%- set described = " + _literal(layout.tools[0]) + " + ns.described + "
        + _literal(layout.tools[1]) + " -%}",
        "{%- set system = (system + '\\n\\n' + described) if system else described -%}",
        "{%- endif -%}"])


def _jinja_reply(template: ResolvedTemplate, keep_reasoning: bool) -> str:
    """Sets ``ns.reply`` to an assistant message's text, as ``render._reply_text``."""
    out = ["{%- set ns.reply = content -%}"]
    layout = template.tools
    if layout is not None:
        key = _literal(layout.arguments_key)
        out += [
            "{%- for call in (message['tool_calls'] or []) -%}",
            "{%- set function = call['function'] if call['function'] is defined else call -%}",
            "{%- if function['arguments'] is string -%}",
            "{%- set call_json = '{\"name\": ' + (function['name'] | tojson) + ', ' + (" + key
            + " | tojson) + ': ' + function['arguments'] + '}' -%}",
            "{%- else -%}{%- set call_json = {'name': function['name'], " + key
            + ": function['arguments']} | tojson -%}{%- endif -%}",
            "{%- set ns.reply = ns.reply + ('\\n' if ns.reply else '') + "
            + _literal(layout.call[0]) + " + call_json + " + _literal(layout.call[1]) + " -%}",
            "{%- endfor -%}"]
    if template.reasoning is not None:
        shown = "true" if keep_reasoning or not template.reasoning.drops_earlier \
            else "index > ns.last_user"
        out += ["{%- if message['reasoning_content'] is string and (" + shown + ") -%}",
                "{%- set ns.reply = " + _literal(template.reasoning.wrap[0])
                + " + message['reasoning_content'] + " + _literal(template.reasoning.wrap[1])
                + " + ns.reply -%}{%- endif -%}"]
    return "".join(out)


def _jinja_tool_result(template: ResolvedTemplate, token_text) -> str:
    layout = template.tools
    if layout is None:
        return _no_tools(template)
    last = ("loop.last or body[index + 1]['role'] != 'tool'" if layout.join_results else "true")
    return ("{%- set ns.results = ns.results + " + _literal(layout.result[0]) + " + content + "
            + _literal(layout.result[1]) + " -%}{%- if " + last + " -%}"
            + _emit(layout.results, token_text, content="ns.results")
            + "{%- set ns.results = '' -%}{%- endif -%}")


def jinja_chat_template(template: ResolvedTemplate, token_text: Callable[[int], str],
                        word_start: bool = False, keep_reasoning: bool = False) -> str:
    """The Jinja equivalent of ``render_prompt`` / ``render_conversation`` for ``template``
    (Hugging Face messages: ``tool_calls``, ``reasoning_content``, ``tool`` results, and
    ``tools`` passed to ``apply_chat_template``); ``token_text(id)`` is a special token's text in
    the tokenizer. ``word_start``: training encoded each text piece separately with a
    SentencePiece tokenizer that starts every encoding with a word-start marker; a space
    between two adjacent text pieces reproduces it. ``keep_reasoning``: the history keeps every
    message's reasoning (a run with ``--reasoning keep``) instead of the template's own rule."""
    user = _emit(template.user, token_text, content="content", system="system")
    if template.first_user_with_system is not None:
        first = _emit(template.first_user_with_system, token_text, content="content",
                      system="system")
        user = ("{%- if ns.fold -%}" + first + "{%- set ns.fold = false -%}{%- else -%}" + user
                + "{%- endif -%}")
        system_block = "{%- set ns.fold = system | length > 0 -%}"
    else:
        system_block = ("{%- if system -%}" + _emit(template.system, token_text,
                                                    content="system") + "{%- endif -%}")
    reply = (_emit(template.assistant_open, token_text) + _jinja_reply(template, keep_reasoning)
             + _text("ns.reply") + _emit((template.end_of_turn,), token_text)
             + _emit(template.assistant_close, token_text))
    return "".join([
        "{%- set word_start = " + ("' '" if word_start else "''") + " -%}",
        "{%- set ns = namespace(text=false, fold=false, results='', reply='', described='', "
        "last_user=-1) -%}",
        _jinja_system(template),
        _emit(template.prefix, token_text),
        system_block,
        "{%- for message in body -%}{%- if message['role'] == 'user' -%}",
        "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}",
        "{%- for message in body -%}{%- set index = loop.index0 -%}",
        "{%- set content = message['content'] if message['content'] is string else '' -%}",
        "{%- if message['role'] == 'user' -%}", user,
        "{%- elif message['role'] == 'tool' -%}", _jinja_tool_result(template, token_text),
        "{%- else -%}", reply, "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}", _emit(template.assistant_open, token_text),
        "{%- endif -%}",
    ])


Probe = Tuple[Conversation, Message]
"""A generation prompt (ending with a user message or tool results) and the reply after it."""
PROBE_TOOLS = ({"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},)


def probes_for(template: Optional[ResolvedTemplate]) -> List[Probe]:
    """The probe conversations a chat template is checked on: ``PROBES`` for every template;
    for a built-in one with a reasoning layout, earlier turns' reasoning too; with a tool
    layout, tools (with and without a system message), parallel calls, joined results and a
    call after results."""
    probes = [(Conversation(tuple(p)), Message("assistant", "Sure.")) for p in PROBES]
    if template is None:
        return probes
    think = template.reasoning is not None

    def said(content, calls=(), reasoning=None):
        return Message("assistant", content, tuple(calls), reasoning if think else None)

    if think:
        probes.append((Conversation((Message("user", "2 plus 2?"), said("4", (), "Add them."),
                                     Message("user", "And 3 plus 3?"))),
                       said("6", (), "Same again:\n3 + 3.")))
    if template.tools is not None:
        calls = (ToolCall("get_weather", {"city": "Paris"}, "call_1"),
                 ToolCall("get_weather", {"city": "Zürich"}, "call_2"))
        asked = (Message("user", "Weather in Paris and Zürich?"),
                 said("", calls, "Two cities, two calls."),
                 Message("tool", '{"temp": 22}', tool_call_id="call_1"),
                 Message("tool", '{"temp": 18}', tool_call_id="call_2"))
        answer = said("Paris 22°C, Zürich 18°C.", (), "Both results are in.")
        later = said("Let me check.", (ToolCall("get_weather", {"city": "Paris", "day": 1}),),
                     "One more call.")
        probes.append((Conversation(asked, PROBE_TOOLS), answer))
        probes.append((Conversation((Message("system", "You are terse."),) + asked
                                    + (answer, Message("user", "And tomorrow?")), PROBE_TOOLS),
                       later))
    return probes


@dataclass(frozen=True)
class TrainingLayout:
    """``layout(conversation, add_generation_prompt)``: the ids training gave a conversation
    (the generation prompt when ``add_generation_prompt``, as ``tools/chat.py`` builds it) with
    the built-in ``template`` and ``options``, or with the Hugging Face ``tokenizer``'s own chat
    template when ``template`` is None (``--template hf``); ``probes``: what to check it on."""

    template: Optional[ResolvedTemplate]
    tokenizer: Any
    options: RenderOptions = RenderOptions()

    @property
    def probes(self) -> List[Probe]:
        return probes_for(self.template)

    def __call__(self, conversation, add_generation_prompt: bool) -> List[int]:
        conversation = as_conversation(conversation)
        if self.template is None:
            hf = self.tokenizer.hf
            if add_generation_prompt:
                return render_prompt_with_chat_template(conversation, hf)
            return render_with_chat_template(conversation, hf, self.options)[-1].input_ids.tolist()
        encode = self.tokenizer.encode
        if add_generation_prompt:
            return render_prompt(conversation, self.template, encode, self.options)
        # the whole conversation: its last sample (the only one unless --reasoning per-turn)
        samples = render_conversation(conversation, self.template, encode, self.options)
        return samples[-1].input_ids.tolist()


TrainingIds = Callable[[Conversation, bool], List[int]]


def training_layout(template: Optional[ResolvedTemplate], tokenizer,
                    options: Optional[RenderOptions] = None) -> TrainingLayout:
    """The ``TrainingLayout`` of a run (``options``: its ``--train-on`` / ``--reasoning``)."""
    return TrainingLayout(template, tokenizer, options or RenderOptions())


def chat_template_ids(hf_tokenizer, conversation, add_generation_prompt: bool) -> List[int]:
    """``hf_tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=...)``'s
    ids, called as users call it (``tools`` only when the conversation has some; transformers 5
    returns a dict, 4 a list). ``conversation``: a ``Conversation`` or messages."""
    conversation = as_conversation(conversation)
    extra = {"tools": list(conversation.tools)} if conversation.tools else {}
    out = hf_tokenizer.apply_chat_template(hf_messages(conversation.messages),
                                           add_generation_prompt=add_generation_prompt, **extra)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def layout_differences(hf_tokenizer, training_ids: TrainingIds,
                       probes: Optional[Sequence[Probe]] = None) -> Optional[str]:
    """None when ``hf_tokenizer.apply_chat_template`` gives exactly ``training_ids`` (see
    ``training_layout``) on the probe conversations (``probes``, default the layout's own
    ``probes``: tools, tool calls and results, reasoning where its template lays them out),
    prompt and whole conversation (a system message included); else where the first difference
    is, with the two tokens."""
    if probes is None:
        probes = getattr(training_ids, "probes", probes_for(None))
    for number, (probe, reply) in enumerate(probes):
        full = replace(probe, messages=probe.messages + (reply,))
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
