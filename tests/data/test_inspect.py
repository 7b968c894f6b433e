"""tools/inspect_dialog_dataset.py: summary, highlighted pack, --verify exit codes."""

import numpy as np

from mt_dialog.demo import write_corpus
from tests.conftest import preprocess_args
from tools.inspect_dialog_dataset import main as inspect_main
from tools.preprocess_dialog import main as preprocess_main


def build(tmp_path, sp_model_path):
    write_corpus(str(tmp_path / "in.jsonl"), 30, seed=5)
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(str(tmp_path / "in.jsonl"), sp_model_path, prefix,
                                           "--template", "firefly", "--seq-length", "1024")) == 0
    return prefix


def test_render_highlights_trained_tokens(tmp_path, sp_model_path, capsys):
    prefix = build(tmp_path, sp_model_path)
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "conversations read" in out and "pack 0 of" in out
    assert "[[Nice to meet you," in out and "</s>]](n=" in out
    assert inspect_main([prefix, "--color", "always", "--split", "valid"]) == 0
    assert "\033[1;32m" in capsys.readouterr().out


def test_verify_exit_codes(tmp_path, sp_model_path, capsys):
    prefix = build(tmp_path, sp_model_path)
    assert inspect_main([prefix, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    tokens_bin = tmp_path / "out.train.tokens.bin"
    data = np.fromfile(tokens_bin, dtype=np.uint16)
    data[:] = 399  # no turn ends with the end-of-turn id any more
    data.tofile(tokens_bin)
    assert inspect_main([prefix, "--verify"]) == 1
    assert "end-of-turn" in capsys.readouterr().out


def test_errors_are_messages(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err


def test_pack_shows_every_special_token(tmp_path, sp_model_path, capsys):
    """<|im_start|> and <|im_end|> are control symbols of the SentencePiece vocabulary (not
    appended): each one in the pack is shown, as in the stored ids."""
    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.data.tokenizers import SentencePieceTokenizer

    write_corpus(str(tmp_path / "in.jsonl"), 10, seed=5)
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(str(tmp_path / "in.jsonl"), sp_model_path, prefix,
                                           "--seq-length", "1024")) == 0
    capsys.readouterr()
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    tokens, _, _ = PackedDialogDataset(prefix, "train").raw_pack(0)
    tokenizer = SentencePieceTokenizer(sp_model_path)
    for piece in ("<|im_start|>", "<|im_end|>"):
        stored = int((tokens == tokenizer.special_id(piece, allow_add=False)).sum())
        assert stored > 0 and out.count(piece) == stored, (piece, stored, out)
