"""Run a tool as if Transformer Engine were installed, on CPU.

    python tests/training/te_like_worker.py pretrain_dialog.py ARGS...
    python tests/training/te_like_worker.py tools/chat.py ARGS...

Where TE imports, megatron-core 0.16.1 builds the final layer norm of every GPTModel from TE's
``TENorm`` even under the local layer spec (``transformer/transformer_block.py``: ``LayerNormImpl``),
and TE modules carry an ``_extra_state`` entry (fp8 metadata) in their state dict, saved as
``decoder.final_layernorm._extra_state``. TE needs CUDA, so this worker stands in for it: an
RMSNorm with an ``_extra_state`` replaces ``LayerNormImpl`` before the tool runs. Checkpoints
written by the plain tools lack that entry; written through this worker they have it.
"""

from __future__ import annotations

import io
import os
import runpy
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class RMSNormWithExtraState(torch.nn.RMSNorm):
    """An RMSNorm whose state dict has ``_extra_state``, as TE's norms do (TE serializes its
    extra state into a uint8 tensor)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__(hidden_size, eps=eps)

    def get_extra_state(self) -> torch.Tensor:
        buffer = io.BytesIO()
        torch.save({"fp8_meta": None}, buffer)
        return torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        if state is not None and not isinstance(state, (torch.Tensor, io.BytesIO)):
            raise TypeError(f"unexpected extra state {type(state)}")


def main() -> None:
    from megatron.core.transformer import transformer_block

    transformer_block.LayerNormImpl = RMSNormWithExtraState
    script = os.path.join(REPO, sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path.insert(0, REPO)
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
