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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple, Union


@dataclass(frozen=True)
class Special:
    """A special token, looked up by piece in the vocabulary (appended if missing)."""

    piece: str


BOS = Special("<bos>")  # the tokenizer's own beginning-of-sequence id
EOS = Special("<eos>")  # the tokenizer's own end-of-sequence id

Piece = Union[str, Special]
Pieces = Tuple[Piece, ...]


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
_register(
    ChatTemplate(
        name="chatml",
        description="<|im_start|>role\\n...<|im_end|> (Qwen, OpenAI ChatML)",
        prefix=(),
        system=(Special("<|im_start|>"), "system\n{content}", Special("<|im_end|>"), "\n"),
        user=(Special("<|im_start|>"), "user\n{content}", Special("<|im_end|>"), "\n"),
        assistant_open=(Special("<|im_start|>"), "assistant\n"),
        end_of_turn=Special("<|im_end|>"),
        assistant_close=("\n",),
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
