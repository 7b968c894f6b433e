"""The exported folder, loaded the usual way, is the trained model: for every built-in template and
for ``--template hf``.

Each case goes the way users go: ``tools/preprocess_dialog.py``, ``pretrain_dialog.py`` (one
process), ``tools/convert_checkpoint.py mcore-to-hf``; then, with nothing but
``AutoTokenizer.from_pretrained(folder)`` and ``AutoModelForCausalLM.from_pretrained(folder)``:

(a) ``apply_chat_template`` gives the ids training stored (whole conversations, a system message
    included) and the generation prompt ``tools/chat.py`` builds, followed in the stored data by
    a trained reply;
(b) greedy ``model.generate`` gives ``tools/chat.py``'s greedy reply (``Generator``) token for
    token, stopping at the end-of-turn through the exported ``generation_config.json``.

The built-in templates use the demo SentencePiece tokenizer and train from scratch (``qwen3_keep``:
qwen3 with ``--reasoning keep`` on replies that reason first, so the history's reasoning must be
kept by chat's prompt and by the exported Jinja as training kept it); ``hf`` is a
Qwen2 model whose tokenizer is a base model's (eos ``<|endoftext|>``, ChatML replies ending with
``<|im_end|>``), imported with ``hf-to-mcore`` and fine-tuned (the README's path). The corpus's
replies are short set phrases, so that 40 iterations make every reply end with the end-of-turn
and greedy choices are far from ties. Training runs two processes at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

from tests.convert.conftest import REPO
from tests.training.launch import command, launch_env

pytestmark = pytest.mark.multiprocess
pytest.importorskip("transformers")

BUILT_IN = ["firefly", "chatml", "llama2", "llama3", "alpaca", "plain"]
# qwen3_keep: the qwen3 template with --reasoning keep, on a corpus whose replies reason first:
# chat's prompt and the exported Jinja must keep the history's reasoning as training did
CASES = BUILT_IN + ["hf", "qwen3_keep"]
SYSTEMS = ["You are a helpful assistant.", "Answer briefly."]
SEQ_LENGTH = 192
TRAIN = ["--micro-batch-size", "4", "--global-batch-size", "4", "--train-iters", "80",
         "--lr", "1e-2", "--log-interval", "80"]
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4"]
CHECKED = 6  # corpus conversations checked token for token


def _turn(rng: random.Random):
    if rng.random() < 0.5:
        return "Thank you!", "You are welcome."
    a, b = rng.randint(0, 4), rng.randint(0, 4)
    return f"What is {a} plus {b}?", str(a + b)


def _conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.4 else []
    for _ in range(rng.randint(1, 2)):
        user, reply = _turn(rng)
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def _reasoned(record: dict) -> dict:
    """The record with a short reasoning before every reply (``reasoning_content``)."""
    return {"messages": [dict(m, reasoning_content="Easy.") if m["role"] == "assistant" else m
                         for m in record["messages"]]}


def _write_corpus(path: str, count: int, reasoning: bool = False) -> list:
    rng = random.Random(0)
    records = [_conversation(rng) for _ in range(count)]
    records = [_reasoned(r) for r in records] if reasoning else records
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)
    return records


def _tool(main, argv) -> str:
    """Run a tool's ``main(argv)`` here; its output, stdout then stderr (failing the test on a
    non-zero exit)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    assert code == 0, f"{argv}:\n{out.getvalue()}\n{err.getvalue()}"
    return out.getvalue() + err.getvalue()


def _train_all(jobs: dict, parallel: int = 2) -> None:
    """``pretrain_dialog.py *args`` for every job, one process each, ``parallel`` at a time."""
    pending, running = list(jobs.items()), []
    while pending or running:
        while pending and len(running) < parallel:
            name, args = pending.pop(0)
            proc = subprocess.Popen(command("pretrain_dialog.py", 1, args), cwd=REPO,
                                    env=launch_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            running.append((name, proc))
        name, proc = running.pop(0)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"training {name} failed:\n{output[-5000:]}"


def _import_base_qwen(root, hf_models, tokenizer_dir) -> str:
    """The tiny Qwen2 model with the base model's ChatML tokenizer, through ``hf-to-mcore``."""
    from tools.convert_checkpoint import main as convert_main

    folder = root / "qwen_base"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy2(os.path.join(hf_models["qwen"], name), folder / name)
    for name in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, name), folder / name)
    ckpt = root / "qwen_base_ckpt"
    _tool(convert_main, ["hf-to-mcore", "--load-dir", folder, "--save-dir", ckpt,
                         "--no-progress"])
    return str(ckpt)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, demo_tokenizer, hf_models, hf_base_chatml_dir):
    """{case: {"data", "ckpt", "hf", "report"}} after preprocessing, training and export."""
    from mt_dialog.data.storage import indexed_dataset_module
    from tools.convert_checkpoint import main as convert_main
    from tools.preprocess_dialog import main as preprocess_main

    indexed_dataset_module()  # preprocessing then writes inline, not in a writer process
    root = tmp_path_factory.mktemp("export_runs")
    corpora = {"plain": str(root / "corpus.jsonl"), "reasoning": str(root / "reasoning.jsonl")}
    _write_corpus(corpora["plain"], 160)
    _write_corpus(corpora["reasoning"], 160, reasoning=True)
    imported = _import_base_qwen(root, hf_models, hf_base_chatml_dir)
    runs, jobs = {}, {}
    for name in CASES:
        data, ckpt = str(root / f"{name}_data"), str(root / f"{name}_ckpt")
        tokenizer = (["--tokenizer-type", "huggingface", "--tokenizer-path",
                      os.path.join(imported, "tokenizer")] if name == "hf"
                     else ["--tokenizer-model", demo_tokenizer["tokenizer"]])
        corpus = corpora["reasoning" if name == "qwen3_keep" else "plain"]
        template = ["--template", "qwen3", "--reasoning", "keep"] if name == "qwen3_keep" \
            else ["--template", name]
        _tool(preprocess_main, ["--input", corpus, *tokenizer, *template,
                                "--seq-length", SEQ_LENGTH, "--split", "100,0",
                                "--output-prefix", data, "--no-progress"])
        # hf: the README's path, a pretrained model fine-tuned in bf16 (exported in bf16,
        # loaded by transformers in bf16)
        start = (["--load", imported, "--finetune", "--use-checkpoint-args", "--bf16"]
                 if name == "hf" else MODEL)
        jobs[name] = [*start, "--data-path", data, *TRAIN, "--save", ckpt]
        runs[name] = {"data": data, "ckpt": ckpt, "hf": str(root / f"{name}_hf"),
                      "imported": imported, "corpus": corpus}
    _train_all(jobs)
    for run in runs.values():
        run["report"] = _tool(convert_main, ["mcore-to-hf", "--load-dir", run["ckpt"],
                                             "--save-dir", run["hf"], "--no-progress"])
    return runs


@pytest.fixture(scope="module")
def generators(runs):
    """{case: tools/chat.py's Generator for the trained checkpoint}."""
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    yield {name: generate.Generator.from_checkpoint(run["ckpt"]) for name, run in runs.items()}
    destroy_single_process()


def _stored_conversations(prefix: str) -> dict:
    """Every conversation of the training split as stored: {ids: loss_token_num}."""
    from mt_dialog.data.dataset import PackedDialogDataset

    dataset = PackedDialogDataset(prefix, "train")
    stored = {}
    for index in range(len(dataset)):
        tokens, counts, lengths = dataset.raw_pack(index)
        for end, length in zip(np.cumsum(lengths).tolist(), lengths.tolist()):
            stored[tuple(tokens[end - length:end].tolist())] = counts[end - length:end].tolist()
    return stored


def _corpus_records(run) -> list:
    with open(run["corpus"]) as handle:
        return [json.loads(line) for line in handle][:CHECKED]


@pytest.mark.parametrize("name", CASES)
def test_auto_tokenizer_gives_training_ids(name, runs, generators):
    from transformers import AutoTokenizer

    run = runs[name]
    assert "reproduces the training token layout exactly" in run["report"], run["report"]
    assert "warning" not in run["report"]
    tokenizer = AutoTokenizer.from_pretrained(run["hf"])
    stored = _stored_conversations(run["data"])
    records = _corpus_records(run)
    assert any(r["messages"][0]["role"] == "system" for r in records)
    for record in records:
        messages = record["messages"]
        ids = tokenizer.apply_chat_template(messages)["input_ids"]
        assert tuple(ids) in stored, (name, messages, ids)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        prompt = tokenizer.apply_chat_template(messages[:last_user + 1],
                                               add_generation_prompt=True)["input_ids"]
        assert prompt == generators[name].prompt_ids(messages[:last_user + 1])
        counts = stored[tuple(ids)]  # the prompt ends where training's last reply starts
        assert prompt == ids[:len(prompt)] and counts[len(prompt) - 1] == 0 < counts[len(prompt)]


def _prompts(records) -> list:
    prompts = [[{"role": "user", "content": user}] for user in ("Thank you!", "What is 3 plus 1?")]
    for record in records:  # later turns, with and without a system message
        messages = record["messages"]
        users = [i for i, m in enumerate(messages) if m["role"] == "user"]
        prompts.append(messages[:users[-1] + 1])
    return prompts


@pytest.mark.parametrize("name", CASES)
def test_greedy_generate_is_chat_reply(name, runs, generators):
    """HF greedy decoding from the folder alone == tools/chat.py's greedy reply, ending at the
    end-of-turn (generation_config.json lists it; the reply is shorter than the budget)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, generator = runs[name], generators[name]
    tokenizer = AutoTokenizer.from_pretrained(run["hf"])
    model = AutoModelForCausalLM.from_pretrained(run["hf"]).eval()
    assert generator.end_of_turn in model.generation_config.eos_token_id
    dtype = torch.bfloat16 if name == "hf" else torch.float32  # hf: fine-tuned with --bf16
    assert model.dtype == dtype and next(generator.model.parameters()).dtype == dtype
    if name == "hf":  # the base tokenizer's eos is not what ends a reply
        imported = json.load(open(os.path.join(run["imported"], "config.json")))
        assert imported["data"]["special_ids"]["end_of_turn"] == generator.end_of_turn
        assert generator.end_of_turn == tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert tokenizer.eos_token_id != generator.end_of_turn
    for messages in _prompts(_corpus_records(run)):
        ours = generator.generate(messages, max_new_tokens=48)
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=48, do_sample=False)
        theirs = output[0, inputs["input_ids"].shape[1]:].tolist()
        assert ours.finish_reason == "end_of_turn", (name, messages, ours)
        assert theirs == ours.token_ids, (name, messages, ours.text,
                                          tokenizer.decode(theirs))
