"""Tokenizer back-ends, special-token lookup, and the Hugging Face path end to end."""

import json
from collections import Counter

import numpy as np
import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.formats import parse_record
from mt_dialog.data.inspect import verify_dataset
from mt_dialog.data.render import render_with_chat_template
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


@pytest.mark.parametrize("template", ["hf", "chatml"])
def test_hf_end_to_end_with_workers(tmp_path, hf_tokenizer_dir, template):
    records = [openai((SAMPLE_TEXT[i], SAMPLE_TEXT[i + 1]), (SAMPLE_TEXT[i + 2], SAMPLE_TEXT[i + 3]))
               for i in range(0, len(SAMPLE_TEXT) - 3)]
    path = write_jsonl(tmp_path / "in.jsonl", records * 5)
    prefix = str(tmp_path / "out")
    assert main(["--input", path, "--tokenizer-type", "huggingface", "--tokenizer-path",
                 hf_tokenizer_dir, "--template", template, "--seq-length", "256",
                 "--output-prefix", prefix, "--workers", "2", "--split", "100,0",
                 "--no-progress"]) == 0
    assert verify_dataset(prefix) == []
    meta = json.loads(open(prefix + ".meta.json").read())
    assert meta["tokenizer"]["type"] == "huggingface" and meta["tokenizer"]["added_tokens"] == {}
    if template == "hf":
        hf = HuggingFaceTokenizer(hf_tokenizer_dir).hf
        expected = Counter()
        for record in records * 5:
            r = render_with_chat_template(parse_record(record), hf)
            expected[tuple(r.input_ids.tolist())] += 1
        dataset = PackedDialogDataset(prefix, "train")
        stored = Counter()
        for index in range(len(dataset)):
            tokens, _, lengths = dataset.raw_pack(index)
            for a, b in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
                stored[tuple(tokens[a:b].tolist())] += 1
        assert stored == expected


def test_hf_template_needs_a_chat_template(tmp_path, hf_tokenizer_dir, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(hf_tokenizer_dir, plain)
    for name in ("tokenizer_config.json",):
        config = json.loads((plain / name).read_text())
        config.pop("chat_template", None)
        (plain / name).write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    path = write_jsonl(tmp_path / "in.jsonl", [openai(("a", "b"))])
    code = main(["--input", path, "--tokenizer-type", "huggingface", "--tokenizer-path",
                 str(plain), "--template", "hf", "--output-prefix", str(tmp_path / "o"),
                 "--no-progress"])
    assert code == 1 and "has no chat template" in capsys.readouterr().err


@pytest.mark.parametrize("fixture, end_piece", [("hf_base_chatml_dir", "<|im_end|>"),
                                                ("hf_llama3_dir", "<|eot_id|>")])
def test_hf_template_records_the_trained_end_of_turn(fixture, end_piece, request, tmp_path,
                                                     capsys):
    """A base model's tokenizer (eos <|endoftext|> / <|end_of_text|>) with a chat template
    whose replies end with another special token: the metadata records the token training
    trained after every reply, and --verify accepts the data."""
    from tools.inspect_dialog_dataset import main as inspect_main

    folder = request.getfixturevalue(fixture)
    records = [openai(("Hello! How are you today?", "I am fine, thank you. And you?"),
                      ("Count from 1 to 10.", "1 2 3 4 5 6 7 8 9 10")),
               openai(("我该如何学习编程？", "从基础开始。"), system="Answer briefly.")]
    prefix = str(tmp_path / "out")
    assert main(["--input", write_jsonl(tmp_path / "in.jsonl", records), "--tokenizer-type",
                 "huggingface", "--tokenizer-path", folder, "--template", "hf",
                 "--seq-length", "256", "--output-prefix", prefix, "--split", "100,0",
                 "--no-progress"]) == 0
    special = json.loads(open(prefix + ".meta.json").read())["special_ids"]
    hf = HuggingFaceTokenizer(folder).hf
    trained_ends = set()
    for record in records:  # training's own ids: the last token of every trained reply
        rendered = render_with_chat_template(parse_record(record), hf)
        mask = rendered.loss_mask.astype(bool)
        trained_ends |= {int(rendered.input_ids[i]) for i in np.flatnonzero(
            mask & ~np.append(mask[1:], False))}
    assert trained_ends == {special["end_of_turn"]} == {hf.convert_tokens_to_ids(end_piece)}
    assert special["eos"] == hf.eos_token_id != special["end_of_turn"]
    capsys.readouterr()
    assert inspect_main([prefix, "--verify"]) == 0, capsys.readouterr().out


def test_hf_reply_with_another_end_token_is_refused_with_its_line(tmp_path, hf_tokenizer_dir,
                                                                  capsys):
    """A template that ends some replies with another special token: the record is named by
    file:line, nothing is written."""
    from tests.data.chat_tokenizers import build_tokenizer

    template = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] -}}"
        "{%- if m['role'] == 'assistant' and 'bye' in m['content'] -%}{{- '<|endoftext|>' -}}"
        "{%- else -%}{{- '<|im_end|>' -}}{%- endif -%}{{- '\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    folder = build_tokenizer(hf_tokenizer_dir, str(tmp_path / "tok"), template,
                             eos_token="<|endoftext|>",
                             additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    path = write_jsonl(tmp_path / "in.jsonl", [openai(("Hi", "Hello.")),
                                               openai(("Hi", "Hello."), ("Go", "bye now"))])
    prefix = tmp_path / "out"
    code = main(["--input", path, "--tokenizer-type", "huggingface", "--tokenizer-path",
                 folder, "--template", "hf", "--output-prefix", str(prefix), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"{path}:2: conversation 2: message 3:" in err, err
    assert "'<|endoftext|>'" in err and "'<|im_end|>'" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*"))


def test_hf_template_refusing_a_record_is_named_not_a_traceback(tmp_path, hf_tokenizer_dir,
                                                               capsys):
    """A chat template that raises (no system role here) refuses that record by file:line."""
    from tests.conftest import CHATML_JINJA
    from tests.data.chat_tokenizers import build_tokenizer

    template = ("{% if messages[0]['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML_JINJA)
    folder = build_tokenizer(hf_tokenizer_dir, str(tmp_path / "tok"), template,
                             eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    path = write_jsonl(tmp_path / "in.jsonl", [openai(("Hi", "Hello.")),
                                               openai(("Hi", "Hello."), system="Be brief.")])
    code = main(["--input", path, "--tokenizer-type", "huggingface", "--tokenizer-path",
                 folder, "--template", "hf", "--output-prefix", str(tmp_path / "out"),
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and f"{path}:2: conversation 2: the chat template refuses" in err, err
    assert "System role not supported" in err and "Traceback" not in err
