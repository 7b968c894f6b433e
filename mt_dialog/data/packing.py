"""Pack variable-length conversations into fixed-length sequences (bins of ``capacity`` tokens).

Each algorithm takes conversation lengths (each ``<= capacity``) and returns packs: lists of
conversation indices whose lengths sum to at most ``capacity``.

- ``bfd`` best-fit decreasing (default): longest first, each into the fullest pack it fits.
  O(n log n): the packs are kept in buckets by remaining room, and the distinct room values in a
  sorted list, so finding the tightest fit is one bisection.
- ``ffd`` first-fit decreasing: longest first, into the earliest pack it fits (a max segment tree
  over packs).
- ``sequential`` next-fit in input order (keeps order; a pack closes when the next one won't fit).
- ``none``: one conversation per pack, padded (the unpacked baseline).
"""

from __future__ import annotations

import bisect
from typing import Callable, Dict, List, Sequence

import numpy as np

Packs = List[List[int]]
ALGORITHMS = ("bfd", "ffd", "sequential", "none")


def _check(lengths: Sequence[int], capacity: int) -> np.ndarray:
    array = np.asarray(lengths, dtype=np.int64)
    if capacity <= 0:
        raise ValueError(f"capacity must be positive, got {capacity}")
    if array.size and (array.max() > capacity or array.min() <= 0):
        bad = int(np.argmax((array > capacity) | (array <= 0)))
        raise ValueError(
            f"conversation {bad} has length {int(array[bad])}, outside 1..{capacity}"
        )
    return array


def _decreasing(array: np.ndarray) -> List[int]:
    # stable: equal lengths keep input order, so the result is deterministic
    return np.argsort(-array, kind="stable").tolist()


def pack_best_fit_decreasing(lengths: Sequence[int], capacity: int) -> Packs:
    """Best-fit decreasing: conversations longest first (ties in input order), each into the
    pack with the least room that still holds it, else a new pack. O(n log n).

    Args:
        lengths: tokens of each conversation (n ints, each in 1..capacity).
        capacity: tokens per pack (the sequence length).

    Returns:
        The packs in the order they were opened, each a list of indices into ``lengths`` (in
        the order placed) whose lengths sum to at most ``capacity``; every index once.

    Raises:
        ValueError: ``capacity`` not positive, or a length outside 1..capacity (named by index).
    """
    array = _check(lengths, capacity)
    sizes = array.tolist()
    packs: Packs = []
    buckets: Dict[int, List[int]] = {}  # remaining room -> packs with exactly that room
    rooms: List[int] = []  # sorted distinct keys of ``buckets``
    smallest = min(sizes) if sizes else 0
    for item in _decreasing(array):
        size = sizes[item]
        slot = bisect.bisect_left(rooms, size)
        if slot == len(rooms):
            pack, room = len(packs), capacity - size
            packs.append([item])
        else:
            old = rooms[slot]
            bucket = buckets[old]
            pack = bucket.pop()
            if not bucket:
                del buckets[old]
                rooms.pop(slot)
            packs[pack].append(item)
            room = old - size
        if room >= smallest:  # room below the smallest item can never be used
            bucket = buckets.get(room)
            if bucket is None:
                buckets[room] = [pack]
                bisect.insort(rooms, room)
            else:
                bucket.append(pack)
    return packs


def pack_first_fit_decreasing(lengths: Sequence[int], capacity: int) -> Packs:
    """First-fit decreasing: longest first, each into the earliest opened pack that holds it.
    Arguments, result and errors as ``pack_best_fit_decreasing``'s."""
    array = _check(lengths, capacity)
    sizes = array.tolist()
    leaves = 1
    while leaves < max(1, len(sizes)):
        leaves *= 2
    tree = [capacity] * (2 * leaves)  # max remaining room per subtree; unused packs are empty
    packs: Packs = []
    for item in _decreasing(array):
        size = sizes[item]
        node = 1
        while node < leaves:
            node = 2 * node if tree[2 * node] >= size else 2 * node + 1
        pack = node - leaves
        if pack == len(packs):
            packs.append([])
        packs[pack].append(item)
        tree[node] -= size
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return packs


def pack_sequential(lengths: Sequence[int], capacity: int) -> Packs:
    """Next-fit in input order: a pack closes when the next conversation does not fit.
    Arguments, result and errors as ``pack_best_fit_decreasing``'s."""
    array = _check(lengths, capacity)
    packs: Packs = []
    used = capacity + 1
    for item, size in enumerate(array.tolist()):
        if used + size > capacity:
            packs.append([])
            used = 0
        packs[-1].append(item)
        used += size
    return packs


def pack_none(lengths: Sequence[int], capacity: int) -> Packs:
    """One conversation per pack (the padded baseline). Errors as ``pack_best_fit_decreasing``'s."""
    array = _check(lengths, capacity)
    return [[item] for item in range(array.shape[0])]


PACKERS: Dict[str, Callable[[Sequence[int], int], Packs]] = {
    "bfd": pack_best_fit_decreasing,
    "ffd": pack_first_fit_decreasing,
    "sequential": pack_sequential,
    "none": pack_none,
}


def pack(lengths: Sequence[int], capacity: int, algorithm: str = "bfd") -> Packs:
    """Pack with the named algorithm (see module docstring and ``pack_best_fit_decreasing``).

    Raises:
        ValueError: an unknown ``algorithm`` (naming the choices), or bad lengths / capacity.
    """
    if algorithm not in PACKERS:
        raise ValueError(f"--packing {algorithm!r} is unknown; choose one of {', '.join(PACKERS)}")
    return PACKERS[algorithm](lengths, capacity)


def packing_efficiency(lengths: Sequence[int], packs: Packs, capacity: int) -> float:
    """Real tokens / (packs x capacity)."""
    if not packs:
        return 0.0
    return float(np.sum(np.asarray(lengths, dtype=np.int64))) / (len(packs) * capacity)
