"""parse_record / detect_format / validate_roles: every accepted format normalizes to the same
conversation, and every problem raises RecordError with the right reason and a precise message."""

import json

import pytest

from mt_dialog.data.formats import (
    FORMATS,
    TEXT_FORMAT,
    Document,
    LOSS_LOOKALIKES,
    NOTE_EMPTY_REPLY,
    NOTE_NULL_SYSTEM,
    NOTE_TRAILING,
    SHAREGPT_ROLES,
    Conversation,
    Message,
    RecordError,
    ToolCall,
    detect_format,
    message_from_dict,
    parse_record,
    validate_prompt,
    validate_roles,
)

U, A, S, T = "user", "assistant", "system", "tool"


def roles(conversation):
    return [(m.role, m.content) for m in conversation.messages]


def reason_of(record, input_format=None, **options):
    with pytest.raises(RecordError) as info:
        parse_record(record, input_format, **options)
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
    [{}, {"content": "hello"}, {"instruction": "no output"}, {"output": "no instruction"},
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
    conversation = parse_record(record)
    assert isinstance(conversation, Conversation)
    assert all(isinstance(m, Message) for m in conversation.messages)
    assert roles(conversation) == [(S, "Be brief."), (U, "Hi"), (A, "Hello"), (U, "2+2?"),
                                   (A, "4")]
    assert conversation.tools == () and conversation.notes == ()
    assert all(m.train is None and m.reasoning is None for m in conversation.messages)
    without_system = {"messages": record["messages"][1:]}
    assert roles(parse_record(without_system)) == roles(conversation)[1:]


def test_openai_extra_keys_are_ignored_and_noted():
    record = {"messages": [{"role": "user", "content": "Hi", "name": "bob", "lang": None},
                           {"role": "assistant", "content": "Hello", "weight": 1}],
              "id": 7, "source": None}
    conversation = parse_record(record)
    assert roles(conversation) == [(U, "Hi"), (A, "Hello")]
    assert conversation.messages[1].train is True  # weight 1 is read, not ignored
    # null values are absent fields (Parquet rows carry every column)
    assert conversation.notes == ("ignored field 'id'", "ignored field 'messages[].name'")


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


@pytest.mark.parametrize("speaker", sorted(k for k, v in SHAREGPT_ROLES.items() if v == A
                                           and k != "function_call"))
def test_sharegpt_assistant_aliases(speaker):
    record = {"conversations": [{"from": "human", "value": "q"}, {"from": speaker, "value": "a"}]}
    assert roles(parse_record(record)) == [(U, "q"), (A, "a")]


def test_sharegpt_role_keyed_items_equal_openai():
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q"},
                {"role": "assistant", "content": "a", "weight": 0},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert parse_record({"conversations": messages}) == parse_record({"messages": messages})


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
    assert set(records) == set(FORMATS) - {TEXT_FORMAT}  # every conversation format
    for name, record in records.items():
        assert roles(parse_record(record)) == expected, name
        assert roles(parse_record(record, name)) == expected, name


# --------------------------------------------------------------------------- forced format


def test_forced_format_overrides_detection():
    record = {"messages": [{"role": "user", "content": "from openai"},
                           {"role": "assistant", "content": "A"}],
              "conversations": [{"from": "human", "value": "from sharegpt"},
                                {"from": "gpt", "value": "B"}]}
    assert parse_record(record).messages[0].content == "from openai"
    assert parse_record(record, "sharegpt").messages[0].content == "from sharegpt"
    assert parse_record(record, "openai").messages[0].content == "from openai"


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

PARTS = ' (or a list of text parts [{"type": "text", "text": "..."}])'


@pytest.mark.parametrize(
    "record, expected",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 42}]},
         "messages[1]: field 'content' must be a string, got int" + PARTS),
        ({"messages": [{"role": "user", "content": ["q"]}]},
         "messages[0]: field 'content' must be a string, got list" + PARTS),
        ({"messages": [{"role": "user", "content": {"text": "q"}}]},
         "messages[0]: field 'content' must be a string, got dict" + PARTS),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "tool", "content": 18}]},
         "messages[2]: field 'content' must be a string, got int" + PARTS[:-1]
         + ", or for a tool result a JSON object)"),
        ({"messages": [{"role": 1, "content": "q"}]},
         "messages[0]: field 'role' must be a string, got int"),
        ({"conversations": [{"from": "human", "value": {"text": "q"}}]},
         "conversations[0]: field 'value' must be a string, got dict" + PARTS),
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


@pytest.mark.parametrize("role", ["human", "gpt", "Assistant"])
def test_unknown_role_openai_rejects_sharegpt_names(role):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": role, "content": "a"}]}
    err = reason_of(record)
    assert err.reason == "unknown_role"
    assert repr(role) in err.message


def test_unknown_role_sharegpt():
    record = {"conversations": [{"from": "human", "value": "q"},
                                {"from": "narrator", "value": "a"}]}
    err = reason_of(record)
    assert err.reason == "unknown_role"
    assert err.message.startswith("conversations[1]: ")
    assert "'narrator'" in err.message
    assert "human" in err.message and "gpt" in err.message  # lists the accepted names


# --------------------------------------------------------------------------- role structure


def _openai(*pairs, **record):
    return {"messages": [{"role": r, "content": c} for r, c in pairs], **record}


CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        "id": "call_1"}


def _calling(content=None, calls=(CALL,)):
    return {"role": A, "content": content, "tool_calls": list(calls)}


def _tool(content="18C", **extra):
    return {"role": T, "content": content, **extra}


@pytest.mark.parametrize(
    "messages",
    [
        [(A, "Hi! How can I help?"), (U, "q"), (A, "a")],  # a leading assistant greeting
        [(S, "s"), (A, "greeting"), (U, "q"), (A, "a")],
        [(U, "q1"), (U, "q2"), (A, "a")],  # consecutive user messages
        [(U, "q"), (A, "a1"), (A, "a2")],  # consecutive assistant messages
        [(U, ""), (A, "a")],  # an empty user message
    ],
)
def test_valid_role_layouts_keep_every_message(messages):
    assert roles(parse_record(_openai(*messages))) == messages


def test_tool_results_follow_tool_calls():
    record = {"messages": [{"role": U, "content": "Weather in Paris and Rome?"},
                           _calling(calls=[CALL, {**CALL, "id": "call_2"}]),
                           _tool("18C", tool_call_id="call_1"),
                           _tool("", tool_call_id="call_2", name="get_weather"),
                           {"role": A, "content": "18C in Paris."}]}
    conversation = parse_record(record)
    assert [m.role for m in conversation.messages] == [U, A, T, T, A]
    assert [(m.tool_call_id, m.name) for m in conversation.messages[2:4]] == [
        ("call_1", None), ("call_2", "get_weather")]
    # a conversation may end with a call: the model learns to call
    ends_with_call = parse_record({"messages": record["messages"][:2]})
    assert ends_with_call.messages[-1].tool_calls and ends_with_call.notes == ()


@pytest.mark.parametrize(
    "messages, start",
    [
        ([(U, "q"), (A, "a"), (S, "s")],
         "messages[2] (system) comes after messages[0]: a system message can only be the first"),
        ([(S, "s1"), (S, "s2"), (U, "q"), (A, "a")], "messages[1] (system) comes after"),
        ([(T, "r"), (U, "q"), (A, "a")], "messages[0] (tool) opens the conversation: a tool "
         "result must follow the assistant message with the tool calls"),
        ([(U, "q"), (T, "r"), (A, "a")], "messages[1] (tool) follows messages[0] (user), which "
         "calls no tool"),
        ([(U, "q"), (A, "a"), (T, "r"), (A, "a2")], "messages[2] (tool) follows messages[1] "
         "(assistant), which calls no tool"),
    ],
)
def test_role_order_refusals_name_the_message(messages, start):
    err = reason_of(_openai(*messages))
    assert err.reason == "role_order"
    assert err.message.startswith(start)


def test_tool_calls_must_be_followed_by_their_results():
    record = {"messages": [{"role": U, "content": "q"}, _calling(),
                           {"role": U, "content": "and?"}, {"role": A, "content": "a"}]}
    err = reason_of(record)
    assert err.reason == "role_order"
    assert err.message.startswith("messages[1] (assistant) calls tools but messages[2] (user) "
                                  "follows instead of their results")
    record["messages"][2] = {"role": A, "content": "a"}
    assert reason_of(record).message.startswith("messages[1] (assistant) calls tools but "
                                                "messages[2] (assistant) follows")


def test_tool_call_id_must_answer_a_call():
    record = {"messages": [{"role": U, "content": "q"}, _calling(),
                           _tool(tool_call_id="call_9"), {"role": A, "content": "a"}]}
    err = reason_of(record)
    assert err.reason == "role_order"
    assert err.message.startswith("messages[2] (tool) answers tool_call_id 'call_9', but the "
                                  "calls of messages[1] have ids 'call_1'")
    record["messages"][1] = _calling(calls=[{"function": CALL["function"]}])  # no call ids
    assert parse_record(record).messages[2].tool_call_id == "call_9"


def test_role_order_sharegpt_names_its_items():
    record = {"system": "s", "conversations": [{"from": "human", "value": "q"},
                                               {"from": "gpt", "value": "a"},
                                               {"from": "system", "value": "late"}]}
    err = reason_of(record)
    assert err.reason == "role_order"
    assert err.message.startswith("conversations[2] (system) comes after record field 'system'")


# --------------------------------------------------------------------------- dropped, noted


def test_messages_after_the_last_trainable_reply_are_dropped_and_noted():
    conversation = parse_record(_openai((U, "q"), (A, "a"), (U, "follow-up")))
    assert roles(conversation) == [(U, "q"), (A, "a")]
    assert conversation.notes == (NOTE_TRAILING,)
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a"},
                           {"role": U, "content": "q2"},
                           {"role": A, "content": "not trained", "weight": 0}]}
    conversation = parse_record(record)
    assert roles(conversation) == [(U, "q"), (A, "a")] and conversation.notes == (NOTE_TRAILING,)


@pytest.mark.parametrize("record", [
    {"messages": [{"role": S, "content": None}, {"role": U, "content": "q"},
                  {"role": A, "content": "a"}]},
    {"conversations": [{"from": "system", "value": None}, {"from": "human", "value": "q"},
                       {"from": "gpt", "value": "a"}]},
])
def test_null_system_message_is_dropped_and_noted(record):
    conversation = parse_record(record)
    assert roles(conversation) == [(U, "q"), (A, "a")]
    assert conversation.notes == (NOTE_NULL_SYSTEM,)


@pytest.mark.parametrize("empty", ["", " ", "\n\t ", None])
def test_empty_reply_is_context_by_default(empty):
    record = _openai((U, "q"), (A, empty), (U, "q2"), (A, "a2"))
    conversation = parse_record(record)
    assert roles(conversation) == [(U, "q"), (A, empty or ""), (U, "q2"), (A, "a2")]
    assert [m.train for m in conversation.messages] == [None, False, None, None]
    assert conversation.notes == (NOTE_EMPTY_REPLY,)
    err = reason_of(record, empty_reply="error")
    assert err.reason == "empty_reply"
    assert err.message.startswith("messages[1] (assistant) is empty (no content, no tool calls); "
                                  "fill the reply or remove the turn, or pass --empty-reply "
                                  "context")


def test_last_empty_reply_leaves_the_earlier_ones_trained():
    conversation = parse_record(_openai((U, "q"), (A, "a"), (U, "q2"), (A, " ")))
    assert roles(conversation) == [(U, "q"), (A, "a")]
    assert conversation.notes == (NOTE_EMPTY_REPLY, NOTE_TRAILING)


def test_only_empty_replies_is_empty_reply():
    err = reason_of(_openai((U, "q"), (A, "")))
    assert err.reason == "empty_reply"
    assert err.message.startswith("messages[1] (assistant) is empty (no content, no tool calls) "
                                  "and no other reply can be trained; fill the reply")
    err = reason_of({"system": "s", "conversation": [{"human": "q", "assistant": "  "}]})
    assert err.reason == "empty_reply"
    assert err.message.startswith("conversation[0].assistant (assistant) is empty")
    err = reason_of({"instruction": "i", "output": ""})
    assert err.reason == "empty_reply"
    assert err.message.startswith("record field 'output' (assistant) is empty")
    err = reason_of({"conversations": [{"from": "human", "value": "q"},
                                       {"from": "gpt", "value": ""}]})
    assert err.reason == "empty_reply" and err.message.startswith("conversations[1] (assistant)")


def test_reasoning_alone_is_an_empty_reply():
    err = reason_of(_openai((U, "q"), (A, "<think>hmm</think>")))
    assert err.reason == "empty_reply"


# --------------------------------------------------------------------------- nothing to train


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


def test_no_trained_turn():
    record = {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", "weight": 0},
                           {"role": U, "content": "q2"},
                           {"role": A, "content": "a2", "loss": False}]}
    err = reason_of(record)
    assert err.reason == "no_trained_turn"
    assert "\"weight\": 0 or \"loss\": false" in err.message


# --------------------------------------------------------------------------- tool calls


def test_tool_call_arguments_as_string_are_kept_verbatim():
    """Arguments given as a JSON string (OpenAI's API) are checked by decoding them and kept as
    written: chat templates write a string as it is, so training and serving write the same
    text; given as an object, they are serialized by the template (``arguments_text`` None)."""
    as_object = {"messages": [{"role": U, "content": "Weather?"}, _calling(), _tool(),
                              {"role": A, "content": "18C."}]}
    as_string = json.loads(json.dumps(as_object))
    as_string["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city":"Paris"}'
    del as_string["messages"][1]["content"]  # content may be absent when there are calls
    first, second = parse_record(as_object), parse_record(as_string)
    assert first.messages[1] == Message(A, "", (ToolCall("get_weather", {"city": "Paris"},
                                                         "call_1"),))
    assert second.messages[1] == Message(A, "", (ToolCall("get_weather", {"city": "Paris"},
                                                          "call_1", '{"city":"Paris"}'),))
    blank = json.loads(json.dumps(as_string))
    blank["messages"][1]["tool_calls"][0]["function"]["arguments"] = " "
    assert parse_record(blank).messages[1].tool_calls[0] == ToolCall("get_weather", {}, "call_1")


@pytest.mark.parametrize("tools", [
    [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    '[{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]',
    [{"name": "get_weather", "parameters": {}}],  # a bare function is wrapped
    '[{"name": "get_weather", "parameters": {}}]',
])
def test_record_tools_list_or_json_string(tools):
    wanted = ({"type": "function", "function": {"name": "get_weather", "parameters": {}}},)
    for record in (_openai((U, "q"), (A, "a"), tools=tools),
                   {"conversations": [{"from": "human", "value": "q"},
                                      {"from": "gpt", "value": "a"}], "tools": tools}):
        assert parse_record(record).tools == wanted


@pytest.mark.parametrize("tools", [None, [], ""])
def test_no_tools(tools):
    assert parse_record(_openai((U, "q"), (A, "a"), tools=tools)).tools == ()


@pytest.mark.parametrize(
    "call, text",
    [
        ("get_weather", "tool_calls[0] must be an object"),
        ({"type": "retrieval", "function": CALL["function"]}, "type 'retrieval' is not supported"),
        ({"function": {"arguments": {}}}, "the function's 'name' must be a non-empty string"),
        ({"function": {"name": "", "arguments": {}}}, "'name' must be a non-empty string"),
        ({"function": {"name": "f"}}, "'arguments' is missing; write {}"),
        ({"function": {"name": "f", "arguments": "{city: Paris}"}},
         "'arguments' is a string but not valid JSON"),
        ({"function": {"name": "f", "arguments": "[1, 2]"}}, "'arguments' must be a JSON object"),
        ({"function": {"name": "f", "arguments": 3}}, "'arguments' must be a JSON object"),
        ({"function": {"name": "f", "arguments": {}}, "id": 7}, "'id' must be a string"),
    ],
)
def test_bad_tool_call(call, text):
    record = {"messages": [{"role": U, "content": "q"}, _calling(calls=[call]), _tool(),
                           {"role": A, "content": "a"}]}
    err = reason_of(record)
    assert err.reason == "bad_tool_call"
    assert err.message.startswith("messages[1].tool_calls[0]")
    assert text in err.message


def test_tool_calls_not_a_list():
    err = reason_of({"messages": [{"role": U, "content": "q"},
                                  {"role": A, "content": None, "tool_calls": CALL}]})
    assert err.reason == "bad_tool_call"
    assert err.message == "messages[1]: field 'tool_calls' must be a list, got dict"


@pytest.mark.parametrize(
    "tools, text",
    [
        ("[{", "field 'tools' is a string but not valid JSON"),
        ({"name": "f"}, "field 'tools' must be a list of function descriptions"),
        ([{"type": "function"}], "tools[0] must be"),
        (["f"], "tools[0] must be"),
    ],
)
def test_bad_tools(tools, text):
    err = reason_of(_openai((U, "q"), (A, "a"), tools=tools))
    assert err.reason == "bad_tools"
    assert err.message.startswith(text)


def test_sharegpt_function_call_and_observation_equal_openai():
    openai = {"messages": [{"role": S, "content": "sys"}, {"role": U, "content": "Weather?"},
                           _calling(calls=[{"function": CALL["function"]}]), _tool(),
                           {"role": A, "content": "18C.", "weight": 0},
                           {"role": U, "content": "Thanks"}, {"role": A, "content": "Welcome"}],
              "tools": [{"name": "get_weather", "parameters": {}}]}
    sharegpt = {"system": "sys", "tools": json.dumps(openai["tools"]),
                "conversations": [{"from": "human", "value": "Weather?"},
                                  {"from": "function_call",
                                   "value": json.dumps(CALL["function"])},
                                  {"from": "observation", "value": "18C"},
                                  {"from": "gpt", "value": "18C.", "loss": False},
                                  {"from": "human", "value": "Thanks"},
                                  {"from": "gpt", "value": "Welcome"}]}
    assert parse_record(sharegpt) == parse_record(openai)
    parallel = json.loads(json.dumps(sharegpt))  # several calls in one function_call
    parallel["conversations"][1]["value"] = [CALL["function"], CALL["function"]]
    parallel["conversations"].insert(3, {"from": "observation", "value": "17C"})
    assert len(parse_record(parallel).messages[2].tool_calls) == 2


def test_sharegpt_bad_function_call_value():
    record = {"conversations": [{"from": "human", "value": "q"},
                                {"from": "function_call", "value": "get_weather(Paris)"}]}
    err = reason_of(record)
    assert err.reason == "bad_tool_call"
    assert err.message.startswith("conversations[1]: 'value' is a string but not valid JSON")


def test_sharegpt_reply_then_function_call_is_one_message():
    """A gpt item right before its function_call is one assistant message (content + calls),
    as OpenAI's layout has it, not a reply ended before calling; consecutive function_call items
    are one message with parallel calls; one result each follows."""
    other = {"name": "get_time", "arguments": {"zone": "CET"}}
    sharegpt = {"conversations": [{"from": "human", "value": "Weather and time?"},
                                  {"from": "gpt", "value": "Checking.", "weight": 0},
                                  {"from": "function_call", "value": json.dumps(CALL["function"])},
                                  {"from": "function_call", "value": other},
                                  {"from": "observation", "value": "18C"},
                                  {"from": "observation", "value": "10:00"},
                                  {"from": "gpt", "value": "18C at 10:00."}]}
    openai = {"messages": [{"role": U, "content": "Weather and time?"},
                           {"role": A, "content": "Checking.", "weight": 0,
                            "tool_calls": [{"function": CALL["function"]}, {"function": other}]},
                           _tool("18C"), _tool("10:00"), {"role": A, "content": "18C at 10:00."}]}
    assert parse_record(sharegpt) == parse_record(openai)
    assert [m.role for m in parse_record(sharegpt).messages] == [U, A, T, T, A]
    sharegpt["conversations"][2]["loss"] = True  # the reply says weight 0: one reply, two answers
    err = reason_of(sharegpt)
    assert err.reason == "bad_loss_control"
    assert err.message.startswith("conversations[2] (function_call) continues the assistant "
                                  "message conversations[1], but their 'weight' / 'loss' disagree")


def test_legacy_openai_function_call_and_function_role():
    """The legacy OpenAI function calling: an assistant's function_call is one tool call and a
    "function" message (with its name) the tool's result, read the same as tool_calls / tool;
    nothing of it is noted as ignored."""
    legacy = [{"role": U, "content": "Weather?"},
              {"role": A, "content": "Let me see.",
               "function_call": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
              {"role": "function", "name": "get_weather", "content": "18C"},
              {"role": A, "content": "18C."}]
    current = [legacy[0], {"role": A, "content": "Let me see.",
                           "tool_calls": [{"function": legacy[1]["function_call"]}]},
               _tool("18C", name="get_weather"), legacy[3]]
    conversation = parse_record({"messages": legacy})
    assert conversation == parse_record({"messages": current}) and conversation.notes == ()
    assert conversation.messages[1].tool_calls == (
        ToolCall("get_weather", {"city": "Paris"}, None, '{"city": "Paris"}'),)
    assert parse_record({"conversations": legacy}) == conversation  # sharegpt role-keyed items
    assert [message_from_dict(m, "m") for m in legacy] == list(conversation.messages)  # chat
    both = [legacy[0], {**legacy[1], "tool_calls": current[1]["tool_calls"]}, *legacy[2:]]
    err = reason_of({"messages": both})
    assert err.reason == "bad_tool_call" and err.message.startswith(
        "messages[1] has both 'tool_calls' and the legacy 'function_call'; keep one of them")
    nameless = [*legacy[:2], {"role": "function", "content": "18C"}, legacy[3]]
    err = reason_of({"messages": nameless})
    assert err.reason == "missing_field" and err.message.startswith(
        "messages[2]: field 'name' is missing: a legacy 'function' message is the result")


@pytest.mark.parametrize("field, instead", [("refusal", "content"),
                                            ("reasoning", "reasoning_content"),
                                            ("thinking", "reasoning_content")])
def test_reply_text_under_another_name_is_refused(field, instead):
    """Other APIs' fields that hold reply text (OpenAI's refusal, vLLM's reasoning) change what
    is trained: refused naming the field read instead, never only noted as ignored."""
    for record, where in ((_controlled(**{field: "I cannot."}), "messages[1]"),
                          ({"conversations": [{"from": "human", "value": "q"},
                                              {"from": "gpt", "value": "a", field: "x"}]},
                           "conversations[1]")):
        err = reason_of(record)
        assert err.reason == "unsupported_reply_field"
        assert err.message == (f"{where}: field '{field}' holds text of the reply, which is "
                               f"only read from '{instead}'; move it there (or remove it)")
    assert parse_record(_controlled(**{field: None})).notes == ()  # null: absent


def test_every_call_needs_its_result_before_the_next_message():
    """Parallel calls: each call's result follows (by tool_call_id when ids are given, else by
    count) before the next user or assistant message; a conversation may end with the calls;
    the message and the call left unanswered are named."""
    time = {"type": "function", "id": "call_2", "function": {"name": "get_time", "arguments": {}}}
    head = [{"role": U, "content": "Weather and time?"}, _calling(calls=[CALL, time])]
    for after in ({"role": A, "content": "18C."}, {"role": U, "content": "Well?"}):
        err = reason_of({"messages": head + [_tool(tool_call_id="call_1"), after]})
        assert err.reason == "role_order"
        assert err.message.startswith(
            "messages[1] (assistant) makes 2 tool call(s) but the result of get_time (id "
            f"'call_2') is missing before messages[3] ({after['role']}): the results of all "
            "calls must follow them")
    answered_twice = head + [_tool(tool_call_id="call_1"), _tool(tool_call_id="call_1"),
                             {"role": A, "content": "18C."}]
    assert "the result of get_time (id 'call_2') is missing" in reason_of(
        {"messages": answered_twice}).message
    no_ids = [head[0], _calling(calls=[{"function": CALL["function"]},
                                       {"function": time["function"]}]), _tool(),
              {"role": A, "content": "18C."}]
    assert reason_of({"messages": no_ids}).message.startswith(
        "messages[1] (assistant) makes 2 tool call(s) but the result of get_time is missing")
    in_any_order = head + [_tool("10:00", tool_call_id="call_2"), _tool(tool_call_id="call_1"),
                           {"role": A, "content": "18C at 10:00."}]
    assert len(parse_record({"messages": in_any_order}).messages) == 5
    ends_with_calls = parse_record({"messages": head + [_tool(tool_call_id="call_1")]})
    assert ends_with_calls.messages[-1].tool_calls and ends_with_calls.notes == (NOTE_TRAILING,)
    prompt = [message_from_dict(m, "m") for m in head + [_tool(tool_call_id="call_1")]]
    with pytest.raises(RecordError, match=r"the result of get_time \(id 'call_2'\) is missing "
                                          "before the reply to generate"):
        validate_prompt(prompt)


@pytest.mark.parametrize("content, text", [
    ([{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Paris?"}],
     "Weather in Paris?"),
    ([{"type": "input_text", "text": "Hi"}], "Hi"), ([], ""),
])
def test_content_parts_are_joined_text(content, text):
    """Content as a list of parts (the current OpenAI / Hugging Face layout): the text parts
    joined with a space, as transformers serve joins them for text-only models."""
    for role in (S, U, A):
        parts = [{"role": U, "content": "q"}, {"role": A, "content": "a"}]
        if role == S:
            parts.insert(0, {"role": S, "content": content})
        else:
            parts[0 if role == U else 1]["content"] = content
        plain = json.loads(json.dumps(parts).replace(json.dumps(content), json.dumps(text)))
        if role == A and not text:
            continue  # an empty reply: nothing to train (checked elsewhere)
        assert parse_record({"messages": parts}) == parse_record({"messages": plain})


def test_non_text_parts_are_refused():
    image = {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}
    record = {"messages": [{"role": U, "content": [{"type": "text", "text": "What is it?"},
                                                   image]},
                           {"role": A, "content": "A cat."}]}
    err = reason_of(record)
    assert err.reason == "non_text_content"
    assert err.message.startswith('messages[0].content[1] is a "image_url" part, but only text '
                                  "parts (type text, input_text, output_text) can be trained")


@pytest.mark.parametrize("result", [{"temp": 18, "unit": "°C"}, [18, "°C"]])
def test_tool_results_given_as_json_are_serialized(result):
    """A tool result given as a JSON object or list is json.dumps(value, ensure_ascii=False),
    in every format; arguments "" mean no arguments."""
    from mt_dialog.data.formats import tool_result_text

    call = {"type": "function", "function": {"name": "now", "arguments": ""}}
    as_json = {"messages": [{"role": U, "content": "q"}, _calling(calls=[call]),
                            _tool(result), {"role": A, "content": "a"}]}
    as_text = json.loads(json.dumps(as_json))
    as_text["messages"][2]["content"] = json.dumps(result, ensure_ascii=False)
    as_text["messages"][1]["tool_calls"][0]["function"]["arguments"] = {}
    conversation = parse_record(as_json)
    assert conversation == parse_record(as_text)
    assert conversation.messages[2].content == tool_result_text(result)
    sharegpt = {"conversations": [{"from": "human", "value": "q"},
                                  {"from": "function_call", "value": call["function"]},
                                  {"from": "observation", "value": result},
                                  {"from": "gpt", "value": "a"}]}
    assert parse_record(sharegpt) == conversation


# --------------------------------------------------------------------------- reasoning


@pytest.mark.parametrize("content", ["<think>\nCheck: 2+2=4.\n</think>\n\n4",
                                     "  <think>Check: 2+2=4.</think>4"])
def test_think_block_equals_reasoning_content(content):
    inline = parse_record(_openai((U, "2+2?"), (A, content)))
    separate = {"messages": [{"role": U, "content": "2+2?"},
                             {"role": A, "content": "4", "reasoning_content": "Check: 2+2=4."}]}
    assert inline == parse_record(separate)
    assert inline.messages[1].reasoning == "Check: 2+2=4." and inline.messages[1].content == "4"
    both = json.loads(json.dumps(separate))
    both["messages"][1]["content"] = content  # both given and equal: accepted
    assert parse_record(both) == inline


def test_think_block_in_every_format():
    reply = "<think>r</think>answer"
    records = [{"conversations": [{"from": "human", "value": "q"},
                                  {"from": "gpt", "value": reply}]},
               {"conversation": [{"human": "q", "assistant": reply}]},
               {"instruction": "q", "output": reply}]
    for record in records:
        assert parse_record(record).messages[1] == Message(A, "answer", reasoning="r")


def test_reasoning_only_from_a_leading_block():
    text = "Use <think> tags like <think>this</think>."
    assert parse_record(_openai((U, "q"), (A, text))).messages[1] == Message(A, text)
    empty = parse_record(_openai((U, "q"), (A, "<think>\n\n</think>\n\nHi")))
    assert empty.messages[1] == Message(A, "Hi", reasoning="")


def test_reasoning_refusals():
    err = reason_of(_openai((U, "q"), (A, "<think>never closed")))
    assert err.reason == "bad_reasoning"
    assert err.message.startswith("messages[1]: the content starts with <think> but has no "
                                  "</think>")
    record = {"messages": [{"role": U, "content": "q"},
                           {"role": A, "content": "<think>a</think>x", "reasoning_content": "b"}]}
    err = reason_of(record)
    assert err.reason == "reasoning_conflict"
    assert err.message.startswith("messages[1]: 'reasoning_content' and the <think> block")


# --------------------------------------------------------------------------- loss control


def _controlled(**control):
    return {"messages": [{"role": U, "content": "q"}, {"role": A, "content": "a", **control},
                         {"role": U, "content": "q2"}, {"role": A, "content": "a2"}]}


@pytest.mark.parametrize("control, train", [
    ({"weight": 0}, False), ({"weight": 1}, True), ({"weight": 0.0}, False),
    ({"weight": 1.0}, True), ({"loss": False}, False), ({"loss": True}, True),
    ({"weight": 0, "loss": False}, False), ({}, None), ({"weight": None, "loss": None}, None),
])
def test_weight_and_loss_set_train(control, train):
    openai = parse_record(_controlled(**control))
    assert [m.train for m in openai.messages] == [None, train, None, None]
    sharegpt = {"conversations": [{"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a", **control},
                                  {"from": "human", "value": "q2"},
                                  {"from": "gpt", "value": "a2"}]}
    assert parse_record(sharegpt) == openai


@pytest.mark.parametrize("control, text", [
    ({"weight": 2}, "'weight' must be 0 (not trained) or 1 (trained), got 2"),
    ({"weight": 0.5}, "got 0.5; fractional or per-token weights are not supported"),
    ({"weight": "0"}, 'got "0"'),
    ({"weight": True}, "got true;"),
    ({"weight": False}, "got false;"),
    ({"weight": [0, 1]}, "got [0, 1]"),
    ({"loss": 0}, "'loss' must be true (trained) or false (not trained), got 0"),
    ({"loss": "false"}, 'got "false"'),
    ({"loss": None, "weight": None, "mask": None}, None),
    ({"weight": 1, "loss": False}, "'weight' 1 and 'loss' false disagree; keep one of them"),
])
def test_bad_loss_control(control, text):
    """Values are shown as the input spells them (JSON), never as Python's False / 'x'."""
    if text is None:  # null values are absent fields
        assert [m.train for m in parse_record(_controlled(**control)).messages] == [None] * 4
        return
    err = reason_of(_controlled(**control))
    assert err.reason == "bad_loss_control"
    assert err.message.startswith("messages[1]: ") and text in err.message


@pytest.mark.parametrize("role", [U, S, T])
def test_training_a_non_assistant_message_is_refused(role):
    messages = [{"role": U, "content": "q"}, _calling(), _tool(), {"role": A, "content": "a"}]
    index = {U: 0, S: 0, T: 2}[role]
    if role == S:
        messages.insert(0, {"role": S, "content": "s"})
    messages[index] = {**messages[index], "weight": 1}
    err = reason_of({"messages": messages})
    assert err.reason == "train_not_assistant"
    assert err.message.startswith(f"messages[{index}]: this {role} message asks to be trained")
    messages[index]["weight"] = 0  # not training it is what happens anyway: accepted
    assert parse_record({"messages": messages}).messages[index].train is False


@pytest.mark.parametrize("field", sorted(LOSS_LOOKALIKES))
def test_loss_lookalike_fields_are_refused(field):
    for record, where in ((_controlled(**{field: 0}), "messages[1]"),
                          ({**_openai((U, "q"), (A, "a")), field: [0, 1]}, "record"),
                          ({"conversations": [{"from": "human", "value": "q"},
                                              {"from": "gpt", "value": "a", field: True}]},
                           "conversations[1]")):
        err = reason_of(record)
        assert err.reason == "unsupported_loss_field"
        assert err.message.startswith(f"{where}: field '{field}' looks like loss control")
        assert "\"weight\": 0|1 or \"loss\": false|true on each message" in err.message
    assert parse_record(_controlled(**{field: None})).notes == ()  # null: absent


LOOKALIKES = ["no_train", "ignore_loss", "is_train", "should_train", "train_loss", "noTrain",
              "IgnoreLoss", "IS-TRAINABLE", "shouldtrain", "sample weight", "lossMask",
              "masking", "weighted", "Label"]


@pytest.mark.parametrize("field", LOOKALIKES)
def test_every_spelling_of_loss_control_is_refused(field):
    """Any field name with a word train / loss / mask / ignore / weight (any case, separator,
    form) is refused on a message and on a record, naming the supported spelling; names that
    only contain those letters are ignored and noted."""
    for record, where in ((_controlled(**{field: False}), "messages[1]"),
                          ({**_openai((U, "q"), (A, "a")), field: 0}, "record")):
        err = reason_of(record)
        assert err.reason == "unsupported_loss_field"
        assert err.message.startswith(f"{where}: field '{field}' looks like loss control, which "
                                      "is only read as \"weight\": 0|1 or \"loss\": false|true")


def test_names_that_only_contain_the_letters_are_noted():
    record = _controlled(constraints=["short"], gloss="x", strain="B1")
    assert parse_record(record).notes == (
        "ignored field 'messages[].constraints'", "ignored field 'messages[].gloss'",
        "ignored field 'messages[].strain'")


@pytest.mark.parametrize("record, where", [
    ({**_openai((U, "q"), (A, "a")), "weight": 0}, "record"),
    ({**_openai((U, "q"), (A, "a")), "loss": False}, "record"),
    ({"conversation": [{"human": "q", "assistant": "a", "loss": False}]}, "conversation[0]"),
    ({"instruction": "q", "output": "a", "weight": 0}, "record"),
])
def test_loss_control_outside_messages_is_refused(record, where):
    err = reason_of(record)
    assert err.reason == "unsupported_loss_field" and err.message.startswith(f"{where}: field")


def test_unknown_fields_are_noted_per_format():
    cases = [
        (_openai((U, "q"), (A, "a"), lang="en"), ("ignored field 'lang'",)),
        ({"messages": [{"role": U, "content": "q", "tool_call_id": "x"},
                       {"role": A, "content": "a", "name": "bot", "extra": 1}]},
         ("ignored field 'messages[].tool_call_id'", "ignored field 'messages[].name'",
          "ignored field 'messages[].extra'")),
        ({"conversations": [{"from": "human", "value": "q", "markdown": True},
                            {"from": "gpt", "value": "a"}], "id": "x"},
         ("ignored field 'id'", "ignored field 'conversations[].markdown'")),
        ({"conversation": [{"human": "q", "assistant": "a", "score": 3}], "category": "c"},
         ("ignored field 'category'", "ignored field 'conversation[].score'")),
        ({"instruction": "q", "output": "a", "history": []}, ("ignored field 'history'",)),
    ]
    for record, notes in cases:
        assert parse_record(record).notes == notes


# --------------------------------------------------------------------------- invalid unicode

LONE = "cut emoji \ud83d here"


@pytest.mark.parametrize("record, where", [
    (_openai((U, LONE), (A, "OK.")), "messages[0]: field 'content'"),
    (_openai((S, LONE), (U, "q"), (A, "a")), "messages[0]: field 'content'"),
    (_openai((U, "q"), (A, LONE)), "messages[1]: field 'content'"),
    ({"messages": [{"role": U, "content": "q"},
                   {"role": A, "content": "a", "reasoning_content": LONE}]},
     "messages[1]: field 'reasoning_content'"),
    ({"messages": [{"role": U, "content": "q"}, _calling(calls=[
        {"function": {"name": "f", "arguments": {"city": LONE}}}]), _tool()]},
     "messages[1].tool_calls[0]"),
    ({"messages": [{"role": U, "content": "q"}, _calling(calls=[
        {"function": {"name": "f", "arguments": '{"city": "\\ud83d"}'}}]), _tool()]},
     "messages[1].tool_calls[0]"),
    ({"messages": [{"role": U, "content": "q"}, _calling(calls=[
        {"function": {"name": LONE, "arguments": {}}}]), _tool()]}, "messages[1].tool_calls[0]"),
    ({"messages": [{"role": U, "content": "q"}, _calling(), _tool(LONE)]},
     "messages[2]: field 'content'"),
    ({"messages": [{"role": U, "content": "q"}, _calling(), _tool(name=LONE)]},
     "messages[2]: field 'name'"),
    (_openai((U, "q"), (A, "a"), tools=[{"name": "f", "description": LONE}]), "field 'tools'"),
    ({"system": LONE, "conversations": [{"from": "human", "value": "q"},
                                        {"from": "gpt", "value": "a"}]}, "record: field 'system'"),
    ({"conversations": [{"from": "human", "value": LONE}, {"from": "gpt", "value": "a"}]},
     "conversations[0]: field 'value'"),
    ({"conversation": [{"human": "q", "assistant": LONE}]}, "conversation[0]: field 'assistant'"),
    ({"instruction": "q", "input": LONE, "output": "a"}, "record: field 'input'"),
])
def test_lone_surrogate_in_any_rendered_text(record, where):
    err = reason_of(record)
    assert err.reason == "invalid_unicode"
    assert err.message.startswith(f"{where} holds a lone surrogate '\\ud83d'")
    assert "repair or remove that text" in err.message


def test_valid_surrogate_pairs_and_unread_fields_are_fine():
    assert roles(parse_record(_openai((U, "emoji \U0001F600"), (A, "ok")))) == [
        (U, "emoji \U0001F600"), (A, "ok")]
    assert parse_record(_openai((U, "q"), (A, "a"), comment=LONE)).notes == (
        "ignored field 'comment'",)


# --------------------------------------------------------------------------- validate_roles


def test_validate_roles_accepts_valid_layouts():
    validate_roles([])
    validate_roles([Message(U, "q"), Message(A, "a")])
    validate_roles([Message(S, "s"), Message(A, "hi"), Message(U, "q"), Message(U, "q"),
                    Message(A, "", (ToolCall("f", {}),)), Message(T, "r"), Message(T, "r"),
                    Message(A, "a"), Message(A, "b")])


@pytest.mark.parametrize(
    "messages, reason, start",
    [
        ([Message("bot", "x")], "unknown_role", "messages[0]: role 'bot' is not one of"),
        ([Message(U, "q"), Message(S, "s")], "role_order", "messages[1] (system) comes after"),
        ([Message(U, "q", (ToolCall("f", {}),))], "bad_tool_call",
         "messages[0] (user) has tool calls"),
        ([Message(A, "", (ToolCall("f", {}),)), Message(U, "q")], "role_order",
         "messages[0] (assistant) calls tools but messages[1] (user) follows"),
        # the first problem in message order is reported
        ([Message(T, "r"), Message(U, "q"), Message(S, "s")], "role_order", "messages[0] (tool)"),
    ],
)
def test_validate_roles_errors(messages, reason, start):
    with pytest.raises(RecordError) as info:
        validate_roles(messages)
    assert info.value.reason == reason
    assert info.value.message.startswith(start)


def test_validate_prompt_ends_with_a_user_message_or_tool_result():
    validate_prompt([Message(U, "q")])
    validate_prompt([Message(S, "s"), Message(A, "hi"), Message(U, "q")])
    validate_prompt([Message(U, "q"), Message(A, "", (ToolCall("f", {}),)), Message(T, "r")])
    for messages, last in (([], "it is empty"),
                           ([Message(U, "q"), Message(A, "a")], "messages[1] (assistant) is last")):
        with pytest.raises(RecordError) as info:
            validate_prompt(messages)
        assert info.value.message == ("the conversation must end with a user message (or a tool "
                                      f"result) to reply to, but {last}")
    with pytest.raises(RecordError, match="messages\\[0\\] \\(tool\\) opens the conversation"):
        validate_prompt([Message(T, "r")])


def test_message_from_dict_reads_openai_messages():
    assert message_from_dict(_calling(), "message 1") == Message(
        A, "", (ToolCall("get_weather", {"city": "Paris"}, "call_1"),))
    assert message_from_dict({"role": S, "content": None}, "message 0") is None
    with pytest.raises(RecordError, match="^message 2 must be an object like"):
        message_from_dict("hi", "message 2")
    with pytest.raises(RecordError, match="^message 0: field 'content' must be a string"):
        message_from_dict({"role": U, "content": 3}, "message 0")


def test_record_error_is_a_value_error():
    err = RecordError("x", "msg")
    assert isinstance(err, ValueError)
    assert (err.reason, err.message, str(err)) == ("x", "msg", "msg")


def test_generation_requests_follow_the_same_rules():
    from mt_dialog.generate import GenerationError, to_messages

    history = [{"role": S, "content": None}, {"role": U, "content": "Weather?"}, _calling(),
               _tool(tool_call_id="call_1")]
    assert to_messages(history) == [
        Message(U, "Weather?"), Message(A, "", (ToolCall("get_weather", {"city": "Paris"},
                                                         "call_1"),)),
        Message(T, "18C", tool_call_id="call_1")]
    assert to_messages([Message(A, "Hi!"), {"role": U, "content": "q"}]) == [
        Message(A, "Hi!"), Message(U, "q")]
    for bad, text in (([{"role": A, "content": "hi"}],
                       "must end with a user message (or a tool result) to reply to, but "
                       "messages[0] (assistant) is last"),
                      ([{"role": U, "content": 3}], "messages[0]: field 'content' must be a string"),
                      ([{"role": U, "content": "q"}, {"role": S, "content": "s"}],
                       "messages[1] (system) comes after messages[0]"),
                      (["hi"], "messages[0] must be an object like")):
        with pytest.raises(GenerationError) as info:
            to_messages(bad)
        assert text in str(info.value)


# -- plain-text documents (format text) ----------------------------------------------------------

@pytest.mark.parametrize("record, text_key, expected", [
    ({"text": "Once upon a time."}, "text", TEXT_FORMAT),
    ({"text": "t", "meta": {"url": "x"}}, "text", TEXT_FORMAT),
    ({"content": "t"}, "content", TEXT_FORMAT),  # --text-key content
    ({"text": "t", "messages": []}, "text", "openai"),  # a conversation key wins
    ({"text": "t", "instruction": "a", "output": "b"}, "text", "alpaca"),
    ({"text": "t", "conversation": []}, "text", "firefly"),
])
def test_text_records_are_detected(record, text_key, expected):
    assert detect_format(record, text_key) == expected


def test_text_record_becomes_a_document_with_its_other_fields_noted():
    document = parse_record({"text": "Body \u00e9 \u4e2d\u6587\n", "source": "web", "id": None})
    assert document == Document("Body \u00e9 \u4e2d\u6587\n", ("ignored field 'source'",))
    assert parse_record({"body": "x"}, "text", text_key="body") == Document("x")
    with pytest.raises(RecordError, match="keys: body.*--text-key"):
        parse_record({"body": "x"})


@pytest.mark.parametrize("record, reason, words", [
    ({"text": ""}, "empty_text", "'text' is empty"),
    ({"text": 3}, "bad_field_type", "must be a string, got int"),
    ({"text": "a\ud83d"}, "invalid_unicode", "lone surrogate"),
    ({"text": "a", "loss_mask": [1]}, "unsupported_loss_field", "'loss_mask'"),
])
def test_bad_text_records_are_refused(record, reason, words):
    with pytest.raises(RecordError) as info:
        parse_record(record, "text")
    assert info.value.reason == reason and words in info.value.message
