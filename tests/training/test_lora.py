"""LoRA (``--lora-rank``): adapter gradients equal a plain-PyTorch reference at TP=2, PP=2,
DP=2 (TP = PP = 1) and PP=2 with a virtual pipeline of 2 chunks, the base stays bit-identical through real optimizer steps (bf16 at TP=2, the
distributed optimizer at DP=2), only adapters train, and a LoRA checkpoint saved at TP=2 loads at
PP=2.

One torchrun launch of ``lora_worker.py`` (2 processes) checks every layout in turn; the tests
read its JSON. The flags are checked in-process.
"""

from __future__ import annotations

import json
import math

import pytest

from mt_dialog.training.config import LoraConfig
from tests.training.launch import run_torchrun

WORKER = "tests/training/lora_worker.py"
TOL = 1e-5
LAYOUTS = {"tp2": (2, 1, 1), "pp2": (1, 2, 1), "dp2": (1, 1, 2)}
GRADIENT_LAYOUTS = {**LAYOUTS, "vpp2": (1, 2, 1)}  # vpp2: 4 layers, 2 chunks per stage
ADAPTED = 2 * 4 * 2  # layers x targets x (A, B)


@pytest.fixture(scope="module")
def lora_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "result.json"
    ckpt = tmp_path_factory.mktemp("lora_ckpt")
    run_torchrun(WORKER, 2, ["--json", out, "--ckpt", ckpt], timeout=300)
    return json.loads(out.read_text())


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(GRADIENT_LAYOUTS))
def test_adapter_gradients_equal_reference(lora_result, name):
    res = lora_result[name]["gradient"]
    assert (res["tp"], res["pp"], res["dp"]) == GRADIENT_LAYOUTS[name]
    assert res["chunks"] == (2 if name == "vpp2" else 1)
    assert res["gathered_adapter_max_abs"] == 0.0  # sharding (and fc1's stride) as expected
    assert res["trainable_not_adapter"] == [] and res["main_grad_not_adapter"] == []
    adapted = ADAPTED * (2 if name == "vpp2" else 1)
    assert res["reference_adapter_grads"] == adapted == len(res["grad_names"])
    assert res["max_rel_err"] <= TOL, (res["worst"], res)
    assert res["logged_loss_per_turn"] == pytest.approx(res["loss_ref"], rel=TOL)


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_base_is_bit_identical_after_training(lora_result, name):
    res = lora_result[name]["training"]
    assert res["base_changed"] == [] and res["base_tensors"] >= 14
    assert res["adapters_unchanged"] == []
    assert len(res["losses"]) == 2 and all(math.isfinite(x) for x in res["losses"])
    if name != "pp2":  # fresh adapters (pp2 goes on from the TP=2 checkpoint's)
        assert res["losses"][1] < res["losses"][0]
    # rank 4 on 2 layers: qkv (4*64 + 128*4) + proj (4*64 + 64*4) + fc1 (4*64 + 256*4)
    # + fc2 (4*128 + 64*4), per layer
    assert res["trainable"] == 2 * (768 + 512 + 1280 + 768)
    assert res["total"] > 80_000
    assert res["dtype"] == ("torch.bfloat16" if res["bf16"] else "torch.float32")


@pytest.mark.multiprocess
def test_tp2_checkpoint_loads_at_pp2(lora_result):
    """The LoRA checkpoint saved at TP=2 (adapters + optimizer, pointing to a TP=2 base) loads
    at PP=2: base and adapters equal what TP=2 saved, tensor for tensor."""
    res = lora_result["pp2"]["training"]
    assert (res["reshard_iteration"], res["reshard_consumed"]) == (2, 2 * 3 * 2)  # 2 steps x 3 micro-batches x 2 packs
    assert res["reshard_adapters"] == ADAPTED and res["reshard_tensors"] >= 14 + ADAPTED
    assert res["reshard_differ"] == []


def test_lora_flags_are_validated():
    assert LoraConfig().enabled is False
    cfg = LoraConfig(lora_rank=8, lora_target=["linear_fc2", "linear_qkv"])
    assert cfg.targets == ("linear_qkv", "linear_fc2") and cfg.alpha == 8.0
    assert LoraConfig(lora_rank=8, lora_target=["all"]).targets == (
        "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    for kwargs, message in (
            ({"lora_rank": 0}, "lora_rank: must be positive, got 0"),
            ({"lora_rank": 4, "lora_alpha": -1.0}, "lora_alpha: must be positive"),
            ({"lora_rank": 4, "lora_dropout": 1.0}, "lora_dropout: 1.0 must be in [0, 1)"),
            ({"lora_rank": 4, "lora_target": ["q_proj"]}, "lora_target: 'q_proj' is not one of"),
            ({"lora_alpha": 16.0}, "lora_rank: --lora-alpha needs --lora-rank R")):
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
            LoraConfig(**kwargs)


def test_lora_target_chooses_the_adapted_layers():
    """--lora-target linear_qkv linear_fc2: adapters on those layers only, everything else
    frozen; the adapted model starts equal to the base (B = 0)."""
    import torch

    from mt_dialog.training.config import ModelConfig
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.lora import adapters
    from mt_dialog.training.saved_run import single_process_config, single_process_model

    model_config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                               transformer_impl="local", make_vocab_size_divisible_by=1)
    lora = LoraConfig(lora_rank=2, lora_target=["linear_fc2", "linear_qkv"])
    try:
        base = single_process_model(single_process_config(model_config), 50, 16)
        model = single_process_model(single_process_config(model_config, lora=lora), 50, 16)
        found = adapters([model])
        assert sorted(found) == [f"decoder.layers.{i}.{part}.lora" for i in (0, 1) for part in
                                 ("mlp.linear_fc2", "self_attention.linear_qkv")]
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(".lora." in n for n in trainable)
        assert len(trainable) == 2 * len(found)
        model.load_state_dict(base.state_dict(), strict=False)  # same base weights
        ids = torch.randint(0, 50, (1, 8))
        with torch.no_grad():
            same = model(ids, torch.arange(8)[None], None) - base(ids, torch.arange(8)[None], None)
        assert same.abs().max() == 0
    finally:
        destroy_single_process()


def test_lora_on_a_mixture_of_experts_adapts_attention_only(capsys):
    """--num-experts N: the default --lora-target all means linear_qkv linear_proj (the experts
    get no adapters; the model builds and the banner says so); an explicit linear_fc1/fc2 is
    refused from the command line, before any model, naming the fix."""
    from mt_dialog.training.config import ModelConfig
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.lora import adapters
    from mt_dialog.training.saved_run import single_process_config, single_process_model
    from pretrain_dialog import _error, parse_config

    moe = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                      transformer_impl="local", make_vocab_size_divisible_by=1, num_experts=4,
                      moe_ffn_hidden_size=16)
    config = single_process_config(moe, lora=LoraConfig(lora_rank=2))
    assert config.lora.targets == ("linear_qkv", "linear_proj")
    try:
        found = adapters([single_process_model(config, 50, 16)])
        assert sorted(found) == [f"decoder.layers.{i}.self_attention.{part}.lora"
                                 for i in (0, 1) for part in ("linear_proj", "linear_qkv")]
    finally:
        destroy_single_process()
    with pytest.raises(ValueError, match=r"lora_target: linear_fc1 is the MLP.*--num-experts 4"
                       r".*use --lora-target linear_qkv linear_proj"):
        single_process_config(moe, lora=LoraConfig(lora_rank=2, lora_target=["linear_fc1"]))
    argv = ["--data-path", "d", "--train-iters", "1", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--num-experts", "4", "--lora-rank", "2",
            "--lora-target", "linear_qkv", "linear_fc2"]
    with pytest.raises(ValueError) as refused:
        parse_config(argv)
    _error(refused.value)  # what pretrain_dialog.py prints: one line, the flag named
    assert capsys.readouterr().err.startswith("error: --lora-target: linear_fc2 is the MLP")
