"""Built-in chat templates, as data.

A template is a list of *pieces* per role. A piece is either text (``"{content}"`` is replaced by the
message) or a special token (``Special("<|im_end|>")``, ``BOS``, ``EOS``) inserted **by id**, never as
text the tokenizer could split. Each assistant turn is::

    assistant_open  |  reply content  end_of_turn  |  assistant_close
    (not trained)   |  (trained: loss_mask = 1)     |  (not trained)

so the end-of-turn token is trained (without it the model never learns to stop). Example, ``chatml``::

    <|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{u}<|im_end|>\\n<|im_start|>assistant\\n
    {reply}<|im_end|>        <- trained
    \\n

The reply is one text: the reasoning (``ReasoningLayout``, where the template has one and keeps
it), the content, then the tool calls (``ToolLayout``), e.g. for ``qwen3``::

    <think>\\n{reasoning}\\n</think>\\n\\n{content}\\n<tool_call>\\n{"name": ..., "arguments": ...}
    \\n</tool_call>

(Qwen3 writes the block for a message that has reasoning, and an empty one for the final reply
of a conversation without reasoning, as its documented template does.)

Tool results are never trained; the tools offered are described in the system block. The layouts
are written from the model families' documented prompt formats (Hermes / Qwen2.5 function
calling, Llama 3.1 JSON tool calling, Qwen3 thinking mode); templates without a layout for tools
or reasoning refuse records that have them (``template_no_tools``, ``template_no_reasoning``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Tuple, Union


@dataclass(frozen=True)
class Special:
    """A special token, looked up by piece in the vocabulary (appended if missing)."""

    piece: str


BOS = Special("<bos>")  # the tokenizer's own beginning-of-sequence id
EOS = Special("<eos>")  # the tokenizer's own end-of-sequence id

Piece = Union[str, Special]
Pieces = Tuple[Piece, ...]
Wrap = Tuple[str, str]
"""Text written before and after a value."""


@dataclass(frozen=True)
class ToolLayout:
    """Where a template puts the tools offered, the calls in a reply and the tools' results."""

    tools: Wrap
    """Around the tool descriptions; the whole text is added to the system message (after its
    text and a blank line, or alone when there is none)."""
    tool_separator: str
    """Between two tool descriptions (each one ``json.dumps(tool, ensure_ascii=False)``)."""
    tool_indent: Optional[int]
    """JSON indent of a tool description (None: one line)."""
    call: Wrap
    """Around one call, the JSON object ``{"name": ..., <arguments_key>: ...}``. A reply's calls
    follow its content, each on a new line."""
    arguments_key: str
    """"arguments" (Hermes / Qwen) or "parameters" (Llama 3.1)."""
    result: Wrap
    """Around one tool result."""
    results: Pieces
    """Pieces of a tool turn; ``{content}`` is its results, each wrapped in ``result``."""
    join_results: bool
    """Consecutive results share one tool turn (Hermes) or get one turn each (Llama 3.1)."""


@dataclass(frozen=True)
class ReasoningLayout:
    """Where a template puts an assistant message's reasoning."""

    wrap: Wrap
    """Around the reasoning, before the content (inside the trained reply)."""
    drops_earlier: bool
    """The template's own history: reasoning of assistant messages before the last user message
    is left out (Qwen3's documented multi-turn behaviour), the rest is kept."""
    empty_final: bool = False
    """Qwen3's documented layout: the conversation's final message (an assistant message after
    the last user message) is written with the block even without reasoning, an empty one
    (``<think>\\n\\n</think>\\n\\n``); other messages only with reasoning. A generation prompt
    with ``enable_thinking`` false ends with that empty block."""


@dataclass(frozen=True)
class ChatTemplate:
    """How one conversation is laid out in tokens."""

    name: str
    description: str
    prefix: Pieces
    """Pieces at the very start of a conversation (e.g. BOS)."""
    system: Pieces
    """Pieces of a system message; ``{content}`` is the message."""
    user: Pieces
    """Pieces of a user message."""
    assistant_open: Pieces
    """Untrained pieces before a reply (this is also the generation prompt)."""
    end_of_turn: Special
    """Trained special token closing every reply."""
    assistant_close: Pieces = ()
    """Untrained pieces after the end-of-turn token."""
    default_system: Optional[str] = None
    """System text used when a conversation has none (None: no system block)."""
    first_user_with_system: Optional[Pieces] = None
    """If set, the system message is folded into the first user message (Llama 2)."""
    tools: Optional[ToolLayout] = None
    """The tool layout; None: records with tools, tool calls or tool results are refused."""
    reasoning: Optional[ReasoningLayout] = None
    """The reasoning layout; None: records with reasoning are refused."""
    extra: Dict[str, str] = field(default_factory=dict)


TEMPLATES: Dict[str, ChatTemplate] = {}


def _register(template: ChatTemplate) -> None:
    TEMPLATES[template.name] = template


_register(
    ChatTemplate(
        name="firefly",
        description="<s>input</s>target</s>input</s>target</s>... (Firefly)",
        prefix=(BOS,),
        system=("{content}", EOS),
        user=("{content}", EOS),
        assistant_open=(),
        end_of_turn=EOS,
    )
)
HERMES_TOOLS = ToolLayout(
    # Hermes function calling as Qwen2.5 / Qwen3 document it: the signatures in <tools></tools>
    # with the instructions, calls in <tool_call></tool_call>, results as user turns
    tools=("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
           "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n",
           "\n</tools>\n\nFor each function call, return a json object with function name and "
           "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
           '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'),
    tool_separator="\n",
    tool_indent=None,
    call=("<tool_call>\n", "\n</tool_call>"),
    arguments_key="arguments",
    result=("\n<tool_response>\n", "\n</tool_response>"),
    results=(Special("<|im_start|>"), "user{content}", Special("<|im_end|>"), "\n"),
    join_results=True,
)
_CHATML = ChatTemplate(
    name="chatml",
    description="<|im_start|>role\\n...<|im_end|> (Qwen2.5, OpenAI ChatML; Hermes tool calls)",
    prefix=(),
    system=(Special("<|im_start|>"), "system\n{content}", Special("<|im_end|>"), "\n"),
    user=(Special("<|im_start|>"), "user\n{content}", Special("<|im_end|>"), "\n"),
    assistant_open=(Special("<|im_start|>"), "assistant\n"),
    end_of_turn=Special("<|im_end|>"),
    assistant_close=("\n",),
    tools=HERMES_TOOLS,
)
_register(_CHATML)
_register(
    replace(
        _CHATML,
        name="qwen3",
        description="ChatML + <think>\\n...\\n</think>\\n\\n before the reply (empty before the "
        "final reply without reasoning); earlier turns' reasoning left out of the history (Qwen3)",
        reasoning=ReasoningLayout(wrap=("<think>\n", "\n</think>\n\n"), drops_earlier=True,
                                  empty_final=True),
    )
)
_register(
    ChatTemplate(
        name="llama2",
        description="<s>[INST] <<SYS>>...<</SYS>> user [/INST] reply </s> (Llama 2 chat)",
        prefix=(),
        system=(),
        user=(BOS, "[INST] {content} [/INST]"),
        first_user_with_system=(BOS, "[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{content} [/INST]"),
        assistant_open=(),
        end_of_turn=EOS,
    )
)
_register(
    ChatTemplate(
        name="llama3",
        description="<|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|> (Llama 3)",
        prefix=(Special("<|begin_of_text|>"),),
        system=(
            Special("<|start_header_id|>"), "system", Special("<|end_header_id|>"),
            "\n\n{content}", Special("<|eot_id|>"),
        ),
        user=(
            Special("<|start_header_id|>"), "user", Special("<|end_header_id|>"),
            "\n\n{content}", Special("<|eot_id|>"),
        ),
        assistant_open=(Special("<|start_header_id|>"), "assistant", Special("<|end_header_id|>"), "\n\n"),
        end_of_turn=Special("<|eot_id|>"),
        tools=ToolLayout(
            # Llama 3.1 JSON tool calling: the functions as indented JSON in the system message,
            # a call as {"name": ..., "parameters": ...}, each result in an ipython turn
            tools=("You have access to the following functions. To call a function, respond "
                   'with a JSON object of the form {"name": function name, "parameters": '
                   "dictionary of argument name and its value}. Do not use variables.\n\n", ""),
            tool_separator="\n\n",
            tool_indent=4,
            call=("", ""),
            arguments_key="parameters",
            result=("", ""),
            results=(Special("<|start_header_id|>"), "ipython", Special("<|end_header_id|>"),
                     "\n\n{content}", Special("<|eot_id|>")),
            join_results=False,
        ),
    )
)
_register(
    ChatTemplate(
        name="alpaca",
        description="### Instruction: / ### Response: (Alpaca)",
        prefix=(BOS,),
        system=("{content}\n\n",),
        user=("### Instruction:\n{content}\n\n",),
        assistant_open=("### Response:\n",),
        end_of_turn=EOS,
        assistant_close=("\n\n",),
        default_system=(
            "Below is an instruction that describes a task. "
            "Write a response that appropriately completes the request."
        ),
    )
)
_register(
    ChatTemplate(
        name="plain",
        description="system preamble, then User: ... Assistant: ...</s>",
        prefix=(BOS,),
        system=("{content}\n\n",),
        user=("User: {content}\n",),
        assistant_open=("Assistant:",),
        end_of_turn=EOS,
        assistant_close=("\n",),
        default_system="A conversation between a user and a helpful assistant.",
    )
)

HF_TEMPLATE = "hf"
"""``--template hf``: the Hugging Face tokenizer's own Jinja chat template (see render.py)."""


def template_names() -> Tuple[str, ...]:
    return tuple(TEMPLATES) + (HF_TEMPLATE,)


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(
            f"--template {name!r} is unknown; choose one of {', '.join(template_names())}"
        )
    return TEMPLATES[name]
