"""Generate assistant replies from a trained checkpoint, in one process (TP=1, PP=1).

    from mt_dialog.generate import Generator

    generator = Generator.from_checkpoint("ckpt")            # a folder written by --save
    generator.reply([{"role": "user", "content": "What is 3 plus 4?"}])              # greedy
    generator.reply(messages, greedy=False, top_p=0.9, temperature=0.8, seed=1)      # sampling

How it works:

* The run's configuration comes from ``CKPT/config.json`` (written at the end of training: the
  config and the data info, i.e. tokenizer, vocabulary size, sequence length, special ids) or, if
  it is absent (a run stopped after an intermediate save), from ``iter_*/mt_dialog_config.json``
  plus the dataset metadata. The chat template is the one recorded in the metadata of the dataset
  the run trained on (``--data-path``); pass ``template=`` when that dataset is gone.
* The model is the library's GPTModel (``build_model_chunks``) with every parallel size set to 1;
  megatron-core ``dist_checkpointing`` reshards a checkpoint saved at any TP/PP layout into it
  (``load_weights_for_inference``). The embedding has exactly the checkpoint's (padded) rows;
  logits beyond the tokenizer's vocabulary are never chosen.
* The prompt is ``render_prompt(messages, template, tokenizer.encode)``: the conversation laid out
  as in training, ending with the reply opener. Each new token re-runs the full causal forward
  over the unpadded sequence (no KV cache, no packed params: one sequence is one segment, and
  RoPE positions start at 0 as they do for every conversation in training).
* Decoding stops at the template's end-of-turn id or the tokenizer's eos (returned as the last
  generated id; the stops of the exported ``generation_config.json``), at ``max_new_tokens``,
  or when the sequence reaches the training sequence length.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Union

import torch

from mt_dialog.data.formats import Message

MessageLike = Union[Message, Dict[str, str]]
FINISH_REASONS = ("end_of_turn", "eos", "max_new_tokens", "seq_length")


class GenerationError(ValueError):
    """A checkpoint, tokenizer or request cannot be used; the message says what to do."""


class TokenizerMissing(GenerationError):
    """The run's tokenizer is neither where it was recorded nor copied into the checkpoint;
    the caller says how to pass its location (``tools/chat.py --tokenizer-model``...)."""


@dataclass
class GenerationResult:
    """One generated reply."""

    text: str  # the reply, without the end-of-turn token
    token_ids: List[int]  # generated ids; the last one is the end-of-turn id if it stopped there
    prompt_ids: List[int]
    finish_reason: str  # one of FINISH_REASONS


# -- configuration ----------------------------------------------------------------------------

def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise GenerationError(f"{path}: unreadable ({exc})") from None


def read_run_info(root: str, iteration: Optional[int] = None) -> Dict[str, Any]:
    """``{"iteration", "config", "data"}`` of a checkpoint folder (``data`` may lack the
    template; see ``Generator.from_checkpoint``)."""
    from mt_dialog.training.checkpoint import CheckpointError, iteration_dir, latest_iteration

    if not os.path.isdir(root):
        raise GenerationError(f"checkpoint {root}: no such folder; pass the --save folder of a "
                              "training run")
    try:
        iteration = latest_iteration(root) if iteration is None else int(iteration)
    except (CheckpointError, ValueError) as exc:
        raise GenerationError(str(exc).replace("--load ", "checkpoint ")) from None
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise GenerationError(f"checkpoint {root}: {path} is missing")
    run_config = os.path.join(root, "config.json")
    if os.path.isfile(run_config):
        saved = _read_json(run_config)
        return {"iteration": iteration, "config": saved["config"], "data": saved["data"]}
    iter_config = os.path.join(path, "mt_dialog_config.json")
    if not os.path.isfile(iter_config):
        raise GenerationError(f"checkpoint {root}: neither config.json nor {iter_config}; is it a "
                              "folder written by pretrain_dialog.py --save?")
    config = _read_json(iter_config)
    return {"iteration": iteration, "config": config, "data": _data_info_from_datasets(config)}


def _data_info_from_datasets(config: Dict[str, Any]) -> Dict[str, Any]:
    """The data info training would compute, from the metadata of the first dataset."""
    from mt_dialog.data.storage import DatasetFormatError, read_metadata, render_options_of

    items = list(config["data"]["data_path"])
    try:
        float(items[0])
        prefix = items[1]
    except ValueError:
        prefix = items[0]
    try:
        meta = read_metadata(prefix)
    except DatasetFormatError as exc:
        raise GenerationError(f"the checkpoint has no config.json and its dataset cannot be read "
                              f"({exc})") from None
    return {"prefixes": [prefix], "seq_length": int(meta["seq_length"]),
            "render_options": render_options_of(meta),
            "vocab_size": int(meta["tokenizer"]["vocab_size"]), "tokenizer": meta["tokenizer"],
            "special_ids": meta["special_ids"], "template": meta["template"]}


def dataset_template(data: Dict[str, Any]) -> Optional[str]:
    if data.get("template"):
        return data["template"]
    from mt_dialog.data.storage import DatasetFormatError, read_metadata

    for prefix in data.get("prefixes", []):
        try:
            return read_metadata(prefix)["template"]
        except (DatasetFormatError, KeyError):
            continue
    return None


def single_process_config(model, optim=None):
    """A complete ``DialogTrainingConfig`` around ``model`` for one process without data
    (generation, conversion): every parallel size 1; data and training are placeholders."""
    from mt_dialog.training.config import (
        DataConfig,
        DialogTrainingConfig,
        OptimConfig,
        ParallelConfig,
        TrainConfig,
    )

    return DialogTrainingConfig(model=model, parallel=ParallelConfig(),
                                data=DataConfig(data_path=["-"]), optim=optim or OptimConfig(),
                                train=TrainConfig(train_iters=1))


def inference_config(saved: Dict[str, Any]):
    """The run's model (and optimizer precision) in a ``single_process_config``; the model gets
    exactly the checkpoint's vocabulary rows (see ``vocab_rows``)."""
    import dataclasses

    from mt_dialog.training.config import ModelConfig, OptimConfig
    from mt_dialog.training.model import transformer_engine_usable

    def build(cls, values):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    model = dict(saved["model"])
    model["make_vocab_size_divisible_by"] = 1
    model.update(recompute_activations=False, recompute_granularity=None,  # training only
                 recompute_method=None, recompute_num_layers=None)
    if model.get("transformer_impl") == "transformer_engine" and not transformer_engine_usable():
        model["transformer_impl"] = "local"  # same sharded keys; TE needs CUDA
    # a converted checkpoint has no optimizer section: defaults
    return single_process_config(build(ModelConfig, model),
                                 build(OptimConfig, saved.get("optim", {})))


def single_process_model(config, rows: int, seq_length: int, dtype: Optional[torch.dtype] = None,
                         initialize: bool = True, seed: int = 1234) -> torch.nn.Module:
    """The GPTModel of ``config`` (a ``single_process_config``) in this process, with ``rows``
    vocabulary rows (``transformer_config`` says what ``dtype`` and ``initialize`` do)."""
    from mt_dialog.training.model import build_model_chunks, transformer_config

    ensure_single_process(seed)
    tconfig = transformer_config(config, dtype=dtype, initialize=initialize)
    (model,) = build_model_chunks(config, tconfig, rows, seq_length)
    return model


def vocab_rows(root: str, iteration: int, default: int) -> int:
    """Rows of the checkpoint's word embedding (the padded vocabulary it was saved with)."""
    from mt_dialog.training.checkpoint import iteration_dir, stored_vocab_rows

    try:
        rows = stored_vocab_rows(iteration_dir(root, iteration))
    except Exception as exc:  # dist_checkpointing raises several kinds
        raise GenerationError(f"checkpoint {root}: unreadable metadata ({type(exc).__name__}: "
                              f"{exc})") from None
    return rows or default


_OWNED = {"process_group": False, "model_parallel": False}


def ensure_single_process(seed: int) -> None:
    """torch.distributed with one rank and megatron-core groups of size 1 (idempotent)."""
    from megatron.core import parallel_state as ps

    from mt_dialog.training import distributed

    distributed.quiet_megatron_import_warnings()
    if torch.distributed.is_initialized():
        if torch.distributed.get_world_size() != 1:
            raise GenerationError("generation runs in a single process; this one is part of a "
                                  f"world of {torch.distributed.get_world_size()} (run it "
                                  "without torchrun)")
        if ps.model_parallel_is_initialized():
            if (ps.get_tensor_model_parallel_world_size() == 1
                    and ps.get_pipeline_model_parallel_world_size() == 1):
                return
            ps.destroy_model_parallel()
    else:
        # one rank, whatever a surrounding launcher put in the environment
        torch.distributed.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            store=torch.distributed.HashStore(), rank=0, world_size=1)
        _OWNED["process_group"] = True
    distributed.initialize(1, 1, None, seed)
    _OWNED["model_parallel"] = True


def shutdown() -> None:
    """Tear down the megatron-core groups and the process group that loading a generator set up
    (for a process that goes on to train or to build another layout); a generator used again
    afterwards sets them up again."""
    from megatron.core import parallel_state as ps

    if _OWNED["model_parallel"] and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if _OWNED["process_group"] and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNED.update(process_group=False, model_parallel=False)


# -- sampling ----------------------------------------------------------------------------------

def next_token(logits: torch.Tensor, greedy: bool = True, temperature: float = 1.0,
               top_p: float = 1.0, generator: Optional[torch.Generator] = None) -> int:
    """One id from a 1-D tensor of logits: argmax, or nucleus (top-p) sampling at
    ``temperature`` (the smallest set of most likely ids whose probability reaches ``top_p``)."""
    logits = logits.float()
    if greedy or temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass of the more likely ids
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # the first is always kept
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if max_new_tokens < 1:
        raise GenerationError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise GenerationError(f"temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise GenerationError(f"top_p: must be in (0, 1], got {top_p}")


def to_messages(messages: Sequence[MessageLike]) -> List[Message]:
    """Messages from ``Message`` objects or OpenAI / Hugging Face message dicts (``{"role",
    "content"}``, ``tool_calls``, ...), checked by the training data's role rules
    (``formats.validate_prompt``: ending with a user message or a tool result to reply to).
    A null system message is left out. Raises ``GenerationError`` naming the message."""
    from mt_dialog.data.formats import RecordError, message_from_dict, validate_prompt

    out, names = [], []
    try:
        for index, message in enumerate(messages):
            name = f"message {index}"
            if not isinstance(message, Message):
                message = message_from_dict(message, name)
            if message is not None:
                out.append(message)
                names.append(name)
        validate_prompt(out, names)
    except RecordError as exc:
        raise GenerationError(exc.message) from None
    return out


def run_tokenizer(path: str, data: Optional[Dict[str, Any]], tokenizer_path: Optional[str]):
    """The tokenizer the run trained with (from ``tokenizer_path`` when it moved; an imported
    checkpoint's copy in ``CKPT/tokenizer`` when the recorded path is gone)."""
    from mt_dialog.data.inspect import tokenizer_from_metadata
    from mt_dialog.data.tokenizers import TokenizerError, load_tokenizer
    from mt_dialog.training.checkpoint import bundled_tokenizer

    if not data or not data.get("tokenizer"):
        raise GenerationError(f"checkpoint {path} records no tokenizer (converted from a "
                              "folder without tokenizer files); fine-tune it on a dataset "
                              "first, or convert a folder that has the tokenizer")
    tok_info = dict(data["tokenizer"])
    bundled = bundled_tokenizer(path, tok_info)  # training and hf-to-mcore copy it into CKPT
    if not tokenizer_path and not os.path.exists(tok_info["path"]) and bundled:
        tokenizer_path = bundled
    if not tokenizer_path:
        tokenizer = tokenizer_from_metadata({"tokenizer": tok_info})
        if tokenizer is None:
            raise TokenizerMissing(f"the run's tokenizer {tok_info['path']} cannot be loaded "
                                   f"and {path} holds no copy of it (CKPT/tokenizer)")
        return tokenizer
    try:
        tokenizer = load_tokenizer(tok_info["type"], tokenizer_path)
    except TokenizerError as exc:
        raise GenerationError(str(exc)) from None
    if tokenizer.sha256 != tok_info["sha256"]:
        raise GenerationError(f"tokenizer {tokenizer_path} is not the one the run trained "
                              f"with ({tok_info['path']}, sha256 {tok_info['sha256'][:12]}...)")
    tokenizer.added_tokens = dict(tok_info.get("added_tokens", {}))
    return tokenizer


def run_render_options(data: Optional[Dict[str, Any]]):
    """The ``RenderOptions`` (--train-on, --reasoning) the run's dataset was built with (the
    defaults for runs that recorded none: imports, older datasets)."""
    from mt_dialog.data.render import RenderOptions

    return RenderOptions(**((data or {}).get("render_options") or {}))


def run_template(name: str, tokenizer, special: Dict[str, Any]):
    """``(resolved template, or None for the tokenizer's own; end-of-turn id)`` of a run trained
    with ``--template name``. The end-of-turn is ``render.end_of_turn_id``'s (as preprocessing
    records it), checked against the id the run recorded. Raises ``GenerationError``."""
    from mt_dialog.data.render import end_of_turn_id, resolve_template
    from mt_dialog.data.templates import HF_TEMPLATE, get_template
    from mt_dialog.data.tokenizers import TokenizerError

    try:
        end_of_turn = end_of_turn_id(name, tokenizer)
        resolved = None if name == HF_TEMPLATE else resolve_template(get_template(name), tokenizer)
    except (ValueError, TokenizerError) as exc:
        raise GenerationError(str(exc)) from None
    recorded = special.get("end_of_turn", end_of_turn)
    # datasets made with --template hf before the end-of-turn was derived recorded eos instead
    stale = name == HF_TEMPLATE and recorded == special.get("eos")
    if int(recorded) != end_of_turn and not stale:
        raise GenerationError(
            f"template {name}: end-of-turn id {end_of_turn} but the run trained with "
            f"{recorded}; pass the template the dataset was built with")
    return resolved, end_of_turn


# -- the generator -----------------------------------------------------------------------------

class Generator:
    """A trained model, its tokenizer and chat template, ready to reply."""

    def __init__(self, model: torch.nn.Module, tokenizer, template, end_of_turn: int,
                 vocab_size: int, seq_length: int, template_name: str = "",
                 iteration: Optional[int] = None, seed: int = 1234, options=None) -> None:
        from mt_dialog.data.render import RenderOptions

        self.model = model
        self.options = options or RenderOptions()  # the run's --train-on / --reasoning
        self.seed = seed
        self.tokenizer = tokenizer
        self.template = template  # ResolvedTemplate, or None for the tokenizer's own ("hf")
        self.template_name = template_name
        self.end_of_turn = int(end_of_turn)
        self.vocab_size = int(vocab_size)  # real ids; the padded logits beyond are never chosen
        self.seq_length = int(seq_length)
        self.iteration = iteration
        self.device = next(model.parameters()).device

    @classmethod
    def from_checkpoint(cls, path: str, iteration: Optional[int] = None,
                        tokenizer_path: Optional[str] = None, template: Optional[str] = None,
                        seed: int = 1234) -> "Generator":
        """Load the newest (or ``iteration``) checkpoint under ``path`` (a ``--save`` folder).
        ``tokenizer_path``/``template`` override what the run recorded (moved files)."""
        from mt_dialog.training.checkpoint import load_weights_for_inference

        info = read_run_info(path, iteration)
        data = info["data"]
        tokenizer = run_tokenizer(path, data, tokenizer_path)
        name = template or dataset_template(data)
        if name is None:
            raise GenerationError(
                f"the chat template is recorded in the dataset metadata of {data.get('prefixes')}, "
                "which cannot be read; pass it (--template / template=)")
        resolved, end_of_turn = run_template(name, tokenizer, data["special_ids"])

        rows = vocab_rows(path, info["iteration"], int(data["vocab_size"]))
        model = single_process_model(inference_config(info["config"]), rows,
                                     int(data["seq_length"]), seed=seed)
        try:
            load_weights_for_inference(path, [model], info["iteration"])
        except Exception as exc:  # dist_checkpointing raises several kinds
            raise GenerationError(f"checkpoint {path}: cannot load the weights into the "
                                  f"single-process model ({type(exc).__name__}: {exc})") from None
        model.eval()
        return cls(model, tokenizer, resolved, end_of_turn, int(data["vocab_size"]),
                   int(data["seq_length"]), name, info["iteration"], seed,
                   run_render_options(data))

    # -- prompt ------------------------------------------------------------------------------
    def prompt_ids(self, messages: Sequence[MessageLike]) -> List[int]:
        """The generation prompt, exactly as conversations were laid out in training."""
        from mt_dialog.data.render import render_prompt
        from mt_dialog.data.render_hf import render_prompt_with_chat_template

        checked = to_messages(messages)
        if self.template is None:  # the tokenizer's own Jinja template
            return render_prompt_with_chat_template(checked, self.tokenizer.hf)
        return render_prompt(checked, self.template, self.tokenizer.encode, self.options)

    # -- decoding ----------------------------------------------------------------------------
    @torch.no_grad()
    def next_logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits of the token after ``ids`` (one causal forward over the whole sequence)."""
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():  # after shutdown()
            ensure_single_process(self.seed)
        tokens = torch.tensor([list(ids)], dtype=torch.int64, device=self.device)
        positions = torch.arange(tokens.shape[1], device=self.device)[None, :]
        with warnings.catch_warnings():  # megatron-core: "tp_group is None" on every linear
            warnings.simplefilter("ignore", DeprecationWarning)
            logits = self.model(tokens, positions, None)  # [1, s, padded vocab]
        return logits[0, -1, : self.vocab_size]

    def generate_ids(self, prompt_ids: Sequence[int], max_new_tokens: int = 128,
                     greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                     seed: Optional[int] = None):
        """``(generated ids, finish_reason)``; the ids end with the end-of-turn (or eos) id when
        it was produced: decoding stops at both, as ``transformers`` does with the exported
        ``generation_config.json``. Sampling with the same ``seed`` gives the same reply."""
        _check_sampling(max_new_tokens, temperature, top_p)
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise GenerationError("the prompt is empty")
        if len(ids) >= self.seq_length:
            raise GenerationError(f"the prompt has {len(ids)} tokens; the model was trained on "
                                  f"sequences of {self.seq_length}: shorten the conversation")
        rng = None
        if not greedy:
            rng = torch.Generator()
            rng.manual_seed(int(seed) if seed is not None else torch.seed())
        new: List[int] = []
        while True:
            token = next_token(self.next_logits(ids), greedy, temperature, top_p, rng)
            new.append(token)
            ids.append(token)
            if token == self.end_of_turn:
                return new, "end_of_turn"
            if token == self.tokenizer.eos_id:  # as the export's generation_config stops
                return new, "eos"
            if len(new) >= max_new_tokens:
                return new, "max_new_tokens"
            if len(ids) >= self.seq_length:
                return new, "seq_length"

    def generate(self, messages: Sequence[MessageLike], max_new_tokens: int = 128,
                 greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
                 seed: Optional[int] = None) -> GenerationResult:
        """The assistant's next reply to ``messages`` (ending with a user message)."""
        prompt = self.prompt_ids(messages)
        new, reason = self.generate_ids(prompt, max_new_tokens, greedy, temperature, top_p, seed)
        text_ids = new[:-1] if reason in ("end_of_turn", "eos") else new
        return GenerationResult(self.tokenizer.decode(text_ids), new, prompt, reason)

    def reply(self, messages: Sequence[MessageLike], max_new_tokens: int = 128,
              greedy: bool = True, temperature: float = 1.0, top_p: float = 1.0,
              seed: Optional[int] = None) -> str:
        """The text of the next reply (see ``generate``)."""
        return self.generate(messages, max_new_tokens, greedy, temperature, top_p, seed).text
