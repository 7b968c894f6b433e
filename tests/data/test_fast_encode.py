"""Batched encoding with a Hugging Face tokenizer (``tokenizers.BackendEncoder``): built-in
templates encode the texts of a batch of records in one back-end call, and tokenizer worker
processes encode without loading transformers. Proven by comparison with transformers itself:
the datasets the tool writes hold exactly the ids of rendering every record with transformers'
own ``encode`` text by text (the path before batching)."""

import json
import os
import pickle
import subprocess
import sys
from collections import Counter

import pytest

from mt_dialog.data.formats import parse_record
from mt_dialog.data.readers import RawRecord
from mt_dialog.data.records import RecordProcessor
from mt_dialog.data.render import render_conversation, resolve_template
from mt_dialog.data.templates import get_template
from mt_dialog.data.tokenizers import BackendEncoder, HuggingFaceTokenizer
from tests.conftest import ROOT, SAMPLE_TEXT, write_jsonl
from tests.data.chat_tokenizers import hf_qwen3_dir  # noqa: F401 (fixture)
from tests.data.test_preprocess import stored_multiset
from tools.preprocess_dialog import main

pytest.importorskip("transformers")

ODD_TEXTS = ["a <|im_end|> b <|im_start|>user", "<|endoftext|>", "  two  spaces  ", "\n\nlines\r\n",
             "tab\there", "emoji 😀 and 中文", "see <think>not reasoning</think>", " "]


def transformers_encode(hf):
    """transformers' own encode, text by text: the ids the renderer asked for before batching."""
    return lambda text: hf.encode(text, add_special_tokens=False,
                                  split_special_tokens=True) if text else []


def records(count: int, reasoning: bool = False):
    """``count`` varied records: system prompts, several turns, special-token and odd text,
    untrained and empty replies, tool calls and results, and ``reasoning`` if asked."""
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}
    out = []
    for i in range(count):
        text = SAMPLE_TEXT[i % len(SAMPLE_TEXT)]
        odd = ODD_TEXTS[i % len(ODD_TEXTS)]
        messages = [{"role": "system", "content": f"Be brief. {odd}"}] * (i % 3 == 0) + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": f"{odd} {text}", "weight": int(i % 4 != 1)},
            {"role": "user", "content": odd},
            {"role": "assistant", "content": "" if i % 5 == 2 else text}]
        if i % 2:
            messages += [
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"type": "function",
                 "id": "c1", "function": {"name": "get_weather", "arguments": {"city": odd}}}]},
                {"role": "tool", "tool_call_id": "c1", "content": f"18C {odd}"},
                {"role": "assistant", "content": f"<think>{text}</think>It is 18C."
                 if reasoning else "It is 18C."}]
        out.append({"messages": messages, **({"tools": [weather]} if i % 2 else {})})
    return out


def reference_multiset(items, folder, template):
    """(input_ids, loss_token_num) of every sample, rendered with transformers' encode."""
    tokenizer = HuggingFaceTokenizer(folder)
    resolved = resolve_template(get_template(template), tokenizer)
    encode = transformers_encode(tokenizer.hf)
    out = Counter()
    for record in items:
        for r in render_conversation(parse_record(record), resolved, encode):
            out[(tuple(r.input_ids.tolist()), tuple(r.loss_token_num.tolist()))] += 1
    return out


@pytest.mark.parametrize("template, workers", [("chatml", "1"), ("chatml", "2"), ("qwen3", "2")])
def test_tool_output_is_transformers_ids(tmp_path, request, hf_tokenizer_dir, template, workers):
    """The tool (1 worker: batched in the main process; 2: workers without transformers)
    writes exactly the samples transformers' own encode gives, text by text."""
    folder = request.getfixturevalue("hf_qwen3_dir") if template == "qwen3" else hf_tokenizer_dir
    assert HuggingFaceTokenizer(folder).batch_encoding  # the fast path is the one tested
    items = records(150, reasoning=template == "qwen3")  # several batches of 64 records
    path = write_jsonl(tmp_path / "in.jsonl", items)
    prefix = tmp_path / "out"
    assert main(["--input", path, "--tokenizer-path", folder, "--template", template,
                 "--seq-length", "4096", "--split", "100,0", "--workers", workers,
                 "--output-prefix", str(prefix), "--no-progress"]) == 0
    stored, _ = stored_multiset(str(prefix))
    assert stored == reference_multiset(items, folder, template)
    assert sum(stored.values()) == len(items)


def _truncating_padding_copy(folder, tmp_path):
    """A copy of the tokenizer in ``folder`` whose tokenizer.json truncates to 3 tokens and pads
    to 64: transformers' encode ignores both, so must the encoder."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    target = str(tmp_path / "tok")
    AutoTokenizer.from_pretrained(folder).save_pretrained(target)
    backend = Tokenizer.from_file(os.path.join(target, "tokenizer.json"))
    backend.enable_truncation(max_length=3)
    backend.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
    backend.save(os.path.join(target, "tokenizer.json"))
    return target


def test_encoder_gives_transformers_ids(tmp_path, hf_tokenizer_dir):
    """encode / encode_many / a pickled encoder (as workers get it) give transformers' ids,
    also for a tokenizer.json with truncation and padding set; TOKENIZERS_PARALLELISM is left
    as it was."""
    tokenizer = HuggingFaceTokenizer(_truncating_padding_copy(hf_tokenizer_dir, tmp_path))
    assert tokenizer.backend_encoder is not None
    texts = SAMPLE_TEXT + ODD_TEXTS + ["", " ".join(SAMPLE_TEXT) * 3]
    expected = [transformers_encode(tokenizer.hf)(text) for text in texts]
    assert max(map(len, expected)) > 64 and [] in expected  # neither truncated nor padded
    before = os.environ.pop("TOKENIZERS_PARALLELISM", None)
    try:
        assert tokenizer.encode_many(texts) == expected
        assert [tokenizer.encode(text) for text in texts] == expected
        assert "TOKENIZERS_PARALLELISM" not in os.environ
        copy = pickle.loads(pickle.dumps(tokenizer.backend_encoder))
        assert copy.matches_probe() and copy.encode_many(texts) == expected
    finally:
        if before is not None:
            os.environ["TOKENIZERS_PARALLELISM"] = before


def test_encoder_only_for_standard_fast_tokenizers(hf_tokenizer_dir):
    """A tokenizer class that changes how transformers encodes gets no encoder (its own
    encode is kept); the standard fast class gets one."""
    from transformers import PreTrainedTokenizerFast

    class Lowercasing(PreTrainedTokenizerFast):
        def _encode_plus(self, text, *args, **kwargs):
            return super()._encode_plus(text.lower(), *args, **kwargs)

    assert BackendEncoder.of(Lowercasing.from_pretrained(hf_tokenizer_dir)) is None
    assert BackendEncoder.of(PreTrainedTokenizerFast.from_pretrained(hf_tokenizer_dir))


WORKER = """
import json, pickle, sys
processor = pickle.loads(sys.stdin.buffer.read())
outcomes = processor.process(pickle.loads(bytes.fromhex(sys.argv[1])))
print(json.dumps(["transformers" in sys.modules,
                  [[a.tolist() for pair in o[2] for a in pair] for o in outcomes]]))
"""


def test_worker_renders_without_transformers(hf_tokenizer_dir):
    """A worker process given the main process's encoder renders the ids the main process
    renders, and never imports transformers."""
    processor = RecordProcessor("huggingface", hf_tokenizer_dir, "chatml", None, 4096, "truncate")
    processor.setup()
    processor.share_encoder()
    batch = [(n, RawRecord("in.jsonl", n, raw=json.dumps(r).encode()))
             for n, r in enumerate(records(6), start=1)]
    expected = [[a.tolist() for pair in o[2] for a in pair] for o in processor.process(batch)]
    done = subprocess.run([sys.executable, "-c", WORKER, pickle.dumps(batch).hex()], cwd=ROOT,
                          input=pickle.dumps(processor), capture_output=True, check=True)
    imported, rendered = json.loads(done.stdout.decode().splitlines()[-1])
    assert rendered == expected and not imported
