"""The built-in demo corpus and tokenizer (the README's main job starts from them)."""

import json
import random

from mt_dialog.data.formats import parse_record
from mt_dialog.data.tokenizers import SentencePieceTokenizer
from mt_dialog.demo import main, make_conversation


def test_conversations_are_valid_and_varied():
    rng = random.Random(0)
    records = [make_conversation(rng) for _ in range(300)]
    reply_lengths = []
    for record in records:
        messages = parse_record(record).messages  # validates roles and non-empty replies
        replies = [m.content for m in messages if m.role == "assistant"]
        reply_lengths += [len(r.split()) for r in replies]
        name = messages[1 if messages[0].role == "system" else 0].content.split()[3]
        recalls = [m for m, q in zip(messages[1:], messages) if q.content == "What is my name?"]
        assert all(m.content == name for m in recalls)
    assert min(reply_lengths) == 1 and max(reply_lengths) >= 10  # very different lengths
    assert len({json.dumps(r) for r in records}) > 290


def test_demo_writes_corpus_and_chatml_tokenizer(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path), "--conversations", "50"]) == 0
    lines = (tmp_path / "corpus.jsonl").read_text().splitlines()
    assert len(lines) == 50
    tokenizer = SentencePieceTokenizer(str(tmp_path / "tokenizer.model"))
    assert tokenizer.special_id("<|im_end|>", allow_add=False) < tokenizer.vocab_size
    assert tokenizer.decode(tokenizer.encode("Count from 3 to 9.")) == "Count from 3 to 9."
    assert main(["--output-dir", str(tmp_path), "--conversations", "0"]) == 1
