"""DeepSeek-V3 / Kimi K2 (``DeepseekV3ForCausalLM``): two tiny random models built with
transformers 5.23 (every weight and the ``e_score_correction_bias`` buffer perturbed off their
init), saved with the DeepSeek-V3 tokenizer fixture, imported once:

* ``v3``: DeepSeek-V3's layout: q_lora_rank (q_a_proj / q_a_layernorm / q_b_proj), YaRN with
  mscale / mscale_all_dim (sequences of 40 > original_max_position_embeddings 16),
  ``rope_interleave`` true, one dense first layer, 8 routed experts in 4 groups (top 4 from 2
  groups), a shared expert, routed_scaling_factor 2.5, untied embeddings; its folder also holds
  the multi-token-prediction layer's tensors (``model.layers.3.*``), dropped at import with a
  printed line (imported by the command line);
* ``lite``: the Lite models' layout: no q_lora_rank (one q_proj), default RoPE,
  ``rope_interleave`` false (rope rows permuted at import), no dense layer, no groups, two
  shared experts, tied embeddings.

Checked: logits == HF's at TP=1 and at EP=2 (one launch), export gives back identical tensors
(``v3``; ``lite``: the same model written with ``rope_interleave`` true), a conversation packed
after another == alone, greedy chat == transformers' on the export, a 3-step bf16 fine-tune at
EP=2 lowers the loss, LoRA on ``linear_proj`` exports as a PEFT adapter peft loads, the
unsupported routing / RoPE settings are refused naming the field.
"""

import json
import os
import re
import shutil

import pytest
import torch

from tests.convert.conftest import (convert_here, hf_logits, in_process, parallel_logits,
                                    tool_here)
from tests.data.chat_tokenizers import hf_deepseek_v3_dir  # noqa: F401 (fixture)

TOLERANCE = 1e-4  # max abs logit difference in fp32 (issue 5)
SEQ = 40  # > original_max_position_embeddings 16 of v3's YaRN

COMMON = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=16,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12, rms_norm_eps=1e-6,
              max_position_embeddings=256, hidden_act="silu", norm_topk_prob=True)
CONFIGS = {
    "v3": dict(COMMON, max_position_embeddings=64, num_hidden_layers=3,
               first_k_dense_replace=1, q_lora_rank=24,
               n_routed_experts=8, num_experts_per_tok=4, n_group=4, topk_group=2,
               n_shared_experts=1, routed_scaling_factor=2.5, rope_interleave=True,
               tie_word_embeddings=False, num_nextn_predict_layers=1,
               rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                "mscale": 0.707, "mscale_all_dim": 0.707,
                                "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                "beta_slow": 1.0}),
    "lite": dict(COMMON, num_hidden_layers=2, first_k_dense_replace=0, q_lora_rank=None,
                 n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                 n_shared_experts=2, routed_scaling_factor=1.0, rope_interleave=False,
                 tie_word_embeddings=True, num_nextn_predict_layers=0,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
MTP = {"model.layers.3.enorm.weight": (64,), "model.layers.3.hnorm.weight": (64,),
       "model.layers.3.eh_proj.weight": (64, 128),
       "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": (20, 64)}


def _perturb(model) -> None:
    """Every weight and buffer off its init: matrices N(0, 0.15), norms U(0.5, 1.5), routers
    N(0, 0.5) (so that they choose), the expert bias N(0, 0.05)."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(torch.rand(param.shape, generator=gen) + 0.5)
            else:
                std = 0.5 if name.endswith("mlp.gate.weight") else 0.15
                param.copy_(torch.randn(param.shape, generator=gen) * std)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=gen) * 0.05)


def _add_mtp_tensors(folder: str) -> None:
    """The multi-token-prediction layer's tensors real checkpoints carry (model.layers.{L}.*)."""
    from safetensors.torch import load_file, save_file

    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    tensors.update({name: torch.randn(shape) for name, shape in MTP.items()})
    save_file(tensors, path, metadata={"format": "pt"})


def _build(name: str, folder: str, tokenizer_dir: str) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = AutoConfig.for_model("deepseek_v3", vocab_size=len(tokenizer),
                                  bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id, **CONFIGS[name])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    _perturb(model)
    model.save_pretrained(folder)
    for file in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, file), folder)


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory, hf_deepseek_v3_dir):
    """{"v3" | "lite": (HF folder, imported checkpoint)}, and "cli": the import's stdout."""
    pytest.importorskip("transformers")
    from mt_dialog.convert.hf_checkpoint import ImportConfig, import_hf

    root = tmp_path_factory.mktemp("deepseek")
    out = {}
    for name in CONFIGS:
        folder, ckpt = str(root / name), str(root / f"{name}_ckpt")
        _build(name, folder, hf_deepseek_v3_dir)
        if name == "v3":
            _add_mtp_tensors(folder)
            out["cli"] = convert_here("hf-to-mcore", "--load-dir", folder, "--save-dir",
                                      ckpt).stdout
        else:
            in_process(import_hf, ImportConfig(load_dir=folder, save_dir=ckpt, progress=False))
        out[name] = (folder, ckpt)
    return out


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(1))


def _ours(ckpt: str, ids: torch.Tensor, **packed) -> torch.Tensor:
    """Logits of ``ckpt`` loaded as mcore-to-hf loads it (TP = PP = EP = 1, fp32)."""
    from mt_dialog.convert.hf_checkpoint import ExportConfig, _load_for_export
    from mt_dialog.training.distributed import destroy_single_process

    try:
        _, _, model, _, _ = _load_for_export(ExportConfig(load_dir=ckpt, save_dir="unused"))
        with torch.no_grad():
            if packed:
                return model(ids, None, None, **packed)
            return model(ids, torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1), None)
    finally:
        destroy_single_process()


def test_import_maps_the_config_and_prints_what_it_drops(deepseek):
    from mt_dialog.training.checkpoint import checkpoint_args, saved_model_config

    v3, lite = (checkpoint_args(deepseek[n][1]) for n in ("v3", "lite"))
    assert v3["multi_latent_attention"] and v3["qk_layernorm"] and v3["q_lora_rank"] == 24
    assert (v3["kv_lora_rank"], v3["qk_head_dim"], v3["qk_pos_emb_head_dim"],
            v3["v_head_dim"]) == (16, 8, 4, 12)
    assert (v3["rope_type"], v3["rotary_scaling_factor"], v3["mscale"], v3["mscale_all_dim"],
            v3["original_max_position_embeddings"]) == ("yarn", 4.0, 0.707, 0.707, 16)
    assert (v3["num_experts"], v3["moe_router_topk"], v3["moe_ffn_hidden_size"]) == (8, 4, 16)
    assert v3["moe_layer_freq"] == [0, 1, 1] and v3["moe_shared_expert_intermediate_size"] == 16
    assert v3["moe_router_score_function"] == "sigmoid" and v3["moe_router_enable_expert_bias"]
    saved = saved_model_config(deepseek["v3"][1])  # a training setting, not checkpoint args
    assert saved["moe_router_bias_update_rate"] == 0.0  # the expert bias stays as loaded
    assert (v3["moe_router_num_groups"], v3["moe_router_group_topk"]) == (4, 2)
    assert v3["moe_router_topk_scaling_factor"] == 2.5
    assert lite["q_lora_rank"] is None and lite["rope_type"] == "rope"
    assert lite["moe_layer_freq"] == 1 and lite["moe_router_num_groups"] is None
    assert lite["moe_shared_expert_intermediate_size"] == 32
    assert lite["moe_router_topk_scaling_factor"] is None
    assert not lite["untie_embeddings_and_output_weights"]
    cli = deepseek["cli"]
    assert "note: dropped 4 tensor(s) (model.layers.3.eh_proj.weight, ...): the 1 " \
        "multi-token-prediction layer(s) (num_nextn_predict_layers" in cli, cli
    assert "--moe-router-bias-update-rate 0" in cli, cli


def test_use_checkpoint_args_takes_mla_and_the_moe_but_not_the_bias_rate(deepseek):
    """--use-checkpoint-args takes MLA's and the MoE's architecture fields; the expert bias
    update rate is a training setting: 0 unless the fine-tune passes another."""
    from pretrain_dialog import parse_config

    common = ["--data-path", "unused", "--train-iters", "1", "--finetune",
              "--use-checkpoint-args", "--load", deepseek["v3"][1]]
    model = parse_config(common).model
    assert model.multi_latent_attention and model.q_lora_rank == 24
    assert model.rope_type == "yarn" and model.moe_layer_freq == [0, 1, 1]
    assert model.moe_router_bias_update_rate == 0.0
    rated = parse_config(common + ["--moe-router-bias-update-rate", "1e-3"]).model
    assert rated.moe_router_bias_update_rate == 1e-3


@pytest.mark.parametrize("name", list(CONFIGS))
def test_import_tp1_logits_equal_hf(name, deepseek, tokens):
    folder, ckpt = deepseek[name]
    reference = hf_logits(folder, tokens)
    ours = _ours(ckpt, tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


def test_rope_interleave_false_is_permuted_not_ignored(deepseek, tokens):
    """Control: the lite folder read as if its rope rows were interleaved is another model."""
    from transformers import AutoModelForCausalLM

    folder, ckpt = deepseek["lite"]
    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    model.config.rope_interleave = True
    with torch.no_grad():
        wrong = model(tokens).logits
    assert (_ours(ckpt, tokens) - wrong).abs().max().item() > 1e-2


def test_packed_conversation_equals_alone(deepseek):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    _, ckpt = deepseek["v3"]
    gen = torch.Generator().manual_seed(4)
    first, second = (torch.randint(0, 256, (1, n), generator=gen) for n in (17, 23))
    params = packed_seq_params_from_cu_seqlens(torch.tensor([0, 17, 40]))
    together = _ours(ckpt, torch.cat([first, second], 1), packed_seq_params=params)
    alone = _ours(ckpt, second)
    assert (together[:, 17:] - alone).abs().max() <= 1e-5
    causal = _ours(ckpt, torch.cat([first, second], 1))
    assert (causal[:, 17:] - alone).abs().max() > 1e-3  # the packing is what isolates


@pytest.fixture(scope="module")
def exported(deepseek, tmp_path_factory):
    """{name: folder} of mcore-to-hf of each import."""
    from mt_dialog.convert.hf_checkpoint import ExportConfig, export_hf

    root = tmp_path_factory.mktemp("deepseek_export")
    out = {}
    for name in CONFIGS:
        out[name] = str(root / name)
        in_process(export_hf, ExportConfig(load_dir=deepseek[name][1], save_dir=out[name],
                                           progress=False))
    return out


def _state(folder: str):
    """Every HF tensor and buffer of the model ``from_pretrained`` loads (inv_freq aside)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    state = dict(model.state_dict())
    state.update({n: b for n, b in model.named_buffers() if "rotary_emb" not in n})
    return state


def test_export_gives_back_identical_tensors_and_config(deepseek, exported):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer

    folder, _ = deepseek["v3"]
    original = {k: v for k, v in load_file(os.path.join(folder, "model.safetensors")).items()
                if k not in MTP}
    written = load_file(os.path.join(exported["v3"], "model.safetensors"))
    assert sorted(original) == sorted(written)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in written
    for key, tensor in original.items():
        assert torch.equal(tensor, written[key]), key
    a, b = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(exported["v3"])
    for field in ("architectures", "model_type", "vocab_size", "q_lora_rank", "kv_lora_rank",
                  "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_parameters",
                  "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                  "n_shared_experts", "routed_scaling_factor", "first_k_dense_replace",
                  "norm_topk_prob", "moe_intermediate_size", "intermediate_size",
                  "tie_word_embeddings", "rms_norm_eps", "rope_interleave"):
        assert getattr(a, field) == getattr(b, field), field
    assert b.num_nextn_predict_layers == 0
    loaded, theirs = _state(exported["v3"]), _state(folder)
    assert sorted(loaded) == sorted(theirs)
    for key, tensor in theirs.items():  # the expert bias buffer included
        assert torch.equal(tensor, loaded[key]), key
    text = "<｜User｜>Hello!<｜Assistant｜>Hi<｜end▁of▁sentence｜>"
    assert (AutoTokenizer.from_pretrained(exported["v3"]).encode(text)
            == AutoTokenizer.from_pretrained(folder).encode(text))


def test_lite_export_is_the_same_model_interleaved(deepseek, exported, tokens):
    """rope_interleave false imports permuted; export writes rope_interleave true (the rows as
    megatron-core holds them): the other tensors identical, the logits HF's."""
    from safetensors.torch import load_file

    folder, _ = deepseek["lite"]
    original = load_file(os.path.join(folder, "model.safetensors"))
    written = load_file(os.path.join(exported["lite"], "model.safetensors"))
    assert sorted(original) == sorted(written)
    rope = ("q_proj", "kv_a_proj_with_mqa")
    for key, tensor in original.items():
        assert torch.equal(tensor, written[key]) != key.endswith(
            tuple(f"self_attn.{p}.weight" for p in rope)), key
    assert (hf_logits(exported["lite"], tokens) - hf_logits(folder, tokens)).abs().max() \
        <= TOLERANCE


def test_chat_greedy_reply_is_hf_greedy_on_the_export(deepseek, exported):
    """mt_dialog.generate (what tools/chat.py runs) on the import == transformers' generate on
    the export, token for token."""
    from transformers import AutoModelForCausalLM

    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    try:
        generator = generate.Generator.from_checkpoint(deepseek["v3"][1])
        prompt = generator.prompt_ids([{"role": "user", "content": "What is 2 + 3?"}])
        ours, _ = generator.generate_ids(prompt, max_new_tokens=12)
    finally:
        destroy_single_process()
    model = AutoModelForCausalLM.from_pretrained(exported["v3"], attn_implementation="eager")
    theirs = model.eval().generate(torch.tensor([prompt]), max_new_tokens=len(ours),
                                   do_sample=False, eos_token_id=generator.end_of_turn,
                                   pad_token_id=model.config.pad_token_id)
    assert len(ours) >= 4 and ours == theirs[0, len(prompt):].tolist()


# ------------------------------------------------------------------------- refused settings

def _config_folder(deepseek, tmp_path, **changes) -> str:
    """The v3 folder's config.json with ``changes`` (weights are not read)."""
    config = json.load(open(os.path.join(deepseek["v3"][0], "config.json")))
    config.update(changes)
    folder = tmp_path / "changed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


YARN = CONFIGS["v3"]["rope_parameters"]


@pytest.mark.parametrize("changes, message", [
    (dict(norm_topk_prob=False), r"norm_topk_prob false with num_experts_per_tok 4: "
     "megatron-core always renormalizes the top-k sigmoid weights"),
    (dict(num_experts_per_tok=1, n_group=1, topk_group=1), r"norm_topk_prob true with "
     "num_experts_per_tok 1: HF divides the weight by itself"),
    (dict(topk_group=1), r"n_group 4 with num_experts_per_tok 4 and topk_group 1: HF ranks each "
     r"group by its top-2 scores, megatron-core by its top num_experts_per_tok / topk_group; "
     r"only num_experts_per_tok = 2 x topk_group \(or n_group 1\)"),
    (dict(scoring_func="softmax"), r"scoring_func 'softmax' is not supported; only sigmoid"),
    (dict(topk_method="greedy"), r"topk_method 'greedy' is not supported; only noaux_tc"),
    (dict(num_key_value_heads=2), r"num_key_value_heads 2 != num_attention_heads 4: MLA gives "
     "every head its own key and value; set num_key_value_heads 4"),
    (dict(first_k_dense_replace=3), r"first_k_dense_replace 3 must be between 0 and "
     r"num_hidden_layers - 1 \(2\)"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}),
     r"rope_parameters rope_type 'linear' is not supported with multi-latent attention"),
    (dict(rope_parameters=dict(YARN, attention_factor=1.2)), r"rope_parameters "
     "attention_factor 1.2 is not "
     "supported; megatron-core derives it from factor, mscale and mscale_all_dim"),
    (dict(rope_parameters=dict(YARN, truncate=False)), r"rope_parameters truncate false is "
     "not supported"),
    (dict(hidden_act="gelu"), r"hidden_act 'gelu' is not supported"),
])
def test_unsupported_settings_are_refused_naming_the_field(deepseek, tmp_path, changes, message):
    from mt_dialog.convert.families import ConversionError, read_hf_config

    folder = _config_folder(deepseek, tmp_path, **changes)
    path = re.escape(os.path.join(folder, "config.json"))
    with pytest.raises(ConversionError, match=f"{path}: {message}"):
        read_hf_config(folder)


def test_kimi_k2_config_reads_as_deepseek_v3_without_its_python(deepseek, tmp_path):
    """Kimi K2's config.json: model_type kimi_k2 (no transformers class) and auto_map to its
    own configuration_deepseek.py: read with DeepseekV3Config, the .py never run."""
    from mt_dialog.convert.families import read_hf_config

    marker = tmp_path / "ran"
    folder = _config_folder(deepseek, tmp_path, model_type="kimi_k2", auto_map={
        "AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    with open(os.path.join(folder, "configuration_deepseek.py"), "w") as handle:
        handle.write(f"open({str(marker)!r}, 'w').close()\n")
    kimi, v3 = read_hf_config(folder), read_hf_config(deepseek["v3"][0])
    assert kimi.architecture == "DeepseekV3ForCausalLM" and kimi.model == v3.model
    assert not marker.exists()


def test_unknown_extra_layers_are_refused_not_dropped(deepseek, tmp_path):
    """Only num_nextn_predict_layers layers past the last are dropped: without it the MTP
    tensors are unknown tensors."""
    folder = tmp_path / "no_mtp"
    shutil.copytree(deepseek["v3"][0], folder)
    config = json.load(open(folder / "config.json"))
    (folder / "config.json").write_text(json.dumps(dict(config, num_nextn_predict_layers=0)))
    proc = convert_here("hf-to-mcore", "--load-dir", folder, "--save-dir", tmp_path / "ckpt",
                        expect_ok=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "4 tensor(s) this converter does not know, e.g. model.layers.3." in proc.stderr


def test_export_refuses_dense_layers_that_are_not_first():
    import dataclasses

    from mt_dialog.convert.families import ConversionError, hf_config
    from mt_dialog.training.config import ModelConfig

    base = dict(num_layers=3, hidden_size=32, num_attention_heads=4, multi_latent_attention=True,
                qk_layernorm=True, kv_lora_rank=8, qk_head_dim=8, qk_pos_emb_head_dim=4,
                v_head_dim=8, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8,
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_layer_freq=[0, 1, 1])
    model = ModelConfig(**base)
    assert hf_config(model, "DeepseekV3ForCausalLM", 64, 64, "fp32", 0, 1).first_k_dense_replace \
        == 1
    with pytest.raises(ConversionError, match=r"--moe-layer-freq \[1, 0, 1\]: Hugging Face's "
                       "first_k_dense_replace has the dense layers first"):
        hf_config(dataclasses.replace(model, moe_layer_freq=[1, 0, 1]), "DeepseekV3ForCausalLM",
                  64, 64, "fp32", 0, 1)
    with pytest.raises(ConversionError, match=r"--moe-shared-expert-intermediate-size 12 is not "
                       r"a multiple of --moe-ffn-hidden-size 8"):
        hf_config(dataclasses.replace(model, moe_shared_expert_intermediate_size=12),
                  "DeepseekV3ForCausalLM", 64, 64, "fp32", 0, 1)


# ----------------------------------------------------------------- several processes

@pytest.mark.multiprocess
def test_import_ep2_logits_equal_hf(deepseek, tokens, tmp_path):
    """Both imports loaded at EP=2 (the routed experts split over two processes; TP=2 with
    experts needs sequence parallelism, i.e. Transformer Engine), one launch."""
    from transformers import AutoConfig

    vocabs = {n: AutoConfig.from_pretrained(deepseek[n][0]).vocab_size for n in CONFIGS}
    logits = parallel_logits({n: deepseek[n][1] for n in CONFIGS}, vocabs, tokens,
                             str(tmp_path), ["--ep", "2"])
    for name in CONFIGS:
        reference = hf_logits(deepseek[name][0], tokens)
        assert logits[name].shape == reference.shape
        assert (logits[name] - reference).abs().max().item() <= TOLERANCE, name


@pytest.fixture(scope="module")
def chat_data(deepseek, tmp_path_factory):
    """A chat corpus preprocessed with the import's tokenizer (the fixture's) and --template hf
    (DeepSeek-V3's Jinja template)."""
    from tests.convert.test_export_reproduces_training import _tool, _write_corpus
    from tools.preprocess_dialog import main as preprocess_main

    root = tmp_path_factory.mktemp("deepseek_data")
    _write_corpus(str(root / "corpus.jsonl"), 40)
    _tool(preprocess_main, ["--input", root / "corpus.jsonl", "--tokenizer-type", "huggingface",
                            "--tokenizer-path", os.path.join(deepseek["v3"][1], "tokenizer"),
                            "--template", "hf", "--seq-length", 128, "--split", "100,0",
                            "--output-prefix", root / "chat", "--no-progress"])
    return str(root / "chat")


@pytest.mark.multiprocess
def test_bf16_finetune_at_ep2_lowers_the_loss_and_exports(deepseek, chat_data, tmp_path):
    """pretrain_dialog.py --finetune --use-checkpoint-args --bf16 on 2 processes at EP=2 (the
    routed experts split, the expert bias kept frozen): the loss falls over 3 steps; the export
    loads with plain from_pretrained and keeps the expert bias as imported."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from tests.training.conftest import parse_iters
    from tests.training.launch import run_torchrun

    save = str(tmp_path / "sft")
    proc = run_torchrun("pretrain_dialog.py", 2, [
        "--load", deepseek["v3"][1], "--finetune", "--use-checkpoint-args", "--bf16",
        "--expert-model-parallel-size", "2", "--data-path", chat_data, "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "3", "--lr", "5e-3", "--log-interval", "1",
        "--save", save])
    losses = [it["loss_turn"] for it in parse_iters(proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    out = tmp_path / "hf"
    convert_here("mcore-to-hf", "--load-dir", save, "--save-dir", out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "DeepseekV3ForCausalLM"
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    original = load_file(os.path.join(deepseek["v3"][0], "model.safetensors"))
    written = load_file(str(out / "model.safetensors"))[bias]  # bf16, or fp32 (HF's dtype)
    assert written.dtype in (torch.bfloat16, torch.float32)  # with Family.fp32_hf_suffixes
    assert torch.equal(written, original[bias].to(written.dtype))  # never trained
    assert torch.equal(dict(model.named_buffers())[bias], written.float())  # loaded
    trained = dict(model.named_parameters())["model.layers.1.mlp.gate.weight"]
    assert not torch.equal(trained, original["model.layers.1.mlp.gate.weight"])


@pytest.mark.multiprocess
def test_lora_on_linear_proj_exports_an_adapter_peft_loads(deepseek, chat_data, tmp_path):
    """--lora-target all on MLA + MoE is linear_proj (o_proj); the adapter peft loads computes
    what mt_dialog trained; linear_qkv is refused naming what exists."""
    pytest.importorskip("peft")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import load_inference_model, read_run_info
    from tests.training.launch import run

    folder, base = deepseek["lite"]
    ckpt = str(tmp_path / "lora")
    common = ["--load", base, "--finetune", "--use-checkpoint-args", "--data-path", chat_data,
              "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
              "--log-interval", "1", "--lora-rank", "4", "--lora-alpha", "8"]
    log = run("pretrain_dialog.py", 1, [*common, "--train-iters", "3", "--save", ckpt]).stdout
    assert "LoRA rank 4 alpha 8 on linear_proj (experts not adapted): trainable" in log, log
    from pretrain_dialog import main as pretrain_main

    refused = tool_here(pretrain_main, *common, "--train-iters", "1", "--lora-target",
                        "linear_qkv", expect_ok=False)  # refused at parsing: exit 2, no model
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "linear_qkv does not exist with --multi-latent-attention" in refused.stderr
    adapter = tmp_path / "adapter"
    report = convert_here("mcore-to-hf", "--load-dir", ckpt, "--save-dir", adapter, "--dtype",
                     "fp32").stdout
    assert "(rank 4 on o_proj)" in report, report
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 200, 2]])
    try:
        with torch.no_grad():
            ours = load_inference_model(ckpt, read_run_info(ckpt))(
                ids, torch.arange(ids.shape[1])[None], None).float()
    finally:
        destroy_single_process()
    hf = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager")
    with torch.no_grad():
        plain = hf(ids).logits
        peft = PeftModel.from_pretrained(hf, str(adapter)).eval()(ids).logits
    vocab = plain.shape[-1]
    assert (peft - ours[..., :vocab]).abs().max() <= TOLERANCE
    assert (plain - ours[..., :vocab]).abs().max() > 1e-3  # the adapters changed the model
