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
* ``tools/chat.py --load LORA_CKPT`` answers; a changed base is refused.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.convert.conftest import convert
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
