"""Generation from a checkpoint trained in the test session (TP=2, loaded into one process; the
tests that need it are marked multiprocess), and what needs no checkpoint: sampling, chat's
refusals and help."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.test_learning import ROOT, trained_demo_run

INTRO = "My name is Zoe and my favourite colour is purple."
HISTORY = [{"role": "user", "content": INTRO},
           {"role": "assistant", "content": "Nice to meet you, Zoe!"}]
PROMPTS = [
    [{"role": "user", "content": INTRO}],
    HISTORY + [{"role": "user", "content": "What is my favourite colour?"}],
    HISTORY + [{"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "system", "content": "You are a helpful assistant."}]
    + HISTORY + [{"role": "user", "content": "Count from 4 to 9."}],
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_demo_run(tmp_path_factory)


@pytest.fixture(scope="module")
def generator(run):
    from mt_dialog import generate
    from mt_dialog.training.distributed import destroy_single_process

    loaded = generate.Generator.from_checkpoint(run["save"])
    yield loaded
    destroy_single_process()  # leave no process group behind for other tests in this session


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_tp2_checkpoint_loads_into_one_process(run, generator):
    """Resharded TP=2 -> TP=1 weights predict the training data far better than chance."""
    from megatron.core import parallel_state as ps

    from mt_dialog.data.formats import parse_record
    from mt_dialog.data.render import render_conversation

    assert json.load(open(os.path.join(run["save"], "config.json")))["config"]["parallel"][
        "tensor_model_parallel_size"] == 2
    assert ps.get_tensor_model_parallel_world_size() == 1 and generator.iteration == 60
    assert generator.template_name == "chatml"
    total, count = 0.0, 0
    with open(run["corpus"]) as handle:
        records = [json.loads(next(handle)) for _ in range(8)]
    for record in records:
        (rendered,) = render_conversation(parse_record(record), generator.template,
                                          generator.tokenizer.encode)
        ids = torch.tensor(rendered.input_ids[None, :])
        with torch.no_grad():
            logits = generator.model(ids, torch.arange(ids.shape[1])[None, :], None)[0]
        logp = torch.log_softmax(logits[:-1, : generator.vocab_size].float(), dim=-1)
        targets = ids[0, 1:]
        mask = torch.as_tensor(rendered.loss_mask[1:], dtype=torch.bool)
        total += float(-logp[torch.arange(len(targets)), targets][mask].sum())
        count += int(mask.sum())
    loss = total / count
    first_logged = run["losses"][0][1]
    assert loss < 0.75 * first_logged < 0.75 * math.log(generator.vocab_size) + 1, (
        loss, run["losses"])


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_prompt_is_the_training_layout(generator):
    from mt_dialog.data.formats import Message
    from mt_dialog.data.render import render_conversation

    messages = PROMPTS[3] + [{"role": "assistant", "content": "4 5 6 7 8 9"}]
    (full,) = render_conversation([Message(**m) for m in messages], generator.template,
                                  generator.tokenizer.encode)
    prompt = generator.prompt_ids(PROMPTS[3])
    assert list(full.input_ids[: len(prompt)]) == prompt
    assert full.loss_token_num[len(prompt) - 1] == 0 and full.loss_token_num[len(prompt)] > 0
    with pytest.raises(ValueError, match="end with a user message"):
        generator.prompt_ids(messages)


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
@pytest.mark.parametrize("index", range(len(PROMPTS)))
def test_stops_at_end_of_turn_or_max_tokens(generator, index):
    eot, eos = generator.end_of_turn, generator.tokenizer.eos_id
    for max_new in (3, 40):
        result = generator.generate(PROMPTS[index], max_new_tokens=max_new)
        ids = result.token_ids
        assert 1 <= len(ids) <= max_new and eot not in ids[:-1] and eos not in ids[:-1]
        if result.finish_reason in ("end_of_turn", "eos"):
            assert ids[-1] == (eot if result.finish_reason == "end_of_turn" else eos)
        else:
            assert result.finish_reason == "max_new_tokens" and len(ids) == max_new
        assert result.text == generator.tokenizer.decode([i for i in ids if i not in (eot, eos)])


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_greedy_is_deterministic_and_is_the_argmax_chain(generator):
    first = generator.generate(PROMPTS[1], max_new_tokens=12)
    assert generator.generate(PROMPTS[1], max_new_tokens=12).token_ids == first.token_ids
    ids = list(first.prompt_ids)
    for token in first.token_ids:
        logits = generator.next_logits(ids)
        assert logits.shape[0] == generator.vocab_size and int(torch.argmax(logits)) == token
        ids.append(token)
    assert generator.reply(PROMPTS[1], max_new_tokens=12) == first.text


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_top_p_sampling_with_a_seed_is_reproducible(generator):
    kwargs = dict(max_new_tokens=16, greedy=False, top_p=0.95, temperature=1.5)
    runs = {seed: generator.generate(PROMPTS[3], seed=seed, **kwargs).token_ids
            for seed in range(4)}
    assert generator.generate(PROMPTS[3], seed=2, **kwargs).token_ids == runs[2]
    assert len({tuple(ids) for ids in runs.values()}) > 1  # the seed matters
    # a nucleus this small holds only the most likely token: the same as greedy
    greedy = generator.generate(PROMPTS[3], max_new_tokens=16).token_ids
    assert generator.generate(PROMPTS[3], max_new_tokens=16, greedy=False, top_p=1e-6,
                              seed=5).token_ids == greedy


def test_next_token_nucleus():
    from mt_dialog.generate import next_token

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    rng = torch.Generator().manual_seed(0)
    draws = {next_token(logits, False, 1.0, 0.7, rng) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 < 0.7 needs the second token, never the third
    assert {next_token(logits, False, 1.0, 0.5, rng) for _ in range(50)} == {0}
    assert {next_token(logits, False, 1.0, 1.0, rng) for _ in range(2000)} == {0, 1, 2, 3}
    assert next_token(logits, True) == 0 and next_token(logits, False, 0.0, 1.0, rng) == 0


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_bad_requests_are_refused(generator):
    from mt_dialog.generate import GenerationError

    with pytest.raises(GenerationError, match="top_p"):
        generator.generate(PROMPTS[0], greedy=False, top_p=0.0)
    with pytest.raises(GenerationError, match="max_new_tokens"):
        generator.generate(PROMPTS[0], max_new_tokens=0)
    with pytest.raises(GenerationError, match="user"):
        generator.generate([{"role": "assistant", "content": "hi"}])


def _chat(*args, stdin=None):
    return subprocess.run([sys.executable, "tools/chat.py", *args], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_chat_one_shot_prints_the_reply(run, generator):
    out = _chat("--load", run["save"], "--message", INTRO, "--message", "Nice to meet you, Zoe!",
                "--message", "What is my name?", "--max-new-tokens", "20", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    expected = generator.generate(HISTORY + [{"role": "user", "content": "What is my name?"}],
                                  max_new_tokens=20)
    assert result["token_ids"] == expected.token_ids and result["text"] == expected.text
    assert result["finish_reason"] in ("end_of_turn", "eos", "max_new_tokens")


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_chat_interactive_transcript(run):
    out = _chat("--load", run["save"], "--max-new-tokens", "8", "--top-p", "0.9", "--seed", "1",
                "--echo", stdin=f"{INTRO}\n\n/reset\nWhat is 3 plus 4?\n/quit\nnot read\n")
    assert out.returncode == 0, out.stderr
    users = [line for line in out.stdout.splitlines() if line.startswith("user> ")]
    assert users == [f"user> {INTRO}", "user> What is 3 plus 4?"], out.stdout
    assert out.stdout.count("assistant> ") == 2 and "(history cleared)" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["--load", "/no/such/checkpoint", "--message", "hi"], "no such checkpoint"),
    (["--load", ".", "--message", "hi"], "latest_checkpointed_iteration.txt"),
    (["--load", ".", "--message", "hi", "--message", "hello"], "odd number"),
    (["--load", ".", "--message", "hi", "--top-p", "1.5"], "--top-p"),
    (["--load", ".", "--json"], "--json prints the reply to the --message history"),
])
def test_chat_errors_cleanly(args, message):
    out = _chat(*args)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith("error: ") and message in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


def test_chat_help_shows_the_printf_example_intact(capsys):
    """The module docstring is the --help text: its printf example keeps its \\n escapes on one
    line, and its continuation lines end with one backslash (as typed in a shell)."""
    from tools.chat import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert ("    printf 'What is 2 plus 2?\\nCount from 3 to 7.\\n' | python tools/chat.py "
            "--load ckpt --echo\n") in out, out
    assert '--system "You are a helpful assistant." \\\n' in out


# -- tools and reasoning in the prompt, reasoning apart in the reply (no checkpoint) --------------

from tests.data.chat_tokenizers import hf_qwen3_dir  # noqa: E402,F401  (fixture)

WEATHER = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
ASK = [{"role": "user", "content": "Weather in Paris?"}]


class _ScriptedModel(torch.nn.Module):
    """Stands for a model: its 'logits' pick the next id of a fixed script after the prompt."""

    def __init__(self, script, vocab_size: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab_size, self.prompt_length = list(script), vocab_size, None

    def forward(self, tokens, positions, mask):
        if self.prompt_length is None:
            self.prompt_length = tokens.shape[1]
        logits = torch.zeros(1, tokens.shape[1], self.vocab_size)
        logits[0, -1, self.script[tokens.shape[1] - self.prompt_length]] = 1.0
        return logits


def _built_in(sp_model_path, name, script_text=""):
    from mt_dialog.data.render import end_of_turn_id, resolve_template
    from mt_dialog.data.templates import get_template
    from mt_dialog.data.tokenizers import SentencePieceTokenizer
    from mt_dialog.generate import Generator

    tokenizer = SentencePieceTokenizer(sp_model_path)
    template = resolve_template(get_template(name), tokenizer)
    eot = end_of_turn_id(name, tokenizer)
    script = tokenizer.encode(script_text) + [eot]
    vocab = tokenizer.vocab_size
    return Generator(_ScriptedModel(script, vocab), tokenizer, template, eot, vocab, 512, name)


@pytest.mark.parametrize("name", ["chatml", "qwen3", "llama3"])
def test_prompt_with_tools_is_the_training_layout(sp_model_path, name):
    """With ``tools`` the prompt is the training rendering of the same conversation with the same
    tools, up to where the reply starts; without them it differs (the model saw them)."""
    from mt_dialog.data.formats import parse_record
    from mt_dialog.data.render import render_conversation

    generator = _built_in(sp_model_path, name)
    record = {"messages": ASK + [{"role": "assistant", "content": "Let me check."}],
              "tools": WEATHER}
    (rendered,) = render_conversation(parse_record(record), generator.template,
                                      generator.tokenizer.encode)
    prompt = generator.prompt_ids(ASK, tools=WEATHER)
    assert list(rendered.input_ids[:len(prompt)]) == prompt
    assert rendered.loss_token_num[len(prompt) - 1] == 0 and rendered.loss_token_num[len(prompt)]
    assert generator.prompt_ids(ASK) != prompt
    assert "get_weather" in generator.tokenizer.decode(prompt)


def test_bad_tools_and_thinking_switch_refused(sp_model_path):
    from mt_dialog.generate import GenerationError

    generator = _built_in(sp_model_path, "chatml")
    with pytest.raises(GenerationError, match=r"tools\[0\]"):
        generator.prompt_ids(ASK, tools=[{"description": "no name"}])
    with pytest.raises(GenerationError, match="no reasoning layout"):
        generator.prompt_ids(ASK, enable_thinking=False)


def test_no_thinking_prompt_and_reasoning_apart(sp_model_path):
    """qwen3: ``enable_thinking=False`` ends the prompt with an empty ``<think>`` block; a reply
    that thinks comes back with its reasoning apart, and the history given back with it as
    ``reasoning_content`` gives the prompt training gave (earlier reasoning left out)."""
    from mt_dialog.data.formats import parse_record
    from mt_dialog.data.render import render_conversation

    generator = _built_in(sp_model_path, "qwen3", "<think>\nParis is sunny.\n</think>\n\nSunny.")
    prompt = generator.prompt_ids(ASK)
    off = generator.prompt_ids(ASK, enable_thinking=False)
    assert off[:len(prompt)] == prompt
    assert generator.tokenizer.decode(off[len(prompt):]) == "<think>\n\n</think>\n\n"
    result = generator.generate(ASK)
    assert (result.text, result.reasoning, result.finish_reason) == (
        "Sunny.", "Paris is sunny.", "end_of_turn")
    history = ASK + [{"role": "assistant", "content": result.text,
                      "reasoning_content": result.reasoning},
                     {"role": "user", "content": "And tomorrow?"}]
    (rendered,) = render_conversation(
        parse_record({"messages": history + [{"role": "assistant", "content": "Rain."}]}),
        generator.template, generator.tokenizer.encode)
    next_prompt = generator.prompt_ids(history)
    assert list(rendered.input_ids[:len(next_prompt)]) == next_prompt
    assert "Paris is sunny" not in generator.tokenizer.decode(next_prompt)


def test_reply_cut_inside_reasoning_keeps_all_text(sp_model_path):
    generator = _built_in(sp_model_path, "qwen3", "<think>\nStill thinking about it")
    result = generator.generate(ASK, max_new_tokens=4)
    assert result.finish_reason == "max_new_tokens" and result.reasoning is None
    assert result.text == generator.tokenizer.decode(result.token_ids)


def test_hf_template_gets_tools_and_enable_thinking(hf_qwen3_dir):
    """--template hf: the prompt is the tokenizer's own ``apply_chat_template`` with the tools
    and ``enable_thinking`` passed, tokenized as training tokenizes."""
    from mt_dialog.data.tokenizers import HuggingFaceTokenizer
    from mt_dialog.data.render_hf import hf_end_of_turn_id
    from mt_dialog.generate import Generator

    tokenizer = HuggingFaceTokenizer(hf_qwen3_dir)
    eot = hf_end_of_turn_id(tokenizer)
    generator = Generator(_ScriptedModel([eot], tokenizer.vocab_size), tokenizer, None, eot,
                          tokenizer.vocab_size, 512, "hf")
    assert generator.has_reasoning_layout()
    for thinking in (True, False):
        text = tokenizer.hf.apply_chat_template(ASK, tools=WEATHER, tokenize=False,
                                                add_generation_prompt=True,
                                                enable_thinking=thinking)
        expected = tokenizer.hf(text, add_special_tokens=False)["input_ids"]
        assert generator.prompt_ids(ASK, WEATHER, enable_thinking=thinking) == expected
    assert generator.prompt_ids(ASK, WEATHER) != generator.prompt_ids(ASK, WEATHER, False)


@pytest.mark.multiprocess  # trains the demo run (TP=2, torchrun)
def test_chat_reasoning_flags_need_a_reasoning_layout(run):
    for flag in ("--no-thinking", "--show-reasoning"):
        out = _chat("--load", run["save"], "--message", "Hi", flag)
        assert out.returncode == 1 and out.stdout == ""
        assert out.stderr.startswith(f"error: {flag}: the chat template 'chatml' has no "
                                     "reasoning layout"), out.stderr


def test_chat_tools_file_errors(tmp_path):
    bad = tmp_path / "tools.json"
    bad.write_text('[{"name": "f",}]\n')
    out = _chat("--load", str(tmp_path), "--message", "hi", "--tools", str(bad))
    assert out.returncode == 1 and out.stderr.startswith(f"error: --tools {bad}:1: not JSON")
    out = _chat("--load", str(tmp_path), "--message", "hi", "--tools", str(tmp_path / "none"))
    assert out.returncode == 1 and "cannot read it" in out.stderr
    single = tmp_path / "single.json"
    single.write_text('{"name": "get_weather"}')
    out = _chat("--load", str(tmp_path), "--message", "hi", "--tools", str(single))
    assert out.returncode == 1 and out.stderr.startswith(
        f"error: --tools {single}: must be a JSON list of function descriptions"), out.stderr
    nameless = tmp_path / "nameless.json"
    nameless.write_text('[{"description": "no name"}]')
    out = _chat("--load", str(tmp_path), "--message", "hi", "--tools", str(nameless))
    assert out.returncode == 1 and out.stderr.startswith(f"error: --tools {nameless}: tools[0]")


# -- harmony (gpt-oss) replies split by channel ----------------------------------------------------

from tests.data.chat_tokenizers import hf_gpt_oss_dir  # noqa: E402,F401  (fixture)

CALL_TEXT = ('<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant'
             '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
             '{"city": "Paris"}')


@pytest.mark.parametrize("text, content, reasoning, calls", [
    ("<|channel|>analysis<|message|>2 and 2 make 4.<|end|><|start|>assistant<|channel|>final"
     "<|message|>It is 4.<|return|>", "It is 4.", "2 and 2 make 4.", []),
    ("<|channel|>final<|message|>Hello there.", "Hello there.", None, []),  # stop left off
    ("<|channel|>final <|message|>Hi.<|end|>", "Hi.", None, []),
    (CALL_TEXT + "<|call|>", "", "Need the weather.", [("get_weather", {"city": "Paris"})]),
    (" to=functions.get_weather<|channel|>commentary json<|message|>{}<|call|>", "", None,
     [("get_weather", {})]),  # the recipient before the channel, a bare content type
    ("<|channel|>commentary<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary "
     'to=functions.f <|constrain|>json<|message|>{"a": 1}', "Checking.", None, [("f", {"a": 1})]),
])
def test_harmony_reply_split_by_channel(text, content, reasoning, calls):
    from mt_dialog.harmony import parse_reply

    reply = parse_reply(text)
    assert (reply.content, reply.reasoning) == (content, reasoning)
    assert [(c.name, c.arguments) for c in reply.tool_calls] == calls
    assert all(c.arguments_text and c.id is None for c in reply.tool_calls)


@pytest.mark.parametrize("text", [
    "<|channel|>analysis<|message|>Still thinking abo",  # cut off in the analysis
    "<|channel|>analysis<|message|>Done.<|end|>",  # no answer
    CALL_TEXT[:-5],  # cut off inside the arguments
    CALL_TEXT.replace('{"city": "Paris"}', '["Paris"]'),  # arguments not an object
    "<|channel|>poetry<|message|>Roses.<|end|>",  # unknown channel
    "<|channel|>final<|message|>A<|end|><|start|>user<|message|>B<|end|>",  # not the assistant
    "<|channel|>final<|message|>A<|return|><|start|>assistant<|channel|>final<|message|>B",
    "<|channel|>final<|message|>A<|end|> trailing",
    "no markup at all", "", "<|start|><|start|>", "<|message|>no channel",
])
def test_harmony_malformed_reply_is_all_content(text):
    from mt_dialog.harmony import parse_reply

    reply = parse_reply(text)
    assert (reply.content, reply.reasoning, reply.tool_calls) == (text, None, ())


def _harmony_ids(tokenizer, text):
    """``text`` as ids, harmony's special tokens as their ids (encode splits them)."""
    import re

    ids = []
    for piece in re.split(r"(<\|[a-z]+\|>)", text):
        if re.fullmatch(r"<\|[a-z]+\|>", piece):
            ids.append(tokenizer.hf.convert_tokens_to_ids(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


@pytest.mark.parametrize("ending", ["final", "call"])
def test_harmony_chat_reply_has_no_markup(hf_gpt_oss_dir, ending):
    """gpt-oss (--template hf): the scripted reply stops at <|return|> / <|call|>; the Generator
    returns the final channel as text, the analysis as reasoning, the call as a tool call, and
    chat prints and keeps them so (the analysis dropped from the next prompt, as the template
    drops it after a later user message)."""
    from mt_dialog.data.render_hf import chat_template_info
    from mt_dialog.data.tokenizers import HuggingFaceTokenizer
    from mt_dialog.generate import Generator
    from tools import chat

    tokenizer = HuggingFaceTokenizer(hf_gpt_oss_dir)
    stops = chat_template_info(tokenizer.hf).stops
    answer = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant"
              "<|channel|>final<|message|>Sunny in Paris.<|return|>")
    script = _harmony_ids(tokenizer, answer if ending == "final" else CALL_TEXT + "<|call|>")
    vocab = tokenizer.vocab_size
    generator = Generator(_ScriptedModel(script, vocab), tokenizer, None, stops[0], vocab, 512,
                          "hf", stops=stops)
    assert generator.is_harmony() and generator.has_reasoning_layout()
    result = generator.generate(ASK, tools=WEATHER, max_new_tokens=100)
    assert result.finish_reason == "end_of_turn" and result.token_ids == script
    assert result.reasoning == "Need the weather."
    if ending == "call":
        assert result.text == "" and result.tool_calls[0].name == "get_weather"
        assert result.tool_calls[0].arguments == {"city": "Paris"}
        assert chat._shown(result, False) == 'tool call: get_weather {"city": "Paris"}'
        assert chat._calls(result) == [{"type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]
        history = list(ASK)
        chat._keep(history, result)  # no tool results to give back: the turn is left out
        assert history == []
        return
    assert (result.text, result.tool_calls) == ("Sunny in Paris.", ())
    assert chat._shown(result, True) == "<think>\nNeed the weather.\n</think>\nSunny in Paris."
    history = list(ASK)
    chat._keep(history, result)
    assert history[-1] == {"role": "assistant", "content": "Sunny in Paris.",
                           "reasoning_content": "Need the weather."}
    prompt = tokenizer.decode(generator.prompt_ids(
        history + [{"role": "user", "content": "And tomorrow?"}], WEATHER))
    assert "<|channel|>final<|message|>Sunny in Paris.<|end|>" in prompt
    assert "Need the weather" not in prompt


def test_harmony_not_detected_for_other_templates(hf_qwen3_dir):
    from mt_dialog.harmony import is_harmony
    from mt_dialog.data.tokenizers import HuggingFaceTokenizer

    assert not is_harmony(HuggingFaceTokenizer(hf_qwen3_dir).hf)
