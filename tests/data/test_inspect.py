"""tools/inspect_dialog_dataset.py: summary, highlighted pack, --verify exit codes."""

import re

import numpy as np

from mt_dialog.demo import write_corpus
from tests.conftest import preprocess_args
from tools.inspect_dialog_dataset import main as inspect_main
from tools.preprocess_dialog import main as preprocess_main


def build(tmp_path, sp_model_path):
    write_corpus(str(tmp_path / "in.jsonl"), 30, seed=5)
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(str(tmp_path / "in.jsonl"), sp_model_path, prefix,
                                           "--template", "firefly", "--seq-length", "1024")) == 0
    return prefix


def test_render_highlights_trained_tokens(tmp_path, sp_model_path, capsys):
    prefix = build(tmp_path, sp_model_path)
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "conversations read" in out and "pack 0 of" in out
    assert "[[Nice to meet you," in out and "</s>]](n=" in out
    assert inspect_main([prefix, "--color", "always", "--split", "valid"]) == 0
    assert "\033[1;32m" in capsys.readouterr().out


def test_verify_exit_codes(tmp_path, sp_model_path, capsys):
    prefix = build(tmp_path, sp_model_path)
    assert inspect_main([prefix, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    tokens_bin = tmp_path / "out.train.tokens.bin"
    data = np.fromfile(tokens_bin, dtype=np.uint16)
    data[:] = 399  # no turn ends with the end-of-turn id any more
    data.tofile(tokens_bin)
    assert inspect_main([prefix, "--verify"]) == 1
    assert "end-of-turn" in capsys.readouterr().out


def test_errors_are_messages(tmp_path, capsys):
    assert inspect_main([str(tmp_path / "missing")]) == 1
    assert "not found" in capsys.readouterr().err


def test_pack_shows_every_special_token(tmp_path, sp_model_path, capsys):
    """<|im_start|> and <|im_end|> are control symbols of the SentencePiece vocabulary (not
    appended): each one in the pack is shown, as in the stored ids."""
    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.data.tokenizers import SentencePieceTokenizer

    write_corpus(str(tmp_path / "in.jsonl"), 10, seed=5)
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(str(tmp_path / "in.jsonl"), sp_model_path, prefix,
                                           "--seq-length", "1024")) == 0
    capsys.readouterr()
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    tokens, _, _ = PackedDialogDataset(prefix, "train").raw_pack(0)
    tokenizer = SentencePieceTokenizer(sp_model_path)
    for piece in ("<|im_start|>", "<|im_end|>"):
        stored = int((tokens == tokenizer.special_id(piece, allow_add=False)).sum())
        assert stored > 0 and out.count(piece) == stored, (piece, stored, out)
    headers = [line for line in out.splitlines() if line.startswith("--- ")]
    count = len(PackedDialogDataset(prefix, "train").raw_pack(0)[2])
    assert count > 1 and len(headers) == count  # every one a conversation, none a document
    assert all(h.startswith(f"--- conversation {i} (") for i, h in enumerate(headers)), headers


AGENT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "reasoning_content": "I need the tool.",
     "tool_calls": [{"type": "function", "id": "c1", "function": {
         "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "22C"},
    {"role": "assistant", "content": "<think>\nGot it.\n</think>\n\nIt is 22C."},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "Welcome.", "weight": 0},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Bye!", "reasoning_content": "Say bye."}],
    "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]}


def test_pack_shows_tool_calls_results_and_reasoning(tmp_path, sp_model_path, capsys):
    """--reasoning per-turn: the record gives two samples (its first user turn, then the rest),
    each trained turn once with its reasoning; --pack shows the calls, results and reasoning,
    only replies highlighted; --verify accounts for the samples."""
    from tests.conftest import write_jsonl

    source = write_jsonl(tmp_path / "in.jsonl", [AGENT])
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(source, sp_model_path, prefix, "--template", "qwen3",
                                           "--reasoning", "per-turn", "--seq-length", "1024",
                                           "--split", "100,0", "--no-shuffle")) == 0
    assert "samples kept (--reasoning per-turn)    2" in capsys.readouterr().out
    shown = ""
    for pack in (0, 1):
        assert inspect_main([prefix, "--color", "never", "--pack", str(pack)]) == 0
        shown += capsys.readouterr().out
    call = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    trained = [f"<think>\nI need the tool.\n</think>\n\n<tool_call>\n{call}\n</tool_call>",
               "<think>\nGot it.\n</think>\n\nIt is 22C.", "<think>\nSay bye.\n</think>\n\nBye!"]
    for text in trained:  # each trained once, in its inference view
        assert shown.count(f"[[{text}<|im_end|>]](n=") == 1, text
    context = ("<|im_start|>user\n<tool_response>\n22C\n</tool_response><|im_end|>",
               "<|im_start|>assistant\n Welcome.<|im_end|>", "<tools>\n{\"type\": \"function\"")
    for text in context:  # tool results, untrained replies, tools: shown, never highlighted
        assert text in shown and f"[[{text}" not in shown
    assert inspect_main([prefix, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_adjacent_turns_are_told_apart(tmp_path, sp_model_path, capsys):
    """Consecutive assistant messages with firefly: two trained turns side by side; --verify
    checks each one and --pack highlights them separately."""
    from tests.conftest import write_jsonl

    record = {"messages": [{"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello!"},
                           {"role": "assistant", "content": "How can I help?"}]}
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(write_jsonl(tmp_path / "in.jsonl", [record]),
                                           sp_model_path, prefix, "--template", "firefly",
                                           "--split", "100,0")) == 0
    capsys.readouterr()
    assert inspect_main([prefix, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "[[Hello!</s>]](n=" in out and "[[How can I help?</s>]](n=" in out


def test_per_turn_samples_of_a_record_share_its_split(tmp_path, sp_model_path, capsys):
    """--reasoning per-turn with a 50/50 split: every record's two samples land in one split,
    and --verify accounts for records and samples."""
    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.data.tokenizers import SentencePieceTokenizer
    from tests.conftest import write_jsonl

    records = [{"messages": [
        {"role": "user", "content": f"Record {n}: 2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add."},
        {"role": "user", "content": "Times 3?"},
        {"role": "assistant", "content": "12", "reasoning_content": "Multiply."}]}
        for n in range(8)]
    prefix = str(tmp_path / "out")
    assert preprocess_main(preprocess_args(write_jsonl(tmp_path / "in.jsonl", records),
                                           sp_model_path, prefix, "--template", "qwen3",
                                           "--reasoning", "per-turn", "--split", "50,50",
                                           "--workers", "2")) == 0
    capsys.readouterr()
    tokenizer = SentencePieceTokenizer(sp_model_path)
    where = {}
    for split in ("train", "valid"):
        dataset = PackedDialogDataset(prefix, split)
        for index in range(len(dataset)):
            tokens, _, lengths = dataset.raw_pack(index)
            for end, length in zip(np.cumsum(lengths).tolist(), lengths.tolist()):
                text = tokenizer.decode(tokens[end - length:end].tolist())
                record = text.split("Record ")[1].split(":")[0]
                where.setdefault(record, []).append(split)
    assert sorted(where) == [str(n) for n in range(8)]
    assert all(len(splits) == 2 and len(set(splits)) == 1 for splits in where.values()), where
    assert {s for splits in where.values() for s in splits} == {"train", "valid"}
    assert inspect_main([prefix, "--verify"]) == 0
    assert "verify: OK" in capsys.readouterr().out


def test_turn_statistics_count_every_turn(tmp_path, sp_model_path, capsys):
    """Reply lengths and turns per conversation read in chunks equal those of each pack's
    conversations (``_segments``), add up to the summary's turns, and the summary prints both
    histograms with the loss share of each reply-length bucket under token and turn."""
    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.data.inspect import _segments, turn_statistics

    prefix = build(tmp_path, sp_model_path)
    dataset = PackedDialogDataset(prefix, "train")
    replies, turns = turn_statistics(dataset, chunk=7)  # chunks cut between conversations
    want_replies, want_turns = [], []
    for index in range(len(dataset)):
        _, counts, lengths = dataset.raw_pack(index)
        for start, stop in zip(np.r_[0, np.cumsum(lengths)[:-1]], np.cumsum(lengths)):
            spans = [(a, b) for a, b, trained in _segments(counts[start:stop]) if trained]
            want_replies += [b - a for a, b in spans]
            want_turns.append(len(spans))
    assert replies.tolist() == want_replies and turns.tolist() == want_turns
    summary = dataset.metadata["summary"]
    assert int(turns.sum()) == replies.size == summary["splits"]["train"]["turns"]
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert f"reply lengths: {replies.size:,} trained turns" in out
    assert "trained turns per conversation:" in out and " token " in out and " turn " in out
    assert " power " in out  # --loss-normalization power (p = 0.5): sqrt of the lengths


def test_text_pack_and_verify(tmp_path, sp_model_path, capsys):
    from mt_dialog.data.dataset import PackedDialogDataset
    from tests.conftest import write_jsonl

    sentence = "The capital of France is Paris. "
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": sentence * n} for n in (1, 3, 30)])
    prefix = str(tmp_path / "text")
    assert preprocess_main(preprocess_args(path, sp_model_path, prefix, "--seq-length", "64",
                                           "--split", "100,0")) == 0
    assert inspect_main([prefix, "--verify"]) == 0
    assert inspect_main([prefix, "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert "documents read" in out and "document piece 0" in out
    lines = out[out.index("pack 0 of"):].splitlines()
    for header, body in zip(lines[1::2], lines[2::2]):  # each piece: its first token untrained
        length = int(re.search(r"\((\d+) tokens", header)[1])
        assert re.fullmatch(rf"[^\[]+\[\[.+\]\]\(n={length - 1}\)", body), (header, body)
        assert body.endswith("</s>]]" + f"(n={length - 1})") == ("document end" in header)
    assert any(line.startswith("<s>[[The capital") for line in lines)  # a document's start
    counts_bin = tmp_path / "text.train.loss_token_num.bin"
    data = np.fromfile(counts_bin, dtype=np.uint16)
    data[5] = 0  # a token inside a piece left untrained
    data.tofile(counts_bin)
    assert inspect_main([prefix, "--verify"]) == 1
    assert "does not train every token but its first" in capsys.readouterr().out
    truncated = str(tmp_path / "truncated")  # each document's first piece, the rest left out
    assert preprocess_main(preprocess_args(path, sp_model_path, truncated, "--seq-length", "64",
                                           "--split", "100,0", "--overlong", "truncate")) == 0
    assert inspect_main([truncated, "--verify"]) == 0
    capsys.readouterr()
    for index in range(len(PackedDialogDataset(truncated, "train"))):
        assert inspect_main([truncated, "--color", "never", "--pack", str(index)]) == 0
    out = capsys.readouterr().out
    assert "truncated: the rest of the document is left out" in out and "another piece" not in out
