"""Hugging Face config reading: supported fields map onto ModelConfig, the rest is refused by
name; RoPE scaling equals transformers'; QKV grouping round-trips."""

import json
import os
import shutil

import pytest
import torch

from mt_dialog.convert.families import (
    FAMILIES,
    ConversionError,
    check_names,
    expected_hf_names,
    hf_config,
    read_hf_config,
)
from mt_dialog.convert.families.common import SafetensorsFolder, Shapes, group_qkv, split_qkv
from mt_dialog.convert.families.registry import fitting_architecture
from mt_dialog.training.config import ModelConfig

pytest.importorskip("transformers")


def _edit(src: str, dst, **changes) -> str:
    """A copy of the model folder ``src`` with config.json fields changed (None removes)."""
    shutil.copytree(src, dst)
    path = os.path.join(dst, "config.json")
    with open(path) as handle:
        config = json.load(handle)
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    with open(path, "w") as handle:
        json.dump(config, handle)
    return str(dst)


def test_llama_and_qwen_fields(hf_models):
    llama = read_hf_config(hf_models["llama"])
    assert llama.architecture == "LlamaForCausalLM"
    m = llama.model
    assert (m.num_layers, m.hidden_size, m.ffn_hidden_size, m.num_attention_heads,
            m.num_query_groups) == (2, 64, 96, 4, 2)
    assert m.untie_embeddings_and_output_weights and not m.add_qkv_bias
    assert m.use_rope_scaling and m.rope_scaling_original_max_position == 64
    assert m.rotary_base == 500000.0 and m.norm_epsilon == 1e-5
    qwen = read_hf_config(hf_models["qwen"])
    assert qwen.architecture == "Qwen2ForCausalLM" and qwen.model.add_qkv_bias
    assert not qwen.model.untie_embeddings_and_output_weights
    assert qwen.model.num_query_groups == 1 and qwen.model.rotary_base == 1e6
    assert qwen.vocab_size == read_hf_config(hf_models["llama"]).vocab_size + 20


def test_qwen3_fields(hf_models):
    qwen3 = read_hf_config(hf_models["qwen3"])
    assert qwen3.architecture == "Qwen3ForCausalLM"
    m = qwen3.model
    assert m.qk_layernorm and not m.add_qkv_bias and not m.untie_embeddings_and_output_weights
    assert (m.num_attention_heads, m.num_query_groups, m.kv_channels) == (4, 2, 32)  # 32 != 64/4
    assert m.norm_epsilon == 1e-6 and m.rotary_base == 1e6
    assert read_hf_config(hf_models["qwen3_untied"]).model.untie_embeddings_and_output_weights
    assert not read_hf_config(hf_models["qwen"]).model.qk_layernorm
    names = expected_hf_names(FAMILIES["Qwen3ForCausalLM"], m)
    assert "model.layers.1.self_attn.k_norm.weight" in names
    assert not any(n.endswith("_proj.bias") for n in names)


def test_qwen3_attention_bias_refused(hf_models, tmp_path):
    folder = _edit(hf_models["qwen3"], tmp_path / "m", attention_bias=True)
    with pytest.raises(ConversionError, match="attention_bias"):
        read_hf_config(folder)


def test_export_architecture_must_fit_the_model():
    """q/k layernorm exports as Qwen3 only; Qwen3 needs it; the error names the one that fits."""
    qwen3 = ModelConfig(hidden_size=64, num_attention_heads=4, qk_layernorm=True)
    assert fitting_architecture(qwen3) == "Qwen3ForCausalLM"
    assert fitting_architecture(ModelConfig(add_qkv_bias=True)) == "Qwen2ForCausalLM"
    config = hf_config(qwen3, "Qwen3ForCausalLM", 128, 256, "fp32", None, None)
    assert config.model_type == "qwen3" and config.head_dim == 16
    for model, architecture in ((qwen3, "LlamaForCausalLM"), (ModelConfig(), "Qwen3ForCausalLM"),
                                (qwen3, "Qwen2ForCausalLM")):
        with pytest.raises(ConversionError, match=f"--architecture {architecture} .* use "
                           f"--architecture {fitting_architecture(model)}"):
            hf_config(model, architecture, 128, 256, "fp32", None, None)
    both = ModelConfig(add_qkv_bias=True, qk_layernorm=True)
    with pytest.raises(ConversionError, match="no supported Hugging Face architecture fits this "
                       r"model: LlamaForCausalLM does not support this model's q/k layernorm .* and QKV "
                       "bias"):
        hf_config(both, "Qwen2ForCausalLM", 128, 256, "fp32", None, None)


@pytest.mark.parametrize("changes,named", [
    ({"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
                          "original_max_position_embeddings": 64}}, "yarn"),
])
def test_unsupported_fields_are_named(hf_models, tmp_path, changes, named):
    folder = _edit(hf_models["llama"], tmp_path / "m", **changes)
    with pytest.raises(ConversionError, match=named):
        read_hf_config(folder)


@pytest.mark.parametrize("name", ["qwen", "qwen3"])
def test_sliding_window_refused(name, hf_models, tmp_path):
    folder = _edit(hf_models[name], tmp_path / "m", use_sliding_window=True, sliding_window=16)
    with pytest.raises(ConversionError, match="sliding"):
        read_hf_config(folder)


def test_missing_and_unknown_tensors_are_named(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "m")
    shutil.copytree(hf_models["qwen"], folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    model = read_hf_config(folder).model
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias"):
        check_names(SafetensorsFolder(folder), FAMILIES["Qwen2ForCausalLM"], model)
    tensors["model.layers.1.self_attn.k_proj.bias"] = torch.zeros(16)
    tensors["model.layers.0.mlp.experts.weight"] = torch.zeros(2)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="experts"):
        check_names(SafetensorsFolder(folder), FAMILIES["Qwen2ForCausalLM"], model)


def test_pytorch_bin_only_folder_is_refused(hf_models, tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(os.path.join(hf_models["qwen"], "config.json"), folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="safe_serialization"):
        SafetensorsFolder(str(folder))


@pytest.mark.parametrize("heads,groups,bias", [(8, 8, False), (8, 2, True), (8, 1, True)])
def test_qkv_grouping_round_trip(heads, groups, bias):
    d, hidden = 4, 32
    shapes = Shapes.of(ModelConfig(hidden_size=hidden, num_attention_heads=heads,
                                   num_query_groups=groups, kv_channels=d))
    tail = () if bias else (hidden,)
    q, k, v = (torch.randn(n * d, *tail) for n in (heads, groups, groups))
    grouped = group_qkv(q, k, v, shapes)
    per = heads // groups
    block = grouped.reshape(groups, (per + 2) * d, *tail)
    assert torch.equal(block[0, : per * d], q[: per * d])  # group 0: its query heads, k0, v0
    assert torch.equal(block[0, per * d: (per + 1) * d], k[:d])
    assert torch.equal(block[-1, (per + 1) * d:], v[-d:])
    for a, b in zip(split_qkv(grouped, shapes), (q, k, v)):
        assert torch.equal(a, b)


def test_llama3_rope_scaling_equals_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from mt_dialog.training.model import llama3_scaled_inv_freq

    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=2048, num_attention_heads=16, rope_theta=500000.0,
                         rope_scaling=scaling, max_position_embeddings=131072)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    model = ModelConfig(hidden_size=2048, num_attention_heads=16, use_rope_scaling=True,
                        rope_scaling_factor=32.0, rope_scaling_original_max_position=8192)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    assert torch.allclose(llama3_scaled_inv_freq(base, model), theirs, rtol=1e-6, atol=0)


def test_missing_qk_norm_is_named(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = str(tmp_path / "m")
    shutil.copytree(hf_models["qwen3"], folder)
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.self_attn\.q_norm\.weight"):
        check_names(SafetensorsFolder(folder), FAMILIES["Qwen3ForCausalLM"],
                    read_hf_config(folder).model)
