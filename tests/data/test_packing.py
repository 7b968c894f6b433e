"""Packing: never over the length, never loses or duplicates a conversation (property tests)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mt_dialog.data.packing import ALGORITHMS, pack, packing_efficiency

lengths_and_capacity = st.integers(min_value=1, max_value=64).flatmap(
    lambda capacity: st.tuples(
        st.lists(st.integers(min_value=1, max_value=capacity), max_size=200), st.just(capacity)
    )
)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@settings(max_examples=150, deadline=None)
@given(case=lengths_and_capacity)
def test_packs_fit_and_cover_every_conversation_once(algorithm, case):
    lengths, capacity = case
    packs = pack(lengths, capacity, algorithm)
    flat = [i for p in packs for i in p]
    assert sorted(flat) == list(range(len(lengths)))
    assert all(p for p in packs)
    assert all(sum(lengths[i] for i in p) <= capacity for p in packs)


@settings(max_examples=150, deadline=None)
@given(case=lengths_and_capacity)
def test_decreasing_fits_are_never_worse_than_next_fit(case):
    lengths, capacity = case
    sequential = len(pack(lengths, capacity, "sequential"))
    assert len(pack(lengths, capacity, "bfd")) <= sequential
    assert len(pack(lengths, capacity, "ffd")) <= sequential
    # any-fit: a pack is opened only for an item that fits in no open pack, so no two packs
    # together fit in one (hence fewer than 2 * total / capacity + 1 packs). (The 11/9 OPT + 6/9
    # bound of FFD/BFD cannot be checked against total / capacity, which may be far below OPT:
    # [18, 33, 33, 33, 33] in 50 needs 5 packs, total / capacity is 3.)
    for algorithm in ("bfd", "ffd"):
        loads = sorted(sum(lengths[i] for i in p) for p in pack(lengths, capacity, algorithm))
        assert len(loads) < 2 or loads[0] + loads[1] > capacity


@settings(max_examples=100, deadline=None)
@given(case=lengths_and_capacity)
def test_best_fit_chooses_the_tightest_pack(case):
    """Replaying BFD's decisions: each item went into a pack with the least room that fit."""
    lengths, capacity = case
    packs = pack(lengths, capacity, "bfd")
    where = {i: p for p, members in enumerate(packs) for i in members}
    rooms = []
    for item in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        fitting = [r for r in rooms if r[1] >= lengths[item]]
        target = where[item]
        if target == len(rooms):
            assert not fitting
            rooms.append([target, capacity - lengths[item]])
        else:
            assert rooms[target][1] == min(r[1] for r in fitting)
            rooms[target][1] -= lengths[item]


def test_sequential_keeps_order_and_none_is_one_per_pack():
    lengths = [5, 3, 4, 9, 1, 1]
    assert pack(lengths, 10, "sequential") == [[0, 1], [2], [3, 4], [5]]
    assert pack(lengths, 10, "none") == [[i] for i in range(6)]


def test_first_fit_takes_the_earliest_pack():
    # decreasing: 6, 5, 4, 3 -> [6, 4], [5, 3] with first fit; best fit puts 4 in [6] too
    assert pack([3, 4, 5, 6], 10, "ffd") == [[3, 1], [2, 0]]


def test_efficiency_and_errors():
    assert packing_efficiency([4, 4], [[0], [1]], 8) == 0.5
    with pytest.raises(ValueError, match="length 9, outside 1..8"):
        pack([1, 9], 8)
    with pytest.raises(ValueError, match="unknown"):
        pack([1], 8, "magic")


def test_bfd_efficiency_on_a_realistic_distribution():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(6.5, 1.0, 10_000).astype(int), 16, 4096)
    packs = pack(lengths, 4096, "bfd")
    assert packing_efficiency(lengths, packs, 4096) > 0.99
