#!/usr/bin/env python
"""Tokenize, mask and pack multi-turn conversations into Megatron indexed datasets.

Input: JSONL, JSON-array or Parquet files of openai / Hugging Face messages (tool calls, tool
results, reasoning, per-message "weight" 0/1 or "loss" false/true), sharegpt, firefly or alpaca
records, or plain-text documents ({"text": ...}: continued pretraining, every token trained,
long documents split into pieces). A bad record stops the run with file:line and the fix, or is
counted (--on-error skip); what was dropped or ignored inside kept records is counted too
(docs/data-formats.md: "Input formats", "Plain text").

Example:
    python tools/preprocess_dialog.py --input data/*.jsonl --tokenizer-model tok.model \\
        --template chatml --seq-length 4096 --output-prefix data/chat --workers 8
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mt_dialog.config_utils import add_arguments, from_args  # noqa: E402
from mt_dialog.data.config import (  # noqa: E402
    InputConfig,
    OutputConfig,
    PackingConfig,
    PreprocessConfig,
    TokenizerConfig,
)
from mt_dialog.data.preprocess import PreprocessError, format_summary, run_preprocess  # noqa: E402

GROUPS = (("input", InputConfig), ("tokenizer and template", TokenizerConfig),
          ("packing", PackingConfig), ("output", OutputConfig))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for title, cls in GROUPS:
        add_arguments(parser, cls, title)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = PreprocessConfig(*(from_args(cls, args) for _, cls in GROUPS))
        metadata = run_preprocess(config, argv=["tools/preprocess_dialog.py", *argv])
    except (ValueError, PreprocessError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written at --output-prefix", file=sys.stderr)
        return 130
    print(format_summary(metadata["summary"]))
    print(f"wrote {config.output.output_prefix}.meta.json and "
          f"{', '.join(metadata['splits'])} split(s)")
    return 0


if __name__ == "__main__":
    from mt_dialog.cli import run

    run(main)
