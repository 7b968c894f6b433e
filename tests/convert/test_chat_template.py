"""Built-in templates as Jinja: the exported tokenizer renders exactly training's text, and with a
byte-level BPE tokenizer exactly training's token ids."""

import os
import shutil

import pytest

from mt_dialog.convert.chat_template import PROBES, jinja_chat_template, layout_differences
from mt_dialog.convert.hf_checkpoint import _add_appended
from mt_dialog.data.render import render_prompt, resolve_template
from mt_dialog.data.templates import get_template
from mt_dialog.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer

pytest.importorskip("transformers")
BUILT_IN = ["chatml", "llama2", "llama3", "alpaca", "plain", "firefly"]


def _symbolic_text(ids_with_text, token_text) -> str:
    return "".join(token_text(p) if isinstance(p, int) else p for p in ids_with_text)


@pytest.fixture(scope="module")
def sp_pair(sp_model_path, tmp_path_factory):
    """(our SentencePiece tokenizer, folder holding it as a Hugging Face LlamaTokenizer)."""
    folder = tmp_path_factory.mktemp("sp_hf")
    shutil.copy(sp_model_path, os.path.join(folder, "tokenizer.model"))
    return sp_model_path, str(folder)


@pytest.mark.parametrize("name", BUILT_IN)
def test_jinja_renders_the_training_text(name, sp_pair):
    from transformers import LlamaTokenizer

    tokenizer = SentencePieceTokenizer(sp_pair[0])
    template = resolve_template(get_template(name), tokenizer)  # may append special tokens
    hf = LlamaTokenizer.from_pretrained(sp_pair[1])
    _add_appended(hf, tokenizer.added_tokens)
    text_of = lambda token: hf.convert_ids_to_tokens(int(token))  # noqa: E731
    hf.chat_template = jinja_chat_template(template, text_of)
    as_text = lambda s: [s]  # noqa: E731  render with text pieces instead of ids
    for probe in PROBES:
        dicts = [{"role": m.role, "content": m.content} for m in probe]
        expected = _symbolic_text(render_prompt(list(probe), template, as_text), text_of)
        assert hf.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True) == expected
        # the whole conversation: the prompt, the reply, end of turn, the closing pieces
        reply = ["Sure.", template.end_of_turn, *template.assistant_close]
        assert hf.apply_chat_template(dicts + [{"role": "assistant", "content": "Sure."}],
                                      tokenize=False) == expected + _symbolic_text(reply, text_of)


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_byte_level_tokenizer_reproduces_training_ids(name, hf_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template(name), tokenizer)
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    _add_appended(hf, tokenizer.added_tokens)
    hf.chat_template = jinja_chat_template(
        template, lambda token: hf.convert_ids_to_tokens(int(token)))
    assert layout_differences(hf, template, tokenizer.encode) is None


def test_differences_are_reported(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template("chatml"), tokenizer)
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    hf.chat_template = jinja_chat_template(
        template, lambda token: hf.convert_ids_to_tokens(int(token))).replace("user", "User")
    assert "probe 0 (prompt)" in layout_differences(hf, template, tokenizer.encode)


@pytest.mark.parametrize("name", BUILT_IN)
def test_sentencepiece_layout_reproduced_with_word_starts(name, sp_pair):
    """Each piece encoded alone starts with a word-start marker; a space between adjacent text
    pieces (word_start) reproduces it in the whole-string tokenization (legacy LlamaTokenizer)."""
    from transformers import LlamaTokenizer

    tokenizer = SentencePieceTokenizer(sp_pair[0])
    template = resolve_template(get_template(name), tokenizer)
    hf = LlamaTokenizer.from_pretrained(sp_pair[1], legacy=True)
    _add_appended(hf, tokenizer.added_tokens)
    text_of = lambda token: hf.convert_ids_to_tokens(int(token))  # noqa: E731
    hf.chat_template = jinja_chat_template(template, text_of, word_start=True)
    assert layout_differences(hf, template, tokenizer.encode) is None
