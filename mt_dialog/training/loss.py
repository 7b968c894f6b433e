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
  'power'         between token and turn (``--loss-turn-exponent p``, 0 <= p <= 1): the global
                  loss is ``sum_t l_t / L_t^p  /  sum_turns L^(1 - p)`` (``L_t``: the length of
                  token t's turn), so p = 1 is 'turn' and p = 0 'token'; p = 0.5 weights each
                  token by 1 / sqrt(L) (xtuner's "square" reduction). ``finalize_model_grads``
                  divides by an integer count, so count = number of turns and
                  loss_sum = sum(l / L^p) * s with the step's scale
                  ``s = turns / sum_turns L^(1 - p)`` over the *global* batch, computed before
                  the step (``power_totals``, summed over data x context parallel ranks, then
                  ``set_power_scale``); without it, ``s`` is this micro-batch's own.

``report`` maps a name to a float64 ``tensor([sum, count])`` for each of 'loss per turn',
'loss per token' (and 'loss per conversation' when conversation ids are available, 'loss per
turn (power)' = (sum l / L^p, sum_turns L^(1 - p)) when the weights hold the power terms); for a
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
    "position_weights",
    "power_totals",
    "set_power_scale",
    "turns_completed",
]

NORMALIZATIONS = ("turn", "token", "conversation", "power")
POWER_REPORT = "loss per turn (power)"
"""The report of 'power': ``sum_t l_t / L_t^p`` over ``sum_turns L^(1 - p)`` (a float count)."""


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


def turns_completed(loss_mask: Tensor, loss_token_num: Tensor) -> Tensor:
    """Turns completed up to and including each position: float64 ``[T]`` (flattened) of whole
    numbers, the running sum of ``loss_mask / loss_token_num`` (each turn's weights add up to 1)
    floored with a 1e-6 margin. The sum is taken in float64 from float64 weights: float32's
    rounding of ``1 / L`` (e.g. 1/25 rounds down) would drift by ~1e-8 per turn and miss a
    turn's end after a few dozen turns."""
    mask = loss_mask.reshape(-1).to(torch.float64)
    ltn = loss_token_num.reshape(-1).to(torch.float64).clamp(min=1.0)
    weight = torch.where(mask > 0, mask / ltn, torch.zeros_like(mask))
    return torch.floor(torch.cumsum(weight, 0) + 1e-6)


def position_weights(loss_mask: Tensor, loss_token_num: Optional[Tensor] = None,
                     conversation_ids: Optional[Tensor] = None,
                     turn_exponent: Optional[float] = None) -> Dict[str, Tensor]:
    """Per-position weights and end markers of one whole micro-batch, float32, ``loss_mask``'s
    shape; every sum the loss needs is a plain sum of them over positions, so a micro-batch
    split over context-parallel ranks (``context_parallel``) sums to the same totals::

        loss_mask            0 1 1 1 0 0 1 1 | 0 1 1 ...
        loss_token_num       0 3 3 3 0 0 2 2 | 0 2 2
        turn_weight            1/3 1/3 1/3     1/2 1/2     mask / loss_token_num
        turn_end                     1           1           the turn's last loss position
        conversation_weight    1/5 ...                     mask / the conversation's loss tokens
        conversation_end                         1           its last loss position
        power_weight          3^-p ...       2^-p ...      mask / loss_token_num^p
        turn_power_end               3^(1-p)     2^(1-p)     turn_end * loss_token_num^(1-p)

    A turn's weights add up to exactly 1 (``loss_token_num`` counts the tokens kept), so the
    running sum of ``turn_weight`` reaches the next integer at each turn's last token: that is
    ``turn_end``. ``turn_*`` need ``loss_token_num``, ``conversation_*`` ``conversation_ids``
    (integer, same number of elements), ``power_weight`` and ``turn_power_end`` (the 'power'
    normalization) ``loss_token_num`` and ``turn_exponent`` p; absent inputs leave those keys
    out."""
    mask = loss_mask.to(torch.float32)
    weights = {"loss_mask": mask}
    if loss_token_num is not None:
        ltn = loss_token_num.reshape(mask.shape).to(torch.float32)
        turn = torch.where(mask > 0, mask / ltn.clamp(min=1.0), torch.zeros_like(mask))
        done = turns_completed(mask, ltn)
        ends = torch.diff(done, prepend=done.new_zeros(1)).clamp(0, 1) * (mask.reshape(-1) > 0)
        weights.update(turn_weight=turn, turn_end=ends.to(torch.float32).reshape(mask.shape))
        if turn_exponent is not None:
            weights.update(_power_weights(mask, ltn, weights["turn_end"], float(turn_exponent)))
    if conversation_ids is not None:
        weights.update(_conversation_weights(mask, conversation_ids))
    return weights


def _power_weights(mask: Tensor, ltn: Tensor, turn_end: Tensor, p: float) -> Dict[str, Tensor]:
    """``power_weight`` and ``turn_power_end`` of ``position_weights`` (computed in float64:
    ``L^1`` and ``L^0`` are exact, so p = 1 gives ``turn_weight`` and p = 0 ``loss_mask``)."""
    length = ltn.double().clamp(min=1.0)
    weight = torch.where(mask > 0, mask.double() / length.pow(p), torch.zeros_like(length))
    end = turn_end.double() * length.pow(1.0 - p)
    return {"power_weight": weight.to(torch.float32), "turn_power_end": end.to(torch.float32)}


def _conversation_weights(mask: Tensor, conversation_ids: Tensor) -> Dict[str, Tensor]:
    """``conversation_weight`` and ``conversation_end`` of ``position_weights``."""
    flat = mask.reshape(-1)
    weight, end = torch.zeros_like(flat), torch.zeros_like(flat)
    selected = torch.nonzero(flat > 0).reshape(-1)
    if selected.numel():
        ids = conversation_ids.reshape(-1).to(torch.int64)[selected]
        _, inverse = torch.unique(ids, return_inverse=True)
        count = int(inverse.max()) + 1
        tokens = torch.zeros(count, dtype=flat.dtype, device=flat.device)
        tokens = tokens.index_add(0, inverse, flat[selected])
        weight[selected] = flat[selected] / tokens[inverse]
        last = torch.full((count,), -1, dtype=torch.int64, device=flat.device)
        last = last.scatter_reduce(0, inverse, selected, reduce="amax")
        end[last] = 1.0
    return {"conversation_weight": weight.reshape(mask.shape),
            "conversation_end": end.reshape(mask.shape)}


# report name -> (weight, count marker) in position_weights
_REPORT_WEIGHTS = {"loss per token": ("loss_mask", "loss_mask"),
                   "loss per turn": ("turn_weight", "turn_end"),
                   "loss per conversation": ("conversation_weight", "conversation_end"),
                   POWER_REPORT: ("power_weight", "turn_power_end")}


def _terms(losses: Tensor, weights: Dict[str, Tensor], select: Optional[Tensor] = None
           ) -> Dict[str, Tuple[Tensor, Tensor]]:
    """``{report name: (differentiable fp32 sum, int64 count)}`` over the positions
    (``select``: a 0/1 float mask of them, default all) from ``position_weights``: per token
    always, per turn / per conversation / power where their weights are present (the power
    count, ``sum_turns L^(1 - p)``, is float64, not rounded)."""
    terms = {}
    for name, (weight, marker) in _REPORT_WEIGHTS.items():
        if weight not in weights:
            continue
        w, m = weights[weight].reshape(losses.shape), weights[marker].reshape(losses.shape)
        if select is not None:
            w, m = w * select, m * select
        count = m.detach().double().sum()
        terms[name] = ((losses * w).sum(),
                       count if name == POWER_REPORT else count.round().to(torch.int64))
    return terms


REPORT_OF = {"turn": "loss per turn", "token": "loss per token",
             "conversation": "loss per conversation", "power": POWER_REPORT}
"""The report whose (sum, count) each normalization trains on ('power': up to the step's
scale, ``set_power_scale``)."""


def dataset_report_names(names: Sequence[str], normalization: Optional[str] = None
                         ) -> List[str]:
    """The per-dataset reports ``dialog_loss`` gives for a blend of datasets ``names``:
    ``"dataset NAME: loss per turn"`` (per token, per conversation; and ``POWER_REPORT`` when
    ``normalization`` is 'power'), in a fixed order."""
    reports = [r for r in REPORT_OF.values() if r != POWER_REPORT or normalization == "power"]
    return [f"dataset {name}: {report}" for name in names for report in reports]


def power_totals(batches: Sequence[Dict]) -> Tuple[float, float]:
    """This rank's share of a step's (turns, ``sum_turns L^(1 - p)``): sums of ``turn_end`` and
    ``turn_power_end`` over the ``loss_weights`` of ``batches`` (``data.flatten_micro_batch``'s
    dicts, whole or this context-parallel rank's part). Sum both over data x context parallel
    ranks for ``set_power_scale``."""
    turns = power = 0.0
    for batch in batches:
        weights = batch["loss_weights"]
        if "turn_power_end" not in weights:
            raise ValueError("'power' normalization: the micro-batches' loss weights have no "
                             "power terms; flatten them with turn_exponent (--loss-turn-exponent)")
        turns += float(weights["turn_end"].double().sum())
        power += float(weights["turn_power_end"].double().sum())
    return turns, power


def set_power_scale(batches: Sequence[Dict], turns: float, power: float) -> None:
    """Give each of ``batches`` the step's scale ``turns / power`` (the global batch's turns and
    ``sum_turns L^(1 - p)``, ``power_totals`` summed over data x context parallel ranks; 1 for a
    step without turns): ``dialog_loss`` multiplies the power loss_sum by it, so that the
    gradient ``sum(s l / L^p) / turns`` is the global ``sum(l / L^p) / sum L^(1 - p)``."""
    scale = turns / power if power > 0 else 1.0
    for batch in batches:
        device = batch["loss_weights"]["turn_end"].device
        batch["loss_weights"]["power_scale"] = torch.tensor(scale, dtype=torch.float64,
                                                            device=device)


def dialog_loss(
    losses: Tensor,
    loss_mask: Tensor,
    loss_token_num: Optional[Tensor] = None,
    normalization: str = "turn",
    conversation_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dataset_ids: Optional[Tensor] = None,
    dataset_names: Sequence[str] = (),
    weights: Optional[Dict[str, Tensor]] = None,
    turn_exponent: float = 0.5,
) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """``(loss_sum, count, report)`` for one micro-batch (module docstring): ``loss_sum`` a
    differentiable fp32 scalar, ``count`` an int32 scalar on ``losses``' device, ``report``
    float64 ``[sum, count]`` pairs by name. ``losses`` any shape (any float dtype, computed in
    fp32); ``loss_mask`` and ``loss_token_num`` the same number of elements. With
    ``dataset_ids`` (the blend dataset of each position, integer, same number of elements) the
    report also holds each dataset's pairs, ``dataset_report_names(dataset_names)`` (dataset d
    is ``dataset_names[d]``): the same sums restricted to its positions, so that they add up
    to the whole batch's. ``weights``: ``position_weights`` of these positions computed
    beforehand on the whole micro-batch (context parallelism: ``losses`` is then this rank's
    part and the masks are not needed); default: computed here from the masks (and, for
    'power', ``turn_exponent``; ``weights`` given carry theirs, and the step's scale
    ``power_scale`` when ``set_power_scale`` gave one).

    Raises:
        ValueError: an unknown ``normalization``; 'turn' or 'power' without ``loss_token_num``;
            'conversation' without ``conversation_ids`` or ``cu_seqlens``; 'power' with
            ``weights`` that have no power terms.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    if weights is None:
        weights = _weights_of(losses, loss_mask, loss_token_num, normalization, conversation_ids,
                              cu_seqlens, turn_exponent)
    if normalization in ("turn", "power") and "turn_weight" not in weights:
        raise ValueError(f"'{normalization}' normalization needs loss_token_num")
    if normalization == "power" and "power_weight" not in weights:
        raise ValueError("'power' normalization: the weights have no power terms; compute them "
                         "with position_weights(..., turn_exponent=p)")
    if normalization == "conversation" and "conversation_weight" not in weights:
        raise ValueError("'conversation' normalization needs conversation_ids or cu_seqlens")
    losses = losses.float()
    terms = _terms(losses, weights)
    report = {name: torch.stack([total.detach().double(), count.double()])
              for name, (total, count) in terms.items()}
    if dataset_ids is not None:
        ids = dataset_ids.reshape(losses.shape)
        for index, name in enumerate(dataset_names):
            part = _terms(losses.detach(), weights, (ids == index).to(losses.dtype))
            report.update({f"dataset {name}: {key}": torch.stack([total.double(), count.double()])
                           for key, (total, count) in part.items()})
    loss_sum, count = terms[REPORT_OF[normalization]]
    if normalization == "power":  # count: the turns; the sum scaled to the global definition
        loss_sum, count = _power_loss_sum(loss_sum, count, terms, weights)
    return loss_sum, count.to(device=losses.device, dtype=torch.int32), report


def _power_loss_sum(power_sum: Tensor, power_count: Tensor, terms: Dict, weights: Dict
                    ) -> Tuple[Tensor, Tensor]:
    """'power': (``power_sum`` times the step's scale, the micro-batch's turns); the scale is
    ``weights["power_scale"]`` (``set_power_scale``) or else this micro-batch's own."""
    turns = terms["loss per turn"][1]
    scale = weights.get("power_scale")
    if scale is None:
        scale = turns.double() / power_count if float(power_count) > 0 else power_count.new_ones(())
    return power_sum * scale.to(power_sum.dtype), turns


def _weights_of(losses: Tensor, loss_mask: Tensor, loss_token_num: Optional[Tensor],
                normalization: str, conversation_ids: Optional[Tensor],
                cu_seqlens: Optional[Tensor], turn_exponent: float) -> Dict[str, Tensor]:
    """``position_weights`` of a whole micro-batch given as in ``dialog_loss``."""
    if normalization in ("turn", "power") and loss_token_num is None:
        raise ValueError(f"'{normalization}' normalization needs loss_token_num")
    if normalization == "conversation" and conversation_ids is None and cu_seqlens is None:
        raise ValueError("'conversation' normalization needs conversation_ids or cu_seqlens")
    if loss_mask.numel() != losses.numel():
        raise ValueError(f"loss_mask has {loss_mask.numel()} elements but losses "
                         f"{losses.numel()}; pass the masks of the same positions")
    if conversation_ids is None and cu_seqlens is not None:
        conversation_ids = conversation_ids_from_cu_seqlens(cu_seqlens, losses.numel())
    return position_weights(loss_mask.reshape(losses.shape), loss_token_num, conversation_ids,
                            turn_exponent if normalization == "power" else None)


def make_loss_func(
    loss_mask: Tensor,
    loss_token_num: Optional[Tensor] = None,
    normalization: str = "turn",
    conversation_ids: Optional[Tensor] = None,
    cu_seqlens: Optional[Tensor] = None,
    dataset_ids: Optional[Tensor] = None,
    dataset_names: Sequence[str] = (),
    weights: Optional[Dict[str, Tensor]] = None,
    turn_exponent: float = 0.5,
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
                                dataset_names=tuple(dataset_names), weights=weights,
                                turn_exponent=turn_exponent))


def _apply(arguments: Dict, output_tensor: Tensor):
    return dialog_loss(output_tensor, **arguments)
