"""--template hf: the tokenizer's own Jinja chat template (mt_dialog/data/render_hf.py).

What is trained is proven by comparison with Hugging Face itself: each realistic test template
(tests/data/chat_tokenizers.py) is also written with ``{% generation %}`` marks around what the
model writes, and ``apply_chat_template(return_assistant_tokens_mask=True)`` with that marked
copy says which tokens are the replies; the tokenizers ship the templates without the marks, so
the renderer cannot see them. Records go through ``parse_record`` as preprocessing reads them.
"""

import json
import re
from collections import Counter

import numpy as np
import pytest

from mt_dialog.data.formats import Conversation, RecordError, parse_record
from mt_dialog.data.render import (
    RenderOptions,
    render_conversation,
    render_prompt,
    resolve_template,
)
from mt_dialog.data.render_hf import (
    chat_template_end_of_turn,
    hf_messages,
    render_prompt_with_chat_template,
    render_with_chat_template,
)
from mt_dialog.data.templates import get_template
from mt_dialog.data.tokenizers import HuggingFaceTokenizer, TokenizerError
from tests.conftest import CHATML_JINJA, openai, write_jsonl
from tests.data.chat_tokenizers import (  # noqa: F401 (fixtures)
    END_GENERATION,
    GENERATION,
    LLAMA31_JINJA,
    QWEN3_JINJA,
    QWEN25_TOOLS_JINJA,
    build_tokenizer,
    hf_llama31_dir,
    hf_qwen3_dir,
    hf_qwen25_dir,
)
from tools.preprocess_dialog import main

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def _call(city, call_id):
    return {"type": "function", "id": call_id,
            "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}


RECORDS = {
    "plain": openai(("Hello! How are you today?", "I am fine, thank you. And you?"),
                    ("Count from 1 to 10.", "1 2 3 4 5 6 7 8 9 10"),
                    ("Thanks!", "You're welcome.")),
    "system": openai(("我该如何学习编程？", "从基础开始，每天练习。\n"), ("ok", "k"),
                     system="Answer in Chinese."),
    "trailing_newline": openai(("What is the capital of France?", "Paris.\n"),
                               ("And of Spain?", "  Madrid.\n\n")),
    "untrained": {"messages": [
        {"role": "user", "content": "Capital of Spain?"},
        {"role": "assistant", "content": "Lisbon.", "weight": 0},
        {"role": "user", "content": "Are you sure?"},
        {"role": "assistant", "content": "Sorry: Madrid."}]},
    "tools": {"tools": [WEATHER], "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [_call("Paris", "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 22}"},
        {"role": "assistant", "content": "It is 22 degrees in Paris."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."}]},
    "sharegpt_tools": {"tools": json.dumps([WEATHER]), "conversations": [
        {"from": "human", "value": "Weather in Rome?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                        "arguments": {"city": "Rome"}})},
        {"from": "observation", "value": "{\"temp\": 25}"},
        {"from": "gpt", "value": "25 degrees in Rome."}]},
    "parallel_calls": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather in Paris and Zürich?"},
        {"role": "assistant", "content": "Checking both.",
         "tool_calls": [_call("Paris", "c1"), _call("Zürich", "c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": "22"},
        {"role": "tool", "tool_call_id": "c2", "content": "18"},
        {"role": "assistant", "content": "Paris 22, Zürich 18."}]},
    "reasoning": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "I need the tool.",
         "tool_calls": [_call("Paris", "c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": "22"},
        {"role": "assistant", "content": "22 degrees.", "reasoning_content": "It answered."},
        {"role": "user", "content": "Thanks!"},
        {"role": "assistant", "content": "You're welcome."}]},
}
# what each template cannot lay out: refused with this reason, never trained without it
REFUSED = {
    ("qwen25", "reasoning"): "template_no_reasoning",
    ("llama31", "reasoning"): "template_no_reasoning",
    ("llama31", "parallel_calls"): "template_error",  # "only supports single tool-calls"
}
TEMPLATES = {"qwen25": ("hf_qwen25_dir", QWEN25_TOOLS_JINJA),
             "qwen3": ("hf_qwen3_dir", QWEN3_JINJA),
             "llama31": ("hf_llama31_dir", LLAMA31_JINJA)}


@pytest.fixture(scope="module")
def tokenizers(request):
    """name -> (HuggingFaceTokenizer, the template with its generation marks)."""
    return {name: (HuggingFaceTokenizer(request.getfixturevalue(fixture)), marked)
            for name, (fixture, marked) in TEMPLATES.items()}


def runs(mask):
    """(start, stop) of each maximal run of ones."""
    padded = np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def chat_ids(hf, conversation, **kwargs):
    """``apply_chat_template`` as users call it (with the record's tools)."""
    tools = list(conversation.tools) or None
    out = hf.apply_chat_template(hf_messages(conversation.messages), tools=tools,
                                 return_dict=True, **kwargs)
    return out


def check_against_hugging_face(tokenizer, marked, conversation, sample, trained):
    """``sample`` is the user's ``apply_chat_template`` ids, and its trained tokens are exactly
    the generation-marked tokens of the messages ``trained`` (indices), each run with its length
    as loss_token_num; nothing else (system, user, tool results, untrained replies) is trained."""
    hf = tokenizer.hf
    assert sample.input_ids.tolist() == list(chat_ids(hf, conversation)["input_ids"])
    oracle = chat_ids(hf, conversation, chat_template=marked, return_assistant_tokens_mask=True)
    assert oracle["input_ids"] == sample.input_ids.tolist()
    assistant = [i for i, m in enumerate(conversation.messages) if m.role == "assistant"]
    marked_runs = runs(oracle["assistant_masks"])
    assert len(marked_runs) == len(assistant)
    expected = [run for run, k in zip(marked_runs, assistant) if k in trained]
    assert runs(sample.loss_mask) == expected and sample.turn_num == len(expected)
    end = chat_template_end_of_turn(hf)
    for start, stop in expected:
        assert set(sample.loss_token_num[start:stop].tolist()) == {stop - start}
        assert sample.input_ids[stop - 1] == end
    assert sample.loss_token_num[0] == 0
    # decoded, the trained tokens are the replies as the template writes them (text between the
    # generation marks, written out as characters) ending with the end-of-turn
    visible = marked.replace(GENERATION, "{{- '\x01' -}}").replace(END_GENERATION,
                                                                   "{{- '\x02' -}}")
    text = hf.apply_chat_template(hf_messages(conversation.messages), tokenize=False,
                                  tools=list(conversation.tools) or None, chat_template=visible)
    replies = re.findall("\x01(.*?)\x02", text, flags=re.S)
    trained_text = [tokenizer.decode(sample.input_ids[a:b]) for a, b in expected]
    assert trained_text == [reply for reply, k in zip(replies, assistant) if k in trained]
    assert all(t.endswith(hf.convert_ids_to_tokens(end)) for t in trained_text)
    trained_text = "".join(trained_text)
    for message in conversation.messages:
        if message.role != "assistant" and len(message.content) > 3:
            assert message.content.strip() not in trained_text


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_trained_tokens_are_the_replies_hugging_face_marks(tokenizers, template):
    """Every record kind with each realistic template: the trained tokens are exactly what the
    template writes for each reply in the whole conversation (reasoning as Qwen3 keeps it,
    content as Llama 3.1 trims it, tool calls as each serializes them) plus the end-of-turn."""
    tokenizer, marked = tokenizers[template]
    for name, record in RECORDS.items():
        conversation = parse_record(record)
        if (template, name) in REFUSED:
            with pytest.raises(RecordError) as info:
                render_with_chat_template(conversation, tokenizer.hf)
            assert info.value.reason == REFUSED[template, name], info.value.message
            continue
        (sample,) = render_with_chat_template(conversation, tokenizer.hf)
        trained = {i for i, m in enumerate(conversation.messages)
                   if m.role == "assistant" and m.train is not False}
        check_against_hugging_face(tokenizer, marked, conversation, sample, trained)


def test_templates_that_are_not_prefix_consistent(tokenizers):
    """What used to be refused: Qwen3 (the last reply gets a <think> block, earlier ones lose
    their reasoning) on multi-turn data, and Llama 3.1 trimming replies that end in a newline.
    The trained text is the template's rendering of the reply in the whole conversation."""
    qwen3, _ = tokenizers["qwen3"]
    conversation = parse_record(RECORDS["reasoning"])
    (sample,) = render_with_chat_template(conversation, qwen3.hf)
    texts = [qwen3.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
    assert texts[0] == "4<|im_end|>"  # reasoning before the last user message left out
    assert texts[-1] == "<think>\n\n</think>\n\nYou're welcome.<|im_end|>"
    llama, _ = tokenizers["llama31"]
    (sample,) = render_with_chat_template(parse_record(RECORDS["trailing_newline"]), llama.hf)
    texts = [llama.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
    assert texts == ["Paris.<|eot_id|>", "Madrid.<|eot_id|>"]


def test_train_on_last_and_untrained_messages(tokenizers):
    """--train-on last trains the last reply only; a weight-0 reply is context in every mode."""
    tokenizer, marked = tokenizers["qwen25"]
    for name in ("tools", "untrained"):
        conversation = parse_record(RECORDS[name])
        last = len(conversation.messages) - 1
        (sample,) = render_with_chat_template(conversation, tokenizer.hf,
                                              RenderOptions(train_on="last"))
        check_against_hugging_face(tokenizer, marked, conversation, sample, {last})


def test_reasoning_modes(tokenizers):
    """template: the Jinja's own history (one sample). keep: refused, naming the message, when
    the template drops some reasoning; accepted when it keeps all. per-turn: one sample per user
    turn with reasoning, each the template's rendering of the conversation up to that turn, every
    trained reply trained exactly once, its tokens preceded by exactly the generation prompt the
    model gets at inference for it."""
    tokenizer, marked = tokenizers["qwen3"]
    hf = tokenizer.hf
    conversation = parse_record(RECORDS["reasoning"])
    with pytest.raises(RecordError) as info:
        render_with_chat_template(conversation, hf, RenderOptions(reasoning="keep"))
    # named as every other error names a message (messages[1], as in formats.py)
    assert info.value.reason == "reasoning_dropped"
    assert info.value.message.startswith("messages[1]: --reasoning keep, but the chat template")
    single = parse_record({"messages": RECORDS["reasoning"]["messages"][2:6],
                           "tools": [WEATHER]})
    assert [s.input_ids.tolist() for s in render_with_chat_template(
        single, hf, RenderOptions(reasoning="keep"))] == \
        [s.input_ids.tolist() for s in render_with_chat_template(single, hf)]

    samples = render_with_chat_template(conversation, hf, RenderOptions(reasoning="per-turn"))
    assert len(samples) == 3  # user turns with reasoning: 1 and 2, then the last one
    messages, trained_once = conversation.messages, Counter()
    for sample in samples:
        stop = next(k + 1 for k in range(len(messages)) if chat_ids(
            hf, Conversation(messages[:k + 1], conversation.tools))["input_ids"]
            == sample.input_ids.tolist())
        view = Conversation(messages[:stop], conversation.tools)
        oracle = runs(chat_ids(hf, view, chat_template=marked,
                               return_assistant_tokens_mask=True)["assistant_masks"])
        replies = dict(zip(oracle, [i for i, m in enumerate(view.messages)
                                    if m.role == "assistant"]))
        for start, stop_token in runs(sample.loss_mask):
            k = replies[(start, stop_token)]  # KeyError: not a reply Hugging Face marks
            trained_once[k] += 1
            prompt = hf.apply_chat_template(hf_messages(messages[:k]), tools=[WEATHER],
                                            add_generation_prompt=True, return_dict=True)
            assert sample.input_ids[:start].tolist() == prompt["input_ids"]
            text = tokenizer.decode(sample.input_ids[start:stop_token])
            assert messages[k].reasoning is None or messages[k].reasoning in text
    assert trained_once == Counter({1: 1, 3: 1, 5: 1, 7: 1})


def test_generation_prompt_is_the_training_prefix(tokenizers):
    """The prompt generation builds is the prefix training put before the last reply."""
    for name in ("qwen3", "llama31"):
        tokenizer, _ = tokenizers[name]
        conversation = parse_record(RECORDS["tools"])
        (sample,) = render_with_chat_template(conversation, tokenizer.hf)
        start = runs(sample.loss_mask)[-1][0]
        prompt = render_prompt_with_chat_template(
            Conversation(conversation.messages[:-1], conversation.tools), tokenizer.hf)
        assert sample.input_ids[:start].tolist() == prompt


def test_builtin_qwen3_is_qwen3s_documented_layout(tokenizers):
    """The built-in qwen3 template lays out every kind of conversation as the Qwen3-style Jinja
    written from Qwen3's documentation (QWEN3_JINJA) does: the same ids and the same trained
    tokens as --template hf with it (themselves checked against Hugging Face's generation marks
    above), for --reasoning template and for each per-turn sample (the template's view of the
    conversation up to that sample's last reply: an empty <think> block before a final reply
    without reasoning); and the same generation prompts, with enable_thinking false too."""
    from tests.data.test_render import KINDS

    tokenizer, _ = tokenizers["qwen3"]
    hf = tokenizer.hf
    template = resolve_template(get_template("qwen3"), tokenizer)
    for kind, conversation in KINDS.items():
        for mode in ("template", "per-turn"):
            options = RenderOptions(reasoning=mode)
            ours = render_conversation(conversation, template, tokenizer.encode, options)
            theirs = render_with_chat_template(conversation, hf, options)
            assert [s.input_ids.tolist() for s in ours] == \
                [s.input_ids.tolist() for s in theirs], (kind, mode)
            assert [s.loss_token_num.tolist() for s in ours] == \
                [s.loss_token_num.tolist() for s in theirs], (kind, mode)
        messages = conversation.messages
        for k in range(1, len(messages)):
            if messages[k].role != "assistant" or messages[k - 1].role not in ("user", "tool"):
                continue
            history = Conversation(messages[:k], conversation.tools)
            for thinking in (True, False):
                prompt = hf.apply_chat_template(
                    hf_messages(history.messages), tools=list(history.tools) or None,
                    add_generation_prompt=True, enable_thinking=thinking, return_dict=True)
                assert render_prompt(history, template, tokenizer.encode,
                                     enable_thinking=thinking) == prompt["input_ids"], (kind, k)
    no_thinking = render_prompt(KINDS["replies"].messages[:1], template, tokenizer.encode,
                                enable_thinking=False)
    assert tokenizer.decode(no_thinking).endswith("assistant\n<think>\n\n</think>\n\n")


def test_refusals_name_the_cause(tokenizers, hf_tokenizer_dir, tmp_path):
    """A record is refused only when a reply cannot be located or trained as rendered, and the
    reason and message name the real cause."""
    qwen3 = tokenizers["qwen3"][0].hf
    cases = [
        (openai(("Say <|im_end|> literally.", "No.")), "special_token_in_text", "messages[0]"),
        ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hi",
                        "reasoning_content": "Use <|im_start|> here."}]},
         "special_token_in_text", "messages[1]"),
        ({"tools": [WEATHER], "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "", "tool_calls": [_call("<|im_end|>", "c")]},
            {"role": "tool", "content": "1"}, {"role": "assistant", "content": "ok"}]},
         "special_token_in_text", "messages[1]"),
    ]
    for record, reason, where in cases:
        with pytest.raises(RecordError) as info:
            render_with_chat_template(parse_record(record), qwen3)
        assert info.value.reason == reason and info.value.message.startswith(where + " ")
    # a template that ignores tools: refused, never trained without them
    plain = HuggingFaceTokenizer(hf_tokenizer_dir).hf
    with pytest.raises(RecordError) as info:
        render_with_chat_template(parse_record(RECORDS["tools"]), plain)
    assert info.value.reason == "template_no_tools" and "does not render tools" in str(info.value)
    # a tokenizer that joins the reply's opening with its first characters
    folder = build_tokenizer(hf_tokenizer_dir, str(tmp_path / "joined"), CHATML_JINJA,
                             extra_tokens=["\n "], eos_token="<|im_end|>",
                             additional_special_tokens=["<|im_start|>"])
    joined = HuggingFaceTokenizer(folder).hf
    with pytest.raises(RecordError) as info:
        render_with_chat_template(parse_record(openai(("Hi", " Hello."))), joined)
    assert info.value.reason == "reply_token_boundary" and "'\\n '" in info.value.message


def test_template_dropping_earlier_replies(hf_tokenizer_dir):
    """A template that leaves earlier replies out of the history: those replies cannot be
    trained (refused, naming the message and the way out); --train-on last trains the last."""
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    tokenizer.hf.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    conversation = parse_record(RECORDS["plain"])
    with pytest.raises(RecordError) as info:
        render_with_chat_template(conversation, tokenizer.hf)
    assert info.value.reason == "reply_not_rendered"
    assert info.value.message.startswith("messages[1]: ")
    assert "--train-on last" in info.value.message
    (sample,) = render_with_chat_template(conversation, tokenizer.hf,
                                          RenderOptions(train_on="last"))
    (start, stop), = runs(sample.loss_mask)
    assert tokenizer.decode(sample.input_ids[start:stop]) == "You're welcome.<|im_end|>"


def test_history_opened_differently_from_the_prompt(hf_tokenizer_dir):
    """A generation prompt that opens with more than the history shows (DeepSeek-R1 style:
    ``<think>\\n`` after the header): replies start after the part the history writes."""
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    tokenizer.hf.chat_template = CHATML_JINJA.replace(
        "'<|im_start|>assistant\\n' }}{% endif %}",
        "'<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    (sample,) = render_with_chat_template(parse_record(RECORDS["plain"]), tokenizer.hf)
    texts = [tokenizer.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
    assert texts == [m + "<|im_end|>" for m in ("I am fine, thank you. And you?",
                                                "1 2 3 4 5 6 7 8 9 10", "You're welcome.")]


# -- moved from test_render.py / test_tokenizers.py (the ChatML and base-model templates) ------

def test_hf_chat_template_same_as_builtin_chatml(hf_tokenizer_dir):
    """The built-in chatml template and the tokenizer's Jinja template agree token for token."""
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template("chatml"), tokenizer)
    for name in ("plain", "system", "trailing_newline"):
        conversation = parse_record(RECORDS[name])
        (via_jinja,) = render_with_chat_template(conversation, tokenizer.hf)
        (builtin,) = render_conversation(conversation, template, tokenizer.encode)
        assert np.array_equal(builtin.loss_token_num, via_jinja.loss_token_num)
        assert tokenizer.decode(builtin.input_ids) == tokenizer.decode(via_jinja.input_ids)


@pytest.mark.parametrize("fixture, end_piece", [("hf_tokenizer_dir", "<|im_end|>"),
                                                ("hf_base_chatml_dir", "<|im_end|>"),
                                                ("hf_llama3_dir", "<|eot_id|>")])
def test_hf_end_of_turn_is_the_token_after_every_reply(fixture, end_piece, request):
    """The chat template's end-of-turn is derived from its rendering, not the tokenizer's eos,
    and it is the last trained token of every reply."""
    from mt_dialog.data.render import end_of_turn_id

    tokenizer = HuggingFaceTokenizer(request.getfixturevalue(fixture))
    end = end_of_turn_id("hf", tokenizer)
    assert end == tokenizer.special_id(end_piece, allow_add=False)
    for name in ("plain", "system"):
        conversation = parse_record(RECORDS[name])
        (sample,) = render_with_chat_template(conversation, tokenizer.hf)
        replies = [m.content for m in conversation.messages if m.role == "assistant"]
        texts = [tokenizer.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
        assert [t[:-len(end_piece)].strip() for t in texts] == [r.strip() for r in replies]
        assert all(t.endswith(end_piece) for t in texts) and sample.turn_ends[-1] <= \
            sample.num_tokens


def test_hf_template_ending_replies_differently_is_refused(hf_tokenizer_dir):
    """Replies that end with different special tokens (here the second and later ones with
    <|endoftext|>) leave no single end-of-turn to train and stop at: refused before any record,
    naming both."""
    from mt_dialog.data.render import end_of_turn_id

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    tokenizer.hf.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{{ '<|endoftext|>' if loop.index > 2 and m['role'] == 'assistant' else '<|im_end|>' }}"
        "{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(TokenizerError) as info:
        end_of_turn_id("hf", tokenizer)
    assert "'<|endoftext|>'" in str(info.value) and "'<|im_end|>'" in str(info.value)


def preprocess(tmp_path, records, folder, *extra):
    prefix = str(tmp_path / "out")
    code = main(["--input", write_jsonl(tmp_path / "in.jsonl", records), "--tokenizer-type",
                 "huggingface", "--tokenizer-path", folder, "--template", "hf",
                 "--seq-length", "1024", "--output-prefix", prefix, "--split", "100,0",
                 "--no-progress", *extra])
    return code, prefix


def stored_sequences(prefix):
    from mt_dialog.data.dataset import PackedDialogDataset

    dataset, stored = PackedDialogDataset(prefix, "train"), Counter()
    for index in range(len(dataset)):
        tokens, _, lengths = dataset.raw_pack(index)
        for a, b in zip(np.cumsum(lengths) - lengths, np.cumsum(lengths)):
            stored[tuple(tokens[a:b].tolist())] += 1
    return stored


def test_preprocess_end_to_end(tmp_path, hf_qwen3_dir, capsys):
    """tools/preprocess_dialog.py --template hf --reasoning per-turn on tool and reasoning
    records (openai and sharegpt): every stored sequence is a sample of the renderer, --verify
    accepts the data, and the metadata records the template's end-of-turn."""
    from mt_dialog.data.inspect import verify_dataset

    records = [RECORDS[name] for name in ("plain", "tools", "sharegpt_tools", "reasoning")] * 3
    code, prefix = preprocess(tmp_path, records, hf_qwen3_dir, "--reasoning", "per-turn",
                              "--workers", "2")
    assert code == 0, capsys.readouterr().err
    assert verify_dataset(prefix) == []
    hf = HuggingFaceTokenizer(hf_qwen3_dir).hf
    expected = Counter()
    for record in records:
        for sample in render_with_chat_template(parse_record(record), hf,
                                                RenderOptions(reasoning="per-turn")):
            expected[tuple(sample.input_ids.tolist())] += 1
    assert stored_sequences(prefix) == expected
    special = json.loads(open(prefix + ".meta.json").read())["special_ids"]
    assert special["end_of_turn"] == hf.convert_tokens_to_ids("<|im_end|>")


@pytest.mark.parametrize("fixture, end_piece", [("hf_base_chatml_dir", "<|im_end|>"),
                                                ("hf_llama3_dir", "<|eot_id|>")])
def test_hf_template_records_the_trained_end_of_turn(fixture, end_piece, request, tmp_path,
                                                     capsys):
    """A base model's tokenizer (eos <|endoftext|> / <|end_of_text|>) with a chat template
    whose replies end with another special token: the metadata records the token training
    trained after every reply, and --verify accepts the data."""
    from tools.inspect_dialog_dataset import main as inspect_main

    folder = request.getfixturevalue(fixture)
    records = [RECORDS["plain"], RECORDS["system"]]
    code, prefix = preprocess(tmp_path, records, folder)
    assert code == 0
    special = json.loads(open(prefix + ".meta.json").read())["special_ids"]
    hf = HuggingFaceTokenizer(folder).hf
    trained_ends = set()
    for record in records:  # training's own ids: the last token of every trained reply
        (sample,) = render_with_chat_template(parse_record(record), hf)
        trained_ends |= {int(sample.input_ids[b - 1]) for _, b in runs(sample.loss_mask)}
    assert trained_ends == {special["end_of_turn"]} == {hf.convert_tokens_to_ids(end_piece)}
    assert special["eos"] == hf.eos_token_id != special["end_of_turn"]
    capsys.readouterr()
    assert inspect_main([prefix, "--verify"]) == 0, capsys.readouterr().out


def test_hf_template_needs_a_chat_template(tmp_path, hf_tokenizer_dir, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(hf_tokenizer_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    for extra in plain.glob("chat_template.*"):
        extra.unlink()
    code, _ = preprocess(tmp_path, [openai(("a", "b"))], str(plain))
    assert code == 1 and "has no chat template" in capsys.readouterr().err


def test_hf_reply_with_another_end_token_is_refused_with_its_line(tmp_path, hf_tokenizer_dir,
                                                                  capsys):
    """A template that ends some replies with another special token: the record is named by
    file:line, nothing is written."""
    template = (
        "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] -}}"
        "{%- if m['role'] == 'assistant' and 'bye' in m['content'] -%}{{- '<|endoftext|>' -}}"
        "{%- else -%}{{- '<|im_end|>' -}}{%- endif -%}{{- '\\n' -}}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}")
    folder = build_tokenizer(hf_tokenizer_dir, str(tmp_path / "tok"), template,
                             eos_token="<|endoftext|>",
                             additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    code, _ = preprocess(tmp_path, [openai(("Hi", "Hello.")),
                                    openai(("Hi", "Hello."), ("Go", "bye now"))], folder)
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'in.jsonl'}:2: conversation 2: messages[3]:" in err, err
    assert "'<|endoftext|>'" in err and "'<|im_end|>'" in err and "Traceback" not in err
    assert not list(tmp_path.glob("out*"))


def test_hf_template_refusing_a_record_is_named_not_a_traceback(tmp_path, hf_tokenizer_dir,
                                                               capsys):
    """A chat template that raises (no system role here) refuses that record by file:line."""
    template = ("{% if messages[0]['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}" + CHATML_JINJA)
    folder = build_tokenizer(hf_tokenizer_dir, str(tmp_path / "tok"), template,
                             eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"])
    code, _ = preprocess(tmp_path, [openai(("Hi", "Hello.")),
                                    openai(("Hi", "Hello."), system="Be brief.")], folder)
    err = capsys.readouterr().err
    assert code == 1 and f"{tmp_path / 'in.jsonl'}:2: conversation 2: the chat template " \
        "refuses" in err, err
    assert "System role not supported" in err and "Traceback" not in err


def _outcome(render, *args):
    try:
        return [(s.input_ids.tolist(), s.loss_token_num.tolist(), s.turn_ends)
                for s in render(*args)]
    except RecordError as exc:
        return ("refused", exc.reason, exc.message)


def test_byte_lengths_give_the_offsets_answer(tokenizers, hf_tokenizer_dir, monkeypatch,
                                              tmp_path):
    """A byte-level BPE maps characters to tokens by its tokens' byte lengths instead of the
    back-end's offsets (faster): same ids, masks and turn ends, same refusals, for every
    template, record and reasoning mode here, and for replies that do not start on a token
    boundary (the offsets path names that fault)."""
    import mt_dialog.data.render_hf as render_hf
    from mt_dialog.data.formats import Message
    from mt_dialog.data.tokenizers import ByteLevelSpans

    cases = [(parse_record(record), tokenizer.hf, RenderOptions(reasoning=mode))
             for tokenizer, _ in tokenizers.values() for record in RECORDS.values()
             for mode in ("template", "keep", "per-turn")]
    chatml = HuggingFaceTokenizer(hf_tokenizer_dir).hf
    joined = [Message("user", "Say hi"), Message("assistant", "\n\n hi there")]
    cases += [(Conversation(tuple(joined)), chatml, RenderOptions())]
    folder = build_tokenizer(hf_tokenizer_dir, str(tmp_path / "joined"), CHATML_JINJA,
                             extra_tokens=["\n "], eos_token="<|im_end|>",
                             additional_special_tokens=["<|im_start|>"])  # "\n " one token
    cases += [(parse_record(openai(("Hi", " Hello."))), HuggingFaceTokenizer(folder).hf,
               RenderOptions())]
    assert all(ByteLevelSpans.of(hf) is not None for _, hf, _ in cases)  # the fast path is taken
    fast = [_outcome(render_with_chat_template, *case) for case in cases]
    monkeypatch.setattr(render_hf, "_byte_spans", lambda hf: None)
    slow = [_outcome(render_with_chat_template, *case) for case in cases]
    assert fast == slow
    assert sum(isinstance(o, list) for o in fast) > 2 * len(RECORDS)
    assert fast[-1][:2] == ("refused", "reply_token_boundary")


def test_byte_lengths_refused_where_the_text_is_rewritten(hf_tokenizer_dir, tmp_path):
    """A normalizer (or a prefix space) rewrites the text before tokens are cut, so byte lengths
    would not locate characters: such tokenizers keep the offsets path."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    from mt_dialog.data.tokenizers import ByteLevelSpans

    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    assert ByteLevelSpans.of(hf) is not None
    hf.backend_tokenizer.normalizer = normalizers.Lowercase()
    assert ByteLevelSpans.of(hf) is None


def test_one_marked_rendering_gives_the_blanked_answer(tokenizers, hf_tokenizer_dir,
                                                       hf_base_chatml_dir, hf_llama3_dir,
                                                       monkeypatch):
    """Plain replies are located by one rendering with their contents marked instead of one
    blanked rendering each: same ids, masks, turn ends and refusals for every template, record
    and reasoning mode here (Llama 3.1 trims contents, Qwen3 rewrites the last turn, a template
    drops earlier replies, one opens the prompt with more than the history: the marked
    rendering is refused there and the blanked path answers), with fewer renderings."""
    import mt_dialog.data.render_hf as render_hf

    hfs = [tokenizer.hf for tokenizer, _ in tokenizers.values()]
    hfs += [HuggingFaceTokenizer(d).hf for d in (hf_tokenizer_dir, hf_base_chatml_dir,
                                                  hf_llama3_dir)]
    dropping, deepseek = (HuggingFaceTokenizer(hf_tokenizer_dir).hf for _ in range(2))
    dropping.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    deepseek.chat_template = CHATML_JINJA.replace(
        "'<|im_start|>assistant\\n' }}{% endif %}",
        "'<|im_start|>assistant\\n<think>\\n' }}{% endif %}")
    records = list(RECORDS.values()) + [openai(("Hi", "<think>\nno</think> ok"), ("Again", "ok")),
                                        openai(("a", "x"), ("b", "x"), ("c", "x\n"))]
    cases = [(parse_record(record), hf, RenderOptions(reasoning=mode, train_on=on))
             for hf in hfs + [dropping, deepseek] for record in records
             for mode in ("template", "keep", "per-turn") for on in ("all", "last")]
    calls = Counter()
    apply = render_hf._apply

    def counting(*args, **kwargs):
        calls["renders"] += 1
        return apply(*args, **kwargs)

    def run(case):
        calls.clear()
        return _outcome(render_with_chat_template, *case), calls["renders"]

    for hf in {id(case[1]): case[1] for case in cases}.values():
        render_hf.chat_template_info(hf)  # found once per tokenizer: not counted below
    monkeypatch.setattr(render_hf, "_apply", counting)
    marked = render_hf._marked_contents
    fast = [run(case) for case in cases]
    monkeypatch.setattr(render_hf, "_marked_contents", lambda *args: {})
    slow = [run(case) for case in cases]
    assert [o for o, _ in fast] == [o for o, _ in slow]
    assert sum(isinstance(o, list) for o, _ in fast) > len(cases) // 2
    assert all(n <= m for (_, n), (_, m) in zip(fast, slow))  # never more renderings
    assert sum(n for _, n in fast) < sum(m for _, m in slow)
    monkeypatch.setattr(render_hf, "_marked_contents", marked)
    plain = (parse_record(RECORDS["plain"]), hfs[3], RenderOptions())  # 3 plain replies:
    assert run(plain)[1] == 2  # the conversation and its marked copy are rendered, nothing else
