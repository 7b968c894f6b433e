"""pretrain_dialog.py with a probe: counts megatron-core's full-recompute checkpoints.

    torchrun --nproc_per_node 1 tests/training/count_recompute.py PRETRAIN_DIALOG_ARGS...

Runs ``pretrain_dialog.main`` unchanged, with ``tensor_parallel.checkpoint`` as megatron-core's
``TransformerBlock`` calls it wrapped in a counter, and prints ``recompute checkpoints: N`` on the
last rank at the end (N = 0 when no layer was recomputed).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def main() -> int:
    from megatron.core.transformer import transformer_block

    import pretrain_dialog

    calls = [0]
    original = transformer_block.tensor_parallel.checkpoint

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    transformer_block.tensor_parallel.checkpoint = counted
    code = pretrain_dialog.main(sys.argv[1:])
    if int(os.environ.get("RANK", "0")) == int(os.environ.get("WORLD_SIZE", "1")) - 1:
        print(f"recompute checkpoints: {calls[0]}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
