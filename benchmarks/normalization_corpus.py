"""A seeded multi-turn corpus for the loss-normalization benchmark: short exact answers and
recalled facts next to long templated explanations.

Every conversation starts with the user's four facts and continues with 3-7 more turns::

    user: Hi! My name is Mia, my favourite colour is green, I live in Oslo and my lucky number
          is 37.
    assistant: Nice to meet you, Mia!                                          (8 tokens)
    user: Explain in 9 steps how to bake bread.
    assistant: Sure. Here is how to bake bread in 9 steps. Step 1: take the warm flour and
               fold it gently. Step 2: ... Step 9: ...                          (57-223 tokens)
    user: What is my lucky number?                assistant: 37                (2-3 tokens)
    user: What is 3 plus 4?                       assistant: 7                 (2-3 tokens)
    user: Count from 2 to 6.                      assistant: 2 3 4 5 6         (4-11 tokens)
    user: Tell me my facts.
    assistant: Your name is Mia, your favourite colour is green, you live in Oslo and your lucky
               number is 37.                                                     (23 tokens)

(Lengths in tokens of the 800-piece tokenizer below, end-of-turn included.)

Everything a reply says is learnable: an explanation is the first N steps (N from the prompt) of
its topic's fixed list of steps (each of 8 topics has 19 steps of 8-9 words, drawn once from the
seed); short answers are a fact from the first turn (recall across the turns between, long
explanations included) or a sum of two digits. Short replies carry the information (the facts
differ in every conversation), long ones carry most of the tokens: about 1 reply in 4 is an
explanation but about 9 reply tokens in 10 are. Kinds per conversation: 1 or 2 explanations (the
second with probability 0.35), 1-3 exact answers (recall or a sum), 0-2 medium replies
(counting, spelling, thanks, the facts), in a random order after the introduction.

``prepare(work_dir, n, seed)`` writes ``normalization_n{n}_seed{seed}.jsonl`` (OpenAI
``{"messages": [...]}``) and ``.model``, a SentencePiece tokenizer trained on it with
``mt_dialog.demo.train_tokenizer`` (byte fallback, ChatML control symbols); both are reused when
made with the same parameters.

    python benchmarks/normalization_corpus.py --conversations 6000 --output-dir /tmp/norm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import made_with, record_made_with  # noqa: E402

GENERATOR_VERSION = 1
VOCAB_SIZE = 800
MAX_STEPS = 19  # 19 steps: 223 tokens, inside the validation's 65-256 bucket
MIN_STEPS = 4  # 4 steps: 57-58 tokens (the 17-64 bucket)

NAMES = ["Mia", "Leo", "Ava", "Noah", "Ivy", "Omar", "Zoe", "Ravi", "Lena", "Hugo", "Sara", "Tom",
         "Nina", "Ben", "Yara", "Ken"]
COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey"]
CITIES = ["Oslo", "Lima", "Rome", "Paris", "Cairo", "Tokyo", "Delhi", "Quito", "Dakar", "Perth",
          "Bern", "Riga"]
SPELL_WORDS = ["apple", "river", "stone", "music", "garden", "planet", "window", "candle",
               "forest", "bridge"]
TOPICS = ["bake bread", "plant a tree", "wash a car", "paint a fence", "fix a bike", "make tea",
          "clean a room", "build a shelf"]
# the vocabulary of the explanation steps: "take the warm flour and fold it gently."
VERBS = ["take", "hold", "move", "check", "press", "turn", "lift", "place", "wipe", "mark",
         "cut", "fill", "open", "close", "shake", "pour"]
ADJECTIVES = ["warm", "clean", "small", "heavy", "dry", "fresh", "long", "flat", "soft", "old",
              "round", "bright"]
NOUNS = ["flour", "bowl", "brush", "handle", "board", "cloth", "lid", "frame", "wheel", "pot",
         "bucket", "screw", "rope", "tray", "leaf", "wire"]
ACTIONS = ["fold", "rinse", "turn", "set", "tap", "push", "spread", "wrap", "rest", "measure",
           "dry", "sort"]
MANNERS = ["gently", "slowly", "twice", "firmly", "carefully", "again", "quickly", "evenly"]


def step_tables(seed: int) -> Dict[str, List[str]]:
    """Each topic's fixed list of ``MAX_STEPS`` step sentences, drawn once from ``seed``."""
    rng = random.Random(f"steps-{seed}")
    return {topic: [f"{rng.choice(VERBS)} the {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)} and "
                    f"{rng.choice(ACTIONS)} it {rng.choice(MANNERS)}." for _ in range(MAX_STEPS)]
            for topic in TOPICS}


def _explanation(rng: random.Random, tables: Dict[str, List[str]]) -> Tuple[str, str]:
    topic = rng.choice(TOPICS)
    steps = rng.randint(MIN_STEPS, MAX_STEPS)
    body = " ".join(f"Step {k + 1}: {tables[topic][k]}" for k in range(steps))
    return (f"Explain in {steps} steps how to {topic}.",
            f"Sure. Here is how to {topic} in {steps} steps. {body}")


def _exact(rng: random.Random, facts: Dict[str, str]) -> Tuple[str, str]:
    kind = rng.choice(["name", "colour", "city", "number", "sum"])
    if kind == "sum":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"What is {a} plus {b}?", str(a + b)
    question = {"name": "What is my name?", "colour": "What is my favourite colour?",
                "city": "Which city do I live in?", "number": "What is my lucky number?"}[kind]
    return question, facts[kind]


def _medium(rng: random.Random, facts: Dict[str, str]) -> Tuple[str, str]:
    kind = rng.choice(["count", "spell", "thanks", "facts"])
    if kind == "count":
        start = rng.randint(0, 5)
        stop = rng.randint(start + 2, 9)
        return f"Count from {start} to {stop}.", " ".join(str(i) for i in range(start, stop + 1))
    if kind == "spell":
        word = rng.choice(SPELL_WORDS)
        return f"Spell the word {word}.", " ".join(word)
    if kind == "thanks":
        return "Thank you!", f"You are welcome, {facts['name']}."
    return "Tell me my facts.", (
        f"Your name is {facts['name']}, your favourite colour is {facts['colour']}, you live in "
        f"{facts['city']} and your lucky number is {facts['number']}.")


def make_conversation(rng: random.Random, tables: Dict[str, List[str]]) -> Dict:
    """One conversation in OpenAI ``messages`` format (module docstring)."""
    facts = {"name": rng.choice(NAMES), "colour": rng.choice(COLOURS),
             "city": rng.choice(CITIES), "number": str(rng.randint(10, 99))}
    intro = (f"Hi! My name is {facts['name']}, my favourite colour is {facts['colour']}, I live "
             f"in {facts['city']} and my lucky number is {facts['number']}.",
             f"Nice to meet you, {facts['name']}!")
    turns = [_explanation(rng, tables) for _ in range(1 + (rng.random() < 0.35))]
    turns += [_exact(rng, facts) for _ in range(rng.randint(1, 3))]
    turns += [_medium(rng, facts) for _ in range(rng.randint(0, 2))]
    rng.shuffle(turns)
    messages = []
    for user, reply in [intro] + turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def write_corpus(path: str, n: int, seed: int) -> None:
    """``n`` conversations, one JSON object per line, deterministic from ``seed``."""
    if n < 1:
        raise ValueError(f"the corpus needs at least 1 conversation, got {n}")
    rng = random.Random(seed)
    tables = step_tables(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(n):
            handle.write(json.dumps(make_conversation(rng, tables)) + "\n")


def prepare(work_dir: str, n: int, seed: int = 0, vocab_size: int = VOCAB_SIZE
            ) -> Tuple[str, str]:
    """``(corpus.jsonl, tokenizer.model)`` under ``work_dir``, reused when made with the same
    parameters (a sidecar JSON records them). The tokenizer is trained on the corpus."""
    from mt_dialog.demo import train_tokenizer

    os.makedirs(work_dir, exist_ok=True)
    stem = os.path.join(work_dir, f"normalization_n{n}_seed{seed}")
    corpus, tokenizer, sidecar = stem + ".jsonl", stem + ".model", stem + ".params.json"
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "vocab_size": vocab_size}
    if made_with(sidecar, params) and os.path.isfile(corpus) and os.path.isfile(tokenizer):
        return corpus, tokenizer
    write_corpus(corpus + ".tmp", n, seed)
    os.replace(corpus + ".tmp", corpus)
    train_tokenizer(corpus, tokenizer, vocab_size)
    record_made_with(sidecar, params)
    return corpus, tokenizer


def reply_lengths(corpus: str, tokenizer: str) -> List[int]:
    """Tokens of every assistant reply (content only; the end-of-turn token adds 1)."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer)
    lengths = []
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            lengths += [len(sp.encode(m["content"])) for m in json.loads(line)["messages"]
                        if m["role"] == "assistant"]
    return lengths


def main(argv=None) -> int:
    """Write the corpus and tokenizer; print reply-length statistics."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--conversations", type=int, default=6000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    corpus, tokenizer = prepare(args.output_dir, args.conversations, args.seed)
    lengths = reply_lengths(corpus, tokenizer)
    edges = [(1, 4), (5, 16), (17, 64), (65, 256), (257, 10 ** 9)]
    total = sum(n + 1 for n in lengths)
    print(f"{corpus}: {len(lengths):,} replies, {total:,} reply tokens (end-of-turn included)")
    for low, high in edges:
        group = [n + 1 for n in lengths if low <= n + 1 <= high]
        print(f"  reply length {low}-{high}: {len(group):,} replies "
              f"({len(group) / len(lengths):.1%}), {sum(group) / total:.1%} of reply tokens")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
