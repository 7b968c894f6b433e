"""Generate assistant replies from a trained checkpoint, in one process (TP=1, PP=1).

    from mt_dialog.generate import Generator

    generator = Generator.from_checkpoint("ckpt")            # a folder written by --save
    generator.reply([{"role": "user", "content": "What is 3 plus 4?"}])              # greedy
    generator.reply(messages, greedy=False, top_p=0.9, temperature=0.8, seed=1)      # sampling

How it works:

* The run is loaded by ``mt_dialog.training.saved_run``: its record (``CKPT/config.json``, or for
  a run stopped after an intermediate save ``iter_*/mt_dialog_config.json`` plus the dataset
  metadata), its tokenizer, the chat template recorded in the metadata of the dataset it trained
  on (pass ``template=`` when that dataset is gone), and its GPTModel with every parallel size 1,
  into which megatron-core ``dist_checkpointing`` reshards a checkpoint saved at any TP/PP
  layout. The embedding has exactly the checkpoint's (padded) rows; logits beyond the
  tokenizer's vocabulary are never chosen.
* The prompt is ``render_prompt(messages, template, tokenizer.encode)``: the conversation laid out
  as in training, ending with the reply opener. Each new token re-runs the full causal forward
  over the unpadded sequence (no KV cache, no packed params: one sequence is one segment, and
  RoPE positions start at 0 as they do for every conversation in training).
* Decoding stops at the template's end-of-turn id or the tokenizer's eos (returned as the last
  generated id; the stops of the exported ``generation_config.json``), at ``max_new_tokens``,
  or when the sequence reaches the training sequence length.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from mt_dialog.data.formats import Message, ToolCall

MessageLike = Union[Message, Dict[str, str]]
FINISH_REASONS = ("end_of_turn", "eos", "max_new_tokens", "seq_length")


class GenerationError(ValueError):
    """A request cannot be served (messages, sampling settings, prompt length); the message says
    what to do. Loading a checkpoint raises ``saved_run.SavedRunError``."""


@dataclass
class GenerationResult:
    """One generated reply."""

    text: str  # the reply, without the end-of-turn token and without its reasoning block
    token_ids: List[int]  # generated ids; the last one is the end-of-turn id if it stopped there
    prompt_ids: List[int]
    finish_reason: str  # one of FINISH_REASONS
    reasoning: Optional[str] = None
    """The text of the reply's leading ``<think>...</think>`` block (newlines around it removed),
    for a template with a reasoning layout (harmony: the analysis channel); None when the reply
    has none (or it was cut off before ``</think>``: then ``text`` holds all of it)."""
    tool_calls: Tuple[ToolCall, ...] = ()
    """The reply's tool calls, for a harmony template (``<|channel|>commentary
    to=functions.NAME``; then ``text`` is the final channel's, often ""). Other templates' calls
    stay in ``text`` as the model wrote them."""


# -- sampling ----------------------------------------------------------------------------------

def next_token(logits: torch.Tensor, greedy: bool = True, temperature: float = 1.0,
               top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> int:
    """One id from a 1-D tensor of logits: argmax, or nucleus (top-p) sampling at
    ``temperature`` (the smallest set of most likely ids whose probability reaches ``top_p``)."""
    logits = logits.float()
    if greedy or temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely ids
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first is always kept
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p: must be in (0, 1], got {top_p}")


def to_messages(messages: Sequence[MessageLike]) -> List[Message]:
    """Messages from ``Message`` objects or OpenAI / Hugging Face message dicts (``{"role",
    "content"}``, ``tool_calls``, ...), checked by the training data's role rules
    (``formats.validate_prompt``: ending with a user message or a tool result to reply to).
    A null system message is left out. Raises ``GenerationError`` naming the message."""
    from mt_dialog.data.formats import RecordError, message_from_dict, validate_prompt

    out, names = [], []
    try:
        for index, message in enumerate(messages):
            name = f"messages[{index}]"
            if not isinstance(message, Message):
                message = message_from_dict(message, name)
            if message is not None:
                out.append(message)
                names.append(name)
        validate_prompt(out, names)
    except RecordError as exc:
        raise GenerationError(exc.message) from None
    return out


# -- the generator -----------------------------------------------------------------------------

class Generator:
    """A trained model, its tokenizer and chat template, ready to reply."""

    def __init__(self, model: torch.nn.Module, tokenizer, template, end_of_turn: int,
                 vocab_size: int, seq_length: int, template_name: str = "",
                 iteration: Optional[int] = None, seed: int = 1234, options=None,
                 stops: Sequence[int] = ()) -> None:
        from mt_dialog.data.render import RenderOptions

        self.model = model
        self.options = options or RenderOptions()  # the run's --train-on / --reasoning
        self.seed = seed
        self.tokenizer = tokenizer
        self.template = template  # ResolvedTemplate, or None for the tokenizer's own ("hf")
        self.template_name = template_name
        self.end_of_turn = int(end_of_turn)
        # every id a trained reply ends with: the end-of-turn, and for a template that ends
        # replies with the next message's tag (GLM) each such tag
        self.stops = frozenset([self.end_of_turn, *(int(i) for i in stops)])
        self.vocab_size = int(vocab_size)  # real ids; the padded logits beyond are never chosen
        self.seq_length = int(seq_length)
        self.iteration = iteration
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str, iteration: Optional[int] = None,
                        tokenizer_path: Optional[str] = None, template: Optional[str] = None,
                        seed: int = 1234) -> "Generator":
        """Load the newest (or ``iteration``) checkpoint under ``path`` (a ``--save`` folder, any
        TP/PP layout) into this process (``saved_run``). ``tokenizer_path``/``template``
        override what the run recorded (moved files).

        Raises:
            SavedRunError: a folder, record, tokenizer (``TokenizerMissing``), template or
                weights that cannot be used; the chat template is recorded nowhere readable.
        """
        from mt_dialog.training import saved_run

        info = saved_run.read_run_info(path, iteration)
        data = info["data"]
        tokenizer = saved_run.run_tokenizer(path, data, tokenizer_path)
        name = template or saved_run.dataset_template(data)
        if name is None:
            raise saved_run.SavedRunError(
                f"the chat template is recorded in the dataset metadata of {data.get('prefixes')}, "
                "which cannot be read; pass it (--template / template=)")
        resolved, end_of_turn = saved_run.run_template(name, tokenizer, data["special_ids"])
        stops = saved_run.run_stops(name, tokenizer, data["special_ids"])
        model = saved_run.load_inference_model(path, info, seed)
        return cls(model, tokenizer, resolved, end_of_turn, int(data["vocab_size"]),
                   int(data["seq_length"]), name, info["iteration"], seed,
                   saved_run.run_render_options(data), stops)

    # -- prompt ------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[MessageLike], tools: Optional[Sequence] = None,
                   enable_thinking: bool = True) -> List[int]:
        """The generation prompt, exactly as conversations were laid out in training.

        Args:
            messages: ``Message`` objects or OpenAI / Hugging Face message dicts, ending with a
                user message or tool results.
            tools: the functions offered to the assistant, as a record's ``tools`` (a list of
                ``{"type": "function", "function": {"name", "description", "parameters"}}`` or
                bare function objects); a model trained on tool calls saw them in its prompt.
            enable_thinking: False (Qwen3's switch) ends the prompt with an empty reasoning block
                so that the reply has no reasoning; needs a template with a reasoning layout.

        Raises ``GenerationError`` (bad messages or tools, a template that cannot lay them out).
        """
        from mt_dialog.data.formats import Conversation, RecordError, parse_tools
        from mt_dialog.data.render import render_prompt
        from mt_dialog.data.render_hf import render_prompt_with_chat_template

        checked = to_messages(messages)
        if not enable_thinking and not self.has_reasoning_layout():
            raise GenerationError(f"the chat template {self.template_name!r} has no reasoning "
                                  "layout, so thinking cannot be switched off (--no-thinking, "
                                  "enable_thinking=False): the model was not trained to think")
        try:
            conversation = Conversation(tuple(checked), parse_tools(tools))
            if self.template is None:  # the tokenizer's own Jinja template
                return render_prompt_with_chat_template(conversation, self.tokenizer.hf,
                                                        enable_thinking)
            return render_prompt(conversation, self.template, self.tokenizer.encode,
                                 self.options, enable_thinking)
        except RecordError as exc:
            raise GenerationError(exc.message) from None

    def has_reasoning_layout(self) -> bool:
        """Whether the chat template lays out reasoning (``<think>`` blocks) in replies."""
        if self.template is not None:
            return self.template.reasoning is not None
        from mt_dialog.data.render_hf import chat_template_info

        return "reasoning" in chat_template_info(self.tokenizer.hf).renders

    def is_harmony(self) -> bool:
        """Whether replies are written in OpenAI's harmony format (gpt-oss: ``--template hf``
        with a tokenizer whose chat template writes harmony's special tokens)."""
        from mt_dialog.harmony import is_harmony

        return self.template is None and is_harmony(self.tokenizer.hf)

    # -- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits of the token after ``ids`` (token ids, the prompt and what was generated):
        one causal forward over the whole sequence, RoPE positions from 0. Returns a 1-D tensor
        of ``vocab_size`` logits (the model's dtype: fp32, or bf16/fp16 for a run trained so)
        on the model's device; the padded rows beyond the vocabulary are left out."""
        from megatron.core import parallel_state as ps

        from mt_dialog.training import distributed

        if not ps.model_parallel_is_initialized():  # after distributed.destroy_single_process()
            distributed.initialize_single_process(self.seed)
        tokens = torch.tensor([list(ids)], dtype=torch.int64, device=self.device)
        positions = torch.arange(tokens.shape[1], device=self.device)[None, :]
        with warnings.catch_warnings():  # megatron-core: "tp_group is None" on every linear
            warnings.simplefilter("ignore", DeprecationWarning)
            logits = self.model(tokens, positions, None)  # [1, s, padded vocab]
        return logits[0, -1, : self.vocab_size]

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                     greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                     seed: Optional[int] = None):
        """``(generated ids, finish_reason)``; the ids end with the end-of-turn (or eos) id when
        it was produced: decoding stops at both, as ``transformers`` does with the exported
        ``generation_config.json``. Sampling with the same ``seed`` gives the same reply."""
        _check_sampling(max_new_tokens, temperature, top_p)
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise GenerationError("the prompt is empty")
        if len(ids) >= self.seq_length:
            raise GenerationError(f"the prompt has {len(ids)} tokens; the model was trained on "
                                  f"sequences of {self.seq_length}: shorten the conversation")
        rng = None
        if not greedy:
            rng = torch.Generator()
            rng.manual_seed(int(seed) if seed is not None else torch.seed())
        new: List[int] = []
        while True:
            token = next_token(self.next_logits(ids), greedy, temperature, top_p, rng)
            new.append(token)
            ids.append(token)
            if token in self.stops:
                return new, "end_of_turn"
            if token == self.tokenizer.eos_id:  # as the export's generation_config stops
                return new, "eos"
            if len(new) >= max_new_tokens:
                return new, "max_new_tokens"
            if len(ids) >= self.seq_length:
                return new, "seq_length"

    def generate(self, messages: Sequence[MessageLike], max_new_tokens: int = 128,
                 greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None, tools: Optional[Sequence] = None,
                 enable_thinking: bool = True) -> GenerationResult:
        """The assistant's next reply to ``messages`` (ending with a user message or tool
        results); ``tools`` and ``enable_thinking`` as in ``prompt_ids``. With a reasoning
        layout the reply's leading ``<think>`` block is returned apart (``reasoning``), as a
        message's ``reasoning_content`` is given back to the next prompt. A harmony reply is
        split by channel (``mt_dialog.harmony.parse_reply``): analysis the reasoning, final the
        text, calls to ``functions.NAME`` the tool calls."""
        from mt_dialog.data.formats import RecordError, split_reasoning
        from mt_dialog.harmony import parse_reply

        prompt = self.prompt_ids(messages, tools, enable_thinking)
        new, reason = self.generate_ids(prompt, max_new_tokens, greedy, temperature, top_p, seed)
        text = self.tokenizer.decode(new[:-1] if reason in ("end_of_turn", "eos") else new)
        if self.is_harmony():
            split = parse_reply(text)
            return GenerationResult(split.content, new, prompt, reason, split.reasoning,
                                    split.tool_calls)
        reasoning = None
        if self.has_reasoning_layout():
            try:
                text, reasoning = split_reasoning(text, None, "the reply")
            except RecordError:  # cut off inside the reasoning: all of it stays in text
                pass
        return GenerationResult(text, new, prompt, reason, reasoning)

    def reply(self, messages: Sequence[MessageLike], max_new_tokens: int = 128,
              greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
              seed: Optional[int] = None, tools: Optional[Sequence] = None,
              enable_thinking: bool = True) -> str:
        """The text of the next reply, without its reasoning (see ``generate``)."""
        return self.generate(messages, max_new_tokens, greedy, temperature, top_p, seed, tools,
                             enable_thinking).text
