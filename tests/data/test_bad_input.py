"""Bad input end to end through tools/preprocess_dialog.py: every problem stops with
``error: file:line: what, and the fix`` and writes nothing (--on-error raise), or is skipped and
counted by reason (--on-error skip); overlong conversations follow --overlong exactly."""

import glob
import json
import os

import numpy as np
import pytest

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.formats import parse_record
from mt_dialog.data.preprocess import format_summary
from mt_dialog.data.records import RecordProcessor
from tests.conftest import openai, preprocess_args, write_jsonl

try:
    from tools.preprocess_dialog import main
except ImportError:  # tools/ is not a package everywhere
    import importlib.util

    _spec = importlib.util.spec_from_file_location(
        "preprocess_dialog",
        os.path.join(os.path.dirname(__file__), "..", "..", "tools", "preprocess_dialog.py"))
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    main = _module.main

SEQ = 256
GOOD = [
    openai(("Hello! How are you today?", "I am fine, thank you. And you?")),
    openai(("What is the capital of France?", "The capital of France is Paris."),
           ("Thanks!", "You're welcome."), system="Be brief."),
    {"conversations": [{"from": "human", "value": "Count from 1 to 10."},
                       {"from": "gpt", "value": "1 2 3 4 5 6 7 8 9 10"}]},
    {"instruction": "Translate 'good morning' to Chinese.", "input": "", "output": "早上好"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": None, "tool_calls": [
                      {"type": "function", "id": "c1",
                       "function": {"name": "lookup", "arguments": '{"q": "France"}'}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "Paris"},
                  {"role": "assistant", "content": "Paris.", "weight": 0},
                  {"role": "user", "content": "Thanks!"},
                  {"role": "assistant", "content": "You're welcome."}]},
    {"conversations": [{"from": "human", "value": "Count from 1 to 10."},
                       {"from": "function_call",
                        "value": '{"name": "count", "arguments": {"to": 10}}'},
                       {"from": "observation", "value": "1 2 3 4 5 6 7 8 9 10"},
                       {"from": "gpt", "value": "1 2 3 4 5 6 7 8 9 10", "loss": False},
                       {"from": "human", "value": "Thanks!"},
                       {"from": "gpt", "value": "You're welcome."}]},
]
LONG_TEXT = "The capital of France is Paris. " * 30  # far more than SEQ tokens

# kind -> (the bad line, reason counted under --on-error skip, texts its message must contain)
BAD = {
    "malformed_json": ('{"messages": [{"role": "user", "content": "hi"}', "malformed_json",
                       ["malformed JSON"]),
    "unknown_format": ({"prompt": "hi", "completion": "hello"}, "unknown_format",
                       ["unknown record format", "keys: completion, prompt", "--input-format"]),
    "missing_field": ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
                      "missing_field", ["messages[1]", "field 'content' is missing"]),
    "non_string_field": ({"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": 42}]},
                         "bad_field_type", ["messages[1]", "'content' must be a string, got int"]),
    "empty_reply": ({"messages": [{"role": "user", "content": "hi"},
                                  {"role": "assistant", "content": "  "}]},
                    "empty_reply", ["messages[1] (assistant) is empty", "fill the reply"]),
    "role_order": ({"messages": [{"role": "user", "content": "hi"},
                                 {"role": "tool", "content": "42"},
                                 {"role": "assistant", "content": "hello"}]},
                   "role_order", ["messages[1] (tool) follows messages[0] (user), which calls no "
                                  "tool", "must follow the assistant message with the tool calls"]),
    # a line of nested brackets: Python's JSON parser raises RecursionError past its limit
    "too_deeply_nested": (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                          "too_deeply_nested", ["nested deeper than", "flatten it"]),
    "invalid_unicode": ('{"messages": [{"role": "user", "content": "cut emoji \\ud83d here"}, '
                        '{"role": "assistant", "content": "OK."}]}', "invalid_unicode",
                        ["messages[0]: field 'content' holds a lone surrogate '\\ud83d'",
                         "repair or remove that text"]),
    "unsupported_loss_field": ({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo", "mask": 0}]},
                               "unsupported_loss_field",
                               ["messages[1]: field 'mask' looks like loss control",
                                '"weight": 0|1 or "loss": false|true']),
    "bad_loss_control": ({"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "yo", "weight": 0.5}]},
                         "bad_loss_control", ["messages[1]: 'weight' must be 0 (not trained) or 1",
                                              "got 0.5"]),
    "train_not_assistant": ({"messages": [{"role": "user", "content": "hi", "loss": True},
                                          {"role": "assistant", "content": "yo"}]},
                            "train_not_assistant", ["messages[0]: this user message asks to be "
                                                    "trained", "only assistant messages"]),
    "no_trained_turn": ({"messages": [{"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": "yo", "weight": 0}]},
                         "no_trained_turn", ["nothing would be trained"]),
    "bad_tool_call": ({"messages": [{"role": "user", "content": "Weather?"},
                                    {"role": "assistant", "content": None, "tool_calls": [
                                        {"type": "function", "function": {
                                            "name": "get_weather",
                                            "arguments": "{city: Paris}"}}]}]},
                      "bad_tool_call", ["messages[1].tool_calls[0]: 'arguments' is a string but "
                                        "not valid JSON"]),
    "bad_tools": ({"messages": [{"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "yo"}], "tools": "[{"},
                  "bad_tools", ["field 'tools' is a string but not valid JSON"]),
    "reasoning_conflict": ({"messages": [{"role": "user", "content": "hi"},
                                         {"role": "assistant", "content": "<think>a</think>yo",
                                          "reasoning_content": "b"}]},
                           "reasoning_conflict", ["messages[1]: 'reasoning_content' and the "
                                                  "<think> block of the content differ"]),
    "bad_reasoning": ({"messages": [{"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "<think>yo"}]},
                      "bad_reasoning", ["starts with <think> but has no </think>"]),
    "no_assistant": ({"messages": [{"role": "system", "content": "s"},
                                   {"role": "user", "content": "hi"}]},
                     "no_assistant", ["no assistant reply"]),
    "invalid_utf8": (b'{"messages": [{"role": "user", "content": "caf\xe9"}, '
                     b'{"role": "assistant", "content": "ok"}]}',
                     "invalid_utf8", ["invalid UTF-8", "re-encode the file as UTF-8"]),
}


def write_lines(path, lines) -> str:
    """Write records (dicts), text lines (str) or raw lines (bytes), one per line."""
    with open(path, "wb") as handle:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line, ensure_ascii=False)
            if isinstance(line, str):
                line = line.encode("utf-8")
            handle.write(line + b"\n")
    return str(path)


def run(capsys, argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def read_meta(prefix):
    with open(f"{prefix}.meta.json", encoding="utf-8") as handle:
        return json.load(handle)


def assert_nothing_written(prefix):
    assert not os.path.exists(f"{prefix}.meta.json")
    assert not os.path.exists(f"{prefix}.train.tokens.bin")
    assert not glob.glob(f"{prefix}.tmp-*")
    assert not glob.glob(f"{prefix}*")  # nothing at all at the prefix


def assert_clean_error(code, err):
    assert code == 1
    assert err.startswith("error: ")
    assert "Traceback" not in err
    assert err.count("\n") == 1  # a single line


def processor(sp_model_path, seq_length=SEQ):
    return RecordProcessor("sentencepiece", sp_model_path, "chatml", None, seq_length, "error")


def num_tokens(sp_model_path, record):
    (rendered,) = processor(sp_model_path).render(parse_record(record))
    return rendered.num_tokens


def check_accounting(summary):
    assert summary["conversations_read"] == (summary["conversations_kept"]
                                             + sum(summary["skipped"].values())
                                             + sum(summary["dropped"].values()))


# --------------------------------------------------------------------------- --on-error raise


@pytest.mark.parametrize("kind", sorted(BAD))
def test_raise_mode_bad_record(tmp_path, sp_model_path, capsys, kind):
    line, reason, texts = BAD[kind]
    # lines 1-2 good, 3 blank, 4 bad, 5 good (never reached)
    path = write_lines(tmp_path / "in.jsonl", [GOOD[0], GOOD[1], b"", line, GOOD[2]])
    prefix = tmp_path / "out" / "ds"
    code, out, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--split", "100,0"))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:4: conversation 3: ")
    for text in texts:
        assert text in err
    assert "or use --on-error skip to skip and count such records" in err  # the fix
    assert out == ""
    assert_nothing_written(prefix)


def test_raise_mode_empty_file(tmp_path, sp_model_path, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", GOOD)
    empty = tmp_path / "b.jsonl"
    empty.write_bytes(b"\n  \n")
    prefix = tmp_path / "out" / "ds"
    code, _, err = run(capsys, preprocess_args([good, str(empty)], sp_model_path, prefix))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {empty}:1: ")
    assert "the file is empty; remove it from --input" in err
    assert "--on-error skip" in err
    assert_nothing_written(prefix)


def test_raise_mode_overlong_error(tmp_path, sp_model_path, capsys):
    long_record = openai(("Hi", LONG_TEXT))
    tokens = num_tokens(sp_model_path, long_record)
    assert tokens > SEQ
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], long_record, GOOD[1]])
    prefix = tmp_path / "out" / "ds"
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:2: conversation 2 has {tokens:,} tokens > "
                          f"--seq-length {SEQ}")
    for fix in ("--overlong truncate", "--overlong drop", "a longer --seq-length"):
        assert fix in err
    assert_nothing_written(prefix)


def test_overlong_error_is_fatal_even_with_skip(tmp_path, sp_model_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", [GOOD[0], openai(("Hi", LONG_TEXT))])
    prefix = tmp_path / "out" / "ds"
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--on-error", "skip"))
    assert_clean_error(code, err)
    assert f"{path}:2:" in err and "--overlong drop" in err
    assert_nothing_written(prefix)


def test_raise_mode_reports_the_first_bad_record(tmp_path, sp_model_path, capsys):
    path = write_lines(tmp_path / "in.jsonl",
                       [GOOD[0], BAD["empty_reply"][0], BAD["malformed_json"][0]])
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, tmp_path / "ds"))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:2: ") and "empty" in err and "malformed" not in err


def test_raise_mode_bad_record_in_json_array(tmp_path, sp_model_path, capsys):
    text = json.dumps([GOOD[0], GOOD[1], BAD["no_assistant"][0]], indent=2)
    path = tmp_path / "in.json"
    path.write_text(text, encoding="utf-8")
    line = [n for n, t in enumerate(text.split("\n"), 1) if t == "  {"][2]  # third element
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(str(path), sp_model_path, prefix))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:{line}: conversation 3: ")
    assert "no assistant reply" in err
    assert_nothing_written(prefix)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_malformed_json_array_is_fatal_in_every_mode(tmp_path, sp_model_path, capsys, on_error):
    path = tmp_path / "in.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n', encoding="utf-8")
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(str(path), sp_model_path, prefix,
                                               "--on-error", on_error))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:3: malformed JSON")
    assert "convert it to JSONL" in err
    assert_nothing_written(prefix)


def test_invalid_utf8_json_array_is_fatal(tmp_path, sp_model_path, capsys):
    path = tmp_path / "in.json"
    path.write_bytes(b'[\n' + json.dumps(GOOD[0]).encode() + b',\n\n{"instruction": "\xff", '
                     b'"output": "x"}\n]\n')
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(str(path), sp_model_path, prefix,
                                               "--on-error", "skip"))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:4: invalid UTF-8")
    assert "re-encode the file as UTF-8" in err
    assert_nothing_written(prefix)


def test_failed_run_keeps_the_previous_dataset(tmp_path, sp_model_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    prefix = tmp_path / "ds"
    code, _, _ = run(capsys, preprocess_args(good, sp_model_path, prefix, "--split", "100,0"))
    assert code == 0
    before = {p: open(p, "rb").read() for p in glob.glob(f"{prefix}*")}
    assert f"{prefix}.meta.json" in before and f"{prefix}.train.tokens.bin" in before
    bad = write_lines(tmp_path / "bad.jsonl", [GOOD[0], BAD["role_order"][0]])
    code, _, err = run(capsys, preprocess_args(bad, sp_model_path, prefix, "--overwrite"))
    assert_clean_error(code, err)
    assert {p: open(p, "rb").read() for p in glob.glob(f"{prefix}*")} == before


def test_existing_output_needs_overwrite(tmp_path, sp_model_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    prefix = tmp_path / "ds"
    assert run(capsys, preprocess_args(good, sp_model_path, prefix, "--split", "100,0"))[0] == 0
    meta = open(f"{prefix}.meta.json", "rb").read()
    code, out, err = run(capsys, preprocess_args(good, sp_model_path, prefix, "--split", "100,0"))
    assert_clean_error(code, err)
    assert "already exists" in err and "--overwrite" in err
    assert open(f"{prefix}.meta.json", "rb").read() == meta
    assert not glob.glob(f"{prefix}.tmp-*")
    code, _, _ = run(capsys, preprocess_args(good, sp_model_path, prefix, "--split", "100,0",
                                             "--overwrite"))
    assert code == 0


def test_missing_tokenizer_model(tmp_path, capsys):
    good = write_jsonl(tmp_path / "good.jsonl", GOOD)
    missing = str(tmp_path / "nope.model")
    prefix = tmp_path / "out" / "ds"
    code, _, err = run(capsys, preprocess_args(good, missing, prefix))
    assert_clean_error(code, err)
    assert err.startswith(f"error: --tokenizer-model {missing}: no such file")
    assert_nothing_written(prefix)


def test_missing_input_path(tmp_path, sp_model_path, capsys):
    missing = str(tmp_path / "nope.jsonl")
    prefix = tmp_path / "out" / "ds"
    code, _, err = run(capsys, preprocess_args(missing, sp_model_path, prefix))
    assert_clean_error(code, err)
    assert err == f"error: --input {missing}: no such file or folder\n"
    assert_nothing_written(prefix)


# --------------------------------------------------------------------------- --on-error skip


def test_skip_mode_counts_every_reason(tmp_path, sp_model_path, capsys):
    lines, expected_lines = [], {}
    for index, kind in enumerate(sorted(BAD)):
        lines.append(GOOD[index % len(GOOD)])
        lines.append(BAD[kind][0])
        expected_lines[BAD[kind][1]] = len(lines)
    lines.append(openai(("Hi", LONG_TEXT)))
    expected_lines["overlong"] = len(lines)
    lines.append(BAD["malformed_json"][0])  # a second one: counted twice, first one is the example
    lines += [b"", GOOD[0], b"   "]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    prefix = tmp_path / "ds"
    code, out, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--on-error", "skip",
                                                 "--overlong", "drop", "--split", "100,0"))
    assert code == 0, err
    assert "Traceback" not in err
    summary = read_meta(prefix)["summary"]
    kept = len(BAD) + 1
    reasons = {BAD[kind][1] for kind in BAD}
    assert summary["conversations_read"] == len(BAD) * 2 + 3
    assert summary["conversations_kept"] == kept
    assert summary["skipped"] == {**{r: 1 for r in reasons}, "malformed_json": 2}
    assert summary["dropped"] == {"overlong": 1}
    assert summary["truncated"] == 0 and summary["empty_files"] == 0
    check_accounting(summary)
    assert summary["splits"]["train"]["conversations"] == kept
    assert set(summary["examples"]) == reasons | {"overlong"}
    for reason, line in expected_lines.items():
        assert summary["examples"][reason].startswith(f"{path}:{line}: "), reason
    for kind, (_, reason, texts) in BAD.items():
        for text in texts:
            assert text in summary["examples"][reason]
    assert "tokens > --seq-length 256" in summary["examples"]["overlong"]

    table = format_summary(summary)
    for reason in reasons:
        assert f"skipped: {reason}" in table
        assert f"e.g. {reason}: {path}:{expected_lines[reason]}:" in table
    assert "skipped: malformed_json" in table and "dropped: overlong" in table
    assert [ln for ln in table.splitlines() if "skipped: malformed_json" in ln][0].endswith(" 2")
    assert table in out  # the tool prints the same table


def test_skip_mode_json_array_records(tmp_path, sp_model_path, capsys):
    values = [GOOD[0], BAD["unknown_format"][0], GOOD[1], [1, 2], BAD["role_order"][0]]
    text = json.dumps(values, indent=2)
    path = tmp_path / "in.json"
    path.write_text(text, encoding="utf-8")
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(str(path), sp_model_path, prefix,
                                               "--on-error", "skip", "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["conversations_read"] == 5 and summary["conversations_kept"] == 2
    assert summary["skipped"] == {"unknown_format": 1, "bad_field_type": 1, "role_order": 1}
    check_accounting(summary)
    lines = text.split("\n")
    list_line = lines.index("  [") + 1
    assert summary["examples"]["bad_field_type"].startswith(f"{path}:{list_line}: conversation 4: ")


def test_skip_mode_empty_file_is_counted(tmp_path, sp_model_path, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", GOOD)
    empty = tmp_path / "b.json"
    empty.write_text("[]\n", encoding="utf-8")
    prefix = tmp_path / "ds"
    code, out, err = run(capsys, preprocess_args([good, str(empty)], sp_model_path, prefix,
                                                 "--on-error", "skip", "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["empty_files"] == 1
    assert summary["conversations_read"] == len(GOOD)  # an empty file is not a conversation
    assert summary["conversations_kept"] == len(GOOD)
    assert summary["examples"]["empty_file"].startswith(f"{empty}:1: ")
    assert "empty files skipped" in format_summary(summary)


def test_skip_mode_empty_file_keeps_accounting_exact(tmp_path, sp_model_path, capsys):
    good = write_jsonl(tmp_path / "a.jsonl", GOOD)
    empty = tmp_path / "b.jsonl"
    empty.write_bytes(b"")
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args([good, str(empty)], sp_model_path, prefix,
                                               "--on-error", "skip", "--split", "100,0"))
    assert code == 0, err
    check_accounting(read_meta(prefix)["summary"])


def test_skip_mode_nothing_kept(tmp_path, sp_model_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", [BAD["no_assistant"][0], BAD["malformed_json"][0]])
    prefix = tmp_path / "out" / "ds"
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--on-error", "skip"))
    assert_clean_error(code, err)
    assert "no conversation was kept (2 read" in err
    assert "no_assistant" in err and "malformed_json" in err
    assert_nothing_written(prefix)


def test_skip_mode_with_workers_counts_the_same(tmp_path, sp_model_path, capsys):
    lines = []
    for kind in sorted(BAD):
        lines += [GOOD[0], BAD[kind][0]]
    path = write_lines(tmp_path / "in.jsonl", lines)
    summaries = []
    for workers in ("1", "2"):
        prefix = tmp_path / f"ds{workers}"
        code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--on-error",
                                                   "skip", "--workers", workers, "--split", "100,0"))
        assert code == 0, err
        summaries.append(read_meta(prefix)["summary"])
    keys = ("conversations_read", "conversations_kept", "skipped", "dropped", "examples")
    assert [{k: s[k] for k in keys} for s in summaries][0] == {k: summaries[1][k] for k in keys}
    assert summaries[1]["skipped"] == {BAD[kind][1]: 1 for kind in BAD}


# --------------------------------------------------------------------------- --overlong


def fitting_prefix_turns(sp_model_path, turns, system=None):
    """Largest k such that the first k turns render into at most SEQ tokens, and that rendering."""
    best = (0, None)
    for k in range(1, len(turns) + 1):
        (rendered,) = processor(sp_model_path).render(parse_record(openai(*turns[:k],
                                                                         system=system)))
        if rendered.num_tokens <= SEQ:
            best = (k, rendered)
    return best


def test_overlong_drop(tmp_path, sp_model_path, capsys):
    records = [GOOD[0], openai(("Hi", LONG_TEXT)), GOOD[1], openai((LONG_TEXT, "ok")), GOOD[2]]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "ds"
    # --overlong drop needs no --on-error skip
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--overlong", "drop",
                                               "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert (summary["conversations_read"], summary["conversations_kept"]) == (5, 3)
    assert summary["dropped"] == {"overlong": 2} and summary["skipped"] == {}
    assert summary["truncated"] == 0
    check_accounting(summary)
    assert summary["examples"]["overlong"].startswith(f"{path}:2: conversation 2 has ")
    assert "it was dropped" in summary["examples"]["overlong"]
    assert "dropped: overlong" in format_summary(summary)


def test_overlong_truncate(tmp_path, sp_model_path, capsys):
    turns = [(f"Question {i}: what is the capital of France?",
              f"Answer {i}: the capital of France is Paris. Thanks!") for i in range(12)]
    kept_turns, expected = fitting_prefix_turns(sp_model_path, turns, system="Be brief.")
    assert 1 <= kept_turns < len(turns)  # it needs truncating, and something fits
    long_conversation = openai(*turns, system="Be brief.")
    first_turn_too_long = openai((LONG_TEXT, "ok"), ("Hi", "Hello"))
    records = [GOOD[0], long_conversation, first_turn_too_long, GOOD[1]]
    path = write_jsonl(tmp_path / "in.jsonl", records)
    prefix = tmp_path / "ds"
    code, out, err = run(capsys, preprocess_args(path, sp_model_path, prefix,
                                                 "--overlong", "truncate", "--packing", "none",
                                                 "--split", "100,0"))
    assert code == 0, err
    metadata = read_meta(prefix)
    summary = metadata["summary"]
    assert (summary["conversations_read"], summary["conversations_kept"]) == (4, 3)
    assert summary["truncated"] == 1
    assert summary["turns_removed_by_truncation"] == len(turns) - kept_turns
    assert summary["dropped"] == {"overlong_no_turn_fits": 1} and summary["skipped"] == {}
    check_accounting(summary)
    example = summary["examples"]["overlong_no_turn_fits"]
    assert example.startswith(f"{path}:3: conversation 3 has ")
    assert "even its first turn does not fit" in example
    table = format_summary(summary)
    assert "dropped: overlong_no_turn_fits" in table
    assert f"1 ({len(turns) - kept_turns} turns)" in table

    import sentencepiece

    end_of_turn = metadata["special_ids"]["end_of_turn"]
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model_path)
    assert end_of_turn == sp.PieceToId("<|im_end|>")

    dataset = PackedDialogDataset(str(prefix), "train")
    assert len(dataset) == 3  # --packing none: one conversation per pack
    packs = [dataset.raw_pack(i) for i in range(len(dataset))]
    matching = [p for p in packs if np.array_equal(p[0], expected.input_ids)]
    assert len(matching) == 1, "the truncated conversation is its first whole turns"
    tokens, counts, lengths = matching[0]
    assert len(tokens) <= SEQ and lengths.tolist() == [len(tokens)]
    np.testing.assert_array_equal(counts, expected.loss_token_num)
    trained = tokens[counts > 0]
    assert trained[-1] == end_of_turn
    assert int(np.count_nonzero(tokens == end_of_turn)) >= kept_turns
    # the cut is at a turn boundary: after the last trained token comes only the reply's close
    close = processor(sp_model_path).setup().encode("\n")
    assert tokens[int(np.flatnonzero(counts > 0)[-1]) + 1:].tolist() == close
    for tokens, counts, _ in packs:
        assert len(tokens) <= SEQ and tokens[counts > 0][-1] == end_of_turn


def test_overlong_truncate_when_everything_fits_changes_nothing(tmp_path, sp_model_path, capsys):
    path = write_jsonl(tmp_path / "in.jsonl", GOOD)
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--overlong",
                                               "truncate", "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["truncated"] == 0 and summary["dropped"] == {}
    assert summary["conversations_kept"] == len(GOOD)


# --------------------------------------------------------------------------- kept, with notes


NOTED = [
    {"messages": [{"role": "system", "content": None}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!"}], "lang": "en"},
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ""},
                  {"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Bye"}], "lang": "en"},
    {"conversations": [{"from": "human", "value": "Thanks!"},
                       {"from": "gpt", "value": "You're welcome.", "markdown": False}]},
]


def test_notes_are_counted_and_every_record_accounted_for(tmp_path, sp_model_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", GOOD + NOTED + [BAD["role_order"][0]])
    prefix = tmp_path / "ds"
    code, out, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--on-error", "skip",
                                                 "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["conversations_kept"] == len(GOOD) + len(NOTED)
    assert summary["skipped"] == {"role_order": 1}
    check_accounting(summary)
    assert summary["notes"] == {"ignored field 'lang'": 2, "null system message dropped": 1,
                                "empty reply kept as context": 1,
                                "messages after the last trainable reply dropped": 1,
                                "ignored field 'conversations[].markdown'": 1}
    table = format_summary(summary)
    assert [line for line in table.splitlines() if "ignored field 'lang'" in line][0].split() == [
        "kept,", "note:", "ignored", "field", "'lang'", "2", "records"]
    assert table in out


def test_empty_reply_error_refuses_what_context_keeps(tmp_path, sp_model_path, capsys):
    path = write_lines(tmp_path / "in.jsonl", GOOD + NOTED)
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--empty-reply",
                                               "error"))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:{len(GOOD) + 2}: conversation {len(GOOD) + 2}: "
                          "messages[1] (assistant) is empty")
    assert "--empty-reply context" in err
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--empty-reply",
                                               "error", "--on-error", "skip", "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["skipped"] == {"empty_reply": 1}
    assert summary["conversations_kept"] == len(GOOD) + len(NOTED) - 1
    assert "empty reply kept as context" not in summary["notes"]


# --------------------------------------------------------------------------- Parquet input


def write_parquet(path, records) -> str:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.Table.from_struct_array(pyarrow.array(records))
    pyarrow.parquet.write_table(table, str(path), row_group_size=2)
    return str(path)


def test_parquet_gives_the_jsonl_dataset(tmp_path, sp_model_path, capsys):
    records = [GOOD[0], GOOD[1], GOOD[4], NOTED[0], NOTED[1]]  # one schema: openai messages
    jsonl = write_jsonl(tmp_path / "in.jsonl", records)
    folder = tmp_path / "hf" / "data"
    os.makedirs(folder)
    write_parquet(folder / "train-00000-of-00001.parquet", records)
    metas = []
    for name, source in (("a", jsonl), ("b", str(tmp_path / "hf"))):  # a folder finds .parquet
        code, _, err = run(capsys, preprocess_args(source, sp_model_path, tmp_path / name,
                                                   "--split", "100,0"))
        assert code == 0, err
        metas.append(read_meta(tmp_path / name)["summary"])
    for suffix in ("train.tokens.bin", "train.loss_token_num.bin", "train.tokens.idx"):
        assert (tmp_path / f"a.{suffix}").read_bytes() == (tmp_path / f"b.{suffix}").read_bytes()
    assert metas[0]["notes"] == metas[1]["notes"] and metas[1]["conversations_kept"] == 5


def test_parquet_bad_row_names_file_and_row(tmp_path, sp_model_path, capsys):
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"},
                        {"role": "assistant", "content": "hello"}]}
    path = write_parquet(tmp_path / "in.parquet", [GOOD[0], GOOD[1], bad, GOOD[0]])
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix))
    assert_clean_error(code, err)
    assert err.startswith(f"error: {path}:row 2: conversation 3: messages[1] (tool) follows")
    assert_nothing_written(prefix)
    code, _, err = run(capsys, preprocess_args(path, sp_model_path, prefix, "--on-error", "skip",
                                               "--split", "100,0"))
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert (summary["conversations_read"], summary["conversations_kept"]) == (4, 3)
    assert summary["skipped"] == {"role_order": 1}
    assert summary["examples"]["role_order"].startswith(f"{path}:row 2: conversation 3: ")


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_line_over_the_limit_is_never_read_whole(tmp_path, sp_model_path, capsys, on_error):
    """A JSONL line past ``readers.MAX_LINE_BYTES`` (64 MiB: a minified one-line file) is read
    past in 1 MiB pieces: an error at file:line (raise), or a counted skip with the lines after
    it kept (skip)."""
    from mt_dialog.data.readers import MAX_LINE_BYTES

    path = tmp_path / "in.jsonl"
    with open(path, "wb") as handle:
        handle.write(json.dumps(GOOD[0]).encode() + b"\n")
        handle.write(b'{"messages": [{"role": "user", "content": "')
        handle.write(b"x" * (MAX_LINE_BYTES + 10))
        handle.write(b'"}]}\n' + json.dumps(GOOD[1]).encode() + b"\n")
    prefix = tmp_path / "ds"
    code, out, err = run(capsys, preprocess_args(str(path), sp_model_path, prefix,
                                                 "--on-error", on_error, "--split", "100,0"))
    if on_error == "raise":
        assert_clean_error(code, err)
        assert err.startswith(f"error: {path}:2: ") and "over the 67,108,864-byte limit" in err
        assert_nothing_written(prefix)
        return
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["skipped"] == {"line_too_long": 1}, summary
    assert summary["conversations_kept"] == 2 and summary["conversations_read"] == 3
    assert summary["examples"]["line_too_long"].startswith(f"{path}:2: ")


# a chat template that never ends on records saying LOOP (jinja's sandbox caps one range at
# 100,000 items, so two nested ones run 1e10 iterations), or on every conversation
_LOOP = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
         "{% endfor %}")
_LOOPING_ON_MARK = (
    "{% for message in messages %}{% if 'LOOP' in message['content'] %}" + _LOOP + "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _looping_tokenizer(hf_tokenizer_dir, folder, template):
    from tests.data.chat_tokenizers import build_tokenizer

    return build_tokenizer(hf_tokenizer_dir, str(folder), template, eos_token="<|im_end|>",
                           pad_token="<|endoftext|>", additional_special_tokens=["<|im_start|>"])


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_a_template_that_never_ends_is_stopped(hf_tokenizer_dir, tmp_path, capsys, on_error):
    """--template-timeout: the record whose rendering loops is stopped after the limit: an error
    at file:line, or a counted skip with every other record kept."""
    tokenizer = _looping_tokenizer(hf_tokenizer_dir, tmp_path / "tok", _LOOPING_ON_MARK)
    path = write_lines(tmp_path / "in.jsonl", [GOOD[0], openai(("LOOP please", "No.")),
                                               GOOD[1]])
    prefix = tmp_path / "ds"
    code, _, err = run(capsys, ["--input", path, "--tokenizer-path", tokenizer, "--template",
                                "hf", "--output-prefix", str(prefix), "--seq-length", "256",
                                "--no-progress", "--template-timeout", "1", "--on-error",
                                on_error, "--split", "100,0"])
    if on_error == "raise":
        assert_clean_error(code, err)
        assert err.startswith(f"error: {path}:2: ") and "--template-timeout 1 s" in err, err
        return
    assert code == 0, err
    summary = read_meta(prefix)["summary"]
    assert summary["skipped"] == {"template_timeout": 1} and summary["conversations_kept"] == 2


def test_a_template_that_never_ends_fails_its_probe(hf_tokenizer_dir, tmp_path, capsys):
    tokenizer = _looping_tokenizer(hf_tokenizer_dir, tmp_path / "tok",
                                   _LOOP + CHATML_LOOP_FREE)
    path = write_lines(tmp_path / "in.jsonl", GOOD[:2])
    code, _, err = run(capsys, ["--input", path, "--tokenizer-path", tokenizer, "--template",
                                "hf", "--output-prefix", str(tmp_path / "ds"), "--no-progress",
                                "--template-timeout", "0.2"])
    assert_clean_error(code, err)
    assert "did not finish rendering the probe conversations in 2 s" in err, err


CHATML_LOOP_FREE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
