"""Training batches: which packs each data-parallel rank reads at each step, and how a
micro-batch of packs becomes the flattened 'thd' layout the model takes.

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
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, List, Sequence

import numpy as np
import torch

from mt_dialog.data.dataset import PackedDialogDataset


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
        dataset, pack = self.locate(index)
        return self.datasets[dataset][pack]


def step_sample_indices(consumed: int, global_batch: int, micro_batch: int, dp_size: int,
                        dp_rank: int) -> List[List[int]]:
    """Sample indices of each micro-batch this data-parallel rank processes in one step."""
    micro_batches = global_batch // (micro_batch * dp_size)
    return [
        [consumed + (m * dp_size + dp_rank) * micro_batch + j for j in range(micro_batch)]
        for m in range(micro_batches)
    ]


def flatten_micro_batch(samples: Sequence[Dict[str, np.ndarray]], isolated: bool,
                        device: torch.device) -> Dict[str, object]:
    """b packs -> one ``[1, b*s]`` sequence with ``cu_seqlens`` and ``PackedSeqParams``."""
    from mt_dialog.training.attention import packed_seq_params_from_cu_seqlens

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

    return {
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
        "turns": int(sum(int(s["turn_num"]) for s in samples)),
        "packs": len(samples),
    }

