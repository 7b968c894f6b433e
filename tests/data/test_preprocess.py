"""Writing then reading .bin/.idx returns exactly what was rendered and packed."""

import json
import os
import random
from collections import Counter

import numpy as np
import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.formats import parse_record
from mt_dialog.data.inspect import verify_dataset
from mt_dialog.data.render import render_conversation, resolve_template
from mt_dialog.data.storage import metadata_path
from mt_dialog.data.templates import get_template
from mt_dialog.data.tokenizers import SentencePieceTokenizer
from mt_dialog.demo import make_conversation
from tests.conftest import preprocess_args, write_jsonl
from tools.preprocess_dialog import main


SEQ = "1024"  # demo conversations are long in the tiny fixture tokenizer's pieces


def args(inputs, sp_model_path, prefix, *extra):
    return preprocess_args(inputs, sp_model_path, prefix, "--seq-length", SEQ, *extra)


def corpus(count=300, seed=3):
    rng = random.Random(seed)
    return [make_conversation(rng) for _ in range(count)]


def rendered_multiset(records, sp_model_path, template="chatml"):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    resolved = resolve_template(get_template(template), tokenizer)
    out = Counter()
    for record in records:
        for r in render_conversation(parse_record(record), resolved, tokenizer.encode):
            out[(tuple(r.input_ids.tolist()), tuple(r.loss_token_num.tolist()))] += 1
    return out


def stored_multiset(prefix):
    out, packs = Counter(), []
    for split in ("train", "valid"):
        try:
            dataset = PackedDialogDataset(prefix, split)
        except ValueError:
            continue
        for index in range(len(dataset)):
            tokens, counts, lengths = dataset.raw_pack(index)
            packs.append(int(lengths.sum()))
            for a, b in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
                out[(tuple(tokens[a:b].tolist()), tuple(counts[a:b].tolist()))] += 1
    return out, packs


@pytest.mark.parametrize("packing", ["bfd", "ffd", "sequential", "none"])
def test_round_trip_is_exact(tmp_path, sp_model_path, packing):
    records = corpus()
    path = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "out"
    assert main(args(path, sp_model_path, prefix, "--packing", packing)) == 0
    stored, pack_lengths = stored_multiset(str(prefix))
    assert stored == rendered_multiset(records, sp_model_path)
    assert max(pack_lengths) <= 1024
    if packing == "none":
        assert len(pack_lengths) == len(records)
    assert verify_dataset(str(prefix)) == []


def test_workers_give_identical_output(tmp_path, sp_model_path):
    path = write_jsonl(tmp_path / "in.jsonl", corpus(500))
    for workers in ("1", "2"):
        assert main(args(path, sp_model_path, tmp_path / f"w{workers}",
                                    "--workers", workers)) == 0
    for suffix in ("train.tokens.bin", "train.loss_token_num.bin", "valid.tokens.idx"):
        one = (tmp_path / f"w1.{suffix}").read_bytes()
        assert one == (tmp_path / f"w2.{suffix}").read_bytes()


def test_sample_fields(tmp_path, sp_model_path):
    path = write_jsonl(tmp_path / "in.jsonl", corpus(60))
    prefix = str(tmp_path / "out")
    assert main(args(path, sp_model_path, prefix, "--split", "100,0")) == 0
    dataset = PackedDialogDataset(prefix, "train", seq_length=1024, vocab_size=400)
    for index in range(len(dataset)):
        tokens, counts, lengths = dataset.raw_pack(index)
        sample = dataset[index]
        used = int(lengths.sum())
        assert sample["tokens"].shape == (1024,) and sample["num_tokens"] == used
        assert np.array_equal(sample["tokens"][:used], tokens)
        assert np.all(sample["tokens"][used:] == dataset.pad_id)
        assert np.array_equal(sample["labels"][:used - 1], tokens[1:])
        assert np.array_equal(sample["loss_token_num"][:used - 1], counts[1:])
        assert np.array_equal(sample["loss_mask"], (sample["loss_token_num"] > 0).astype(np.float32))
        bounds = np.concatenate([[0], np.cumsum(lengths)] + ([[1024]] if used < 1024 else []))
        assert sample["cu_seqlens"].tolist() == bounds.tolist()
        for a, b in zip(bounds[:-1], bounds[1:]):
            assert sample["position_ids"][a:b].tolist() == list(range(b - a))
        # the label of a conversation's last token (next conversation's first) is never trained
        assert np.all(sample["loss_mask"][bounds[1:] - 1] == 0)
        # turn_num: every trained run is one turn
        runs = np.count_nonzero(np.diff(np.concatenate([[0], sample["loss_mask"], [0]])) == 1)
        assert sample["turn_num"] == runs


def test_metadata_and_refusals(tmp_path, sp_model_path):
    path = write_jsonl(tmp_path / "in.jsonl", corpus(50))
    prefix = str(tmp_path / "out")
    argv = args(path, sp_model_path, prefix)
    assert main(argv) == 0
    meta = json.loads(open(metadata_path(prefix)).read())
    assert meta["format_version"] == 1 and meta["seq_length"] == 1024
    assert meta["template"] == "chatml" and meta["packing"] == "bfd" and meta["seed"] == 1234
    assert meta["tokenizer"]["type"] == "sentencepiece" and meta["tokenizer"]["vocab_size"] == 400
    assert len(meta["tokenizer"]["sha256"]) == 64 and meta["command"][1:] == argv
    assert meta["special_ids"]["end_of_turn"] == 4 and meta["special_ids"]["eos"] == 2
    assert set(meta["splits"]) == {"train", "valid"} and meta["splits"]["valid"]["conversations"] == 1
    sha = meta["tokenizer"]["sha256"]
    PackedDialogDataset(prefix, "train", seq_length=1024, vocab_size=512, tokenizer_sha256=sha)
    with pytest.raises(ValueError, match="--seq-length 1024 .* --seq-length 512"):
        PackedDialogDataset(prefix, "train", seq_length=512)
    with pytest.raises(ValueError, match=r"vocabulary 400\) but the model's vocabulary is 300"):
        PackedDialogDataset(prefix, "train", vocab_size=300)
    with pytest.raises(ValueError, match="was built with tokenizer"):
        PackedDialogDataset(prefix, "train", tokenizer_sha256="0" * 64)
    meta["format_version"] = 99
    open(metadata_path(prefix), "w").write(json.dumps(meta))
    with pytest.raises(ValueError, match="format version 99 .* rebuild"):
        PackedDialogDataset(prefix, "train")
    with pytest.raises(ValueError, match="not found"):
        PackedDialogDataset(str(tmp_path / "nothing"), "train")


def test_valid_input_and_split(tmp_path, sp_model_path):
    train = write_jsonl(tmp_path / "train.jsonl", corpus(40, seed=1))
    valid = write_jsonl(tmp_path / "valid.jsonl", corpus(7, seed=2))
    prefix = str(tmp_path / "out")
    assert main(args(train, sp_model_path, prefix, "--valid-input", valid)) == 0
    meta = json.loads(open(metadata_path(prefix)).read())
    assert meta["splits"]["train"]["conversations"] == 40
    assert meta["splits"]["valid"]["conversations"] == 7
    assert main(args(train, sp_model_path, prefix, "--overwrite", "--split", "75,25")) == 0
    meta = json.loads(open(metadata_path(prefix)).read())
    assert (meta["splits"]["train"]["conversations"], meta["splits"]["valid"]["conversations"]) == (30, 10)
    assert os.path.getsize(prefix + ".valid.tokens.bin") > 0


def test_overwrite_removes_stale_splits(tmp_path, sp_model_path):
    path = write_jsonl(tmp_path / "in.jsonl", corpus(40))
    prefix = str(tmp_path / "out")
    assert main(args(path, sp_model_path, prefix)) == 0
    assert os.path.exists(prefix + ".valid.tokens.bin")
    assert main(args(path, sp_model_path, prefix, "--overwrite", "--split", "100,0")) == 0
    assert not os.path.exists(prefix + ".valid.tokens.bin")
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["in.jsonl", "out.meta.json", "out.train.tokens.bin", "out.train.tokens.idx",
         "out.train.loss_token_num.bin", "out.train.loss_token_num.idx"])


def test_verify_catches_corruption(tmp_path, sp_model_path):
    path = write_jsonl(tmp_path / "in.jsonl", corpus(40))
    prefix = str(tmp_path / "out")
    assert main(args(path, sp_model_path, prefix, "--split", "100,0")) == 0
    counts_bin = tmp_path / "out.train.loss_token_num.bin"
    data = np.fromfile(counts_bin, dtype=np.uint16)
    first_trained = int(np.flatnonzero(data)[0])
    data[first_trained] += 1  # one token now claims a longer turn than it belongs to
    data.tofile(counts_bin)
    problems = verify_dataset(prefix)
    assert any("loss_token_num" in p for p in problems)


# -- plain-text documents -------------------------------------------------------------------------

def _documents(count=24, seed=5):
    """Documents of 1 to ~60 sentences (some far longer than the sequence length), in several
    scripts."""
    from tests.conftest import SAMPLE_TEXT

    rng = random.Random(seed)
    return [" ".join(rng.choice(SAMPLE_TEXT) for _ in range(rng.choice((1, 2, 5, 20, 60))))
            for _ in range(count)]


def test_text_dataset_trains_every_document_token_and_pieces_reassemble(tmp_path,
                                                                         sp_model_path):
    """Pieces stored in input order (sequential packing, no shuffle): each document's pieces
    joined (each later one less its first id, the overlap) are BOS + its text + eos; a document that fits trains exactly its text + eos
    (decoded back to the text); every token of a piece is trained but its first."""
    documents = _documents()
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": t, "id": i}
                                                  for i, t in enumerate(documents)])
    prefix = str(tmp_path / "text")
    assert main(preprocess_args(path, sp_model_path, prefix, "--seq-length", "64", "--packing",
                                "sequential", "--no-shuffle", "--split", "100,0")) == 0
    meta = json.load(open(metadata_path(prefix)))
    tokenizer = SentencePieceTokenizer(sp_model_path)
    dataset = PackedDialogDataset(prefix, "train")
    pieces = []
    for index in range(len(dataset)):
        tokens, counts, lengths = dataset.raw_pack(index)
        for a, b in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
            assert counts[a] == 0 and np.all(counts[a + 1:b] == b - a - 1)
            pieces.append(tokens[a:b].tolist())
    eos, bos = tokenizer.eos_id, tokenizer.bos_id
    cut = 0
    for text in documents:
        ids = [bos, *tokenizer.encode(text), eos]
        joined, count = pieces.pop(0), 1
        while len(joined) < len(ids):  # a later piece's first id is the last of the one before
            piece = pieces.pop(0)
            assert piece[0] == joined[-1]
            joined += piece[1:]
            count += 1
        assert joined == ids and tokenizer.decode(joined[1:-1]) == text
        cut += count > 1
        if count == 1:  # trained tokens = the text and eos, exactly
            assert tokenizer.decode(joined[1:-1]) == text and joined[-1] == eos
    assert not pieces and cut >= 5
    summary = meta["summary"]
    assert meta["kind"] == "text" and summary["documents_split"] == cut
    assert meta["splits"]["train"]["documents"] == len(documents)
    assert summary["conversations_kept"] == len(documents) == summary["conversations_read"]
    assert summary["notes"] == {"ignored field 'id'": len(documents)}
    assert meta["splits"]["train"]["turns"] == summary["samples_kept"]  # a piece is a turn
    assert verify_dataset(prefix) == []


def test_overlong_modes_of_text_and_conversations(tmp_path, sp_model_path, capsys):
    long_text = {"text": " ".join(["The capital of France is Paris."] * 40)}
    path = write_jsonl(tmp_path / "docs.jsonl", [long_text, {"text": "Short."}])
    out = str(tmp_path / "out")
    base = preprocess_args(path, sp_model_path, out, "--seq-length", "64", "--split", "100,0")
    assert main([*base, "--overlong", "truncate"]) == 0
    meta = json.load(open(metadata_path(out)))
    assert meta["splits"]["train"]["conversations"] == 2  # the first piece and the short one
    assert meta["summary"]["truncated"] == 1 and meta["summary"]["turns_removed_by_truncation"]
    assert main([*base, "--overlong", "drop", "--overwrite"]) == 0
    assert json.load(open(metadata_path(out)))["summary"]["dropped"] == {"overlong": 1}
    assert main([*base, "--overlong", "error", "--overwrite"]) == 1
    assert "--overlong split" in capsys.readouterr().err
    chat = write_jsonl(tmp_path / "chat.jsonl", corpus(3))
    assert main(preprocess_args(chat, sp_model_path, str(tmp_path / "c"), "--seq-length", "16",
                                "--overlong", "split")) == 1
    assert "--overlong split cuts only text documents" in capsys.readouterr().err


def test_text_and_conversations_are_not_mixed_in_one_dataset(tmp_path, sp_model_path, capsys):
    docs = write_jsonl(tmp_path / "a_docs.jsonl", [{"text": "Hello there."}])
    chat = write_jsonl(tmp_path / "b_chat.jsonl", corpus(2))
    assert main(args([docs, chat], sp_model_path, str(tmp_path / "mixed"))) == 1
    err = capsys.readouterr().err
    assert "b_chat.jsonl:1 is a conversation record but" in err and "a_docs.jsonl:1" in err
    assert "--data-path W1 TEXT W2 CHAT" in err
