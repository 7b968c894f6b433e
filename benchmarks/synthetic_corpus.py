"""A seeded ShareGPT-like multi-turn corpus and the SentencePiece tokenizer it is measured with.

Length model (in tokens of the tokenizer below; every draw is seeded):

    turns per conversation   ceil(LogNormal(median 2.2, sigma 0.85)), 1..48  (~18% single-turn)
    user message             LogNormal(median 40, sigma 1.2) tokens, 1..6000 (pasted text: long tail)
    assistant reply          7%: 1-3 tokens ("ok"-like); else LogNormal(median 220, sigma 0.85), 1..6000
    system message           25% of conversations, LogNormal(median 30, sigma 0.8) tokens

That gives a ShareGPT-like corpus: ~3.6 turns and ~1,400 tokens per conversation on average
(ChatML), median ~1,000, 21% over 2,048 and 5% over 4,096 tokens
(``python benchmarks/synthetic_corpus.py --stats`` prints the realized figures). Message text is made of pseudo-words ("gakenlo fanmin ...") drawn from a
5,000-word lexicon with Zipf frequencies; the tokenizer is a 2,000-piece BPE SentencePiece model
(byte fallback, ChatML control tokens) trained on text from the same lexicon, so a fresh clone
needs nothing downloaded. SentencePiece splits on spaces, so each word's token count is known and
every message is realized with *exactly* its drawn number of content tokens.

``sample_lengths(n, capacity)`` draws rendered conversation lengths (content + ChatML template
overhead) from the same model, vectorized (1M conversations in ~1 s), for the packing benchmark;
conversations longer than ``capacity`` keep their longest whole-turn prefix that fits, like
``tools/preprocess_dialog.py --overlong truncate`` (those whose first turn does not fit are dropped).

    python benchmarks/synthetic_corpus.py --conversations 2000 --output-dir /tmp/corpus --stats
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import made_with, record_made_with  # noqa: E402

GENERATOR_VERSION = 1
LEXICON_SEED = 20240501
LEXICON_SIZE = 5000
VOCAB_SIZE = 2000
ROLE_WORDS = ("system", "user", "assistant")

# ChatML rendering overhead in tokens with the tokenizer below (measured with
# mt_dialog.data.render, see ``calibrate_overhead``): <|im_start|>, "role\n" (2), <|im_end|>,
# "\n" (2); user/system +0.9 because the first word after "role\n" loses its leading space.
OVERHEAD = {"system": 6.9, "user": 6.9, "assistant": 6.0}


@dataclass(frozen=True)
class ShareGPTLike:
    turns_median: float = 2.2
    turns_sigma: float = 0.85
    max_turns: int = 48
    user_median: float = 40.0
    user_sigma: float = 1.2
    reply_median: float = 220.0
    reply_sigma: float = 0.85
    short_reply_p: float = 0.07  # replies of 1-3 tokens
    system_p: float = 0.25
    system_median: float = 30.0
    system_sigma: float = 0.8
    max_message: int = 6000


def _lognormal(rng, median: float, sigma: float, size, low: int, high: int) -> np.ndarray:
    values = np.ceil(rng.lognormal(np.log(median), sigma, size))
    return np.clip(values, low, high).astype(np.int64)


def sample_structure(n: int, seed: int, dist: ShareGPTLike = ShareGPTLike()) -> Dict[str, np.ndarray]:
    """Content token counts: ``turns`` [n], ``system`` [n] (0 = none), ``user`` and ``reply``
    [turns.sum()] (conversation after conversation)."""
    rng = np.random.default_rng(seed)
    turns = _lognormal(rng, dist.turns_median, dist.turns_sigma, n, 1, dist.max_turns)
    has_system = rng.random(n) < dist.system_p
    system = np.where(has_system, _lognormal(rng, dist.system_median, dist.system_sigma, n, 1,
                                             dist.max_message), 0)
    total = int(turns.sum())
    user = _lognormal(rng, dist.user_median, dist.user_sigma, total, 1, dist.max_message)
    reply = _lognormal(rng, dist.reply_median, dist.reply_sigma, total, 1, dist.max_message)
    short = rng.random(total) < dist.short_reply_p
    reply = np.where(short, rng.integers(1, 4, total), reply)
    return {"turns": turns, "system": system, "user": user, "reply": reply}


def rendered_turn_lengths(structure: Dict[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """(length of each turn [user + reply, ChatML overhead included], length of each
    conversation's system block)."""
    turn = (structure["user"] + OVERHEAD["user"] + structure["reply"] + OVERHEAD["assistant"])
    system = np.where(structure["system"] > 0, structure["system"] + OVERHEAD["system"], 0)
    return np.round(turn).astype(np.int64), np.round(system).astype(np.int64)


def sample_lengths(n: int, capacity: Optional[int] = None, seed: int = 0,
                   dist: ShareGPTLike = ShareGPTLike()) -> np.ndarray:
    """Rendered token lengths of ``n`` conversations (fewer if some cannot fit ``capacity``)."""
    structure = sample_structure(n, seed, dist)
    turn, system = rendered_turn_lengths(structure)
    conv = np.repeat(np.arange(n), structure["turns"])
    if capacity is None:
        return system + np.bincount(conv, weights=turn, minlength=n).astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(structure["turns"])[:-1]])
    running = np.cumsum(turn)
    before = np.where(starts > 0, running[starts - 1], 0)  # total of earlier conversations
    end = running - before[conv] + system[conv]  # conversation length up to this turn's end
    kept = np.bincount(conv, weights=np.where(end <= capacity, turn, 0), minlength=n)
    lengths = (kept + system).astype(np.int64)
    return lengths[kept > 0]


# -- lexicon, tokenizer, text ----------------------------------------------------------------


def lexicon() -> Tuple[np.ndarray, np.ndarray]:
    """(words, Zipf probabilities): 5,000 pronounceable pseudo-words, fixed seed."""
    rng = np.random.default_rng(LEXICON_SEED)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    syllables = [c + v for c in consonants for v in vowels] + [c + v + "n" for c in consonants
                                                               for v in vowels]
    words = set()
    while len(words) < LEXICON_SIZE:
        count = rng.choice([1, 2, 3, 4], p=[0.25, 0.4, 0.25, 0.1])
        words.add("".join(rng.choice(syllables, count)))
    ordered = sorted(words)
    rng.shuffle(ordered)
    probs = 1.0 / (np.arange(LEXICON_SIZE) + 2.7)  # Zipf-Mandelbrot
    return np.array(ordered, dtype=object), probs / probs.sum()


def train_tokenizer(path: str, vocab_size: int = VOCAB_SIZE) -> str:
    """Train the benchmark's SentencePiece model (deterministic) and write it to ``path``."""
    from mt_dialog.demo import train_sentencepiece

    words, probs = lexicon()
    rng = np.random.default_rng(LEXICON_SEED + 1)
    sentences = [" ".join(words[rng.choice(LEXICON_SIZE, int(rng.integers(5, 40)), p=probs)])
                 for _ in range(20000)]
    sentences += [f"{w} {w}" for w in ROLE_WORDS] * 200
    return train_sentencepiece(sentences, path, vocab_size, num_threads=1)


class TextMaker:
    """Realizes a token count as text: Zipf words whose token counts sum exactly to it."""

    def __init__(self, tokenizer_model: str, seed: int) -> None:
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        sp.Load(tokenizer_model)
        self.words, probs = lexicon()
        self.word_tokens = np.array([len(sp.EncodeAsIds(w)) for w in self.words], dtype=np.int64)
        self.one_token = np.flatnonzero(self.word_tokens == 1)
        if self.one_token.size == 0:
            raise RuntimeError(f"{tokenizer_model} has no one-token word; retrain it")
        self.rng = np.random.default_rng(seed)
        self.probs = probs
        self._refill(1 << 20)

    def _refill(self, size: int) -> None:
        self.stream = self.rng.choice(LEXICON_SIZE, size, p=self.probs)
        self.cum = np.cumsum(self.word_tokens[self.stream])
        self.pos = 0

    def text(self, tokens: int) -> str:
        if self.pos + tokens + 8 >= self.stream.size:
            self._refill(max(1 << 20, 2 * tokens))
        base = int(self.cum[self.pos - 1]) if self.pos else 0
        stop = int(np.searchsorted(self.cum, base + tokens, side="left"))  # word reaching it
        picked = list(self.stream[self.pos:stop])
        have = int(self.cum[stop - 1]) - base if stop > self.pos else 0
        rest = tokens - have
        if int(self.word_tokens[self.stream[stop]]) == rest:
            picked.append(self.stream[stop])
        else:  # fill the remainder with one-token words
            picked += list(self.one_token[self.rng.integers(0, self.one_token.size, rest)])
        self.pos = stop + 1
        return " ".join(self.words[picked])


def write_corpus(path: str, n: int, seed: int, tokenizer_model: str) -> Dict:
    """Write ``n`` conversations (OpenAI ``messages`` JSONL); returns the structure drawn."""
    structure = sample_structure(n, seed)
    maker = TextMaker(tokenizer_model, seed + 1)
    user, reply = structure["user"].tolist(), structure["reply"].tolist()
    position = 0
    with open(path, "w", encoding="utf-8") as handle:
        for index in range(n):
            messages = []
            if structure["system"][index]:
                messages.append({"role": "system",
                                 "content": maker.text(int(structure["system"][index]))})
            for _ in range(int(structure["turns"][index])):
                messages.append({"role": "user", "content": maker.text(user[position])})
                messages.append({"role": "assistant", "content": maker.text(reply[position])})
                position += 1
            handle.write(json.dumps({"messages": messages}) + "\n")
    return structure


def prepare(work_dir: str, n: int, seed: int = 0) -> Tuple[str, str]:
    """(corpus.jsonl, tokenizer.model) under ``work_dir``, reused when already made with the same
    parameters (a sidecar JSON records them)."""
    os.makedirs(work_dir, exist_ok=True)
    tokenizer = os.path.join(work_dir, "synthetic_tokenizer.model")
    corpus = os.path.join(work_dir, f"synthetic_n{n}_seed{seed}.jsonl")
    sidecar = corpus + ".params.json"
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "dist": asdict(ShareGPTLike()),
              "vocab_size": VOCAB_SIZE}
    if made_with(sidecar, params) and os.path.isfile(corpus) and os.path.isfile(tokenizer):
        return corpus, tokenizer
    train_tokenizer(tokenizer)
    write_corpus(corpus + ".tmp", n, seed, tokenizer)
    os.replace(corpus + ".tmp", corpus)
    record_made_with(sidecar, params)
    return corpus, tokenizer


# -- a Hugging Face tokenizer for the same corpus ------------------------------------------------

HF_VOCAB_SIZE = 6000
HF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# ChatML as a Jinja chat template (for --template hf): every message as
# <|im_start|>role\n content <|im_end|>\n, and the assistant opening as the generation prompt
HF_CHATML_JINJA = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def _corpus_texts(corpus: str):
    with open(corpus, encoding="utf-8") as handle:
        for line in handle:
            for message in json.loads(line)["messages"]:
                yield message["content"]


def train_hf_tokenizer(folder: str, corpus: str, vocab_size: int = HF_VOCAB_SIZE) -> str:
    """Train a byte-level BPE tokenizer (GPT-2 style: ``tokenizers`` ``ByteLevel`` pre-tokenizer
    and decoder) of ``vocab_size`` pieces on the message texts of ``corpus`` and save it as a
    Hugging Face tokenizer folder: eos ``<|im_end|>``, pad ``<|endoftext|>``, ``<|im_start|>``
    special, the ChatML chat template above. Needs the ``hf`` extra (transformers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(HF_SPECIALS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(_corpus_texts(corpus), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"])
    fast.chat_template = HF_CHATML_JINJA
    fast.save_pretrained(folder)
    return folder


def prepare_hf(work_dir: str, n: int, seed: int = 0) -> Tuple[str, str]:
    """(corpus.jsonl, Hugging Face tokenizer folder) under ``work_dir``: the corpus of
    ``prepare`` and a byte-level BPE tokenizer trained on it (``train_hf_tokenizer``), reused
    when already made from the same corpus parameters."""
    corpus, _ = prepare(work_dir, n, seed)
    folder = os.path.join(work_dir, f"hf_bpe{HF_VOCAB_SIZE}_n{n}_seed{seed}")
    sidecar = folder + ".params.json"
    params = {"version": GENERATOR_VERSION, "n": n, "seed": seed, "vocab_size": HF_VOCAB_SIZE,
              "template": HF_CHATML_JINJA}
    if not (made_with(sidecar, params) and os.path.isfile(os.path.join(folder, "tokenizer.json"))):
        train_hf_tokenizer(folder, corpus)
        record_made_with(sidecar, params)
    return corpus, folder


# -- checks ------------------------------------------------------------------------------------


def describe(values: np.ndarray) -> Dict[str, float]:
    values = np.asarray(values, dtype=np.float64)
    return {"mean": float(values.mean()), "median": float(np.median(values)),
            "p90": float(np.percentile(values, 90)), "p99": float(np.percentile(values, 99)),
            "max": float(values.max())}


def calibrate_overhead(corpus: str, tokenizer_model: str, limit: int = 2000) -> Dict[str, float]:
    """Mean rendered-minus-content tokens per message role (ChatML, mt_dialog's renderer)."""
    import sentencepiece

    from mt_dialog.data.formats import parse_record
    from mt_dialog.data.render import render_conversation, resolve_template
    from mt_dialog.data.templates import get_template
    from mt_dialog.data.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("sentencepiece", tokenizer_model)
    template = resolve_template(get_template("chatml"), tokenizer)
    sp = sentencepiece.SentencePieceProcessor()
    sp.Load(tokenizer_model)
    rows, extra = [], []
    with open(corpus, encoding="utf-8") as handle:
        for number, line in enumerate(handle):
            if number >= limit:
                break
            record = json.loads(line)
            (rendered,) = render_conversation(parse_record(record, None), template,
                                              tokenizer.encode)
            counts = {r: 0 for r in ROLE_WORDS}
            content = 0
            for message in record["messages"]:
                counts[message["role"]] += 1
                content += len(sp.EncodeAsIds(message["content"]))
            rows.append([counts[r] for r in ROLE_WORDS])
            extra.append(rendered.num_tokens - content)
    # user and assistant always come in pairs: fit the pair, keep the assistant overhead fixed
    a = np.asarray(rows, dtype=np.float64)
    y = np.asarray(extra, dtype=np.float64) - OVERHEAD["assistant"] * a[:, 2]
    coef, *_ = np.linalg.lstsq(a[:, :2], y, rcond=None)
    return {"system": float(coef[0]), "user": float(coef[1]),
            "assistant": OVERHEAD["assistant"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--stats", action="store_true",
                        help="print the realized length statistics (renders with mt_dialog)")
    args = parser.parse_args(argv)
    corpus, tokenizer = prepare(args.output_dir, args.conversations, args.seed)
    print(f"wrote {corpus} and {tokenizer}")
    if args.stats:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        s = sample_structure(args.conversations, args.seed)
        for name in ("turns", "user", "reply"):
            print(name, {k: round(v, 1) for k, v in describe(s[name]).items()})
        print("short replies (1-3 tokens):", f"{np.mean(s['reply'] <= 3):.1%}")
        print("model lengths", {k: round(v) for k, v in describe(
            sample_lengths(args.conversations, None, args.seed)).items()})
        print("overhead fit", calibrate_overhead(corpus, tokenizer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
