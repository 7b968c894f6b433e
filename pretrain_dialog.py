#!/usr/bin/env python
"""Multi-turn dialogue SFT on megatron-core, with the turn-normalized loss.

    torchrun --nproc_per_node 2 pretrain_dialog.py --tensor-model-parallel-size 2 \\
        --data-path data/chat --micro-batch-size 2 --global-batch-size 16 \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --train-iters 500 \\
        --lr 3e-4 --lr-warmup-iters 20 --save ckpt

This file supplies the dialog-specific ``forward_step``; the loop is ``mt_dialog.training.loop``.
"""

import argparse
import dataclasses
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mt_dialog.config_utils import FlagParser, add_arguments, from_args  # noqa: E402
from mt_dialog.training.config import (  # noqa: E402
    DataConfig,
    DialogTrainingConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TokenizerConfig,
    TrainConfig,
)

GROUPS = (("model", ModelConfig), ("parallelism", ParallelConfig), ("data", DataConfig),
          ("optimizer", OptimConfig), ("training", TrainConfig), ("tokenizer", TokenizerConfig),
          ("LoRA", LoraConfig))


def make_forward_step(normalization: str):
    """megatron ``forward_step_func``: model output (per-token loss) and the dialog loss (with
    each blend dataset's reports when the batch carries ``dataset_ids``)."""
    from mt_dialog.training.loss import make_loss_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=batch["packed_seq_params"])
        return output, make_loss_func(batch["loss_mask"], batch["loss_token_num"], normalization,
                                      cu_seqlens=batch["conversation_cu_seqlens"],
                                      dataset_ids=batch.get("dataset_ids"),
                                      dataset_names=batch.get("dataset_names", ()),
                                      weights=batch["loss_weights"])

    return forward_step


def make_eval_forward_step(normalization: str, edges):
    """megatron ``forward_step_func`` of validation: the model's logits (no labels: the loss is
    computed from them so that greedy accuracy can be too) and ``turn_metrics.validation_loss``
    (the dialog loss plus loss and accuracy by reply length and turn index; ``edges``: the
    reply-length bucket edges)."""
    from functools import partial

    from mt_dialog.training.turn_metrics import validation_loss

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None,
                       packed_seq_params=batch["packed_seq_params"])
        return output, partial(validation_loss, batch, normalization, tuple(edges))

    return forward_step


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the config dataclasses; a Megatron-LM flag mt_dialog has no field for gets
    a one-line answer saying where the feature lives (``megatron_flags.answer``)."""
    from mt_dialog.training.megatron_flags import add_compatible_flags, answer

    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                        unknown_flag_answer=answer)
    for title, cls in GROUPS:
        add_arguments(parser, cls, title)
    add_compatible_flags(parser)
    return parser


def parse_config(argv) -> DialogTrainingConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.use_checkpoint_args and (args.load or args.pretrained_checkpoint):
        _take_checkpoint_args(parser, args)  # (without either: TrainConfig refuses it)
    return DialogTrainingConfig(*(from_args(cls, args) for _, cls in GROUPS))


def _take_checkpoint_args(parser, args) -> None:
    """--use-checkpoint-args: the model flags of the checkpoint the run starts from (--load when
    it holds one, else --pretrained-checkpoint). A model flag given on the command line with
    another value is refused, never silently overridden."""
    from mt_dialog.training.checkpoint import TRACKER, checkpoint_args

    source = args.load if args.load and os.path.isfile(os.path.join(args.load, TRACKER)) \
        else (args.pretrained_checkpoint or args.load)
    saved = checkpoint_args(source)
    for name, value in saved.items():
        given = getattr(args, name)
        if given != parser.get_default(name) and given != value:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"use_checkpoint_args: {flag} {given} but the checkpoint {source} "
                             f"has {value}; drop {flag} (the checkpoint's value is used) or "
                             "--use-checkpoint-args")
    vars(args).update(saved)


def _error(exc: Exception, code: int = 1) -> int:
    """One line per rank, written in one call so that ranks' lines never interleave; a message
    about a config field names its flag (``lr: ...`` -> ``--lr: ...``). Returns ``code``: 2 for
    a command line that is wrong in itself (as argparse), 1 for a run refused or stopped."""
    sys.stderr.write(f"error: {flag_message(str(exc))}\n")
    sys.stderr.flush()
    return code


def flag_message(message: str) -> str:
    """``field: text`` -> ``--field: text``, or just ``text`` when it names the flag already."""
    head, sep, rest = message.partition(": ")
    fields = {f.name for _, cls in GROUPS for f in dataclasses.fields(cls)}
    if not sep or head not in fields:
        return message
    flag = "--" + head.replace("_", "-")
    return rest if rest.startswith(flag) else f"{flag}: {rest}"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from mt_dialog.training.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    try:
        try:
            config = parse_config(argv)
        except ValueError as exc:
            return _error(exc, code=2)
        from mt_dialog.training.loop import TrainingError, pretrain

        try:
            normalization = config.data.loss_normalization
            pretrain(config, make_forward_step(normalization), argv=["pretrain_dialog.py", *argv],
                     eval_forward_step=make_eval_forward_step(
                         normalization, config.train.eval_reply_length_buckets))
        except TrainingError as exc:
            return _error(exc)
    except ValueError as exc:
        return _error(exc)
    finally:
        from mt_dialog.training import distributed

        if "torch" in sys.modules and sys.modules["torch"].distributed.is_initialized():
            distributed.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
