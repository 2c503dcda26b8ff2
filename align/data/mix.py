"""The eval split and the mixture: which rows of each source go where, deterministic under a seed."""

from __future__ import annotations

import math
import random
from typing import Any


def rng_for(seed: int, *labels: Any) -> random.Random:
    # String seeds hash with sha512, so each (seed, source) stream is stable across runs and Pythons.
    return random.Random(":".join(map(str, (seed, *labels))))


def split_eval(rows: list[Any], fraction: float, rng: random.Random) -> tuple[list[Any], list[Any]]:
    """Hold out round(fraction * n) random rows (at least one when fraction > 0 and n > 1)."""
    if not fraction or len(rows) < 2:
        return rows, []
    n_eval = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    order = list(range(len(rows)))
    rng.shuffle(order)
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def take(rows: list[Any], n: int, rng: random.Random) -> list[Any]:
    """n rows: a random subset when n <= len(rows); else whole copies plus a random remainder."""
    copies, remainder = divmod(n, len(rows))
    return rows * copies + rng.sample(rows, remainder)


def mixture_counts(
    sizes: list[int], weights: list[float | None], counts: list[int | None], total: int | None
) -> list[int]:
    """Rows to draw from each source.

    ``num_samples`` is an exact count; a source with neither weight nor count gives all its rows;
    weighted sources share ``total`` (default: their summed sizes) in proportion to their weights,
    rounded by largest remainder so the counts add up exactly.
    """
    weighted = [i for i, w in enumerate(weights) if w is not None]
    out = [c if c is not None else size for size, c in zip(sizes, counts, strict=True)]
    if not weighted:
        return out
    budget = total if total is not None else sum(sizes[i] for i in weighted)
    norm = sum(weights[i] for i in weighted)
    exact = {i: budget * weights[i] / norm for i in weighted}
    floors = {i: math.floor(x) for i, x in exact.items()}
    left = budget - sum(floors.values())
    for i in sorted(weighted, key=lambda i: floors[i] - exact[i])[:left]:
        floors[i] += 1
    for i in weighted:
        out[i] = floors[i]
    return out
