"""Layouts beyond the equivalence tests: the interleaved (virtual) pipeline schedule trains,
saves and resumes; sequence parallelism is refused clearly on the local layers."""

import math
import os

import pytest

from tests.training.conftest import iteration_dir, launch, parse_iters, train_args

VPP = ["--pipeline-model-parallel-size", "2", "--virtual-pipeline-model-parallel-size", "2",
       "--num-layers", "4"]


@pytest.mark.multiprocess
def test_virtual_pipeline_trains_saves_and_resumes(packed_data, tmp_path):
    save = tmp_path / "vpp"
    first = launch(2, train_args(packed_data, *VPP, "--save", save, "--lr-decay-iters", "4",
                                 iters=2))
    assert "mt_dialog: TP=1 PP=2 DP=1" in first.stdout
    lines = parse_iters(first.stdout)
    assert [r["iter"] for r in lines] == [1, 2], first.stdout
    assert all(math.isfinite(r["loss_turn"]) and math.isfinite(r["grad_norm"]) for r in lines)
    assert os.path.isfile(os.path.join(iteration_dir(save, 2), "mt_dialog_config.json"))
    resumed = launch(2, train_args(packed_data, *VPP, "--load", save, "--lr-decay-iters", "4",
                                   iters=4))
    assert f"loaded {save} at iteration 2" in resumed.stdout
    assert [r["iter"] for r in parse_iters(resumed.stdout)] == [3, 4], resumed.stdout


def test_sequence_parallel_needs_transformer_engine():
    from mt_dialog.training.config import (
        DataConfig, DialogTrainingConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig)
    from mt_dialog.training.model import transformer_config

    config = DialogTrainingConfig(
        ModelConfig(transformer_impl="local"),
        ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True),
        DataConfig(data_path=["unused"]), OptimConfig(), TrainConfig(train_iters=1))
    with pytest.raises(ValueError, match="^sequence_parallel: needs the Transformer Engine"):
        transformer_config(config)


@pytest.mark.parametrize("pp, vpp, batched", [(2, 2, False), (2, None, True), (4, 2, True)])
def test_batched_p2p_only_where_previous_and_next_stage_differ(pp, vpp, batched):
    """megatron-core's batched p2p is off only for the interleaved schedule at PP=2 (its
    gradients are checked in test_equivalence's virtual-pipeline test)."""
    from mt_dialog.training.config import ParallelConfig
    from mt_dialog.training.model import batch_p2p_comm

    par = ParallelConfig(pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    assert batch_p2p_comm(par) is batched
