"""torchrun worker: load a converted checkpoint at --tp (or, MoE, --ep) / --pp = 1 and save the
full logits.

    torchrun --nproc_per_node 2 tests/convert/logits_worker.py --load CKPT --tokens T.pt \\
        --out L.pt --tp 2           (or --ep 2: the experts split over 2 data-parallel ranks)

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
    for flag in ("--load", "--tokens", "--out"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE models)")
    parser.add_argument("--vocab", type=int, required=True)
    args = parser.parse_args()
    from megatron.core import parallel_state as ps

    config = dataclasses.replace(single_process_config(ModelConfig(**checkpoint_args(args.load))),
                                 parallel=ParallelConfig(tensor_model_parallel_size=args.tp,
                                                         expert_model_parallel_size=args.ep))
    distributed.initialize(args.tp, 1, None, 1234, expert_parallel=args.ep)
    (model,) = build_model_chunks(config, transformer_config(config), args.vocab, 256)
    load_weights_for_inference(args.load, [model])
    model.eval()
    ids = torch.load(args.tokens)
    with torch.no_grad():
        logits = model(ids, torch.arange(ids.shape[1])[None], None)
        parts = [torch.empty_like(logits) for _ in range(args.tp)]  # vocabulary-parallel
        torch.distributed.all_gather(parts, logits.contiguous(),
                                     group=ps.get_tensor_model_parallel_group())
        logits = torch.cat(parts, dim=-1)
    if torch.distributed.get_rank() == 0:
        torch.save(logits[..., : args.vocab].clone(), args.out)
    ps.destroy_model_parallel()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
