#!/usr/bin/env python
r"""Chat with a checkpoint: trained by pretrain_dialog.py or imported by tools/convert_checkpoint.py
hf-to-mcore (single process, CPU or one GPU; any saved TP/PP layout).

Examples:
    # one-shot: print the reply to one user message (greedy)
    python tools/chat.py --load ckpt --message "What is 3 plus 4?"
    # multi-turn history: --message alternates user, assistant, user, ... (ends with a user turn)
    python tools/chat.py --load ckpt --system "You are a helpful assistant." \
        --message "My name is Mia and my favourite colour is green." \
        --message "Nice to meet you, Mia!" --message "What is my favourite colour?"
    # sampling (any of --top-p / --temperature / --sample switches greedy off)
    python tools/chat.py --load ckpt --message "Repeat after me: river stone" --top-p 0.9 --seed 1
    # interactive: one user message per line on stdin; /reset clears the history, /quit exits
    python tools/chat.py --load ckpt
    printf 'What is 2 plus 2?\nCount from 3 to 7.\n' | python tools/chat.py --load ckpt --echo
    # a model trained on tool calls: offer it the same functions (a JSON list, as a record's
    # "tools"); a reasoning model (qwen3 template): answer without thinking, or show the thinking
    python tools/chat.py --load ckpt --tools tools.json --message "Weather in Paris?" --json
    python tools/chat.py --load ckpt --no-thinking --message "What is 3 plus 4?"
    python tools/chat.py --load ckpt --show-reasoning --message "What is 3 plus 4?"

The prompt is laid out with the chat template and tokenizer of the dataset the run trained on;
generation stops at the template's end-of-turn token or after --max-new-tokens.
"""

import argparse
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="CKPT",
                        help="checkpoint folder written by pretrain_dialog.py --save")
    parser.add_argument("--iteration", type=int, default=None,
                        help="iteration to load (default: the newest in --load)")
    parser.add_argument("--message", action="append", default=[], metavar="TEXT",
                        help="a conversation message, repeatable: user, assistant, user, ... "
                        "(must end with a user message); without it, chat interactively on stdin")
    parser.add_argument("--system", default=None, help="system message (default: none)")
    parser.add_argument("--interactive", action="store_true",
                        help="after replying to --message, go on chatting on stdin")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="most tokens generated per reply (default: 128)")
    parser.add_argument("--sample", action="store_true",
                        help="sample instead of greedy decoding (implied by --top-p/--temperature)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="nucleus sampling: keep the most likely tokens up to this total "
                        "probability (default when sampling: 1.0)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="sampling temperature (default when sampling: 1.0)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of the sampling generator, for reproducible samples "
                        "(default: random)")
    parser.add_argument("--tokenizer-model", default=None, metavar="PATH",
                        help="the run's tokenizer, if it moved (.model file or HF folder)")
    parser.add_argument("--template", default=None,
                        help="chat template, if the run's dataset metadata is gone")
    parser.add_argument("--tools", default=None, metavar="FILE",
                        help="JSON file with the functions offered to the assistant: a list of "
                        "{\"type\": \"function\", \"function\": {\"name\", \"description\", "
                        "\"parameters\"}} (or bare function objects), as a record's \"tools\"")
    parser.add_argument("--no-thinking", action="store_true",
                        help="reasoning templates (qwen3, or --template hf with a <think> layout): "
                        "end the prompt with an empty reasoning block, so the model answers "
                        "without thinking (Qwen3's enable_thinking=False)")
    parser.add_argument("--show-reasoning", action="store_true",
                        help="print the reply's reasoning (its <think> block; harmony's analysis "
                        "channel) before the reply; --json always includes it as \"reasoning\"")
    parser.add_argument("--echo", action="store_true",
                        help="interactive: print the conversation as a transcript (user> and "
                        "assistant> lines), e.g. when the messages are piped in")
    parser.add_argument("--json", action="store_true",
                        help="one-shot: print a JSON object (text, reasoning, tool_calls, "
                        "token_ids, finish_reason, prompt_tokens) instead of the text")
    return parser


def _sampling(args) -> dict:
    sample = args.sample or args.top_p is not None or args.temperature is not None
    return {"greedy": not sample,
            "top_p": 1.0 if args.top_p is None else args.top_p,
            "temperature": 1.0 if args.temperature is None else args.temperature,
            "seed": args.seed, "max_new_tokens": args.max_new_tokens}


def _check_args(args) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.temperature is not None and args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    if args.json and not args.message:
        raise ValueError("--json prints the reply to the --message history as one JSON object: "
                         "give --message (interactive chat prints text)")
    if args.message and len(args.message) % 2 == 0:
        raise ValueError(f"{len(args.message)} --message given: they alternate user, assistant, "
                         "user, ... so the last one must be a user message (give an odd number)")
    args.tools = _tools(args.tools)  # read before the model loads
    if not os.path.isdir(args.load):
        raise ValueError(f"--load {args.load}: no such checkpoint folder (the --save folder of "
                         "pretrain_dialog.py)")


def _tools(path):
    """The functions in ``--tools FILE`` (checked as a record's ``tools``), or None."""
    from mt_dialog.data.formats import RecordError, parse_tools

    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as handle:
            tools = json.load(handle)
    except OSError as exc:
        raise ValueError(f"--tools {path}: cannot read it ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"--tools {path}:{exc.lineno}: not JSON ({exc.msg}); give a JSON list "
                         "of function descriptions") from None
    if not isinstance(tools, list):
        raise ValueError(f"--tools {path}: must be a JSON list of function descriptions "
                         f"([{{\"type\": \"function\", \"function\": {{...}}}}, ...]), got a "
                         f"{type(tools).__name__}; put the function in [ ]")
    try:
        return list(parse_tools(tools))
    except RecordError as exc:
        raise ValueError(f"--tools {path}: {exc.message}") from None


def _check_reasoning_flags(generator, args) -> None:
    """--no-thinking and --show-reasoning need a template that lays out reasoning."""
    flags = [f for f, on in (("--no-thinking", args.no_thinking),
                             ("--show-reasoning", args.show_reasoning)) if on]
    if flags and not generator.has_reasoning_layout():
        raise ValueError(f"{' and '.join(flags)}: the chat template "
                         f"{generator.template_name!r} has no reasoning layout (no <think> "
                         "block), so the model was not trained to think; drop "
                         + " and ".join(flags))


def _finish_note(result, generator) -> None:
    """A reply cut by the model's sequence length says so on stderr (text output)."""
    if result.finish_reason == "seq_length":
        print(f"note: the reply stopped at the model's sequence length ({generator.seq_length} "
              f"tokens; the prompt has {len(result.prompt_ids)}): shorten the conversation, the "
              "system message or --tools", file=sys.stderr, flush=True)


def _assistant(result) -> dict:
    """The reply as the history keeps it: its reasoning apart, as training data gives it (the
    chat template keeps or drops it in the next prompt); its tool calls (harmony) as calls."""
    message = {"role": "assistant", "content": result.text}
    if result.reasoning is not None:
        message["reasoning_content"] = result.reasoning
    if result.tool_calls:
        message["tool_calls"] = _calls(result)
    return message


def _calls(result) -> list:
    """The reply's tool calls as OpenAI's ``tool_calls`` (arguments as the model wrote them)."""
    return [{"type": "function", "function": {"name": c.name, "arguments": c.arguments_text}}
            for c in result.tool_calls]


def _shown(result, show_reasoning: bool) -> str:
    text = result.text
    for call in result.tool_calls:
        text += ("\n" if text else "") + f"tool call: {call.name} {call.arguments_text}"
    if show_reasoning and result.reasoning is not None:
        return f"<think>\n{result.reasoning}\n</think>\n{text}"
    return text


def _keep(messages: list, result) -> None:
    """Add the reply to the history; a tool-call reply cannot be answered here (no tool
    results on stdin), so it and the message it answers are left out, with a note."""
    if result.tool_calls:
        messages.pop()
        print("note: the reply calls tools; chat cannot give tool results back, so this turn is "
              "left out of the history", file=sys.stderr, flush=True)
    else:
        messages.append(_assistant(result))


def _history(args) -> list:
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for index, text in enumerate(args.message):
        messages.append({"role": "user" if index % 2 == 0 else "assistant", "content": text})
    return messages


def _fit(generator, messages: list, options: dict) -> list:
    """Drop the oldest user/assistant pairs until prompt + reply fit the trained length."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    body = messages[len(system):]
    room = min(options["max_new_tokens"], generator.seq_length // 2)
    while len(body) > 1 and len(generator.prompt_ids(
            system + body, options["tools"], options["enable_thinking"])) + room \
            > generator.seq_length:
        body = body[2:]
    return system + body


def _interactive(generator, messages: list, options: dict, echo: bool = False,
                 show_reasoning: bool = False) -> None:
    tty = sys.stdin.isatty()
    while True:
        if tty:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages[:] = [m for m in messages if m["role"] == "system"]
            print("(history cleared)", flush=True)
            continue
        if echo and not tty:
            print(f"user> {text}", flush=True)
        messages.append({"role": "user", "content": text})
        messages[:] = _fit(generator, messages, options)
        result = generator.generate(messages, **options)
        _keep(messages, result)
        print(("assistant> " if tty or echo else "") + _shown(result, show_reasoning), flush=True)
        _finish_note(result, generator)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _check_args(args)
        warnings.filterwarnings("ignore")  # megatron-core's import-time notices (no TE/apex, ...)
        from mt_dialog.data.tokenizers import TokenizerError
        from mt_dialog.generate import GenerationError, Generator
        from mt_dialog.training.saved_run import SavedRunError, TokenizerMissing

        try:
            generator = Generator.from_checkpoint(
                args.load, iteration=args.iteration, tokenizer_path=args.tokenizer_model,
                template=args.template)
            _check_reasoning_flags(generator, args)
            options = dict(_sampling(args), tools=args.tools,
                           enable_thinking=not args.no_thinking)
            messages = _history(args)
            if args.message:
                result = generator.generate(messages, **options)
                if args.json:
                    print(json.dumps({"text": result.text, "reasoning": result.reasoning,
                                      "tool_calls": _calls(result),
                                      "token_ids": result.token_ids,
                                      "finish_reason": result.finish_reason,
                                      "prompt_tokens": len(result.prompt_ids)}), flush=True)
                else:
                    print(_shown(result, args.show_reasoning), flush=True)
                    _finish_note(result, generator)
                if not args.interactive:
                    return 0
                _keep(messages, result)
            _interactive(generator, messages, options, args.echo, args.show_reasoning)
        except TokenizerMissing as exc:
            print(f"error: {exc}; pass its location with --tokenizer-model PATH",
                  file=sys.stderr, flush=True)
            return 1
        except (GenerationError, SavedRunError, TokenizerError) as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return 1
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    from mt_dialog.cli import run

    run(main)
