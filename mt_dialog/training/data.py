"""The run's datasets: their record (``DataInfo``, checked across datasets before any model is
built), which packs each data-parallel rank reads at each step, and how a micro-batch of packs
becomes the flattened 'thd' layout the model takes.

The record. ``data_info`` builds it from a dataset's metadata (``OUT.meta.json``); training saves
it as ``data`` in ``CKPT/config.json`` and everything that loads a finished run reads it back
(``saved_run``: tokenizer, template, special ids, sequence length, vocabulary size)::

    prefixes, weights        --data-path (blend)             tokenizer      type, path, sha256...
    valid_prefixes, packs    validation datasets             special_ids    bos, eos, pad,
    seq_length, vocab_size   of the datasets                                end_of_turn, added
    template                 the chat template (--template)  render_options --train-on, --reasoning

Sample order. All datasets (``--data-path 0.7 A 0.3 B``) form one endless stream of packs. One
*round* has ``sum(len(dataset))`` samples; megatron-core's ``build_blending_indices`` decides which
dataset each position of a round reads (by weight), and each dataset walks through its own packs
in a fresh seeded permutation per pass. Sample ``i`` is therefore a pure function of
``(seed, i)``: resuming at ``consumed_samples`` continues exactly where the run stopped.

A step reads the next ``global_batch_size`` samples; micro-batch ``m`` of data-parallel rank
``r`` takes samples ``(m * dp + r) * mbs ... + mbs`` of it, so ranks read distinct packs::

    step samples   | m0 r0 | m0 r1 | m1 r0 | m1 r1 |     (GBS 8, MBS 2, DP 2: 2 micro-batches)

Flattening. A micro-batch of b packs of s tokens becomes one sequence of b*s tokens (``[1, b*s]``)
with ``cu_seqlens`` over all of it: every conversation is a segment and each pack's padding is a
segment of its own, so attention and RoPE positions restart per conversation::

    pack 0: | A A A | B B | p |     pack 1: | C C C C | p p |
    cu_seqlens = [0, 3, 5, 6, 10, 12]                  (s = 6, b = 2)

With ``--packed-attention causal`` the segments are whole packs instead: ``[0, 6, 12]``.

Blends. Each sample says which dataset of the blend it is from (``SampleStream``: megatron-core's
blending index), and a micro-batch of a blend carries it per position (``dataset_ids``), so that
the loss reports of each dataset (``loss.dialog_loss``) are summed exactly like the totals. Text
datasets (continued pretraining, ``storage.dataset_kind``) blend with conversation datasets; the
run's chat template is the first conversation dataset's.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from mt_dialog.data.dataset import PackedDialogDataset
from mt_dialog.data.storage import dataset_kind, read_metadata, render_options_of


@dataclass
class DataInfo:
    """The run's data record (see the module docstring); built by ``data_info``."""

    prefixes: List[str]
    weights: List[float]
    valid_prefixes: List[str]
    seq_length: int
    vocab_size: int
    tokenizer: Dict
    special_ids: Dict
    template: Optional[str] = None  # the chat template of the (first) dataset
    valid_packs: int = 0  # packs in the validation splits of valid_prefixes
    render_options: Dict = field(default_factory=dict)  # --train-on / --reasoning of the data


def data_info(metadata: Dict[str, Any], prefixes: Sequence[str] = (),
              weights: Optional[Sequence[float]] = None, valid_prefixes: Sequence[str] = (),
              valid_packs: int = 0, vocab_size: Optional[int] = None) -> DataInfo:
    """The run's data record from a dataset's ``metadata`` (``read_metadata``; an import builds
    the same keys from its tokenizer: ``tokenizer``, ``special_ids``, ``template``,
    ``seq_length``, optionally the preprocessing ``config``). ``weights`` default to equal;
    ``vocab_size`` to the metadata tokenizer's (a blend takes the largest)."""
    prefixes = list(prefixes)
    return DataInfo(
        prefixes=prefixes, weights=list(weights) if weights is not None else [1.0] * len(prefixes),
        valid_prefixes=list(valid_prefixes), seq_length=int(metadata["seq_length"]),
        vocab_size=int(vocab_size or metadata["tokenizer"]["vocab_size"]),
        tokenizer=dict(metadata["tokenizer"]), special_ids=dict(metadata["special_ids"]),
        template=metadata.get("template"), valid_packs=int(valid_packs),
        render_options=render_options_of(metadata))


def inspect_datasets(config) -> DataInfo:
    """Read every dataset's metadata (``DialogTrainingConfig.data``) into the run's record; its
    template, special ids and tokenizer record are the first conversation dataset's (a text
    dataset's template is only what its preprocessing was given), else the first dataset's.

    Raises:
        ValueError: datasets of different sequence lengths or tokenizers, or a --seq-length
            other than theirs (the fix in the message); ``DatasetFormatError`` (a ValueError)
            for a missing or unreadable metadata file.
    """
    prefixes, weights = config.data.blend()
    valid = list(config.data.valid_data_path)
    metas = {p: read_metadata(p) for p in prefixes + valid}
    first = metas[prefixes[0]]
    for prefix, meta in metas.items():
        if meta["seq_length"] != first["seq_length"]:
            raise ValueError(f"data_path: {prefix} has seq length {meta['seq_length']} but "
                             f"{prefixes[0]} has {first['seq_length']}; rebuild them alike")
        if meta["tokenizer"]["sha256"] != first["tokenizer"]["sha256"]:
            raise ValueError(f"data_path: {prefix} and {prefixes[0]} were built with different "
                             "tokenizers; blend only datasets of one tokenizer")
    seq_length = config.data.seq_length or int(first["seq_length"])
    if seq_length != first["seq_length"]:
        raise ValueError(f"seq_length: --seq-length {seq_length} but {prefixes[0]} was packed "
                         f"for {first['seq_length']}; use --seq-length {first['seq_length']} or "
                         "rebuild the dataset")
    if not valid:
        valid = [p for p in prefixes if "valid" in metas[p]["splits"]]
    valid_packs = sum(int(metas[p]["splits"].get("valid", {}).get("packs", 0)) for p in valid)
    vocab_size = max(int(m["tokenizer"]["vocab_size"]) for m in metas.values())
    chat = next((metas[p] for p in prefixes if dataset_kind(metas[p]) != "text"), first)
    return data_info(chat, prefixes, weights, valid, valid_packs, vocab_size)


def blend_names(prefixes: Sequence[str]) -> List[str]:
    """Names of the datasets of a blend in its per-dataset loss reports (log line, TensorBoard,
    W&B): each prefix's file name (``data/text`` -> ``text``), the whole prefix where two share
    a file name; ``[]`` for a single dataset (its reports are the totals)."""
    if len(prefixes) < 2:
        return []
    names = [os.path.basename(os.path.normpath(p)) or p for p in prefixes]
    if len(set(names)) < len(names):
        names = list(prefixes)
    if len(set(names)) < len(names):  # one dataset given twice
        names = [f"{number}:{name}" for number, name in enumerate(names)]
    return names


def open_datasets(config, info: DataInfo) -> Tuple["SampleStream", List[PackedDialogDataset]]:
    """``(training SampleStream, validation datasets)``: every split opened and checked
    (files whole, indexes consistent, metadata matching: ``PackedDialogDataset``) before any
    model is built.

    Raises:
        DatasetFormatError: a damaged or mismatching dataset, named with the fix.
    """
    train_sets = [PackedDialogDataset(p, "train", info.seq_length, None) for p in info.prefixes]
    stream = SampleStream(train_sets, info.weights, config.train.seed)
    valid_sets = [PackedDialogDataset(p, "valid", info.seq_length) for p in info.valid_prefixes]
    return stream, valid_sets


class SampleStream:
    """Deterministic endless stream of packs over blended datasets."""

    def __init__(self, datasets: Sequence[PackedDialogDataset], weights: Sequence[float],
                 seed: int) -> None:
        from megatron.core.datasets import helpers

        self.datasets = list(datasets)
        self.seed = seed
        self.round = int(sum(len(d) for d in self.datasets))
        if self.round == 0:
            raise ValueError("the training datasets hold no packs")
        weights = np.asarray(weights, dtype=np.float64)
        weights = weights / weights.sum()
        self.which = np.zeros(self.round, dtype=np.int16)
        self.nth = np.zeros(self.round, dtype=np.int64)
        helpers.build_blending_indices(self.which, self.nth, weights, len(self.datasets),
                                       self.round, False)
        self.per_round = np.bincount(self.which, minlength=len(self.datasets)).astype(np.int64)

    def __len__(self) -> int:
        """Samples in one round (one pass over all packs when the weights are proportional)."""
        return self.round

    @lru_cache(maxsize=16)
    def _order(self, dataset: int, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, dataset, epoch])
        return rng.permutation(len(self.datasets[dataset]))

    def locate(self, index: int):
        """(dataset, pack) of sample ``index``."""
        position = index % self.round
        dataset = int(self.which[position])
        count = (index // self.round) * int(self.per_round[dataset]) + int(self.nth[position])
        size = len(self.datasets[dataset])
        return dataset, int(self._order(dataset, count // size)[count % size])

    def __getitem__(self, index: int) -> Dict[str, np.ndarray]:
        """The sample (``PackedDialogDataset``'s) with ``dataset``: its dataset's number."""
        dataset, pack = self.locate(index)
        return {**self.datasets[dataset][pack], "dataset": dataset}


def step_sample_indices(consumed: int, global_batch: int, micro_batch: int, dp_size: int,
                        dp_rank: int) -> List[List[int]]:
    """Sample indices of each micro-batch this data-parallel rank processes in one step."""
    micro_batches = global_batch // (micro_batch * dp_size)
    return [
        [consumed + (m * dp_size + dp_rank) * micro_batch + j for j in range(micro_batch)]
        for m in range(micro_batches)
    ]


def flatten_micro_batch(samples: Sequence[Dict[str, np.ndarray]], isolated: bool,
                        device: torch.device, names: Sequence[str] = (),
                        turn_exponent: Optional[float] = None) -> Dict[str, object]:
    """b packs (``PackedDialogDataset`` samples of s tokens) -> one micro-batch on ``device``:

        tokens, labels, position_ids   int64 [1, b*s]
        loss_mask, loss_token_num      float32 [1, b*s]
        cu_seqlens                     int32 [segments + 1]: attention segments (conversations
                                       and each pack's padding if ``isolated``, else whole packs)
        conversation_cu_seqlens        int32: the conversation segments (the loss's)
        packed_seq_params              megatron-core ``PackedSeqParams`` ('thd') of cu_seqlens
        num_tokens, turn_num, packs    ints: real (non-padding) tokens, trained turns, packs
        dataset_ids                    int64 [1, b*s], with ``names`` (the blend's datasets,
                                       ``blend_names``): each position's dataset, from the
                                       samples' ``dataset`` (``SampleStream``)
        dataset_names                  ``names``
        loss_weights                   ``loss.position_weights`` of the whole micro-batch
                                       (float32 [1, b*s] each), what the loss sums; with
                                       ``turn_exponent`` p (``--loss-normalization power``)
                                       also its power terms

    With context parallelism, ``context_parallel.split_micro_batches`` then keeps this rank's
    part of each.
    """
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens
    from mt_dialog.training.loss import conversation_ids_from_cu_seqlens, position_weights

    seq = int(samples[0]["tokens"].shape[0])
    conversations, packs = [0], [0]
    for index, sample in enumerate(samples):
        conversations.extend((index * seq + sample["cu_seqlens"][1:]).tolist())
        packs.append((index + 1) * seq)
    attention = conversations if isolated else packs
    cu = torch.tensor(attention, dtype=torch.int32, device=device)

    def stack(key, dtype):
        joined = np.concatenate([s[key] for s in samples])[None, :]
        return torch.as_tensor(joined, dtype=dtype).to(device)

    batch = {
        "tokens": stack("tokens", torch.int64),
        "labels": stack("labels", torch.int64),
        "loss_mask": stack("loss_mask", torch.float32),
        "loss_token_num": stack("loss_token_num", torch.float32),
        "position_ids": stack("position_ids", torch.int64),
        "cu_seqlens": cu,
        "conversation_cu_seqlens": torch.tensor(conversations, dtype=torch.int32, device=device),
        "packed_seq_params": packed_seq_params_from_cu_seqlens(
            cu, max_seqlen=int(np.max(np.diff(attention)))),
        "num_tokens": int(sum(int(s["num_tokens"]) for s in samples)),
        "turn_num": int(sum(int(s["turn_num"]) for s in samples)),
        "packs": len(samples),
    }
    if names:
        datasets = np.repeat([int(s["dataset"]) for s in samples], seq)[None, :]
        batch.update(dataset_ids=torch.as_tensor(datasets, dtype=torch.int64).to(device),
                     dataset_names=tuple(names))
    ids = conversation_ids_from_cu_seqlens(batch["conversation_cu_seqlens"],
                                           batch["tokens"].shape[1])
    batch["loss_weights"] = position_weights(batch["loss_mask"], batch["loss_token_num"], ids,
                                             turn_exponent)
    return batch

