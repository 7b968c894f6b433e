"""Hugging Face folder <-> megatron-core distributed checkpoint (``tools/convert_checkpoint.py``).

``hf-to-mcore`` writes a checkpoint folder laid out like a training run's::

    CKPT/
      latest_checkpointed_iteration.txt     "0"
      iter_0000000/                         dist_checkpointing: the model's sharded tensors (the
        mt_dialog_config.json               same keys at any TP/PP), weights_only = True; the
                                            model flags (--use-checkpoint-args reads them)
      config.json                           model + tokenizer + chat template (tools/chat.py)
      tokenizer/                            the Hugging Face tokenizer files and the model's
                                            config.json (the model type picks the tokenizer
                                            class), copied

so that ``pretrain_dialog.py --load CKPT --finetune --use-checkpoint-args`` starts from it at any
tensor/pipeline layout (the vocabulary rows are fitted on load, see ``training.checkpoint``) and
``tools/chat.py --load CKPT`` talks to it. ``mcore-to-hf`` reads any checkpoint (training's or
imported) into one process and writes config.json, generation_config.json, safetensors (sharded
above --max-shard-size, with an index) and the run's tokenizer (appended special tokens added)
with its chat template, checked to give training's token ids when loaded as users load it.

The conversion model is megatron-core's GPTModel at TP = PP = 1 built in one process, so
conversion needs memory for the whole model once (use --dtype bf16 to halve it).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from mt_dialog.config_utils import option, to_dict
from mt_dialog.convert.families import (
    ARCHITECTURES,
    FAMILIES,
    ConversionError,
    Family,
    check_names,
    iter_hf_to_mcore,
    read_hf_config,
)
from mt_dialog.convert.families.common import SafetensorsFolder
from mt_dialog.training.config import ModelConfig
from mt_dialog.training.saved_run import (
    SavedRunError,
    dataset_template,
    inference_config,
    read_run_info,
    run_render_options,
    run_stops,
    run_template,
    run_tokenizer,
    single_process_config,
    single_process_model,
    source_info,
    write_run_record,
)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class ImportConfig:
    """hf-to-mcore: a Hugging Face folder of a registered family (``convert.families``) -> a
    megatron-core checkpoint."""

    load_dir: str = option(help="Hugging Face model folder (config.json, safetensors, "
                           "tokenizer files)", metavar="HF_DIR")
    save_dir: str = option(help="checkpoint folder to create (then: pretrain_dialog.py --load "
                           "CKPT --finetune --use-checkpoint-args)", metavar="CKPT")
    template: Optional[str] = option(None, help="chat template tools/chat.py uses with this "
                                     "checkpoint (default: hf, the tokenizer's own, when it has "
                                     "one)")
    seq_length: Optional[int] = option(None, help="longest conversation tools/chat.py handles "
                                       "(default: the config's max_position_embeddings)")
    dtype: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="dtype of the saved weights (auto: the config's dtype)")
    progress: bool = option(True, help="progress bars")

    def __post_init__(self) -> None:
        if self.seq_length is not None and self.seq_length <= 0:
            raise ValueError(f"seq_length: must be positive, got {self.seq_length}")


@dataclass
class ExportConfig:
    """mcore-to-hf: a checkpoint (pretrain_dialog.py --save, or hf-to-mcore) -> Hugging Face."""

    load_dir: str = option(help="checkpoint folder (any TP/PP layout)", metavar="CKPT")
    save_dir: str = option(help="Hugging Face folder to create", metavar="HF_DIR")
    iteration: Optional[int] = option(None, help="iteration to export (default: the newest)")
    architecture: str = option("auto", choices=("auto",) + ARCHITECTURES,
                               help="auto: the imported one when it fits, else the first of "
                               "the supported families (in this order) the model is one of")
    dtype: str = option("auto", choices=("auto", "fp32", "bf16", "fp16"),
                        help="dtype of the written weights (auto: the checkpoint's)")
    vocab_size: Optional[int] = option(None, help="embedding rows to write (default: the "
                                       "tokenizer's vocabulary with appended special tokens)")
    max_shard_size: float = option(5.0, help="largest safetensors file in GB; larger models "
                                   "are sharded with model.safetensors.index.json")
    tokenizer_path: Optional[str] = option(None, help="the run's tokenizer, if it moved (.model "
                                           "file or Hugging Face folder)")
    merge_lora: bool = option(False, help="a LoRA checkpoint: write the base with the adapters "
                              "folded into its weights (a plain Hugging Face model) instead of "
                              "a PEFT adapter folder")
    progress: bool = option(True, help="progress bars")

    def __post_init__(self) -> None:
        if self.max_shard_size <= 0:
            raise ValueError(f"max_shard_size: must be positive, got {self.max_shard_size}")
        if self.vocab_size is not None and self.vocab_size <= 0:
            raise ValueError(f"vocab_size: must be positive, got {self.vocab_size}")


# -- shared ------------------------------------------------------------------------------------

def _bar(enabled: bool, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="layer", disable=not enabled, file=sys.stderr)


def conversion_model(model: ModelConfig, rows: int, seq_length: int, dtype: torch.dtype,
                     lora=None):
    """GPTModel at TP = PP = 1 on megatron-core's local layers (the state-dict names the weight
    maps use), with exactly ``rows`` vocabulary rows, weights uninitialized; with ``lora`` (a
    ``LoraConfig``) its adapters."""
    model = dataclasses.replace(model, make_vocab_size_divisible_by=1, transformer_impl="local",
                                recompute_activations=False)
    return single_process_model(single_process_config(model, lora=lora), rows, seq_length,
                                dtype=dtype, initialize=False)


def weights(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The module's tensors by name, without megatron's ``_extra_state`` entries."""
    return {k: v for k, v in module.state_dict().items()
            if not k.endswith("_extra_state") and isinstance(v, torch.Tensor)}


def _copy_into(params: Dict[str, torch.Tensor], tensors: Dict[str, torch.Tensor],
               filled: set) -> None:
    for name, tensor in tensors.items():
        if name not in params:
            raise ConversionError(f"internal: the model has no tensor {name}")
        target = params[name]
        if tuple(target.shape) != tuple(tensor.shape):
            raise ConversionError(f"{name}: shape {tuple(tensor.shape)} from the checkpoint but "
                                  f"the model built from its config expects "
                                  f"{tuple(target.shape)}; is config.json the weights' own?")
        with torch.no_grad():
            target.copy_(tensor)
        filled.add(name)


def _refuse_existing(folder: str) -> None:
    if os.path.exists(folder) and (not os.path.isdir(folder) or os.listdir(folder)):
        raise ConversionError(f"{folder} already exists and is not empty; choose a new folder "
                              "(nothing is overwritten)")


def _staging(folder: str) -> str:
    """An empty temporary folder ``.NAME.tmp-HOST-PID`` beside ``folder``, moved into place when
    all succeeded; the leftovers of killed conversions on this host are removed (``files``)."""
    from mt_dialog import files

    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    hidden = os.path.join(parent, f".{os.path.basename(os.path.abspath(folder))}")
    for removed in files.remove_gone(hidden):
        print(f"removed {removed}, left by an interrupted conversion", file=sys.stderr)
    tmp = files.temp_path(hidden)
    os.makedirs(tmp)
    return tmp


def _publish(tmp: str, folder: str) -> None:
    if os.path.isdir(folder):
        os.rmdir(folder)  # empty (checked first)
    os.replace(tmp, folder)


def _write_json(path: str, value: Any) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2)


# -- hf-to-mcore -------------------------------------------------------------------------------

def _chat_info(tokenizer, template: Optional[str], seq_length: int) -> Dict[str, Any]:
    """The run's data record (``training.data.data_info``, as a dict) of an import, as a dataset
    of ``tokenizer`` and ``template`` would give it: what tools/chat.py and the export read."""
    from mt_dialog.data.render import end_of_turn_id, stop_ids
    from mt_dialog.data.templates import HF_TEMPLATE, template_names
    from mt_dialog.training.data import data_info

    if template is None:
        if not tokenizer.chat_template:
            built_in = [name for name in template_names() if name != HF_TEMPLATE]
            raise ConversionError("the tokenizer has no chat template; pass --template (one of "
                                  f"{', '.join(built_in)})")
        template = HF_TEMPLATE
    try:  # the template's end-of-turn (for hf the token its Jinja puts after every reply)
        end_of_turn = end_of_turn_id(template, tokenizer)
        stops = list(stop_ids(template, tokenizer))
    except ValueError as exc:  # TokenizerError, unknown template
        message = str(exc)
        raise ConversionError(message if message.startswith("--template")
                              else f"--template {template}: {message}") from None
    info = to_dict(tokenizer.info())
    special_ids = {"bos": tokenizer.bos_id, "eos": tokenizer.eos_id, "pad": tokenizer.pad_id,
                   "end_of_turn": end_of_turn, "stops": stops, "added": info["added_tokens"]}
    return to_dict(data_info({"seq_length": seq_length, "tokenizer": info, "template": template,
                              "special_ids": special_ids}))


def _import_tokenizer(cfg: ImportConfig, tmp: str, seq_length: int,
                      model_rows: int) -> Optional[Dict[str, Any]]:
    """Copy the tokenizer files and config.json into ``tmp/tokenizer``; the chat info, or None
    without tokenizer files."""
    from mt_dialog.data.tokenizers import HuggingFaceTokenizer, TokenizerError, tokenizer_files

    names = tokenizer_files(cfg.load_dir)
    if not names:
        print(f"warning: {cfg.load_dir} has no tokenizer files: tools/chat.py cannot use the "
              "imported checkpoint before fine-tuning (training takes the dataset's tokenizer)",
              file=sys.stderr)
        return None
    target = os.path.join(tmp, "tokenizer")
    os.makedirs(target)
    # config.json too: AutoTokenizer picks the tokenizer class by the model type (transformers 5
    # builds Qwen2's own whatever tokenizer_config.json says), so the copy must load as the
    # model folder does, or fine-tuning data would be tokenized unlike the model's users do
    for name in names + ["config.json"]:
        shutil.copy2(os.path.join(cfg.load_dir, name), target)
    try:
        tokenizer = HuggingFaceTokenizer(target)
    except TokenizerError as exc:
        raise ConversionError(f"{cfg.load_dir}: tokenizer: {exc}") from None
    info = _chat_info(tokenizer, cfg.template, seq_length)
    info["tokenizer"]["path"] = os.path.join(os.path.abspath(cfg.save_dir), "tokenizer")
    if tokenizer.vocab_size > model_rows:
        print(f"warning: the tokenizer has {tokenizer.vocab_size} ids (with the template's "
              f"appended special tokens) but the model {model_rows} rows; the new ones get rows "
              "when a fine-tune loads the checkpoint", file=sys.stderr)
    return info


def _fill(model: torch.nn.Module, folder: SafetensorsFolder, family: Family, mc: ModelConfig,
          progress: bool, adapt=None) -> None:
    params = weights(model)
    filled: set = set()
    bar = _bar(progress, mc.num_layers + 1, "hf-to-mcore")
    get = folder.get if adapt is None else (lambda name: adapt(name, folder.get(name)))
    for group in iter_hf_to_mcore(family, get, mc):  # each layer, then the outer ones
        _copy_into(params, group, filled)
        bar.update()
    bar.close()
    missing = sorted(set(params) - filled)
    if missing:
        raise ConversionError(f"internal: model tensors left unfilled: {', '.join(missing[:4])}")


def _save_imported(tmp: str, model: torch.nn.Module, mc: ModelConfig,
                   run_info: Dict[str, Any]) -> None:
    import warnings

    from megatron.core import dist_checkpointing

    from mt_dialog.training.checkpoint import TRACKER, iteration_dir

    path = iteration_dir(tmp, 0)
    os.makedirs(path)
    state = {"model": model.sharded_state_dict(), "weights_only": True, "iteration": 0,
             "consumed_samples": 0, "layout": [1, 1, 1]}
    with warnings.catch_warnings():  # torch.distributed.checkpoint's deprecation notices
        warnings.simplefilter("ignore", FutureWarning)
        dist_checkpointing.save(state, path)
    config = to_dict(single_process_config(mc))
    _write_json(os.path.join(path, "mt_dialog_config.json"), config)
    write_run_record(tmp, run_info["command"], config, run_info["data"], run_info["source"])
    with open(os.path.join(tmp, TRACKER), "w") as handle:
        handle.write("0")


def import_hf(cfg: ImportConfig, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Convert; returns a summary (architecture, sizes, parameters, dtype, folder)."""
    _refuse_existing(cfg.save_dir)
    hf = read_hf_config(cfg.load_dir)
    family = FAMILIES[hf.architecture]
    folder = SafetensorsFolder(cfg.load_dir)
    dropped = check_names(folder, family, hf.model, hf.extras.dropped_prefixes)
    notes = list(hf.extras.notes) + ([f"dropped {len(dropped)} tensor(s) "
                                      f"({dropped[0]}, ...): {hf.extras.dropped_reason}"]
                                     if dropped else [])
    dtype = hf.dtype if cfg.dtype == "auto" else cfg.dtype
    seq_length = cfg.seq_length or hf.max_position_embeddings
    tmp = _staging(cfg.save_dir)
    try:
        data = _import_tokenizer(cfg, tmp, seq_length, hf.vocab_size)
        model = conversion_model(hf.model, hf.vocab_size, seq_length, TORCH_DTYPES[dtype])
        _fill(model, folder, family, hf.model, cfg.progress, hf.extras.adapt)
        source = {"hf_dir": os.path.abspath(cfg.load_dir), "architecture": hf.architecture,
                  "vocab_size": hf.vocab_size, "dtype": dtype,
                  "max_position_embeddings": hf.max_position_embeddings,
                  "bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id,
                  "pad_token_id": hf.pad_token_id}
        _save_imported(tmp, model, hf.model, {"command": argv, "data": data, "source": source})
        _publish(tmp, cfg.save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    parameters = sum(t.numel() for t in weights(model).values())
    return {"architecture": hf.architecture, "layers": hf.model.num_layers,
            "hidden": hf.model.hidden_size, "vocab_rows": hf.vocab_size,
            "parameters": parameters, "dtype": dtype, "folder": cfg.save_dir,
            "template": data["template"] if data else None, "notes": notes}


# -- mcore-to-hf -------------------------------------------------------------------------------

def _load_for_export(cfg: ExportConfig):
    """(model config, run info, TP=1 model with the checkpoint's weights, stored dtype name,
    LoRA config); a LoRA checkpoint's model has its base's weights and its adapters."""
    from megatron.core import dist_checkpointing

    from mt_dialog.training.checkpoint import iteration_dir, load_weights_for_inference, verified
    from mt_dialog.training.lora_checkpoint import checked_base

    info = read_run_info(cfg.load_dir, cfg.iteration)  # SavedRunError: a ValueError, as ours
    saved = inference_config(info["config"])
    mc, lora = saved.model, saved.lora
    if cfg.merge_lora and not lora.enabled:
        raise ConversionError(f"--merge-lora: {cfg.load_dir} is not a LoRA checkpoint (its "
                              "weights are exported as they are); drop the flag")
    weights_dir = iteration_dir(cfg.load_dir, info["iteration"])
    pointer = checked_base(cfg.load_dir, info["iteration"], "--load-dir") if lora.enabled \
        else None
    if pointer:  # the embedding (rows, dtype) is the base's
        weights_dir = iteration_dir(pointer["path"], int(pointer["iteration"]))
    embedding = dist_checkpointing.load_tensors_metadata(verified(weights_dir))[
        "embedding.word_embeddings.weight"]
    stored = DTYPE_NAMES.get(embedding.dtype, "fp32")
    seq_length = int((info.get("data") or {}).get("seq_length") or 4096)
    model = conversion_model(mc, int(embedding.global_shape[0]), seq_length,
                             TORCH_DTYPES[stored], lora if lora.enabled else None)
    load_weights_for_inference(cfg.load_dir, [model], info["iteration"])
    return mc, info, model, stored, lora


def _add_appended(hf_tokenizer, added: Dict[str, int]) -> None:
    """Give the Hugging Face tokenizer the special tokens the run appended, at the same ids."""
    pieces = [piece for piece, _ in sorted(added.items(), key=lambda item: item[1])]
    if pieces:
        hf_tokenizer.add_special_tokens({"additional_special_tokens": pieces})
    for piece, token in added.items():
        if hf_tokenizer.convert_tokens_to_ids(piece) != token:
            raise ConversionError(f"tokenizer: the appended special token {piece!r} has id "
                                  f"{token} in training but "
                                  f"{hf_tokenizer.convert_tokens_to_ids(piece)} in the exported "
                                  "tokenizer")


@dataclass
class ExportedTokenizer:
    """The run's tokenizer on its way into the exported folder."""

    hf: Any  # the Hugging Face tokenizer written to the folder
    run: Any  # the run's DialogTokenizer (training's ids)
    template_name: Optional[str]  # the dataset's --template (None: not recorded)
    template: Any  # its ResolvedTemplate; None for hf (the tokenizer's own) or unknown
    end_of_turn: Optional[int]  # the id every trained reply ends with
    stops: Sequence[int] = ()  # every id a trained reply may end with (end_of_turn first)
    options: Any = None  # the run's RenderOptions (--train-on, --reasoning); None: defaults

    def __post_init__(self) -> None:
        if self.options is None:  # a run that recorded none: the defaults it was built with
            self.options = run_render_options(None)


def _export_tokenizer(cfg: ExportConfig, data: Optional[Dict[str, Any]],
                      out: str) -> Optional[ExportedTokenizer]:
    """The run's tokenizer as a Hugging Face tokenizer (a SentencePiece model's files already
    written into ``out``), or None when the checkpoint records none."""
    if not (data or {}).get("tokenizer"):
        print("warning: the checkpoint records no tokenizer; the folder gets none",
              file=sys.stderr)
        return None
    try:  # the run's tokenizer, where it was recorded, in CKPT/tokenizer or --tokenizer-path
        tokenizer = run_tokenizer(cfg.load_dir, data, cfg.tokenizer_path)
    except SavedRunError as exc:
        raise ConversionError(f"{exc}; pass the run's tokenizer with --tokenizer-path") from None
    name = dataset_template(data)
    template, end_of_turn, stops = None, None, ()
    if name:
        template, end_of_turn = run_template(name, tokenizer, data.get("special_ids") or {})
        stops = run_stops(name, tokenizer, data.get("special_ids") or {})
    return ExportedTokenizer(_hf_tokenizer(tokenizer, out), tokenizer, name, template,
                             end_of_turn, stops, run_render_options(data))


def _hf_tokenizer(tokenizer, out: str):
    """The run's ``tokenizer`` as a Hugging Face tokenizer, appended special tokens included; a
    SentencePiece model is first written into ``out`` (``_write_sentencepiece_config``)."""
    from transformers import AutoTokenizer

    source = tokenizer.path
    if tokenizer.type_name == "sentencepiece":
        _write_sentencepiece_config(tokenizer, out)
        source = out
    hf_tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    if tokenizer.type_name == "sentencepiece":
        hf_tokenizer.init_kwargs["legacy"] = True  # so that save_pretrained writes it again
    _add_appended(hf_tokenizer, tokenizer.added_tokens)
    return hf_tokenizer


def _write_sentencepiece_config(tokenizer, out: str) -> None:
    """``tokenizer.model`` + a ``tokenizer_config.json`` from which ``AutoTokenizer`` builds a
    ``LlamaTokenizer`` encoding like SentencePiece did in training: ``legacy: true`` puts a
    word-start marker after every special token (its Metaspace ``prepend_scheme`` is "always"),
    as SentencePiece starts each separately encoded text piece with one; transformers' default
    (``legacy: false``, "first") drops it, which changes the ids."""
    shutil.copy2(tokenizer.path, os.path.join(out, "tokenizer.model"))
    piece = {name: tokenizer.id_to_piece(token) if token is not None else None
             for name, token in (("bos_token", tokenizer.bos_id),
                                 ("eos_token", tokenizer.eos_id),
                                 ("unk_token", tokenizer.unk_id))}
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {"tokenizer_class": "LlamaTokenizer", "legacy": True, **piece})


def _attach_chat_template(exported: ExportedTokenizer, out: str) -> str:
    """Save the tokenizer into ``out`` (its ``config.json`` already written: AutoTokenizer picks
    the tokenizer class by the model type) with the run's chat template (a built-in template as
    Jinja; for ``hf`` the tokenizer's own), load the folder back as users do
    (``AutoTokenizer.from_pretrained(out)``) and check on probe conversations that its
    ``apply_chat_template`` gives the ids training gave; returns what the chat template is. A
    difference is a warning naming the first differing token."""
    from transformers import AutoTokenizer

    from mt_dialog.convert.chat_template import (
        jinja_chat_template,
        layout_differences,
        training_layout,
    )

    hf_tokenizer, name = exported.hf, exported.template_name
    if not name:
        hf_tokenizer.save_pretrained(out)
        return "none recorded (the tokenizer's own)"
    if exported.template is None:
        candidates, label = [hf_tokenizer.chat_template], f"{name} (the tokenizer's own"
    else:  # see chat_template.jinja_chat_template for word_start
        text_of = lambda token: hf_tokenizer.convert_ids_to_tokens(int(token))  # noqa: E731
        keep = exported.options.reasoning == "keep"  # history reasoning as training kept it
        candidates = [jinja_chat_template(exported.template, text_of, word_start, keep)
                      for word_start in (False, True)]
        label = f"{name} (as Jinja"
    expected = training_layout(exported.template, exported.run, exported.options)
    for candidate in candidates:
        hf_tokenizer.chat_template = candidate
        hf_tokenizer.save_pretrained(out)
        difference = layout_differences(
            AutoTokenizer.from_pretrained(out, trust_remote_code=False), expected)
        if difference is None:
            return (f"{label}; AutoTokenizer.from_pretrained reproduces the training token "
                    "layout exactly)")
    print(f"warning: the exported tokenizer and chat template ({name}), loaded with "
          f"AutoTokenizer.from_pretrained, do not give training's token ids: {difference}",
          file=sys.stderr)
    return f"{label}; token layout differs from training: {difference})"


def _flush(out: str, shard: Dict[str, torch.Tensor], shards: List[Dict[str, Any]]) -> None:
    from safetensors.torch import save_file

    name = f"part-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(out, name), metadata={"format": "pt"})
    shards.append({"file": name, "names": list(shard)})


def write_safetensors(out: str, groups: Iterable[Dict[str, torch.Tensor]], dtype: torch.dtype,
                      max_bytes: int, bar, fp32_suffixes: Tuple[str, ...] = ()) -> int:
    """Write the tensors as ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` +
    ``model.safetensors.index.json`` (no file above ``max_bytes`` unless one tensor is), in
    ``dtype`` but the names ending in ``fp32_suffixes`` (``Family.fp32_hf_suffixes``), which
    stay fp32; returns the total bytes."""
    shards: List[Dict[str, Any]] = []
    shard: Dict[str, torch.Tensor] = {}
    size = total = 0
    for group in groups:
        for name, tensor in group.items():
            keep = name.endswith(fp32_suffixes) if fp32_suffixes else False
            tensor = tensor.detach().to("cpu", torch.float32 if keep else dtype).contiguous()
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > max_bytes:
                _flush(out, shard, shards)
                shard, size = {}, 0
            shard[name] = tensor
            size += nbytes
            total += nbytes
        bar.update()
    if shard:
        _flush(out, shard, shards)
    if len(shards) == 1:
        os.replace(os.path.join(out, shards[0]["file"]), os.path.join(out, "model.safetensors"))
        return total
    weight_map = {}
    for index, item in enumerate(shards, 1):
        final = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        os.replace(os.path.join(out, item["file"]), os.path.join(out, final))
        weight_map.update({name: final for name in item["names"]})
    _write_json(os.path.join(out, "model.safetensors.index.json"),
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    return total


def _architecture(cfg: ExportConfig, mc: ModelConfig, source: Dict[str, Any]) -> str:
    from mt_dialog.convert.families import export_architecture

    return export_architecture(mc, cfg.architecture, source.get("architecture"))


def _write_configs(out: str, mc: ModelConfig, architecture: str, rows: int, dtype: str,
                   exported: Optional[ExportedTokenizer], data: Optional[Dict[str, Any]],
                   source: Dict[str, Any]) -> None:
    """config.json and generation_config.json, which stops at eos and the end-of-turn."""
    from transformers import GenerationConfig

    from mt_dialog.convert.families import hf_config

    hf_tokenizer = exported.hf if exported is not None else None
    end_of_turn = exported.end_of_turn if exported is not None else None
    bos = hf_tokenizer.bos_token_id if hf_tokenizer is not None else source.get("bos_token_id")
    eos = hf_tokenizer.eos_token_id if hf_tokenizer is not None else source.get("eos_token_id")
    # the imported model's pad id when it had one, else the tokenizer's
    pad = source.get("pad_token_id")
    if pad is None and hf_tokenizer is not None:
        pad = hf_tokenizer.pad_token_id
    max_position = int(source.get("max_position_embeddings") or (data or {}).get("seq_length")
                       or 4096)
    hf_config(mc, architecture, rows, max_position, dtype, bos, eos, pad).save_pretrained(out)
    stops = [eos] if isinstance(eos, int) else list(eos or [])
    for stop in ([end_of_turn] if end_of_turn is not None else []) + \
            list(exported.stops if exported is not None else ()):
        if stop not in stops:  # generate() stops at the template's end of turn (every one)
            stops.append(int(stop))
    GenerationConfig(bos_token_id=bos, eos_token_id=stops or None,
                     pad_token_id=pad).save_pretrained(out)


REMOTE_CODE_FILES = ("config.json", "tokenizer_config.json", "generation_config.json")


def _strip_remote_code(out: str) -> None:
    """Drop ``auto_map`` (classes loaded from Python files beside the weights with
    ``trust_remote_code=True``) from the exported JSON files: the export holds no such code and
    its loaders need none."""
    for name in REMOTE_CODE_FILES:
        path = os.path.join(out, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as handle:
            values = json.load(handle)
        if values.pop("auto_map", None) is not None:
            _write_json(path, values)


def export_hf(cfg: ExportConfig, argv: Optional[List[str]] = None) -> Dict[str, Any]:
    """Convert; returns a summary (architecture, rows, dtype, bytes, folder)."""
    _refuse_existing(cfg.save_dir)
    mc, info, model, stored, lora = _load_for_export(cfg)
    source = source_info(cfg.load_dir)
    dtype = stored if cfg.dtype == "auto" else cfg.dtype
    if lora.enabled and not cfg.merge_lora:
        return _export_adapter(cfg, mc, info, model, lora, source, dtype)
    if lora.enabled:
        from mt_dialog.training.lora import merge_into_base

        merge_into_base([model])
    data = info.get("data")
    architecture = _architecture(cfg, mc, source)
    # the imported model's rows (or more when training appended special tokens), never more
    # than the checkpoint has: padding rows would give never-trained ids a logit
    stored_rows = int(model.embedding.word_embeddings.weight.shape[0])
    known = [int(n) for n in (source.get("vocab_size"), (data or {}).get("vocab_size")) if n]
    rows = int(cfg.vocab_size or min(max(known, default=stored_rows), stored_rows))
    tmp = _staging(cfg.save_dir)
    try:
        exported = _export_tokenizer(cfg, data, tmp)
        _write_configs(tmp, mc, architecture, rows, dtype, exported, data, source)
        _strip_remote_code(tmp)
        # after config.json: the model type decides which tokenizer class AutoTokenizer builds
        layout = _attach_chat_template(exported, tmp) if exported else "none (no tokenizer)"
        from mt_dialog.convert.families import iter_mcore_to_hf

        bar = _bar(cfg.progress, mc.num_layers + 1, "mcore-to-hf")
        groups = iter_mcore_to_hf(FAMILIES[architecture], weights(model), mc, rows)
        total = write_safetensors(tmp, groups, TORCH_DTYPES[dtype],
                                  int(cfg.max_shard_size * 1e9), bar,
                                  FAMILIES[architecture].fp32_hf_suffixes)
        bar.close()
        _publish(tmp, cfg.save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"architecture": architecture, "iteration": info["iteration"], "vocab_rows": rows,
            "dtype": dtype, "bytes": total, "folder": cfg.save_dir, "chat_template": layout,
            "merged_lora": lora.enabled}


def _export_adapter(cfg: ExportConfig, mc: ModelConfig, info: Dict[str, Any], model, lora,
                    source: Dict[str, Any], dtype: str) -> Dict[str, Any]:
    """The PEFT adapter folder of a LoRA checkpoint (``convert.lora_export``)."""
    from mt_dialog.convert.lora_export import hf_target_modules, write_adapter

    family = FAMILIES[_architecture(cfg, mc, source)]
    tmp = _staging(cfg.save_dir)
    try:
        total = write_adapter(tmp, weights(model), family, mc, lora, source.get("hf_dir"),
                              TORCH_DTYPES[dtype])
        _publish(tmp, cfg.save_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"adapter": True, "iteration": info["iteration"], "rank": lora.lora_rank,
            "modules": hf_target_modules(family, mc, lora.targets), "dtype": dtype, "bytes": total,
            "folder": cfg.save_dir, "base": source.get("hf_dir")}
