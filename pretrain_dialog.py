#!/usr/bin/env python
"""Multi-turn dialogue SFT on megatron-core, with the turn-normalized loss.

    torchrun --nproc_per_node 2 pretrain_dialog.py --tensor-model-parallel-size 2 \\
        --data-path data/chat --micro-batch-size 2 --global-batch-size 16 \\
        --num-layers 4 --hidden-size 256 --num-attention-heads 8 --train-iters 500 \\
        --lr 3e-4 --lr-warmup-iters 20 --save ckpt

This file supplies the dialog-specific ``forward_step``; the loop is ``mt_dialog.training.loop``.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mt_dialog.config_utils import FlagParser, add_arguments, from_args  # noqa: E402
from mt_dialog.training.config import (  # noqa: E402
    DataConfig,
    DialogTrainingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TokenizerConfig,
    TrainConfig,
)

GROUPS = (("model", ModelConfig), ("parallelism", ParallelConfig), ("data", DataConfig),
          ("optimizer", OptimConfig), ("training", TrainConfig), ("tokenizer", TokenizerConfig))


def make_forward_step(normalization: str):
    """megatron ``forward_step_func``: model output (per-token loss) and the dialog loss."""
    from mt_dialog.training.loss import make_loss_func

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"],
                       packed_seq_params=batch["packed_seq_params"])
        return output, make_loss_func(batch["loss_mask"], batch["loss_token_num"], normalization,
                                      cu_seqlens=batch["conversation_cu_seqlens"])

    return forward_step


def build_parser() -> argparse.ArgumentParser:
    """Every flag of the config dataclasses; a Megatron-LM flag mt_dialog has no field for gets
    a one-line answer saying where the feature lives (``megatron_flags.answer``)."""
    from mt_dialog.training.megatron_flags import answer

    parser = FlagParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                        unknown_flag_answer=answer)
    for title, cls in GROUPS:
        add_arguments(parser, cls, title)
    return parser


def parse_config(argv) -> DialogTrainingConfig:
    args = build_parser().parse_args(argv)
    if args.use_checkpoint_args and args.load:
        from mt_dialog.training.checkpoint import checkpoint_args

        vars(args).update(checkpoint_args(args.load))
    return DialogTrainingConfig(*(from_args(cls, args) for _, cls in GROUPS))


def _error(exc: Exception) -> int:
    """One line per rank, written in one call so that ranks' lines never interleave."""
    sys.stderr.write(f"error: {exc}\n")
    sys.stderr.flush()
    return 1


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from mt_dialog.training.distributed import quiet_megatron_import_warnings

    quiet_megatron_import_warnings()
    try:
        config = parse_config(argv)
        from mt_dialog.training.loop import TrainingError, pretrain

        try:
            pretrain(config, make_forward_step(config.data.loss_normalization),
                     argv=["pretrain_dialog.py", *argv])
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
