#!/usr/bin/env python
"""Convert checkpoints between Hugging Face and megatron-core (Llama, Mistral, Qwen2, Qwen3).

Start from a pretrained model, fine-tune at any TP/PP, export the result for serving:

    python tools/convert_checkpoint.py hf-to-mcore --load-dir Qwen2-7B-Instruct --save-dir ckpt/qwen
    python tools/preprocess_dialog.py --input chats.jsonl --tokenizer-type huggingface \\
        --tokenizer-path ckpt/qwen/tokenizer --template hf --seq-length 4096 --output-prefix data/chat
    torchrun --nproc_per_node 8 pretrain_dialog.py --load ckpt/qwen --finetune \\
        --use-checkpoint-args --tensor-model-parallel-size 4 --data-path data/chat ... --save ckpt/sft
    python tools/convert_checkpoint.py mcore-to-hf --load-dir ckpt/sft --save-dir Qwen2-7B-sft
    # a LoRA run (--lora-rank): a PEFT adapter folder, or with --merge-lora the merged model
    python tools/convert_checkpoint.py mcore-to-hf --load-dir ckpt/lora --save-dir qwen-adapter
    python tools/chat.py --load ckpt/sft --message "Hello!"       # or transformers on Qwen2-7B-sft

Runs in one process (no torchrun); it needs memory for the whole model once.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mt_dialog.config_utils import add_arguments, from_args  # noqa: E402
from mt_dialog.convert.hf_checkpoint import ExportConfig, ImportConfig  # noqa: E402

COMMANDS = {"hf-to-mcore": ImportConfig, "mcore-to-hf": ExportConfig}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, cls in COMMANDS.items():
        # the group's description is the class's first line: not repeated as the parser's, and
        # not titled "options", argparse's own group (-h)
        sub = commands.add_parser(name, help=cls.__doc__.strip().splitlines()[0])
        add_arguments(sub, cls, "arguments")
    return parser


def _report(command: str, summary: dict) -> str:
    if command == "hf-to-mcore":
        return (f"imported {summary['architecture']}: {summary['layers']} layers, hidden "
                f"{summary['hidden']}, {summary['vocab_rows']} vocabulary rows, "
                f"{summary['parameters']:,} parameters ({summary['dtype']}) -> "
                f"{summary['folder']}\nchat template: {summary['template']}\nfine-tune with: "
                f"pretrain_dialog.py --load {summary['folder']} --finetune --use-checkpoint-args"
                + "".join(f"\nnote: {note}" for note in summary.get("notes") or ()))
    if summary.get("adapter"):
        return (f"exported the LoRA adapter of iteration {summary['iteration']} (rank "
                f"{summary['rank']} on {', '.join(summary['modules'])}), "
                f"{summary['bytes'] / 1e6:,.2f} MB ({summary['dtype']}) -> {summary['folder']}"
                f"\nload with: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("
                f"{summary['base'] or 'HF_BASE'!r}), {summary['folder']!r}); --merge-lora "
                "writes the merged model instead")
    return (f"exported iteration {summary['iteration']} as {summary['architecture']}: "
            f"{summary['vocab_rows']} vocabulary rows, {summary['bytes'] / 1e6:,.1f} MB "
            f"({summary['dtype']}) -> {summary['folder']}\nchat template: {summary['chat_template']}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    from mt_dialog.training.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    try:
        config = from_args(COMMANDS[args.command], args)
        from mt_dialog.convert.hf_checkpoint import export_hf, import_hf

        run = import_hf if args.command == "hf-to-mcore" else export_hf
        summary = run(config, argv=["tools/convert_checkpoint.py", *argv])
    except ValueError as exc:  # ConversionError, CheckpointError, config validation
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    print(_report(args.command, summary))
    return 0


if __name__ == "__main__":
    from mt_dialog.cli import run

    run(main)
