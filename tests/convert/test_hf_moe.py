"""Mixture-of-Experts import/export: tiny random Qwen3-MoE (norm_topk_prob true and false) and
Mixtral built here; logits equal Hugging Face's at TP=1 (one process) and at EP=2 (the experts
split over two processes), export gives back identical tensors, unsupported layouts are refused."""

import json
import os

import pytest
import torch

from tests.convert.conftest import hf_logits
from tests.convert.test_hf_checkpoint import TOLERANCE
from tests.training.launch import run_torchrun

VOCAB = 96


def _qwen3_moe(norm_topk_prob: bool):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=norm_topk_prob, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=128)
    model = Qwen3MoeForCausalLM(config)
    for layer in model.model.layers:  # random q/k norm weights (they start at one)
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.data.uniform_(0.5, 2.0)
    return model


def _mixtral(_):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=128, tie_word_embeddings=False)
    return MixtralForCausalLM(config)


# Qwen3-MoE without norm_topk_prob (--moe-router-pre-softmax); Mixtral renormalizes the top k
# (megatron-core's default routing, which is also Qwen3-MoE's with norm_topk_prob)
MODELS = {"qwen3_moe": (_qwen3_moe, False), "mixtral": (_mixtral, None)}


def _in_process(convert_fn, config) -> None:
    """``hf_checkpoint.import_hf`` / ``export_hf`` in this process (the command line is tested
    on the dense families; a converter process costs seconds of imports)."""
    from mt_dialog.training.distributed import destroy_single_process

    try:
        convert_fn(config)
    finally:
        destroy_single_process()


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    """{name: (HF folder, imported checkpoint)}."""
    pytest.importorskip("transformers")
    from mt_dialog.convert.hf_checkpoint import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("hf_moe")
    out = {}
    for name, (build, option) in MODELS.items():
        torch.manual_seed(0)
        model = build(option)
        for gate in (m for n, m in model.named_modules() if n.endswith((".mlp.gate", "moe.gate"))):
            gate.weight.data.normal_(0, 0.5)  # routers that choose (they start near uniform)
        folder, ckpt = str(root / name), str(root / f"{name}_ckpt")
        model.save_pretrained(folder)
        _in_process(import_hf, ImportConfig(load_dir=folder, save_dir=ckpt, progress=False))
        out[name] = (folder, ckpt)
    return out


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, VOCAB, (2, 40))


def test_moe_config_reaches_the_checkpoint(moe_models):
    from mt_dialog.training.checkpoint import checkpoint_args

    args = {name: checkpoint_args(ckpt) for name, (_, ckpt) in moe_models.items()}
    assert args["qwen3_moe"]["num_experts"] == 4 and args["qwen3_moe"]["moe_router_topk"] == 2
    assert args["qwen3_moe"]["moe_ffn_hidden_size"] == 24 and args["qwen3_moe"]["qk_layernorm"]
    assert args["qwen3_moe"]["moe_router_pre_softmax"]  # norm_topk_prob false
    assert args["mixtral"]["moe_ffn_hidden_size"] == 24 and not args["mixtral"]["qk_layernorm"]
    assert not args["mixtral"]["moe_router_pre_softmax"]


@pytest.mark.parametrize("name", list(MODELS))
def test_import_tp1_logits_equal_hf(name, moe_models, tokens):
    from mt_dialog.convert.hf_checkpoint import ExportConfig, _load_for_export
    from mt_dialog.training.distributed import destroy_single_process

    folder, ckpt = moe_models[name]
    try:  # the model as mcore-to-hf loads it: TP = PP = EP = 1
        _, _, model, _ = _load_for_export(ExportConfig(load_dir=ckpt, save_dir="unused"))
        with torch.no_grad():
            ours = model(tokens, torch.arange(tokens.shape[1])[None].expand(2, -1), None)
    finally:
        destroy_single_process()
    reference = hf_logits(folder, tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_import_ep2_logits_equal_hf(name, moe_models, tokens, tmp_path):
    folder, ckpt = moe_models[name]
    reference = hf_logits(folder, tokens)
    torch.save(tokens, tmp_path / "tokens.pt")
    run_torchrun("tests/convert/logits_worker.py", 2,
                 ["--load", ckpt, "--tokens", tmp_path / "tokens.pt", "--out",
                  tmp_path / "logits.pt", "--ep", "2", "--vocab", reference.shape[-1]])
    ours = torch.load(tmp_path / "logits.pt")
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("name", list(MODELS))
def test_export_gives_back_identical_tensors(name, moe_models, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from mt_dialog.convert.hf_checkpoint import ExportConfig, export_hf

    folder, ckpt = moe_models[name]
    out = tmp_path / "hf"
    _in_process(export_hf, ExportConfig(load_dir=ckpt, save_dir=str(out), progress=False))
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
    from mt_dialog.convert.hf_config import ConversionError, read_hf_config

    with pytest.raises(ConversionError, match=r"mlp_only_layers \[1\]: dense MLP layers "
                       "between the MoE layers are not supported"):
        read_hf_config(str(folder))
