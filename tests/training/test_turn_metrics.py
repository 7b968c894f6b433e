"""Per-turn validation metrics (``mt_dialog.training.turn_metrics``) on small tensors, against
plain-Python computations over the conversations' replies. The same metrics through a real
validation at TP=2, PP=2 and DP=2 are checked against the plain-PyTorch model in
``equivalence_worker.py``."""

import random

import pytest
import torch

from mt_dialog.data.storage import bucket_names
from mt_dialog.training.turn_metrics import (
    TURN_INDEX_GROUPS,
    report_names,
    turn_reports,
    turn_structure,
)
from tests.training import reference as ref


def _flat(conversations):
    """(loss_mask, loss_token_num, conversation ids) over the conversations laid end to end,
    in label space (position p's label is token p + 1), as ``flatten_micro_batch`` gives."""
    mask, ltn, ids = [], [], []
    for c, conv in enumerate(conversations):
        counts = conv.counts
        mask += [1 if n else 0 for n in counts[1:]] + [0]
        ltn += counts[1:] + [0]
        ids += [c] * len(conv.tokens)
    return torch.tensor(mask), torch.tensor(ltn), torch.tensor(ids)


def test_turns_numbered_from_the_masks_alone():
    """The docstring's drawing, plus two adjacent turns (no untrained token between them)."""
    mask = torch.tensor([0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0])
    ltn = torch.tensor([0, 0, 3, 3, 3, 0, 0, 0, 2, 2, 0, 0, 4, 4, 4, 4, 2, 2, 0])
    conv = torch.tensor([0] * 11 + [1] * 8)
    positions, turn, length, index = turn_structure(mask, ltn, conv)
    assert positions.tolist() == [2, 3, 4, 8, 9, 12, 13, 14, 15, 16, 17]
    assert turn.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    assert length.tolist() == [3, 2, 4, 2] and index.tolist() == [1, 2, 1, 2]
    empty = turn_structure(torch.zeros(5), torch.zeros(5), torch.zeros(5))
    assert [t.numel() for t in empty] == [0, 0, 0, 0]


def test_groups_and_names():
    assert bucket_names([4, 16, 64, 256]) == ["1-4", "5-16", "17-64", "65-256", "257+"]
    assert bucket_names([1, 2]) == ["1", "2", "3+"]
    names = report_names([4])
    assert names[:2] == ["accuracy", "exact turns"]
    assert "reply length 1-4: loss per turn" in names and "turn 4+: exact turns" in names
    assert len(names) == 2 + 3 * (2 + len(TURN_INDEX_GROUPS)) == len(set(names))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reports_equal_a_per_reply_computation(seed):
    """Random conversations (reply lengths 1..13 tokens, 1-5 replies each), random losses and
    predictions: every group's sums and counts equal those computed reply by reply, each turn
    falls in exactly one length group and one index group."""
    rng = random.Random(seed)
    conversations = [ref.make_conversation(rng, 60) for _ in range(12)]
    mask, ltn, ids = _flat(conversations)
    generator = torch.Generator().manual_seed(seed)
    losses = torch.rand(mask.shape, generator=generator, dtype=torch.float64) * 3
    correct = torch.rand(mask.shape, generator=generator) < 0.7
    offset = 0
    for conv in conversations[:4]:  # some replies entirely right: exact turns
        for a, e in conv.replies:
            correct[offset + a - 1:offset + e - 1] = True
        offset += len(conv.tokens)
    edges = [2, 4, 8]
    reports = turn_reports(losses, correct, mask, ltn, ids, edges)
    assert list(reports) == report_names(edges)

    expected, offset = {}, 0
    for conv in conversations:
        for number, (a, e) in enumerate(conv.replies, start=1):
            span = slice(offset + a - 1, offset + e - 1)  # labels of tokens a..e-1
            length = e - a
            right = int(correct[span].sum())
            values = {"loss per turn": (float(losses[span].mean()), 1),
                      "accuracy": (right, length), "exact turns": (float(right == length), 1)}
            group = next(g for g, edge in zip(bucket_names(edges), [*edges, 10 ** 9])
                         if length <= edge)
            index = TURN_INDEX_GROUPS[min(number, len(TURN_INDEX_GROUPS)) - 1]
            for prefix in ("", f"reply length {group}: ", f"turn {index}: "):
                for part, (total, count) in values.items():
                    if prefix or part != "loss per turn":
                        old = expected.get(prefix + part, (0.0, 0))
                        expected[prefix + part] = (old[0] + total, old[1] + count)
        offset += len(conv.tokens)
    for name in report_names(edges):
        total, count = reports[name].tolist()
        want = expected.get(name, (0.0, 0))
        assert total == pytest.approx(want[0], rel=1e-12, abs=1e-12) and count == want[1], name
    assert reports["exact turns"][0] >= sum(len(c.replies) for c in conversations[:4])
    turns = sum(len(c.replies) for c in conversations)
    assert sum(reports[f"reply length {g}: exact turns"][1] for g in bucket_names(edges)) \
        == turns == sum(reports[f"turn {g}: exact turns"][1] for g in TURN_INDEX_GROUPS)


def test_bucket_edges_are_checked():
    from mt_dialog.training.config import TrainConfig

    assert TrainConfig(train_iters=1).eval_reply_length_buckets == [4, 16, 64, 256]
    for bad in ([], [0, 4], [4, 4], [16, 4]):
        with pytest.raises(ValueError, match="eval_reply_length_buckets: .* increasing"):
            TrainConfig(train_iters=1, eval_reply_length_buckets=bad)
