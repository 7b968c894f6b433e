"""The family registry: every registered family's config mapping round-trips through its
transformers config class, its tensor names are those transformers' model has, its rules give
back the tensors they took, its LoRA modules exist; the docs' table is the registry's; the
gated-DeltaNet hybrids and unknown architectures are refused by name."""

import dataclasses
import json
import os

import pytest
import torch

from mt_dialog.convert.families import (
    FAMILIES,
    ConversionError,
    docs_table,
    expected_hf_names,
    export_architecture,
    hf_config,
    iter_hf_to_mcore,
    iter_mcore_to_hf,
    read_hf_config,
)
from mt_dialog.convert.families.registry import checkpoint_fields
from mt_dialog.training.config import ModelConfig

pytest.importorskip("transformers")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
            num_query_groups=2, kv_channels=16, untie_embeddings_and_output_weights=True,
            rotary_base=10000.0)
# what each family's ModelConfig has beyond the Llama block
EXTRA = {"LlamaForCausalLM": {}, "MistralForCausalLM": {},
         "Qwen2ForCausalLM": {"add_qkv_bias": True}, "Qwen3ForCausalLM": {"qk_layernorm": True},
         "Qwen3MoeForCausalLM": {"qk_layernorm": True, "num_experts": 4, "moe_router_topk": 2,
                                 "moe_ffn_hidden_size": 24, "moe_router_pre_softmax": True},
         # Mixtral's config has one intermediate_size: the experts' (every layer MoE)
         "MixtralForCausalLM": {"num_experts": 4, "moe_router_topk": 2,
                                "moe_ffn_hidden_size": 24, "ffn_hidden_size": 24},
         # Gemma 3: layer 1 sliding (window 8, local base 1e4), layer 2 full (linear scaling)
         "Gemma3ForCausalLM": {"qk_layernorm": True, "apply_layernorm_1p": True,
                               "sandwich_norm": True, "scale_embeddings": True,
                               "openai_gelu": True, "softmax_scale": 0.25,
                               "window_size": [7, 0], "window_attn_skip_freq": [2],
                               "rotary_base_local": 1e4, "final_logit_softcapping": 30.0,
                               "rotary_seq_len_interpolation_factor": 2.0},
         # gpt-oss: one intermediate_size (the experts'), every layer MoE with biases, sinks,
         # alternating windows, the clamped SwiGLU, YaRN
         "GptOssForCausalLM": {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 24,
                               "ffn_hidden_size": 24, "add_bias_linear": True,
                               "softmax_type": "learnable", "window_size": [7, 0],
                               "window_attn_skip_freq": [2], "quick_geglu": True,
                               "glu_linear_offset": 1.0, "activation_func_clamp_value": 7.0,
                               "position_embedding_type": "yarn",
                               "yarn_rotary_scaling_factor": 4.0,
                               "yarn_original_max_position_embeddings": 16,
                               "yarn_correction_range_round_to_int": False},
         # MLA (YaRN, a query down-projection) + the sigmoid MoE with a dense first layer
         "DeepseekV3ForCausalLM": {
             "num_query_groups": 4, "multi_latent_attention": True, "qk_layernorm": True,
             "q_lora_rank": 12, "kv_lora_rank": 16, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4,
             "v_head_dim": 12, "rope_type": "yarn", "rotary_scaling_factor": 4.0,
             "mscale": 0.707, "mscale_all_dim": 0.707, "original_max_position_embeddings": 16,
             "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 8,
             "moe_shared_expert_intermediate_size": 16, "moe_router_score_function": "sigmoid",
             "moe_router_enable_expert_bias": True, "moe_router_num_groups": 2,
             "moe_router_group_topk": 1, "moe_router_topk_scaling_factor": 2.5,
             "moe_layer_freq": [0, 1]},
         # GLM-4.5: a dense first layer, sigmoid routing with the expert bias, a shared expert
         "Glm4MoeForCausalLM": {"add_qkv_bias": True, "qk_layernorm": True,
                                "rotary_percent": 0.5, "num_experts": 4, "moe_router_topk": 2,
                                "moe_ffn_hidden_size": 24,
                                "moe_shared_expert_intermediate_size": 24,
                                "moe_router_score_function": "sigmoid",
                                "moe_router_enable_expert_bias": True,
                                "moe_router_topk_scaling_factor": 2.5,
                                "moe_layer_freq": [0, 1]}}


def _model(architecture: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **EXTRA[architecture]})


def test_every_family_is_covered_here():
    """A new family gets its entry above (and so these tests)."""
    assert set(EXTRA) == set(FAMILIES)


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_config_round_trip(architecture):
    """ModelConfig -> the family's transformers config -> ModelConfig gives every field the
    family maps back; the config names the family's architecture and model type."""
    family, model = FAMILIES[architecture], _model(architecture)
    config = hf_config(model, architecture, 100, 64, "fp32", 1, 2, 0)
    assert config.architectures == [architecture] and config.model_type == family.model_type
    back = ModelConfig(**family.model_kwargs(config, "config.json"))
    for name in family.model_fields:
        assert getattr(back, name) == getattr(model, name), name


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_tensor_names_and_rules_round_trip(architecture, tmp_path):
    """transformers' own model of the family, saved as users save it, has exactly the names the
    rules expect, and HF -> megatron-core -> HF gives every tensor back."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    family, model = FAMILIES[architecture], _model(architecture)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(hf_config(model, architecture, 100, 64, "fp32", 1, 2))
    hf.save_pretrained(tmp_path)  # transformers 5 fuses experts in memory, not on disk
    state = {k: v for k, v in load_file(tmp_path / "model.safetensors").items()
             if not k.endswith("inv_freq")}
    assert sorted(expected_hf_names(family, model)) == sorted(state)
    mcore = {}
    for group in iter_hf_to_mcore(family, state.__getitem__, model):
        mcore.update(group)
    assert "decoder.layers.1.self_attention.linear_proj.weight" in mcore
    back = {}
    for group in iter_mcore_to_hf(family, mcore, model, 100):
        back.update(group)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("architecture", list(FAMILIES))
def test_lora_modules_exist_in_the_hf_model(architecture):
    from transformers import AutoModelForCausalLM

    family, model = FAMILIES[architecture], _model(architecture)
    hf = AutoModelForCausalLM.from_config(hf_config(model, architecture, 100, 64, "fp32", 1, 2))
    modules = dict(hf.named_modules())
    for target, spec in family.lora_targets(model).items():
        for name in spec.hf_names:
            assert f"model.layers.0.{spec.hf_parent}.{name}" in modules, (target, name)


def test_export_picks_the_family_the_model_fits():
    """auto: the imported family when it fits, else the first that fits (Mistral -> Llama);
    an explicit one that does not fit names the one that does."""
    for architecture in FAMILIES:
        model = _model(architecture)
        assert export_architecture(model, "auto", architecture) == architecture
        assert export_architecture(model, architecture) == architecture
    assert export_architecture(_model("MistralForCausalLM")) == "LlamaForCausalLM"
    assert export_architecture(_model("Qwen3ForCausalLM"), "auto",
                               "Qwen2ForCausalLM") == "Qwen3ForCausalLM"
    mixtral_like = dataclasses.replace(_model("MixtralForCausalLM"), moe_router_pre_softmax=True)
    with pytest.raises(ConversionError, match=r"--architecture MixtralForCausalLM does not "
                       r"support this model's unrenormalized top-k probabilities "
                       r"\(--moe-router-pre-softmax\); no supported Hugging Face architecture fits "
                       "this model: LlamaForCausalLM does not support"):
        export_architecture(mixtral_like, "MixtralForCausalLM")
    sigmoid = dataclasses.replace(_model("Qwen3MoeForCausalLM"),
                                  moe_router_score_function="sigmoid",
                                  moe_router_pre_softmax=False)
    with pytest.raises(ConversionError, match="no supported Hugging Face architecture fits .* "
                       "router score function other than softmax"):
        export_architecture(sigmoid)


def test_checkpoint_args_take_the_families_fields():
    from mt_dialog.training.checkpoint import architecture_fields

    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(checkpoint_fields()) <= names  # every family field is a model flag
    assert set(checkpoint_fields()) <= set(architecture_fields())


def test_docs_table_is_the_registry():
    """docs/huggingface.md's family table is ``python -m mt_dialog.convert.families``'s."""
    with open(os.path.join(REPO, "docs", "huggingface.md"), encoding="utf-8") as handle:
        page = handle.read()
    table = "\n".join("  " + line for line in docs_table().splitlines())
    assert table in page, \
        f"docs/huggingface.md's family table differs from the registry; put:\n{table}"


def _folder(tmp_path, **config):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("config", [
    {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next"},
    {"architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text"},
    {"architectures": ["Qwen3_5MoeForCausalLM"], "model_type": "qwen3_5_moe"},
    {"architectures": ["Qwen3_5MoeForCausalLM"]},
    {"architectures": ["SomethingForCausalLM"], "model_type": "qwen3_next"},
])
def test_gated_deltanet_hybrids_are_refused(tmp_path, config):
    with pytest.raises(ConversionError, match=r"gated DeltaNet refuses packed sequences and "
                       r"needs GPU kernels \(fla, causal_conv1d\); not supported; use Qwen3 / "
                       "Qwen3-MoE"):
        read_hf_config(_folder(tmp_path, **config))


def test_unknown_architecture_lists_the_supported(tmp_path):
    folder = _folder(tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ConversionError, match=r"GPT2LMHeadModel.* is not supported; supported: "
                       + ", ".join(FAMILIES)):
        read_hf_config(folder)
    with pytest.raises(ConversionError, match="--architecture Qwen3NextForCausalLM: .*DeltaNet"):
        export_architecture(ModelConfig(), "Qwen3NextForCausalLM")
