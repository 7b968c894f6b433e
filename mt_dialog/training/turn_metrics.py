"""Per-turn validation metrics: loss and next-token accuracy by reply length and by turn index.

The reason for the turn-normalized loss is that a token mean lets long replies drown short ones;
these metrics show, on the validation packs, how well replies of each length (and each position
in the conversation) are learned. For one micro-batch (flattened 'thd' positions; the label of
position p is token p + 1)::

    loss_mask       0 0 1 1 1 0 0 0 1 1 0 | 0 1 1 1 1 ...     1: the label is a reply token
    loss_token_num  0 0 3 3 3 0 0 0 2 2 0 | 0 4 4 4 4 ...     the reply's length (end-of-turn in)
    conversation    0 0 0 0 0 0 0 0 0 0 0 | 1 1 1 1 1 ...     from cu_seqlens
    turn (global)       0 0 0       1 1       2 2 2 2         floor(cumsum of mask / length)
    turn index          1           2         1               within its conversation

A turn is one trained reply: its tokens are contiguous and each adds ``1 / loss_token_num``, so
the running sum of those weights numbers the turns without knowing where conversations start;
its index is counted from the first *trained* turn of its conversation (an untrained reply, a
``--train-on last`` history, or a ``--reasoning per-turn`` view's context is not counted).

Reports (each a float64 ``tensor([sum, count])``, summed over micro-batches and data-parallel
ranks before dividing, like ``loss.dialog_loss``'s), for the whole batch (``""``), each reply-length
bucket (``"reply length 5-16"``) and each turn-index bucket (``"turn 1"`` ... ``"turn 4+"``)::

    "<group>: loss per turn"   sum of the turns' token-mean losses, turns
    "<group>: accuracy"        tokens whose greedy (argmax) prediction is the label, tokens
    "<group>: exact turns"     turns whose every token is predicted right, turns

Greedy predictions are teacher-forced (the label is the next token of the data, whatever the
model predicted before) and only over the real vocabulary (the padded rows are never chosen,
as in generation); with tensor parallelism the argmax is taken over all vocabulary shards,
ties going to the lowest id as ``torch.argmax`` does.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from mt_dialog.data.storage import REPLY_LENGTH_EDGES, bucket_names
from mt_dialog.training.loss import turns_completed

TURN_INDEX_GROUPS = ("1", "2", "3", "4+")
PARTS = ("loss per turn", "accuracy", "exact turns")


def report_names(edges: Sequence[int]) -> List[str]:
    """Every report name ``turn_reports`` gives for ``edges``, in a fixed order (every rank
    reduces the same list)."""
    groups = ([""] + [f"reply length {g}" for g in bucket_names(edges)]
              + [f"turn {g}" for g in TURN_INDEX_GROUPS])
    return [f"{group}: {part}" if group else part for group in groups for part in PARTS
            if group or part != "loss per turn"]  # the whole batch's is dialog_loss's


def turn_structure(loss_mask: Tensor, loss_token_num: Tensor, conversation_ids: Tensor
                   ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(positions, turn, length, index)`` for one micro-batch (module docstring): the flat
    positions whose label is trained ([n] int64), the turn of each ([n] int64, 0..turns-1 in
    order), and per turn its length in tokens ([turns] int64, ``loss_token_num``) and its
    1-based index among the trained turns of its conversation ([turns] int64). Inputs: any
    shape, the same number of elements; ``conversation_ids`` integer."""
    mask = loss_mask.reshape(-1) > 0
    positions = torch.nonzero(mask).reshape(-1)
    done = turns_completed(loss_mask, loss_token_num)  # up to and including each position
    ends = torch.diff(done, prepend=done.new_zeros(1))
    turn = (done - ends)[positions].to(torch.int64)  # turns completed before each position
    turns = int(turn[-1]) + 1 if turn.numel() else 0
    first = torch.ones_like(turn, dtype=torch.bool)
    first[1:] = turn[1:] != turn[:-1]
    length = loss_token_num.reshape(-1)[positions[first]].to(torch.int64)
    conversation = conversation_ids.reshape(-1)[positions[first]].to(torch.int64)
    if turns == 0:
        return positions, turn, length, torch.zeros(0, dtype=torch.int64, device=turn.device)
    start = torch.full((int(conversation.max()) + 1,), turns, dtype=torch.int64,
                       device=turn.device)
    start = start.scatter_reduce(0, conversation, torch.arange(turns, device=turn.device),
                                 reduce="amin")
    index = torch.arange(turns, device=turn.device) - start[conversation] + 1
    return positions, turn, length, index


def _group_of_length(length: Tensor, edges: Sequence[int]) -> Tensor:
    bounds = torch.tensor(list(edges), dtype=torch.int64, device=length.device)
    return torch.bucketize(length, bounds, right=False)  # <= edges[0] -> 0, ...


def turn_reports(losses: Tensor, correct: Tensor, loss_mask: Tensor, loss_token_num: Tensor,
                 conversation_ids: Tensor, edges: Sequence[int] = REPLY_LENGTH_EDGES
                 ) -> Dict[str, Tensor]:
    """The reports of ``report_names(edges)`` for one micro-batch: ``losses`` the per-token
    cross entropy and ``correct`` whether the argmax prediction is the label (bool), both with
    the masks' number of elements. Every name is present (zeros where a group is empty)."""
    positions, turn, length, index = turn_structure(loss_mask, loss_token_num, conversation_ids)
    device, turns = losses.device, length.numel()
    token_loss = losses.reshape(-1)[positions].to(torch.float64)
    token_right = correct.reshape(-1)[positions].to(torch.float64)
    turn_loss = torch.zeros(turns, dtype=torch.float64, device=device).index_add(0, turn,
                                                                                 token_loss)
    turn_right = torch.zeros(turns, dtype=torch.float64, device=device).index_add(0, turn,
                                                                                  token_right)
    turn_mean = turn_loss / length.clamp(min=1).to(torch.float64)
    exact = (turn_right == length.to(torch.float64)).to(torch.float64)
    lengths = length.to(torch.float64)
    groups = {"": torch.ones(turns, dtype=torch.bool, device=device)}
    by_length = _group_of_length(length, edges)
    for k, name in enumerate(bucket_names(edges)):
        groups[f"reply length {name}"] = by_length == k
    for k, name in enumerate(TURN_INDEX_GROUPS):
        groups[f"turn {name}"] = index == k + 1 if k + 1 < len(TURN_INDEX_GROUPS) \
            else index >= k + 1
    reports = {}
    for group, selected in groups.items():
        n = selected.to(torch.float64).sum()
        values = {"loss per turn": (turn_mean[selected].sum(), n),
                  "accuracy": (turn_right[selected].sum(), lengths[selected].sum()),
                  "exact turns": (exact[selected].sum(), n)}
        for part, (total, count) in values.items():
            if group or part != "loss per turn":
                reports[f"{group}: {part}" if group else part] = torch.stack([total, count])
    return reports


def greedy_correct(logits: Tensor, labels: Tensor, vocab_size: Optional[int]) -> Tensor:
    """Whether the argmax over the real vocabulary (``vocab_size`` ids; None: every row) of
    ``logits`` is ``labels``: bool, ``labels``' shape. ``logits`` ``[..., V / TP]`` holds this
    tensor-parallel rank's vocabulary shard (megatron's vocab-parallel output layer); the
    shards' maxima are gathered over the tensor-parallel group, ties to the lowest id."""
    from megatron.core import parallel_state as ps

    shard = logits.shape[-1]
    tp = ps.get_tensor_model_parallel_world_size()
    offset = ps.get_tensor_model_parallel_rank() * shard
    real = shard if vocab_size is None else max(0, min(shard, vocab_size - offset))
    best, where = _shard_max(logits[..., :real])  # a view: no copy of the logits
    chosen = where + offset
    if tp > 1:
        group = ps.get_tensor_model_parallel_group()
        bests = [torch.empty_like(best) for _ in range(tp)]
        chosens = [torch.empty_like(chosen) for _ in range(tp)]
        torch.distributed.all_gather(bests, best.contiguous(), group=group)
        torch.distributed.all_gather(chosens, chosen.contiguous(), group=group)
        rank = torch.stack(bests).argmax(dim=0, keepdim=True)  # first max: the lowest shard
        chosen = torch.stack(chosens).gather(0, rank).squeeze(0)
    return chosen == labels.reshape(chosen.shape)


def _shard_max(values: Tensor) -> Tuple[Tensor, Tensor]:
    """``(max, argmax)`` over the last dim in fp32 (first maximum; -inf, 0 for no columns)."""
    if values.shape[-1] == 0:
        empty = values.new_full(values.shape[:-1], float("-inf"), dtype=torch.float32)
        return empty, torch.zeros(values.shape[:-1], dtype=torch.int64, device=values.device)
    where = values.argmax(dim=-1)
    return values.gather(-1, where.unsqueeze(-1)).squeeze(-1).float(), where


def validation_loss(batch: Dict, normalization: str, edges: Sequence[int], logits: Tensor
                    ) -> Tuple[Tensor, Tensor, Dict[str, Tensor]]:
    """The ``loss_func`` of a validation micro-batch (``pretrain_dialog.make_eval_forward_step``):
    ``logits`` ``[1, t, V / TP]`` (the model's output without labels) -> the per-token cross
    entropy (megatron-core's ``vocab_parallel_cross_entropy``, in fp32, as the model computes
    it with labels), ``loss.dialog_loss``'s triple, its report joined by ``turn_reports``.
    ``batch``: ``training.data.flatten_micro_batch``'s dict, with ``vocab_size`` (real ids)."""
    from megatron.core import tensor_parallel

    from mt_dialog.training.loss import dialog_loss

    labels = batch["labels"]
    losses = tensor_parallel.vocab_parallel_cross_entropy(logits.float(), labels)
    loss_sum, count, report = dialog_loss(losses, batch["loss_mask"], batch["loss_token_num"],
                                          normalization, dataset_ids=batch.get("dataset_ids"),
                                          dataset_names=batch.get("dataset_names", ()),
                                          weights=batch["loss_weights"])
    correct = greedy_correct(logits, labels, batch.get("vocab_size"))
    report.update(_whole_batch_turn_reports(batch, losses.detach(), correct, edges))
    return loss_sum, count, report


def _whole_batch_turn_reports(batch: Dict, losses: Tensor, correct: Tensor,
                              edges: Sequence[int]) -> Dict[str, Tensor]:
    """``turn_reports`` of the whole micro-batch: with context parallelism the ranks' per-token
    losses and hits are gathered (``context_parallel.gather_full``) and context-parallel rank 0
    reports them (the others report zeros, so the sums over ranks count each turn once)."""
    from mt_dialog.training.loss import conversation_ids_from_cu_seqlens

    whole = batch.get("cp_full", batch)
    if "cp_full" in batch:
        from mt_dialog.training.context_parallel import gather_full

        losses = gather_full(losses, batch)
        correct = gather_full(correct.to(torch.float32), batch) > 0
    ids = conversation_ids_from_cu_seqlens(whole["conversation_cu_seqlens"],
                                           whole["labels"].numel())
    reports = turn_reports(losses, correct, whole["loss_mask"], whole["loss_token_num"], ids,
                           edges)
    if batch.get("cp_rank", 0):
        reports = {name: torch.zeros_like(value) for name, value in reports.items()}
    return reports


def metrics_table(metrics: Dict[str, float], edges: Sequence[int]) -> str:
    """The validation block of the log: one row per reply-length and turn-index group (turns,
    loss per turn, accuracy, exact turns), from ``loop.evaluate``'s metrics."""
    rows = [("group", "turns", "loss/turn", "accuracy", "exact turns")]
    groups = ([f"reply length {g}" for g in bucket_names(edges)]
              + [f"turn {g}" for g in TURN_INDEX_GROUPS])
    for group in groups:
        turns = metrics.get(f"{group}: turns", 0.0)
        shown = [f"{metrics[f'{group}: {part}']:.4f}" if part == "loss per turn"
                 else f"{metrics[f'{group}: {part}']:.2%}" for part in PARTS]
        rows.append((group, f"{int(turns):,}", *(v if v != "nan" and v != "nan%" else "-"
                                                  for v in shown)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  " + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                                      for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in rows)


def write_metrics(save: str, iteration: int, metrics: Dict[str, float],
                  edges: Sequence[int]) -> str:
    """Write ``SAVE/validation/iter_0000060.json`` beside the checkpoints: ``{"iteration",
    "eval_reply_length_buckets", "metrics"}``, the metrics under their log names (``"loss per
    turn"``, ``"accuracy"``, ``"reply length 1-4: exact turns"``, ``"turn 2: turns"``, ...;
    NaN as null: an empty group); returns its path."""
    import math
    import os

    from mt_dialog.files import write_json_atomic

    folder = os.path.join(save, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"iter_{iteration:07d}.json")
    values = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
              for k, v in metrics.items()}
    write_json_atomic(path, {"iteration": iteration, "eval_reply_length_buckets": list(edges),
                             "metrics": values})
    return path
