"""``--seq-length 131072`` through the CLI on conversations longer than 65,536 tokens (issue 21):
an agent conversation of exactly 131,072 tokens fills one pack alone, a reply of over 65,535
trained tokens keeps its exact loss_token_num (int32, not uint16), one longer than a pack is
refused by default and cut to whole turns by ``--overlong truncate``, the stored conversations are
exactly the rendered ones (no CP padding baked in: it is applied at load time), and
``tools/inspect_dialog_dataset.py --verify`` passes."""

import json

import numpy as np
import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.formats import parse_record
from mt_dialog.data.render import render_conversation, resolve_template, truncate_to_turns
from mt_dialog.data.storage import metadata_path
from mt_dialog.data.templates import get_template
from mt_dialog.data.tokenizers import SentencePieceTokenizer
from tests.conftest import preprocess_args, write_jsonl
from tools.inspect_dialog_dataset import main as inspect_main
from tools.preprocess_dialog import main

SEQ = 131072
SENTENCE = " The capital of France is Paris."  # 10 tokens of the fixture model, additive
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]


def filler(tokens_wanted: int) -> str:
    return "Text:" + SENTENCE * (tokens_wanted // 10)


def agent(*outputs, final="The capital of France is Paris.", extra=""):
    """A tool-using conversation: one tool call and result per entry of ``outputs`` (texts),
    then a final answer (``extra`` appended to the last tool result)."""
    messages = [{"role": "user", "content": "Read the files and answer."}]
    for step, output in enumerate(outputs):
        call = {"id": f"c{step}", "type": "function",
                "function": {"name": "read_file", "arguments": json.dumps({"path": f"f{step}"})}}
        messages.append({"role": "assistant", "content": "Reading.", "tool_calls": [call]})
        messages.append({"role": "tool", "tool_call_id": f"c{step}", "name": "read_file",
                         "content": output + (extra if step == len(outputs) - 1 else "")})
    messages.append({"role": "assistant", "content": final})
    return {"tools": TOOLS, "messages": messages}


@pytest.fixture(scope="module")
def renderer(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("chatml"), tokenizer)

    def render(record):
        (rendered,) = render_conversation(parse_record(record), template, tokenizer.encode)
        return rendered
    return render


def exact_fit(render, target=SEQ):
    """An agent record rendering to exactly ``target`` tokens: a long tool result, then " a"
    (one token of the fixture model each, inside a text) appended to it to close the gap."""
    base = filler(target - 2000)
    gap = target - render(agent(base)).num_tokens
    assert gap > 0
    record = agent(base, extra=" a" * gap)
    assert render(record).num_tokens == target  # the record under test really is exact
    return record


def stored(prefix):
    """Every stored conversation (tokens, counts) and every pack's conversation lengths."""
    dataset = PackedDialogDataset(prefix, "train")
    conversations, packs = [], []
    for index in range(len(dataset)):
        tokens, counts, lengths = dataset.raw_pack(index)
        packs.append(lengths.tolist())
        for a, b in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
            conversations.append((tokens[a:b], counts[a:b]))
    return conversations, packs


def test_long_conversations_pack_exactly_and_verify(tmp_path, sp_model_path, renderer, capsys):
    exact = exact_fit(renderer)
    long_reply = agent(filler(2000), final="Answer:" + SENTENCE * 7000)  # ~70k trained tokens
    too_long = agent(filler(60000), filler(60000), filler(30000))  # ~150k tokens, 4 replies
    short = [agent("A short file.", final=f"Short answer {i}.") for i in range(3)]
    records = [long_reply, too_long, exact, *short]
    path = write_jsonl(tmp_path / "long.jsonl", records)
    prefix = str(tmp_path / "out")
    base = preprocess_args(path, sp_model_path, prefix, "--seq-length", str(SEQ),
                           "--split", "100,0")

    # default (--overlong error): refused, nothing written
    assert main(base) == 1
    err = capsys.readouterr().err
    assert f"> --seq-length {SEQ:,}" in err and "--overlong truncate" in err
    assert not (tmp_path / "out.meta.json").exists()

    assert main([*base, "--overlong", "truncate"]) == 0
    expected = [renderer(r) for r in records]
    cut = truncate_to_turns(expected[1], SEQ)
    assert expected[1].num_tokens > SEQ and 65536 < cut.num_tokens < SEQ
    expected[1] = cut
    assert expected[0].num_tokens > 65536 and int(expected[0].loss_token_num.max()) > 65535
    conversations, packs = stored(prefix)
    key = lambda ids, counts: (ids.tobytes(), counts.astype(np.int64).tobytes())  # noqa: E731
    assert sorted(key(t, c) for t, c in conversations) == sorted(
        key(r.input_ids.astype(t.dtype), r.loss_token_num) for r, (t, _) in
        zip(expected, conversations))
    assert all(sum(p) <= SEQ for p in packs)
    assert [SEQ] in packs  # the exact one fills a pack alone
    assert len(packs) == 3  # 131,072 / the cut one + short ones / the long reply + short ones
    assert max(int(c.max()) for _, c in conversations) > 65535  # stored as int32, not wrapped
    meta = json.load(open(metadata_path(prefix)))
    assert meta["summary"]["truncated"] == 1 and meta["summary"]["turns_removed_by_truncation"]
    assert meta["splits"]["train"]["tokens"] == sum(r.num_tokens for r in expected)

    assert inspect_main([prefix, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out

    assert main([*base, "--overlong", "drop", "--overwrite"]) == 0
    meta = json.load(open(metadata_path(prefix)))
    assert meta["summary"]["dropped"] == {"overlong": 1}
    assert meta["splits"]["train"]["conversations"] == len(records) - 1
