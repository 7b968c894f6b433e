"""GLM-4.5 / 4.6 (``Glm4MoeForCausalLM``) the way a user takes it: a tiny random GLM built with
transformers (q/k/v biases, q/k norm, head_dim 32 != hidden / heads, partial RoPE 0.5, one
dense first layer then sigmoid MoE layers with a shared expert, a random
``e_score_correction_bias``, ``routed_scaling_factor`` 2.5, one multi-token-prediction layer in
the safetensors) with the GLM-4.5 chat-template tokenizer fixture, imported once by
``tools/convert_checkpoint.py hf-to-mcore``; then:

* the MTP layer is dropped with a printed line (an undeclared one is refused), the model flags
  reach the checkpoint (the expert-bias update rate stays the run's choice);
* logits equal Hugging Face's at TP=1 (fp32, <= 1e-4) and at EP=2 (the experts over two
  processes, one launch; MoE with TP needs sequence parallelism, i.e. Transformer Engine);
* a conversation packed after another gives its logits alone, through the imported model;
* the export gives back every tensor (the expert-bias buffer too) and a config, model and
  tokenizer that plain ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load; a
  bf16 import and export keep the fp32 expert bias exactly;
* a 3-step bf16 fine-tune at EP=2 (``--template hf`` data, ``--use-checkpoint-args``) lowers
  the loss; chat's greedy reply on it equals transformers' greedy reply on its export, whose
  ``generation_config.json`` stops at ``<|user|>`` and ``<|observation|>``;
* LoRA on the attention projections exports a PEFT adapter peft loads (logits equal); an MLP
  target (the experts) is refused naming the targets that exist;
* what the config asks that cannot be represented is refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from tests.convert.conftest import (convert_here, hf_logits, in_process, parallel_logits,
                                    tool_here)
from tests.data.chat_tokenizers import hf_glm45_dir  # noqa: F401
from tests.training.launch import run, run_torchrun

pytest.importorskip("transformers")
TOLERANCE = 1e-4  # max abs logit difference in fp32 (issue 20)
LAYERS = 3  # one dense layer, two MoE layers (+ one MTP layer in the files)


def _glm(vocab: int):
    """A tiny random Glm4MoeForCausalLM, every weight and buffer off its init."""
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    config = Glm4MoeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, n_group=1, topk_group=1,
        attention_bias=True, use_qk_norm=True, partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5},
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False,
        num_nextn_predict_layers=1, pad_token_id=0)
    model = Glm4MoeForCausalLM(config)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith("inv_freq"):
                continue
            if name.endswith(("norm.weight", "layernorm.weight")):
                tensor.uniform_(0.5, 1.5)
            elif name.endswith("e_score_correction_bias"):
                tensor.normal_(0, 0.3)  # changes which experts are chosen
            elif name.endswith(("gate.weight", ".bias")):
                tensor.normal_(0, 0.5)  # routers that choose; biases that count
            else:
                tensor.normal_(0, 0.08)
    return model.eval()


def _mtp_tensors(state):
    """An MTP layer as GLM-4.5 stores it after the decoder: a copy of the last layer plus its
    eh_proj / enorm / hnorm / shared_head norm (model.layers.{LAYERS}.*)."""
    last, hidden = f"model.layers.{LAYERS - 1}.", state["model.norm.weight"].shape[0]
    mtp = {f"model.layers.{LAYERS}." + k[len(last):]: v.clone() for k, v in state.items()
           if k.startswith(last)}
    mtp.update({f"model.layers.{LAYERS}.eh_proj.weight": torch.randn(hidden, 2 * hidden),
                f"model.layers.{LAYERS}.enorm.weight": torch.ones(hidden),
                f"model.layers.{LAYERS}.hnorm.weight": torch.ones(hidden),
                f"model.layers.{LAYERS}.shared_head.norm.weight": torch.ones(hidden)})
    return mtp


@pytest.fixture(scope="module")
def glm(tmp_path_factory, hf_glm45_dir):  # noqa: F811
    """{"hf": folder, "ckpt": imported checkpoint, "import": the converter's process,
    "mtp": MTP tensor names, "root"}."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("glm")
    torch.manual_seed(0)
    folder = str(root / "hf")
    _glm(len(AutoTokenizer.from_pretrained(hf_glm45_dir))).save_pretrained(folder)
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    mtp = _mtp_tensors(state)
    save_file({**state, **mtp}, path, metadata={"format": "pt"})
    for file in os.listdir(hf_glm45_dir):
        shutil.copy2(os.path.join(hf_glm45_dir, file), folder)
    ckpt = str(root / "ckpt")
    proc = convert_here("hf-to-mcore", "--load-dir", folder, "--save-dir", ckpt)
    return {"hf": folder, "ckpt": ckpt, "import": proc, "mtp": sorted(mtp), "root": root}


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 256, (2, 48))


@pytest.fixture()
def single_process():
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    yield generate
    destroy_single_process()


def test_import_drops_mtp_layers_and_records_the_flags(glm):
    from mt_dialog.training.checkpoint import checkpoint_args

    assert (f"note: dropped {len(glm['mtp'])} tensor(s) ({glm['mtp'][0]}, ...): the 1 multi-"
            "token-prediction layer(s) (num_nextn_predict_layers; mt_dialog trains next-token "
            "prediction only; the export has none)") in glm["import"].stdout, glm["import"].stdout
    assert "note: the expert bias (e_score_correction_bias) is kept as loaded" in \
        glm["import"].stdout
    args = checkpoint_args(glm["ckpt"])
    expected = dict(num_layers=LAYERS, kv_channels=32, add_qkv_bias=True, qk_layernorm=True,
                    rotary_percent=0.5, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                    ffn_hidden_size=96, moe_shared_expert_intermediate_size=32,
                    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                    moe_router_topk_scaling_factor=2.5,
                    moe_layer_freq=[0, 1, 1], moe_router_num_groups=None,
                    untie_embeddings_and_output_weights=True)
    assert {k: args[k] for k in expected} == expected


def test_layers_the_config_does_not_declare_are_refused(glm, tmp_path):
    """Only the layers num_nextn_predict_layers declares are dropped: with 0, the same files'
    extra layer is refused, not silently left out."""
    from mt_dialog.convert.families import ConversionError
    from mt_dialog.convert.hf_checkpoint import ImportConfig, import_hf

    folder = tmp_path / "no_mtp"
    shutil.copytree(glm["hf"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 0}))
    with pytest.raises(ConversionError, match=rf"{len(glm['mtp'])} tensor\(s\) this converter "
                       rf"does not know, e.g. model.layers.{LAYERS}\."):
        in_process(import_hf, ImportConfig(load_dir=str(folder), save_dir=str(tmp_path / "c"),
                                           progress=False))
    assert not (tmp_path / "c").exists()


def test_import_tp1_logits_equal_hf(glm, tokens, single_process):
    generator = single_process.Generator.from_checkpoint(glm["ckpt"])
    with torch.no_grad():
        ours = generator.model(tokens, torch.arange(tokens.shape[1])[None].expand(2, -1), None)
    reference = hf_logits(glm["hf"], tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.mark.multiprocess
def test_import_ep2_logits_equal_hf(glm, tokens, tmp_path):
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(glm["hf"]).vocab_size
    ours = parallel_logits({"glm": glm["ckpt"]}, {"glm": vocab}, tokens, str(tmp_path),
                           ["--ep", "2"])["glm"]
    reference = hf_logits(glm["hf"], tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


def test_packed_conversation_gives_its_logits_alone(glm, tokens, single_process):
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

    model = single_process.Generator.from_checkpoint(glm["ckpt"]).model

    def logits(ids, cu):
        positions = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])[None]
        with torch.no_grad():
            return model(ids, positions, None, packed_seq_params=packed_seq_params_from_cu_seqlens(
                torch.tensor(cu)))

    first, second = tokens[:1, :17], tokens[1:, :31]
    packed = logits(torch.cat([first, second], 1), [0, 17, 48])
    alone = logits(second, [0, 31])
    assert (packed[:, 17:] - alone).abs().max().item() <= 1e-5
    # the pack boundary matters: one sequence of both gives other logits for the second
    joined = logits(torch.cat([first, second], 1), [0, 48])
    assert (joined[:, 17:] - alone).abs().max().item() > 1e-3


def test_export_gives_back_every_tensor_and_loads_plainly(glm, tokens, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from mt_dialog.convert.hf_checkpoint import ExportConfig, export_hf

    out = str(tmp_path / "hf")
    in_process(export_hf, ExportConfig(load_dir=glm["ckpt"], save_dir=out, progress=False))
    original = load_file(os.path.join(glm["hf"], "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    kept = sorted(set(original) - set(glm["mtp"]))
    assert sorted(exported) == kept
    for key in kept:
        assert torch.equal(original[key], exported[key]), key
    assert any(k.endswith("e_score_correction_bias") for k in kept)
    a, b = AutoConfig.from_pretrained(glm["hf"]), AutoConfig.from_pretrained(out)
    for field in ("architectures", "model_type", "head_dim", "attention_bias", "use_qk_norm",
                  "rope_parameters", "n_routed_experts", "num_experts_per_tok",
                  "n_shared_experts", "moe_intermediate_size", "intermediate_size",
                  "first_k_dense_replace", "routed_scaling_factor", "norm_topk_prob", "n_group",
                  "topk_group", "tie_word_embeddings", "rms_norm_eps"):
        assert getattr(a, field) == getattr(b, field), field
    assert b.num_nextn_predict_layers == 0  # dropped at import
    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, hf_logits(glm["hf"], tokens))
    text = "<|user|>\nHello! 早上好<|assistant|>"
    assert (AutoTokenizer.from_pretrained(out).encode(text)
            == AutoTokenizer.from_pretrained(glm["hf"]).encode(text))


def test_bf16_export_keeps_the_expert_bias_fp32(glm, tmp_path):
    """GLM's files hold bf16 weights and an fp32 e_score_correction_bias (HF keeps it fp32:
    its small differences between experts decide the routing): import and a bf16 export keep
    the bias's fp32 values exactly."""
    from safetensors.torch import load_file, save_file

    from mt_dialog.convert.hf_checkpoint import ExportConfig, ImportConfig, export_hf, import_hf

    folder = tmp_path / "bf16"
    shutil.copytree(glm["hf"], folder)
    state = load_file(folder / "model.safetensors")
    torch.manual_seed(2)
    state = {k: (v + torch.rand(v.shape) * 1e-3 if k.endswith("e_score_correction_bias")
                 else v.to(torch.bfloat16)) for k, v in state.items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    in_process(import_hf, ImportConfig(load_dir=str(folder), save_dir=str(tmp_path / "ckpt"),
                                       progress=False))
    in_process(export_hf, ExportConfig(load_dir=str(tmp_path / "ckpt"),
                                       save_dir=str(tmp_path / "out"), progress=False))
    exported = load_file(tmp_path / "out" / "model.safetensors")
    biases = [k for k in state if k.endswith("e_score_correction_bias") and k not in glm["mtp"]]
    assert biases and all(exported[k].dtype == torch.float32 and torch.equal(exported[k], state[k])
                          for k in biases)
    assert exported["model.embed_tokens.weight"].dtype == torch.bfloat16


def _corpus(root) -> str:
    from mt_dialog import demo

    corpus = str(root / "corpus.jsonl")
    demo.write_corpus(corpus, 80, seed=3)
    return corpus


@pytest.fixture(scope="module")
def chat_data(glm) -> str:
    """The demo corpus (80 conversations) preprocessed with the import's tokenizer and
    ``--template hf`` (seq 512), shared by the fine-tune and the LoRA run."""
    from tools.preprocess_dialog import main as preprocess_main

    prefix = str(glm["root"] / "chat")
    tool_here(preprocess_main, "--input", _corpus(glm["root"]), "--tokenizer-type",
              "huggingface", "--tokenizer-path", os.path.join(glm["ckpt"], "tokenizer"),
              "--template", "hf", "--seq-length", 512, "--output-prefix", prefix,
              "--no-progress")
    return prefix


@pytest.fixture(scope="module")
def finetuned(glm, chat_data):
    """(checkpoint, log, fp32 export) of a 3-step bf16 fine-tune from the import at EP=2."""
    data, save = chat_data, str(glm["root"] / "sft")
    proc = run_torchrun("pretrain_dialog.py", 2, [
        "--load", glm["ckpt"], "--finetune", "--use-checkpoint-args", "--bf16",
        "--expert-model-parallel-size", "2", "--data-path", data, "--micro-batch-size", "2",
        "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--log-interval", "1",
        "--save", save])
    out = str(glm["root"] / "sft_hf")
    exported = convert_here("mcore-to-hf", "--load-dir", save, "--save-dir", out, "--dtype",
                            "fp32")
    return save, proc.stdout, out, exported


@pytest.mark.multiprocess
def test_finetune_lowers_the_loss_and_chat_is_hf_greedy(glm, finetuned, single_process):
    from transformers import AutoModelForCausalLM, GenerationConfig

    save, log, out, exported = finetuned
    losses = [float(m) for m in re.findall(r"loss/turn ([0-9.]+)", log)]
    assert len(losses) == 3 and losses[-1] < losses[0], log
    assert " | experts max/mean " in log, log
    assert "layout exactly" in exported.stdout, exported.stdout
    generator = single_process.Generator.from_checkpoint(save)
    hf = generator.tokenizer.hf
    user, observation = (hf.convert_tokens_to_ids(t) for t in ("<|user|>", "<|observation|>"))
    assert generator.stops == {user, observation}
    assert GenerationConfig.from_pretrained(out).eos_token_id == [hf.eos_token_id, user,
                                                                  observation]
    prompt = generator.prompt_ids([{"role": "user", "content": "Count from 3 to 8."}])
    ours, _ = generator.generate_ids(prompt, max_new_tokens=10)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()  # both stop at the same tag, or run on


@pytest.fixture(scope="module")
def lora(glm, chat_data):
    """(LoRA checkpoint, log, PEFT adapter folder): 2 fp32 steps of rank-4 adapters on the
    attention (``all`` on a MoE model) from the import, one process."""
    data, save = chat_data, str(glm["root"] / "lora")
    proc = run("pretrain_dialog.py", 1, [
        "--load", glm["ckpt"], "--finetune", "--use-checkpoint-args", "--data-path", data,
        "--lora-rank", "4", "--lora-alpha", "8", "--micro-batch-size", "2",
        "--global-batch-size", "2", "--train-iters", "2", "--lr", "5e-2", "--log-interval", "1",
        "--save", save], timeout=300)
    adapter = str(glm["root"] / "adapter")
    convert_here("mcore-to-hf", "--load-dir", save, "--save-dir", adapter, "--dtype", "fp32")
    return save, proc.stdout, adapter


@pytest.mark.multiprocess
def test_lora_exports_a_peft_adapter_with_the_same_logits(glm, lora, tokens):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import load_inference_model, read_run_info

    save, log, adapter = lora
    assert "LoRA rank 4 alpha 8 on linear_qkv,linear_proj" in log, log
    with open(os.path.join(adapter, "adapter_config.json")) as handle:
        assert json.load(handle)["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    try:
        model = load_inference_model(save, read_run_info(save))
        with torch.no_grad():
            ours = model(tokens, torch.arange(tokens.shape[1])[None].expand(2, -1), None).float()
    finally:
        destroy_single_process()
    base = AutoModelForCausalLM.from_pretrained(glm["hf"], attn_implementation="eager",
                                                dtype=torch.float32)
    with torch.no_grad():
        plain = base(tokens).logits
        peft = PeftModel.from_pretrained(base, adapter).eval()(tokens).logits
    vocab = plain.shape[-1]
    assert (peft - ours[..., :vocab]).abs().max().item() <= TOLERANCE
    assert (plain - ours[..., :vocab]).abs().max().item() > 1e-3  # the adapters trained


def test_the_expert_bias_update_rate_is_the_runs_choice(glm):
    """The import keeps the bias frozen (rate 0, the default); a fine-tune may turn the
    aux-loss-free balancing on: the rate is a training setting, not a checkpoint field."""
    from pretrain_dialog import parse_config

    common = ["--load", glm["ckpt"], "--finetune", "--use-checkpoint-args", "--data-path",
              "unused", "--train-iters", "1"]
    assert parse_config(common).model.moe_router_bias_update_rate == 0.0
    assert parse_config(common + ["--moe-router-bias-update-rate", "1e-3"]
                        ).model.moe_router_bias_update_rate == 1e-3


def test_lora_on_the_mlp_is_refused_naming_the_targets(glm):
    from pretrain_dialog import parse_config

    with pytest.raises(ValueError, match=r"lora_target: linear_fc1 is the MLP, which on this "
                       r"Mixture-of-Experts model .* use --lora-target linear_qkv linear_proj"):
        parse_config(["--load", glm["ckpt"], "--finetune", "--use-checkpoint-args",
                      "--data-path", "unused", "--train-iters", "1", "--lora-rank", "4",
                      "--lora-target", "linear_fc1"])


def _edited(glm, tmp_path, **changes) -> str:
    folder = tmp_path / "edited"
    folder.mkdir()
    with open(os.path.join(glm["hf"], "config.json")) as handle:
        config = json.load(handle)
    for key, value in changes.items():
        if key == "rope_type":
            config["rope_parameters"]["rope_type"] = value
            config["rope_parameters"]["factor"] = 2.0
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("changes, message", [
    ({"norm_topk_prob": False}, r"norm_topk_prob false with num_experts_per_tok 2: "
                                r"megatron-core always renormalizes"),
    ({"n_shared_experts": 0}, r"n_shared_experts 0 is not supported: Glm4MoeForCausalLM always "
                              r"has the shared expert block; use n_shared_experts >= 1"),
    ({"hidden_act": "gelu"}, r"hidden_act 'gelu' is not supported"),
    ({"rope_type": "linear"}, r"rope_parameters.rope_type 'linear' is not supported for "
                              r"Glm4MoeForCausalLM .* use rope_type default"),
    ({"n_group": 2, "topk_group": 2}, r"n_group 2 with num_experts_per_tok 2 and topk_group 2"),
])
def test_what_cannot_be_represented_is_refused(glm, tmp_path, changes, message):
    from mt_dialog.convert.families import ConversionError, read_hf_config

    folder = _edited(glm, tmp_path, **changes)
    with pytest.raises(ConversionError, match=re.escape(os.path.join(folder, "config.json"))
                       + ": " + message):
        read_hf_config(folder)
