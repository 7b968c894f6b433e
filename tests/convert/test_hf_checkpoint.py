"""hf-to-mcore / mcore-to-hf end to end: logits equal Hugging Face's at TP=1 and TP=2 (Llama,
Qwen2, Qwen3 tied and untied; the TP=2 logits of all four in one launch), export gives back
identical tensors, a fine-tune starts from the import at TP=2, PP=2 and (Qwen3-MoE) EP=2, chat
answers, --use-checkpoint-args takes Qwen3's q/k layernorm."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.convert.conftest import (REPO, convert, convert_here, hf_logits, parallel_logits,
                                    tool_here)
from tests.training.launch import run, run_torchrun
from tools.chat import main as chat_main
from tools.preprocess_dialog import main as preprocess_main

pytestmark = pytest.mark.multiprocess
TOLERANCE = 1e-4  # max abs logit difference in fp32 (issue 5)


@pytest.fixture(scope="module")
def tokens():
    torch.manual_seed(1)
    return torch.randint(0, 500, (2, 100))  # 100 > 64: reaches the llama3-scaled frequencies


@pytest.fixture()
def single_process():
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    yield generate
    destroy_single_process()


FAMILIES = ["llama", "qwen", "qwen3", "qwen3_untied"]


@pytest.mark.parametrize("name", FAMILIES)
def test_import_tp1_logits_equal_hf(name, hf_models, imported, tokens, single_process):
    generator = single_process.Generator.from_checkpoint(imported[name])
    reference = hf_logits(hf_models[name], tokens)
    with torch.no_grad():
        ours = generator.model(tokens, torch.arange(tokens.shape[1])[None].expand(2, -1), None)
    assert ours.shape == reference.shape  # exactly the imported rows (qwen: tokenizer + 20)
    assert (ours - reference).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def tp2_logits(hf_models, imported, tokens, tmp_path_factory):
    """{family: logits} of every import loaded at TP=2, all in one launch."""
    from transformers import AutoConfig

    vocabs = {name: AutoConfig.from_pretrained(hf_models[name]).vocab_size for name in FAMILIES}
    return parallel_logits({name: imported[name] for name in FAMILIES}, vocabs, tokens,
                           str(tmp_path_factory.mktemp("tp2_logits")), ["--tp", "2"])


@pytest.mark.parametrize("name", FAMILIES)
def test_import_tp2_logits_equal_hf(name, hf_models, tp2_logits, tokens):
    reference = hf_logits(hf_models[name], tokens)
    ours = tp2_logits[name]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= TOLERANCE


def _tensors(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()


@pytest.mark.parametrize("name,shard", [("llama", "0.0001"), ("qwen", "5"), ("qwen3", "5"),
                                        ("qwen3_untied", "5")])
def test_export_gives_back_identical_tensors(name, shard, hf_models, imported, tmp_path):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    out = tmp_path / "hf"
    (convert if name == "llama" else convert_here)(  # one fresh converter process is enough
        "mcore-to-hf", "--load-dir", imported[name], "--save-dir", out, "--max-shard-size", shard)
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (name == "llama")
    original, exported = _tensors(hf_models[name]), _tensors(out)
    assert sorted(original) == sorted(exported)
    for key, tensor in original.items():
        assert torch.equal(tensor, exported[key]), key
    a, b = AutoConfig.from_pretrained(hf_models[name]), AutoConfig.from_pretrained(out)
    for field in ("architectures", "model_type", "vocab_size", "num_key_value_heads",
                  "tie_word_embeddings",
                  "rope_parameters", "max_position_embeddings", "rms_norm_eps", "hidden_act",
                  "pad_token_id"):
        assert getattr(a, field) == getattr(b, field), field
    assert a.pad_token_id == 0 and GenerationConfig.from_pretrained(out).pad_token_id == 0
    head_dim = [getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
                for c in (a, b)]
    assert head_dim[0] == head_dim[1]
    text = "Hello! 早上好<|im_end|>"
    assert (AutoTokenizer.from_pretrained(out).encode(text)
            == AutoTokenizer.from_pretrained(hf_models[name]).encode(text))


def test_chat_from_import_is_hf_greedy_decoding(hf_models, imported, single_process):
    from transformers import AutoModelForCausalLM

    generator = single_process.Generator.from_checkpoint(imported["llama"])
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = generator.prompt_ids(messages)
    ours, _ = generator.generate_ids(prompt, max_new_tokens=12)
    model = AutoModelForCausalLM.from_pretrained(hf_models["llama"]).eval()
    theirs = model.generate(torch.tensor([prompt]), max_new_tokens=len(ours), do_sample=False,
                            eos_token_id=generator.end_of_turn, pad_token_id=0)
    assert ours == theirs[0, len(prompt):].tolist()


def _dataset(tmp_path, tokenizer_dir) -> str:
    from mt_dialog import demo

    corpus = str(tmp_path / "corpus.jsonl")
    demo.write_corpus(corpus, 120, seed=3)
    prefix = str(tmp_path / "chat")
    tool_here(preprocess_main, "--input", corpus, "--tokenizer-type", "huggingface",
              "--tokenizer-path", tokenizer_dir, "--template", "chatml", "--seq-length", "512",
              "--output-prefix", prefix, "--no-progress")
    return prefix


def _losses(stdout: str):
    return [float(m) for m in re.findall(r"loss/turn ([0-9.]+)", stdout)]


@pytest.mark.parametrize("name,layout", [("llama", ["--tensor-model-parallel-size", "2"]),
                                         ("qwen", ["--pipeline-model-parallel-size", "2"]),
                                         ("qwen3", ["--tensor-model-parallel-size", "2"]),
                                         ("qwen3_moe", ["--expert-model-parallel-size", "2"]),
                                         ("mixtral", ["--expert-model-parallel-size", "2",
                                                      "--moe-token-dispatcher-type",
                                                      "alltoall"])])
def test_finetune_from_import_then_chat_and_export(name, layout, request, tmp_path,
                                                   single_process):
    """Each family imported, fine-tuned at a parallel layout (the MoE families at EP=2, with
    each token dispatcher), chatted with, exported back: the export's logits are the
    checkpoint's."""
    moe = name in ("qwen3_moe", "mixtral")
    ckpt = (request.getfixturevalue("moe_models")[name][1] if moe
            else request.getfixturevalue("imported")[name])
    data = _dataset(tmp_path, os.path.join(ckpt, "tokenizer"))
    save = str(tmp_path / "sft")
    proc = run_torchrun("pretrain_dialog.py", 2, [
        "--load", ckpt, "--finetune", "--use-checkpoint-args", *layout,
        "--data-path", data, "--micro-batch-size", "2", "--global-batch-size", "4",
        "--train-iters", "16", "--lr", "2e-3", "--log-interval", "4", "--save", save])
    losses = _losses(proc.stdout)
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.3, proc.stdout
    assert (" | experts max/mean " in proc.stdout) == moe, proc.stdout  # the router load
    chat_args = ["--load", save, "--message", "Count from 3 to 8.", "--max-new-tokens", "8",
                 "--json"]
    if name == "llama":  # tools/chat.py as users start it; the other families through its main
        chat = subprocess.run([sys.executable, "tools/chat.py", *chat_args], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
    else:
        chat = tool_here(chat_main, *chat_args, expect_ok=False)
    assert chat.returncode == 0, chat.stderr
    reply = json.loads(chat.stdout)
    assert reply["prompt_tokens"] > 0 and reply["token_ids"]
    assert reply["finish_reason"] in ("end_of_turn", "eos", "max_new_tokens")
    # the fine-tuned checkpoint (saved at TP=2 / PP=2, vocabulary padded) exports to a model
    # whose logits are the checkpoint's
    out = tmp_path / "hf"
    exported = (convert if name == "llama" else convert_here)(
        "mcore-to-hf", "--load-dir", save, "--save-dir", out)
    assert ("chat template: chatml (as Jinja; AutoTokenizer.from_pretrained reproduces the "
            "training token layout exactly)") in exported.stdout
    generator = single_process.Generator.from_checkpoint(save)
    ids = torch.tensor([generator.prompt_ids([{"role": "user", "content": "Hello!"}])])
    reference = hf_logits(str(out), ids)
    with torch.no_grad():
        ours = generator.model(ids, torch.arange(ids.shape[1])[None], None)
    rows = reference.shape[-1]
    assert rows == generator.vocab_size + (20 if name == "qwen" else 0)
    assert (ours[..., :rows] - reference).abs().max().item() <= TOLERANCE
    # a full resume needs the same padded vocabulary (the optimizer state has its shape) and,
    # for a MoE model, the same expert-parallel size (checked first, before building)
    resume = _pretrain(["--load", save, "--use-checkpoint-args", "--data-path", data,
                        "--train-iters", "17", "--make-vocab-size-divisible-by", "1"])
    assert resume.returncode == 1 and "Traceback" not in resume.stderr, resume.stderr
    if moe:
        assert resume.stderr.strip() == (
            f"error: --load {save}: the checkpoint's optimizer state was saved at "
            "--expert-model-parallel-size 2, this run has 1; resume at 2, or start from its "
            "weights (any layout) with --finetune"), resume.stderr
    else:
        assert "vocabulary has" in resume.stderr and "--make-vocab-size-divisible-by" in \
            resume.stderr, resume.stderr


def test_existing_destination_is_refused(hf_models, imported):
    proc = convert_here("hf-to-mcore", "--load-dir", hf_models["llama"], "--save-dir",
                        imported["qwen"], expect_ok=False)
    assert proc.returncode == 1 and "already exists and is not empty" in proc.stderr
    assert json.load(open(os.path.join(imported["qwen"], "config.json")))["source"][
        "architecture"] == "Qwen2ForCausalLM"  # untouched


def test_folder_without_tokenizer_imports_but_chat_says_why(hf_models, tmp_path):
    folder = tmp_path / "weights_only"
    folder.mkdir()
    for name in os.listdir(hf_models["qwen"]):
        if name in ("config.json", "model.safetensors"):
            os.link(os.path.join(hf_models["qwen"], name), folder / name)
    proc = convert("hf-to-mcore", "--load-dir", folder, "--save-dir", tmp_path / "ckpt")
    assert "no tokenizer files" in proc.stderr
    chat = subprocess.run([sys.executable, "tools/chat.py", "--load", tmp_path / "ckpt",
                           "--message", "hi"], cwd=REPO, capture_output=True, text=True)
    assert chat.returncode == 1 and "records no tokenizer" in chat.stderr


def _pretrain(args):
    return run("pretrain_dialog.py", 1, args, expect_ok=False)


def test_training_refuses_misuse_of_an_import(imported, tmp_path):
    data = _dataset(tmp_path, os.path.join(imported["llama"], "tokenizer"))
    common = ["--data-path", data, "--train-iters", "1", "--load", imported["llama"]]
    for extra in ([], ["--bf16"]):  # weights only is the reason, whatever the precision
        resume = _pretrain(common + ["--use-checkpoint-args", *extra])
        assert resume.returncode == 1 and "holds weights only" in resume.stderr, resume.stderr
        assert "add --finetune" in resume.stderr and "--pretrained-checkpoint" in resume.stderr
    wrong = _pretrain(common + ["--finetune", "--num-layers", "2", "--hidden-size", "32",
                                "--num-attention-heads", "4"])
    assert wrong.returncode == 1
    assert "hidden_size = 64 but this run has 32" in wrong.stderr
    assert "--use-checkpoint-args" in wrong.stderr
    alone = _pretrain(["--data-path", data, "--train-iters", "1", "--use-checkpoint-args"])
    assert alone.returncode == 2 and "needs --load" in alone.stderr  # a command-line error
    # a model flag that contradicts the checkpoint is refused, not silently overridden
    both = _pretrain(common + ["--finetune", "--use-checkpoint-args", "--num-layers", "4"])
    assert both.returncode == 2, both.stderr
    assert (f"error: --use-checkpoint-args: --num-layers 4 but the checkpoint {imported['llama']} "
            "has 2; drop --num-layers (the checkpoint's value is used) or --use-checkpoint-args"
            ) in both.stderr


def test_use_checkpoint_args_takes_qk_layernorm(imported):
    """Qwen3's q/k layernorm is an architecture field: --use-checkpoint-args takes it, a load
    with another value is refused naming --qk-layernorm, and so is a contradicting flag."""
    import dataclasses

    from mt_dialog.training.checkpoint import CheckpointError, check_model_matches
    from pretrain_dialog import parse_config

    common = ["--data-path", "unused", "--train-iters", "1", "--finetune",
              "--use-checkpoint-args"]
    qwen3 = parse_config(common + ["--load", imported["qwen3"]]).model
    assert qwen3.qk_layernorm and qwen3.kv_channels == 32 and not qwen3.add_qkv_bias
    assert not parse_config(common + ["--load", imported["llama"]]).model.qk_layernorm
    check_model_matches(imported["qwen3"], qwen3)
    with pytest.raises(CheckpointError, match=r"qk_layernorm = True but this run has False; "
                       r"pass --qk-layernorm"):
        check_model_matches(imported["qwen3"], dataclasses.replace(qwen3, qk_layernorm=False))
    with pytest.raises(ValueError, match=r"--qk-layernorm True but the checkpoint .* has False"):
        parse_config(common + ["--load", imported["llama"], "--qk-layernorm"])
