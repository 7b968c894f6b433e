"""MoE routing of the 2026 families against Hugging Face's modules (transformers 5.x, tiny random
configs built here, their weights copied into ours; fp32): DeepSeek-V3 / Kimi K2 (sigmoid scores,
``e_score_correction_bias``, group-limited routing, ``routed_scaling_factor``, shared experts),
GLM-4.5 (the same router, its own module), gpt-oss (router bias, expert biases, its clamped
SwiGLU on megatron-core's ``glu_linear_offset`` / ``activation_func_clamp_value``) and Qwen2-MoE's
gated shared expert. Each: the router's choice (which experts) and weights, then the whole MoE
block's output, on random hidden states. Controls show the features change the result (the
comparison could fail). Also: the flags' checks, ``--moe-layer-freq`` parsing, dense first layers
in the model and checkpoint; on 2 processes, a resume with a moving expert bias equals the
uninterrupted run, and a pipeline stage without MoE layers logs the router load."""

import pytest
import torch

TOKENS, HIDDEN = 48, 32


def _model_config(num_layers=1, **moe):
    from mt_dialog.training.config import ModelConfig

    return ModelConfig(num_layers=num_layers, hidden_size=HIDDEN, num_attention_heads=4,
                       ffn_hidden_size=64, transformer_impl="local", **moe)


def _our_moe_layer(model_config, **tconfig_fields):
    """Our MoE block (``mlp`` of the last layer) built as training builds it, in this process;
    ``tconfig_fields`` set on megatron-core's TransformerConfig before the build."""
    from mt_dialog.training import distributed
    from mt_dialog.training.model import build_model_chunks, transformer_config
    from mt_dialog.training.saved_run import single_process_config

    config = single_process_config(model_config)
    distributed.initialize_single_process(1234)
    tconfig = transformer_config(config)
    for name, value in tconfig_fields.items():
        setattr(tconfig, name, value)
    (model,) = build_model_chunks(config, tconfig, 64, TOKENS)
    return model.decoder.layers[-1].mlp.eval()


def _randomize(module, seed):
    """Every parameter and floating buffer of ``module`` drawn at random (off any init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.3)


def _dense_weights(indices, weights, experts):
    return torch.zeros(indices.shape[0], experts).scatter(1, indices, weights.float())


def _our_routing(layer, x):
    with torch.no_grad():
        probs, routing_map = layer.router(x.view(TOKENS, 1, HIDDEN))
    return probs, routing_map


def _copy_sigmoid_family(hf, ours, experts):
    """DeepSeek-V3 / GLM-4.5 names -> ours: gate.weight / e_score_correction_bias ->
    router.weight / expert_bias; experts.gate_up_proj[e] (gate rows, then up) -> local expert e's
    linear_fc1, down_proj[e] -> linear_fc2; shared_experts.{gate,up}_proj -> shared_experts.
    linear_fc1 (concatenated), down_proj -> linear_fc2."""
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        ours.router.expert_bias.copy_(hf.gate.e_score_correction_bias)
        for e in range(experts):
            local = ours.experts.local_experts[e]
            local.linear_fc1.weight.copy_(hf.experts.gate_up_proj[e])
            local.linear_fc2.weight.copy_(hf.experts.down_proj[e])
        shared = hf.shared_experts
        ours.shared_experts.linear_fc1.weight.copy_(
            torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        ours.shared_experts.linear_fc2.weight.copy_(shared.down_proj.weight)


SIGMOID_FAMILIES = {
    # model type, its MoE block class, its config; 8 experts in 4 groups of 2, top 4 from 2
    # groups (megatron ranks a group by its top topk / group_topk = 2 scores: HF's top 2)
    "deepseek_v3": ("transformers.models.deepseek_v3.modeling_deepseek_v3", "DeepseekV3MoE"),
    "glm4_moe": ("transformers.models.glm4_moe.modeling_glm4_moe", "Glm4MoeMoE"),
}


@pytest.mark.parametrize("family", list(SIGMOID_FAMILIES))
def test_sigmoid_group_routing_and_shared_experts_equal_hugging_face(family):
    import importlib

    from transformers import AutoConfig

    module, block = SIGMOID_FAMILIES[family]
    hf_config = AutoConfig.for_model(
        family, hidden_size=HIDDEN, n_routed_experts=8, num_experts_per_tok=4, n_group=4,
        topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True, moe_intermediate_size=16,
        n_shared_experts=2, hidden_act="silu")
    hf = getattr(importlib.import_module(module), block)(hf_config).eval()
    _randomize(hf, seed=3)
    ours = _our_moe_layer(_model_config(
        num_experts=8, moe_router_topk=4, moe_ffn_hidden_size=16,
        moe_shared_expert_intermediate_size=32, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
        moe_router_topk_scaling_factor=2.5))
    _copy_sigmoid_family(hf, ours, 8)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        _, weights, indices = hf.gate(x)
    want = _dense_weights(indices, weights, 8)
    probs, routing_map = _our_routing(ours, x)
    assert torch.equal(routing_map, want > 0)  # the same experts for every token
    assert (probs - want).abs().max() <= 1e-6
    assert torch.allclose(probs.sum(-1), torch.full((TOKENS,), 2.5))  # renormalized, scaled
    # controls: the bias and the group limit change which experts are chosen
    scores = torch.sigmoid(x @ hf.gate.weight.t())
    plain = _dense_weights(scores.topk(4, dim=-1)[1], torch.ones(TOKENS, 4), 8) > 0
    biased = scores + hf.gate.e_score_correction_bias
    unlimited = _dense_weights(biased.topk(4, dim=-1)[1], torch.ones(TOKENS, 4), 8) > 0
    assert (plain != routing_map).any(dim=-1).sum() >= 5
    assert (unlimited != routing_map).any(dim=-1).sum() >= 5

    with torch.no_grad():
        expected = hf(x.view(1, TOKENS, HIDDEN)).view(TOKENS, HIDDEN)
        got, bias = ours(x.view(TOKENS, 1, HIDDEN))
        shared = hf.shared_experts(x)
    assert bias is None
    assert (got.view(TOKENS, HIDDEN) - expected).abs().max() <= 1e-5
    assert (expected - shared).abs().max() > 1e-2  # the routed experts' part counts


def test_qwen2_moe_gated_shared_expert_equals_hugging_face():
    """--moe-shared-expert-gate: Qwen2-MoE's sigmoid gate on its shared expert (softmax over all
    experts, the top k kept: --moe-router-pre-softmax, norm_topk_prob false)."""
    import importlib

    from transformers import AutoConfig

    hf_config = AutoConfig.for_model("qwen2_moe", hidden_size=HIDDEN, num_experts=4,
                                     num_experts_per_tok=2, moe_intermediate_size=16,
                                     shared_expert_intermediate_size=24, norm_topk_prob=False)
    modeling = importlib.import_module("transformers.models.qwen2_moe.modeling_qwen2_moe")
    hf = modeling.Qwen2MoeSparseMoeBlock(hf_config).eval()
    _randomize(hf, seed=7)
    ours = _our_moe_layer(_model_config(
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, moe_router_pre_softmax=True,
        moe_shared_expert_intermediate_size=24, moe_shared_expert_gate=True))
    with torch.no_grad():
        ours.router.weight.copy_(hf.gate.weight)
        for e in range(4):
            ours.experts.local_experts[e].linear_fc1.weight.copy_(hf.experts.gate_up_proj[e])
            ours.experts.local_experts[e].linear_fc2.weight.copy_(hf.experts.down_proj[e])
        shared = hf.shared_expert
        ours.shared_experts.linear_fc1.weight.copy_(
            torch.cat([shared.gate_proj.weight, shared.up_proj.weight]))
        ours.shared_experts.linear_fc2.weight.copy_(shared.down_proj.weight)
        ours.shared_experts.gate_weight.copy_(hf.shared_expert_gate.weight)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        expected = hf(x.view(1, TOKENS, HIDDEN)).view(TOKENS, HIDDEN)
        got, _ = ours(x.view(TOKENS, 1, HIDDEN))
        ours.shared_experts.gate_weight.zero_()  # control: the gate counts (sigmoid(0) = 1/2)
        ungated, _ = ours(x.view(TOKENS, 1, HIDDEN))
    assert (got.view(TOKENS, HIDDEN) - expected).abs().max() <= 1e-5
    assert (ungated.view(TOKENS, HIDDEN) - expected).abs().max() > 1e-3


def _copy_gpt_oss(hf, ours, experts):
    """gpt-oss names -> ours: router.weight / bias -> router.weight / bias; experts.gate_up_proj
    [e] ([hidden, 2 x inner], gate and up interleaved in columns) -> linear_fc1.weight (rows:
    the gate's, then the up's), gate_up_proj_bias likewise; down_proj[e] ([inner, hidden]) ->
    linear_fc2.weight transposed, down_proj_bias -> linear_fc2.bias."""
    with torch.no_grad():
        ours.router.weight.copy_(hf.router.weight)
        ours.router.bias.copy_(hf.router.bias)
        for e in range(experts):
            local, gate_up = ours.experts.local_experts[e], hf.experts.gate_up_proj[e]
            bias = hf.experts.gate_up_proj_bias[e]
            local.linear_fc1.weight.copy_(torch.cat([gate_up[:, ::2], gate_up[:, 1::2]], 1).t())
            local.linear_fc1.bias.copy_(torch.cat([bias[::2], bias[1::2]]))
            local.linear_fc2.weight.copy_(hf.experts.down_proj[e].t())
            local.linear_fc2.bias.copy_(hf.experts.down_proj_bias[e])


def test_gpt_oss_router_and_expert_biases_equal_hugging_face():
    """--add-bias-linear gives the router and every expert's fc1/fc2 a bias (megatron-core scales
    an expert's fc2 bias by the token's routing weight, as gpt-oss does); softmax over the top-k
    logits is gpt-oss's router. The clamped SwiGLU (block features) is set on megatron-core's
    config here: quick_gelu (x sigmoid(1.702 x)), glu_linear_offset 1, clamp swiglu_limit."""
    import importlib

    from megatron.core.activations import quick_gelu
    from transformers import AutoConfig

    hf_config = AutoConfig.for_model("gpt_oss", hidden_size=HIDDEN, intermediate_size=16,
                                     num_local_experts=4, num_experts_per_tok=2,
                                     swiglu_limit=1.0)
    modeling = importlib.import_module("transformers.models.gpt_oss.modeling_gpt_oss")
    hf = modeling.GptOssMLP(hf_config).eval()
    _randomize(hf, seed=4)
    ours = _our_moe_layer(_model_config(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                                        add_bias_linear=True),
                          activation_func=quick_gelu, glu_linear_offset=1.0,
                          activation_func_clamp_value=1.0)
    _copy_gpt_oss(hf, ours, 4)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(6))

    with torch.no_grad():
        _, weights, indices = hf.router(x)
    want = _dense_weights(indices, weights, 4)
    probs, routing_map = _our_routing(ours, x)
    assert torch.equal(routing_map, want > 0)
    assert (probs - want).abs().max() <= 1e-6
    unbiased = _dense_weights((x @ hf.router.weight.t()).topk(2, dim=-1)[1],
                              torch.ones(TOKENS, 2), 4) > 0
    assert (unbiased != routing_map).any(dim=-1).sum() >= 3  # control: the router bias counts

    with torch.no_grad():
        expected, _ = hf(x.view(1, TOKENS, HIDDEN))
        got, bias = ours(x.view(TOKENS, 1, HIDDEN))
    assert bias is None
    assert (got.view(TOKENS, HIDDEN) - expected.view(TOKENS, HIDDEN)).abs().max() <= 1e-5


def test_add_bias_linear_puts_a_bias_on_every_linear_layer():
    """Which modules get a bias with --add-bias-linear on the local MoE spec: attention QKV and
    output, the router, every expert's fc1 and fc2 (gpt-oss has all of them); the output layer
    and the norms get none."""
    from mt_dialog.training.saved_run import single_process_config, single_process_model

    model = single_process_model(single_process_config(_model_config(
        num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16, add_bias_linear=True)),
        64, 16)
    biases = sorted(k for k, _ in model.named_parameters() if k.endswith("bias"))
    layer = "decoder.layers.0."
    assert biases == [layer + "mlp.experts.local_experts.%d.linear_fc%d.bias" % (e, f)
                      for e in range(4) for f in (1, 2)] + [
        layer + "mlp.router.bias", layer + "self_attention.linear_proj.bias",
        layer + "self_attention.linear_qkv.bias"], biases


def test_dense_first_layers_and_their_keys():
    """--moe-layer-freq '([0]*1+[1]*2)': layer 0 a dense SwiGLU of --ffn-hidden-size, layers 1-2
    MoE with experts of --moe-ffn-hidden-size; megatron-core saves each layer under its number."""
    from mt_dialog.training.saved_run import single_process_config, single_process_model

    config = _model_config(num_layers=3, num_experts=4, moe_router_topk=2,
                           moe_ffn_hidden_size=16, moe_layer_freq="([0]*1+[1]*2)")
    assert config.moe_layer_freq == [0, 1, 1] and config.moe_layer_pattern() == [0, 1, 1]
    model = single_process_model(single_process_config(config), 64, 16)
    layers = model.decoder.layers
    assert type(layers[0].mlp).__name__ == "MLP" and layers[0].mlp.linear_fc2.weight.shape[1] == 64
    assert [type(layer.mlp).__name__ for layer in layers[1:]] == ["MoELayer", "MoELayer"]
    assert [layer.mlp.router.layer_number for layer in layers[1:]] == [2, 3]
    keys = {v.key for v in model.sharded_state_dict().values() if hasattr(v, "key")}
    assert "decoder.layers.0.mlp.linear_fc1.weight" in keys
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" in keys  # as TE fuses it
    assert "decoder.layers.2.pre_mlp_layernorm.weight" in keys
    assert "decoder.layers.1.mlp.router.weight" in keys


@pytest.mark.parametrize("text, want", [
    ("1", 1), ("2", 2), ("[0,1,1]", [0, 1, 1]), ("([0]*1+[1]*2)", [0, 1, 1]),
    ("[1]*3", 1),  # all MoE: the homogeneous form (stacked checkpoint keys)
])
def test_moe_layer_freq_parsing(text, want):
    config = _model_config(num_layers=3, num_experts=4, moe_layer_freq=text)
    assert config.moe_layer_freq == want


@pytest.mark.parametrize("fields, message", [
    ({"moe_layer_freq": "__import__('os')"}, "moe_layer_freq: .* is not an int or a list"),
    ({"moe_layer_freq": [0, 1]}, r"moe_layer_freq: \[0, 1\] must have one 0 .* --num-layers 1"),
    ({"moe_layer_freq": [0]}, r"moe_layer_freq: \[0\] must have one 0 .* at least one 1"),
    ({"moe_layer_freq": 0}, "moe_layer_freq: must be >= 1, got 0"),
    ({"moe_router_score_function": "sigmoid", "moe_router_pre_softmax": True},
     "moe_router_pre_softmax: applies to softmax scores"),
    ({"moe_router_enable_expert_bias": True}, "moe_router_enable_expert_bias: .* add "
     "--moe-router-score-function sigmoid"),
    ({"moe_router_score_function": "sigmoid", "moe_router_bias_update_rate": 1e-3},
     "moe_router_bias_update_rate: 0.001 must be >= 0 and needs --moe-router-enable-expert-bias"),
    ({"moe_router_num_groups": 2}, "moe_router_group_topk: group-limited routing needs both"),
    ({"moe_router_num_groups": 3, "moe_router_group_topk": 1}, "moe_router_num_groups: 3 must "
     "divide --num-experts 8"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 3}, "moe_router_group_topk: 3 must be "
     "between 1 and the smaller of --moe-router-num-groups 4 and --moe-router-topk 2"),
    ({"moe_router_num_groups": 4, "moe_router_group_topk": 1, "moe_router_topk": 3},
     "moe_router_topk: 3 experts cannot be chosen from 1 groups of 2"),
    ({"moe_router_topk_scaling_factor": 0.0}, "moe_router_topk_scaling_factor: must be positive"),
    ({"moe_shared_expert_gate": True}, "moe_shared_expert_gate: gates the shared expert; add "
     "--moe-shared-expert-intermediate-size S"),
    ({"moe_shared_expert_intermediate_size": 16, "add_bias_linear": True},
     "moe_shared_expert_intermediate_size: megatron-core 0.16.1's shared expert has no biases"),
])
def test_routing_flags_are_checked(fields, message):
    with pytest.raises(ValueError, match="^" + message):
        _model_config(num_experts=8, **fields)


def test_routing_flags_need_experts():
    with pytest.raises(ValueError, match="^moe_shared_expert_intermediate_size: "
                       "--moe-shared-expert-intermediate-size needs --num-experts N"):
        _model_config(moe_shared_expert_intermediate_size=16)
    with pytest.raises(ValueError, match="^moe_layer_freq: --moe-layer-freq needs --num-experts"):
        _model_config(moe_layer_freq=2)
    assert _model_config(moe_layer_freq="1").moe_routing_settings() == {"add_bias_linear": False}


# DeepSeek-V3-style routing on the command line: a dense first layer, then a MoE layer with a
# shared expert, sigmoid scores with an expert bias updated after every step (a large rate, so
# that it moves), group-limited and scaled
ROUTING_FLAGS = ["--num-experts", "4", "--moe-router-topk", "2", "--moe-ffn-hidden-size", "64",
                 "--moe-shared-expert-intermediate-size", "64", "--moe-router-score-function",
                 "sigmoid", "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate",
                 "0.01", "--moe-router-num-groups", "2", "--moe-router-group-topk", "1",
                 "--moe-router-topk-scaling-factor", "2.0", "--moe-layer-freq", "([0]*1+[1]*1)",
                 "--expert-model-parallel-size", "2", "--lr-decay-iters", "4"]
BIAS = "decoder.layers.1.mlp.router.expert_bias"


@pytest.mark.multiprocess
def test_expert_bias_is_updated_saved_and_restored_on_resume(packed_data, tmp_path):
    """4 iterations straight vs 2 + save + resume 2 (EP=2 over 2 processes, bf16): the same
    losses at every iteration and the same final checkpoint, expert bias included. The bias is in
    the checkpoint (layer 1's own key: layers differ) in fp32 whatever --bf16 makes of the
    model's buffers, moved by the aux-loss-free update (a multiple of the rate, not 0) and never
    in the optimizer's state."""
    from tests.training.conftest import iteration_dir, launch, parse_iters, read_checkpoint, \
        train_args

    def run(name, iters, *extra):
        proc = launch(2, train_args(packed_data, *ROUTING_FLAGS, "--bf16", "--save",
                                    tmp_path / name, *extra, iters=iters))
        return parse_iters(proc.stdout)

    straight = run("straight", 4)
    half = run("half", 2)
    resumed = run("resumed", 4, "--load", tmp_path / "half")
    assert [r["iter"] for r in half + resumed] == [1, 2, 3, 4]
    numbers = lambda rows: [(r["loss_turn"], r["loss_token"], r["grad_norm"]) for r in rows]
    assert numbers(half + resumed) == numbers(straight)
    assert straight[-1]["loss_turn"] < straight[0]["loss_turn"]

    saved_half = read_checkpoint(iteration_dir(tmp_path / "half", 2))
    a = read_checkpoint(iteration_dir(tmp_path / "straight", 4))
    b = read_checkpoint(iteration_dir(tmp_path / "resumed", 4))
    assert sorted(a) == sorted(b)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    steps = a[BIAS] / 0.01  # 4 updates of +-0.01 each
    assert a[BIAS].dtype == torch.float32 and a[BIAS].shape == (4,)
    assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4 + 1e-4
    # the resumed run starts from the saved, moved bias (from 0 it would end elsewhere)
    assert a[BIAS].abs().min() > 0 and saved_half[BIAS].abs().min() > 0
    assert not [k for k in a if k.startswith("optimizer.") and "expert_bias" in k]
    assert "decoder.layers.0.mlp.linear_fc1.weight" in a  # the dense first layer
    assert "decoder.layers.1.mlp.shared_experts.linear_fc1.weight" in a


@pytest.mark.multiprocess
def test_pipeline_stage_of_dense_layers_only_logs_the_router_load(packed_data):
    """PP=2 with layer 0 dense and layer 1 MoE: the first stage holds no router, yet takes part
    in gathering the router load (it used to decide "dense model" from its own layers and skip
    the collective the other stage waits in)."""
    from tests.training.conftest import launch, parse_iters, train_args

    proc = launch(2, train_args(packed_data, "--num-experts", "4", "--moe-ffn-hidden-size", "64",
                                "--moe-layer-freq", "[0,1]", "--pipeline-model-parallel-size",
                                "2", iters=2), timeout=240)
    assert [r["iter"] for r in parse_iters(proc.stdout)] == [1, 2], proc.stdout
    assert proc.stdout.count(" | experts max/mean ") == 2, proc.stdout
