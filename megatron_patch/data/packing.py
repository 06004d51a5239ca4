"""First-fit-decreasing packing of samples into bins of a fixed capacity, O(n log n).

Samples are placed longest first, each into the earliest bin with room; a segment tree over
the bins' free capacity finds that bin in O(log n). Every sample lands in exactly one bin.
"""

from __future__ import annotations


class _MaxTree:
    """Leftmost index whose value is >= x, over a fixed-size array of values."""

    def __init__(self, size: int, fill: int):
        self.size = 1
        while self.size < size:
            self.size *= 2
        self.tree = [fill] * size + [-1] * (self.size - size)
        self.tree = [0] * self.size + self.tree
        for node in range(self.size - 1, 0, -1):
            self.tree[node] = max(self.tree[2 * node], self.tree[2 * node + 1])

    def leftmost_at_least(self, value: int) -> int:
        if self.tree[1] < value:
            return -1
        node = 1
        while node < self.size:
            node = 2 * node if self.tree[2 * node] >= value else 2 * node + 1
        return node - self.size

    def set(self, index: int, value: int) -> None:
        tree = self.tree
        node = index + self.size
        tree[node] = value
        node //= 2
        while node:
            left, right = tree[2 * node], tree[2 * node + 1]
            best = left if left >= right else right
            if tree[node] == best:  # unchanged here, so above too
                break
            tree[node] = best
            node //= 2


def first_fit_decreasing(sizes: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of sample indices, in placement order) in creation order; each size <= capacity."""
    if any(size > capacity or size < 0 for size in sizes):
        raise ValueError(f"every size must be in 0..{capacity}")
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    tree = _MaxTree(max(len(sizes), 1), capacity)
    bins: list[list[int]] = []
    free: list[int] = []
    for index in order:
        target = tree.leftmost_at_least(sizes[index])
        if target >= len(bins):  # the first untouched (full-capacity) slot: open a bin
            bins.append([])
            free.append(capacity)
            target = len(bins) - 1
        bins[target].append(index)
        free[target] -= sizes[index]
        tree.set(target, free[target])
    return bins
