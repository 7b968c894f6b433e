"""torchrun worker: load converted checkpoints at --tp (or, MoE, --ep) / --pp = 1 and save their
full logits, one launch for several checkpoints (the i-th --load gives the i-th --out).

    torchrun --nproc_per_node 2 tests/convert/logits_worker.py --load CKPT [CKPT2 ...] \\
        --tokens T.pt --out L.pt [L2.pt ...] --tp 2   (or --ep 2: experts over 2 DP ranks)

The model is built as training builds it (vocabulary padded to 128 x TP, so the checkpoint's
rows are fitted on load); the vocabulary-parallel logits are gathered over the TP group.
"""

import argparse
import dataclasses
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import torch  # noqa: E402

from mt_dialog.training import distributed  # noqa: E402
from mt_dialog.training.checkpoint import checkpoint_args, load_weights_for_inference  # noqa: E402
from mt_dialog.training.config import ModelConfig, ParallelConfig  # noqa: E402
from mt_dialog.training.model import build_model_chunks, transformer_config  # noqa: E402
from mt_dialog.training.saved_run import single_process_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--load", nargs="+", required=True)
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--out", nargs="+", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    parser.add_argument("--vocab", type=int, nargs="+", required=True,
                        help="the real vocabulary of each --load (one value: all of them)")
    args = parser.parse_args()
    from megatron.core import parallel_state as ps

    vocabs = args.vocab * len(args.load) if len(args.vocab) == 1 else args.vocab
    if not len(args.load) == len(args.out) == len(vocabs):
        parser.error(f"{len(args.load)} --load, {len(args.out)} --out, {len(vocabs)} --vocab")
    distributed.initialize(args.tp, 1, None, 1234, expert_parallel=args.ep)
    ids = torch.load(args.tokens)
    for load, out, vocab in zip(args.load, args.out, vocabs):
        logits = full_logits(load, ids, vocab, args)
        if torch.distributed.get_rank() == 0:
            torch.save(logits[..., :vocab].clone(), out)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


def full_logits(load: str, ids, vocab: int, args):
    """The logits of checkpoint ``load`` on ``ids`` [batch, seq], gathered over TP."""
    from megatron.core import parallel_state as ps

    config = dataclasses.replace(single_process_config(ModelConfig(**checkpoint_args(load))),
                                 parallel=ParallelConfig(tensor_model_parallel_size=args.tp,
                                                         expert_model_parallel_size=args.ep))
    (model,) = build_model_chunks(config, transformer_config(config), vocab, 256)
    load_weights_for_inference(load, [model])
    model.eval()
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
        parts = [torch.empty_like(logits) for _ in range(args.tp)]  # vocabulary-parallel
        torch.distributed.all_gather(parts, logits.contiguous(),
                                     group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


if __name__ == "__main__":
    main()
