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


# -- the 2026 families' layouts (written here from their documented prompt formats) ------------

QWEN3_INLINE_JINJA = QWEN3_JINJA.replace(
    # QwQ / DeepSeek-R1-distill style: Qwen3's layout reading the reasoning ONLY from a
    # <think>...</think> block at the start of the content (no reasoning_content)
    "{%- if message['reasoning_content'] is string -%}"
    "{%- set reasoning = message['reasoning_content'] -%}"
    "{%- elif '</think>' in content -%}", "{%- if '</think>' in content -%}")
QWEN3_THINKING_JINJA = QWEN3_JINJA.replace("reasoning_content", "thinking")
"""Qwen3's layout reading the reasoning from ``thinking`` (where gpt-oss's template reads it)."""

GLM45_SPECIALS = ["[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|observation|>"]
GLM45_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>",
                "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>"]
GLM45_JINJA = (
    # GLM-4.5: [gMASK]<sop>, role tags <|system|> <|user|> <|assistant|> <|observation|> and NO
    # end token: a reply ends where the next tag begins (serving stops at <|user|> and
    # <|observation|>). The tools are described in a system block; a reply is
    # "\n<think>{reasoning}</think>" when it has reasoning_content and follows the last user
    # message, else "\n<think></think>", then "\n" + its content (trimmed) when it has one, then
    # each call as "\n<tool_call>{name}\n<arg_key>k</arg_key>\n<arg_value>v</arg_value>\n...
    # </tool_call>" (a JSON-string argument written as given). Tool results share one
    # <|observation|> turn, each in <tool_response>. enable_thinking false: the generation
    # prompt gets an empty think block.
    "{{- '[gMASK]<sop>' -}}"
    "{%- if tools -%}{{- '<|system|>\\n# Tools\\n\\nYou may call one or more functions to "
    "assist with the user query.\\n\\nYou are provided with function signatures within "
    "<tools></tools> XML tags:\\n<tools>\\n' -}}"
    "{%- for tool in tools -%}{{- (tool | tojson) + '\\n' -}}{%- endfor -%}"
    "{{- '</tools>\\n\\nFor each function call, output the function name and arguments within "
    "the following XML format:\\n<tool_call>{function-name}\\n<arg_key>{arg-key-1}</arg_key>\\n"
    "<arg_value>{arg-value-1}</arg_value>\\n...\\n</tool_call>' -}}{%- endif -%}"
    "{%- set ns = namespace(query=-1) -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'user' -%}"
    "{%- set ns.query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] in ('system', 'user') -%}"
    "{{- '<|' + message['role'] + '|>\\n' + content -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|assistant|>' -}}" + GENERATION +
    "{%- set reasoning = message['reasoning_content'] if message['reasoning_content'] is string"
    " else '' -%}"
    "{%- if loop.index0 > ns.query and reasoning.strip() -%}"
    "{{- '\\n<think>' + reasoning.strip() + '</think>' -}}"
    "{%- else -%}{{- '\\n<think></think>' -}}{%- endif -%}"
    "{%- if content.strip() -%}{{- '\\n' + content.strip() -}}{%- endif -%}"
    "{%- for call in message['tool_calls'] or [] -%}"
    "{%- set function = call['function'] -%}"
    "{{- '\\n<tool_call>' + function['name'] + '\\n' -}}"
    "{%- if function['arguments'] is mapping -%}"
    "{%- for key, value in function['arguments'].items() -%}"
    "{{- '<arg_key>' + key + '</arg_key>\\n<arg_value>' + (value if value is string else "
    "value | tojson) + '</arg_value>\\n' -}}{%- endfor -%}"
    "{%- else -%}{{- function['arguments'] + '\\n' -}}{%- endif -%}"
    "{{- '</tool_call>' -}}{%- endfor -%}" + END_GENERATION +
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' -%}"
    "{{- '<|observation|>' -}}{%- endif -%}"
    "{{- '\\n<tool_response>\\n' + content + '\\n</tool_response>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}"
    "{{- '\\n<think></think>' -}}{%- endif -%}{%- endif -%}"
)

DEEPSEEK_V3_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>",
                        "<｜Assistant｜>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
                        "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>",
                        "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>",
                        "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"]
DEEPSEEK_V3_JINJA = (
    # DeepSeek-V3: bos, the system text bare, <｜User｜>{content}, <｜Assistant｜>{content} ended
    # by <｜end▁of▁sentence｜> (the eos); calls as <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>
    # function<｜tool▁sep｜>{name}\n```json\n{arguments}\n```<｜tool▁call▁end｜>...
    # <｜tool▁calls▁end｜>; results in one <｜tool▁outputs▁begin｜> block, each in
    # <｜tool▁output▁begin｜>...<｜tool▁output▁end｜>; the reply after results has no
    # <｜Assistant｜> (nor has the generation prompt after them). Tools are described after the
    # system text as "## Tools" with one "### name" section each (V3.1's layout).
    "{{- bos_token -}}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{{- message['content'] -}}{%- endfor -%}"
    "{%- if tools -%}{{- '\n\n## Tools\nYou have access to the following tools:\n' -}}"
    "{%- for tool in tools -%}{{- '\n### ' + tool['function']['name'] + '\nDescription: ' + "
    "tool['function']['description'] + '\n\nParameters: ' + "
    "(tool['function']['parameters'] | tojson) + '\n' -}}{%- endfor -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- set after_tool = not loop.first and messages[loop.index0 - 1]['role'] == 'tool' -%}"
    "{%- if message['role'] == 'user' -%}{{- '<｜User｜>' + content -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- if not after_tool -%}{{- '<｜Assistant｜>' -}}{%- endif -%}" + GENERATION +
    "{{- content -}}"
    "{%- if message['tool_calls'] -%}{{- '<｜tool▁calls▁begin｜>' -}}"
    "{%- for call in message['tool_calls'] -%}"
    "{%- set arguments = call['function']['arguments'] -%}"
    "{{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' + call['function']['name'] + "
    "'\\n```json\\n' + (arguments if arguments is string else arguments | tojson) + "
    "'\\n```<｜tool▁call▁end｜>' -}}{%- endfor -%}{{- '<｜tool▁calls▁end｜>' -}}{%- endif -%}"
    "{{- '<｜end▁of▁sentence｜>' -}}" + END_GENERATION +
    "{%- elif message['role'] == 'tool' -%}"
    "{%- if not after_tool -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- endif -%}"
    "{{- '<｜tool▁output▁begin｜>' + content + '<｜tool▁output▁end｜>' -}}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' -%}"
    "{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt and messages[-1]['role'] != 'tool' -%}"
    "{{- '<｜Assistant｜>' -}}{%- endif -%}"
)

GEMMA3_SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"]
GEMMA3_JINJA = (
    # Gemma 3: <bos>; the system text put before the first user message's (a blank line
    # between); each message <start_of_turn>{user|model}\n{content trimmed}<end_of_turn>\n;
    # the generation prompt <start_of_turn>model\n. No tools, no reasoning.
    "{{- bos_token -}}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\\n\\n' -%}{%- set body = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set body = messages -%}{%- endif -%}"
    "{%- for message in body -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if role == 'model' -%}" + GENERATION +
    "{{- message['content'] | trim -}}{{- '<end_of_turn>' -}}" + END_GENERATION +
    "{%- else -%}{{- ((prefix if loop.first else '') + message['content']) | trim -}}"
    "{{- '<end_of_turn>' -}}{%- endif -%}{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)


@pytest.fixture(scope="session")
def hf_qwen3_inline_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Qwen3's layout reading reasoning only inline (<think> block of the content)."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_qwen3_inline")),
                           unmarked(QWEN3_INLINE_JINJA), extra_tokens=QWEN_TOKENS,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           additional_special_tokens=["<|im_start|>"])


@pytest.fixture(scope="session")
def hf_qwen3_thinking_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Qwen3's layout reading reasoning from ``thinking``."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_qwen3_thinking")),
                           unmarked(QWEN3_THINKING_JINJA), extra_tokens=QWEN_TOKENS,
                           eos_token="<|im_end|>", pad_token="<|endoftext|>",
                           additional_special_tokens=["<|im_start|>"])


@pytest.fixture(scope="session")
def hf_glm45_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """GLM-4.5: replies closed by the next role tag, no end token; eos <|endoftext|>."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_glm45")),
                           unmarked(GLM45_JINJA), GLM45_SPECIALS, extra_tokens=GLM45_TOKENS,
                           eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                           additional_special_tokens=GLM45_SPECIALS)


@pytest.fixture(scope="session")
def hf_deepseek_v3_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """DeepSeek-V3: replies end with the eos <｜end▁of▁sentence｜>."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_deepseek_v3")),
                           unmarked(DEEPSEEK_V3_JINJA), DEEPSEEK_V3_SPECIALS,
                           bos_token=DEEPSEEK_V3_SPECIALS[0], eos_token=DEEPSEEK_V3_SPECIALS[1],
                           pad_token=DEEPSEEK_V3_SPECIALS[1],
                           additional_special_tokens=DEEPSEEK_V3_SPECIALS[2:])


@pytest.fixture(scope="session")
def hf_gemma3_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """Gemma 3: replies end with <end_of_turn>, eos <eos>."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_gemma3")),
                           unmarked(GEMMA3_JINJA), GEMMA3_SPECIALS, bos_token="<bos>",
                           eos_token="<eos>", pad_token="<eos>",
                           additional_special_tokens=GEMMA3_SPECIALS[2:])

GPT_OSS_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|start|>", "<|end|>", "<|message|>",
                    "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>"]
GPT_OSS_JINJA = (
    # gpt-oss, the harmony format: every message <|start|>{role}<|message|>...<|end|>; a system
    # message with the channels, a developer message with the instructions (the system text)
    # and the tools as a TypeScript-like namespace. An assistant message is written on
    # channels: its reasoning (``thinking``) as <|start|>assistant<|channel|>analysis<|message|>
    # ...<|end|> only after the last user message (dropped from earlier turns), each tool call
    # as <|start|>assistant<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>
    # {arguments}<|call|>, its text as <|start|>assistant<|channel|>final<|message|>{content}
    # closed by <|return|> when it is the last message (what the model emits; serving stops at
    # <|return|> and <|call|>) and by <|end|> in the history. Tool results: <|start|>functions.
    # {name} to=assistant<|channel|>commentary<|message|>{content}<|end|>. The generation prompt
    # is <|start|>assistant.
    "{{- '<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI."
    "\\nReasoning: medium\\n\\n# Valid channels: analysis, commentary, final. Channel must be "
    "included for every message.' -}}"
    "{%- if tools -%}{{- '\\nCalls to these tools must go to the commentary channel: "
    "\\'functions\\'.' -}}{%- endif -%}{{- '<|end|>' -}}"
    "{%- set has_system = messages[0]['role'] == 'system' -%}"
    "{%- set body = messages[1:] if has_system else messages -%}"
    "{%- if has_system or tools -%}{{- '<|start|>developer<|message|>' -}}"
    "{%- if has_system -%}{{- '# Instructions\\n\\n' + messages[0]['content'] -}}"
    "{%- if tools -%}{{- '\\n\\n' -}}{%- endif -%}{%- endif -%}"
    "{%- if tools -%}{{- '# Tools\\n\\n## functions\\n\\nnamespace functions {\\n\\n' -}}"
    "{%- for tool in tools -%}{{- '// ' + tool['function']['description'] + '\\ntype ' + "
    "tool['function']['name'] + ' = (_: ' + (tool['function']['parameters'] | tojson) + "
    "') => any;\\n\\n' -}}{%- endfor -%}{{- '} // namespace functions' -}}{%- endif -%}"
    "{{- '<|end|>' -}}{%- endif -%}"
    "{%- set ns = namespace(query=-1) -%}"
    "{%- for message in body -%}{%- if message['role'] == 'user' -%}"
    "{%- set ns.query = loop.index0 -%}{%- endif -%}{%- endfor -%}"
    "{%- for message in body -%}"
    "{%- set content = message['content'] if message['content'] is string else '' -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<|start|>user<|message|>' + content + '<|end|>' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- '<|start|>assistant' -}}" + GENERATION +
    "{%- if loop.index0 > ns.query and message['thinking'] is string and message['thinking'] -%}"
    "{{- '<|channel|>analysis<|message|>' + message['thinking'] + '<|end|><|start|>assistant' -}}"
    "{%- endif -%}"
    "{%- if message['tool_calls'] -%}"
    "{%- for call in message['tool_calls'] -%}{%- set arguments = call['function']['arguments'] -%}"
    "{%- if not loop.first -%}{{- '<|start|>assistant' -}}{%- endif -%}"
    "{{- '<|channel|>commentary to=functions.' + call['function']['name'] + ' <|constrain|>json"
    "<|message|>' + (arguments if arguments is string else arguments | tojson) + '<|call|>' -}}"
    "{%- endfor -%}"
    "{%- else -%}{{- '<|channel|>final<|message|>' + content -}}"
    "{{- '<|return|>' if loop.last else '<|end|>' -}}{%- endif -%}" + END_GENERATION +
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '<|start|>functions.' + (message['name'] if message['name'] is string else 'tool') + "
    "' to=assistant<|channel|>commentary<|message|>' + content + '<|end|>' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}"
)


@pytest.fixture(scope="session")
def hf_gpt_oss_dir(hf_tokenizer_dir, tmp_path_factory) -> str:
    """gpt-oss (harmony): the last reply ends <|return|>, history replies <|end|>, calls
    <|call|>; reasoning read from ``thinking``, dropped before the last user message."""
    return build_tokenizer(hf_tokenizer_dir, str(tmp_path_factory.mktemp("hf_gpt_oss")),
                           unmarked(GPT_OSS_JINJA), GPT_OSS_SPECIALS,
                           bos_token="<|startoftext|>", eos_token="<|return|>",
                           pad_token="<|endoftext|>",
                           additional_special_tokens=GPT_OSS_SPECIALS[2:])
