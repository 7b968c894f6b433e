"""Mixture-of-Experts import/export: the tiny random Qwen3-MoE (norm_topk_prob false) and Mixtral
(top k renormalized) of ``conftest.moe_models``; logits equal Hugging Face's at TP=1 (one
process) and at EP=2 (the experts split over two processes, both models in one launch), export
gives back identical tensors, unsupported layouts are refused. The fine-tune from an import at
EP=2 is in test_hf_checkpoint.py."""

import json
import os

import pytest
import torch

from tests.convert.conftest import hf_logits, in_process, parallel_logits
from tests.convert.test_hf_checkpoint import TOLERANCE

# qwen3_moe: without norm_topk_prob (--moe-router-pre-softmax); mixtral renormalizes the top k
# (megatron-core's default routing, which is also Qwen3-MoE's with norm_topk_prob)
MODELS = ["qwen3_moe", "mixtral"]


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 40))  # the tokenizer's byte alphabet: below its size


def test_moe_config_reaches_the_checkpoint(moe_models):
    from mt_dialog.training.checkpoint import checkpoint_args

    args = {name: checkpoint_args(ckpt) for name, (_, ckpt) in moe_models.items()}
    assert args["qwen3_moe"]["num_experts"] == 4 and args["qwen3_moe"]["moe_router_topk"] == 2
    assert args["qwen3_moe"]["moe_ffn_hidden_size"] == 24 and args["qwen3_moe"]["qk_layernorm"]
    assert args["qwen3_moe"]["moe_router_pre_softmax"]  # norm_topk_prob false
    assert args["mixtral"]["moe_ffn_hidden_size"] == 24 and not args["mixtral"]["qk_layernorm"]
    assert not args["mixtral"]["moe_router_pre_softmax"]


@pytest.mark.parametrize("name", MODELS)
def test_import_tp1_logits_equal_hf(name, moe_models, tokens):
    from mt_dialog.convert.hf_checkpoint import ExportConfig, _load_for_export
    from mt_dialog.training.distributed import destroy_single_process

    folder, ckpt = moe_models[name]
    try:  # the model as mcore-to-hf loads it: TP = PP = EP = 1
        _, _, model, _, _ = _load_for_export(ExportConfig(load_dir=ckpt, save_dir="unused"))
        with torch.no_grad():
            ours = model(tokens, torch.arange(tokens.shape[1])[None].expand(2, -1), None)
    finally:
        destroy_single_process()
    reference = hf_logits(folder, tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def ep2_logits(moe_models, tokens, tmp_path_factory):
    """{name: logits} of both imports loaded at EP=2 (the experts split over two processes),
    in one launch."""
    from transformers import AutoConfig

    vocabs = {name: AutoConfig.from_pretrained(folder).vocab_size
              for name, (folder, _) in moe_models.items()}
    return parallel_logits({name: ckpt for name, (_, ckpt) in moe_models.items()}, vocabs, tokens,
                           str(tmp_path_factory.mktemp("ep2_logits")), ["--ep", "2"])


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", MODELS)
def test_import_ep2_logits_equal_hf(name, moe_models, ep2_logits, tokens):
    reference = hf_logits(moe_models[name][0], tokens)
    ours = ep2_logits[name]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", MODELS)
def test_export_gives_back_identical_tensors(name, moe_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from mt_dialog.convert.hf_checkpoint import ExportConfig, export_hf

    folder, ckpt = moe_models[name]
    out = tmp_path / "hf"
    in_process(export_hf, ExportConfig(load_dir=ckpt, save_dir=str(out), progress=False))
    original = load_file(os.path.join(folder, "model.safetensors"))
    exported = load_file(str(out / "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key
    a, b = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(out)
    for field in ("architectures", "num_experts_per_tok", "intermediate_size", "num_local_experts",
                  "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step"):
        assert getattr(a, field, None) == getattr(b, field, None), field


def test_dense_layers_between_moe_layers_are_refused(moe_models, tmp_path):
    folder = tmp_path / "sparse_step"
    folder.mkdir()
    config = json.load(open(os.path.join(moe_models["qwen3_moe"][0], "config.json")))
    json.dump({**config, "mlp_only_layers": [1]}, open(folder / "config.json", "w"))
    from mt_dialog.convert.families import ConversionError, read_hf_config

    with pytest.raises(ConversionError, match=r"mlp_only_layers \[1\]: dense MLP layers "
                       "between the MoE layers are not supported"):
        read_hf_config(str(folder))
