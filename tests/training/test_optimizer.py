"""mt_dialog.training.optimizer: the warmup schedule trains from iteration 1, and the torch-Adam
workarounds of megatron-core 0.16.1 reach torch's Adam only (TE's FusedAdam keeps ``step`` in its
param groups; its ``state_dict`` breaks on a per-parameter ``step``), on GPU as on CPU."""

import pytest
import torch

from mt_dialog.training.optimizer import (
    DialogLRScheduler,
    _fix_torch_adam_step_on_load,
    prepare_adam_state_for_loading,
    uses_torch_adam,
)


class FusedAdamLike(torch.optim.Optimizer):
    """Stands in for TE's / apex's FusedAdam: a torch Optimizer subclass, not torch's Adam."""

    def __init__(self, params):
        super().__init__(params, {"lr": 1e-3})


class Wrapper:
    """The part of a megatron optimizer these helpers look at."""

    def __init__(self, inner):
        self.optimizer = inner
        self.param_groups = inner.param_groups


def _params():
    return [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2, 2))]


@pytest.mark.parametrize("warmup, lrs", [
    (4, [0.25, 0.5, 0.75, 1.0, 1.0]),  # iteration 1 trains at lr / warmup, peak at warmup
    (0, [1.0, 1.0, 1.0]),
])
def test_warmup_starts_above_zero(warmup, lrs):
    inner = torch.optim.SGD(_params(), lr=0.0)
    scheduler = DialogLRScheduler(
        Wrapper(inner), init_lr=0.0 if warmup else 1.0, max_lr=1.0, min_lr=0.0,
        lr_warmup_steps=warmup, lr_decay_steps=100, lr_decay_style="constant", start_wd=0.0,
        end_wd=0.0, wd_incr_steps=1, wd_incr_style="constant")
    seen = []
    for _ in lrs:
        seen.append(inner.param_groups[0]["lr"])
        scheduler.step(increment=1)
    assert seen == pytest.approx(lrs)


def test_only_torch_adam_counts_as_torch_adam():
    assert uses_torch_adam(Wrapper(torch.optim.AdamW(_params())))
    assert uses_torch_adam(Wrapper(torch.optim.Adam(_params())))
    assert not uses_torch_adam(Wrapper(FusedAdamLike(_params())))
    assert not uses_torch_adam(Wrapper(torch.optim.SGD(_params(), lr=0.1)))


def test_adam_state_prepared_for_torch_adam_only():
    torch_adam, fused = Wrapper(torch.optim.AdamW(_params())), Wrapper(FusedAdamLike(_params()))
    for wrapper in (torch_adam, fused):
        prepare_adam_state_for_loading(wrapper)
    for param in torch_adam.param_groups[0]["params"]:
        assert set(torch_adam.optimizer.state[param]) == {"step", "exp_avg", "exp_avg_sq"}
    assert not fused.optimizer.state  # FusedAdam's state_dict() must never see a 'step'


def test_distributed_optimizer_step_fix_follows_the_inner_optimizer(monkeypatch):
    """Patched per instance, by the inner optimizer's class, whether or not CUDA is present."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    original = DistributedOptimizer._set_main_param_and_optimizer_states
    instances = {}
    for name, inner in (("torch", torch.optim.AdamW(_params())),
                        ("fused", FusedAdamLike(_params()))):
        instance = object.__new__(DistributedOptimizer)
        instance.optimizer = inner
        _fix_torch_adam_step_on_load(instance)
        instances[name] = instance
    assert "_set_main_param_and_optimizer_states" in vars(instances["torch"])
    assert "_set_main_param_and_optimizer_states" not in vars(instances["fused"])
    assert DistributedOptimizer._set_main_param_and_optimizer_states is original
