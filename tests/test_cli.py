"""Command-line surface: every flag documented, configs validated with the field named."""

import pytest

from mt_dialog.data.config import OutputConfig, PackingConfig, TokenizerConfig
from tools.inspect_dialog_dataset import build_parser as inspect_parser
from tools.preprocess_dialog import build_parser as preprocess_parser


@pytest.mark.parametrize("build", [preprocess_parser, inspect_parser])
def test_every_flag_has_help(build):
    for action in build()._actions:
        if action.dest != "help":
            assert action.help and len(action.help) > 10, action.dest


def test_megatron_style_flags():
    flags = {s for a in preprocess_parser()._actions for s in a.option_strings}
    assert {"--seq-length", "--tokenizer-model", "--tokenizer-type", "--output-prefix",
            "--workers", "--split", "--packing", "--overlong", "--on-error", "--template",
            "--input-format", "--valid-input", "--seed", "--no-shuffle", "--no-progress"} <= flags


@pytest.mark.parametrize("command", ["hf-to-mcore", "mcore-to-hf"])
def test_convert_help_lists_options_once(command, capsys):
    from tools.convert_checkpoint import main

    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.count("options:") == 1, out
    assert out.count(f"{command}: ") == 1 and "--load-dir" in out and "--save-dir" in out


@pytest.mark.parametrize("make, field", [
    (lambda: PackingConfig(seq_length=1), "seq_length"),
    (lambda: PackingConfig(split="98"), "split"),
    (lambda: PackingConfig(split="a,b"), "split"),
    (lambda: PackingConfig(packing="magic"), "packing"),
    (lambda: OutputConfig(output_prefix="x", workers=0), "workers"),
    (lambda: OutputConfig(output_prefix="data/"), "output_prefix"),
    (lambda: TokenizerConfig(tokenizer_model=None), "tokenizer_model"),
    (lambda: TokenizerConfig(tokenizer_type="huggingface"), "tokenizer_path"),
    (lambda: TokenizerConfig(tokenizer_model="m", template="hf"), "template"),
])
def test_config_errors_name_the_field(make, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        make()


def test_split_and_valid_input_exclude_each_other(tmp_path, capsys):
    from tools.preprocess_dialog import main

    code = main(["--input", "a.jsonl", "--valid-input", "b.jsonl", "--split", "90,10",
                 "--tokenizer-model", "m", "--output-prefix", str(tmp_path / "o")])
    assert code == 1 and "exclude each other" in capsys.readouterr().err


def test_tokenizer_type_follows_the_tokenizer_flag_given():
    assert TokenizerConfig(tokenizer_path="dir", template="hf").tokenizer_type == "huggingface"
    assert TokenizerConfig(tokenizer_model="m.model").tokenizer_type == "sentencepiece"
    assert TokenizerConfig(tokenizer_type="sentencepiece", tokenizer_model="m.model",
                           tokenizer_path="dir").tokenizer_type == "sentencepiece"


def test_a_reader_that_goes_away_stops_a_tool_quietly(monkeypatch):
    """``tool | head``: writing into a pipe whose reader is gone raises BrokenPipeError;
    ``mt_dialog.cli.run`` ends the tool quietly (exit 1, no traceback)."""
    import os

    from mt_dialog import cli

    read, write = os.pipe()
    os.close(read)
    monkeypatch.setattr("sys.stdout", os.fdopen(write, "w", buffering=1))

    def main():
        for _ in range(1000):
            print("a line of a long listing")
        return 0

    with pytest.raises(SystemExit) as stopped:
        cli.run(main)
    assert stopped.value.code == 1


@pytest.mark.parametrize("tool", ["tools/preprocess_dialog.py", "tools/inspect_dialog_dataset.py",
                                  "tools/chat.py", "tools/convert_checkpoint.py"])
def test_every_tool_runs_through_cli_run(tool):
    from tests.conftest import ROOT

    source = open(f"{ROOT}/{tool}", encoding="utf-8").read()
    assert source.rstrip().endswith("run(main)"), tool
