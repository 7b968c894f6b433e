"""Loss functions for megatron-core's ``forward_step`` with ``calculate_per_token_loss=True``.

With ``TransformerConfig.calculate_per_token_loss=True`` a ``loss_func`` returning
``(loss_sum, count, report)`` is neither divided by ``count`` nor by the number of micro-batches
(``schedules.forward_step_calc_loss``); the schedule sums ``count`` over micro-batches and
``finalize_model_grads`` all-reduces that sum over data-parallel (x context-parallel) ranks and
scales every gradient by ``1 / global_count``. ``DistributedDataParallel`` with
``calculate_per_token_loss=True`` sums (does not average) gradients across data-parallel ranks.
So the gradient of a step is ``grad(sum over the global batch of loss_sum) / sum of counts``, and
each normalization below is exact for the *global* batch whatever the micro-batch / DP split.

Inputs (all ``[b, s]``, or ``[1, b*s]`` for the flattened 'thd' layout; any shape works as long as
they match):
  ``losses``          per-token cross entropy (``GPTModel.forward(..., labels=labels)`` output).
  ``loss_mask``       1 where the *label* is an assistant reply token (content or end-of-turn).
  ``loss_token_num``  at those positions, the number of loss tokens of that turn; 0 elsewhere.
                      If a turn is truncated, it must count the tokens actually kept.
  ``conversation_ids`` (for 'conversation' only) int tensor, the index of the conversation each
                      position belongs to (any value where ``loss_mask`` is 0); or pass
                      ``cu_seqlens`` (segment boundaries over the flattened tokens, the same
                      tensor as ``PackedSeqParams.cu_seqlens_q``) and ids are derived from it.

Normalizations, for one micro-batch (``count`` is an int32 tensor, like the schedule's):
  'turn'          loss_sum = sum(l * mask / loss_token_num), count = number of turns.
                  The number of turns is ``round(sum(mask / loss_token_num))`` (each turn adds
                  exactly 1), so it needs nothing beyond the two per-token tensors.
                  Global loss = mean over turns of the turn's token-mean == the "split into n
                  samples" baseline.
  'token'         loss_sum = sum(l * mask), count = number of loss tokens (plain token mean).
  'conversation'  loss_sum = sum over conversations of (their masked token-mean),
                  count = number of conversations with at least one loss token.

``report`` maps a name to a float64 ``tensor([sum, count])`` for each of 'loss per turn',
'loss per token' (and 'loss per conversation' when conversation ids are available); for a
blend of datasets also each dataset's (``dataset_report_names``: ``dataset NAME: loss per
turn``, ...), from the dataset of each position (``training.data.flatten_micro_batch``'s
``dataset_ids``). A text document piece is one turn (``loss_token_num`` its trained tokens), so
'turn' gives every piece equal weight and 'token' the plain token mean of pretraining. Pairs are
summed over micro-batches and all-reduced (SUM) over data-parallel ranks before dividing:
``mt_dialog.training.loop._reduce_reports``. Never average per-micro-batch means.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "NORMALIZATIONS",
    "conversation_ids_from_cu_seqlens",
    "dataset_report_names",
    "dialog_loss",
    "make_loss_func",
]

NORMALIZATIONS = ("turn", "token", "conversation")


def conversation_ids_from_cu_seqlens(cu_seqlens: Tensor, total: int) -> Tensor:
    """Segment index of each of the ``total`` flattened positions (``[1, total]`` int64, on
    ``cu_seqlens``' device) from the segment boundaries ``cu_seqlens`` (``[segments + 1]``, any
    integer dtype); positions after the last boundary get one more index."""
    cu = cu_seqlens.to(torch.int64)
    lengths = cu[1:] - cu[:-1]
    ids = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu.device), lengths)
    if ids.numel() < total:  # positions after cu[-1] (not covered) get their own id
        ids = torch.cat([ids, ids.new_full((total - ids.numel(),), lengths.numel())])
    return ids[:total].view(1, total)


def _turn_weights(loss_mask: Tensor, loss_token_num: Tensor) -> Tensor:
    mask = loss_mask.to(torch.float32)
    ltn = loss_token_num.to(torch.float32)
    return torch.where(mask > 0, mask / ltn.clamp(min=1.0), torch.zeros_like(mask))


def _conversation_terms(
    losses: Tensor, mask: Tensor, conversation_ids: Tensor
) -> Tuple[Tensor, Tensor, Tensor]:
    """(sum over conversations of their token-mean [differentiable], number of conversations
    with a loss token [int64 scalar], loss tokens per conversation)"""
    ids = conversation_ids.reshape(-1).to(torch.int64)
    m = mask.reshape(-1)
    sel = m > 0
    if not bool(sel.any()):
        zero = (losses.reshape(-1) * 0).sum()
        return zero, torch.zeros((), dtype=torch.int64, device=losses.device), None
    ids = ids[sel]
    uniq, inv = torch.unique(ids, return_inverse=True)
    lm = losses.reshape(-1)[sel] * m[sel]
    sums = torch.zeros(uniq.numel(), dtype=lm.dtype, device=lm.device).index_add(0, inv, lm)
    ntok = torch.zeros(uniq.numel(), dtype=m.dtype, device=m.device).index_add(0, inv, m[sel])
    return (sums / ntok).sum(), torch.tensor(uniq.numel(), device=losses.device), ntok


def _terms(losses: Tensor, mask: Tensor, loss_token_num: Optional[Tensor],
           conversation_ids: Optional[Tensor]) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``{report name: (differentiable fp32 sum, int64 count)}`` of the positions ``mask``
    selects (``losses``' shape): per token always, per turn with ``loss_token_num``, per
    conversation with ``conversation_ids``."""
    terms = {"loss per token": ((losses * mask).sum(),
                                mask.detach().sum().round().to(torch.int64))}
    if loss_token_num is not None:
        w = _turn_weights(mask, loss_token_num.reshape(losses.shape))
        terms["loss per turn"] = ((losses * w).sum(),
                                  w.detach().double().sum().round().to(torch.int64))
    if conversation_ids is not None:
        conv_sum, num_convs, _ = _conversation_terms(losses, mask, conversation_ids)
        terms["loss per conversation"] = (conv_sum, num_convs)
    return terms


REPORT_OF = {"turn": "loss per turn", "token": "loss per token",
             "conversation": "loss per conversation"}
"""The report whose (sum, count) each normalization trains on."""


def dataset_report_names(names: Sequence[str]) -> List[str]:
    """The per-dataset reports ``dialog_loss`` gives for a blend of datasets ``names``:
    ``"dataset NAME: loss per turn"`` (per token, per conversation), in a fixed order."""
    return [f"dataset {name}: {report}" for name in names for report in REPORT_OF.values()]


def dialog_loss(
    losses: Tensor,
    loss_mask: Tensor,
    loss_token_num: Optional[Tensor] = None,
    normalization: str = "turn",
    conversation_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dataset_ids: Optional[Tensor] = None,
    dataset_names: Sequence[str] = (),
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """``(loss_sum, count, report)`` for one micro-batch (module docstring): ``loss_sum`` a
    differentiable fp32 scalar, ``count`` an int32 scalar on ``losses``' device, ``report``
    float64 ``[sum, count]`` pairs by name. ``losses`` any shape (any float dtype, computed in
    fp32); ``loss_mask`` and ``loss_token_num`` the same number of elements. With
    ``dataset_ids`` (the blend dataset of each position, integer, same number of elements) the
    report also holds each dataset's pairs, ``dataset_report_names(dataset_names)`` (dataset d
    is ``dataset_names[d]``): the same sums restricted to its positions, so that they add up
    to the whole batch's.

    Raises:
        ValueError: an unknown ``normalization``; 'turn' without ``loss_token_num``;
            'conversation' without ``conversation_ids`` or ``cu_seqlens``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if normalization == "turn" and loss_token_num is None:
        raise ValueError("'turn' normalization needs loss_token_num")
    if normalization == "conversation" and conversation_ids is None and cu_seqlens is None:
        raise ValueError("'conversation' normalization needs conversation_ids or cu_seqlens")
    losses = losses.float()
    if loss_mask.shape != losses.shape:
        loss_mask = loss_mask.reshape(losses.shape)
    mask = loss_mask.to(losses.dtype)
    if conversation_ids is None and cu_seqlens is not None:
        conversation_ids = conversation_ids_from_cu_seqlens(cu_seqlens, losses.numel())
    terms = _terms(losses, mask, loss_token_num, conversation_ids)
    report = {name: torch.stack([total.detach().double(), count.double()])
              for name, (total, count) in terms.items()}
    if dataset_ids is not None:
        ids = dataset_ids.reshape(losses.shape)
        for index, name in enumerate(dataset_names):
            part = _terms(losses.detach(), mask * (ids == index).to(mask.dtype),
                          loss_token_num, conversation_ids)
            report.update({f"dataset {name}: {key}": torch.stack([total.double(), count.double()])
                           for key, (total, count) in part.items()})
    loss_sum, count = terms[REPORT_OF[normalization]]
    return loss_sum, count.to(device=losses.device, dtype=torch.int32), report


def make_loss_func(
    loss_mask: Tensor,
    loss_token_num: Optional[Tensor] = None,
    normalization: str = "turn",
    conversation_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dataset_ids: Optional[Tensor] = None,
    dataset_names: Sequence[str] = (),
):
    """The ``loss_func`` a megatron ``forward_step_func`` returns next to the model output: it
    takes the per-token losses and returns ``dialog_loss``'s triple (arguments as there).

    Raises:
        ValueError: an unknown ``normalization`` (at once, not at the first step).
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return partial(_apply, dict(loss_mask=loss_mask, loss_token_num=loss_token_num,
                                normalization=normalization, conversation_ids=conversation_ids,
                                cu_seqlens=cu_seqlens, dataset_ids=dataset_ids,
                                dataset_names=tuple(dataset_names)))


def _apply(arguments: Dict, output_tensor: Tensor):
    return dialog_loss(output_tensor, **arguments)
