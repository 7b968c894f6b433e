"""parse_record / detect_format / validate_roles: every accepted format normalizes to the same
messages, and every problem raises RecordError with the right reason and a precise message."""

import pytest

from mt_dialog.data.formats import (
    FORMATS,
    Message,
    RecordError,
    detect_format,
    parse_record,
    validate_roles,
)

U, A, S = "user", "assistant", "system"


def roles(messages):
    return [(m.role, m.content) for m in messages]


def reason_of(record, input_format=None):
    with pytest.raises(RecordError) as info:
        parse_record(record, input_format)
    return info.value


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": []}, "openai"),
        ({"conversations": []}, "sharegpt"),
        ({"conversation": []}, "firefly"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"instruction": "a", "input": "", "output": "b", "system": "s"}, "alpaca"),
        # a record carrying several keys: the first format in the documented order wins
        ({"messages": [], "conversations": []}, "openai"),
        ({"conversations": [], "conversation": []}, "sharegpt"),
    ],
)
def test_detect_format(record, expected):
    assert detect_format(record) == expected


@pytest.mark.parametrize(
    "record",
    [{}, {"text": "hello"}, {"instruction": "no output"}, {"output": "no instruction"},
     {"Messages": []}],
)
def test_detect_format_unknown(record):
    with pytest.raises(RecordError) as info:
        detect_format(record)
    err = info.value
    assert err.reason == "unknown_format"
    assert "--input-format" in err.message
    for key in record:
        assert key in err.message  # the message lists the keys that were found
    if not record:
        assert "keys: none" in err.message


def test_unknown_format_through_parse_record():
    err = reason_of({"prompt": "hi", "completion": "there"})
    assert err.reason == "unknown_format"
    assert "completion, prompt" in err.message
    assert str(err) == err.message


# --------------------------------------------------------------------------- each format


def test_openai_plain_and_system():
    record = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Hi"},
                           {"role": "assistant", "content": "Hello"},
                           {"role": "user", "content": "2+2?"},
                           {"role": "assistant", "content": "4"}]}
    messages = parse_record(record)
    assert all(isinstance(m, Message) for m in messages)
    assert roles(messages) == [(S, "Be brief."), (U, "Hi"), (A, "Hello"), (U, "2+2?"), (A, "4")]
    without_system = {"messages": record["messages"][1:]}
    assert roles(parse_record(without_system)) == roles(messages)[1:]


def test_openai_extra_keys_are_ignored():
    record = {"messages": [{"role": "user", "content": "Hi", "name": "bob"},
                           {"role": "assistant", "content": "Hello", "weight": 1}],
              "id": 7}
    assert roles(parse_record(record)) == [(U, "Hi"), (A, "Hello")]


def test_sharegpt_role_names():
    record = {"conversations": [{"from": "system", "value": "sys"},
                                {"from": "human", "value": "q1"},
                                {"from": "gpt", "value": "a1"},
                                {"from": "user", "value": "q2"},
                                {"from": "chatgpt", "value": "a2"},
                                {"from": "human", "value": "q3"},
                                {"from": "assistant", "value": "a3"}]}
    assert roles(parse_record(record)) == [
        (S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2"), (U, "q3"), (A, "a3")]


def test_sharegpt_system_field():
    record = {"system": "You are helpful.",
              "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert roles(parse_record(record)) == [(S, "You are helpful."), (U, "q"), (A, "a")]
    for empty in ("", None):
        record["system"] = empty
        assert roles(parse_record(record)) == [(U, "q"), (A, "a")]


def test_firefly_pairs_and_system():
    record = {"conversation": [{"human": "q1", "assistant": "a1"},
                               {"human": "q2", "assistant": "a2"}]}
    assert roles(parse_record(record)) == [(U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")]
    record["system"] = "sys"
    assert roles(parse_record(record)) == [(S, "sys"), (U, "q1"), (A, "a1"), (U, "q2"), (A, "a2")]


def test_alpaca_input_joined_to_instruction():
    record = {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"}
    assert roles(parse_record(record)) == [
        (U, "Translate to French.\n\ngood morning"), (A, "bonjour")]


@pytest.mark.parametrize("blank", ["", "   \n", None])
def test_alpaca_blank_or_missing_input_is_not_joined(blank):
    record = {"instruction": "Say hi.", "output": "hi"}
    if blank is not None:
        record["input"] = blank
    assert roles(parse_record(record)) == [(U, "Say hi."), (A, "hi")]


def test_alpaca_system():
    record = {"instruction": "i", "input": "x", "output": "o", "system": "sys"}
    assert roles(parse_record(record)) == [(S, "sys"), (U, "i\n\nx"), (A, "o")]


def test_all_formats_normalize_to_the_same_messages():
    expected = [(S, "sys"), (U, "q"), (A, "a")]
    records = {
        "openai": {"messages": [{"role": "system", "content": "sys"},
                                {"role": "user", "content": "q"},
                                {"role": "assistant", "content": "a"}]},
        "sharegpt": {"conversations": [{"from": "system", "value": "sys"},
                                       {"from": "human", "value": "q"},
                                       {"from": "gpt", "value": "a"}]},
        "firefly": {"system": "sys", "conversation": [{"human": "q", "assistant": "a"}]},
        "alpaca": {"system": "sys", "instruction": "q", "output": "a"},
    }
    assert set(records) == set(FORMATS)
    for name, record in records.items():
        assert roles(parse_record(record)) == expected, name
        assert roles(parse_record(record, name)) == expected, name


# --------------------------------------------------------------------------- forced format


def test_forced_format_overrides_detection():
    record = {"messages": [{"role": "user", "content": "from openai"},
                           {"role": "assistant", "content": "A"}],
              "conversations": [{"from": "human", "value": "from sharegpt"},
                                {"from": "gpt", "value": "B"}]}
    assert parse_record(record)[0].content == "from openai"
    assert parse_record(record, "sharegpt")[0].content == "from sharegpt"
    assert parse_record(record, "openai")[0].content == "from openai"


def test_forced_format_missing_its_field():
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    err = reason_of(record, "sharegpt")
    assert err.reason == "missing_field"
    assert "'conversations'" in err.message
    err = reason_of(record, "firefly")
    assert err.reason == "missing_field" and "'conversation'" in err.message


def test_forced_alpaca_missing_output_is_missing_field():
    record = {"instruction": "no output here"}
    assert reason_of(record).reason == "unknown_format"  # auto: cannot tell the format
    err = reason_of(record, "alpaca")
    assert err.reason == "missing_field"
    assert "'output'" in err.message


# --------------------------------------------------------------------------- missing_field


@pytest.mark.parametrize(
    "record, field, where",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
         "content", "messages[1]"),
        ({"messages": [{"role": "user", "content": "q"}, {"content": "a"}]}, "role", "messages[1]"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
         "content", "messages[1]"),
        ({"messages": [{"role": None, "content": "q"}]}, "role", "messages[0]"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt"}]},
         "value", "conversations[1]"),
        ({"conversations": [{"value": "q"}]}, "from", "conversations[0]"),
        ({"conversation": [{"human": "q", "assistant": "a"}, {"human": "q2"}]},
         "assistant", "conversation[1]"),
        ({"conversation": [{"assistant": "a"}]}, "human", "conversation[0]"),
        ({"instruction": None, "output": "o"}, "instruction", "record"),
    ],
)
def test_missing_field(record, field, where):
    err = reason_of(record)
    assert err.reason == "missing_field"
    assert err.message.startswith(f"{where}: ")
    assert f"'{field}'" in err.message


# --------------------------------------------------------------------------- bad_field_type


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
         "messages[1]: field 'content' must be a string, got int"),
        ({"messages": [{"role": "user", "content": ["q"]}]},
         "messages[0]: field 'content' must be a string, got list"),
        ({"messages": [{"role": 1, "content": "q"}]},
         "messages[0]: field 'role' must be a string, got int"),
        ({"conversations": [{"from": "human", "value": {"text": "q"}}]},
         "conversations[0]: field 'value' must be a string, got dict"),
        ({"conversation": [{"human": "q", "assistant": 3.5}]},
         "conversation[0]: field 'assistant' must be a string, got float"),
        ({"instruction": "i", "input": 5, "output": "o"},
         "record: field 'input' must be a string, got int"),
        ({"instruction": "i", "output": True}, "record: field 'output' must be a string, got bool"),
        ({"system": ["s"], "conversation": [{"human": "q", "assistant": "a"}]},
         "record: field 'system' must be a string, got list"),
    ],
)
def test_bad_field_type_non_string(record, expected):
    err = reason_of(record)
    assert err.reason == "bad_field_type"
    assert err.message == expected


@pytest.mark.parametrize(
    "record, key, got",
    [
        ({"messages": {"role": "user", "content": "q"}}, "messages", "dict"),
        ({"messages": "hello"}, "messages", "str"),
        ({"messages": None}, "messages", "NoneType"),
        ({"conversations": 3}, "conversations", "int"),
        ({"conversation": "q"}, "conversation", "str"),
    ],
)
def test_bad_field_type_non_list(record, key, got):
    err = reason_of(record)
    assert err.reason == "bad_field_type"
    assert err.message == f"field '{key}' must be a list, got {got}"


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [{"role": "user", "content": "q"}, "a"]},
         "messages[1] must be an object, got str"),
        ({"messages": [["user", "q"]]}, "messages[0] must be an object, got list"),
        ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}, None]},
         "conversations[2] must be an object, got NoneType"),
        ({"conversation": [7]}, "conversation[0] must be an object, got int"),
    ],
)
def test_bad_field_type_non_object_item(record, expected):
    err = reason_of(record)
    assert err.reason == "bad_field_type"
    assert err.message == expected


@pytest.mark.parametrize("record, got", [([], "list"), ("text", "str"), (3, "int"), (None, "NoneType")])
def test_bad_field_type_non_object_record(record, got):
    for input_format in (None,) + FORMATS:
        err = reason_of(record, input_format)
        assert err.reason == "bad_field_type"
        assert err.message == f"a record must be a JSON object, got {got}"


# --------------------------------------------------------------------------- unknown_role


def test_unknown_role_openai():
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}
    err = reason_of(record)
    assert err.reason == "unknown_role"
    assert err.message.startswith("messages[1]: ")
    assert "'bot'" in err.message and "system, user, assistant" in err.message


@pytest.mark.parametrize("role", ["human", "gpt", "tool", "Assistant"])
def test_unknown_role_openai_rejects_sharegpt_names(role):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": role, "content": "a"}]}
    err = reason_of(record)
    assert err.reason == "unknown_role"
    assert repr(role) in err.message


def test_unknown_role_sharegpt():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "bing", "value": "a"}]}
    err = reason_of(record)
    assert err.reason == "unknown_role"
    assert err.message.startswith("conversations[1]: ")
    assert "'bing'" in err.message
    assert "human" in err.message and "gpt" in err.message  # lists the accepted names


# --------------------------------------------------------------------------- role_order


def _openai(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    "pairs, expected_start",
    [
        ([(A, "a"), (U, "q")], "message 0 is 'assistant' but 'user' was expected"),
        ([(S, "s"), (A, "a"), (U, "q")], "message 1 is 'assistant' but 'user' was expected"),
        ([(U, "q1"), (U, "q2"), (A, "a")], "message 1 is 'user' but 'assistant' was expected"),
        ([(U, "q"), (A, "a"), (A, "a2")], "message 2 is 'assistant' but 'user' was expected"),
        ([(U, "q"), (A, "a"), (S, "s")], "message 2 is 'system' but 'user' was expected"),
        ([(S, "s1"), (S, "s2"), (U, "q"), (A, "a")],
         "message 1 is 'system' but 'user' was expected"),
        ([(U, "q"), (A, "a"), (U, "q2")], "message 2 (user) has no assistant reply after it"),
        ([(S, "s"), (U, "q"), (A, "a"), (U, "q2")],
         "message 3 (user) has no assistant reply after it"),
    ],
)
def test_role_order(pairs, expected_start):
    err = reason_of(_openai(*pairs))
    assert err.reason == "role_order"
    assert err.message.startswith(expected_start)


def test_role_order_sharegpt_two_humans():
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}
    err = reason_of(record)
    assert err.reason == "role_order" and err.message.startswith("message 1 ")


def test_role_order_explains_the_rule():
    err = reason_of(_openai((A, "a")))
    assert "user and assistant alternating" in err.message
    err = reason_of(_openai((U, "q"), (A, "a"), (U, "q")))
    assert "must end with an assistant reply" in err.message


# --------------------------------------------------------------------------- empty_reply


@pytest.mark.parametrize("empty", ["", " ", "\n\t "])
def test_empty_reply(empty):
    err = reason_of(_openai((U, "q"), (A, "a"), (U, "q2"), (A, empty)))
    assert err.reason == "empty_reply"
    assert err.message.startswith("message 3 (assistant) is empty")
    assert "remove the turn or fill the reply" in err.message


def test_empty_reply_other_formats():
    err = reason_of({"system": "s", "conversation": [{"human": "q", "assistant": "  "}]})
    assert err.reason == "empty_reply" and err.message.startswith("message 2 (assistant)")
    err = reason_of({"instruction": "i", "output": ""})
    assert err.reason == "empty_reply" and err.message.startswith("message 1 (assistant)")
    err = reason_of({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]})
    assert err.reason == "empty_reply"


def test_empty_user_message_is_allowed():
    assert roles(parse_record(_openai((U, ""), (A, "a")))) == [(U, ""), (A, "a")]


# --------------------------------------------------------------------------- no_assistant


@pytest.mark.parametrize(
    "record",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": [{"role": "system", "content": "s"}]},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]},
        {"conversations": [{"from": "human", "value": "q"}]},
        {"conversation": []},
        {"system": "s", "conversation": []},
    ],
)
def test_no_assistant(record):
    err = reason_of(record)
    assert err.reason == "no_assistant"
    assert "no assistant reply" in err.message


# --------------------------------------------------------------------------- validate_roles


def test_validate_roles_accepts_valid_layouts():
    validate_roles([Message(U, "q"), Message(A, "a")])
    validate_roles([Message(S, "s"), Message(U, "q"), Message(A, "a"), Message(U, "q"),
                    Message(A, "a")])


@pytest.mark.parametrize(
    "messages, reason, start",
    [
        ([], "no_assistant", "the conversation has no assistant reply"),
        ([Message(S, "s")], "no_assistant", "the conversation"),
        ([Message(U, "q")], "no_assistant", "the conversation"),
        ([Message(A, "a")], "role_order", "message 0 is 'assistant'"),
        ([Message(S, "s"), Message(U, "q"), Message(U, "q")], "role_order",
         "message 2 is 'user' but 'assistant' was expected"),
        ([Message(U, "q"), Message(A, "a"), Message(U, "q")], "role_order",
         "message 2 (user) has no assistant reply"),
        ([Message(S, "s"), Message(U, "q"), Message(A, "")], "empty_reply", "message 2 (assistant)"),
        # the first problem in message order is reported
        ([Message(U, "q"), Message(A, ""), Message(A, "a")], "empty_reply", "message 1"),
    ],
)
def test_validate_roles_errors(messages, reason, start):
    with pytest.raises(RecordError) as info:
        validate_roles(messages)
    assert info.value.reason == reason
    assert info.value.message.startswith(start)


def test_record_error_is_a_value_error():
    err = RecordError("x", "msg")
    assert isinstance(err, ValueError)
    assert (err.reason, err.message, str(err)) == ("x", "msg", "msg")
