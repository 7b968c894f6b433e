"""Tokenizer back-ends, special-token lookup, and the Hugging Face path end to end."""

import json

import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.inspect import verify_dataset
from mt_dialog.data.tokenizers import (
    HuggingFaceTokenizer,
    SentencePieceTokenizer,
    TokenizerError,
    load_tokenizer,
)
from tests.conftest import SAMPLE_TEXT, openai, write_jsonl
from tools.preprocess_dialog import main


def test_sentencepiece_round_trip_and_identity(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    for text in SAMPLE_TEXT + ["never seen: ✓ ß 😀"]:
        assert tokenizer.decode(tokenizer.encode(text)) == text  # byte fallback: exact
    info = tokenizer.info()
    assert (info.type, info.base_vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (
        "sentencepiece", 400, 1, 2)
    assert tokenizer.special_id("<|im_end|>", allow_add=False) == 4
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tokenizer.special_id("<|eot_id|>", allow_add=False)


def test_load_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file"):
        load_tokenizer("sentencepiece", str(tmp_path / "missing.model"))
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer("sentencepiece", str(tmp_path / "junk.model"))
    with pytest.raises(TokenizerError, match="not a folder"):
        load_tokenizer("huggingface", str(tmp_path / "nope"))
    with pytest.raises(TokenizerError, match="not supported"):
        load_tokenizer("tiktoken", "x")


def test_hf_tokenizer_basics(hf_tokenizer_dir):
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    assert tokenizer.eos_id == tokenizer.special_id("<|im_end|>", allow_add=False)
    ids = tokenizer.encode("a <|im_end|> b")
    assert tokenizer.eos_id not in ids  # special-token text in content stays text
    assert tokenizer.decode(ids) == "a <|im_end|> b"


def test_hf_end_to_end_with_workers(tmp_path, hf_tokenizer_dir):
    """A Hugging Face tokenizer with a built-in template (--template hf: test_render_hf.py)."""
    records = [openai((SAMPLE_TEXT[i], SAMPLE_TEXT[i + 1]), (SAMPLE_TEXT[i + 2], SAMPLE_TEXT[i + 3]))
               for i in range(0, len(SAMPLE_TEXT) - 3)]
    path = write_jsonl(tmp_path / "in.jsonl", records * 5)
    prefix = str(tmp_path / "out")
    assert main(["--input", path, "--tokenizer-type", "huggingface", "--tokenizer-path",
                 hf_tokenizer_dir, "--template", "chatml", "--seq-length", "256",
                 "--output-prefix", prefix, "--workers", "2", "--split", "100,0",
                 "--no-progress"]) == 0
    assert verify_dataset(prefix) == []
    meta = json.loads(open(prefix + ".meta.json").read())
    assert meta["tokenizer"]["type"] == "huggingface" and meta["tokenizer"]["added_tokens"] == {}


def _with_bos(hf_tokenizer_dir, folder) -> int:
    """Save ``hf_tokenizer_dir`` into ``folder`` with a post-processor that puts a BOS before
    every text, as Llama 3's tokenizer does; returns the BOS id."""
    from tokenizers import processors
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    hf.add_special_tokens({"bos_token": "<|endoftext|>"})
    bos = hf.convert_tokens_to_ids("<|endoftext|>")
    hf.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    hf.save_pretrained(folder)
    return bos


def test_text_documents_with_a_hugging_face_tokenizer_and_workers(tmp_path, hf_tokenizer_dir):
    """A document starts with what the tokenizer puts before a text (none for the plain tiny
    tokenizer, like Qwen's; its BOS when it adds one, like Llama 3's), in worker processes too
    (which encode with the main process's BackendEncoder): the stored pieces joined, in input
    order, are prefix + the text's ids + eos."""
    assert HuggingFaceTokenizer(hf_tokenizer_dir).document_prefix() == []
    folder = str(tmp_path / "bos")
    bos = _with_bos(hf_tokenizer_dir, folder)
    tokenizer = HuggingFaceTokenizer(folder)
    assert tokenizer.document_prefix() == [bos]
    documents = [" ".join(SAMPLE_TEXT[i:i + n]) for i in range(len(SAMPLE_TEXT))
                 for n in (1, 9)]
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": text} for text in documents])
    prefix = str(tmp_path / "out")
    assert main(["--input", path, "--tokenizer-path", folder, "--seq-length", "48",
                 "--output-prefix", prefix, "--workers", "2", "--split", "100,0",
                 "--packing", "sequential", "--no-shuffle", "--no-progress"]) == 0
    assert verify_dataset(prefix) == []
    dataset = PackedDialogDataset(prefix, "train")
    stored = []
    for index in range(len(dataset)):
        tokens, _, lengths = dataset.raw_pack(index)
        stored += tokens.tolist()
    from mt_dialog.data.render import document_piece, split_document

    expected = [i for text in documents for piece in split_document(document_piece(
        [bos, *tokenizer.encode(text), tokenizer.eos_id]), 48) for i in piece.input_ids.tolist()]
    assert stored == expected  # each document, cut into overlapping pieces where it is long
