"""render_conversation: for every template, the trained tokens are exactly the replies plus their
end-of-turn token, and loss_token_num is the turn's length on each of its tokens."""

import numpy as np
import pytest

from mt_dialog.data.formats import Message, RecordError, parse_record
from mt_dialog.data.render import (
    render_conversation,
    render_prompt,
    render_with_chat_template,
    resolve_template,
    truncate_to_turns,
)
from mt_dialog.data.templates import TEMPLATES, get_template
from mt_dialog.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer
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


def check_rendering(rendered, messages, decode, end_of_turn):
    replies = [m.content for m in messages if m.role == "assistant"]
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
    messages = parse_record(CONVERSATIONS[index])
    rendered = render_conversation(messages, template, tokenizer.encode)
    check_rendering(rendered, messages, tokenizer.decode, template.end_of_turn)
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
    rendered = render_conversation(messages, template, tokenizer.encode)
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
    rendered = render_conversation(parse_record(CONVERSATIONS[0]), template, tokenizer.encode)
    assert rendered.input_ids[0] == base and rendered.input_ids.max() == base + 3
    assert "<|eot_id|>" in tokenizer.decode(rendered.input_ids.tolist())


def test_llama2_folds_system_into_first_user(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("llama2"), tokenizer)
    messages = parse_record(CONVERSATIONS[1])
    text = tokenizer.decode(render_conversation(messages, template, tokenizer.encode).input_ids)
    assert text.startswith("[INST] <<SYS>>\nAnswer in Chinese.\n<</SYS>>\n\n我该如何学习编程？ [/INST]")


def test_default_system_is_used_when_absent(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("plain"), tokenizer)
    ids = render_conversation(parse_record(CONVERSATIONS[3]), template, tokenizer.encode).input_ids
    assert tokenizer.decode(ids.tolist()).startswith(get_template("plain").default_system)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_prompt_is_the_training_prefix(sp_model_path, name):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template(name), tokenizer)
    messages = parse_record(CONVERSATIONS[0])
    full = render_conversation(messages, template, tokenizer.encode)
    prompt = render_prompt(messages[:-1], template, tokenizer.encode)
    first_trained = trained_runs(full)[-1][0]
    assert full.input_ids[:first_trained].tolist() == prompt


def test_truncate_keeps_whole_turns(sp_model_path):
    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template("chatml"), tokenizer)
    rendered = render_conversation(parse_record(CONVERSATIONS[0]), template, tokenizer.encode)
    first, second, third = rendered.turn_ends
    kept = truncate_to_turns(rendered, second + 1)
    assert kept.turn_ends == (first, second) and kept.num_tokens == second
    assert np.array_equal(kept.input_ids, rendered.input_ids[:second])
    assert truncate_to_turns(rendered, first - 1) is None
    assert truncate_to_turns(rendered, third).turn_ends == rendered.turn_ends


def test_hf_chat_template_mask_is_derived_and_checked(hf_tokenizer_dir):
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    end = tokenizer.special_id("<|im_end|>", allow_add=False)
    for record in CONVERSATIONS[:2] + CONVERSATIONS[3:]:
        messages = parse_record(record)
        rendered = render_with_chat_template(messages, tokenizer.hf)
        check_rendering(rendered, messages, tokenizer.decode, end)


def test_hf_chat_template_same_as_builtin_chatml(hf_tokenizer_dir):
    """The built-in chatml template and the tokenizer's Jinja template agree token for token."""
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template("chatml"), tokenizer)
    messages = parse_record(CONVERSATIONS[0])
    via_jinja = render_with_chat_template(messages, tokenizer.hf)
    builtin = render_conversation(messages, template, tokenizer.encode)
    assert builtin.loss_mask.sum() == via_jinja.loss_mask.sum()
    assert tokenizer.decode(builtin.input_ids) == tokenizer.decode(via_jinja.input_ids)


def test_hf_chat_template_refuses_special_text_in_content(hf_tokenizer_dir):
    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    with pytest.raises(RecordError) as info:
        render_with_chat_template(parse_record(CONVERSATIONS[2]), tokenizer.hf)
    assert info.value.reason == "special_token_in_text" and "message 0" in str(info.value)


def test_hf_template_mismatch_is_refused(hf_tokenizer_dir):
    """A template that rewrites history (drops earlier replies) cannot be masked by rendering:
    refused at once on the probe conversation that finds its end-of-turn."""
    from mt_dialog.data.tokenizers import TokenizerError

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    tokenizer.hf.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(TokenizerError, match="does not render prefixes of the conversation"):
        render_with_chat_template(parse_record(CONVERSATIONS[0]), tokenizer.hf)


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
    for record in CONVERSATIONS[:2] + CONVERSATIONS[3:]:
        messages = parse_record(record)
        check_rendering(render_with_chat_template(messages, tokenizer.hf), messages,
                        tokenizer.decode, end)


def test_hf_template_ending_replies_differently_is_refused(hf_tokenizer_dir):
    """Replies that end with different special tokens (here the second and later ones with
    <|endoftext|>) leave no single end-of-turn to train and stop at: refused before any record,
    naming both."""
    from mt_dialog.data.render import end_of_turn_id
    from mt_dialog.data.tokenizers import TokenizerError

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    tokenizer.hf.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
        "{{ '<|endoftext|>' if loop.index > 2 and m['role'] == 'assistant' else '<|im_end|>' }}"
        "{{ '\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(TokenizerError) as info:
        end_of_turn_id("hf", tokenizer)
    assert "'<|endoftext|>'" in str(info.value) and "'<|im_end|>'" in str(info.value)
