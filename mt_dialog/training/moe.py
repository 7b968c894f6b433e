"""Mixture of Experts on megatron-core: the router mt_dialog puts in the layer spec, the scale of
the load-balancing loss under the per-turn loss, and the router load per logging interval.

The aux loss scale
------------------
megatron-core 0.16.1 computes, per micro-batch ``m`` of ``n_m`` routed tokens, the Switch loss
``aux_m = E / (k n_m^2) * sum_i tokens_i * probs_i`` (``moe_utils.switch_load_balancing_loss_func``)
and, under ``calculate_per_token_loss``, attaches ``coeff * aux_m * n_m`` to the graph
(``router.py``, ``attach_and_log_load_balancing_loss``: it assumes the step's gradients are
divided by the global *token* count). ``MoEAuxLossAutoScaler`` multiplies its gradient by the
loss scale only (``pipeline_parallel/schedules.py``, ``forward_step_calc_loss``), and
``finalize_model_grads`` divides every gradient by the step's count ``C``. mt_dialog's count is the
number of turns (or loss tokens, or conversations: ``--loss-normalization``), so megatron's
aux term would be ``coeff * sum_m n_m aux_m / C``: its weight would change with the turns per
token of the data and with the normalization.

mt_dialog defines the term as ``coeff * sum_m (n_m / N) * aux_m`` with ``N = sum_m n_m`` the
tokens of the global batch (all micro-batches, all data-parallel ranks, padding included): the
token-weighted mean of the micro-batch Switch losses, whatever the number of micro-batches, the
data-parallel size, the normalization or the turns in the batch. It is Megatron-LM's meaning of
``--moe-aux-loss-coeff`` without per-token loss (the mean over micro-batches and data-parallel
ranks; micro-batches here hold ``--micro-batch-size`` packs of ``--seq-length`` tokens, so they
weigh the same). ``DialogRouter`` attaches ``coeff * aux_m * n_m * C / N``; the loop sets ``C / N``
before each step (``set_aux_loss_scale``).

The same holds for every score function: with ``--moe-router-score-function sigmoid``
megatron-core's Switch loss takes the sigmoid scores normalized over all experts
(``moe_utils.compute_routing_scores_for_aux_loss``) and the plain top k (no expert bias, no
group limit), and ``DialogRouter`` scales it as above (tested: layout ``moe_routing_ep2``).

Expert bias (``--moe-router-enable-expert-bias``)
------------------------------------------------
megatron-core's ``TopKRouter.expert_bias``, a persistent fp32 buffer (HF's
``e_score_correction_bias``): saved and loaded with the model, never an optimizer parameter.
``TopKRouter._apply_expert_bias`` counts each training forward's tokens per expert
(``local_tokens_per_expert``; not in validation or recompute) and ``finalize_model_grads`` (the
step's gradient reduction) sums them over TP x DP x CP and moves each bias by
``--moe-router-bias-update-rate`` times the sign of (mean load - its load), then zeroes the
counts. mt_dialog's default rate is 0 (the bias stays as loaded; docs/moe.md says why).
``DialogRouter`` keeps both count buffers in fp32 / fp64 under ``--bf16``.

Router load
-----------
``DialogRouter`` adds up, while training, the tokens routed to each expert of its layer;
``take_router_load(model)`` returns them per layer (summed over data-parallel ranks, pipeline
stages gathered) and starts again: the training log shows the busiest expert's share relative
to a perfectly even split.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import TopKRouter

# C / N of the current step: the step's loss count over its routed tokens (see the docstring)
_AUX_SCALE = {"value": 1.0}


def set_aux_loss_scale(step_count: float, step_tokens: float) -> None:
    """Before a training step: ``step_count`` (the global count ``finalize_model_grads`` divides
    by: turns, loss tokens or conversations) and ``step_tokens`` (routed tokens of the global
    batch, padding included)."""
    _AUX_SCALE["value"] = float(step_count) / max(float(step_tokens), 1.0)


def step_count_and_tokens(batches: List[Dict], normalization: str) -> Tuple[int, int]:
    """This rank's share of a step's loss count (what ``loss.dialog_loss`` returns as ``count``
    for ``normalization``, summed over ``batches``: flattened micro-batches of
    ``data.flatten_micro_batch``) and of its routed tokens (``tokens``' elements, padding
    included). Sum both over data-parallel ranks for ``set_aux_loss_scale``."""
    from mt_dialog.training.loss import dialog_loss

    count = tokens = 0
    for batch in batches:
        zeros = torch.zeros(batch["loss_mask"].shape, device=batch["loss_mask"].device)
        count += int(dialog_loss(zeros, batch["loss_mask"], batch["loss_token_num"],
                                 normalization, weights=batch["loss_weights"])[1])
        tokens += batch["tokens"].numel()
    return count, tokens


class DialogRouter(TopKRouter):
    """megatron-core's top-k router with the aux loss weight defined above and the per-expert
    token counts of training kept for the log."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mt_dialog_tokens_per_expert",
                             torch.zeros(self.config.num_moe_experts, dtype=torch.float64),
                             persistent=False)

    def _maintain_float32_expert_bias(self) -> None:
        """megatron-core's method (the expert bias back to fp32 after ``module.bfloat16()``),
        also for the token counts: megatron-core's ``local_tokens_per_expert`` (the expert-bias
        update's load) and this router's own, which bf16 would round above 256 tokens."""
        super()._maintain_float32_expert_bias()
        for name, dtype in (("local_tokens_per_expert", torch.float32),
                            ("mt_dialog_tokens_per_expert", torch.float64)):
            counts = getattr(self, name, None)
            if counts is not None and counts.dtype != dtype:
                setattr(self, name, counts.to(dtype))

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if self.training and torch.is_grad_enabled():  # not in validation or recompute
            with torch.no_grad():
                self.mt_dialog_tokens_per_expert += routing_map.sum(dim=0).to(torch.float64)
        return probs, routing_map

    def attach_and_log_load_balancing_loss(self, activation, aux_loss_coeff, aux_loss,
                                           aux_loss_name, reduce_group,
                                           reduce_group_has_dp=False, valid_token_count=None):
        """megatron-core's method with the token factor ``n_m`` times ``C / N``."""
        num_layers = self.config.num_layers
        save_to_aux_losses_tracker(aux_loss_name, aux_loss / aux_loss_coeff, self.layer_number,
                                   num_layers, reduce_group=reduce_group,
                                   reduce_group_has_dp=reduce_group_has_dp)
        tokens = valid_token_count if valid_token_count is not None else activation.shape[0]
        return MoEAuxLossAutoScaler.apply(activation, aux_loss * tokens * _AUX_SCALE["value"])


def _routers(model: List[torch.nn.Module]):
    for chunk in model:
        for module in chunk.modules():
            if isinstance(module, DialogRouter):
                yield module


def _has_experts(model: List[torch.nn.Module]) -> bool:
    """Whether the model (its chunks, DDP-wrapped or not) is a MoE model, on every stage alike."""
    chunk = model[0]
    config = getattr(chunk, "config", None) or getattr(chunk.module, "config", None)
    return bool(getattr(config, "num_moe_experts", None))


def take_router_load(model: List[torch.nn.Module]) -> Optional[Dict[int, List[float]]]:
    """Tokens routed to each expert since the last call, per layer number (1-based), summed over
    data-parallel ranks and gathered over pipeline stages; resets the counts. Collective over
    every rank; None for a dense model."""
    from megatron.core import parallel_state as ps

    from mt_dialog.training import distributed

    if not _has_experts(model):  # dense
        return None
    routers = list(_routers(model))  # none on a stage of dense layers only (--moe-layer-freq)
    local = {r.layer_number: r.mt_dialog_tokens_per_expert.clone() for r in routers}
    for r in routers:
        r.mt_dialog_tokens_per_expert.zero_()
    for number in sorted(local):
        counts = local[number].to(distributed.device())
        torch.distributed.all_reduce(counts, group=ps.get_data_parallel_group())
        local[number] = counts.cpu().tolist()
    stages = [None] * ps.get_pipeline_model_parallel_world_size()
    torch.distributed.all_gather_object(stages, local,
                                        group=ps.get_pipeline_model_parallel_group())
    return {n: c for stage in stages for n, c in stage.items()}


def load_summary(load: Dict[int, List[float]]) -> Dict[str, float]:
    """Scalars of ``take_router_load``'s counts: ``router load max`` (the busiest expert's tokens
    over the even share, averaged over layers; 1.0 is a perfect balance, E / k the worst) and
    ``router load min`` (the idlest expert's, likewise; 0 when an expert got no token)."""
    ratios_max, ratios_min = [], []
    for counts in load.values():
        mean = sum(counts) / len(counts)
        if mean > 0:
            ratios_max.append(max(counts) / mean)
            ratios_min.append(min(counts) / mean)
    if not ratios_max:
        return {}
    return {"router load max": sum(ratios_max) / len(ratios_max),
            "router load min": sum(ratios_min) / len(ratios_min)}
