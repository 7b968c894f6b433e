"""Checkpoints load where Transformer Engine is installed and where it is not.

With TE, megatron-core gives the final layer norm TE's ``TENorm`` even under the local spec, and
its ``_extra_state`` becomes a checkpoint entry (``decoder.final_layernorm._extra_state``); a
strict load of a checkpoint written without TE failed with ``Missing key in checkpoint
state_dict``. ``te_like_worker.py`` reproduces that environment on CPU. ``_extra_state`` entries
missing on either side are tolerated; every real tensor stays strict. Also: pipeline stages are
seeded apart, and RNG states are restored only where they were saved (same layout, same device).
"""

import json
import os

import pytest
import torch

from tests.training.conftest import iteration_dir, launch, parse_iters, train_args
from tests.training.launch import run

WORKER = os.path.join("tests", "training", "te_like_worker.py")


def _te_like(script, *args):
    return run(WORKER, 1, [script, *args])  # fails the test, with the output, on an error


def _extra_state_keys(folder, iteration):
    import torch.distributed.checkpoint as dcp

    metadata = dcp.FileSystemReader(iteration_dir(folder, iteration)).read_metadata()
    return [k for k in metadata.state_dict_metadata if "final_layernorm._extra_state" in k]


@pytest.fixture(scope="module")
def plain_and_te(packed_data, tmp_path_factory):
    """plain: 2 iterations without TE; te: resumed from it with TE-like norms to 4 and saved."""
    root = tmp_path_factory.mktemp("te_compat")
    plain, te = root / "plain", root / "te"
    launch(1, train_args(packed_data, "--save", plain, iters=2))
    proc = _te_like("pretrain_dialog.py", *train_args(packed_data, "--load", plain,
                                                      "--save", te, iters=4))
    return {"plain": plain, "te": te, "te_stdout": proc.stdout}


@pytest.mark.multiprocess
def test_a_checkpoint_without_te_resumes_with_te(plain_and_te):
    assert not _extra_state_keys(plain_and_te["plain"], 2)
    assert f"loaded {plain_and_te['plain']} at iteration 2" in plain_and_te["te_stdout"]
    assert [r["iter"] for r in parse_iters(plain_and_te["te_stdout"])] == [3, 4]
    assert _extra_state_keys(plain_and_te["te"], 4)  # the TE-like run saved the entry


@pytest.mark.multiprocess
def test_a_checkpoint_with_te_loads_without_te(plain_and_te, packed_data, tmp_path):
    resumed = launch(1, train_args(packed_data, "--load", plain_and_te["te"], iters=5))
    assert [r["iter"] for r in parse_iters(resumed.stdout)] == [5]
    finetuned = launch(1, train_args(packed_data, "--load", plain_and_te["te"], "--finetune",
                                     iters=1))
    assert "(weights only)" in finetuned.stdout
    from mt_dialog.generate import Generator
    from mt_dialog.training.distributed import destroy_single_process

    try:
        generator = Generator.from_checkpoint(str(plain_and_te["te"]))
        reply = generator.generate([{"role": "user", "content": "What is 2 plus 3?"}],
                                   max_new_tokens=4)
    finally:
        destroy_single_process()
    assert len(reply.token_ids) >= 1


@pytest.mark.multiprocess
def test_chat_with_te_loads_a_checkpoint_written_without_te(plain_and_te):
    proc = _te_like("tools/chat.py", "--load", plain_and_te["plain"], "--max-new-tokens", "4",
                    "--message", "What is 2 plus 3?", "--json")
    reply = json.loads(proc.stdout)
    assert reply["token_ids"] and reply["finish_reason"] in ("end_of_turn", "eos", "max_new_tokens")


@pytest.mark.multiprocess  # plain_and_te trains
def test_missing_real_tensors_are_still_refused(plain_and_te):
    """A model with QKV biases asks for tensors the checkpoint does not have."""
    import dataclasses

    from mt_dialog.training.checkpoint import CheckpointError, load_weights_for_inference
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import inference_config, read_run_info, single_process_model

    info = read_run_info(str(plain_and_te["plain"]))
    config = inference_config(info["config"])
    config.model = dataclasses.replace(config.model, add_qkv_bias=True)
    try:
        model = single_process_model(config, 512, 256)
        with pytest.raises(CheckpointError, match=r"lacks 1 tensors this model needs "
                           r"\(decoder.layers.self_attention.linear_qkv.bias\)"):
            load_weights_for_inference(str(plain_and_te["plain"]), [model])
    finally:
        destroy_single_process()


@pytest.mark.parametrize("pipeline_rank", [0, 1, 3])
def test_pipeline_stages_are_seeded_apart(pipeline_rank, monkeypatch):
    """Megatron-LM's rule: seed + 100 x pipeline rank for every generator, the model-parallel
    RNG tracker (dropout, GPU initialization) included; one seed for all stages would give
    stages that build their layers from the same RNG state identical layers."""
    import random

    import numpy as np
    from megatron.core import parallel_state, tensor_parallel

    from mt_dialog.training.distributed import seed_everything

    tracker_seeds = []
    monkeypatch.setattr(parallel_state, "get_pipeline_model_parallel_rank",
                        lambda: pipeline_rank)
    monkeypatch.setattr(tensor_parallel, "model_parallel_cuda_manual_seed", tracker_seeds.append)
    seed_everything(1234)
    expected = 1234 + 100 * pipeline_rank
    assert torch.initial_seed() == expected and tracker_seeds == [expected]
    state = (random.random(), float(np.random.random()))
    random.seed(expected)
    np.random.seed(expected)
    assert state == (random.random(), float(np.random.random()))


def test_rng_states_restore_only_where_they_were_saved(monkeypatch):
    from mt_dialog.training import checkpoint

    monkeypatch.setattr(checkpoint, "_layout", lambda: (1, 2, 1))
    monkeypatch.setattr(checkpoint, "_rng_device", lambda: "cuda")
    assert not checkpoint._rng_restorable({"layout": [1, 2, 1], "rng_device": "cpu"})
    assert not checkpoint._rng_restorable({"layout": [1, 2, 1]})  # older: written on CPU
    assert checkpoint._rng_restorable({"layout": [1, 2, 1], "rng_device": "cuda"})
    assert not checkpoint._rng_restorable({"layout": [2, 1, 1], "rng_device": "cuda"})
    monkeypatch.setattr(checkpoint, "_rng_device", lambda: "cpu")
    assert checkpoint._rng_restorable({"layout": [1, 2, 1]})


def test_an_older_checkpoints_null_sizes_are_the_derived_ones(tmp_path):
    """Checkpoints saved before the derived sizes were filled in hold null for
    ffn_hidden_size / num_query_groups / kv_channels: --use-checkpoint-args, the architecture
    check of --load and chat's model read them as the sizes a run without the flags gets."""
    import dataclasses

    from mt_dialog.config_utils import to_dict
    from mt_dialog.training.checkpoint import CheckpointError, check_model_matches
    from mt_dialog.training.config import ModelConfig
    from mt_dialog.training.saved_run import inference_config
    from pretrain_dialog import parse_config

    fresh = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    older = dict(to_dict(fresh), ffn_hidden_size=None, num_query_groups=None, kv_channels=None)
    (tmp_path / "iter_0000003").mkdir()
    (tmp_path / "iter_0000003" / "mt_dialog_config.json").write_text(json.dumps({"model": older}))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("3")
    sizes = ("ffn_hidden_size", "num_query_groups", "kv_channels")
    assert None not in [getattr(fresh, name) for name in sizes]  # every reader sees the sizes
    ported = parse_config(["--data-path", "unused", "--train-iters", "1", "--load", str(tmp_path),
                           "--finetune", "--use-checkpoint-args"]).model
    chat = inference_config({"model": older}).model
    for model in (ported, chat):
        assert [getattr(model, name) for name in sizes] == [getattr(fresh, name) for name in sizes]
    check_model_matches(str(tmp_path), fresh)
    with pytest.raises(CheckpointError, match=r"the checkpoint has num_query_groups = 4 but this "
                       r"run has 2; pass --num-query-groups"):
        check_model_matches(str(tmp_path), dataclasses.replace(fresh, num_query_groups=2))
