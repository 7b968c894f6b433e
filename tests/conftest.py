"""Hermetic fixtures: a tiny SentencePiece model, a tiny Hugging Face tokenizer, the demo corpus
with its SentencePiece model, and base-model chat tokenizers, built here (nothing downloaded)."""

import io
import json
import os
import sys
from typing import Dict

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SAMPLE_TEXT = [
    "Hello! How are you today?", "I am fine, thank you. And you?",
    "What is the capital of France?", "The capital of France is Paris.",
    "Please write a short poem about the sea.", "Waves roll in, the gulls cry out, and the sea "
    "keeps its ancient secrets.", "Translate 'good morning' to Chinese.", "早上好",
    "Count from 1 to 10.", "1 2 3 4 5 6 7 8 9 10", "Thanks!", "You're welcome.",
    "我该如何学习编程？", "从基础开始，每天练习，并做一些小项目。", "Émile a écrit: « ça va? »",
]


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
    """A 400-piece BPE SentencePiece model with byte fallback (any text round-trips exactly) and
    the ChatML control tokens; Llama 3 tokens are absent, so templates must append them."""
    import sentencepiece

    path = tmp_path_factory.mktemp("sp") / "tiny.model"
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SAMPLE_TEXT * 20), model_writer=model, vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        control_symbols=["<|im_start|>", "<|im_end|>"], bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2,
    )
    path.write_bytes(model.getvalue())
    return str(path)


CHATML_JINJA = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def hf_tokenizer_dir(tmp_path_factory) -> str:
    """A tiny byte-level BPE Hugging Face tokenizer folder with a ChatML Jinja template."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SAMPLE_TEXT * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML_JINJA
    path = tmp_path_factory.mktemp("hf") / "tok"
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory) -> Dict[str, str]:
    """The demo corpus (300 conversations) and a SentencePiece tokenizer trained on it."""
    from mt_dialog import demo

    folder = tmp_path_factory.mktemp("demo")
    corpus, model = str(folder / "corpus.jsonl"), str(folder / "tokenizer.model")
    demo.write_corpus(corpus, 300, seed=0)
    demo.train_tokenizer(corpus, model)
    return {"dir": str(folder), "corpus": corpus, "tokenizer": model}


# base-model chat tokenizers with realistic templates (--template hf), shared by tests/data and
# tests/convert
from tests.data.chat_tokenizers import hf_base_chatml_dir, hf_llama3_dir  # noqa: E402,F401


def write_jsonl(path, records) -> str:
    """Write records (dicts, or raw strings written as-is) one per line; returns the path."""
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(record if isinstance(record, str) else json.dumps(record, ensure_ascii=False))
            handle.write("\n")
    return str(path)


def openai(*turns, system=None) -> dict:
    """An OpenAI-format record from (user, assistant) pairs."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def preprocess_args(inputs, sp_model_path, prefix, *extra) -> list:
    """Command-line arguments of tools/preprocess_dialog.py for a small test run."""
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    return ["--input", *inputs, "--tokenizer-model", sp_model_path, "--template", "chatml",
            "--seq-length", "256", "--output-prefix", str(prefix), "--no-progress", *extra]
