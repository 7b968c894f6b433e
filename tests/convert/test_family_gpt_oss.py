"""gpt-oss (``GptOssForCausalLM``) the way users take it: a tiny random gpt-oss built with
``transformers`` (2 layers: sliding window 8 then full attention, learnable sinks, q/k/v/o biases,
4 experts top 2 with a biased router and biased experts, the clamped SwiGLU with limit 1 so that
the clamps act, YaRN factor 4 from 128 positions with truncate false; every weight and bias
perturbed off its init) with the harmony chat-template tokenizer (``hf_gpt_oss_dir``), imported
once with ``hf-to-mcore``; sequences of 40 tokens, longer than the window.

* logits equal Hugging Face's (fp32, <= 1e-4) at TP=1 and at EP=2 (the experts over two
  processes); the window and the clamp each change HF's logits (controls);
* ``mcore-to-hf`` gives back every tensor exactly, a config ``AutoConfig`` reads as the original,
  a folder ``AutoModelForCausalLM`` / ``AutoTokenizer`` load; chat's greedy reply
  (``mt_dialog.generate``) is transformers' greedy reply on the export (its generation config);
* a conversation packed after another gives the logits it gives alone;
* a 3-step bf16 fine-tune on 2 processes (EP=2, ``--template hf`` data, ``--use-checkpoint-args``)
  lowers the loss, ``tools/chat.py`` answers from it, its export computes what it computes;
* LoRA (``--lora-target all`` = the attention here) exports a PEFT adapter that ``peft`` loads
  with equal logits; ``linear_fc1`` (the experts) is refused naming the targets that exist;
* what the mapping cannot represent is refused with the field named.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.convert.conftest import convert_here, parallel_logits, tool_here
from tests.convert.test_export_reproduces_training import _tool, _write_corpus
from tests.data.chat_tokenizers import hf_gpt_oss_dir  # noqa: F401
from tests.training.conftest import parse_iters
from tests.training.launch import run, run_torchrun
from tools.chat import main as chat_main

pytest.importorskip("transformers")
TOLERANCE = 1e-4  # max abs logit difference in fp32 (issue 20)
WINDOW = 8  # HF sliding_window: the token and 7 before it
SEQ = 40  # > WINDOW
LIMIT = 1.0  # swiglu_limit: small, so that the clamps act on the perturbed weights


def _hf_model(vocab: int, tokenizer):
    from transformers import GptOssConfig, GptOssForCausalLM

    config = GptOssConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=WINDOW, swiglu_limit=LIMIT,
        max_position_embeddings=512, tie_word_embeddings=False, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 128, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = GptOssForCausalLM(config)
    with torch.no_grad():  # every parameter off its init (norms at 1, biases at 0 otherwise)
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                param.uniform_(0.5, 1.5)
            elif "router" in name or name.endswith("sinks"):
                param.normal_(0, 0.5 if "router" in name else 1.0)
            else:
                param.normal_(0, 0.1 if name.endswith("bias") else 0.15)
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    return model


@pytest.fixture(scope="module")
def oss(tmp_path_factory, hf_gpt_oss_dir):
    """{"hf": HF folder, "ckpt": its hf-to-mcore import, "root"}."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_gpt_oss_dir)
    root = tmp_path_factory.mktemp("gpt_oss")
    folder, ckpt = root / "hf", root / "ckpt"
    _hf_model(len(tokenizer), tokenizer).save_pretrained(folder)
    for name in os.listdir(hf_gpt_oss_dir):
        shutil.copy2(os.path.join(hf_gpt_oss_dir, name), folder)
    convert_here("hf-to-mcore", "--load-dir", folder, "--save-dir", ckpt)
    return {"hf": str(folder), "ckpt": str(ckpt), "root": root}


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, SEQ))  # the byte alphabet of the tokenizer


def _hf_logits(folder: str, ids, **overrides):
    """Logits of the HF model in ``folder`` (fp32, eager), its config changed by ``overrides``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                 dtype=torch.float32, **overrides).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture()
def generate():
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    yield generate
    destroy_single_process()


def test_config_reaches_the_checkpoint(oss):
    from mt_dialog.training.checkpoint import checkpoint_args

    args = checkpoint_args(oss["ckpt"])
    assert args["window_size"] == [WINDOW - 1, 0] and args["window_attn_skip_freq"] == [2]
    assert args["softmax_type"] == "learnable" and args["add_bias_linear"]
    assert args["quick_geglu"] and args["glu_linear_offset"] == 1.0
    assert args["activation_func_clamp_value"] == LIMIT
    assert (args["num_experts"], args["moe_router_topk"], args["moe_ffn_hidden_size"]) == (4, 2,
                                                                                           32)
    assert args["position_embedding_type"] == "yarn" and args["yarn_rotary_scaling_factor"] == 4
    assert args["yarn_original_max_position_embeddings"] == 128
    assert args["yarn_correction_range_round_to_int"] is False
    assert args["kv_channels"] == 16 and args["untie_embeddings_and_output_weights"]


def test_import_tp1_logits_equal_hf(oss, tokens, generate):
    generator = generate.Generator.from_checkpoint(oss["ckpt"])
    with torch.no_grad():
        ours = generator.model(tokens, torch.arange(SEQ)[None].expand(2, -1), None)
    reference = _hf_logits(oss["hf"], tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE
    # controls: the window and the clamp each matter on these tokens
    for change in ({"layer_types": ["full_attention"] * 2}, {"swiglu_limit": 100.0}):
        assert (_hf_logits(oss["hf"], tokens, **change) - reference).abs().max() > 1e-3, change


@pytest.mark.multiprocess
def test_import_ep2_logits_equal_hf(oss, tokens, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(oss["hf"]).vocab_size
    ours = parallel_logits({"gpt_oss": oss["ckpt"]}, {"gpt_oss": vocab}, tokens,
                           str(tmp_path), ["--ep", "2"])["gpt_oss"]
    reference = _hf_logits(oss["hf"], tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def exported(oss):
    out = oss["root"] / "export"
    convert_here("mcore-to-hf", "--load-dir", oss["ckpt"], "--save-dir", out)
    return str(out)


def test_export_gives_back_identical_tensors(oss, exported):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    original = load_file(os.path.join(oss["hf"], "model.safetensors"))
    back = load_file(os.path.join(exported, "model.safetensors"))
    assert sorted(original) == sorted(back)
    for name, tensor in original.items():
        assert torch.equal(tensor, back[name]), name
    a, b = AutoConfig.from_pretrained(oss["hf"]), AutoConfig.from_pretrained(exported)
    for field in ("architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
                  "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                  "num_local_experts", "num_experts_per_tok", "sliding_window", "layer_types",
                  "rope_parameters", "swiglu_limit", "swiglu_alpha", "attention_bias",
                  "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings",
                  "bos_token_id", "pad_token_id"):
        assert getattr(a, field) == getattr(b, field), field
    model = AutoModelForCausalLM.from_pretrained(exported)  # as users load it
    assert {k: v for k, v in model.state_dict().items() if k in original}.keys() == original.keys()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"},
                {"role": "assistant", "content": "Hello.", "thinking": "Greet."},
                {"role": "user", "content": "Count to 3."}]
    ids = [AutoTokenizer.from_pretrained(f).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for f in (oss["hf"], exported)]
    assert ids[0] == ids[1]


def test_chat_is_hf_greedy_decoding_on_the_export(oss, exported, generate):
    from transformers import AutoModelForCausalLM, GenerationConfig

    generator = generate.Generator.from_checkpoint(oss["ckpt"])
    prompt = generator.prompt_ids([{"role": "user", "content": "What is the capital of France?"}])
    assert len(prompt) > WINDOW
    ours, _ = generator.generate_ids(prompt, max_new_tokens=12)
    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    stops = GenerationConfig.from_pretrained(exported).eos_token_id
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()
    assert generator.end_of_turn in stops  # <|return|>


def test_a_conversation_packed_after_another_gives_its_logits_alone(oss, generate):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    model = generate.Generator.from_checkpoint(oss["ckpt"]).model
    torch.manual_seed(2)
    first, second = torch.randint(0, 256, (1, 20)), torch.randint(0, 256, (1, 30))

    def logits(ids, cu):
        positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])[None]
        with torch.no_grad():
            return model(ids, positions, None, packed_seq_params=packed_seq_params_from_cu_seqlens(
                torch.tensor(cu)))

    packed = logits(torch.cat([first, second], 1), [0, 20, 50])
    alone = logits(second, [0, 30])
    assert (packed[:, 20:] - alone).abs().max().item() <= 1e-5
    causal = logits(torch.cat([first, second], 1), [0, 50])  # control: one causal pack differs
    assert (causal[:, 20:] - alone).abs().max().item() > 1e-3


@pytest.fixture(scope="module")
def data(oss):
    """A chat corpus preprocessed with the import's harmony tokenizer (``--template hf``)."""
    from tools.preprocess_dialog import main as preprocess_main

    root = oss["root"]
    _write_corpus(str(root / "corpus.jsonl"), 60)
    prefix = str(root / "data")
    _tool(preprocess_main, ["--input", root / "corpus.jsonl", "--tokenizer-type", "huggingface",
                            "--tokenizer-path", os.path.join(oss["ckpt"], "tokenizer"),
                            "--template", "hf", "--seq-length", 256, "--split", "100,0",
                            "--output-prefix", prefix, "--no-progress"])
    return prefix


TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
         "--log-interval", "1", "--train-iters", "3"]


@pytest.mark.multiprocess
def test_finetune_bf16_at_ep2_then_chat_and_export(oss, data, tmp_path, generate):
    save = str(tmp_path / "sft")
    proc = run_torchrun("pretrain_dialog.py", 2, [
        "--load", oss["ckpt"], "--finetune", "--use-checkpoint-args", "--bf16",
        "--expert-model-parallel-size", "2", "--data-path", data, *TRAIN, "--save", save])
    losses = [it["loss_turn"] for it in parse_iters(proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    chat = tool_here(chat_main, "--load", save, "--message", "Count from 3 to 8.",
                     "--max-new-tokens", "6", "--json")
    reply = json.loads(chat.stdout.strip().splitlines()[-1])
    assert reply["prompt_tokens"] > 0 and reply["token_ids"], reply
    out = tmp_path / "hf"
    convert_here("mcore-to-hf", "--load-dir", save, "--save-dir", out, "--dtype", "fp32")
    generator = generate.Generator.from_checkpoint(save)
    model = generator.model.float()  # the bf16 weights, computed in fp32 as the export is
    ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": "Hello!"}])])
    with torch.no_grad():
        ours = model(ids, torch.arange(ids.shape[1])[None], None)
    reference = _hf_logits(str(out), ids)
    assert (ours[..., :reference.shape[-1]] - reference).abs().max().item() <= TOLERANCE


@pytest.mark.multiprocess
def test_lora_exports_a_peft_adapter(oss, data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import load_inference_model, read_run_info
    from tools.convert_checkpoint import main as convert_main

    ckpt, adapter = str(tmp_path / "lora"), str(tmp_path / "adapter")
    log = run("pretrain_dialog.py", 1, [
        "--load", oss["ckpt"], "--finetune", "--use-checkpoint-args", "--lora-rank", "4",
        "--lora-alpha", "8", "--data-path", data, *TRAIN, "--save", ckpt], timeout=300).stdout
    assert "LoRA rank 4 alpha 8 on linear_qkv,linear_proj (experts not adapted)" in log, log
    losses = [it["loss_turn"] for it in parse_iters(log)]
    assert len(losses) == 3 and losses[-1] < losses[0], log
    report = _tool(convert_main, ["mcore-to-hf", "--load-dir", ckpt, "--save-dir", adapter,
                                  "--dtype", "fp32", "--no-progress"])
    assert "q_proj, k_proj, v_proj, o_proj)" in report, report
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    try:
        with torch.no_grad():
            ours = load_inference_model(ckpt, read_run_info(ckpt))(
                ids, torch.arange(24)[None], None).float()
    finally:
        destroy_single_process()
    base = AutoModelForCausalLM.from_pretrained(oss["hf"], attn_implementation="eager",
                                                dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    assert (peft - ours[..., :peft.shape[-1]]).abs().max() <= TOLERANCE
    assert (plain - peft).abs().max() > 1e-3  # the adapters changed the model


def test_lora_on_the_experts_is_refused_naming_the_targets(oss):
    from pretrain_dialog import parse_config

    with pytest.raises(ValueError, match=r"lora_target: linear_fc1 is the MLP, which on this "
                       r"Mixture-of-Experts model \(--num-experts 4\) is the experts.*use "
                       "--lora-target linear_qkv linear_proj"):
        parse_config(["--load", oss["ckpt"], "--finetune", "--use-checkpoint-args",
                      "--data-path", "unused", "--train-iters", "1", "--lora-rank", "4",
                      "--lora-target", "linear_fc1"])


# -- refusals ----------------------------------------------------------------------------------

def _changed(oss, tmp_path, **fields) -> str:
    folder = tmp_path / "changed"
    folder.mkdir(parents=True)
    config = json.load(open(os.path.join(oss["hf"], "config.json")))
    json.dump({**config, **fields}, open(folder / "config.json", "w"))
    return str(folder)


ROPE = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 16}


@pytest.mark.parametrize("fields, message", [
    ({"quantization_config": {"quant_method": "mxfp4"}}, r"quantization_config 'mxfp4': "
     r"quantized experts .* dequantize first: load it with transformers' "
     r"Mxfp4Config\(dequantize=True\)"),
    ({"attention_bias": False}, "attention_bias false is not supported"),
    ({"swiglu_alpha": 1.5}, "swiglu_alpha 1.5 is not supported; megatron-core's quick GELU gate "
     "has alpha 1.702"),
    ({"rope_parameters": {**ROPE, "attention_factor": 1.2}}, "rope_parameters attention_factor "
     "1.2 is not supported"),
    ({"rope_parameters": {**ROPE, "partial_rotary_factor": 0.5}}, "partial_rotary_factor 0.5 is "
     "not supported"),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type 'dynamic' is not supported"),
])
def test_unsupported_configs_are_refused(oss, tmp_path, fields, message):
    from mt_dialog.convert.families import ConversionError, read_hf_config

    with pytest.raises(ConversionError, match=r"config.json: " + message):
        read_hf_config(_changed(oss, tmp_path, **fields))


def test_layer_patterns_map_to_megatron_windows(oss, tmp_path):
    """All sliding: every layer windowed; all full: no window; full then sliding: a 0/1 list."""
    from mt_dialog.convert.families import read_hf_config

    cases = {("sliding_attention", "sliding_attention"): ([WINDOW - 1, 0], None),
             ("full_attention", "full_attention"): (None, None),
             ("full_attention", "sliding_attention"): ([WINDOW - 1, 0], [0, 1])}
    for i, (types, (window, freq)) in enumerate(cases.items()):
        model = read_hf_config(_changed(oss, tmp_path / str(i), layer_types=list(types))).model
        assert (model.window_size, model.window_attn_skip_freq) == (window, freq), types


def test_biased_experts_train_in_one_process():
    """megatron-core 0.16.1 adds an expert's fc2 bias in place on the output of the TP reduce at
    EP = TP = 1, which autograd refuses; ``training.expert_bias`` hooks those layers so that a
    one-process gpt-oss fine-tune (LoRA below) runs backward. Control: without the hooks the
    backward fails as megatron-core's code alone does."""
    from mt_dialog.training.config import ModelConfig
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import single_process_config, single_process_model

    config = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_experts=4,
                         moe_router_topk=2, moe_ffn_hidden_size=16, add_bias_linear=True,
                         transformer_impl="local", make_vocab_size_divisible_by=1)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(0))
    try:
        model = single_process_model(single_process_config(config), 64, 16)
        model(ids, torch.arange(12)[None], None).sum().backward()
        fc2 = [m for n, m in model.named_modules() if n.endswith("linear_fc2")]
        assert len(fc2) == 4 and all(m.bias.grad.abs().sum() > 0 for m in fc2)
        for module in fc2:
            module._forward_hooks.clear()
        with pytest.raises(RuntimeError, match="is a view and is being modified inplace"):
            model(ids, torch.arange(12)[None], None).sum().backward()
    finally:
        destroy_single_process()
