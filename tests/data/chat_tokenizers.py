"""Hugging Face tokenizers of base models with realistic chat templates, built on the session's
byte-level BPE tokenizer (``hf_tokenizer_dir``: same vocabulary and merges), for ``--template hf``.

``hf_base_chatml_dir``: as Qwen2.5 base models ship: eos ``<|endoftext|>``, a ChatML template
whose replies end with ``<|im_end|>`` (and a default system message when none is given).
``hf_llama3_dir``: Llama 3 style: bos ``<|begin_of_text|>``, eos ``<|end_of_text|>``, headers
``<|start_header_id|>role<|end_header_id|>\\n\\n``, every message (trimmed) ended by ``<|eot_id|>``.
Both templates are written here from the documented layouts. In both, the end-of-turn a model
must learn and stop at is not the tokenizer's eos.

The fixtures are registered by ``tests/conftest.py``.
"""

from __future__ import annotations

import os

import pytest

BASE_CHATML_JINJA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' -}}"
    "{%- else -%}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}{%- if message['role'] != 'system' -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3_JINJA = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' -}}"
    "{{- message['content'] | trim -}}{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>"]


def build_tokenizer(source_dir: str, folder: str, template: str, extra_specials=(),
                    extra_tokens=(), **special_tokens) -> str:
    """The tokenizer of ``source_dir`` (its ``tokenizer.json``) with ``extra_specials`` added as
    special tokens and ``extra_tokens`` as ordinary added tokens (as Qwen's ``<think>``,
    ``<tool_call>``), the given bos/eos/pad tokens and ``template``, saved into ``folder``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(os.path.join(source_dir, "tokenizer.json"))
    backend.add_special_tokens(list(extra_specials))
    backend.add_tokens(list(extra_tokens))
    fast = PreTrainedTokenizerFast(tokenizer_object=backend, **special_tokens)
    fast.chat_template = template
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def hf_base_chatml_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """ChatML on a base model's tokenizer: eos ``<|endoftext|>``, replies end ``<|im_end|>``."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_base_chatml")),
                           BASE_CHATML_JINJA, eos_token="<|endoftext|>",
                           pad_token="<|endoftext|>",
                           additional_special_tokens=["<|im_start|>", "<|im_end|>"])


@pytest.fixture(scope="session")
def hf_llama3_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Llama 3 style: bos ``<|begin_of_text|>``, eos ``<|end_of_text|>``, replies end
    ``<|eot_id|>``."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_llama3")),
                           LLAMA3_JINJA, LLAMA3_SPECIALS, bos_token="<|begin_of_text|>",
                           eos_token="<|end_of_text|>",
                           additional_special_tokens=LLAMA3_SPECIALS[2:])


# -- tool calling and reasoning templates (written from the documented prompt layouts) ----------
# Each is written once with Hugging Face's ``{% generation %}`` marks around what the model writes
# (reply + end-of-turn): the tokenizers get the template without the marks, as real models ship
# them; ``marked(...)`` keeps them for ``apply_chat_template(return_assistant_tokens_mask=True)``,
# the independent account of what should be trained.

GENERATION, END_GENERATION = "{%- generation -%}", "{%- endgeneration -%}"


def unmarked(template: str) -> str:
    """``template`` without its ``{% generation %}`` marks (what the tokenizers ship)."""
    return template.replace(GENERATION, "").replace(END_GENERATION, "")


_HERMES_TOOLS = (
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}"
    "{%- for tool in tools -%}{{- '\\n' + (tool | tojson) -}}{%- endfor -%}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n"
    "{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>' -}}"
)
_HERMES_CALLS = (  # after the content: each call on its own line, as <tool_call> JSON
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set function = call['function'] if call['function'] is defined else call -%}"
    "{%- if content or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n{\"name\": \"' + function['name'] + '\", \"arguments\": ' -}}"
    "{%- if function['arguments'] is string -%}{{- function['arguments'] -}}"
    "{%- else -%}{{- function['arguments'] | tojson -}}{%- endif -%}"
    "{{- '}\\n</tool_call>' -}}"
    "{%- endfor -%}"
)
_HERMES_RESULTS = (  # consecutive tool results share one user turn
    "{%- if loop.first or body[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|im_start|>user' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- if loop.last or body[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{- '<|im_end|>\\n' -}}{%- endif -%}"
)
_CHATML_USER = "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' -}}"
_CHATML_PROMPT = ("{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
                  "{%- endif -%}")

QWEN25_TOOLS_JINJA = (
    # Qwen2.5: a default system message; tools described in it (Hermes function calling)
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] -%}{%- set body = messages[1:] -%}"
    "{%- else -%}{%- set system = 'You are a helpful assistant.' -%}{%- set body = messages -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>system\\n' + system -}}"
    "{%- if tools -%}{{- '\\n\\n' -}}" + _HERMES_TOOLS + "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- for message in body -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'user' -%}" + _CHATML_USER +
    "{%- elif message['role'] == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}"
    + GENERATION + "{{- content -}}" + _HERMES_CALLS + "{{- '<|im_end|>' -}}" + END_GENERATION +
    "{{- '\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}" + _HERMES_RESULTS +
    "{%- endif -%}{%- endfor -%}" + _CHATML_PROMPT
)

QWEN3_JINJA = (
    # Qwen3, as its model card and chat template document it: ChatML with Hermes tool calling,
    # no default system message (a system block when the first message is a system message or
    # tools are given: its text, a blank line, the tools). Thinking: an assistant message after
    # the last user query (a user message that is not a <tool_response> block) is written with
    # <think>\n{reasoning}\n</think>\n\n before its content (leading newlines removed) when it has
    # reasoning or is the last message (an empty block then); earlier ones without it. The
    # reasoning is reasoning_content, else the text a </think> in the content closes (after the
    # last <think> before it; the content is then what follows the last </think>). With
    # enable_thinking false the generation prompt ends with an empty block.
    "{%- set has_system = messages and messages[0]['role'] == 'system' -%}"
    "{%- set body = messages[1:] if has_system else messages -%}"
    "{%- if has_system or tools -%}{{- '<|im_start|>system\\n' -}}"
    "{%- if has_system -%}{{- messages[0]['content'] -}}"
    "{%- if tools -%}{{- '\\n\\n' -}}{%- endif -%}{%- endif -%}"
    "{%- if tools -%}" + _HERMES_TOOLS + "{%- endif -%}{{- '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- set ns = namespace(query=body | length - 1, found=false) -%}"
    "{%- for message in body | reverse -%}"
    "{%- set text = message['content'] if message['content'] is string else '' -%}"
    "{%- if not ns.found and message['role'] == 'user' and not (text.startswith("
    "'<tool_response>') and text.endswith('</tool_response>')) -%}"
    "{%- set ns.found = true -%}{%- set ns.query = body | length - 1 - loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- for message in body -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'user' -%}" + _CHATML_USER +
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if message['reasoning_content'] is string -%}"
    "{%- set reasoning = message['reasoning_content'] -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- else -%}{%- set reasoning = '' -%}{%- endif -%}"
    "{{- '<|im_start|>assistant\\n' -}}" + GENERATION +
    "{%- if loop.index0 > ns.query and (loop.last or reasoning) -%}"
    "{{- '<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') -}}"
    "{%- else -%}{{- content -}}{%- endif -%}"
    + _HERMES_CALLS + "{{- '<|im_end|>' -}}" + END_GENERATION + "{{- '\\n' -}}"
    "{%- elif message['role'] == 'tool' -%}" + _HERMES_RESULTS +
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
QWEN_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>",
               "</think>"]

LLAMA31_JINJA = (
    # Llama 3.1: a system header with the knowledge date, JSON tool calling (the functions in
    # the first user message, one call per reply as {"name", "parameters"}, results in ipython
    # turns); every text trimmed
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] | trim -%}{%- set body = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- set body = messages -%}{%- endif -%}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}"
    "{%- if tools -%}{{- 'Environment: ipython\\n' -}}{%- endif -%}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n' + system"
    " + '<|eot_id|>' -}}"
    "{%- set ns = namespace(described=false) -%}"
    "{%- for message in body -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}"
    "{%- if tools and not ns.described -%}{%- set ns.described = true -%}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with "
    "its proper arguments that best answers the given prompt.\\n\\nRespond in the format "
    "{\"name\": function name, \"parameters\": dictionary of argument name and its value}. Do "
    "not use variables.\\n\\n' -}}"
    "{%- for tool in tools -%}{{- (tool | tojson(indent=4)) + '\\n\\n' -}}{%- endfor -%}"
    "{%- endif -%}"
    "{{- (message['content'] | trim) + '<|eot_id|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}" + GENERATION +
    "{%- if message['tool_calls'] -%}"
    "{%- if message['tool_calls'] | length > 1 -%}"
    "{{- raise_exception('This model only supports single tool-calls at once!') -}}"
    "{%- endif -%}"
    "{%- set function = message['tool_calls'][0]['function'] -%}"
    "{{- '{\"name\": \"' + function['name'] + '\", \"parameters\": '"
    " + (function['arguments'] | tojson) + '}' -}}"
    "{%- else -%}{{- message['content'] | trim -}}{%- endif -%}"
    "{{- '<|eot_id|>' -}}" + END_GENERATION +
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + (message['content'] | trim)"
    " + '<|eot_id|>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
LLAMA31_SPECIALS = LLAMA3_SPECIALS + ["<|eom_id|>", "<|python_tag|>"]


@pytest.fixture(scope="session")
def hf_qwen25_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Qwen2.5 style: ChatML with a default system message and Hermes tool calling."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_qwen25")),
                           unmarked(QWEN25_TOOLS_JINJA), extra_tokens=QWEN_TOKENS,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           additional_special_tokens=["<|im_start|>"])


@pytest.fixture(scope="session")
def hf_qwen3_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Qwen3 style: Hermes tool calling and <think> reasoning, earlier reasoning left out."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_qwen3")),
                           unmarked(QWEN3_JINJA), extra_tokens=QWEN_TOKENS,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           additional_special_tokens=["<|im_start|>"])


@pytest.fixture(scope="session")
def hf_llama31_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Llama 3.1 style: JSON tool calling with ipython results, trimmed text."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_llama31")),
                           unmarked(LLAMA31_JINJA), LLAMA31_SPECIALS,
                           bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                           pad_token="<|end_of_text|>",
                           additional_special_tokens=LLAMA31_SPECIALS[2:])
