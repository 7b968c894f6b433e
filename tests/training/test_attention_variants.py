"""Attention variants on the local (CPU) path: sliding windows, learnable sinks, MLA.

- ``PackedSDPAttention`` with a window and/or sinks == a plain PyTorch reference (explicit mask,
  softmax over [scores, sink] in float64) per conversation of a pack, fp32 and bf16, on
  conversations longer than the window;
- == Hugging Face's gpt-oss and Gemma 3 eager attention (``eager_attention_forward`` of
  transformers 5.23, with the mask HF builds from ``sliding_window``) given --window-size W-1 0,
  and our model's attention layers == GptOssAttention with the same weights per conversation;
- packed isolation through GPTModel for each variant: a conversation packed after another gives
  the logits it gives alone (the window never reaches into the previous conversation, the sinks
  act per conversation, MLA positions restart), and each variant changes the logits;
- megatron-core's MLA layer == transformers' DeepseekV3Attention (YaRN, interleaved RoPE part,
  q_lora_rank given or None) per conversation of a pack, the HF tensors copied one to one;
- TP=2 == TP=1 for window + sinks and MLA (one torchrun launch, ``attention_tp_worker.py``);
- the flags reach megatron-core's config; bad combinations are refused naming the fix.
"""

from __future__ import annotations

import pytest
import torch

VOCAB = 50


@pytest.fixture(scope="module")
def single_process():
    from mt_dialog.training.distributed import destroy_single_process, initialize_single_process

    initialize_single_process(1234)
    yield
    destroy_single_process()


def _core(window=None, softmax_type="vanilla", heads=4, groups=2, dtype=torch.float32,
          skip_freq=None, layer_number=1):
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.transformer_config import TransformerConfig

    from mt_dialog.training.attention import PackedSDPAttention

    config = TransformerConfig(num_layers=2, hidden_size=8 * heads, num_attention_heads=heads,
                               num_query_groups=groups, window_size=window,
                               window_attn_skip_freq=skip_freq, softmax_type=softmax_type,
                               params_dtype=dtype, use_cpu_initialization=True)
    core = PackedSDPAttention(config, layer_number, AttnMaskType.causal, "self")
    if core.softmax_offset is not None and softmax_type == "learnable":
        with torch.no_grad():
            core.softmax_offset.copy_(torch.linspace(-2, 3, heads).to(dtype))
    return core.eval()


def _reference(q, k, v, cu, scale, left=None, sinks=None):
    """Plain float64 attention per segment: explicit causal (+window) mask, softmax over the
    scores and one sink logit per head (dropped after). q [T, np, d], k/v [T, ng, d]."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.zeros(q.size(0), q.size(1), v.size(2), dtype=torch.float64)
    for a, b in zip(cu[:-1], cu[1:]):
        n = b - a
        scores = torch.einsum("ihd,jhd->hij", q[a:b], k[a:b]) * scale
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        keep = (j <= i) & ((j >= i - left) if left is not None else True)
        scores = scores.masked_fill(~keep, float("-inf"))
        if sinks is not None:
            sink = sinks.double().view(-1, 1, 1).expand(-1, n, 1)
            probs = torch.softmax(torch.cat([scores, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(scores, -1)
        out[a:b] = torch.einsum("hij,jhd->ihd", probs, v[a:b])
    return out


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("window, softmax_type", [
    ((3, 0), "vanilla"), (None, "learnable"), ((2, 0), "learnable"), ((0, 0), "vanilla"),
    (None, "off-by-one")])
def test_packed_attention_matches_the_plain_reference(single_process, window, softmax_type,
                                                      dtype, tol):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    torch.manual_seed(0)
    cu = [0, 9, 20, 24]  # conversations longer than the window, and a short one
    q, k, v = torch.randn(24, 4, 8), torch.randn(24, 2, 8), torch.randn(24, 2, 8)
    core = _core(window, softmax_type, dtype=dtype)
    with torch.no_grad():
        out = core(q.to(dtype), k.to(dtype), v.to(dtype), None,
                   packed_seq_params=packed_seq_params_from_cu_seqlens(torch.tensor(cu)))
    sinks = core.softmax_offset if softmax_type != "vanilla" else None  # off-by-one: zeros
    expected = _reference(q.to(dtype), k.to(dtype), v.to(dtype), cu, core.softmax_scale,
                          window[0] if window else None, sinks)
    assert out.dtype == dtype and out.shape == (24, 32)
    torch.testing.assert_close(out.double().view(24, 4, 8), expected, atol=tol, rtol=tol)
    plain = _reference(q, k, v, cu, core.softmax_scale)
    assert (expected - plain).abs().max() > 0.05  # the variant changes the output


def _hf_mask(length, sliding_window):
    from transformers.masking_utils import sliding_window_causal_mask_function

    fn = sliding_window_causal_mask_function(sliding_window)
    idx = [torch.tensor(n) for n in range(length)]
    keep = torch.tensor([[bool(fn(0, 0, i, j)) for j in idx] for i in idx])
    return torch.zeros(length, length).masked_fill(~keep, float("-inf"))[None, None]


@pytest.mark.parametrize("family", ["gpt_oss", "gemma3"])
def test_window_and_sinks_equal_hugging_face_eager_attention(single_process, family):
    """HF's sliding_window W (a query sees itself and W-1 earlier tokens, transformers 5.23's
    ``sliding_window_overlay``: kv > q - W) is --window-size W-1 0; gpt-oss's sinks are
    softmax_offset."""
    import importlib

    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    hf = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
    torch.manual_seed(1)
    length, sliding_window = 13, 4
    q, k, v = torch.randn(length, 4, 8), torch.randn(length, 2, 8), torch.randn(length, 2, 8)
    core = _core((sliding_window - 1, 0), "learnable" if family == "gpt_oss" else "vanilla")
    module = torch.nn.Module().eval()
    module.num_key_value_groups, module.head_dim = 2, 8
    module.sinks = core.softmax_offset
    to_hf = lambda x: x.transpose(0, 1)[None]  # [T, n, d] -> [1, n, T, d]
    with torch.no_grad():
        expected, _ = hf.eager_attention_forward(module, to_hf(q), to_hf(k), to_hf(v),
                                                 _hf_mask(length, sliding_window),
                                                 scaling=core.softmax_scale, dropout=0.0)
        out = core(q, k, v, None, packed_seq_params=packed_seq_params_from_cu_seqlens(
            torch.tensor([0, length])))
    torch.testing.assert_close(out.view(length, 4, 8), expected[0], atol=1e-5, rtol=1e-5)
    wide = _core((sliding_window, 0), "learnable" if family == "gpt_oss" else "vanilla")
    with torch.no_grad():  # control: a window one token wider is another attention
        if wide.softmax_offset is not None:
            wide.softmax_offset.copy_(core.softmax_offset)
        other = wide(q, k, v, None, packed_seq_params=packed_seq_params_from_cu_seqlens(
            torch.tensor([0, length])))
    assert (other.view(length, 4, 8) - expected[0]).abs().max() > 1e-3


def test_window_attn_skip_freq_picks_the_full_layers(single_process):
    """megatron-core's rule: N -> every N-th layer (1-based) full; a 0/1 list -> 1 windowed.
    gpt-oss (sliding, full, ...) is 2; Gemma 3 (5 sliding, 1 full) is 6."""
    windows = [_core((3, 0), skip_freq=2, layer_number=n).window for n in (1, 2, 3, 4)]
    assert windows == [(3, 0), None, (3, 0), None]
    listed = [_core((3, 0), skip_freq=[0, 1], layer_number=n).window for n in (1, 2)]
    assert listed == [None, (3, 0)]


# ------------------------------------------------------------------ through GPTModel, packed

MLA = dict(multi_latent_attention=True, kv_lora_rank=16, qk_head_dim=8, qk_pos_emb_head_dim=4,
           v_head_dim=12, qk_layernorm=True)
YARN = dict(MLA, q_lora_rank=12, rope_type="yarn", rotary_scaling_factor=4.0, mscale=0.707,
            mscale_all_dim=0.707, original_max_position_embeddings=8)
VARIANTS = {
    "window": dict(window_size=[3, 0], window_attn_skip_freq=[2]),
    "sinks": dict(softmax_type="learnable"),
    "window+sinks": dict(window_size=[2, 0], softmax_type="learnable"),
    "mla": MLA,
    "mla-yarn": YARN,
}


def _model(dtype=torch.float32, **fields):
    from mt_dialog.training.config import ModelConfig
    from mt_dialog.training.saved_run import single_process_config, single_process_model

    config = ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4,
                         transformer_impl="local", make_vocab_size_divisible_by=1,
                         init_method_std=0.3, **fields)
    model = single_process_model(single_process_config(config), VOCAB, 64, dtype=dtype, seed=7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "softmax_offset" in name:
                param.normal_(0, 1.5)
    return model.eval()


def _logits(model, ids, cu):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])[None]
    with torch.no_grad():
        return model(ids, positions, None, packed_seq_params=packed_seq_params_from_cu_seqlens(
            torch.tensor(cu))).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_conversation_packed_after_another_gives_its_logits_alone(variant, dtype):
    from mt_dialog.training.distributed import destroy_single_process

    torch.manual_seed(3)
    first, second = torch.randint(0, VOCAB, (1, 9)), torch.randint(0, VOCAB, (1, 14))
    try:
        model = _model(dtype, **VARIANTS[variant])
        packed = _logits(model, torch.cat([first, second], 1), [0, 9, 23])
        alone = _logits(model, second, [0, 14])
        torch.testing.assert_close(packed[:, 9:], alone, atol=0, rtol=0)
        # the variant is active: the same weights without it give other logits
        plain_fields = {}
        if variant.startswith("mla"):
            plain_fields = dict(MLA)
            if variant == "mla":  # positions matter: a shifted start changes the logits
                shifted = _logits(model, torch.cat([first, second], 1), [0, 23])
                assert (shifted[:, 9:] - alone).abs().max() > 1e-3
                return
            plain_fields["q_lora_rank"] = 12
        plain = _model(dtype, **plain_fields)
        plain.load_state_dict(model.state_dict(), strict=False)
        assert (_logits(plain, second, [0, 14]) - alone).abs().max() > 1e-3
    finally:
        destroy_single_process()


# --------------------------------------------------------------------- flags and refusals

def _config(*extra):
    from pretrain_dialog import parse_config

    return parse_config(["--data-path", "data/unused", "--train-iters", "2",
                         "--transformer-impl", "local", *map(str, extra)])


def test_flags_reach_megatron_core():
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from mt_dialog.training.model import transformer_config

    tconfig = transformer_config(_config("--num-layers", "4", "--window-size", "127", "0",
                                         "--window-attn-skip-freq", "2",
                                         "--softmax-type", "learnable"), initialize=False)
    assert (tconfig.window_size, tconfig.window_attn_skip_freq, tconfig.softmax_type) == (
        (127, 0), 2, "learnable")
    listed = transformer_config(_config("--num-layers", "3", "--window-size", "4", "0",
                                        "--window-attn-skip-freq", "1", "1", "0"))
    assert listed.window_attn_skip_freq == [1, 1, 0]
    mla = transformer_config(_config(
        "--multi-latent-attention", "--qk-layernorm", "--kv-lora-rank", "32", "--q-lora-rank",
        "24", "--qk-head-dim", "16", "--qk-pos-emb-head-dim", "8", "--v-head-dim", "16",
        "--rope-type", "yarn", "--rotary-scaling-factor", "40", "--mscale", "1",
        "--mscale-all-dim", "1", "--original-max-position-embeddings", "4096",
        "--beta-fast", "32", "--beta-slow", "1"), initialize=False)
    assert isinstance(mla, MLATransformerConfig) and mla.multi_latent_attention
    assert (mla.q_lora_rank, mla.kv_lora_rank, mla.qk_head_dim, mla.qk_pos_emb_head_dim,
            mla.v_head_dim, mla.rope_type, mla.rotary_scaling_factor, mla.mscale_all_dim) == (
        24, 32, 16, 8, 16, "yarn", 40.0, 1.0)
    lite = transformer_config(_config("--multi-latent-attention"), initialize=False)
    assert lite.q_lora_rank is None and lite.rope_type == "rope"


@pytest.mark.parametrize("extra, message", [
    (["--window-size", "4", "2"], r"window_size: \[4, 2\] must be LEFT 0"),
    (["--window-size", "-1", "0"], r"window_size: \[-1, 0\] must be LEFT 0 with LEFT >= 0"),
    (["--window-attn-skip-freq", "2"], "window_attn_skip_freq: --window-attn-skip-freq needs "
                                       "--window-size LEFT 0"),
    (["--window-size", "4", "0", "--window-attn-skip-freq", "0"],
     "window_attn_skip_freq: 0 must be >= 1"),
    (["--window-size", "4", "0", "--window-attn-skip-freq", "1", "0", "1"],
     r"window_attn_skip_freq: \[1, 0, 1\] must be one 0/1 value per layer \(2 for "),
    (["--kv-lora-rank", "32"], "kv_lora_rank: --kv-lora-rank needs --multi-latent-attention"),
    (["--multi-latent-attention", "--mscale", "0.7"], "mscale: --mscale needs --rope-type yarn"),
    (["--multi-latent-attention", "--qk-pos-emb-head-dim", "7"],
     "qk_pos_emb_head_dim: 7 must be even"),
    (["--multi-latent-attention", "--use-rope-scaling"],
     "multi_latent_attention: MLA has its own RoPE"),
    (["--multi-latent-attention", "--num-query-groups", "2"],
     "multi_latent_attention: MLA gives every head its own key and value"),
    (["--multi-latent-attention", "--lora-rank", "2", "--lora-target", "linear_qkv"],
     "lora_target: linear_qkv does not exist with --multi-latent-attention"),
])
def test_bad_combinations_are_refused_naming_the_fix(extra, message):
    with pytest.raises(ValueError, match="^" + message):
        _config(*extra)


def test_lora_all_on_mla_means_the_layers_it_has():
    assert _config("--multi-latent-attention", "--lora-rank", "2").lora.targets == (
        "linear_proj", "linear_fc1", "linear_fc2")
    assert _config("--multi-latent-attention", "--lora-rank", "2", "--num-experts",
                   "4").lora.targets == ("linear_proj",)


def test_cli_refusal_is_one_line(capsys):
    from pretrain_dialog import main

    try:
        code = main(["--data-path", "data/unused", "--train-iters", "2", "--window-size", "4",
                     "1"])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "Traceback" not in err
    assert err.startswith("error: --window-size: [4, 1] must be LEFT 0"), err


# --------------------------------------------------------------------------- tensor parallel

@pytest.mark.multiprocess  # one torchrun launch of 2 processes
def test_tensor_parallel_gives_the_logits_of_one_process(tmp_path):
    """TP=2 (attention_tp_worker.py: window + sinks, Lite MLA, MLA with a q rank and YaRN) ==
    TP=1 built from the gathered weights, and from the TP=2 checkpoint resharded to TP=1; the
    sinks are split by head (2 of 4 per rank). And context parallelism (CP=2) == TP=1."""
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import single_process_config, single_process_model
    from tests.training import attention_tp_worker as worker
    from tests.training.launch import run_torchrun

    out = tmp_path / "tp2.pt"
    run_torchrun("tests/training/attention_tp_worker.py", 2, [str(out), str(tmp_path)],
                 timeout=300)
    results = torch.load(out)
    assert results["window+sinks"]["sink_shapes"] == [(2,), (2,)]
    for name, fields in worker.VARIANTS.items():
        try:
            model = single_process_model(single_process_config(worker.model_config(fields)),
                                         worker.VOCAB, 64, seed=5)
            missing, unexpected = model.load_state_dict(results[name]["state"], strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing)
            one = worker.packed_logits(model.eval(), results["ids"])
            resharded = _load_sharded(model, str(tmp_path / name))
            from_checkpoint = worker.packed_logits(model.eval(), results["ids"])
        finally:
            destroy_single_process()
        for logits in (one, from_checkpoint):
            torch.testing.assert_close(results[name]["logits"], logits, atol=1e-5, rtol=1e-5,
                                       msg=lambda m, name=name: f"{name}: {m}")
        assert resharded == (name == "window+sinks")
        _check_context_parallel(name, fields, results)


def _check_context_parallel(name, fields, results):
    """CP=2 (the pack's conversations split into 4 chunks each over 2 ranks) == TP=1 from the
    same weights."""
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import single_process_config, single_process_model
    from tests.training import attention_tp_worker as worker

    cp = results["cp2"][name]
    try:
        model = single_process_model(single_process_config(worker.model_config(fields)),
                                     worker.VOCAB, 64, seed=5)
        missing, unexpected = model.load_state_dict(cp["state"], strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing)
        one = worker.packed_logits(model.eval(), results["ids"])
    finally:
        destroy_single_process()
    torch.testing.assert_close(cp["logits"], one, atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{name} at CP=2: {m}")


def _load_sharded(model, path: str) -> bool:
    """Load the TP=2 ``dist_checkpointing`` save at ``path`` into the TP=1 ``model`` (its weights
    zeroed first); whether it had a ``softmax_offset``."""
    from megatron.core import dist_checkpointing

    with torch.no_grad():
        for param in model.parameters():
            param.zero_()
    loaded = dist_checkpointing.load(model.sharded_state_dict(), path)
    model.load_state_dict({k: v for k, v in loaded.items() if not k.endswith("_extra_state")},
                          strict=False)
    return any(k.endswith("softmax_offset") for k in loaded)


# --------------------------------------------------------------- MLA vs Hugging Face DeepSeek-V3

MLA_TO_HF = {"linear_q_proj": "q_proj", "linear_q_down_proj": "q_a_proj",
             "q_layernorm": "q_a_layernorm", "linear_q_up_proj": "q_b_proj",
             "linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
             "linear_kv_up_proj": "kv_b_proj", "linear_proj": "o_proj"}


@pytest.mark.parametrize("q_lora_rank, rope", [(12, "yarn"), (None, "rope")])
def test_mla_equals_deepseek_v3_attention_per_conversation(q_lora_rank, rope):
    """megatron-core's MLA layer in our packed model == transformers 5.23's DeepseekV3Attention
    (eager, ``rope_interleave=True`` as DeepSeek-V3 ships) on each conversation of a pack, with
    the HF tensors copied one to one (``MLA_TO_HF``): megatron's MLA RoPE de-interleaves the rope
    part as HF's interleaved RoPE does, and the softmax scale carries YaRN's mscale^2."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as hf

    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens
    from mt_dialog.training.distributed import destroy_single_process

    yarn = dict(rope_type="yarn", rotary_scaling_factor=4.0, mscale=0.707, mscale_all_dim=0.707,
                original_max_position_embeddings=8) if rope == "yarn" else {}
    rope_parameters = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                       "mscale_all_dim": 0.707, "original_max_position_embeddings": 8,
                       "beta_fast": 32.0, "beta_slow": 1.0} if rope == "yarn" else {
        "rope_type": "default", "rope_theta": 10000.0}
    config = DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                              q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                              qk_rope_head_dim=4, v_head_dim=12, rope_interleave=True,
                              rms_norm_eps=1e-5, max_position_embeddings=32,
                              rope_parameters=rope_parameters)
    config._attn_implementation = "eager"
    torch.manual_seed(4)
    reference = hf.DeepseekV3Attention(config, 0).eval()
    with torch.no_grad():
        for param in reference.parameters():
            param.normal_(0, 0.3)
    cu = [0, 9, 23]
    hidden = torch.randn(cu[-1], 1, 32)
    try:
        model = _model(**dict(MLA, q_lora_rank=q_lora_rank, **yarn))
        layer = model.decoder.layers[0].self_attention
        with torch.no_grad():
            for name, param in layer.named_parameters():
                module, leaf = name.rsplit(".", 1)
                param.copy_(reference.get_submodule(MLA_TO_HF[module]).get_parameter(leaf))
            out, _ = layer(hidden, None, packed_seq_params=packed_seq_params_from_cu_seqlens(
                torch.tensor(cu)))
    finally:
        destroy_single_process()
    rotary = hf.DeepseekV3RotaryEmbedding(config)
    for a, b in zip(cu[:-1], cu[1:]):
        x = hidden[a:b].transpose(0, 1)  # [1, n, h]
        with torch.no_grad():
            cos_sin = rotary(x, torch.arange(b - a)[None])
            mask = torch.full((b - a, b - a), float("-inf")).triu(1)[None, None]
            expected, _ = reference(x, cos_sin, mask)
        torch.testing.assert_close(out[a:b, 0], expected[0], atol=1e-5, rtol=1e-5)
    # control: HF's non-interleaved RoPE on the same weights is another model (a converter must
    # permute the rope rows of checkpoints saved with rope_interleave false)
    config.rope_interleave = False
    with torch.no_grad():
        other, _ = reference(x, cos_sin, mask)
    assert (other[0] - out[a:b, 0]).abs().max() > 1e-3


# ------------------------------------------------------- sliding window + sinks vs gpt-oss

def _qkv_from_hf(attention, groups: int) -> torch.Tensor:
    """megatron's ``linear_qkv.weight`` from HF q/k/v: per key/value group, its query heads then
    its key then its value ([groups * (heads/groups + 2) * head, hidden])."""
    hidden = attention.q_proj.weight.size(1)
    q = attention.q_proj.weight.view(groups, -1, hidden)
    k = attention.k_proj.weight.view(groups, -1, hidden)
    v = attention.v_proj.weight.view(groups, -1, hidden)
    return torch.cat([q, k, v], dim=1).reshape(-1, hidden)


def test_window_and_sinks_equal_gpt_oss_attention_per_conversation():
    """Our model's attention layers (``SelfAttention`` + ``PackedSDPAttention``, window on layer 1,
    full on layer 2, learnable sinks) == transformers' GptOssAttention (eager, the mask HF builds
    from ``sliding_window``) with the same weights, on each conversation of a pack longer than
    the window; HF's ``sinks`` are ``core_attention.softmax_offset``."""
    from transformers import GptOssConfig
    from transformers.models.gpt_oss import modeling_gpt_oss as hf

    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens
    from mt_dialog.training.distributed import destroy_single_process

    sliding_window = 4
    config = GptOssConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                          head_dim=8, num_hidden_layers=2, sliding_window=sliding_window,
                          layer_types=["sliding_attention", "full_attention"],
                          attention_bias=False, max_position_embeddings=64,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "eager"
    torch.manual_seed(6)
    references = [hf.GptOssAttention(config, i).eval() for i in (0, 1)]
    with torch.no_grad():
        for param in (p for r in references for p in r.parameters()):
            param.normal_(0, 0.3)
    cu = [0, 9, 23]
    hidden = torch.randn(cu[-1], 1, 32)
    params = packed_seq_params_from_cu_seqlens(torch.tensor(cu))
    try:
        model = _model(num_query_groups=2, window_size=[sliding_window - 1, 0],
                       window_attn_skip_freq=[2], softmax_type="learnable")
        rotary = model.rotary_pos_emb(params.max_seqlen_q, packed_seq=True)
        outs = []
        for layer, reference in zip(model.decoder.layers, references):
            attention = layer.self_attention
            with torch.no_grad():
                attention.linear_qkv.weight.copy_(_qkv_from_hf(reference, 2))
                attention.linear_proj.weight.copy_(reference.o_proj.weight)
                attention.core_attention.softmax_offset.copy_(reference.sinks)
                outs.append(attention(hidden, None, rotary_pos_emb=rotary,
                                      packed_seq_params=params)[0])
    finally:
        destroy_single_process()
    rope = hf.GptOssRotaryEmbedding(config)
    for out, reference, window in zip(outs, references, (sliding_window, None)):
        for a, b in zip(cu[:-1], cu[1:]):
            x = hidden[a:b].transpose(0, 1)
            mask = _hf_mask(b - a, window) if window else \
                torch.full((b - a, b - a), float("-inf")).triu(1)[None, None]
            with torch.no_grad():
                expected, _ = reference(x, rope(x, torch.arange(b - a)[None]), mask)
            torch.testing.assert_close(out[a:b, 0], expected[0], atol=1e-5, rtol=1e-5)
