"""Configuration of the offline preprocessing run (``tools/preprocess_dialog.py``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from mt_dialog.config_utils import check_choice, option
from mt_dialog.data.formats import DEFAULT_TEXT_KEY, EMPTY_REPLY, FORMATS
from mt_dialog.data.packing import ALGORITHMS
from mt_dialog.data.render import REASONING_MODES, TRAIN_ON, RenderOptions
from mt_dialog.data.templates import HF_TEMPLATE, template_names

TOKENIZER_TYPES = ("sentencepiece", "huggingface")
OVERLONG = ("error", "drop", "truncate", "split")
ON_ERROR = ("raise", "skip")


@dataclass
class InputConfig:
    """Where conversations come from and how they are read."""

    input: List[str] = option(help="JSONL files, JSON-array files, Parquet files (.parquet), "
                              "folders or globs to read", metavar="PATH")
    valid_input: List[str] = option([], help="separate validation inputs (then --split is not "
                                    "used)", metavar="PATH")
    input_format: str = option("auto", choices=("auto",) + FORMATS,
                               help="record format; auto detects it per record from its keys "
                               "(text: a record with --text-key and no conversation keys)")
    text_key: str = option(DEFAULT_TEXT_KEY, help="the field holding a plain-text document "
                           "(format text: continued pretraining, every token trained)")
    on_error: str = option("raise", choices=ON_ERROR,
                           help="bad record: raise stops with file:line and the fix; skip counts "
                           "it by reason in the summary")
    empty_reply: str = option("context", choices=EMPTY_REPLY,
                              help="an empty assistant reply (no content, no tool calls) is never "
                              "trained: context keeps the record with that reply as untrained "
                              "context and its other replies trained as usual (counted in the "
                              "summary); error refuses the record (reason empty_reply)")

    def __post_init__(self) -> None:
        if not self.input:
            raise ValueError("input: at least one --input path is needed")
        check_choice("input_format", self.input_format, ("auto",) + FORMATS)
        check_choice("on_error", self.on_error, ON_ERROR)
        check_choice("empty_reply", self.empty_reply, EMPTY_REPLY)
        if not self.text_key:
            raise ValueError("text_key: must be a field name, got ''")


@dataclass
class TokenizerConfig:
    """Which tokenizer and chat template render conversations into tokens."""

    tokenizer_type: Optional[str] = option(None, choices=TOKENIZER_TYPES,
                                           help="tokenizer back-end (default: huggingface with "
                                           "--tokenizer-path, else sentencepiece)")
    tokenizer_model: Optional[str] = option(None, help="SentencePiece .model file "
                                            "(--tokenizer-type sentencepiece)")
    tokenizer_path: Optional[str] = option(None, help="Hugging Face tokenizer folder "
                                           "(--tokenizer-type huggingface)")
    template: str = option("chatml", choices=template_names(),
                           help="chat template; 'hf' uses the Hugging Face tokenizer's own Jinja "
                           "chat template")
    train_on: str = option("all", choices=TRAIN_ON,
                           help="assistant replies trained: all, or only each conversation's "
                           "last one (a message's own weight / loss field overrides both)")
    reasoning: str = option("template", choices=REASONING_MODES,
                            help="reasoning in multi-turn data: template (the template's own "
                            "history: qwen3 leaves out earlier turns' reasoning), keep (every "
                            "turn's), per-turn (one sample per user turn with reasoning, each "
                            "trained in the view the model has at inference)")
    template_timeout: float = option(10.0, help="seconds one conversation may take to render "
                                     "(and the chat template's probe): a template whose loops "
                                     "never end is stopped there (template_timeout: an error, or "
                                     "a counted skip with --on-error skip)")

    def __post_init__(self) -> None:
        if not self.template_timeout > 0:
            raise ValueError(f"template_timeout: must be > 0 seconds, got {self.template_timeout}")
        if self.tokenizer_type is None:
            self.tokenizer_type = ("huggingface" if self.tokenizer_path and not self.tokenizer_model
                                   else "sentencepiece")
        check_choice("tokenizer_type", self.tokenizer_type, TOKENIZER_TYPES)
        if self.tokenizer_type == "sentencepiece" and not self.tokenizer_model:
            raise ValueError("tokenizer_model: --tokenizer-model PATH.model is needed with "
                             "--tokenizer-type sentencepiece")
        if self.tokenizer_type == "huggingface" and not self.tokenizer_path:
            raise ValueError("tokenizer_path: --tokenizer-path DIR is needed with "
                             "--tokenizer-type huggingface")
        check_choice("template", self.template, template_names())
        if self.template == HF_TEMPLATE and self.tokenizer_type != "huggingface":
            raise ValueError("template: 'hf' needs --tokenizer-type huggingface")
        RenderOptions(self.train_on, self.reasoning)  # ValueError naming a wrong value

    @property
    def tokenizer_location(self) -> str:
        if self.tokenizer_type == "sentencepiece":
            return self.tokenizer_model
        return self.tokenizer_path


@dataclass
class PackingConfig:
    """How rendered conversations become fixed-length packs and splits."""

    seq_length: int = option(4096, help="tokens per pack (the training --seq-length)")
    packing: str = option("bfd", choices=ALGORITHMS,
                          help="bfd best-fit decreasing, ffd first-fit decreasing, sequential "
                          "(keeps order), none (one conversation per pack, padded)")
    overlong: Optional[str] = option(None, choices=OVERLONG,
                                     help="a record longer than --seq-length: error stops, drop "
                                     "skips it, truncate keeps the longest prefix of whole turns "
                                     "that fits (of a text document: its first --seq-length "
                                     "tokens), split cuts a text document into pieces of at most "
                                     "--seq-length tokens, each packed alone (default: split for "
                                     "text documents, error for conversations)")
    split: Optional[str] = option(None, help="train,valid percentages of the conversations "
                                  "(default 98,2; not used with --valid-input)")
    seed: int = option(1234, help="seed of the split and of the pack shuffle")
    shuffle: bool = option(True, help="shuffle the order of packs")

    def __post_init__(self) -> None:
        if self.seq_length < 2:
            raise ValueError(f"seq_length: must be at least 2, got {self.seq_length}")
        check_choice("packing", self.packing, ALGORITHMS)
        if self.overlong is not None:
            check_choice("overlong", self.overlong, OVERLONG)
        if self.split is not None:
            self.split_fractions()

    def split_fractions(self) -> Tuple[float, float]:
        """(train, valid) fractions of ``split``, default 98,2."""
        text = self.split or "98,2"
        try:
            parts = [float(p) for p in text.split(",")]
        except ValueError:
            parts = []
        if len(parts) != 2 or min(parts) < 0 or sum(parts) <= 0:
            raise ValueError(f"split: {text!r} must be two non-negative numbers like 98,2")
        return parts[0] / sum(parts), parts[1] / sum(parts)


@dataclass
class OutputConfig:
    """Where the packed dataset goes and how the run behaves."""

    output_prefix: str = option(help="prefix of the output files (PREFIX.meta.json, "
                                "PREFIX.train.tokens.bin, ...)", metavar="PREFIX")
    overwrite: bool = option(False, help="replace an existing dataset at --output-prefix")
    workers: int = option(1, help="processes that render and tokenize (1: the main process "
                          "does it; more: worker processes, the main one reads and packs)")
    progress: bool = option(True, help="show a progress bar")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers: must be at least 1, got {self.workers}")
        if not self.output_prefix or self.output_prefix.endswith(("/", ".bin", ".idx")):
            raise ValueError(f"output_prefix: {self.output_prefix!r} must be a file prefix such "
                             "as data/chat (files data/chat.train.tokens.bin, ... are written)")


@dataclass
class PreprocessConfig:
    """Everything one preprocessing run needs."""

    inputs: InputConfig
    tokenizer: TokenizerConfig
    packing: PackingConfig
    output: OutputConfig

    def __post_init__(self) -> None:
        if self.inputs.valid_input and self.packing.split is not None:
            raise ValueError("split: --split and --valid-input exclude each other; the "
                             "validation split comes from one of them")
