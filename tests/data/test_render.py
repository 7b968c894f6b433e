"""render_conversation: for every template, the trained tokens are exactly the replies plus their
end-of-turn token, and loss_token_num is the turn's length on each of its tokens."""

import json
from dataclasses import replace

import numpy as np
import pytest

from mt_dialog.data.formats import Conversation, Message, RecordError, ToolCall, parse_record
from mt_dialog.data.render import (
    RenderOptions,
    render_conversation,
    render_prompt,
    resolve_template,
    truncate_to_turns,
)
from mt_dialog.data.templates import TEMPLATES, get_template
from mt_dialog.data.tokenizers import SentencePieceTokenizer
from tests.conftest import openai

CONVERSATIONS = [
    openai(("Hello! How are you today?", "I am fine, thank you. And you?"),
           ("Count from 1 to 10.", "1 2 3 4 5 6 7 8 9 10"),
           ("Thanks!", "You're welcome.")),
    openai(("我该如何学习编程？", "从基础开始，每天练习。"), system="Answer in Chinese."),
    openai(("Say <|im_end|> and </s> literally.", "<|im_end|> and </s>"),
           ("What is {content}?", "A {placeholder}, not a field.")),
    openai(("ok", "k")),
]


def trained_runs(rendered):
    """(start, stop) of each maximal run of trained tokens."""
    mask = rendered.loss_mask.astype(bool)
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append((start, i))
            start = None
    return runs


def check_rendering(rendered, messages, decode, end_of_turn, name=None):
    """The trained runs decode to the replies (the final one as ``name``'s documented layout
    writes it: Qwen3's empty <think> block before it)."""
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    replies = [documented_reply(name, m, True, i == last) if name else m.content
               for i, m in enumerate(messages) if m.role == "assistant"]
    runs = trained_runs(rendered)
    assert len(runs) == len(replies) == rendered.turn_num
    for (start, stop), reply in zip(runs, replies):
        ids = rendered.input_ids[start:stop].tolist()
        assert ids[-1] == end_of_turn
        assert decode(ids[:-1]).strip() == reply.strip()
        assert set(rendered.loss_token_num[start:stop].tolist()) == {stop - start}
    untrained = rendered.loss_token_num[~rendered.loss_mask.astype(bool)]
    assert np.all(untrained == 0)
    assert rendered.loss_token_num[0] == 0  # the first token is never a target
    assert rendered.turn_ends[-1] == rendered.num_tokens
    for (start, stop), end in zip(runs, rendered.turn_ends):
        assert stop <= end


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_masked_tokens_are_exactly_the_replies(sp_model_path, name, index):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template(name), tokenizer)
    messages = parse_record(CONVERSATIONS[index]).messages
    (rendered,) = render_conversation(messages, template, tokenizer.encode)
    check_rendering(rendered, messages, tokenizer.decode, template.end_of_turn, name)
    # the reply text is tokenized as text: no special id ever comes out of message content
    specials = {tokenizer.bos_id, tokenizer.eos_id, *tokenizer.added_tokens.values()}
    specials |= {tokenizer.special_id(p) for p in ("<|im_start|>", "<|im_end|>")}
    for start, stop in trained_runs(rendered):
        assert not specials & set(rendered.input_ids[start:stop - 1].tolist())


def test_exact_chatml_layout(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("chatml"), tokenizer)
    start, end = tokenizer.special_id("<|im_start|>"), tokenizer.special_id("<|im_end|>")
    assert (start, end) == (3, 4)  # control symbols of the fixture model, found, not appended
    messages = [Message("user", "Hi"), Message("assistant", "Yo")]
    (rendered,) = render_conversation(messages, template, tokenizer.encode)
    enc = tokenizer.encode
    expected = ([start] + enc("user\nHi") + [end] + enc("\n") + [start] + enc("assistant\n")
                + enc("Yo") + [end] + enc("\n"))
    assert rendered.input_ids.tolist() == expected
    n = len(enc("Yo")) + 1
    close = len(enc("\n"))
    assert rendered.loss_token_num.tolist() == [0] * (len(expected) - n - close) + [n] * n + [0] * close


def test_missing_special_tokens_are_appended_by_id(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    base = tokenizer.vocab_size
    template = resolve_template(get_template("llama3"), tokenizer)
    assert tokenizer.added_tokens == {
        "<|begin_of_text|>": base, "<|start_header_id|>": base + 1,
        "<|end_header_id|>": base + 2, "<|eot_id|>": base + 3}
    assert tokenizer.vocab_size == base + 4
    assert template.end_of_turn == base + 3
    (rendered,) = render_conversation(parse_record(CONVERSATIONS[0]), template, tokenizer.encode)
    assert rendered.input_ids[0] == base and rendered.input_ids.max() == base + 3
    assert "<|eot_id|>" in tokenizer.decode(rendered.input_ids.tolist())


def test_llama2_folds_system_into_first_user(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("llama2"), tokenizer)
    messages = parse_record(CONVERSATIONS[1]).messages
    text = tokenizer.decode(render_conversation(messages, template, tokenizer.encode)[0].input_ids)
    assert text.startswith("[INST] <<SYS>>\nAnswer in Chinese.\n<</SYS>>\n\n我该如何学习编程？ [/INST]")


def test_default_system_is_used_when_absent(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("plain"), tokenizer)
    (rendered,) = render_conversation(parse_record(CONVERSATIONS[3]), template, tokenizer.encode)
    ids = rendered.input_ids
    assert tokenizer.decode(ids.tolist()).startswith(get_template("plain").default_system)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_the_training_prefix(sp_model_path, name):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template(name), tokenizer)
    messages = parse_record(CONVERSATIONS[0]).messages
    (full,) = render_conversation(messages, template, tokenizer.encode)
    prompt = render_prompt(messages[:-1], template, tokenizer.encode)
    first_trained = trained_runs(full)[-1][0]
    assert full.input_ids[:first_trained].tolist() == prompt


def test_truncate_keeps_whole_turns(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("chatml"), tokenizer)
    (rendered,) = render_conversation(parse_record(CONVERSATIONS[0]), template, tokenizer.encode)
    first, second, third = rendered.turn_ends
    kept = truncate_to_turns(rendered, second + 1)
    assert kept.turn_ends == (first, second) and kept.num_tokens == second
    assert np.array_equal(kept.input_ids, rendered.input_ids[:second])
    assert truncate_to_turns(rendered, first - 1) is None
    assert truncate_to_turns(rendered, third).turn_ends == rendered.turn_ends


# --------------------------------------------------------------------------- what is trained

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _calls(*cities):
    return tuple(ToolCall("get_weather", {"city": city}, f"call_{i}")
                 for i, city in enumerate(cities))


def _user(text):
    return Message("user", text)


def _reply(text, calls=(), reasoning=None, train=None):
    return Message("assistant", text, calls, reasoning, train)


KINDS = {
    "replies": Conversation((_user("Hi"), _reply("Hello!"), _user("2+2?"), _reply("4"))),
    "greeting, consecutive users": Conversation((
        _reply("Welcome! Ask me anything."), _user("Hi"), _user("Are you there?"),
        _reply("Yes."))),
    "untrained": Conversation((
        Message("system", "Be brief."), _user("Capital of Spain?"), _reply("Madrid.", train=False),
        _user("And Portugal?"), _reply("Lisbon."))),
    "empty reply": Conversation((_user("Hi"), _reply(""), _user("Hello?"), _reply("Here."))),
    "tool calls": Conversation((
        _user("Weather in Paris and Zürich?"), _reply("", _calls("Paris", "Zürich")),
        Message("tool", '{"temp": 22}', tool_call_id="call_0"),
        Message("tool", '{"temp": 18}', tool_call_id="call_1"),
        _reply("Paris 22°C, Zürich 18°C.")), (WEATHER,)),
    "call after content": Conversation((
        Message("system", "Be brief."), _user("Weather in Rome?"),
        _reply("Let me check.", _calls("Rome")), Message("tool", "sunny", name="get_weather"),
        _reply("Sunny."), _user("Thanks!"), _reply("You're welcome.")), (WEATHER,)),
    "reasoning": Conversation((
        _user("2+2?"), _reply("4", reasoning="Add two and two."), _user("Times 3?"),
        _reply("12", reasoning="4 x 3 = 12.\nEasy."))),
    "tools and reasoning": Conversation((
        _user("Weather in Oslo?"), _reply("", _calls("Oslo"), "I need the tool."),
        Message("tool", "-3C"), _reply("It is -3°C.", reasoning="The tool answered."),
        _user("Thanks"), _reply("Anytime."), _user("And Bergen?"),
        _reply("", _calls("Bergen"), "Call again."), Message("tool", "4C"),
        _reply("4°C.", reasoning=""))),
}
MODES = [RenderOptions(reasoning=mode) for mode in ("template", "keep", "per-turn")]
MODES.append(RenderOptions(train_on="last"))


def documented_reply(name, message, shown, final):
    """A trained reply as the template's documented layout writes it: Hermes <tool_call> JSON
    (chatml, qwen3), Llama 3.1 JSON calls with "parameters" (llama3), Qwen3 <think> blocks where
    the reasoning is ``shown`` (its reasoning, or an empty block for the ``final`` message)."""
    text = message.content
    for call in message.tool_calls:
        arguments = json.dumps(call.arguments, ensure_ascii=False)
        one = (f'{{"name": "{call.name}", "parameters": {arguments}}}' if name == "llama3" else
               f'<tool_call>\n{{"name": "{call.name}", "arguments": {arguments}}}\n</tool_call>')
        text = f"{text}\n{one}" if text else one
    if name == "qwen3" and shown and (message.reasoning or final):
        text = f"<think>\n{message.reasoning or ''}\n</think>\n\n{text}"
    return text


def sample_finals(messages, options, trained):
    """The message each sample ends with (its final message): the last trained reply; with
    --reasoning per-turn one per user turn whose trained replies reason (and the last turn),
    each sample training the turns since the previous one."""
    if options.reasoning != "per-turn":
        return {max(trained)}
    turn = np.cumsum([m.role == "user" for m in messages]).tolist()
    thinking = {turn[i] for i, m in enumerate(messages) if m.reasoning is not None}
    closing = {turn[i] for i in trained} & thinking | {turn[-1]}
    return {max(i for i in trained if turn[i] <= c) for c in closing}


def expected_turns(name, conversation, options):
    """(message index, trained text) of every message the run trains, in order."""
    messages = conversation.messages
    last = max(i for i, m in enumerate(messages) if m.role == "assistant")
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    trained = []
    for i, m in enumerate(messages):
        run_trains = options.train_on == "all" or i == last
        if m.role != "assistant" or not (m.train if m.train is not None else run_trains):
            continue
        shown = name == "qwen3" and (options.reasoning != "template" or i > last_user)
        if m.content.strip() or m.tool_calls or (shown and (m.reasoning or "").strip()):
            trained.append((i, shown))
    finals = sample_finals(messages, options, [i for i, _ in trained])
    return [(i, documented_reply(name, messages[i], shown, i in finals)) for i, shown in trained]


def split_turns(rendered, end_of_turn):
    """(start, stop) of each trained turn: trained tokens cut after each end-of-turn."""
    turns, start = [], None
    for i, (count, token) in enumerate(zip(rendered.loss_token_num.tolist(),
                                           rendered.input_ids.tolist())):
        if count and start is None:
            start = i
        if count and token == end_of_turn:
            turns.append((start, i + 1))
            start = None
    return turns


def check_trained(name, conversation, options, samples, template, tokenizer):
    """Decoding each sample's trained tokens gives exactly the trained messages as documented
    plus the end-of-turn; nothing else is trained or counted; each turn is trained once, after
    the generation prompt of its history where the mode trains the inference view."""
    expected = expected_turns(name, conversation, options)
    found = []
    for sample in samples:
        turns = split_turns(sample, template.end_of_turn)
        assert sample.turn_num == len(turns) and sample.turn_ends[-1] == sample.num_tokens
        assert sample.loss_token_num[0] == 0
        assert sample.num_loss_tokens == sum(stop - start for start, stop in turns)
        for start, stop in turns:
            assert set(sample.loss_token_num[start:stop].tolist()) == {stop - start}
            found.append((sample, start, tokenizer.decode(sample.input_ids[start:stop - 1])))
    assert [text for _, _, text in found] == [text for _, text in expected], (name, options)
    messages = conversation.messages
    last_user = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    for (sample, start, _), (k, _) in zip(found, expected):
        inference_view = options.reasoning != "template" or k > last_user
        if inference_view and k and messages[k - 1].role in ("user", "tool"):
            history = Conversation(messages[:k], conversation.tools)
            view = RenderOptions(reasoning="keep" if options.reasoning == "keep" else "template")
            prompt = render_prompt(history, template, tokenizer.encode, view)
            assert sample.input_ids[:start].tolist() == prompt, (name, options, k)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_every_kind_trains_exactly_its_replies(sp_model_path, name):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template(name), tokenizer)
    for kind, conversation in KINDS.items():
        uses_tools = any(m.role == "tool" or m.tool_calls for m in conversation.messages)
        thinks = any(m.reasoning for m in conversation.messages)
        # llama2 puts nothing before a reply that opens the conversation: it cannot be trained
        opens = (conversation.messages[0].role == "assistant" and not template.prefix
                 and not template.assistant_open)
        for options in MODES:
            refusal = ("template_no_tools" if uses_tools and template.tools is None else
                       "template_no_reasoning" if thinks and template.reasoning is None else
                       "role_order" if opens and options.train_on == "all" else None)
            if refusal:
                with pytest.raises(RecordError) as info:
                    render_conversation(conversation, template, tokenizer.encode, options)
                assert info.value.reason == refusal and f"--template {name}" in str(info.value)
                if refusal != "role_order":
                    assert "qwen3" in str(info.value)  # the template to use instead
                continue
            samples = render_conversation(conversation, template, tokenizer.encode, options)
            check_trained(name, conversation, options, samples, template, tokenizer)


def test_per_turn_gives_one_sample_per_user_turn_with_reasoning(sp_model_path):
    """Turns 1 and 3 reason, turn 2 does not: two samples; turn 2 is trained in the second one
    (its view has no reasoning to leave out); every turn is trained exactly once; "template"
    and "keep" give one sample with the same turns."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("qwen3"), tokenizer)
    conversation = Conversation((
        _user("2+2?"), _reply("4", reasoning="Add."), _user("Thanks"), _reply("Welcome."),
        _user("3+3?"), _reply("6", reasoning="Add again.")))
    count = {}
    for mode in ("template", "keep", "per-turn"):
        samples = render_conversation(conversation, template, tokenizer.encode,
                                      RenderOptions(reasoning=mode))
        count[mode] = [s.turn_num for s in samples]
    assert count == {"template": [3], "keep": [3], "per-turn": [1, 2]}


def test_errors_name_messages_as_formats_does(sp_model_path):
    """Refusals name a message the one way formats.py and render_hf.py do: messages[i]."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    cases = [("plain", KINDS["tool calls"], "messages[1] is a tool call, but --template plain "
                                            "has no layout for tools"),
             ("chatml", KINDS["reasoning"], "messages[1] has reasoning, but --template chatml"),
             ("llama2", KINDS["greeting, consecutive users"],
              "messages[0]: --template llama2 has nothing before a reply")]
    for name, conversation, start in cases:
        template = resolve_template(get_template(name), tokenizer)
        with pytest.raises(RecordError) as info:
            render_conversation(conversation, template, tokenizer.encode)
        assert info.value.message.startswith(start), info.value.message


def test_run_and_message_control_what_is_trained(sp_model_path):
    """--train-on last trains the last reply only, a message's own train=True still trains it;
    a conversation with nothing to train is refused, naming why; bad options name the choices."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("chatml"), tokenizer)
    messages = (_user("a?"), _reply("A", train=True), _user("b?"), _reply("B"), _user("c?"),
                _reply("C"))
    (last,) = render_conversation(messages, template, tokenizer.encode,
                                  RenderOptions(train_on="last"))
    texts = [tokenizer.decode(last.input_ids[a:b - 1]) for a, b in split_turns(
        last, template.end_of_turn)]
    assert texts == ["A", "C"]
    untrained = tuple(replace(m, train=False) if m.role == "assistant" else m for m in messages)
    with pytest.raises(RecordError) as info:
        render_conversation(untrained, template, tokenizer.encode)
    assert info.value.reason == "no_trained_turn" and "weight 0" in str(info.value)
    with pytest.raises(RecordError, match="not the last one"):
        render_conversation((_user("a?"), _reply("A"), _user("b?"), _reply("")), template,
                            tokenizer.encode, RenderOptions(train_on="last"))
    with pytest.raises(ValueError, match="--reasoning 'all' is not one of template, keep, "
                                         "per-turn"):
        RenderOptions(reasoning="all")
    with pytest.raises(ValueError, match="--train-on 'first' is not one of all, last"):
        RenderOptions(train_on="first")


def _text_with_specials(ids, tokenizer):
    """Decoded ids, special tokens shown by their pieces (SentencePiece hides control tokens)."""
    from mt_dialog.data.inspect import _decode_visible

    return _decode_visible(list(ids), tokenizer, tokenizer.special_ids()
                           | set(tokenizer.added_tokens.values()))


def test_tool_layouts_as_documented(sp_model_path):
    """Hermes (chatml): the tools as JSON lines in <tools></tools> after the system text with
    the instructions, consecutive results in one user turn; Llama 3.1 (llama3): the tools as
    indented JSON in the system message, one ipython turn per result."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    conversation = KINDS["tool calls"]
    tools_json = json.dumps(WEATHER, ensure_ascii=False)
    hermes = resolve_template(get_template("chatml"), tokenizer)
    (sample,) = render_conversation(conversation, hermes, tokenizer.encode)
    text = _text_with_specials(sample.input_ids, tokenizer)
    assert text.startswith(
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML "
        f"tags:\n<tools>\n{tools_json}\n</tools>\n\nFor each function call, return a json object "
        "with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>"
        '\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Paris and Zürich?<|im_end|>\n")
    assert ('</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n{"temp": 22}\n'
            '</tool_response>\n<tool_response>\n{"temp": 18}\n</tool_response><|im_end|>\n'
            "<|im_start|>assistant\n") in text
    llama3 = resolve_template(get_template("llama3"), tokenizer)
    with_system = replace(conversation,
                          messages=(Message("system", "Be brief."),) + conversation.messages)
    (sample,) = render_conversation(with_system, llama3, tokenizer.encode)
    text = _text_with_specials(sample.input_ids, tokenizer)
    indented = json.dumps(WEATHER, ensure_ascii=False, indent=4)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                           "Be brief.\n\nYou have access to the following functions.")
    assert f"Do not use variables.\n\n{indented}<|eot_id|>" in text
    assert ("<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 22}<|eot_id|>"
            "<|start_header_id|>ipython<|end_header_id|>\n\n{\"temp\": 18}<|eot_id|>") in text


def test_prompt_after_tool_results_is_the_training_prefix(sp_model_path):
    """An agent's next step: the prompt after tool results is the training layout up to the
    reply that follows them (the qwen3 reasoning of the same user turn kept, as trained)."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    for name in ("chatml", "qwen3", "llama3"):
        template = resolve_template(get_template(name), tokenizer)
        conversation = KINDS["tools and reasoning" if name == "qwen3" else "tool calls"]
        full = render_conversation(conversation, template, tokenizer.encode)[-1]
        last_tool = max(i for i, m in enumerate(conversation.messages) if m.role == "tool")
        history = replace(conversation, messages=conversation.messages[:last_tool + 1])
        prompt = render_prompt(history, template, tokenizer.encode)
        start = split_turns(full, template.end_of_turn)[-1][0]
        assert full.input_ids[:start].tolist() == prompt, name
    with pytest.raises(ValueError, match="must end with a user message or a tool result"):
        render_prompt(KINDS["replies"], template, tokenizer.encode)


@pytest.mark.parametrize("name, key", [("chatml", "arguments"), ("qwen3", "arguments"),
                                       ("llama3", "parameters")])
def test_string_arguments_are_trained_as_written(sp_model_path, name, key):
    """A call whose arguments came as a JSON string is trained with that text (the exported
    Jinja template writes a string as it is too); an object is serialized as ``tojson`` does."""
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template(name), tokenizer)
    for arguments, written in (('{"city":"Paris"}', '{"city":"Paris"}'),
                               ({"city": "Paris"}, '{"city": "Paris"}')):
        record = {"tools": [WEATHER], "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"type": "function", "function": {"name": "get_weather",
                                                  "arguments": arguments}}]}]}
        (rendered,) = render_conversation(parse_record(record), template, tokenizer.encode)
        trained = rendered.input_ids[rendered.loss_token_num > 0]
        text = tokenizer.decode(trained.tolist())
        assert f'{{"name": "get_weather", "{key}": {written}}}' in text, text


# -- plain-text documents -------------------------------------------------------------------------

def test_document_is_prefix_text_eos_every_token_trained_but_the_first(sp_model_path):
    from mt_dialog.data.formats import Document, RecordError
    from mt_dialog.data.render import render_document

    tokenizer = SentencePieceTokenizer(sp_model_path)
    text = "The capital of France is Paris. \u65e9\u4e0a\u597d"
    prefix = tokenizer.document_prefix()
    assert prefix == [tokenizer.bos_id]  # SentencePiece: its BOS, as Llama puts it
    rendered = render_document(Document(text), tokenizer.encode, prefix, tokenizer.eos_id)
    ids = rendered.input_ids.tolist()
    assert ids == [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
    n = len(ids)
    assert rendered.loss_token_num.tolist() == [0] + [n - 1] * (n - 1)
    assert rendered.turn_num == 1 and rendered.num_loss_tokens == n - 1
    trained = rendered.input_ids[rendered.loss_mask.astype(bool)].tolist()
    assert tokenizer.decode(trained[:-1]) == text and trained[-1] == tokenizer.eos_id
    no_bos = render_document(Document("x"), tokenizer.encode, [], tokenizer.eos_id)
    assert no_bos.loss_token_num.tolist()[0] == 0  # no BOS: the first text token is untrained
    with pytest.raises(RecordError, match="no eos"):
        render_document(Document("x"), tokenizer.encode, [], None)


@pytest.mark.parametrize("length", [2, 9, 10, 11, 21, 30, 31])
@pytest.mark.parametrize("max_tokens", [2, 3, 4, 10])
def test_split_pieces_reassemble_to_the_document(length, max_tokens):
    """Every id of the document but its first is trained exactly once, in order: the pieces'
    trained ids joined are the document's ids after its first; each later piece's untrained
    first id is the last id of the piece before (the overlap of one)."""
    from mt_dialog.data.render import document_piece, split_document

    document = document_piece(list(range(100, 100 + length)))
    pieces = split_document(document, max_tokens)
    ids = document.input_ids.tolist()
    trained = [t for p in pieces for t, n in zip(p.input_ids.tolist(), p.loss_token_num) if n]
    assert trained == ids[1:]
    assert pieces[0].input_ids[0] == ids[0]
    for before, after in zip(pieces, pieces[1:]):
        assert after.input_ids[0] == before.input_ids[-1]
    assert all(2 <= p.num_tokens <= max_tokens for p in pieces)
    assert len(pieces) == max(1, -(-(length - 1) // (max_tokens - 1)))  # no piece wasted
    for piece in pieces:  # each its own unit: one turn, all trained but its first token
        n = piece.num_tokens
        assert piece.loss_token_num.tolist() == [0] + [n - 1] * (n - 1)
    assert all(p.num_tokens == max_tokens for p in pieces[:-1])  # cut pieces fill their pack
    if length > 1:  # pieces of 1 token cannot train: refused, never a lost token
        with pytest.raises(RecordError, match="--seq-length 2 or more"):
            split_document(document, 1)

