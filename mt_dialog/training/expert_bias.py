"""Training MoE experts with biases (``--add-bias-linear``, gpt-oss) in one expert-parallel and
tensor-parallel rank on megatron-core 0.16.1's ``SequentialMLP`` (the local layers).

megatron-core's expert ``MLP.forward`` adds the fc2 bias times the routing weight to fc2's output
in place (``output += bias * per_token_scale``). With expert and tensor parallel size 1 the
expert's ``RowParallelLinear`` is not ``explicit_expert_comm`` and returns its output through
``reduce_from_tensor_model_parallel_region``, which hands its input back as it is; autograd
forbids modifying such a custom Function's output in place ("Output 0 of
_ReduceFromModelParallelRegion is a view and is being modified inplace"), so the first backward
fails. A forward hook on those fc2 layers returns a copy of the output while autograd records
(the values are the same; with no grad, or at EP / TP > 1, nothing changes).
"""

from __future__ import annotations

import torch


def _copy_output(module, inputs, output):
    out, bias = output
    if torch.is_grad_enabled() and out.requires_grad:
        return out.clone(), bias
    return output


def copy_expert_outputs(gpt_model: torch.nn.Module) -> int:
    """Hook every biased expert ``linear_fc2`` of ``gpt_model`` (a GPTModel chunk) that returns
    its output through the TP reduce (``explicit_expert_comm`` false); returns how many."""
    hooked = 0
    for name, module in gpt_model.named_modules():
        if (name.endswith("linear_fc2") and ".experts." in name
                and getattr(module, "bias", None) is not None
                and not getattr(module, "explicit_expert_comm", True)):
            module.register_forward_hook(_copy_output)
            hooked += 1
    return hooked
