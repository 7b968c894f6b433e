"""Tiny random Hugging Face models built here (no downloads), imported once per session.

``hf_models["llama"]``: LlamaForCausalLM, grouped-query attention (4 heads, 2 groups), untied
embeddings, Llama 3.1 RoPE scaling with original_max_position_embeddings 64 (so sequences of 100
tokens reach the scaled frequencies), saved in 5 safetensors shards with an index.
``hf_models["qwen"]``: Qwen2ForCausalLM (QKV bias, tied embeddings, RoPE base 1e6), one
safetensors file, 20 more embedding rows than the tokenizer has ids (as real Qwen2 models).
``hf_models["qwen3"]`` / ``["qwen3_untied"]``: Qwen3ForCausalLM (random per-head q/k RMSNorm
weights, head_dim 32 != hidden / heads = 16, grouped-query attention, no biases, RMS eps 1e-6,
RoPE base 1e6), tied and untied embeddings.
``moe_models``: Qwen3MoeForCausalLM (norm_topk_prob false) and MixtralForCausalLM, 4 experts, top 2,
imported in this process.
All carry the session's ChatML byte-level BPE tokenizer (``hf_tokenizer_dir``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.training.launch import tool_here

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT = os.path.join(REPO, "tools", "convert_checkpoint.py")


def convert(*args, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``python tools/convert_checkpoint.py *args`` in a fresh process."""
    proc = subprocess.run([sys.executable, CONVERT, *map(str, args), "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    if expect_ok and proc.returncode != 0:
        raise AssertionError(f"convert {args} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def convert_here(*args, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """``convert(*args)`` through ``tools/convert_checkpoint.main`` in this process."""
    from tools.convert_checkpoint import main

    return tool_here(main, *args, "--no-progress", expect_ok=expect_ok)


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-5, tie_word_embeddings=False, rope_theta=500000.0, pad_token_id=0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    return LlamaForCausalLM(config)


def _qwen(vocab: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab + 20, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        rope_theta=1000000.0, tie_word_embeddings=True, pad_token_id=0)
    model = Qwen2ForCausalLM(config)
    for layer in model.model.layers:  # random biases (they start at zero)
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.data.normal_(0, 0.5)
    return model


def _random_qk_norms(model):
    """Qwen3's per-head q/k RMSNorm weights drawn at random (they start at one)."""
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.data.uniform_(0.5, 2.0)
    return model


def _qwen3(vocab: int, tied: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=256,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tied, pad_token_id=0)
    return _random_qk_norms(Qwen3ForCausalLM(config))


def _qwen3_untied(vocab: int):
    return _qwen3(vocab, tied=False)


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory, hf_tokenizer_dir):
    """{"llama": folder, "qwen": folder, "qwen3": folder, "qwen3_untied": folder} of tiny random
    models with the test tokenizer."""
    pytest.importorskip("transformers")
    import torch
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(hf_tokenizer_dir))
    root = tmp_path_factory.mktemp("hf_models")
    folders = {}
    for name, build, shard in (("llama", _llama, "100KB"), ("qwen", _qwen, "10GB"),
                               ("qwen3", _qwen3, "10GB"), ("qwen3_untied", _qwen3_untied, "10GB")):
        torch.manual_seed(0)
        folder = str(root / name)
        build(vocab).save_pretrained(folder, max_shard_size=shard)
        for file in os.listdir(hf_tokenizer_dir):
            shutil.copy2(os.path.join(hf_tokenizer_dir, file), folder)
        folders[name] = folder
    return folders


def _qwen3_moe(vocab: int):
    """Qwen3-MoE without norm_topk_prob (softmax over all experts, then the top k:
    --moe-router-pre-softmax)."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=False, max_position_embeddings=256)
    return _random_qk_norms(Qwen3MoeForCausalLM(config))


def _mixtral(vocab: int):
    """Mixtral: softmax over the top k (megatron-core's default routing)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
        max_position_embeddings=256, tie_word_embeddings=False)
    return MixtralForCausalLM(config)


def in_process(convert_fn, config) -> None:
    """``hf_checkpoint.import_hf`` / ``export_hf`` in this process (the command line is tested
    on the dense families; a converter process costs seconds of imports)."""
    from mt_dialog.training.distributed import destroy_single_process

    try:
        convert_fn(config)
    finally:
        destroy_single_process()


@pytest.fixture(scope="session")
def moe_models(tmp_path_factory, hf_tokenizer_dir):
    """{"qwen3_moe" | "mixtral": (HF folder, imported checkpoint)}: tiny random MoE models
    (4 experts, top 2, routers with random weights so that they choose) with the test
    tokenizer, imported in this process."""
    pytest.importorskip("transformers")
    import torch

    from mt_dialog.convert.hf_checkpoint import ImportConfig, import_hf
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(hf_tokenizer_dir))
    root = tmp_path_factory.mktemp("hf_moe")
    out = {}
    for name, build in (("qwen3_moe", _qwen3_moe), ("mixtral", _mixtral)):
        torch.manual_seed(0)
        model = build(vocab)
        for gate in (m for n, m in model.named_modules() if n.endswith((".mlp.gate", "moe.gate"))):
            gate.weight.data.normal_(0, 0.5)  # routers that choose (they start near uniform)
        folder, ckpt = str(root / name), str(root / f"{name}_ckpt")
        model.save_pretrained(folder)
        for file in os.listdir(hf_tokenizer_dir):
            shutil.copy2(os.path.join(hf_tokenizer_dir, file), folder)
        in_process(import_hf, ImportConfig(load_dir=folder, save_dir=ckpt, progress=False))
        out[name] = (folder, ckpt)
    return out


@pytest.fixture(scope="session")
def imported(hf_models, tmp_path_factory):
    """{name: CKPT} for every ``hf_models`` folder: the models converted by ``hf-to-mcore``
    (llama by the command line in a fresh process, the others by its ``main`` here)."""
    root = tmp_path_factory.mktemp("imported")
    out = {}
    for name, folder in hf_models.items():
        out[name] = str(root / name)
        (convert if name == "llama" else convert_here)(
            "hf-to-mcore", "--load-dir", folder, "--save-dir", out[name])
    return out


def parallel_logits(checkpoints, vocabs, ids, folder, layout):
    """{name: full logits} of every checkpoint ({name: CKPT}) on ``ids`` [batch, seq], loaded by
    ONE two-process launch of ``logits_worker.py`` at ``layout`` (["--tp", "2"] or ["--ep",
    "2"]); ``vocabs`` {name: real vocabulary rows}; files under ``folder``."""
    import torch

    from tests.training.launch import run_torchrun

    names = list(checkpoints)
    torch.save(ids, os.path.join(folder, "tokens.pt"))
    outs = [os.path.join(folder, f"{name}.pt") for name in names]
    run_torchrun("tests/convert/logits_worker.py", 2, [
        "--load", *(checkpoints[n] for n in names), "--tokens", os.path.join(folder, "tokens.pt"),
        "--out", *outs, "--vocab", *(vocabs[n] for n in names), *layout])
    return {name: torch.load(out) for name, out in zip(names, outs)}


def hf_logits(folder: str, ids):
    """Logits of the Hugging Face model in ``folder`` (fp32, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    with torch.no_grad():
        return model(ids).logits
