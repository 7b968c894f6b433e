"""LoRA from an imported Hugging Face model, the way users go, to what the ecosystem loads.

The tiny Llama of ``hf_models`` (grouped-query attention, untied embeddings, Llama 3.1 RoPE
scaling) imported with ``hf-to-mcore``; a chat corpus preprocessed with its tokenizer
(``--template hf``); ``pretrain_dialog.py --load BASE --finetune --use-checkpoint-args
--lora-rank 4`` (one process, 8 iterations, saving at 4 and 8); then:

* the checkpoint holds the adapters only (and their optimizer state) and a pointer to the base;
* resuming from its iteration 4 gives the uninterrupted run's losses and adapters exactly;
* ``mcore-to-hf`` writes a PEFT adapter folder which
  ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), folder)`` loads:
  its logits equal mt_dialog's (base + adapters) within 1e-4 in fp32; ``--merge-lora`` writes a
  plain Hugging Face model with the same logits;
* ``tools/chat.py --load LORA_CKPT`` answers; a changed base is refused, a moved one with the
  same message by resume, chat and export; a re-imported base keeps its fingerprint; a resume
  with another alpha or dropout is refused.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.convert.test_export_reproduces_training import _tool, _write_corpus
from tests.training.conftest import parse_iters, read_checkpoint
from tests.training.launch import run

pytestmark = pytest.mark.multiprocess
pytest.importorskip("peft")

LORA = ["--lora-rank", "4", "--lora-alpha", "8"]
TRAIN = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2",
         "--log-interval", "1", "--save-interval", "4"]


def _train(args):
    return run("pretrain_dialog.py", 1, args, timeout=300)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, imported):
    """{"base", "data", "ckpt", "log", "resumed", "resumed_log"}: the LoRA run and a copy
    resumed from its iteration 4."""
    from tools.preprocess_dialog import main as preprocess_main

    root = tmp_path_factory.mktemp("lora_export")
    base, data, ckpt = imported["llama"], str(root / "data"), str(root / "lora_ckpt")
    _write_corpus(str(root / "corpus.jsonl"), 60)
    _tool(preprocess_main, ["--input", root / "corpus.jsonl", "--tokenizer-type", "huggingface",
                            "--tokenizer-path", os.path.join(base, "tokenizer"), "--template",
                            "hf", "--seq-length", 128, "--split", "100,0", "--output-prefix",
                            data, "--no-progress"])
    common = ["--load", base, "--finetune", "--use-checkpoint-args", "--data-path", data,
              *LORA, *TRAIN]
    log = _train([*common, "--train-iters", 8, "--save", ckpt]).stdout
    resumed = str(root / "resumed")  # the run's folder as it was after iteration 4
    os.makedirs(resumed)
    shutil.copytree(os.path.join(ckpt, "iter_0000004"), os.path.join(resumed, "iter_0000004"))
    shutil.copytree(os.path.join(ckpt, "tokenizer"), os.path.join(resumed, "tokenizer"))
    with open(os.path.join(resumed, "latest_checkpointed_iteration.txt"), "w") as handle:
        handle.write("4")
    resumed_log = _train(["--load", resumed, "--use-checkpoint-args", "--data-path", data,
                          *LORA, *TRAIN, "--train-iters", 8, "--save", resumed]).stdout
    return {"base": base, "data": data, "ckpt": ckpt, "log": log, "resumed": resumed,
            "resumed_log": resumed_log, "root": root}


def test_lora_run_trains_adapters_only(lora_run):
    log = lora_run["log"]
    assert "LoRA rank 4 alpha 8 on linear_qkv,linear_proj,linear_fc1,linear_fc2: trainable " \
           "parameters" in log, log
    losses = [it["loss_turn"] for it in parse_iters(log)]
    assert len(losses) == 8 and sum(losses[-3:]) < sum(losses[:3]), losses
    saved = read_checkpoint(os.path.join(lora_run["ckpt"], "iter_0000008"))
    model = [k for k in saved if not k.startswith("optimizer.")]
    assert model and all(".lora." in k for k in model), model
    # targets x (A, B), the layers stacked along a first axis (megatron's layout)
    assert len(model) == 4 * 2 and all(saved[k].shape[0] == 2 for k in model), model
    assert any(k.startswith("optimizer.") for k in saved)
    from mt_dialog.training.lora_checkpoint import base_pointer_of

    pointer = base_pointer_of(lora_run["ckpt"])
    assert pointer["path"] == os.path.abspath(lora_run["base"]) and pointer["iteration"] == 0


def test_resume_is_exact(lora_run):
    first = parse_iters(lora_run["log"])[4:]
    again = parse_iters(lora_run["resumed_log"])
    assert [it["iter"] for it in again] == [5, 6, 7, 8]
    assert [it["loss_turn"] for it in again] == [it["loss_turn"] for it in first]
    a = read_checkpoint(os.path.join(lora_run["ckpt"], "iter_0000008"))
    b = read_checkpoint(os.path.join(lora_run["resumed"], "iter_0000008"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def exported(lora_run, hf_models):
    """{"adapter": PEFT folder, "merged": HF folder, "reports"} of the LoRA checkpoint."""
    from mt_dialog.training.distributed import destroy_single_process
    from tools.convert_checkpoint import main as convert_main

    root = lora_run["root"]
    adapter, merged = str(root / "adapter"), str(root / "merged")
    reports = [_tool(convert_main, ["mcore-to-hf", "--load-dir", lora_run["ckpt"], "--save-dir",
                                    folder, "--dtype", "fp32", "--no-progress", *extra])
               for folder, extra in ((adapter, []), (merged, ["--merge-lora"]))]
    destroy_single_process()
    return {"adapter": adapter, "merged": merged, "reports": reports}


def _mt_dialog_logits(ckpt: str, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the LoRA checkpoint (base + adapters) as tools/chat.py loads it, fp32."""
    from mt_dialog.training.distributed import destroy_single_process
    from mt_dialog.training.saved_run import load_inference_model, read_run_info

    model = load_inference_model(ckpt, read_run_info(ckpt))
    try:
        with torch.no_grad():
            return model(ids, torch.arange(ids.shape[1])[None], None).float()
    finally:
        destroy_single_process()


def test_peft_loads_the_adapter_and_computes_what_mt_dialog_trained(lora_run, exported,
                                                                    hf_models):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    assert "exported the LoRA adapter of iteration 8 (rank 4 on q_proj, k_proj, v_proj, " \
           "o_proj, gate_proj, up_proj, down_proj)" in exported["reports"][0]
    with open(os.path.join(exported["adapter"], "adapter_config.json")) as handle:
        config = json.load(handle)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    with safe_open(os.path.join(exported["adapter"], "adapter_model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == 2 * 7 * 2  # layers x HF modules x (A, B)

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11, 300, 2]])
    ours = _mt_dialog_logits(lora_run["ckpt"], ids)
    base = AutoModelForCausalLM.from_pretrained(hf_models["llama"], attn_implementation="eager",
                                                dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        peft = PeftModel.from_pretrained(base, exported["adapter"]).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(
            exported["merged"], attn_implementation="eager", dtype=torch.float32)(ids).logits
    vocab = plain.shape[-1]
    assert (peft - ours[..., :vocab]).abs().max() <= 1e-4
    assert (merged - ours[..., :vocab]).abs().max() <= 1e-4
    assert (plain - ours[..., :vocab]).abs().max() > 1e-3  # the adapters changed the model


def test_chat_answers_from_the_lora_checkpoint(lora_run, exported, hf_models):
    """tools/chat.py's greedy reply from base + adapters is PEFT's greedy reply, token by
    token, on the prompt the model's own chat template gives."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    message = "What is 1 plus 2?"
    proc = run("tools/chat.py", 1, ["--load", lora_run["ckpt"], "--message", message,
                                    "--max-new-tokens", "6", "--json"], timeout=300)
    reply = json.loads(proc.stdout.strip().splitlines()[-1])
    assert reply["token_ids"], reply
    tokenizer = AutoTokenizer.from_pretrained(hf_models["llama"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                        add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"]
    assert len(ids) == reply["prompt_tokens"]
    base = AutoModelForCausalLM.from_pretrained(hf_models["llama"], attn_implementation="eager",
                                                dtype=torch.float32)
    model = PeftModel.from_pretrained(base, exported["adapter"]).eval()
    greedy = []
    with torch.no_grad():
        for _ in reply["token_ids"]:
            logits = model(torch.tensor([ids + greedy])).logits[0, -1, :len(tokenizer)]
            greedy.append(int(logits.argmax()))
    assert greedy == reply["token_ids"], (greedy, reply)


def test_a_changed_or_missing_base_is_refused(lora_run, tmp_path):
    from mt_dialog.training.checkpoint import CheckpointError
    from mt_dialog.training.lora_checkpoint import base_pointer_of, check_base

    pointer = base_pointer_of(lora_run["ckpt"])
    check_base(lora_run["ckpt"], pointer)  # unchanged: accepted
    with pytest.raises(CheckpointError, match="changed since the adapters were trained"):
        check_base(lora_run["ckpt"], dict(pointer, fingerprint="0" * 64))
    with pytest.raises(CheckpointError, match="is missing; restore it"):
        check_base(lora_run["ckpt"], dict(pointer, path=str(tmp_path / "gone")))


def test_a_lora_checkpoint_needs_its_own_lora_flags(lora_run):
    from mt_dialog.training.checkpoint import CheckpointError, StartPoint
    from mt_dialog.training.config import LoraConfig, ModelConfig
    from mt_dialog.training.lora_checkpoint import check_lora_start
    from mt_dialog.training.saved_run import read_run_info, single_process_config

    model = ModelConfig()
    start = StartPoint(lora_run["ckpt"], False)
    same = single_process_config(model, lora=LoraConfig(lora_rank=4, lora_alpha=8.0))
    check_lora_start(start, same)  # accepted
    with pytest.raises(CheckpointError, match="it is a LoRA checkpoint .* pass its --lora-rank"):
        check_lora_start(start, single_process_config(model))
    with pytest.raises(CheckpointError, match="its adapters have rank 4 .* pass --lora-rank 4"):
        check_lora_start(start, single_process_config(model, lora=LoraConfig(lora_rank=8)))
    with pytest.raises(CheckpointError, match=r"trained with alpha 8 .* asks for alpha 4 \(the "
                       r"rank: --lora-alpha omitted\).*pass --lora-alpha 8 --lora-dropout 0"):
        check_lora_start(start, single_process_config(model, lora=LoraConfig(lora_rank=4)))
    dropout = LoraConfig(lora_rank=4, lora_alpha=8.0, lora_dropout=0.1)
    with pytest.raises(CheckpointError, match="dropout 0, but .* and dropout 0.1"):
        check_lora_start(start, single_process_config(model, lora=dropout))
    check_lora_start(StartPoint(lora_run["ckpt"], True),  # --finetune: a new dropout is fine
                     single_process_config(model, lora=dropout))
    with pytest.raises(CheckpointError, match="not a LoRA checkpoint.*add --finetune"):
        check_lora_start(StartPoint(lora_run["base"], False), same)
    assert read_run_info(lora_run["ckpt"])["config"]["lora"]["lora_rank"] == 4


def test_chat_and_export_refuse_a_missing_base_as_resume_does(lora_run, tmp_path, capsys):
    """A LoRA checkpoint whose base was moved: tools/chat.py and mcore-to-hf say what resume
    says (``lora_checkpoint.checked_base``), one line, no traceback."""
    from tools.chat import main as chat_main
    from tools.convert_checkpoint import main as convert_main

    moved = str(tmp_path / "lora")
    shutil.copytree(lora_run["ckpt"], moved)
    common = os.path.join(moved, "iter_0000008", "common.pt")
    state = torch.load(common, weights_only=False)
    state["lora_base"]["path"] = gone = str(tmp_path / "moved_away")
    torch.save(state, common)
    missing = f"its base checkpoint {gone}/iter_0000000 (the weights the adapters were trained on)" \
        " is missing; restore it at that path"
    assert chat_main(["--load", moved, "--message", "hi"]) == 1
    assert capsys.readouterr().err.strip() == f"error: --load {moved}: {missing} (a base " \
        "imported from Hugging Face: import the same model there again)"
    assert convert_main(["mcore-to-hf", "--load-dir", moved, "--save-dir",
                         str(tmp_path / "hf"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert f"--load-dir {moved}: {missing}" in err and "Traceback" not in err, err


def test_a_reimported_base_keeps_its_fingerprint(lora_run, hf_models, tmp_path):
    """hf-to-mcore of the same model again (another save: new torch save id and path) gives
    the same fingerprint; one changed weight byte does not; a fingerprint of the older rule
    (every byte of .metadata) is still accepted."""
    from mt_dialog.training.checkpoint import CheckpointError
    from mt_dialog.training.lora_checkpoint import (
        base_pointer,
        base_pointer_of,
        check_base,
        fingerprint,
    )
    from tools.convert_checkpoint import main as convert_main

    from mt_dialog.training.distributed import destroy_single_process

    again = str(tmp_path / "again")
    try:
        _tool(convert_main, ["hf-to-mcore", "--load-dir", hf_models["llama"], "--save-dir",
                             again])
    finally:
        destroy_single_process()
    pointer = base_pointer_of(lora_run["ckpt"])
    assert base_pointer(again)["fingerprint"] == pointer["fingerprint"]
    check_base(lora_run["ckpt"], dict(pointer, path=again))
    folder = os.path.join(again, "iter_0000000")
    older = {k: v for k, v in pointer.items() if k != "files"}  # a pointer saved before records
    check_base(lora_run["ckpt"], dict(older, path=again, fingerprint=fingerprint(folder)))
    check_base(lora_run["ckpt"], dict(older, path=again,
                                      fingerprint=fingerprint(folder, legacy=True)))
    shard = os.path.join(folder, sorted(f for f in os.listdir(folder) if f.endswith(".distcp"))[0])
    with open(shard, "r+b") as handle:
        handle.seek(os.path.getsize(shard) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 1]))
    with pytest.raises(CheckpointError, match="changed since the adapters were trained"):
        check_base(lora_run["ckpt"], dict(pointer, path=again))
    with pytest.raises(CheckpointError, match="changed since the adapters were trained"):
        check_base(lora_run["ckpt"], dict(older, path=again))
