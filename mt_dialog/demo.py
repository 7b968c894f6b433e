"""A built-in demo corpus and tokenizer, so the pipeline runs with nothing downloaded.

Each conversation is 2-6 turns of small tasks a tiny model can learn, with replies of very
different lengths, some of which need an earlier turn (recall)::

    user: My name is Mia and my favourite colour is green.   assistant: Nice to meet you, Mia!
    user: What is 3 plus 4?                                  assistant: 7
    user: Count from 2 to 8.                                 assistant: 2 3 4 5 6 7 8
    user: What is my favourite colour?                       assistant: green

Run ``python -m mt_dialog.demo --output-dir DIR`` to write ``DIR/corpus.jsonl`` (OpenAI
``messages`` format) and ``DIR/tokenizer.model`` (SentencePiece, with the ChatML control tokens).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from typing import Dict, List

NAMES = ["Mia", "Leo", "Ava", "Noah", "Ivy", "Omar", "Zoe", "Ravi", "Lena", "Hugo", "Sara", "Tom"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
WORDS = ["apple", "river", "stone", "music", "garden", "planet", "window", "candle", "forest"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer briefly."]
CONTROL_SYMBOLS = ("<|im_start|>", "<|im_end|>")


def _introduce(rng: random.Random, facts: Dict[str, str]) -> List[str]:
    return [f"My name is {facts['name']} and my favourite colour is {facts['colour']}.",
            f"Nice to meet you, {facts['name']}!"]


def _turn(rng: random.Random, facts: Dict[str, str]) -> List[str]:
    kind = rng.choice(["add", "count", "name", "colour", "spell", "repeat", "thanks"])
    if kind == "add":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return [f"What is {a} plus {b}?", str(a + b)]
    if kind == "count":  # single digits: where to stop is learnable by a tiny model in minutes
        start = rng.randint(0, 5)
        stop = rng.randint(start + 2, 9)
        return [f"Count from {start} to {stop}.", " ".join(str(i) for i in range(start, stop + 1))]
    if kind == "name":
        return ["What is my name?", facts["name"]]
    if kind == "colour":
        return ["What is my favourite colour?", facts["colour"]]
    if kind == "spell":
        word = rng.choice(WORDS)
        return [f"Spell the word {word}.", " ".join(word)]
    if kind == "repeat":
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 10)))
        return [f"Repeat after me: {words}", words]
    return ["Thank you!", "You are welcome."]


def make_conversation(rng: random.Random) -> Dict:
    """One conversation in OpenAI ``messages`` format."""
    facts = {"name": rng.choice(NAMES), "colour": rng.choice(COLOURS)}
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEMS)})
    turns = [_introduce(rng, facts)] + [_turn(rng, facts) for _ in range(rng.randint(1, 5))]
    for user, reply in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def write_corpus(path: str, count: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps(make_conversation(rng)) + "\n")


def train_sentencepiece(sentences, model_path: str, vocab_size: int, **options) -> str:
    """Train a byte-fallback BPE SentencePiece model with the ChatML control symbols (bos 1,
    eos 2, unk 0, no pad; text kept as is) on ``sentences``; writes ``model_path``. ``options``
    go to the trainer as well (e.g. ``num_threads``)."""
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        control_symbols=list(CONTROL_SYMBOLS), bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        minloglevel=2, **options,
    )
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    with open(model_path, "wb") as handle:
        handle.write(model.getvalue())
    return model_path


def train_tokenizer(corpus_path: str, model_path: str, vocab_size: int = 400) -> None:
    """Train a small SentencePiece model on the text of a ``messages`` corpus."""
    texts = []
    with open(corpus_path, encoding="utf-8") as handle:
        for line in handle:
            texts += [m["content"] for m in json.loads(line)["messages"]]
    train_sentencepiece(texts, model_path, vocab_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write the demo corpus and tokenizer.")
    parser.add_argument("--output-dir", required=True, help="folder for corpus.jsonl and "
                        "tokenizer.model")
    parser.add_argument("--conversations", type=int, default=4000,
                        help="number of conversations (default: 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = parser.parse_args(argv)
    if args.conversations < 1:
        print("error: --conversations must be at least 1", file=sys.stderr)
        return 1
    os.makedirs(args.output_dir, exist_ok=True)
    corpus = os.path.join(args.output_dir, "corpus.jsonl")
    write_corpus(corpus, args.conversations, args.seed)
    train_tokenizer(corpus, os.path.join(args.output_dir, "tokenizer.model"))
    print(f"wrote {corpus} ({args.conversations} conversations) and "
          f"{os.path.join(args.output_dir, 'tokenizer.model')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
