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
