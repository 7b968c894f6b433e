"""A built-in chat template as a Hugging Face Jinja ``chat_template`` (for exported models).

A served model must see prompts laid out as in training. ``jinja_chat_template`` writes the
resolved template (special tokens by their vocabulary text) as Jinja, e.g. for ``chatml``::

    {{ '<|im_start|>' }}{{ 'user\\n' + content }}{{ '<|im_end|>' }}{{ '\\n' }} ...

Training encodes each template piece separately while a server tokenizes the rendered string
as a whole; with byte-level BPE tokenizers the two agree; SentencePiece tokenizers start every
encoding with a word-start marker, which the exported tokenizer adds after every special token
(``LlamaTokenizer`` with ``legacy: true``) and a space between adjacent text pieces reproduces
(``word_start``). ``layout_differences`` compares training's ids with ``apply_chat_template``'s on
probe conversations so that the export can say whether the layout is reproduced token for token;
training's side reads the probe messages as training and chat read what users pass
(``as_read``: a ``<think>`` block of the content split off, bare tools wrapped), so a template
that lays out such input differently can never be called exact.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from mt_dialog.data.formats import (
    Conversation,
    Message,
    ToolCall,
    message_from_dict,
    parse_tools,
)
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
           "{%- set system = message_text(messages[0]) -%}{%- set body = messages[1:] -%}",
           "{%- endif -%}"]
    layout = template.tools
    if layout is None:
        return "".join(out + ["{%- if tools -%}", _no_tools(template), "{%- endif -%}"])
    indent = "none" if layout.tool_indent is None else str(layout.tool_indent)
    return "".join(out + [
        # a bare function description is wrapped, as formats.parse_tools wraps it
        "{%- if tools -%}{%- set ns.described = '' -%}{%- for tool in tools -%}",
        "{%- set function_tool = tool if tool['function'] is defined else "
        "{'type': 'function', 'function': tool} -%}",
        "{%- set ns.described = ns.described + ('' if loop.first else "
        + _literal(layout.tool_separator) + ") + (function_tool | tojson(indent=" + indent
        + ")) -%}",
        "{%- endfor -%}",
        "{%- set described = " + _literal(layout.tools[0]) + " + ns.described + "
        + _literal(layout.tools[1]) + " -%}",
        "{%- set system = (system + '\\n\\n' + described) if system else described -%}",
        "{%- endif -%}"])


_CONTENT = "".join([
    # a message's text as formats reads it (macro message_text): a string; text parts joined
    # with a space; a tool result's JSON object or list serialized (tojson: json.dumps with
    # ensure_ascii=False)
    "{%- macro message_text(message) -%}{%- set raw = message['content'] -%}",
    "{%- if raw is string -%}{{- raw -}}{%- elif raw is none or raw is not defined -%}",
    "{%- else -%}{%- set m = namespace(parts=raw is sequence and raw is not mapping) -%}",
    "{%- for part in (raw if m.parts else []) -%}",
    "{%- if not (part is mapping and part['type'] is defined) -%}{%- set m.parts = false -%}",
    "{%- endif -%}{%- endfor -%}",
    "{%- if m.parts -%}{%- for part in raw -%}",
    "{%- if part['type'] not in ('text', 'input_text', 'output_text') -%}",
    "{{- raise_exception('only text content parts can be laid out, not ' + part['type']) -}}",
    "{%- endif -%}{{- ('' if loop.first else ' ') + part['text'] -}}{%- endfor -%}",
    "{%- elif message['role'] in ('tool', 'function') -%}{{- raw | tojson -}}",
    "{%- else -%}{{- raise_exception('content must be a string or a list of text parts') -}}",
    "{%- endif -%}{%- endif -%}{%- endmacro -%}",
])
_SPLIT_REASONING = "".join([
    # the reasoning as formats.split_reasoning reads it: reasoning_content without its newlines
    # at the ends, or a leading <think>...</think> block of the content (the content after it
    # without leading newlines); both given must agree
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string "
    "else none -%}",
    "{%- if reasoning is not none -%}{%- set reasoning = reasoning.strip('\\n') -%}{%- endif -%}",
    "{%- set opened = content.lstrip() -%}{%- if opened.startswith('<think>') -%}",
    "{%- if '</think>' not in opened -%}{{ raise_exception('the content starts with <think> but "
    "has no </think>') }}{%- endif -%}",
    "{%- set inline = opened[7:].split('</think>')[0].strip('\\n') -%}",
    "{%- if reasoning is not none and reasoning != inline -%}{{ raise_exception("
    "'reasoning_content and the <think> block of the content differ') }}{%- endif -%}",
    "{%- set reasoning = inline -%}{%- set content = opened.split('</think>', 1)[1].lstrip('\\n')"
    " -%}{%- endif -%}",
])


def _jinja_reasoning(template: ResolvedTemplate, keep_reasoning: bool) -> str:
    """Sets ``block`` (the message is written with its reasoning block: ``render.shows_block``);
    a template without a reasoning layout refuses reasoning, as training does."""
    layout = template.reasoning
    if layout is None:
        return ("{%- set block = false -%}{%- if reasoning and reasoning.strip() -%}"
                "{{ raise_exception('this model was trained with the " + template.name
                + " chat template, which has no layout for reasoning') }}{%- endif -%}")
    shown = "true" if keep_reasoning or not layout.drops_earlier else "index > ns.last_user"
    final = "loop.last" if layout.empty_final else "false"
    return "{%- set block = (" + shown + ") and (reasoning or " + final + ") -%}"


def _jinja_reply(template: ResolvedTemplate, keep_reasoning: bool) -> str:
    """Sets ``ns.reply`` to an assistant message's text, as ``render._reply_text``."""
    out = [_SPLIT_REASONING, _jinja_reasoning(template, keep_reasoning),
           "{%- set ns.reply = content.lstrip('\\n') if block else content -%}",
           # tool_calls, or the legacy function_call as one call (formats._assistant_calls)
           "{%- set calls = message['tool_calls'] or ([message['function_call']] if "
           "message['function_call'] else []) -%}"]
    layout = template.tools
    if layout is None:
        out.append("{%- if calls -%}" + _no_tools(template) + "{%- endif -%}")
    else:
        key = _literal(layout.arguments_key)
        out += [
            "{%- for call in calls -%}",
            "{%- set function = call['function'] if call['function'] is defined else call -%}",
            "{%- if function['arguments'] is string -%}",
            "{%- set call_json = '{\"name\": ' + (function['name'] | tojson) + ', ' + (" + key
            + " | tojson) + ': ' + (function['arguments'] if function['arguments'].strip() "
            "else '{}') + '}' -%}",
            "{%- else -%}{%- set call_json = {'name': function['name'], " + key
            + ": function['arguments']} | tojson -%}{%- endif -%}",
            "{%- set ns.reply = ns.reply + ('\\n' if content or not loop.first else '') + "
            + _literal(layout.call[0]) + " + call_json + " + _literal(layout.call[1]) + " -%}",
            "{%- endfor -%}"]
    if template.reasoning is not None:
        out += ["{%- if block -%}{%- set ns.reply = " + _literal(template.reasoning.wrap[0])
                + " + (reasoning or '') + " + _literal(template.reasoning.wrap[1])
                + " + ns.reply -%}{%- endif -%}"]
    return "".join(out)


def _jinja_tool_result(template: ResolvedTemplate, token_text) -> str:
    layout = template.tools
    if layout is None:
        return _no_tools(template)
    last = ("loop.last or body[index + 1]['role'] not in ('tool', 'function')"
            if layout.join_results else "true")
    return ("{%- set ns.results = ns.results + " + _literal(layout.result[0]) + " + content + "
            + _literal(layout.result[1]) + " -%}{%- if " + last + " -%}"
            + _emit(layout.results, token_text, content="ns.results")
            + "{%- set ns.results = '' -%}{%- endif -%}")


def jinja_chat_template(template: ResolvedTemplate, token_text: Callable[[int], str],
                        word_start: bool = False, keep_reasoning: bool = False) -> str:
    """The Jinja equivalent of ``render_prompt`` / ``render_conversation`` for ``template``
    (Hugging Face messages: ``tool_calls``, ``reasoning_content``, ``tool`` results, and
    ``tools`` passed to ``apply_chat_template``), reading messages as ``formats`` does (a leading
    ``<think>`` block of the content is the reasoning, bare tools are wrapped, the legacy
    ``function_call`` / ``function`` messages, content parts, JSON tool results) and taking
    Qwen3's ``enable_thinking``; ``token_text(id)`` is a special token's text in
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
        _CONTENT, "{%- set word_start = " + ("' '" if word_start else "''") + " -%}",
        "{%- set ns = namespace(text=false, fold=false, results='', reply='', described='', "
        "last_user=-1) -%}",
        _jinja_system(template),
        _emit(template.prefix, token_text),
        system_block,
        "{%- for message in body -%}{%- if message['role'] == 'user' -%}",
        "{%- set ns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}",
        "{%- for message in body -%}{%- set index = loop.index0 -%}",
        "{%- set content = message_text(message) -%}",
        "{%- if message['role'] == 'user' -%}", user,
        "{%- elif message['role'] in ('tool', 'function') -%}",
        _jinja_tool_result(template, token_text),
        "{%- else -%}", reply, "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}", _emit(template.assistant_open, token_text),
        _no_thinking(template), "{%- endif -%}",
    ])


def _no_thinking(template: ResolvedTemplate) -> str:
    """``enable_thinking=False`` (Qwen3's switch): the prompt ends with an empty reasoning
    block, as ``render.render_prompt(..., enable_thinking=False)``."""
    if template.reasoning is None:
        return ""
    return ("{%- if enable_thinking is defined and enable_thinking is false -%}"
            + _text(_literal("".join(template.reasoning.wrap))) + "{%- endif -%}")


Probe = Tuple[Conversation, Message]
"""A generation prompt (ending with a user message or tool results) and the reply after it."""
PROBE_TOOLS = ({"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}},)


def probes_for(template: Optional[ResolvedTemplate]) -> List[Probe]:
    """The probe conversations a chat template is checked on: ``PROBES`` for every template;
    for a built-in one, a ``<think>`` block in the content (an empty one for every template);
    with a reasoning layout, earlier turns' reasoning and reasoning written as ``<think>``
    blocks in the content (split by training, ``as_read``); with a tool layout, tools (wrapped
    and bare, with and without a system message), parallel calls, joined results and a call
    after results. ``layout_differences`` also checks the prompts with ``enable_thinking``
    false for a reasoning layout."""
    probes = [(Conversation(tuple(p)), Message("assistant", "Sure.")) for p in PROBES]
    if template is None:
        return probes
    think = template.reasoning is not None

    def said(content, calls=(), reasoning=None):
        return Message("assistant", content, tuple(calls), reasoning if think else None)

    # reasoning as users also write it: a leading <think> block of the content, split as
    # training splits it (formats.split_reasoning: newlines and leading spaces removed)
    probes.append((Conversation((Message("user", "Hi"),
                                 Message("assistant", "<think>\n</think>\n\nHello!"),
                                 Message("user", "Count to 3"))), Message("assistant", "1 2 3")))
    if think:
        probes.append((Conversation((Message("user", "2 plus 2?"),
                                     said("4", (), "\nAdd them.\n"),
                                     Message("user", "And 3 plus 3?"))),
                       said("6", (), "Same again:\n3 + 3.")))
        probes.append((Conversation((Message("user", "Hi"),
                                     said("<think>Greet back.</think>Hello!"),
                                     Message("user", "Count to 3"))),
                       said(" \n<think>\nCount.\n</think>\n\n\n1 2 3")))
        probes.append((Conversation((Message("user", "Hi"),
                                     said("<think>Greet.</think>\nHello!", (), "Greet."),
                                     Message("user", "Count to 2"))), said("\n1 2")))
    if template.tools is not None:
        calls = (ToolCall("get_weather", {"city": "Paris"}, "call_1"),
                 ToolCall("get_weather", {"city": "Zürich"}, "call_2"))
        asked = (Message("user", "Weather in Paris and Zürich?"),
                 said("", calls, "Two cities, two calls."),
                 Message("tool", '{"temp": 22}', tool_call_id="call_1"),
                 Message("tool", '{"temp": 18}', tool_call_id="call_2"))
        answer = said("Paris 22°C, Zürich 18°C.", (), "Both results are in.")
        later = said("Let me check.", (ToolCall("get_weather", {"city": "Paris", "day": 1},
                                                None, '{"city":"Paris", "day":1}'),),
                     "One more call.")  # arguments as a JSON string (OpenAI's API): verbatim
        probes.append((Conversation(asked, PROBE_TOOLS), answer))
        bare = tuple(tool["function"] for tool in PROBE_TOOLS)  # wrapped as training wraps them
        probes.append((Conversation(asked, bare), answer))
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

    def __call__(self, conversation, add_generation_prompt: bool,
                 enable_thinking: bool = True) -> List[int]:
        conversation = as_conversation(conversation)
        if self.template is None:
            hf = self.tokenizer.hf
            if add_generation_prompt:
                return render_prompt_with_chat_template(conversation, hf)
            ids = render_with_chat_template(conversation, hf, self.options)[-1].input_ids.tolist()
            return ids[:-1] if _appended_stop(hf, conversation) else ids
        encode = self.tokenizer.encode
        conversation = as_read(conversation)
        if add_generation_prompt:
            return render_prompt(conversation, self.template, encode, self.options,
                                 enable_thinking)
        # the whole conversation: its last sample (the only one unless --reasoning per-turn)
        samples = render_conversation(conversation, self.template, encode, self.options)
        return samples[-1].input_ids.tolist()


TrainingIds = Callable[..., List[int]]


def as_read(conversation: Conversation) -> Conversation:
    """The conversation as training and ``tools/chat.py`` read the messages a user passes to
    ``apply_chat_template`` (``hf_messages``): each through ``formats.message_from_dict`` (a
    leading ``<think>`` block of the content split off, ...), the tools through
    ``formats.parse_tools`` (bare functions wrapped); each message keeps its ``train``.
    Raises ``RecordError``."""
    dicts = hf_messages(conversation.messages)
    read = [message_from_dict(d, f"messages[{i}]") for i, d in enumerate(dicts)]
    messages = tuple(replace(m, train=o.train) for m, o in zip(read, conversation.messages)
                     if m is not None)
    return replace(conversation, messages=messages,
                   tools=parse_tools(list(conversation.tools) or None))


def training_layout(template: Optional[ResolvedTemplate], tokenizer,
                    options: Optional[RenderOptions] = None) -> TrainingLayout:
    """The ``TrainingLayout`` of a run (``options``: its ``--train-on`` / ``--reasoning``)."""
    return TrainingLayout(template, tokenizer, options or RenderOptions())


def chat_template_ids(hf_tokenizer, conversation, add_generation_prompt: bool,
                      **template_kwargs) -> List[int]:
    """``hf_tokenizer.apply_chat_template(messages, tools=..., add_generation_prompt=...)``'s
    ids, called as users call it (``tools`` only when the conversation has some; transformers 5
    returns a dict, 4 a list; ``template_kwargs`` such as ``enable_thinking`` passed on).
    ``conversation``: a ``Conversation`` or messages."""
    conversation = as_conversation(conversation)
    extra = {"tools": list(conversation.tools)} if conversation.tools else {}
    out = hf_tokenizer.apply_chat_template(hf_messages(conversation.messages,
                                                       _reasoning_form(hf_tokenizer)),
                                           add_generation_prompt=add_generation_prompt, **extra,
                                           **template_kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _appended_stop(hf_tokenizer, conversation: Conversation) -> bool:
    """Whether training appended a stop tag after the conversation's last reply, which the
    chat template does not write (a template that ends replies with the next message's tag,
    GLM's: the last reply gets the tag a next user message opens with)."""
    from mt_dialog.data.render_hf import chat_template_info

    info = chat_template_info(hf_tokenizer)
    return info.follows and bool(conversation.messages) \
        and conversation.messages[-1].role == "assistant"


def _reasoning_form(hf_tokenizer) -> str:
    """Where the tokenizer's chat template reads reasoning (``render_hf.REASONING_FORMS``), as
    a user of that template passes it; "reasoning_content" when it cannot be probed."""
    from mt_dialog.data.render_hf import chat_template_info
    from mt_dialog.data.tokenizers import TokenizerError

    try:
        return chat_template_info(hf_tokenizer).reasoning_form
    except TokenizerError:
        return "reasoning_content"


def layout_differences(hf_tokenizer, training_ids: TrainingIds,
                       probes: Optional[Sequence[Probe]] = None) -> Optional[str]:
    """None when ``hf_tokenizer.apply_chat_template`` gives exactly ``training_ids`` (see
    ``training_layout``) on the probe conversations (``probes``, default the layout's own
    ``probes``: tools, tool calls and results, reasoning where its template lays them out),
    prompt and whole conversation (a system message included); else where the first difference
    is, with the two tokens."""
    if probes is None:
        probes = getattr(training_ids, "probes", probes_for(None))
    template = getattr(training_ids, "template", None)
    switch = template is not None and template.reasoning is not None  # Qwen3's enable_thinking
    for number, (probe, reply) in enumerate(probes):
        full = replace(probe, messages=probe.messages + (reply,))
        checks = [("prompt", probe, True, {}), ("conversation", full, False, {})]
        if switch:
            checks.append(("prompt, enable_thinking=False", probe, True,
                           {"enable_thinking": False}))
        for kind, messages, prompt, extra in checks:
            ours = list(training_ids(messages, prompt, **extra))
            theirs = chat_template_ids(hf_tokenizer, messages, prompt, **extra)
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
