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
                    **special_tokens) -> str:
    """The tokenizer of ``source_dir`` (its ``tokenizer.json``) with ``extra_specials`` added as
    special tokens, the given bos/eos/pad tokens and ``template``, saved into ``folder``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_file(os.path.join(source_dir, "tokenizer.json"))
    backend.add_special_tokens(list(extra_specials))
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
