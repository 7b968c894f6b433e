#!/usr/bin/env python
"""Inspect a packed dialogue dataset: summary, the distributions of reply lengths and turns per
conversation (of a text dataset: piece lengths), one pack with trained tokens highlighted
(conversations, or document pieces), --verify.

Examples:
    python tools/inspect_dialog_dataset.py data/chat                 # summary + pack 0
    python tools/inspect_dialog_dataset.py data/chat --pack 5 --split valid
    python tools/inspect_dialog_dataset.py data/chat --verify        # exit 1 on any violation
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mt_dialog.data.dataset import PackedDialogDataset  # noqa: E402
from mt_dialog.data.inspect import (  # noqa: E402
    format_turn_statistics,
    render_pack,
    turn_statistics,
    verify_dataset,
)
from mt_dialog.data.preprocess import format_summary  # noqa: E402
from mt_dialog.data.storage import dataset_kind  # noqa: E402
from mt_dialog.data.tokenizers import tokenizer_from_metadata  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prefix", help="the --output-prefix the dataset was built with")
    parser.add_argument("--split", default="train", choices=("train", "valid"),
                        help="split to show (default: train)")
    parser.add_argument("--pack", type=int, default=0, help="pack to render (default: 0)")
    parser.add_argument("--color", default="auto", choices=("auto", "always", "never"),
                        help="highlight trained tokens in color (default: auto, if a terminal); "
                        "without color they are wrapped in [[ ]](n=turn length)")
    parser.add_argument("--verify", action="store_true",
                        help="re-check every invariant of every pack; exit 1 on a violation")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.verify:
            problems = verify_dataset(args.prefix)
            for problem in problems:
                print(f"FAIL {problem}")
            print("verify: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
            return 1 if problems else 0
        dataset = PackedDialogDataset(args.prefix, args.split)
        meta = dataset.metadata
        print(f"dataset {args.prefix}: template {meta['template']}, seq length "
              f"{meta['seq_length']}, tokenizer {meta['tokenizer']['path']} "
              f"(vocab {meta['tokenizer']['vocab_size']}), packing {meta['packing']}")
        print(format_summary(meta["summary"]))
        text = dataset_kind(meta) == "text"
        print(f"{args.split} split: " + format_turn_statistics(*turn_statistics(dataset), text))
        tokenizer = tokenizer_from_metadata(meta)
        if tokenizer is None:
            print("(tokenizer file not found: showing ids)")
        color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
        print(render_pack(dataset, args.pack, tokenizer, color))
    except (ValueError, IndexError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from mt_dialog.cli import run

    run(main)
