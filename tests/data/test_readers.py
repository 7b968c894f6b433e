"""expand_inputs and iter_records: file lists, JSONL and streamed JSON arrays with exact line
numbers, Parquet rows equal to the JSON records they hold, empty files, and precise errors for
malformed or non-UTF-8 arrays and unreadable Parquet files."""

import codecs
import json
import os

import pytest

from mt_dialog.data import readers
from mt_dialog.data.formats import RecordError, parse_record
from mt_dialog.data.readers import InputError, RawRecord, expand_inputs, iter_records
from tests.conftest import openai, write_jsonl


def touch(path, text="{}\n"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return str(path)


def write_bytes(path, data: bytes) -> str:
    with open(path, "wb") as handle:
        handle.write(data)
    return str(path)


# --------------------------------------------------------------------------- expand_inputs


def test_expand_single_file(tmp_path):
    path = touch(tmp_path / "a.jsonl")
    assert expand_inputs([path]) == [path]


def test_expand_file_with_any_suffix_when_named_explicitly(tmp_path):
    path = touch(tmp_path / "data.txt")
    assert expand_inputs([path]) == [path]


def test_expand_folder_recursive_only_input_files(tmp_path):
    root = tmp_path / "corpus"
    wanted = [touch(root / "b.jsonl"), touch(root / "a.json"), touch(root / "sub" / "c.jsonl"),
              touch(root / "sub" / "deeper" / "d.json"), touch(root / "train-0.parquet")]
    touch(root / "notes.txt")
    touch(root / "sub" / "e.jsonl.bak")
    touch(root / "sub" / "f.csv")
    assert expand_inputs([str(root)]) == sorted(wanted)


def test_expand_folder_without_json_files(tmp_path):
    root = tmp_path / "empty"
    touch(root / "readme.md")
    with pytest.raises(InputError, match=r"folder has no \.jsonl, \.json or \.parquet files"):
        expand_inputs([str(root)])


def test_expand_glob(tmp_path):
    a = touch(tmp_path / "part-1.jsonl")
    b = touch(tmp_path / "part-2.jsonl")
    touch(tmp_path / "other.jsonl")
    os.makedirs(tmp_path / "part-dir.jsonl")  # a folder matching the pattern is not a file
    assert expand_inputs([str(tmp_path / "part-*.jsonl")]) == [a, b]


def test_expand_recursive_glob(tmp_path):
    a = touch(tmp_path / "x" / "1.json")
    b = touch(tmp_path / "x" / "y" / "2.json")
    touch(tmp_path / "x" / "y" / "3.jsonl")
    assert expand_inputs([str(tmp_path / "x" / "**" / "*.json")]) == sorted([a, b])


def test_expand_glob_matching_nothing(tmp_path):
    touch(tmp_path / "a.jsonl")
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(InputError) as info:
        expand_inputs([pattern])
    assert pattern in str(info.value) and "matches no file" in str(info.value)


def test_expand_missing_path(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(InputError) as info:
        expand_inputs([touch(tmp_path / "ok.jsonl"), missing])
    assert f"--input {missing}: no such file or folder" == str(info.value)


def test_expand_several_items_keep_order_and_drop_duplicates(tmp_path):
    z = touch(tmp_path / "z.jsonl")
    folder_files = [touch(tmp_path / "d" / "a.jsonl"), touch(tmp_path / "d" / "b.jsonl")]
    result = expand_inputs([z, str(tmp_path / "d"), folder_files[1], z])
    assert result == [z] + folder_files


def test_input_errors_reach_the_user_as_one_line(tmp_path, sp_model_path, capsys):
    """An ``InputError`` is a ValueError, which the tool reports as one line without a
    traceback, nothing written (here a glob matching nothing; a missing file: test_bad_input)."""
    from tests.conftest import preprocess_args
    from tools.preprocess_dialog import main

    pattern = str(tmp_path / "*.parquet")
    code = main(preprocess_args(pattern, sp_model_path, tmp_path / "out"))
    assert code == 1
    assert capsys.readouterr().err == f"error: --input {pattern}: the pattern matches no file\n"
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- JSONL


def test_jsonl_blank_lines_skipped_and_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", ["", openai(("q1", "a1")), "   ", "",
                                              openai(("q2", "a2")), "\t", openai(("q3", "a3"))])
    records = list(iter_records(path))
    assert [r.line for r in records] == [2, 5, 7]
    assert all(isinstance(r, RawRecord) and r.value is None and r.error is None for r in records)
    assert [json.loads(r.raw) for r in records] == [openai(("q1", "a1")), openai(("q2", "a2")),
                                                    openai(("q3", "a3"))]
    assert records[1].where == f"{path}:5"
    assert all(r.path == path for r in records)
    assert [r.nbytes for r in records] == [len(r.raw) for r in records]


def test_jsonl_records_stay_raw_bytes(tmp_path):
    # bad lines are not parsed here (workers do it), so reading never fails on them
    path = write_bytes(tmp_path / "a.jsonl", b'{"a": 1}\n{not json\n\xff\xfe\n')
    records = list(iter_records(path))
    assert [(r.line, r.raw) for r in records] == [(1, b'{"a": 1}\n'), (2, b"{not json\n"),
                                                  (3, b"\xff\xfe\n")]


def test_jsonl_bom_and_crlf(tmp_path):
    path = write_bytes(tmp_path / "a.jsonl",
                       codecs.BOM_UTF8 + b'{"a": 1}\r\n\r\n{"b": "\xc3\xa9"}\r\n')
    records = list(iter_records(path))
    assert [r.line for r in records] == [1, 3]
    assert records[0].raw == b'{"a": 1}\r\n'  # BOM removed
    assert [json.loads(r.raw) for r in records] == [{"a": 1}, {"b": "é"}]


def test_jsonl_last_line_without_newline(tmp_path):
    path = write_bytes(tmp_path / "a.jsonl", b'{"a": 1}\n{"b": 2}')
    assert [(r.line, r.raw) for r in iter_records(path)] == [(1, b'{"a": 1}\n'), (2, b'{"b": 2}')]


def test_format_is_decided_by_content_not_name(tmp_path):
    jsonl_named_json = write_jsonl(tmp_path / "a.json", [{"x": 1}, {"x": 2}])
    records = list(iter_records(jsonl_named_json))
    assert [r.raw is not None for r in records] == [True, True]
    array_named_jsonl = write_bytes(tmp_path / "b.jsonl", b'\n  \n  [{"x": 1}, {"x": 2}]\n')
    records = list(iter_records(array_named_jsonl))
    assert [(r.line, r.value, r.raw) for r in records] == [(3, {"x": 1}, None), (3, {"x": 2}, None)]


# --------------------------------------------------------------------------- JSON arrays


def element_start_lines(text: str, indent: int = 2):
    """1-based line numbers of the lines that open a top-level element of an indented array."""
    opener = " " * indent + "{"
    return [n for n, line in enumerate(text.split("\n"), start=1) if line == opener]


def test_pretty_printed_array_line_numbers(tmp_path):
    values = [openai(("q1", "a1")), openai(("q2", "a2"), ("q3", "a3"), system="sys"),
              {"instruction": "i", "input": "multi\nline", "output": "o"}]
    text = json.dumps(values, indent=2)
    path = touch(tmp_path / "a.json", text)
    records = list(iter_records(path))
    assert [r.value for r in records] == values
    assert all(r.raw is None and r.error is None for r in records)
    lines = [r.line for r in records]
    assert lines == element_start_lines(text)
    assert lines[0] == 2 and len(set(lines)) == 3


def test_array_hand_written_line_numbers(tmp_path):
    text = ('[\n'
            '\n'
            '  {"a": 1},   {"a": 2},\n'          # line 3: two records on one line
            '  {\n'                              # line 4
            '    "a": "x\\ny"\n'                  # an escaped newline is not a line break
            '  }\n'
            '  ,\n'
            '\n'
            '  "not an object"\n'                # line 9: any JSON value is a record here
            ']\n')
    path = touch(tmp_path / "a.json", text)
    records = list(iter_records(path))
    assert [(r.line, r.value) for r in records] == [
        (3, {"a": 1}), (3, {"a": 2}), (4, {"a": "x\ny"}), (9, "not an object")]


def test_array_with_bom_and_leading_blank_lines(tmp_path):
    path = write_bytes(tmp_path / "a.json",
                       codecs.BOM_UTF8 + b'\n\n[\n  {"a": "\xe6\x97\xa9"},\n  {"a": 2}\n]\n')
    assert [(r.line, r.value) for r in iter_records(path)] == [(4, {"a": "早"}), (5, {"a": 2})]


@pytest.mark.parametrize("content", [b"", b"   \n\n\t\n", codecs.BOM_UTF8, codecs.BOM_UTF8 + b"\n "])
def test_empty_file(tmp_path, content):
    path = write_bytes(tmp_path / "e.jsonl", content)
    records = list(iter_records(path))
    assert len(records) == 1
    record = records[0]
    assert isinstance(record.error, RecordError)
    assert record.error.reason == "empty_file"
    assert "empty" in record.error.message and "--input" in record.error.message
    assert (record.line, record.raw, record.value) == (1, None, None)
    assert record.where == f"{path}:1"


@pytest.mark.parametrize("content", ["[]", "[ ]\n", "\n\n[\n\n]\n\n"])
def test_empty_array(tmp_path, content):
    path = touch(tmp_path / "e.json", content)
    records = list(iter_records(path))
    assert len(records) == 1
    assert records[0].error is not None and records[0].error.reason == "empty_file"
    assert records[0].line == 1 and records[0].value is None
    assert "array is empty" in records[0].error.message


@pytest.mark.parametrize(
    "text, line, what",
    [
        ('[\n  {"a": 1},\n  {"a": }\n]\n', 3, "malformed JSON"),
        ('[\n  {"a": 1},\n  {"a": 2},\n  {"a": "unterminated\n]\n', 4, "malformed JSON"),
        ('[\n  {"a": 1}\n  {"a": 2}\n]\n', 3, "expected ',' or ']' after a record"),
        ('[\n  {"a": 1},\n  {"a": 2}\n', 4, "expected ',' or ']' after a record"),
        ('[\n  {"a": 1},\n', 3, "unexpected end of file (missing ']')"),
        ('[\n  {"a": 1}\n]\n\n{"b": 2}\n', 5, "text after the closing ']'"),
        ('[\n\n\n  {"a": 1} ]  ]', 4, "text after the closing ']'"),
    ],
)
def test_malformed_array(tmp_path, text, line, what):
    path = touch(tmp_path / "bad.json", text)
    with pytest.raises(InputError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}:{line}: {what}")
    assert "JSONL" in message  # the fix: repair the file or convert it to JSONL


def test_malformed_array_yields_earlier_records_first(tmp_path):
    path = touch(tmp_path / "bad.json", '[{"a": 1},\n{"a": 2},\n{"a" 3}]')
    stream = iter_records(path)
    assert next(stream).value == {"a": 1}
    assert next(stream).value == {"a": 2}
    with pytest.raises(InputError, match=r"bad\.json:3: malformed JSON"):
        next(stream)


def test_array_invalid_utf8_names_the_line(tmp_path):
    data = b'[\n  {"a": 1},\n  {"a": 2},\n\n  {"a": "ok \xff bad"}\n]\n'
    path = write_bytes(tmp_path / "bad.json", data)
    with pytest.raises(InputError) as info:
        list(iter_records(path))
    message = str(info.value)
    offset = data.index(b"\xff")
    assert message.startswith(f"{path}:5: invalid UTF-8")
    assert f"byte offset {offset})" in message
    assert "re-encode the file as UTF-8" in message


def test_array_invalid_utf8_at_start_of_line(tmp_path):
    data = b'[\n  {"a": 1},\n  {"a": "x\n\xff"}\n]\n'  # a raw newline inside the bad string
    path = write_bytes(tmp_path / "bad.json", data)
    offset = data.index(b"\xff")
    with pytest.raises(InputError, match=rf"bad\.json:4: invalid UTF-8 \(byte offset {offset}\)"):
        list(iter_records(path))


def test_array_invalid_utf8_in_a_later_chunk(tmp_path):
    long = "x" * readers._CHUNK
    data = ('[\n  {"a": "' + long + '"},\n  {"a": 2},\n').encode() + b'  {"a": "\xc3"}\n]\n'
    path = write_bytes(tmp_path / "bad.json", data)
    with pytest.raises(InputError) as info:
        list(iter_records(path))
    offset = data.index(b"\xc3")
    assert str(info.value).startswith(f"{path}:4: invalid UTF-8 (byte offset {offset})")


def test_array_invalid_utf8_with_bom_names_the_line(tmp_path):
    data = codecs.BOM_UTF8 + b'[\n  {"a": 1},\n  {"a": "x\n\xff"}\n]\n'
    path = write_bytes(tmp_path / "bad.json", data)
    with pytest.raises(InputError) as info:
        list(iter_records(path))
    offset = data.index(b"\xff")
    assert str(info.value).startswith(f"{path}:4: invalid UTF-8 (byte offset {offset})")


def test_multibyte_characters_split_across_chunks(tmp_path):
    # 3-byte characters make chunk boundaries fall inside characters
    values = [{"i": i, "text": "早上好" * 700} for i in range(400)]  # ~2.5 MB
    text = json.dumps(values, ensure_ascii=False, indent=1)
    path = touch(tmp_path / "cjk.json", text)
    assert os.path.getsize(path) > 2 * readers._CHUNK
    records = list(iter_records(path))
    assert [r.value for r in records] == values
    assert [r.line for r in records] == element_start_lines(text, indent=1)


def test_large_array_across_chunk_boundaries(tmp_path):
    values = [
        openai((f"question {i} " + "q" * (300 + i % 97), f"answer {i} é " + "a" * (400 + i % 89)),
               system=("sys\n" * (i % 3)) or None)
        for i in range(3000)
    ]
    text = json.dumps(values, indent=2, ensure_ascii=False)
    path = touch(tmp_path / "big.json", text)
    assert os.path.getsize(path) > 2 * readers._CHUNK  # several chunks and a compaction
    records = list(iter_records(path))
    assert len(records) == 3000
    assert [r.value for r in records] == values
    assert [r.line for r in records] == element_start_lines(text)
    assert all(r.error is None and r.raw is None for r in records)


def test_large_compact_single_line_array(tmp_path):
    values = [{"instruction": f"i{i}", "output": "o" * (1000 + i)} for i in range(1500)]
    path = touch(tmp_path / "one_line.json", json.dumps(values))
    records = list(iter_records(path))
    assert [r.value for r in records] == values
    assert {r.line for r in records} == {1}


def _straddling_array(tmp_path, value_text: str, split_at: int) -> str:
    """An array whose one record has ``value_text`` starting ``split_at`` characters before the end
    of the first read chunk (so the chunk boundary falls inside it)."""
    head = '[{"pad": "'
    tail = '", "v": '
    fill = readers._CHUNK - split_at - len(head) - len(tail)
    text = head + "x" * fill + tail + value_text + "}]"
    assert text.index(value_text, len(head) + fill) == readers._CHUNK - split_at
    return touch(tmp_path / "straddle.json", text)


@pytest.mark.parametrize("value_text, expected", [('"abc"', "abc"), ("12345", 12345),
                                                 ("[1, 2]", [1, 2]), ('{"k": "v"}', {"k": "v"})])
@pytest.mark.parametrize("split_at", [1, 2, 3])
def test_values_straddling_the_chunk_boundary(tmp_path, value_text, expected, split_at):
    path = _straddling_array(tmp_path, value_text, split_at)
    records = list(iter_records(path))
    assert len(records) == 1 and records[0].value["v"] == expected


@pytest.mark.parametrize("value_text, split_at, expected", [
    ("null", 2, None), ("true", 3, True), ("false", 2, False), ('"\\u00e9"', 4, "é"),
    ("1e+5", 3, 100000.0)])
def test_literals_straddling_the_chunk_boundary(tmp_path, value_text, split_at, expected):
    path = _straddling_array(tmp_path, value_text, split_at)
    records = list(iter_records(path))
    assert len(records) == 1 and records[0].value["v"] == expected


def test_array_trailing_comma_is_malformed(tmp_path):
    path = write_bytes(tmp_path / "trailing.json", b'[\n  {"a": 1},\n  {"a": 2},\n]\n')
    with pytest.raises(InputError) as info:
        list(iter_records(path))
    assert str(info.value).startswith(f"{path}:4: trailing ',' before ']'")


def test_empty_file_is_not_called_a_conversation(tmp_path):
    from mt_dialog.data.records import RecordProcessor

    path = write_bytes(tmp_path / "empty.jsonl", b"")
    record = next(iter_records(path))
    outcome = RecordProcessor("sentencepiece", "unused", "chatml", None, 8, "error")._one(0, record)
    assert outcome[:3] == ("error", 0, "empty_file")
    assert outcome[3].startswith(f"{path}:1: the file is empty") and "conversation" not in outcome[3]


# --------------------------------------------------------------------------- Parquet

CALL = {"type": "function", "id": "c1",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
PARQUET_RECORDS = [  # rows of one schema, as a Hugging Face dataset holds them
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [CALL]},
                  {"role": "tool", "content": "18C", "tool_call_id": "c1"},
                  {"role": "assistant", "content": "18C.", "reasoning_content": "Read it."}],
     "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]', "source": "web"},
    {"messages": [{"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello!", "weight": 0},
                  {"role": "user", "content": "早上好"},
                  {"role": "assistant", "content": "<think>Chinese.</think>Good morning!"}]},
] + [openai((f"question {i}", f"answer {i}")) for i in range(5)]


def write_parquet(path, records, row_group_size=3) -> str:
    import pyarrow
    import pyarrow.parquet

    table = pyarrow.Table.from_struct_array(pyarrow.array(records))  # schema of all the rows
    pyarrow.parquet.write_table(table, str(path), row_group_size=row_group_size)
    return str(path)


def test_parquet_rows_are_the_json_records(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_PARQUET_BATCH", 2)  # several batches over several row groups
    path = write_parquet(tmp_path / "train-00000-of-00001.parquet", PARQUET_RECORDS)
    records = list(iter_records(path))
    # struct fields a row lacks are null in Parquet; they are left out as JSON leaves them out
    assert [r.value for r in records] == PARQUET_RECORDS
    assert [parse_record(r.value) for r in records] == [parse_record(v) for v in PARQUET_RECORDS]
    assert [r.line for r in records] == list(range(len(PARQUET_RECORDS)))
    assert [r.where for r in records][:2] == [f"{path}:row 0", f"{path}:row 1"]
    assert all(r.row and r.raw is None and r.error is None for r in records)
    assert sum(r.nbytes for r in records) == os.path.getsize(path)  # the progress bar ends full


def test_parquet_sharegpt_rows(tmp_path):
    values = [{"conversations": [{"from": "human", "value": "q"},
                                 {"from": "function_call", "value": json.dumps(CALL["function"])},
                                 {"from": "observation", "value": "18C"},
                                 {"from": "gpt", "value": "a", "loss": False},
                                 {"from": "human", "value": "q2"}, {"from": "gpt", "value": "b"}],
               "tools": "[]"},
              {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
               "system": "s"}]
    path = write_parquet(tmp_path / "s.parquet", values)
    assert [r.value for r in iter_records(path)] == values


def test_parquet_is_recognized_by_its_magic_bytes(tmp_path):
    path = write_parquet(tmp_path / "data.bin", PARQUET_RECORDS[:2])
    assert [r.value for r in iter_records(path)] == PARQUET_RECORDS[:2]


def test_parquet_found_in_folders_and_globs(tmp_path):
    os.makedirs(tmp_path / "data")
    first = write_parquet(tmp_path / "data" / "train-0.parquet", PARQUET_RECORDS[:1])
    second = write_parquet(tmp_path / "data" / "train-1.parquet", PARQUET_RECORDS[1:2])
    assert expand_inputs([str(tmp_path / "data")]) == [first, second]
    assert expand_inputs([str(tmp_path / "data" / "*.parquet")]) == [first, second]


def test_empty_parquet_file(tmp_path):
    import pyarrow
    import pyarrow.parquet

    path = str(tmp_path / "e.parquet")
    pyarrow.parquet.write_table(pyarrow.table({"messages": pyarrow.array([], pyarrow.string())}),
                                path)
    (record,) = list(iter_records(path))
    assert record.error.reason == "empty_file"
    assert record.where == f"{path}:1" and "no rows" in record.error.message


@pytest.mark.parametrize("damage", ["json", "truncated"])
def test_unreadable_parquet_file(tmp_path, damage):
    path = write_parquet(tmp_path / "bad.parquet", PARQUET_RECORDS)
    data = open(path, "rb").read()
    write_bytes(path, b'{"messages": []}\n' if damage == "json" else data[: len(data) // 2])
    with pytest.raises(InputError) as info:
        list(iter_records(path))
    message = str(info.value)
    assert message.startswith(f"{path}: not a readable Parquet file (")
    assert "re-download it, or convert it to JSONL" in message
