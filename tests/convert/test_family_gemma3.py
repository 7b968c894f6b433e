"""Gemma 3 text (``Gemma3ForCausalLM``) the way a user takes it: a tiny random model (3 layers:
sliding, sliding, full; window 8 < the 40-token sequences; local RoPE base 1e4, global 1e6 with
linear scaling 2; query_pre_attn_scalar 24 != head size 16; soft-capped logits; every weight and
norm perturbed off its init) with the Gemma 3 chat tokenizer fixture, imported once with
``hf-to-mcore``. Its logits equal HF's at TP=1 and TP=2, a conversation packed after another
equals it alone, the export gives back identical tensors and a config / tokenizer transformers
loads, chat's greedy reply is transformers' greedy reply on the export, a bf16 fine-tune on 2
processes from the import (--template hf, --use-checkpoint-args) lowers the loss, LoRA on the
four projections exports a PEFT adapter with equal logits, unsupported configs are refused."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from tests.convert.conftest import convert_here, hf_logits, parallel_logits, tool_here
from tests.data.chat_tokenizers import hf_gemma3_dir  # noqa: F401

TOLERANCE = 1e-4  # max abs logit difference in fp32
WINDOW = 8  # HF sliding_window
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"]


def _gemma3(tokenizer):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        sliding_window=WINDOW, layer_types=LAYER_TYPES, max_position_embeddings=256,
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0,
                                            "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        rms_norm_eps=1e-6, final_logit_softcapping=5.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # norms start at 0 ((1 + w)): every weight moved off its init
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.02))
    return model


@pytest.fixture(scope="module")
def gemma(hf_gemma3_dir, tmp_path_factory):
    """{"hf": HF folder, "ckpt": the hf-to-mcore import, "root"}."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("gemma3")
    folder, ckpt = str(root / "hf"), str(root / "ckpt")
    _gemma3(AutoTokenizer.from_pretrained(hf_gemma3_dir)).save_pretrained(folder)
    for file in os.listdir(hf_gemma3_dir):
        shutil.copy2(os.path.join(hf_gemma3_dir, file), folder)
    convert_here("hf-to-mcore", "--load-dir", folder, "--save-dir", ckpt)
    return {"hf": folder, "ckpt": ckpt, "root": root}


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))


@pytest.fixture()
def single_process():
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    yield generate
    destroy_single_process()


def test_config_maps_to_the_gemma3_flags(gemma):
    from mt_dialog.training.checkpoint import checkpoint_args

    args = checkpoint_args(gemma["ckpt"])
    assert args["window_size"] == [WINDOW - 1, 0] and args["window_attn_skip_freq"] == [3]
    assert args["rotary_base"] == 1e6 and args["rotary_seq_len_interpolation_factor"] == 2.0
    assert args["rotary_base_local"] == 1e4 and args["softmax_scale"] == 24 ** -0.5
    assert args["final_logit_softcapping"] == 5.0 and args["kv_channels"] == 16
    assert all(args[f] for f in ("apply_layernorm_1p", "sandwich_norm", "scale_embeddings",
                                 "openai_gelu", "qk_layernorm"))
    assert not args["untie_embeddings_and_output_weights"]


def _model_logits(model, ids, positions=None, params=None):
    with torch.no_grad():
        return model(ids, positions, None, packed_seq_params=params)


def test_import_tp1_logits_equal_hf_and_packs_stay_isolated(gemma, tokens, single_process):
    """Sequences of 40 > the window of 8; a 20-token conversation packed after an 11-token one
    gives its logits alone (the window never reaches into the previous conversation)."""
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    model = single_process.Generator.from_checkpoint(gemma["ckpt"]).model
    ours = _model_logits(model, tokens, torch.arange(40)[None].expand(2, -1))
    reference = hf_logits(gemma["hf"], tokens)
    assert ours.shape == reference.shape and reference.abs().max() > 0.5
    assert (ours - reference).abs().max().item() <= TOLERANCE
    first, second = tokens[:1, :11], tokens[1:, :20]
    params = packed_seq_params_from_cu_seqlens(torch.tensor([0, 11, 31]))
    together = _model_logits(model, torch.cat([first, second], 1), params=params)
    alone = _model_logits(model, second, torch.arange(20)[None])
    causal = _model_logits(model, torch.cat([first, second], 1), torch.arange(31)[None])
    assert (together[:, 11:] - alone).abs().max() <= 1e-5
    assert (causal[:, 11:] - alone).abs().max() > 1e-3  # the test can tell


@pytest.mark.multiprocess
def test_import_tp2_logits_equal_hf(gemma, tokens, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(gemma["hf"]).vocab_size
    ours = parallel_logits({"gemma3": gemma["ckpt"]}, {"gemma3": vocab}, tokens, str(tmp_path),
                           ["--tp", "2"])["gemma3"]
    reference = hf_logits(gemma["hf"], tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def exported(gemma):
    out = str(gemma["root"] / "exported")
    convert_here("mcore-to-hf", "--load-dir", gemma["ckpt"], "--save-dir", out)
    return out


def test_export_gives_back_identical_tensors_config_and_tokenizer(gemma, exported):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    original = load_file(os.path.join(gemma["hf"], "model.safetensors"))
    written = load_file(os.path.join(exported, "model.safetensors"))
    assert sorted(original) == sorted(written)
    assert all(torch.equal(t, written[k]) for k, t in original.items())
    models = [AutoModelForCausalLM.from_pretrained(f) for f in (gemma["hf"], exported)]
    states = [dict(m.named_buffers()) | m.state_dict() for m in models]  # buffers too
    assert sorted(states[0]) == sorted(states[1]) and "model.embed_tokens.embed_scale" in states[1]
    assert all(torch.equal(t, states[1][k]) for k, t in states[0].items())
    a, b = AutoConfig.from_pretrained(gemma["hf"]), AutoConfig.from_pretrained(exported)
    for field in ("architectures", "model_type", "layer_types", "sliding_window",
                  "rope_parameters", "query_pre_attn_scalar", "final_logit_softcapping",
                  "attn_logit_softcapping", "hidden_activation", "tie_word_embeddings",
                  "head_dim", "num_key_value_heads", "rms_norm_eps", "vocab_size"):
        assert getattr(a, field) == getattr(b, field), field
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hey"}]
    tokenizers = [AutoTokenizer.from_pretrained(f) for f in (gemma["hf"], exported)]
    assert (tokenizers[0].apply_chat_template(messages, return_dict=True)["input_ids"]
            == tokenizers[1].apply_chat_template(messages, return_dict=True)["input_ids"])


def test_chat_greedy_reply_is_transformers_greedy_on_the_export(gemma, exported,
                                                                single_process):
    from transformers import AutoModelForCausalLM

    generator = single_process.Generator.from_checkpoint(gemma["ckpt"])
    end = generator.tokenizer.hf.convert_tokens_to_ids("<end_of_turn>")
    assert generator.end_of_turn == end
    prompt = generator.prompt_ids([{"role": "user", "content": "Name a colour, please."}])
    ours, _ = generator.generate_ids(prompt, max_new_tokens=24)  # prompt + reply > the window
    model = AutoModelForCausalLM.from_pretrained(exported, attn_implementation="eager").eval()
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False,
                            eos_token_id=end, pad_token_id=0)
    assert len(prompt) + len(ours) > WINDOW and ours == theirs[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def data(gemma) -> str:
    """A chat corpus preprocessed with the import's tokenizer (``--template hf``)."""
    from tests.convert.test_export_reproduces_training import _tool, _write_corpus
    from tools.preprocess_dialog import main as preprocess_main

    prefix = str(gemma["root"] / "data")
    _write_corpus(str(gemma["root"] / "corpus.jsonl"), 60)
    _tool(preprocess_main, ["--input", gemma["root"] / "corpus.jsonl", "--tokenizer-type",
                            "huggingface", "--tokenizer-path",
                            os.path.join(gemma["ckpt"], "tokenizer"), "--template", "hf",
                            "--seq-length", 128, "--split", "100,0", "--output-prefix", prefix,
                            "--no-progress"])
    return prefix


@pytest.mark.multiprocess
def test_bf16_finetune_on_two_processes_lowers_the_loss_and_chats(gemma, data, tmp_path):
    from tests.training.conftest import parse_iters
    from tests.training.launch import run_torchrun
    from tools.chat import main as chat_main

    save = str(tmp_path / "sft")
    proc = run_torchrun("pretrain_dialog.py", 2, [
        "--load", gemma["ckpt"], "--finetune", "--use-checkpoint-args", "--bf16",
        "--tensor-model-parallel-size", "2", "--data-path", data,
        "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "3",
        "--lr", "3e-3", "--log-interval", "1", "--save", save])
    losses = [it["loss_turn"] for it in parse_iters(proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    chat = tool_here(chat_main, "--load", save, "--message", "Hi!", "--max-new-tokens", "4",
                     "--json")
    reply = json.loads(chat.stdout.strip().splitlines()[-1])
    assert reply["prompt_tokens"] > 0 and reply["token_ids"], reply


@pytest.mark.multiprocess
def test_lora_exports_a_peft_adapter_with_equal_logits(gemma, data, tmp_path):
    """LoRA on q/k/v, o, gate/up and down of every layer (1 process, 3 steps); the PEFT adapter
    on the HF model computes mt_dialog's logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import load_inference_model, read_run_info
    from tests.convert.test_export_reproduces_training import _tool
    from tests.training.launch import run
    from tools.convert_checkpoint import main as convert_main

    ckpt, adapter = str(tmp_path / "lora"), str(tmp_path / "adapter")
    run("pretrain_dialog.py", 1, [
        "--load", gemma["ckpt"], "--finetune", "--use-checkpoint-args", "--data-path",
        data, "--lora-rank", "4", "--lora-alpha", "8", "--lora-target", "linear_qkv",
        "linear_proj", "linear_fc1", "linear_fc2", "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "3", "--lr", "2e-2", "--save", ckpt],
        timeout=300)
    report = _tool(convert_main, ["mcore-to-hf", "--load-dir", ckpt, "--save-dir", adapter,
                                  "--dtype", "fp32", "--no-progress"])
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in report, report
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(5))
    try:
        model = load_inference_model(ckpt, read_run_info(ckpt))
        ours = _model_logits(model, ids, torch.arange(30)[None]).float()
    finally:
        destroy_single_process()
    base = AutoModelForCausalLM.from_pretrained(gemma["hf"], attn_implementation="eager")
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, adapter).eval()(ids).logits
    vocab = plain.shape[-1]
    assert (peft - ours[..., :vocab]).abs().max() <= TOLERANCE
    assert (plain - ours[..., :vocab]).abs().max() > 1e-3  # the adapters changed the model


# ------------------------------------------------------------------------------ refusals

def _with(gemma, tmp_path, **changes) -> str:
    """A copy of the tiny model's config.json with ``changes`` (no weights: the config is
    read first)."""
    config = json.load(open(os.path.join(gemma["hf"], "config.json")))
    folder = tmp_path / "changed"
    folder.mkdir()
    json.dump({**config, **changes}, open(folder / "config.json", "w"))
    return str(folder)


@pytest.mark.parametrize("changes, message", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping 50.0 is not supported "
     r"\(megatron-core has no attention-score soft-capping\); set it to null"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention True is not "
     "supported; set it to false"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu' is not supported; Gemma 3 here "
     "is GeGLU with gelu_pytorch_tanh"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0,
                                             "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
     r"rope_parameters\['full_attention'\] rope_type 'yarn' is not supported; supported: "
     "default, linear"),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
     r"Gemma3ForConditionalGeneration \(model_type gemma3, text \+ vision\) is not supported; "
     "only the text model Gemma3ForCausalLM"),
])
def test_unsupported_configs_are_refused(gemma, tmp_path, changes, message):
    from mt_dialog.convert.families import ConversionError, read_hf_config

    folder = _with(gemma, tmp_path, **changes)
    with pytest.raises(ConversionError, match=f"^{re.escape(folder)}/config.json: .*{message}"):
        read_hf_config(folder)


def test_layer_patterns_map_both_ways():
    """HF layer_types <-> --window-attn-skip-freq (megatron-core: every N-th layer, from 1, is
    full); a pattern that is not every N-th is the per-layer list."""
    from mt_dialog.convert.families.gemma3 import layer_types_of, skip_freq, sliding_flags
    from mt_dialog.training.config import ModelConfig

    gemma_26 = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)]
    cases = [(gemma_26, [6]), (LAYER_TYPES, [3]), (["sliding_attention"] * 4, None),
             (["full_attention", "sliding_attention", "sliding_attention"], [0, 1, 1])]
    for layer_types, expected in cases:
        freq = skip_freq(sliding_flags(layer_types))
        assert freq == expected, layer_types
        model = ModelConfig(num_layers=len(layer_types), window_size=[7, 0],
                            window_attn_skip_freq=freq)
        assert layer_types_of(model) == layer_types


def test_export_refuses_what_gemma3_cannot_hold():
    from mt_dialog.convert.families import ConversionError, export_architecture
    from mt_dialog.training.config import ModelConfig

    gemma = dict(qk_layernorm=True, apply_layernorm_1p=True, sandwich_norm=True,
                 scale_embeddings=True, openai_gelu=True)
    assert export_architecture(ModelConfig(**gemma)) == "Gemma3ForCausalLM"
    with pytest.raises(ConversionError, match="Gemma3ForCausalLM needs --rotary-base-local with "
                       "--window-size"):
        export_architecture(ModelConfig(**gemma, window_size=[7, 0]), "Gemma3ForCausalLM")
    with pytest.raises(ConversionError, match=r"--architecture Gemma3ForCausalLM needs .*sandwich"):
        export_architecture(ModelConfig(**{**gemma, "sandwich_norm": False}), "Gemma3ForCausalLM")


def test_a_transformers_4_config_reads_the_same(tmp_path):
    """Configs saved before transformers 5 carry ``rope_theta``, ``rope_local_base_freq``,
    ``rope_scaling`` and ``sliding_window_pattern``: transformers reads them into
    ``rope_parameters`` / ``layer_types``, which the family maps as it maps a new config."""
    from transformers import Gemma3TextConfig

    from mt_dialog.convert.families import read_hf_config

    raw = Gemma3TextConfig(num_hidden_layers=7, hidden_size=64, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_dict()
    for name in ("rope_parameters", "layer_types"):
        raw.pop(name)
    raw.update(architectures=["Gemma3ForCausalLM"], rope_theta=5e5, rope_local_base_freq=2e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0}, sliding_window_pattern=6,
               sliding_window=512)
    json.dump(raw, open(tmp_path / "config.json", "w"))
    model = read_hf_config(str(tmp_path)).model
    assert (model.rotary_base, model.rotary_base_local) == (5e5, 2e4)
    assert model.rotary_seq_len_interpolation_factor == 8.0
    assert model.window_size == [511, 0] and model.window_attn_skip_freq == [6]


def test_a_model_without_windows_exports_a_config_transformers_runs():
    """No --window-size and no --softmax-scale: every layer full (HF still wants a
    sliding_window: its default stays), query_pre_attn_scalar the head size; read back, the
    same model (the default scale written out)."""
    from transformers import AutoModelForCausalLM

    from mt_dialog.convert.families import FAMILIES, hf_config
    from mt_dialog.training.config import ModelConfig

    model = ModelConfig(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4,
                        num_query_groups=2, qk_layernorm=True, apply_layernorm_1p=True,
                        sandwich_norm=True, scale_embeddings=True, openai_gelu=True)
    config = hf_config(model, "auto", 100, 64, "fp32", 1, 2, 0)
    assert config.architectures == ["Gemma3ForCausalLM"] and config.head_dim == 16
    assert config.layer_types == ["full_attention"] * 2 and config.query_pre_attn_scalar == 16
    back = ModelConfig(**FAMILIES["Gemma3ForCausalLM"].model_kwargs(config, "config.json"))
    assert back.window_size is None and back.rotary_base_local is None
    assert back.softmax_scale == 0.25 and back.kv_channels == 16
    with torch.no_grad():
        assert AutoModelForCausalLM.from_config(config)(torch.tensor([[1, 2, 3]])).logits.shape \
            == (1, 3, 100)


def test_the_multimodal_refusal_gives_a_recipe_that_works(tmp_path):
    """Gemma3ForConditionalGeneration is refused; the recipe its message gives (the language
    model saved as Gemma3ForCausalLM) makes a folder the family reads, with every tensor."""
    from transformers import (Gemma3Config, Gemma3ForCausalLM, Gemma3ForConditionalGeneration,
                              Gemma3TextConfig, SiglipVisionConfig)

    from mt_dialog.convert.families import FAMILIES, ConversionError, check_names, read_hf_config
    from mt_dialog.convert.families.common import SafetensorsFolder

    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, image_size=28, patch_size=14)
    mm = Gemma3ForConditionalGeneration(Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
        boi_token_index=297, eoi_token_index=298))
    mm.save_pretrained(tmp_path / "mm")
    with pytest.raises(ConversionError, match=r"Gemma3ForConditionalGeneration \(model_type "
                       r"gemma3, text \+ vision\) is not supported; .*lm = Gemma3ForCausalLM"):
        read_hf_config(str(tmp_path / "mm"))
    lm = Gemma3ForCausalLM(mm.config.text_config)  # the message's recipe
    lm.model.load_state_dict(mm.model.language_model.state_dict())
    lm.save_pretrained(tmp_path / "text")
    read = read_hf_config(str(tmp_path / "text"))
    assert read.architecture == "Gemma3ForCausalLM" and read.model.window_size == [4095, 0]
    check_names(SafetensorsFolder(str(tmp_path / "text")), FAMILIES["Gemma3ForCausalLM"],
                read.model)
