"""Mixture of Experts: the flags' checks, the router-load summary, and a run at EP=2 (alltoall
dispatch, load-balancing loss on) that learns, logs the router load, saves its experts, and whose
weights one process trains on at EP=1 in bf16, taking the MoE flags from the checkpoint
(--use-checkpoint-args --finetune --bf16).
The gradient equivalences are in test_equivalence.py (layout moe_ep2); a full resume at another
EP is refused in test_hf_checkpoint.py's MoE fine-tune."""

import math

import re

import pytest
import torch

from tests.training.conftest import iteration_dir, launch, parse_iters, read_checkpoint, train_args

MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
       "--moe-aux-loss-coeff", "0.01"]


def _config(model=None, parallel=None):
    from mt_dialog.training.config import (
        DataConfig, DialogTrainingConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig)

    return DialogTrainingConfig(ModelConfig(**(model or {})), ParallelConfig(**(parallel or {})),
                                DataConfig(data_path=["unused"]), OptimConfig(),
                                TrainConfig(train_iters=1))


@pytest.mark.parametrize("model, parallel, world, message", [
    ({}, {"expert_model_parallel_size": 2}, 2, "expert_model_parallel_size: 2 needs a "
     "Mixture-of-Experts model"),
    ({"num_experts": 3}, {"expert_model_parallel_size": 2}, 2, "expert_model_parallel_size: 2 "
     "must divide --num-experts 3"),
    ({"num_experts": 4}, {"expert_model_parallel_size": 4}, 2, "expert_model_parallel_size: 4 "
     "must divide the data-parallel size 2"),
])
def test_expert_parallel_layouts_are_checked(model, parallel, world, message):
    from mt_dialog.training.config import validate_world

    with pytest.raises(ValueError, match="^" + message):
        validate_world(_config(model, parallel), world)


def test_moe_settings_reach_megatron_core():
    config = _config({"num_experts": 8, "moe_router_topk": 2, "moe_router_pre_softmax": True})
    settings = config.model.moe_settings()
    assert settings["num_moe_experts"] == 8 and settings["moe_router_pre_softmax"] is True
    assert settings["moe_ffn_hidden_size"] == config.model.ffn_hidden_size  # the default
    assert _config().model.moe_settings() == {}
    with pytest.raises(ValueError, match="^num_experts: 1 must be at least 2"):
        _config({"num_experts": 1})
    with pytest.raises(ValueError, match="--tensor-model-parallel-size 2 with --num-experts 4 "
                       "needs --sequence-parallel .* --expert-model-parallel-size instead"):
        _config({"num_experts": 4}, {"tensor_model_parallel_size": 2})
    _config({"num_experts": 4}, {"tensor_model_parallel_size": 2, "sequence_parallel": True})


def test_only_moe_layers_keep_the_mlp_norm_under_its_own_key():
    """Dense checkpoints keep main's keys (the local spec saves the MLP norm as TE's fused
    ``mlp.linear_fc1.layer_norm_weight``: TE <-> local compatibility); a MoE layer has no fc1,
    so its norm is saved as ``pre_mlp_layernorm.weight``, as TE's MoE spec does."""
    from mt_dialog.training.model import layer_spec

    dense = layer_spec(_config({"transformer_impl": "local"})).submodules
    assert dense.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
        "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
    moe = layer_spec(_config({"transformer_impl": "local", "num_experts": 4})).submodules
    assert moe.sharded_state_dict_keys_map == {
        "input_layernorm.": "self_attention.linear_qkv.layer_norm_"}


def test_load_summary():
    from mt_dialog.training.moe import load_summary

    summary = load_summary({1: [10.0, 10.0, 10.0, 10.0], 2: [40.0, 0.0, 0.0, 0.0]})
    assert summary == {"router load max": pytest.approx((1 + 4) / 2),
                       "router load min": pytest.approx(0.5)}


@pytest.mark.multiprocess
def test_moe_run_at_ep2_learns_logs_the_router_and_trains_on_at_ep1_in_bf16(packed_data,
                                                                             text_data, tmp_path):
    save = tmp_path / "moe"
    # 6 + 1 validation packs: the data-parallel ranks (= the expert-parallel ranks) hold 4 and 3
    # of them, and every MoE layer's token dispatch is a collective of both: validation must not
    # hang (the rank with 3 runs an untrained copy as its 4th)
    first = launch(2, train_args(packed_data, *MOE, "--expert-model-parallel-size", "2",
                                 "--moe-token-dispatcher-type", "alltoall", "--save", save,
                                 "--lr-decay-iters", "8", "--eval-interval", "4",
                                 "--valid-data-path", packed_data, text_data, iters=4))
    assert re.search(r"^validation at iter 4 \| loss/turn [0-9.]+ ", first.stdout, re.M), \
        first.stdout
    lines = parse_iters(first.stdout)
    assert [r["iter"] for r in lines] == [1, 2, 3, 4], first.stdout
    assert lines[-1]["loss_turn"] < lines[0]["loss_turn"] - 0.5, lines
    load = [line for line in first.stdout.splitlines() if line.startswith("iter")]
    assert all(" | experts max/mean " in line for line in load), load
    ratio = float(load[-1].split("experts max/mean ")[1].split()[0])
    assert 1.0 <= ratio <= 2.0, load[-1]  # 4 experts, top 2: at most 2x the even share
    state = read_checkpoint(iteration_dir(save, 4))
    experts = {k: tuple(v.shape) for k, v in state.items()
               if k.startswith(("decoder.layers.mlp.", "decoder.layers.pre_mlp"))}
    # every expert of both layers, in the checkpoint [layers, experts, ...] whatever EP saved it
    assert experts == {"decoder.layers.mlp.experts.experts.linear_fc1.weight": (2, 4, 128, 64),
                       "decoder.layers.mlp.experts.experts.linear_fc2.weight": (2, 4, 64, 64),
                       "decoder.layers.mlp.router.weight": (2, 4, 64),
                       "decoder.layers.pre_mlp_layernorm.weight": (2, 64)}, experts
    # ... and trains on at EP=1 in bf16 (the MoE layers' bf16 path on CPU)
    args = train_args(packed_data, "--load", save, "--use-checkpoint-args", "--lr-decay-iters",
                      "8", "--finetune", "--bf16", "--save", tmp_path / "bf16", iters=4)
    resumed = launch(1, args)
    assert f"loaded {save} at iteration 0 (weights only)" in resumed.stdout, resumed.stdout
    more = parse_iters(resumed.stdout)
    assert [r["iter"] for r in more] == [1, 2, 3, 4] and " | experts max/mean " in resumed.stdout
    assert all(math.isfinite(r["loss_turn"]) for r in more)
    # the loaded experts: it starts where the EP=2 run ended, not from scratch
    assert more[0]["loss_turn"] < lines[0]["loss_turn"] - 0.5, (lines, more)
    assert more[-1]["loss_turn"] < more[0]["loss_turn"], more
    # the banner counts every expert once, whatever EP holds them (the checkpoint's tensors)
    counts = [re.search(r" EP=(\d) \| MoE 4 experts, top 2 \|.*trainable parameters "
                        r"([\d,]+) of ([\d,]+)", run.stdout)
              for run in (first, resumed)]
    assert [c[1] for c in counts] == ["2", "1"], (first.stdout, resumed.stdout)
    whole = sum(v.numel() for k, v in state.items() if k.startswith(("embedding.", "decoder."))
                and "_extra_state" not in k)  # tied output layer: the embedding
    assert {c[2] for c in counts} == {c[3] for c in counts} == {f"{whole:,}"}, (counts, whole)
    saved = read_checkpoint(iteration_dir(tmp_path / "bf16", 4))
    fc1 = "decoder.layers.mlp.experts.experts.linear_fc1.weight"
    assert saved[fc1].dtype == torch.bfloat16 and saved[fc1].shape == (2, 4, 128, 64)
