"""The optimizer and the learning-rate schedule of a run, on megatron-core.

``build_optimizer`` returns megatron-core's optimizer for the run's precision::

    fp32                    FP32Optimizer                      (main params = model params)
    --bf16 / --fp16         Float16OptimizerWithFloat16Params  (fp32 main params copied from the
                                                                bf16/fp16 model params; --fp16
                                                                adds a loss scaler)
    --use-distributed-opt.  DistributedOptimizer               (fp32 main-param shards per DP rank)

and ``DialogLRScheduler``, megatron's ``OptimizerParamScheduler`` whose linear warmup starts one
step later, so that iteration 1 trains::

    iteration           1        2       ...   W (= --lr-warmup-iters)   W+1 ...
    megatron-core       init     init+d        init+(W-1)d               max, then decay
    DialogLRScheduler   init+d   init+2d       max                       max, then decay
                                                         (d = (max - init) / W)

``_fix_canonical_state_offsets`` works around a megatron-core 0.16.1 bug of the distributed
optimizer's checkpoint when a gradient buffer has several buckets (``--overlap-grad-reduce``
with ``--ddp-bucket-size``, or a tied embedding under pipeline parallelism, which gets its own
bucket): the saved fp32 parameters and Adam moments of every bucket after the first were shifted.

Workarounds of megatron-core 0.16.1 bugs that bite only with **torch's Adam** (what megatron-core
picks when neither Transformer Engine nor apex is installed: every CPU run, and GPU runs without
TE) live here and are applied only to optimizers that wrap ``torch.optim.Adam``/``AdamW``; TE's
``FusedAdam`` keeps ``step`` in its param groups and must not get them (see
``uses_torch_adam``).
"""

from __future__ import annotations

import functools
import types
from typing import Iterator

import torch
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

__all__ = ["DialogLRScheduler", "build_optimizer", "inner_optimizers",
           "prepare_adam_state_for_loading", "uses_torch_adam"]


def build_optimizer(config, model, train_iters: int):
    """(megatron optimizer, ``DialogLRScheduler``) for ``config`` (a ``DialogTrainingConfig``)
    over ``model`` (the DDP-wrapped chunks). With --fp16 the caller sets the TransformerConfig's
    ``grad_scale_func`` to ``optimizer.scale_loss``, as Megatron-LM does."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    optim = config.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1, adam_beta2=optim.adam_beta2, adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad, bf16=optim.bf16, fp16=optim.fp16,
        params_dtype=optim.params_dtype, loss_scale=optim.loss_scale,
        initial_loss_scale=optim.initial_loss_scale, min_loss_scale=optim.min_loss_scale,
        loss_scale_window=optim.loss_scale_window, hysteresis=optim.hysteresis,
        use_distributed_optimizer=config.parallel.use_distributed_optimizer), model)
    _fix_torch_adam_step_on_load(optimizer)
    _fix_canonical_state_offsets(optimizer)
    decay = optim.lr_decay_iters or train_iters
    scheduler = DialogLRScheduler(
        optimizer, init_lr=optim.lr_warmup_init if optim.lr_warmup_iters else optim.lr,
        max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=optim.lr_warmup_iters,
        lr_decay_steps=max(decay, optim.lr_warmup_iters + 1), lr_decay_style=optim.lr_decay_style,
        start_wd=optim.weight_decay, end_wd=optim.weight_decay, wd_incr_steps=max(1, train_iters),
        wd_incr_style="constant",
        # on --load the schedule follows this run's flags (so --train-iters can extend a run);
        # only the step count comes from the checkpoint
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True)
    return optimizer, scheduler


class DialogLRScheduler(OptimizerParamScheduler):
    """megatron-core's ``OptimizerParamScheduler`` with the warmup shifted by one step (see the
    module docstring): the step taken at ``num_steps = n < W`` uses ``init + (max - init) *
    (n + 1) / W``; from ``n = W`` on, megatron's decay is unchanged. Checkpoints keep megatron's
    state dict."""

    def get_lr(self, param_group: dict) -> float:
        if self.lr_warmup_steps > 0 and self.num_steps < self.lr_warmup_steps:
            max_lr = param_group.get("max_lr", self.max_lr)
            return self.init_lr + (max_lr - self.init_lr) * (self.num_steps + 1) \
                / self.lr_warmup_steps
        return super().get_lr(param_group)


def inner_optimizers(optimizer) -> Iterator[torch.optim.Optimizer]:
    """The torch-level optimizers inside a megatron optimizer (chained or not)."""
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(chained, "optimizer", None)
        if isinstance(inner, torch.optim.Optimizer):
            yield inner


def uses_torch_adam(megatron_optimizer) -> bool:
    """Whether the megatron optimizer wraps torch's own Adam/AdamW (not TE's or apex's
    FusedAdam, which subclass ``torch.optim.Optimizer`` but keep ``step`` per param group)."""
    inner = getattr(megatron_optimizer, "optimizer", None)
    return type(inner) in (torch.optim.Adam, torch.optim.AdamW)


def prepare_adam_state_for_loading(optimizer) -> None:
    """Before a resume, give every parameter of a **torch Adam** an (empty) state with ``step``.

    megatron-core 0.16.1's distributed optimizer reads ``step`` from every parameter state when
    building the state dict to load into; with torch's Adam its own state initializer creates
    ``exp_avg``/``exp_avg_sq`` but no ``step``, so a fresh optimizer fails. TE's FusedAdam must
    not get it: its ``state_dict()`` knows only ``exp_avg``, ``exp_avg_sq``, ``master_param``.
    """
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not uses_torch_adam(chained):
            continue
        inner = chained.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if "step" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state.setdefault("exp_avg", torch.zeros_like(param.data))
                    state.setdefault("exp_avg_sq", torch.zeros_like(param.data))


def _fix_torch_adam_step_on_load(optimizer) -> None:
    """Patch, on each ``DistributedOptimizer`` *instance* that wraps torch's Adam, the copy of
    loaded states into the optimizer (megatron-core 0.16.1 bug, GPU or CPU alike).

    ``load_state_dict`` puts ``step`` into every state and then
    ``_set_main_param_and_optimizer_states`` copies *every* state key from the loaded tensors,
    which never include ``step`` (KeyError 'step' when resuming). During that copy only, ``step``
    is set aside; it was already loaded. It is put back as a private copy: megatron gives every
    parameter the *same* step tensor, which torch's Adam increments in place once per parameter
    (after one step of P parameters it would be off by P - 1 and the bias correction wrong).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(chained, DistributedOptimizer) and uses_torch_adam(chained):
            original = chained._set_main_param_and_optimizer_states
            chained._set_main_param_and_optimizer_states = types.MethodType(
                _keep_step_aside(original.__func__), chained)


def _keep_step_aside(original):
    @functools.wraps(original)
    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" in tensors:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step.clone()

    return _set_main_param_and_optimizer_states


def _fix_canonical_state_offsets(optimizer) -> None:
    """Patch, on each ``DistributedOptimizer`` *instance* whose gradient buffers have padding
    between buckets, the gather behind the checkpoint's ``fully_reshardable`` optimizer state
    (megatron-core 0.16.1 bug, GPU or CPU alike; fixed upstream by NVIDIA/Megatron-LM PR #5077,
    commit 32a03b77c5, in no release up to core_v0.17.1).

    ``sharded_param_state_fully_reshardable`` (optimizer/distrib_optimizer.py:1501) cuts each
    parameter's state out of the gathered world tensors at the parameter's index in the *padded*
    gradient buffer (``param_index_map``), but ``get_parameter_state_dp_zero``
    (distrib_optimizer.py:1109-1118) concatenates the buckets *without* the padding at each
    bucket's end (to a multiple of lcm(DP, 128) elements). Every parameter of bucket k > 0 was
    saved from an offset shifted by the padding of buckets 0..k-1 (fp32 main parameter,
    ``exp_avg``, ``exp_avg_sq``): a resume started from wrong weights and moments. Loading
    slices each parameter's own tensor and was right. During that function only, the world
    tensors are put back in the buffer's padded layout, which its indices expect.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(chained, DistributedOptimizer) and _padded_between_buckets(chained):
            original = chained.sharded_param_state_fully_reshardable
            chained.sharded_param_state_fully_reshardable = types.MethodType(
                _gather_in_buffer_layout(original.__func__), chained)


def _padded_between_buckets(optimizer) -> bool:
    """Whether a gradient buffer of ``optimizer`` has padding at the end of a bucket that is not
    its last (the case the bug bites: ``_fix_canonical_state_offsets``)."""
    return any(bucket.grad_data.numel() != bucket.numel_unpadded
               for buffer in getattr(optimizer, "buffers", []) for bucket in buffer.buckets[:-1])


def _gather_in_buffer_layout(original):
    @functools.wraps(original)
    def sharded_param_state_fully_reshardable(self, *args, **kwargs):
        gather = self.get_parameter_state_dp_zero
        self.get_parameter_state_dp_zero = lambda **kw: _in_buffer_layout(self, gather(**kw))
        try:
            return original(self, *args, **kwargs)
        finally:
            del self.get_parameter_state_dp_zero  # the class's method again

    return sharded_param_state_fully_reshardable


def _in_buffer_layout(optimizer, state):
    """``get_parameter_state_dp_zero``'s ``state`` (``{buffer index: {dtype: {key: 1-D float32
    world tensor without the padding at bucket ends}}}``, or None off DP rank 0) with each world
    tensor laid out as its buffer: bucket b's ``numel_unpadded`` elements at ``bucket.offset``,
    zeros in the padding; the buffer's ``numel`` elements in all."""
    if state is None:
        return None
    for index, buffer in enumerate(optimizer.buffers):
        for world_tensors in state[index].values():
            for key in ("param", "exp_avg", "exp_avg_sq"):
                if key not in world_tensors:
                    continue
                compact = world_tensors[key]
                padded = compact.new_zeros(buffer.numel)
                start = 0
                for bucket in buffer.buckets:
                    size = bucket.numel_unpadded
                    padded[bucket.offset: bucket.offset + size] = compact[start: start + size]
                    start += size
                world_tensors[key] = padded
    return state
