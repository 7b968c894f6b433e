"""A saved run, loaded outside training: what a ``--save`` folder records beside its checkpoints,
and the run's model in one process (generation, export, the GPU check).

    CKPT/
      config.json         the run record (``write_run_record``): command, config (model,
                          parallel, data, optim, train sections), data (``training.data.DataInfo``:
                          tokenizer, template, special ids, seq length, vocabulary size) and
                          source (the Hugging Face model an import came from); written at the
                          end of training and by hf-to-mcore
      tokenizer/          a copy of the run's tokenizer files (``bundle_tokenizer``)
      iter_0000200/       checkpoints (``training.checkpoint``), each with the run's config in
        mt_dialog_config.json

``read_run_info`` reads the record (for a run stopped before writing it: the iteration's config
plus the dataset metadata); ``run_tokenizer``, ``run_template`` and ``run_render_options`` give
the tokenizer, chat template and rendering options the run trained with; ``inference_config``,
``single_process_model`` and ``load_inference_model`` build its model at TP = PP = 1, into which
megatron-core ``dist_checkpointing`` reshards a checkpoint saved at any layout.

Every failure is a ``SavedRunError`` (a ValueError) saying what to pass or fix. The checkpoint
format itself (tracker, save, load, vocabulary fitting) is ``training.checkpoint``'s; a live
training run is ``training.loop.Run``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

RUN_RECORD = "config.json"
ITERATION_RECORD = "run.json"  # iter_N/run.json: the run record of the run that saved iter_N
BUNDLED_TOKENIZER = "tokenizer"  # CKPT/tokenizer: a copy of the run's tokenizer files


class SavedRunError(ValueError):
    """A saved run cannot be loaded (folder, record, tokenizer, template, weights); the message
    says what to do."""


class TokenizerMissing(SavedRunError):
    """The run's tokenizer is neither where it was recorded nor copied into the checkpoint;
    the caller says how to pass its location (``tools/chat.py --tokenizer-model``...)."""


# -- the run record ----------------------------------------------------------------------------

def _read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise SavedRunError(f"{path}: unreadable ({exc})") from None


def run_record(command: Optional[Sequence[str]], config: Dict[str, Any],
               data: Optional[Dict[str, Any]], source: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The run record: the command line, the run config (``to_dict`` of a
    ``DialogTrainingConfig``), its data record (``to_dict`` of a ``DataInfo``; None for an import
    without tokenizer) and the Hugging Face model it descends from (None: trained from scratch).
    Written as ``root/config.json`` (``write_run_record``) and, by every checkpoint save, as
    ``iter_N/run.json`` (``ITERATION_RECORD``: the record of that iteration's run)."""
    return {"command": list(command) if command else None, "config": config, "data": data,
            "source": source or None}


def write_run_record(root: str, command: Optional[Sequence[str]], config: Dict[str, Any],
                     data: Optional[Dict[str, Any]], source: Optional[Dict[str, Any]]) -> None:
    """Write ``root/config.json`` (``run_record``) whole or not at all (``files``)."""
    from mt_dialog.files import write_json_atomic

    os.makedirs(root, exist_ok=True)
    write_json_atomic(os.path.join(root, RUN_RECORD), run_record(command, config, data, source))


def source_info(root: str) -> Dict[str, Any]:
    """What ``CKPT/config.json`` says about the Hugging Face model the run descends from
    (architecture, vocabulary rows, max positions...; written by hf-to-mcore and carried on by
    every run that loads it); empty when there is none."""
    try:
        with open(os.path.join(root, RUN_RECORD), encoding="utf-8") as handle:
            return dict(json.load(handle).get("source") or {})
    except (OSError, ValueError, AttributeError):
        return {}


def read_run_info(root: str, iteration: Optional[int] = None) -> Dict[str, Any]:
    """``{"iteration": int, "config": dict, "data": dict}`` of the checkpoint folder ``root`` at
    its newest (or ``iteration``) checkpoint: ``config`` and ``data`` as ``write_run_record``
    wrote them, or, for a run stopped before the end, the iteration's config and the data record
    of its first dataset (``data`` may lack the template; see ``dataset_template``).

    Raises:
        SavedRunError: no such folder, no complete checkpoint, neither record readable.
    """
    from mt_dialog.training.checkpoint import CheckpointError, iteration_dir, latest_iteration

    if not os.path.isdir(root):
        raise SavedRunError(f"checkpoint {root}: no such folder; pass the --save folder of a "
                            "training run")
    try:
        iteration = latest_iteration(root) if iteration is None else int(iteration)
    except (CheckpointError, ValueError) as exc:
        message = str(exc)  # written for --load; here the folder may come from elsewhere
        raise SavedRunError("checkpoint " + message[len("--load "):]
                            if message.startswith("--load ") else message) from None
    path = iteration_dir(root, iteration)
    if not os.path.isdir(path):
        raise SavedRunError(f"checkpoint {root}: {path} is missing")
    for record in (os.path.join(path, ITERATION_RECORD), os.path.join(root, RUN_RECORD)):
        if os.path.isfile(record):  # the iteration's own first: root/config.json may be stale
            saved = _read_json(record)
            return {"iteration": iteration, "config": saved["config"], "data": saved["data"]}
    iter_config = os.path.join(path, "mt_dialog_config.json")
    if not os.path.isfile(iter_config):
        raise SavedRunError(f"checkpoint {root}: neither config.json nor {iter_config}; is it a "
                            "folder written by pretrain_dialog.py --save?")
    config = _read_json(iter_config)
    return {"iteration": iteration, "config": config, "data": _data_of_first_dataset(config)}


def _data_of_first_dataset(config: Dict[str, Any]) -> Dict[str, Any]:
    """The data record training would have written, from the metadata of the run's first
    dataset (``--data-path``, weights skipped)."""
    from mt_dialog.config_utils import to_dict
    from mt_dialog.data.storage import DatasetFormatError, read_metadata
    from mt_dialog.training.data import data_info

    items = list(config["data"]["data_path"])
    try:
        float(items[0])
        prefix = items[1]
    except ValueError:
        prefix = items[0]
    try:
        meta = read_metadata(prefix)
    except DatasetFormatError as exc:
        raise SavedRunError(f"the checkpoint has no config.json and its dataset cannot be read "
                            f"({exc})") from None
    return to_dict(data_info(meta, [prefix]))


def dataset_template(data: Dict[str, Any]) -> Optional[str]:
    """The ``--template`` of the run's data record, else of the first of its datasets whose
    metadata can still be read; None when neither says."""
    if data.get("template"):
        return data["template"]
    from mt_dialog.data.storage import DatasetFormatError, read_metadata

    for prefix in data.get("prefixes", []):
        try:
            return read_metadata(prefix)["template"]
        except (DatasetFormatError, KeyError):
            continue
    return None


# -- the run's tokenizer, template and rendering -----------------------------------------------

def bundle_tokenizer(root: str, tokenizer_info: Dict[str, Any]) -> Optional[str]:
    """Copy the run's tokenizer (a SentencePiece ``.model`` file, or a Hugging Face folder's
    tokenizer files) into ``root/tokenizer`` once, so that a checkpoint folder moved to another
    machine still chats and exports; returns a warning when the tokenizer cannot be found."""
    from mt_dialog.data.tokenizers import tokenizer_files

    source, target = tokenizer_info.get("path") or "", os.path.join(root, BUNDLED_TOKENIZER)
    if os.path.isdir(target):
        return None
    if not os.path.exists(source):
        return (f"warning: the run's tokenizer {source} is gone; {target} is not written (chat "
                "and export will need the tokenizer's location)")
    from mt_dialog.files import remove_gone, temp_path

    remove_gone(target)
    tmp = temp_path(target)
    os.makedirs(tmp, exist_ok=True)
    # a folder's config.json too: transformers picks the tokenizer class by the model type
    names = [os.path.basename(source)] if os.path.isfile(source) else tokenizer_files(source) + [
        name for name in ("config.json",) if os.path.isfile(os.path.join(source, name))]
    for name in names:
        origin = source if os.path.isfile(source) else os.path.join(source, name)
        shutil.copy2(origin, os.path.join(tmp, name))
    os.replace(tmp, target)
    return None


def bundled_tokenizer(root: str, tokenizer_info: Dict[str, Any]) -> Optional[str]:
    """The copy of the run's tokenizer in ``root/tokenizer`` (training's ``bundle_tokenizer``,
    or hf-to-mcore's), as a path ``load_tokenizer`` takes (the ``.model`` file for
    SentencePiece); None when there is none."""
    folder = os.path.join(root, BUNDLED_TOKENIZER)
    if tokenizer_info.get("type") == "sentencepiece":
        path = os.path.join(folder, os.path.basename(tokenizer_info.get("path") or ""))
        return path if os.path.isfile(path) else None
    return folder if os.path.isdir(folder) else None


def run_tokenizer(path: str, data: Optional[Dict[str, Any]], tokenizer_path: Optional[str]):
    """The ``DialogTokenizer`` the run at ``path`` trained with (its data record ``data``): from
    ``tokenizer_path`` when given (it moved), else where it was recorded, else the copy in
    ``CKPT/tokenizer``; with the special tokens the template appended.

    Raises:
        TokenizerMissing: neither the recorded tokenizer nor a copy can be loaded.
        SavedRunError: no tokenizer recorded; ``tokenizer_path`` unloadable or another tokenizer
            (its sha256 differs from the recorded one).
    """
    from mt_dialog.data.tokenizers import TokenizerError, load_tokenizer, tokenizer_from_metadata

    if not data or not data.get("tokenizer"):
        raise SavedRunError(f"checkpoint {path} records no tokenizer (converted from a "
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
        if tokenizer.sha256 == tok_info["sha256"] or not bundled:
            return _same_tokenizer(tokenizer, tok_info, tok_info["path"], path)
        tokenizer_path = bundled  # the recorded files changed since training: the run's copy
    try:
        tokenizer = load_tokenizer(tok_info["type"], tokenizer_path)
    except TokenizerError as exc:
        raise SavedRunError(str(exc)) from None
    tokenizer.added_tokens = dict(tok_info.get("added_tokens", {}))
    return _same_tokenizer(tokenizer, tok_info, tokenizer_path, path)


def _same_tokenizer(tokenizer, tok_info: Dict[str, Any], where: str, path: str):
    """``tokenizer`` when its files hash as the run recorded (other files give other ids than
    training's, silently), else ``SavedRunError`` naming both."""
    if tokenizer.sha256 != tok_info["sha256"]:
        raise SavedRunError(
            f"tokenizer {where} is not the one the run {path} trained with (sha256 "
            f"{tokenizer.sha256[:12]}... != recorded {tok_info['sha256'][:12]}...; the files "
            "changed since training); pass the original files with --tokenizer-path")
    return tokenizer


def run_render_options(data: Optional[Dict[str, Any]]):
    """The ``RenderOptions`` (--train-on, --reasoning) the run's dataset was built with (the
    defaults for runs that recorded none: imports, older datasets)."""
    from mt_dialog.data.render import RenderOptions

    return RenderOptions(**((data or {}).get("render_options") or {}))


def run_template(name: str, tokenizer, special: Dict[str, Any]):
    """``(resolved template, or None for the tokenizer's own; end-of-turn id)`` of a run trained
    with ``--template name`` (``special``: the record's ``special_ids``). The end-of-turn is
    ``render.end_of_turn_id``'s (as preprocessing records it), checked against the recorded one.

    Raises:
        SavedRunError: an unknown template, one the tokenizer cannot serve, or an end-of-turn id
            other than the run's.
    """
    from mt_dialog.data.render import end_of_turn_id, resolve_template
    from mt_dialog.data.templates import HF_TEMPLATE, get_template
    from mt_dialog.data.tokenizers import TokenizerError

    try:
        end_of_turn = end_of_turn_id(name, tokenizer)
        resolved = None if name == HF_TEMPLATE else resolve_template(get_template(name), tokenizer)
    except (ValueError, TokenizerError) as exc:
        raise SavedRunError(str(exc)) from None
    recorded = special.get("end_of_turn", end_of_turn)
    # datasets made with --template hf before the end-of-turn was derived recorded eos instead
    stale = name == HF_TEMPLATE and recorded == special.get("eos")
    if int(recorded) != end_of_turn and not stale:
        raise SavedRunError(
            f"template {name}: end-of-turn id {end_of_turn} but the run trained with "
            f"{recorded}; pass the template the dataset was built with")
    return resolved, end_of_turn


def run_stops(name: str, tokenizer, special: Dict[str, Any]) -> Tuple[int, ...]:
    """Every id a reply of a run trained with ``--template name`` may end with
    (``render.stop_ids``, the end-of-turn first), with those the dataset recorded
    (``special["stops"]``). Raises ``SavedRunError`` as ``run_template``."""
    from mt_dialog.data.render import stop_ids
    from mt_dialog.data.tokenizers import TokenizerError

    try:
        found = list(stop_ids(name, tokenizer))
    except (ValueError, TokenizerError) as exc:
        raise SavedRunError(str(exc)) from None
    return tuple(found + [int(i) for i in special.get("stops", ()) if int(i) not in found])


# -- the run's model in one process ------------------------------------------------------------

def single_process_config(model, optim=None, lora=None):
    """A complete ``DialogTrainingConfig`` around ``model`` (a ``ModelConfig``) for one process
    without data (generation, conversion): every parallel size 1; data and training are
    placeholders; ``optim`` (an ``OptimConfig``) only says the precision; ``lora`` (a
    ``LoraConfig``) gives the model the run's adapters."""
    from mt_dialog.training.config import (
        DataConfig,
        DialogTrainingConfig,
        LoraConfig,
        OptimConfig,
        ParallelConfig,
        TrainConfig,
    )

    return DialogTrainingConfig(model=model, parallel=ParallelConfig(),
                                data=DataConfig(data_path=["-"]), optim=optim or OptimConfig(),
                                train=TrainConfig(train_iters=1), lora=lora or LoraConfig())


def inference_config(saved: Dict[str, Any]):
    """The run's model (and optimizer precision) from its saved config (``to_dict`` of a
    ``DialogTrainingConfig``) in a ``single_process_config``: recompute off, Transformer Engine
    layers only where TE is usable (same checkpoint keys), vocabulary padding 1 so the model gets
    exactly the checkpoint's rows (``vocab_rows``), the run's LoRA adapters (if any). Fields a
    newer version added take their defaults; a saved null is a derived default
    (``ModelConfig.__post_init__``)."""
    import dataclasses

    from mt_dialog.training.config import LoraConfig, ModelConfig, OptimConfig
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
    # a converted checkpoint has no optimizer section: defaults; FP8 is for training GEMMs only
    # (generation and conversion run in the saved bf16 / fp16 / fp32, on any machine)
    optim = {k: v for k, v in (saved.get("optim") or {}).items() if not k.startswith("fp8_")}
    return single_process_config(build(ModelConfig, model),
                                 build(OptimConfig, optim),
                                 build(LoraConfig, saved.get("lora") or {}))


def single_process_model(config, rows: int, seq_length: int, dtype: Optional[torch.dtype] = None,
                         initialize: bool = True, seed: int = 1234) -> torch.nn.Module:
    """The GPTModel of ``config`` (a ``single_process_config``) in this process, on its device,
    with ``rows`` vocabulary rows and RoPE for ``seq_length`` tokens (``transformer_config``
    says what ``dtype`` and ``initialize`` do); sets up the one-process groups first
    (``distributed.initialize_single_process``: ValueError under torchrun)."""
    from mt_dialog.training import distributed
    from mt_dialog.training.model import build_model_chunks, transformer_config

    distributed.initialize_single_process(seed)
    tconfig = transformer_config(config, dtype=dtype, initialize=initialize)
    (model,) = build_model_chunks(config, tconfig, rows, seq_length)
    return model


def vocab_rows(root: str, iteration: int, default: int) -> int:
    """Rows of the word embedding in the checkpoint ``root`` at ``iteration`` (the padded
    vocabulary it was saved with; a LoRA checkpoint's base's), ``default`` when it stores none.

    Raises:
        SavedRunError: the checkpoint's metadata cannot be read.
        CheckpointError: a LoRA checkpoint's base is missing or changed
            (``lora_checkpoint.checked_base``).
    """
    from mt_dialog.training.checkpoint import iteration_dir, stored_vocab_rows
    from mt_dialog.training.lora_checkpoint import checked_base

    folder = iteration_dir(root, iteration)
    try:
        rows = stored_vocab_rows(folder)
    except Exception as exc:  # dist_checkpointing raises several kinds
        raise SavedRunError(f"checkpoint {root}: unreadable metadata ({type(exc).__name__}: "
                            f"{exc})") from None
    pointer = checked_base(root, iteration) if rows is None else None  # CheckpointError
    if pointer:  # a LoRA checkpoint: the base holds the embedding
        return vocab_rows(pointer["path"], int(pointer["iteration"]), default)
    return rows or default


def load_inference_model(root: str, info: Dict[str, Any], seed: int = 1234) -> torch.nn.Module:
    """The run's GPTModel (``info``: ``read_run_info``'s) in this process with the weights of
    its checkpoint at ``info["iteration"]``, in eval mode: exactly the checkpoint's vocabulary
    rows (logits ``[batch, seq, rows]``), the saved precision.

    Raises:
        SavedRunError: the metadata or the weights cannot be read into the model.
    """
    from mt_dialog.training.checkpoint import load_weights_for_inference

    data = info["data"]
    rows = vocab_rows(root, info["iteration"], int(data["vocab_size"]))
    model = single_process_model(inference_config(info["config"]), rows,
                                 int(data["seq_length"]), seed=seed)
    try:
        load_weights_for_inference(root, [model], info["iteration"])
    except Exception as exc:  # dist_checkpointing raises several kinds
        raise SavedRunError(f"checkpoint {root}: cannot load the weights into the "
                            f"single-process model ({type(exc).__name__}: {exc})") from None
    return model.eval()
