"""Built-in templates as Jinja: the exported tokenizer renders exactly training's text, and with a
byte-level BPE tokenizer exactly training's token ids."""

import os
import shutil

import pytest

from mt_dialog.convert.chat_template import (
    PROBES,
    as_read,
    chat_template_ids,
    hf_messages,
    jinja_chat_template,
    layout_differences,
    probes_for,
    training_layout,
)
from mt_dialog.convert.hf_checkpoint import (
    ExportedTokenizer,
    _add_appended,
    _attach_chat_template,
    _hf_tokenizer,
)
from mt_dialog.data.render import (
    RenderOptions,
    render_conversation,
    render_prompt,
    resolve_template,
)
from mt_dialog.data.templates import get_template
from mt_dialog.data.formats import Conversation
from mt_dialog.data.tokenizers import HuggingFaceTokenizer, SentencePieceTokenizer

pytest.importorskip("transformers")
BUILT_IN = ["chatml", "qwen3", "llama2", "llama3", "alpaca", "plain", "firefly"]
WITH_TOOLS = ["chatml", "qwen3", "llama3"]


def _symbolic_text(ids_with_text, token_text) -> str:
    return "".join(token_text(p) if isinstance(p, int) else p for p in ids_with_text)


@pytest.fixture(scope="module")
def sp_pair(sp_model_path, tmp_path_factory):
    """(our SentencePiece tokenizer, folder holding it as a Hugging Face LlamaTokenizer)."""
    folder = tmp_path_factory.mktemp("sp_hf")
    shutil.copy(sp_model_path, os.path.join(folder, "tokenizer.model"))
    return sp_model_path, str(folder)


@pytest.mark.parametrize("name", BUILT_IN)
def test_jinja_renders_the_training_text(name, sp_pair):
    from transformers import LlamaTokenizer

    tokenizer = SentencePieceTokenizer(sp_pair[0])
    template = resolve_template(get_template(name), tokenizer)  # may append special tokens
    hf = LlamaTokenizer.from_pretrained(sp_pair[1])
    _add_appended(hf, tokenizer.added_tokens)
    text_of = lambda token: hf.convert_ids_to_tokens(int(token))  # noqa: E731
    hf.chat_template = jinja_chat_template(template, text_of)
    as_text = lambda s: [s]  # noqa: E731  render with text pieces instead of ids
    for probe in PROBES:
        dicts = [{"role": m.role, "content": m.content} for m in probe]
        expected = _symbolic_text(render_prompt(list(probe), template, as_text), text_of)
        assert hf.apply_chat_template(dicts, tokenize=False, add_generation_prompt=True) == expected
        # the whole conversation: the prompt, the reply (after Qwen3's empty think block: the
        # final reply, without reasoning), end of turn, the closing pieces
        think = "<think>\n\n</think>\n\n" if name == "qwen3" else ""
        reply = [think + "Sure.", template.end_of_turn, *template.assistant_close]
        assert hf.apply_chat_template(dicts + [{"role": "assistant", "content": "Sure."}],
                                      tokenize=False) == expected + _symbolic_text(reply, text_of)
    for probe, _ in probes_for(template):  # tools, calls, results, reasoning where laid out
        # training reads what users pass to apply_chat_template as chat does (as_read)
        expected = _symbolic_text(render_prompt(as_read(probe), template, as_text), text_of)
        tools = {"tools": list(probe.tools)} if probe.tools else {}
        assert hf.apply_chat_template(hf_messages(probe.messages), tokenize=False,
                                      add_generation_prompt=True, **tools) == expected


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_byte_level_tokenizer_reproduces_training_ids(name, hf_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template(name), tokenizer)
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    _add_appended(hf, tokenizer.added_tokens)
    hf.chat_template = jinja_chat_template(
        template, lambda token: hf.convert_ids_to_tokens(int(token)))
    assert layout_differences(hf, training_layout(template, tokenizer)) is None


def test_differences_are_reported(hf_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template("chatml"), tokenizer)
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    hf.chat_template = jinja_chat_template(
        template, lambda token: hf.convert_ids_to_tokens(int(token))).replace("user", "User")
    difference = layout_differences(hf, training_layout(template, tokenizer))
    assert difference.startswith("probe 0 (prompt): training ids and the chat template's ids")
    user = tokenizer.encode("user\nHello!")[0]
    assert f"'{hf.convert_ids_to_tokens(user)}' (id {user}) in training" in difference


def _exported_sentencepiece(model_path: str, name: str, out: str):
    """(run's tokenizer, resolved template, the export's label) of the export's tokenizer
    steps for a SentencePiece run with the built-in template ``name``."""
    tokenizer = SentencePieceTokenizer(model_path)
    template = resolve_template(get_template(name), tokenizer)
    exported = ExportedTokenizer(_hf_tokenizer(tokenizer, out), tokenizer, name, template,
                                 template.end_of_turn)
    label = _attach_chat_template(exported, out)
    return tokenizer, template, label


@pytest.mark.parametrize("name", BUILT_IN)
def test_sentencepiece_export_loads_with_training_ids(name, sp_model_path, tmp_path):
    """The folder the export writes, loaded as users load it (AutoTokenizer, no argument),
    gives training's ids: LlamaTokenizer with legacy: true adds the word-start marker
    SentencePiece put at the start of every separately encoded piece after each special token,
    and the template's spaces between adjacent text pieces the others."""
    from transformers import AutoTokenizer

    tokenizer, template, label = _exported_sentencepiece(sp_model_path, name, str(tmp_path))
    assert label.endswith("reproduces the training token layout exactly)")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(loaded).__name__ == "LlamaTokenizer"
    assert layout_differences(loaded, training_layout(template, tokenizer)) is None


def test_transformers_default_sentencepiece_layout_differs(sp_model_path, tmp_path):
    """Why the export writes legacy: true: without it AutoTokenizer's LlamaTokenizer drops the
    word-start marker after special tokens, and the ids differ from training's."""
    import json

    from transformers import AutoTokenizer

    tokenizer, template, _ = _exported_sentencepiece(sp_model_path, "chatml", str(tmp_path))
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy"] = False
    config_path.write_text(json.dumps(config))
    difference = layout_differences(AutoTokenizer.from_pretrained(str(tmp_path)),
                                    training_layout(template, tokenizer))
    assert difference is not None and "'▁'" in difference


def test_export_says_when_the_layout_cannot_be_reproduced(tmp_path, capsys):
    """A SentencePiece model without the word-start prefix (add_dummy_prefix false) cannot be
    reproduced by LlamaTokenizer: the export warns with the first difference and never claims
    exactness."""
    from mt_dialog.demo import train_sentencepiece
    from tests.conftest import SAMPLE_TEXT

    model = train_sentencepiece(SAMPLE_TEXT * 20, str(tmp_path / "sp.model"), 400,
                                add_dummy_prefix=False)
    out = tmp_path / "export"
    out.mkdir()
    _, _, label = _exported_sentencepiece(model, "chatml", str(out))
    err = capsys.readouterr().err
    assert "exactly" not in label and "token layout differs from training: probe 0" in label
    assert err.startswith("warning: the exported tokenizer and chat template (chatml)")
    assert "first differ at token 1 of" in err


def _byte_level_export(name, hf_tokenizer_dir, keep_reasoning=False):
    """(run's tokenizer, resolved template, AutoTokenizer with the template as Jinja)."""
    from transformers import AutoTokenizer

    tokenizer = HuggingFaceTokenizer(hf_tokenizer_dir)
    template = resolve_template(get_template(name), tokenizer)
    hf = AutoTokenizer.from_pretrained(hf_tokenizer_dir)
    _add_appended(hf, tokenizer.added_tokens)
    hf.chat_template = jinja_chat_template(
        template, lambda token: hf.convert_ids_to_tokens(int(token)), keep_reasoning=keep_reasoning)
    return tokenizer, template, hf


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_exported_template_gives_training_ids_for_every_kind(name, hf_tokenizer_dir):
    """apply_chat_template(messages, tools=...) of the exported Jinja gives training's ids for
    every message kind the template lays out (tool calls, results, reasoning, untrained and
    empty replies), in each --reasoning mode: the export of a --reasoning keep run keeps the
    history's reasoning; template and per-turn train (and serve) the template's own view."""
    from tests.data.test_render import KINDS

    for keep in (False, True):
        tokenizer, template, hf = _byte_level_export(name, hf_tokenizer_dir, keep)
        modes = ("keep",) if keep else ("template", "per-turn")
        for options in (RenderOptions(reasoning=mode) for mode in modes):
            assert layout_differences(hf, training_layout(template, tokenizer, options)) is None
            for kind, conversation in KINDS.items():
                if any(m.reasoning for m in conversation.messages) and template.reasoning is None:
                    continue
                if conversation.messages[0].role == "assistant":
                    continue  # an opening greeting: checked by the layout test above
                ours = render_conversation(conversation, template, tokenizer.encode, options)
                theirs = chat_template_ids(hf, conversation, False)
                assert ours[-1].input_ids.tolist() == theirs, (name, kind, options)


def test_template_without_tool_layout_refuses_tools_when_served(sp_model_path, tmp_path):
    """Training refuses tools with such a template; so does the exported one, naming why."""
    import jinja2
    from transformers import AutoTokenizer

    from tests.data.test_render import KINDS

    _exported_sentencepiece(sp_model_path, "plain", str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    with pytest.raises(jinja2.TemplateError, match="plain chat template, which has no layout "
                                                   "for tools"):
        chat_template_ids(hf, KINDS["tool calls"], True)


WEATHER = {"name": "get_weather", "description": "Current weather of a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
RAW = {  # records as users write them: training reads them with parse_record, a server passes
    # the same messages and tools to apply_chat_template
    "think in content": {"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>Greet back.</think>Hello!"},
        {"role": "user", "content": "Count to 3"},
        {"role": "assistant", "content": " \n<think>\nCount.\n</think>\n\n1 2 3"}]},
    "bare tools, legacy function calling": {"tools": [WEATHER], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"role": "function", "name": "get_weather", "content": "18C"},
        {"role": "assistant", "content": "18C."}]},
    "content parts, JSON results": {"tools": [{"type": "function", "function": WEATHER}],
                                    "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Weather"},
                                     {"type": "input_text", "text": "in Oslo and Rome?"}]},
        {"role": "assistant", "content": "",
         "tool_calls": [{"type": "function", "id": "a", "function": {
             "name": "get_weather", "arguments": ""}},
             {"type": "function", "id": "b", "function": {
                 "name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "tool_call_id": "a", "content": {"temp": -3, "sky": "snow ❄"}},
        {"role": "tool", "tool_call_id": "b", "content": [20, "sunny"]},
        {"role": "assistant", "content": [{"type": "text", "text": "Snow, then sun."}]}]},
}


def _served(hf, messages, tools, prompt, **kwargs):
    out = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt, **kwargs)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize("name", WITH_TOOLS)
def test_exported_template_reads_messages_as_training_does(name, hf_tokenizer_dir):
    """What users pass to the exported tokenizer's apply_chat_template (reasoning as a <think>
    block in the content, bare function descriptions, legacy function_call / function
    messages, content parts, JSON tool results, arguments "") gives the ids training gave the
    same record (parse_record, as preprocessing reads it), and each generation prompt the ids
    chat builds from the same messages (generate.to_messages); what training refuses (reasoning
    without a layout for it) the exported template refuses too."""
    import jinja2

    from mt_dialog.data.formats import RecordError, parse_record, parse_tools
    from mt_dialog.generate import to_messages

    tokenizer, template, hf = _byte_level_export(name, hf_tokenizer_dir)
    for kind, record in RAW.items():
        messages, tools = record["messages"], record.get("tools")
        if kind == "think in content" and template.reasoning is None:
            with pytest.raises(RecordError, match="has no place for it"):
                render_conversation(parse_record(record), template, tokenizer.encode)
            with pytest.raises(jinja2.TemplateError, match="no layout for reasoning"):
                _served(hf, messages, tools, False)
            continue
        (ours,) = render_conversation(parse_record(record), template, tokenizer.encode)
        assert ours.input_ids.tolist() == _served(hf, messages, tools, False), (name, kind)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            history = Conversation(tuple(to_messages(messages[:k])), parse_tools(tools))
            assert render_prompt(history, template, tokenizer.encode) == \
                _served(hf, messages[:k], tools, True), (name, kind, k)


def test_probes_catch_what_the_user_trial_found(hf_tokenizer_dir):
    """The export's exactness check fails a template that copies a <think> block of the content
    into the history (the user trial: 75 tokens where training had 52) or writes bare function
    descriptions unwrapped, and the exported template does neither: the prompt of
    [user "Hi", assistant "<think>Greet back.</think>Hello!", user "Count to 3"] is training's."""
    tokenizer, template, hf = _byte_level_export("qwen3", hf_tokenizer_dir)
    exported = hf.chat_template
    layout = training_layout(template, tokenizer)
    assert layout_differences(hf, layout) is None
    from mt_dialog.generate import to_messages

    messages = RAW["think in content"]["messages"][:3]  # chat's prompt: training's layout
    ours = render_prompt(to_messages(messages), template, tokenizer.encode)
    assert ours == _served(hf, messages, None, True)
    for broken, probe in ((exported.replace("opened.startswith('<think>')", "false"), 2),
                          (exported.replace("function_tool | tojson", "tool | tojson"), 7)):
        hf.chat_template = broken
        difference = layout_differences(hf, layout)
        assert difference is not None and difference.startswith(f"probe {probe} (prompt)")


def test_enable_thinking_false_ends_the_prompt_with_an_empty_block(hf_tokenizer_dir):
    """Qwen3's switch: apply_chat_template(..., enable_thinking=False) of the exported qwen3
    template is render_prompt(..., enable_thinking=False); the export checks it on every
    probe; templates without a reasoning layout ignore it."""
    for name in ("qwen3", "chatml"):
        tokenizer, template, hf = _byte_level_export(name, hf_tokenizer_dir)
        for probe, _ in probes_for(template):
            probe = as_read(probe)
            for thinking in (True, False):
                ours = render_prompt(probe, template, tokenizer.encode, enable_thinking=thinking)
                assert ours == chat_template_ids(hf, probe, True, enable_thinking=thinking)
        text = hf.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                      add_generation_prompt=True, enable_thinking=False)
        assert text.endswith("<think>\n\n</think>\n\n") == (name == "qwen3")
