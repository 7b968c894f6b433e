"""--template hf with the chat templates of the 2026 families (tests/data/chat_tokenizers.py):
DeepSeek-V3, GLM-4.5 (no end token: a reply ends where the next role tag begins), Gemma 3, and
templates that read reasoning from the content only (QwQ / DeepSeek-R1-distill style) or from
``thinking``. Proven as tests/data/test_render_hf.py proves the others: against Hugging Face's
own ``apply_chat_template(return_assistant_tokens_mask=True)`` with the templates'
``{% generation %}`` marks, through the user's path (tools/preprocess_dialog.py, --verify).
"""

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from mt_dialog.data.formats import RecordError, parse_record
from mt_dialog.data.render import RenderOptions
from mt_dialog.data.render_hf import (
    chat_template_info,
    hf_messages,
    render_prompt_with_chat_template,
    render_with_chat_template,
)
from mt_dialog.data.tokenizers import HuggingFaceTokenizer
from tests.data.chat_tokenizers import (  # noqa: F401 (fixtures)
    DEEPSEEK_V3_JINJA,
    GEMMA3_JINJA,
    GLM45_JINJA,
    GPT_OSS_JINJA,
    QWEN3_INLINE_JINJA,
    QWEN3_THINKING_JINJA,
    hf_deepseek_v3_dir,
    hf_gemma3_dir,
    hf_glm45_dir,
    hf_gpt_oss_dir,
    hf_qwen3_inline_dir,
    hf_qwen3_thinking_dir,
)
from tests.data.test_render_hf import RECORDS, preprocess, runs, stored_sequences

# fixture, marked template, the stops training records (end-of-turn first), the reasoning form
FAMILIES = {
    "deepseek_v3": ("hf_deepseek_v3_dir", DEEPSEEK_V3_JINJA, ["<｜end▁of▁sentence｜>"], None),
    "glm45": ("hf_glm45_dir", GLM45_JINJA, ["<|user|>", "<|observation|>"],
              "reasoning_content"),
    "gemma3": ("hf_gemma3_dir", GEMMA3_JINJA, ["<end_of_turn>"], None),
    "gpt_oss": ("hf_gpt_oss_dir", GPT_OSS_JINJA, ["<|return|>", "<|call|>"],
                "reasoning_content"),  # read as `thinking` (transformers 5 passes both)
    "qwen3_inline": ("hf_qwen3_inline_dir", QWEN3_INLINE_JINJA, ["<|im_end|>"], "inline"),
    "qwen3_thinking": ("hf_qwen3_thinking_dir", QWEN3_THINKING_JINJA, ["<|im_end|>"],
                       "reasoning_content"),  # transformers 5 also passes it as `thinking`
}
NO_TOOLS = {"tools", "sharegpt_tools", "parallel_calls", "reasoning"}  # records with tools
REFUSED = {**{("gemma3", name): "template_no_tools" for name in NO_TOOLS},
           ("deepseek_v3", "reasoning"): "template_no_reasoning"}


@pytest.fixture(scope="module")
def families(request):
    """name -> HuggingFaceTokenizer of each family's fixture."""
    return {name: HuggingFaceTokenizer(request.getfixturevalue(fixture))
            for name, (fixture, *_) in FAMILIES.items()}


def oracle(hf, conversation, marked, form):
    """Hugging Face's ids and generation-marked assistant runs for ``conversation``."""
    out = hf.apply_chat_template(hf_messages(conversation.messages, form or "reasoning_content"),
                                 tools=list(conversation.tools) or None, return_dict=True,
                                 chat_template=marked, return_assistant_tokens_mask=True)
    return out["input_ids"], runs(out["assistant_masks"])


@pytest.mark.parametrize("name", sorted(set(FAMILIES) - {"gpt_oss"}))
def test_trained_tokens_are_what_hugging_face_marks(families, name):
    """Every record kind: the sample is the user's ``apply_chat_template`` ids and each trained
    run is a generation-marked reply ending with one of the template's stops: the end token the
    template writes after it, or (GLM, no end token) the role tag that follows it, for the last
    reply the tag a next user turn opens with, appended. The reasoning reaches the template
    where it reads it (inline for the QwQ-style template)."""
    tokenizer = families[name]
    hf = tokenizer.hf
    _, marked, stop_texts, form = FAMILIES[name]
    info = chat_template_info(hf)
    assert info.stops == tuple(hf.convert_tokens_to_ids(t) for t in stop_texts)
    assert info.reasoning_form == (form or "reasoning_content")
    assert ("reasoning" in info.renders) == (form is not None)
    for record_name, record in RECORDS.items():
        conversation = parse_record(record)
        if (name, record_name) in REFUSED:
            with pytest.raises(RecordError) as caught:
                render_with_chat_template(conversation, hf)
            assert caught.value.reason == REFUSED[name, record_name], caught.value.message
            continue
        (sample,) = render_with_chat_template(conversation, hf)
        ids, marked_runs = oracle(hf, conversation, marked, form)
        if info.follows:  # the last reply's stop: the tag the next user message opens with
            ids = ids + [info.end_of_turn]
            marked_runs = [(a, b + 1) for a, b in marked_runs]  # + the tag after each reply
        assert sample.input_ids.tolist() == ids, record_name
        trained = [run for run, m in zip(marked_runs, [m for m in conversation.messages
                                                       if m.role == "assistant"])
                   if m.train is not False]
        assert runs(sample.loss_mask) == trained, record_name
        for a, b in trained:
            assert set(sample.loss_token_num[a:b].tolist()) == {b - a}
            assert int(sample.input_ids[b - 1]) in info.stops


def test_glm_tool_call_is_trained_with_observation_and_last_reply_with_user(families):
    """GLM: a tool-call reply is closed by <|observation|> (the results' tag), a text reply by
    <|user|>; the sample's last reply, followed by nothing in the template's text, gets
    <|user|> (what a next user turn opens with); reasoning after the last user message is kept
    in its <think> block."""
    tokenizer = families["glm45"]
    record = {"tools": RECORDS["tools"]["tools"], "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Use the tool.",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather",
                                                          "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "22"},
        {"role": "assistant", "content": "22 degrees.", "reasoning_content": "It said 22."}]}
    (sample,) = render_with_chat_template(parse_record(record), tokenizer.hf)
    texts = [tokenizer.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
    assert texts == ["\n<think>Use the tool.</think>\n<tool_call>get_weather\n<arg_key>city"
                     "</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call><|observation|>",
                     "\n<think>It said 22.</think>\n22 degrees.<|user|>"]
    assert sample.turn_ends == tuple(b for _, b in runs(sample.loss_mask))


def test_gpt_oss_trains_each_turn_in_the_sample_that_ends_with_it(families):
    """gpt-oss (harmony) closes the last reply with <|return|> and history replies with
    <|end|>: each user turn's replies are trained in the template's rendering of the
    conversation up to them (Hugging Face's ids and generation marks), ending with <|return|>
    or <|call|> as the model ends them (never <|end|>, at which serving does not stop); every
    trained reply once; the turn's analysis channel (reasoning) is in it."""
    tokenizer = families["gpt_oss"]
    hf = tokenizer.hf
    info = chat_template_info(hf)
    assert info.turn_views and not info.follows
    assert info.stops == tuple(hf.convert_tokens_to_ids(["<|return|>", "<|call|>"]))
    for record_name, record in RECORDS.items():
        conversation = parse_record(record)
        messages, trained_once = conversation.messages, Counter()
        for sample in render_with_chat_template(conversation, hf):
            ids = sample.input_ids.tolist()
            stop = next(k for k in range(1, len(messages) + 1) if oracle(
                hf, replace(conversation, messages=messages[:k]), GPT_OSS_JINJA, None)[0] == ids)
            view = replace(conversation, messages=messages[:stop])
            marked = dict(zip(oracle(hf, view, GPT_OSS_JINJA, None)[1],
                              [i for i, m in enumerate(view.messages) if m.role == "assistant"]))
            for a, b in runs(sample.loss_mask):
                trained_once[marked[(a, b)]] += 1  # KeyError: not a marked reply
                assert ids[b - 1] in info.stops
                k = marked[(a, b)]
                if messages[k].reasoning:
                    assert messages[k].reasoning in tokenizer.decode(ids[a:b])
            assert ids[-1] == hf.convert_tokens_to_ids("<|return|>" if messages[stop - 1]
                                                       .content else "<|call|>")
        expected = {i for i, m in enumerate(messages) if m.role == "assistant"
                    and m.train is not False}
        assert trained_once == Counter({i: 1 for i in expected}), record_name


def test_templates_with_end_tokens_are_not_tag_closed(families):
    """Templates that write an end token after every reply keep one stop, that token."""
    for name in ("deepseek_v3", "gemma3", "qwen3_inline"):
        info = chat_template_info(families[name].hf)
        assert not info.follows and not info.turn_views and info.stops == (info.end_of_turn,)


def test_inline_reasoning_template_trains_the_records_think_blocks(families):
    """The issue's trial: a template that reads reasoning only from a <think> block of the
    content, records with such blocks: trained (was refused "does not render reasoning"), the
    reasoning of the reply after the last user message in the trained text, exactly the
    template's own rendering of the record as written."""
    hf = families["qwen3_inline"].hf
    record = {"messages": [
        {"role": "user", "content": "What is 2 plus 2?"},
        {"role": "assistant", "content": "<think>\nAdd them.\n</think>\n\n4"},
        {"role": "user", "content": "And 3 plus 3?"},
        {"role": "assistant", "content": "<think>\nAdd again.\n</think>\n\n6"}]}
    (sample,) = render_with_chat_template(parse_record(record), hf)
    as_written = hf.apply_chat_template(record["messages"], return_dict=True)["input_ids"]
    assert sample.input_ids.tolist() == as_written
    texts = [hf.decode(sample.input_ids[a:b]) for a, b in runs(sample.loss_mask)]
    assert texts == ["4<|im_end|>", "<think>\nAdd again.\n</think>\n\n6<|im_end|>"]


def test_inline_template_no_thinking_prompt_opens_with_an_empty_block(families):
    """enable_thinking False on a template without that switch that reads reasoning inline: the
    prompt ends with the empty block the template writes for a reply without reasoning."""
    hf = families["qwen3_inline"].hf
    ask = parse_record({"messages": [{"role": "user", "content": "Hi"},
                                     {"role": "assistant", "content": "Hello"}]}).messages[:1]
    thinking = render_prompt_with_chat_template(ask, hf)
    plain = render_prompt_with_chat_template(ask, hf, enable_thinking=False)
    assert hf.decode(plain[len(thinking):]) == "<think>\n\n</think>\n\n"


@pytest.mark.parametrize("name", ["glm45", "qwen3_inline", "deepseek_v3", "gpt_oss"])
def test_preprocess_verify_and_metadata_stops(name, families, tmp_path, capsys):
    """tools/preprocess_dialog.py --template hf as a user runs it (was refused for GLM: "ends
    replies with different special tokens"): every stored sequence is the renderer's sample,
    the metadata records every stop id, --verify accepts the data."""
    from tools.inspect_dialog_dataset import main as inspect_main

    folder = FAMILIES[name][0]
    tokenizer = families[name]
    kinds = ("plain", "tools", "untrained") + (("reasoning",) if FAMILIES[name][3] else ())
    records = [RECORDS[r] for r in kinds] * 2
    code, prefix = preprocess(tmp_path, records, tokenizer.path)
    assert code == 0, capsys.readouterr().err
    special = json.loads(open(prefix + ".meta.json").read())["special_ids"]
    stops = [tokenizer.hf.convert_tokens_to_ids(t) for t in FAMILIES[name][2]]
    assert special["stops"] == stops and special["end_of_turn"] == stops[0], folder
    expected = Counter()
    for record in records:
        for sample in render_with_chat_template(parse_record(record), tokenizer.hf):
            expected[tuple(sample.input_ids.tolist())] += 1
    assert stored_sequences(prefix) == expected and len(expected) > 1
    capsys.readouterr()
    assert inspect_main([prefix, "--verify"]) == 0, capsys.readouterr().out


def test_verify_names_a_turn_that_ends_with_no_stop(families, tmp_path):
    """--verify's pack check takes every recorded stop: GLM data checked against <|user|> alone
    reports the tool-call turn closed by <|observation|>."""
    from mt_dialog.data.dataset import PackedDialogDataset
    from mt_dialog.data.inspect import _check_pack, verify_dataset

    code, prefix = preprocess(tmp_path, [RECORDS["tools"]], families["glm45"].path)
    assert code == 0 and verify_dataset(prefix) == []
    dataset = PackedDialogDataset(prefix, "train")
    stops = json.loads(open(prefix + ".meta.json").read())["special_ids"]["stops"]
    tokens, counts, lengths = dataset.raw_pack(0)
    vocab = len(families["glm45"].hf)
    assert _check_pack(tokens, counts, lengths, 1024, vocab, set(stops), "pack 0") == []
    problems = _check_pack(tokens, counts, lengths, 1024, vocab, {stops[0]}, "pack 0")
    assert len(problems) == 1 and "does not end with the end-of-turn id" in problems[0]


def test_reasoning_keep_and_per_turn_with_inline_template(families):
    """--reasoning keep refuses the inline template that drops earlier reasoning; per-turn
    trains every reply once, each reasoning where the template shows it."""
    hf = families["qwen3_inline"].hf
    conversation = parse_record(RECORDS["reasoning"])
    with pytest.raises(RecordError) as caught:
        render_with_chat_template(conversation, hf, RenderOptions(reasoning="keep"))
    assert caught.value.reason == "reasoning_dropped"
    samples = render_with_chat_template(conversation, hf, RenderOptions(reasoning="per-turn"))
    trained = "".join(hf.decode(s.input_ids[a:b]) for s in samples
                      for a, b in runs(s.loss_mask))
    for message in conversation.messages:
        if message.reasoning:
            assert message.reasoning in trained
    assert all(np.all(s.loss_token_num[:1] == 0) for s in samples)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_export_layout_check_passes(families, name):
    """The export's check (``layout_differences`` with the run's ``training_layout``): a plain
    ``AutoTokenizer.from_pretrained`` of the folder gives training's ids on the probe
    conversations, prompt and whole conversation (GLM's appended stop tag aside)."""
    from transformers import AutoTokenizer

    from mt_dialog.convert.chat_template import layout_differences, training_layout

    tokenizer = families[name]
    served = AutoTokenizer.from_pretrained(tokenizer.path)
    assert layout_differences(served, training_layout(None, tokenizer)) is None
