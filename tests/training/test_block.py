"""Block features (Gemma 3 norms / GeGLU / embedding scale / two RoPE bases / soft-capping,
gpt-oss clamped SwiGLU and YaRN, GLM-4.5 partial RoPE), each compared with the Hugging Face module
it reproduces (tiny random configs built here, weights copied, fp32 <= 1e-5), then a tiny Gemma 3
GPTModel on the local path: logits == HF Gemma3ForCausalLM, a conversation packed after another
== alone, bf16 forward. Flags: parsed by pretrain_dialog.py's parser, bad combinations refused."""

from __future__ import annotations

import math

import pytest
import torch

TOL = 1e-5


@pytest.fixture(scope="module")
def megatron_process():
    from mt_dialog.training import distributed

    distributed.initialize_single_process(1234)
    yield
    distributed.destroy_single_process()


def _config(**model):
    from mt_dialog.training.config import (
        DataConfig, DialogTrainingConfig, ModelConfig, OptimConfig, ParallelConfig, TrainConfig)

    return DialogTrainingConfig(ModelConfig(**model), ParallelConfig(),
                                DataConfig(data_path=["unused"]), OptimConfig(),
                                TrainConfig(train_iters=1))


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)


# ------------------------------------------------------------------------------ single pieces

def test_zero_centered_rmsnorm_equals_gemma3(megatron_process):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    from mt_dialog.training.block import LocalRMSNorm
    from mt_dialog.training.model import transformer_config

    tconfig = transformer_config(_config(apply_layernorm_1p=True, transformer_impl="local"))
    ours, hf = LocalRMSNorm(tconfig, 64, eps=1e-6), Gemma3RMSNorm(64, eps=1e-6)
    assert torch.equal(ours.weight, torch.zeros(64))  # (1 + w) starts at the identity scale
    _perturb(hf)
    ours.weight.data.copy_(hf.weight)
    x = torch.randn(3, 5, 64) * 4
    assert (ours(x) - hf(x)).abs().max() <= TOL
    assert (ours(x.bfloat16()) == hf(x.bfloat16())).all()  # same fp32 compute, same cast


def _mlp(tconfig):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLP, MLPSubmodules

    return MLP(tconfig, MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                      linear_fc2=RowParallelLinear))


def test_geglu_tanh_mlp_equals_gemma3(megatron_process):
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP

    from mt_dialog.training.model import transformer_config

    hf = Gemma3MLP(Gemma3TextConfig(hidden_size=64, intermediate_size=96))
    _perturb(hf)
    tconfig = transformer_config(_config(openai_gelu=True, ffn_hidden_size=96,
                                         transformer_impl="local"))
    ours = _mlp(tconfig)
    ours.linear_fc1.weight.data.copy_(torch.cat([hf.gate_proj.weight, hf.up_proj.weight]))
    ours.linear_fc2.weight.data.copy_(hf.down_proj.weight)
    x = torch.randn(7, 2, 64)
    assert (ours(x)[0] - hf(x)).abs().max() <= TOL
    # the exact GELU would differ: the test can tell the two apart
    tconfig_erf = transformer_config(_config(ffn_hidden_size=96, transformer_impl="local"))
    assert tconfig_erf.activation_func is not tconfig.activation_func


def test_clamped_swiglu_equals_gpt_oss_expert(megatron_process):
    """gpt-oss: gate clamped above, linear part clamped both sides, gate * sigmoid(1.702 gate)
    * (up + 1). HF stores gate/up interleaved in the columns of ``gate_up_proj`` [E, h, 2f]
    (even: gate, odd: up): megatron's fc1 is [gate rows; up rows] of the transposes."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    from mt_dialog.training.model import transformer_config

    hf = GptOssExperts(GptOssConfig(hidden_size=64, intermediate_size=96, num_local_experts=1))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)  # large enough that both clamps act
    cfg = _config(quick_geglu=True, glu_linear_offset=1.0, activation_func_clamp_value=7.0,
                  ffn_hidden_size=96, transformer_impl="local")
    tconfig = transformer_config(cfg)
    tconfig.add_bias_linear = True
    ours = _mlp(tconfig)
    w, b = hf.gate_up_proj[0], hf.gate_up_proj_bias[0]
    with torch.no_grad():
        ours.linear_fc1.weight.copy_(torch.cat([w[:, ::2].T, w[:, 1::2].T]))
        ours.linear_fc1.bias.copy_(torch.cat([b[::2], b[1::2]]))
        ours.linear_fc2.weight.copy_(hf.down_proj[0].T)
        ours.linear_fc2.bias.copy_(hf.down_proj_bias[0])
    x = torch.randn(9, 1, 64) * 3
    out, bias = ours(x)
    gate_up = x[:, 0] @ w + b
    assert (gate_up[:, ::2] > 7).any() and (gate_up[:, 1::2].abs() > 7).any()
    expected = hf._apply_gate(gate_up) @ hf.down_proj[0] + hf.down_proj_bias[0]
    assert (out[:, 0] + bias - expected).abs().max() <= TOL


def test_partial_rope_equals_glm4_moe(megatron_process):
    """GLM-4.5: partial_rotary_factor 0.5 rotates the first half of each head (rotate-half inside
    it), the rest passes; megatron's rotary_percent does the same, per packed segment."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from transformers import Glm4MoeConfig
    from transformers.models.glm4_moe import modeling_glm4_moe as glm

    hf_config = Glm4MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                              partial_rotary_factor=0.5, max_position_embeddings=64)
    rope = glm.Glm4MoeRotaryEmbedding(hf_config)
    tconfig = _tconfig_with(rotary_percent=0.5)
    ours = RotaryEmbedding(kv_channels=16, rotary_percent=0.5, rotary_base=hf_config.rope_parameters[
        "rope_theta"], use_cpu_initialization=True)
    lengths = [5, 9]
    q = torch.randn(sum(lengths), 4, 16)
    cu = torch.tensor([0, 5, 14], dtype=torch.int32)
    got = apply_rotary_pos_emb(q, ours(max(lengths)), config=tconfig, cu_seqlens=cu)
    for start, n in zip([0, 5], lengths):
        pos = torch.arange(n)[None]
        cos, sin = rope(q, pos)
        qh = q[start:start + n].transpose(0, 1)[None]  # [1, heads, n, d]
        want, _ = glm.apply_rotary_pos_emb(qh, qh, cos, sin)
        assert (got[start:start + n] - want[0].transpose(0, 1)).abs().max() <= TOL
    assert torch.equal(got[:, :, 8:], q[:, :, 8:])  # the second half is not rotated


def _tconfig_with(**model):
    from mt_dialog.training.model import transformer_config

    return transformer_config(_config(transformer_impl="local", **model))


def test_yarn_cos_sin_equal_gpt_oss(megatron_process):
    """gpt-oss YaRN (factor 32, original 4096, beta 32 / 1, truncate false): megatron's
    frequencies and its concentration factor (cos and sin times 0.1 ln(32) + 1, applied by the
    attention from the config) equal HF's ``_compute_yarn_parameters``."""
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding, _yarn_get_concentration_factor_from_config)
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    from mt_dialog.training.block import set_yarn_attributes

    hf_config = GptOssConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                             max_position_embeddings=131072)
    params = hf_config.rope_parameters
    assert params["rope_type"] == "yarn" and params["truncate"] is False
    cfg = _config(transformer_impl="local", kv_channels=16, position_embedding_type="yarn",
                  rotary_base=params["rope_theta"], yarn_rotary_scaling_factor=params["factor"],
                  yarn_original_max_position_embeddings=params["original_max_position_embeddings"],
                  yarn_correction_range_round_to_int=False)
    from mt_dialog.training.model import transformer_config

    tconfig = transformer_config(cfg)
    set_yarn_attributes(tconfig, cfg.model)
    ours = YarnRotaryEmbedding(
        kv_channels=16, rotary_base=params["rope_theta"], scaling_factor=params["factor"],
        original_max_position_embeddings=params["original_max_position_embeddings"],
        correction_range_round_to_int=False, use_cpu_initialization=True)
    emb, _ = ours(300)
    mscale = _yarn_get_concentration_factor_from_config(tconfig)
    assert mscale == pytest.approx(0.1 * math.log(32) + 1)
    cos, sin = GptOssRotaryEmbedding(hf_config)(torch.zeros(1), torch.arange(300)[None])
    half = 8  # HF gpt-oss returns the half table (its rotation splits the head in two halves)
    assert (emb[:, 0, 0, :half].cos() * mscale - cos[0, :, :half]).abs().max() <= TOL
    assert (emb[:, 0, 0, :half].sin() * mscale - sin[0, :, :half]).abs().max() <= TOL


# ------------------------------------------------------------------------------ Gemma 3 model

GEMMA_SEQ = 24
GEMMA_WINDOW = 8  # HF sliding_window: a query sees itself and the 7 tokens before it


def _gemma_pair():
    """(HF Gemma3ForCausalLM, our DialogTrainingConfig) of one tiny Gemma 3: layer 1 sliding
    (local base 10000, window 8 < the sequences of 24 tokens), layer 2 global (base 1e6, linear
    scaling 2), soft-capped logits."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    hf_config = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=GEMMA_WINDOW, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        max_position_embeddings=256, rms_norm_eps=1e-6, final_logit_softcapping=3.0,
        attn_logit_softcapping=None, tie_word_embeddings=True)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = Gemma3ForCausalLM(hf_config).eval()
    _perturb(hf, seed=1)
    config = _config(
        num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, rotary_base=1e6,
        rotary_seq_len_interpolation_factor=2.0, rotary_base_local=1e4, norm_epsilon=1e-6,
        qk_layernorm=True, apply_layernorm_1p=True, sandwich_norm=True, scale_embeddings=True,
        openai_gelu=True, softmax_scale=24 ** -0.5, final_logit_softcapping=3.0,
        window_size=[GEMMA_WINDOW - 1, 0], window_attn_skip_freq=[2], transformer_impl="local")
    return hf, config


def _gemma_state(hf, model_config):
    """Our state dict from HF's, by the Gemma 3 family's rules (its four norms per layer)."""
    from mt_dialog.convert.families.gemma3 import GEMMA3
    from mt_dialog.convert.families.registry import iter_hf_to_mcore

    sd = hf.state_dict()
    state = {}
    for part in iter_hf_to_mcore(GEMMA3, sd.__getitem__, model_config):
        state.update(part)
    return state


def _build_gemma(hf, config):
    """Our GPTModel chunk of ``config`` with ``hf``'s weights (layer 1 sliding, layer 2 full:
    the config's --window-size 7 0 --window-attn-skip-freq 2)."""
    from mt_dialog.training.model import build_model_chunks, transformer_config

    tconfig = transformer_config(config)
    assert tconfig.window_size == (GEMMA_WINDOW - 1, 0) and tconfig.window_attn_skip_freq == 2
    (model,) = build_model_chunks(config, tconfig, 128, GEMMA_SEQ)
    state = {k: v.to(tconfig.params_dtype) for k, v in _gemma_state(hf, config.model).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), missing
    return model.eval()


@pytest.fixture(scope="module")
def gemma(megatron_process):
    hf, config = _gemma_pair()
    return hf, _build_gemma(hf, config)


def test_gemma3_layers_use_two_rope_bases(gemma):
    _, model = gemma
    first, second = model.decoder.layers
    assert first.local_rotary is not None and first.local_rotary.inv_freq[1] == pytest.approx(
        1e4 ** (-2 / 16))
    assert second.local_rotary is None


def test_gemma3_logits_equal_hf(gemma):
    hf, model = gemma
    ids = torch.randint(0, 128, (1, GEMMA_SEQ), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = hf(ids).logits
        got = model(ids, torch.arange(GEMMA_SEQ)[None], None)
    assert want.abs().max() > 1.0  # soft-capping at 3 is reached, not a near-zero output
    assert (got[..., :128] - want).abs().max() <= TOL


def test_gemma3_packed_conversation_equals_alone(gemma):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    _, model = gemma
    gen = torch.Generator().manual_seed(4)
    first, second = torch.randint(0, 128, (1, 9), generator=gen), torch.randint(
        0, 128, (1, 15), generator=gen)
    packed = torch.cat([first, second], dim=1)
    params = packed_seq_params_from_cu_seqlens(torch.tensor([0, 9, 24]))
    with torch.no_grad():
        together = model(packed, None, None, packed_seq_params=params)
        alone = model(second, torch.arange(15)[None], None)
    assert (together[:, 9:] - alone).abs().max() <= 1e-5


def test_gemma3_bf16_forward_runs(gemma):
    """--bf16: every parameter bf16 (the (1 + w) norms compute in fp32 inside), logits close to
    HF's fp32 ones."""
    import dataclasses

    hf, _ = gemma
    _, config = _gemma_pair()
    config = dataclasses.replace(config, optim=dataclasses.replace(config.optim, bf16=True))
    model = _build_gemma(hf, config)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 128, (1, GEMMA_SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(ids, torch.arange(GEMMA_SEQ)[None], None).float()[..., :128]
        want = hf(ids).logits
    assert torch.isfinite(got).all() and (got - want).abs().max() < 0.25


# ------------------------------------------------------------------------------ flags, checks

GEMMA_FLAGS = ["--apply-layernorm-1p", "--sandwich-norm", "--scale-embeddings", "--openai-gelu",
               "--qk-layernorm", "--softmax-scale", "0.0625", "--rotary-base-local", "10000",
               "--final-logit-softcapping", "30"]
GPT_OSS_FLAGS = ["--quick-geglu", "--glu-linear-offset", "1", "--activation-func-clamp-value",
                 "7", "--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "32",
                 "--yarn-original-max-position-embeddings", "4096",
                 "--no-yarn-correction-range-round-to-int"]


def test_block_flags_reach_megatron_core():
    """The Megatron-LM-named flags of pretrain_dialog.py fill the config and megatron-core's
    TransformerConfig; a Llama-style run keeps SwiGLU and its fusions."""
    import torch.nn.functional as F
    from megatron.core.fusions.fused_bias_geglu import quick_gelu
    from pretrain_dialog import parse_config

    from mt_dialog.training.block import gelu_tanh

    base = ["--data-path", "unused", "--train-iters", "1", "--transformer-impl", "local"]
    gemma = parse_config(base + GEMMA_FLAGS).model
    settings = gemma.block_settings(te=True)
    assert settings["layernorm_zero_centered_gamma"] and settings["softmax_scale"] == 0.0625
    assert settings["activation_func"] is gelu_tanh and not settings["bias_activation_fusion"]
    assert gemma.sandwich_norm and gemma.rotary_base_local == 1e4
    oss = parse_config(base + GPT_OSS_FLAGS + ["--rotary-base", "150000"]).model
    settings = oss.block_settings(te=True)
    assert settings["activation_func"] is quick_gelu and settings["glu_linear_offset"] == 1.0
    assert settings["activation_func_clamp_value"] == 7.0 and not settings["apply_rope_fusion"]
    assert oss.yarn_correction_range_round_to_int is False
    llama = parse_config(base + ["--rotary-percent", "0.5"]).model.block_settings(te=True)
    assert llama["activation_func"] is F.silu and llama["bias_activation_fusion"]
    assert llama["apply_rope_fusion"] and not llama["layernorm_zero_centered_gamma"]


@pytest.mark.parametrize("model, message", [
    ({"glu_linear_offset": 1.0}, "glu_linear_offset: --glu-linear-offset applies to "
     "--quick-geglu"),
    ({"openai_gelu": True, "quick_geglu": True}, "quick_geglu: --quick-geglu and --openai-gelu"),
    ({"rotary_percent": 0.3}, "rotary_percent: 0.3 must be in"),
    ({"yarn_beta_fast": 16.0}, "yarn_beta_fast: --yarn-beta-fast needs "
     "--position-embedding-type yarn"),
    ({"position_embedding_type": "yarn"}, "yarn_rotary_scaling_factor: needed by "
     "--position-embedding-type yarn"),
    ({"position_embedding_type": "yarn", "yarn_rotary_scaling_factor": 32.0,
      "yarn_original_max_position_embeddings": 4096, "rotary_percent": 0.5},
     "rotary_percent: --rotary-percent does not combine with --position-embedding-type yarn"),
    ({"final_logit_softcapping": 0.0}, "final_logit_softcapping: must be positive"),
    ({"position_embedding_type": "yarn", "yarn_rotary_scaling_factor": 40.0,
      "yarn_original_max_position_embeddings": 4096, "yarn_mscale": 0.707},
     "yarn_mscale: --yarn-mscale and --yarn-mscale-all-dim go together"),
])
def test_bad_block_settings_are_refused(model, message):
    with pytest.raises(ValueError, match="^" + message):
        _config(**model)


YARN_BLOCK = dict(num_query_groups=2, position_embedding_type="yarn",
                  yarn_rotary_scaling_factor=32.0, yarn_original_max_position_embeddings=16,
                  yarn_correction_range_round_to_int=False, quick_geglu=True,
                  glu_linear_offset=1.0, activation_func_clamp_value=7.0)


@pytest.mark.parametrize("block", [YARN_BLOCK, {"rotary_percent": 0.5, "add_qkv_bias": True}],
                         ids=["gpt-oss-yarn", "glm-partial-rope"])
def test_packed_conversation_equals_alone(megatron_process, block):
    """gpt-oss-style block (YaRN, clamped quick-GELU GLU) and GLM-style partial RoPE on the local
    path: megatron-core's GPTModel yarn branch takes packed 'thd' params, and positions restart
    per conversation (YaRN's concentration factor applied per segment too): a conversation
    packed after another == alone, and != the same tokens without the restart."""
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens
    from mt_dialog.training.model import build_model_chunks, transformer_config

    config = _config(transformer_impl="local", **block)
    (model,) = build_model_chunks(config, transformer_config(config), 128, 32)
    model.eval()
    gen = torch.Generator().manual_seed(6)
    first, second = (torch.randint(0, 128, (1, n), generator=gen) for n in (11, 13))
    params = packed_seq_params_from_cu_seqlens(torch.tensor([0, 11, 24]))
    with torch.no_grad():
        together = model(torch.cat([first, second], 1), None, None, packed_seq_params=params)
        alone = model(second, torch.arange(13)[None], None)
        causal = model(torch.cat([first, second], 1), torch.arange(24)[None], None)
    assert (together[:, 11:] - alone).abs().max() <= 1e-5
    assert (causal[:, 11:] - alone).abs().max() > 1e-3


@pytest.mark.parametrize("extra, expected", [
    (["--glu-linear-offset", "1"], "error: --glu-linear-offset applies to --quick-geglu"),
    (["--position-embedding-type", "yarn", "--yarn-rotary-scaling-factor", "32"],
     "error: --yarn-original-max-position-embeddings: needed by --position-embedding-type yarn"),
    (["--rotary-percent", "0.3"], "error: --rotary-percent: 0.3 must be in (0, 1]"),
    (["--position-embedding-type", "alibi"], "error: argument --position-embedding-type: "
     "invalid choice: 'alibi'"),
])
def test_cli_refuses_bad_block_flags_in_one_line(extra, expected, capsys):
    """pretrain_dialog.py: one error line naming the flag and the fix, before any model."""
    from pretrain_dialog import main

    try:
        code = main(["--data-path", "unused", "--train-iters", "1", *extra])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code in (1, 2) and err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith(expected), err


def test_local_rope_base_needs_sliding_layers(megatron_process):
    from mt_dialog.training.model import build_model_chunks, transformer_config

    config = _config(transformer_impl="local", rotary_base_local=1e4)
    with pytest.raises(ValueError, match="^rotary_base_local: --rotary-base-local is the RoPE "
                       "base of the sliding-window layers, and this model has none"):
        build_model_chunks(config, transformer_config(config), 128, 16)


@pytest.mark.multiprocess  # launches pretrain_dialog.py (one plain process each)
def test_gemma3_block_trains_saves_and_resumes_from_its_flags(packed_data, tmp_path):
    """The CLI path: a Gemma-3-style block (every flag of GEMMA_FLAGS but the local RoPE base,
    which needs the sliding-window settings) trains, its checkpoint holds the sandwich norms, and
    --use-checkpoint-args takes the block flags from it (a run without them starts from the
    checkpoint's loss and goes on learning in bf16)."""
    from tests.training.conftest import (
        iteration_dir, launch, parse_iters, read_checkpoint, train_args)

    flags = GEMMA_FLAGS[:7] + GEMMA_FLAGS[9:]  # all but --rotary-base-local 10000
    assert "--rotary-base-local" not in flags
    save = tmp_path / "gemma"
    first = launch(1, train_args(packed_data, *flags, "--save", save, "--lr-decay-iters", "8",
                                 iters=4))
    lines = parse_iters(first.stdout)
    assert lines[-1]["loss_turn"] < lines[0]["loss_turn"] - 0.5, lines
    state = read_checkpoint(iteration_dir(save, 4))
    norms = sorted(k for k in state if k.startswith("decoder.layers.post_"))
    assert norms == ["decoder.layers.post_mlp_layernorm.weight",
                     "decoder.layers.post_self_attn_layernorm.weight"], norms
    resumed = launch(1, train_args(packed_data, "--load", save, "--use-checkpoint-args",
                                   "--finetune", "--bf16", "--lr-decay-iters", "8", iters=3))
    more = parse_iters(resumed.stdout)
    assert more[0]["loss_turn"] < lines[0]["loss_turn"] - 0.5, (lines, more)
    assert more[-1]["loss_turn"] < more[0]["loss_turn"], more
