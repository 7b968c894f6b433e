"""A model whose tokenizer has a GLM-4.5 (no end token) or inline-reasoning chat template, the
way a user takes it: ``hf-to-mcore`` imports it with ``--template hf``, chat stops at every
stop tag, ``tools/chat.py --no-thinking`` is accepted for the inline template, and
``mcore-to-hf`` exports a folder whose ``generation_config.json`` lists every stop and whose
plain ``AutoTokenizer`` gives training's ids (tests/data/chat_tokenizers.py for the templates).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mt_dialog.data.formats import parse_record
from mt_dialog.data.render_hf import chat_template_info, render_with_chat_template
from tests.convert.conftest import REPO, convert, convert_here
from tests.data.chat_tokenizers import hf_glm45_dir, hf_qwen3_inline_dir  # noqa: F401
from tests.data.test_render_hf import RECORDS


def _import(tokenizer_dir, root) -> str:
    """A tiny random Llama with the tokenizer of ``tokenizer_dir``, through hf-to-mcore."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(AutoTokenizer.from_pretrained(tokenizer_dir)),
                         hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False)
    folder = str(root / "hf")
    LlamaForCausalLM(config).save_pretrained(folder)
    for file in os.listdir(tokenizer_dir):
        shutil.copy2(os.path.join(tokenizer_dir, file), folder)
    ckpt = str(root / "ckpt")
    convert_here("hf-to-mcore", "--load-dir", folder, "--save-dir", ckpt)
    return ckpt


class _Scripted(__import__("torch").nn.Module):
    """Stands for the model: emits ``script`` after the prompt, one id per call."""

    def __init__(self, script, vocab):
        import torch

        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.start = list(script), vocab, None

    def forward(self, tokens, positions, mask):
        import torch

        self.start = tokens.shape[1] if self.start is None else self.start
        logits = torch.zeros(1, tokens.shape[1], self.vocab)
        logits[0, -1, self.script[tokens.shape[1] - self.start]] = 1.0
        return logits


@pytest.fixture()
def single_process():
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    yield generate
    destroy_single_process()


def test_glm_import_chat_stops_and_export(hf_glm45_dir, tmp_path, single_process):
    """GLM-4.5's template (replies closed by the next tag): the import records <|user|> and
    <|observation|> as stops; chat stops at either; the export's generation_config stops at
    eos and both; its AutoTokenizer renders training's ids for a tool conversation."""
    from transformers import AutoTokenizer, GenerationConfig

    ckpt = _import(hf_glm45_dir, tmp_path)
    generator = single_process.Generator.from_checkpoint(ckpt)
    hf = generator.tokenizer.hf
    user, observation = (hf.convert_tokens_to_ids(t) for t in ("<|user|>", "<|observation|>"))
    assert generator.end_of_turn == user and generator.stops == {user, observation}
    words = hf("Checking.", add_special_tokens=False)["input_ids"]
    prompt = generator.prompt_ids([{"role": "user", "content": "Weather in Paris?"}])
    for stop in (observation, user):
        generator.model = _Scripted(words + [stop], len(hf))
        ids, reason = generator.generate_ids(prompt, max_new_tokens=20)
        assert (ids, reason) == (words + [stop], "end_of_turn")

    out = tmp_path / "exported"
    proc = convert("mcore-to-hf", "--load-dir", ckpt, "--save-dir", out)
    assert "warning" not in proc.stderr and "layout exactly" in proc.stdout, proc.stdout
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert stops == [hf.eos_token_id, user, observation]
    exported = AutoTokenizer.from_pretrained(out)
    conversation = parse_record(RECORDS["tools"])
    (sample,) = render_with_chat_template(conversation, hf)
    record = RECORDS["tools"]
    served = exported.apply_chat_template(record["messages"], tools=record["tools"],
                                          return_dict=True)["input_ids"]
    assert sample.input_ids.tolist() == served + [user]  # + the last reply's stop
    assert exported.apply_chat_template(record["messages"][:2], tools=record["tools"],
                                        add_generation_prompt=True, return_dict=True
                                        )["input_ids"] == generator.prompt_ids(
        record["messages"][:2], record["tools"])


def test_inline_reasoning_import_chat_no_thinking(hf_qwen3_inline_dir, tmp_path):
    """A template that reads reasoning only from <think> blocks of the content: chat
    --no-thinking is accepted (was "has no reasoning layout") and its prompt ends with the
    empty block; the stops are the template's one end token."""
    ckpt = _import(hf_qwen3_inline_dir, tmp_path)
    out = subprocess.run([sys.executable, "tools/chat.py", "--load", ckpt, "--message", "Hi",
                          "--no-thinking", "--max-new-tokens", "2", "--json"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    from transformers import AutoTokenizer

    from mt_dialog.data.formats import Message
    from mt_dialog.data.render_hf import render_prompt_with_chat_template

    hf = AutoTokenizer.from_pretrained(hf_qwen3_inline_dir)
    ask = [Message("user", "Hi")]
    plain = render_prompt_with_chat_template(ask, hf, enable_thinking=False)
    assert hf.decode(plain).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert result["prompt_tokens"] == len(plain) > len(render_prompt_with_chat_template(ask, hf))
    assert chat_template_info(hf).stops == (hf.convert_tokens_to_ids("<|im_end|>"),)
