"""The manual documents every flag, and its commands run as written (no GPU, no model build).

* Every option of ``tools/preprocess_dialog.py``, ``pretrain_dialog.py`` and
  ``tools/convert_checkpoint.py`` (both subcommands), taken from the tools' own parsers, appears
  on a page of docs/ (an on/off switch by either of its forms, ``--X`` / ``--no-X``).
* Every command in a ``bash`` code block of docs/, README.md and examples/README.md that calls
  one of these tools is expanded by bash and parsed by the tool's parser and config checks
  (training launches also against their world size and, with ``--use-checkpoint-args``, the
  architecture of the model the page imports), with the helpers of tests/test_examples.py: a
  renamed or misspelt flag fails here.
"""

import argparse
import glob
import os
import re

import pytest

from tests.test_examples import (TOOLS, checkpoints, commands_in, hf_model, imported_models,
                                 parse_tool, parse_training)

__all__ = ["hf_model"]  # the fixture, shared with test_examples.py

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
WITH_COMMANDS = PAGES + [os.path.join(ROOT, "README.md"), os.path.join(ROOT, "examples", "README.md")]
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.M | re.S)


def _parsers():
    """(tool, parser) of the three tools; each subcommand of convert_checkpoint on its own."""
    import pretrain_dialog
    from tools import convert_checkpoint, preprocess_dialog

    yield "tools/preprocess_dialog.py", preprocess_dialog.build_parser()
    yield "pretrain_dialog.py", pretrain_dialog.build_parser()
    for action in convert_checkpoint.build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield f"tools/convert_checkpoint.py {name}", sub


def tool_options():
    """{tool: [the option strings of each action (one entry per action)]}, --help left out."""
    return {tool: [action.option_strings for action in parser._actions
                   if action.option_strings and not isinstance(action, argparse._HelpAction)]
            for tool, parser in _parsers()}


def _documented(flag: str, text: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_every_flag_is_documented():
    text = "\n".join(open(page, encoding="utf-8").read() for page in PAGES)
    options = tool_options()
    assert len(options["pretrain_dialog.py"]) > 150  # the parsers were read, not empty
    missing = [f"{tool}: {' / '.join(flags)}" for tool, actions in options.items()
               for flags in actions if not any(_documented(flag, text) for flag in flags)]
    assert not missing, "flags documented on no page of docs/:\n" + "\n".join(missing)


def test_an_undocumented_flag_is_found():
    """The search above fails on a flag that appears only inside a longer one."""
    assert _documented("--lora-rank", "`--lora-rank 16`")
    assert not _documented("--lora", "`--lora-rank 16`")
    assert not _documented("--seq-length", "`--no-seq-length-check`")


def _blocks(path):
    return BLOCK.findall(open(path, encoding="utf-8").read())


def test_pages_open_with_their_commands():
    """Each page of docs/ (but the index) starts, after its title, with a bash block."""
    for page in PAGES:
        if os.path.basename(page) == "README.md":
            continue
        body = open(page, encoding="utf-8").read().split("\n", 1)[1].lstrip("\n")
        assert body.startswith("```bash\n"), f"{page}: does not open with its commands"


@pytest.mark.parametrize("path", WITH_COMMANDS, ids=lambda p: os.path.relpath(p, ROOT))
def test_commands_parse(path, monkeypatch, hf_model):
    blocks = _blocks(path)
    models = imported_models("\n".join(blocks))
    checked = 0
    for block in blocks:
        for tool in TOOLS:
            for argv in commands_in(block, tool):
                if "--help" in argv:
                    continue
                if tool == "pretrain_dialog.py":
                    with checkpoints(monkeypatch, hf_model, models):
                        parse_training(argv)
                else:
                    parse_tool(argv)
                checked += 1
    calls = sum(block.count(tool) for block in blocks for tool in TOOLS)
    assert checked >= calls - sum(block.count("--help") for block in blocks), \
        f"{path}: {calls} tool calls in its bash blocks, {checked} parsed"


def test_the_manual_has_commands_to_check():
    total = sum(len(commands_in(block, tool)) for path in WITH_COMMANDS
                for block in _blocks(path) for tool in TOOLS)
    assert total >= 25, f"only {total} tool commands found in the manual's bash blocks"


def test_links_resolve():
    """Every relative link of the manual, the README and examples/README.md names a file."""
    broken = []
    for path in WITH_COMMANDS:
        text = re.sub(r"^```.*?^```", "", open(path, encoding="utf-8").read(), flags=re.M | re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^[a-z]+://", target) or target.startswith("#"):
                continue
            file = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(path, ROOT)}: {target}")
    assert not broken, "links to nothing:\n" + "\n".join(broken)
