"""Repeat an experiment over seeds and sweep a setting, so notebooks hold ideas, not loops."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from bnbook.progress import progress

__all__ = ["over_seeds", "sweep", "mean_and_spread"]


def over_seeds(run: Callable[[int], object], seeds: Sequence[int], desc: str | None = None) -> np.ndarray:
    """Call ``run(seed)`` for each seed and stack the results along a new first axis.

    ``run`` returns a number or an array of a fixed shape; the result has shape
    ``(len(seeds), *shape)``.
    """
    if len(seeds) == 0:
        raise ValueError("need at least one seed")
    return np.stack([np.asarray(run(s), dtype=float) for s in progress(seeds, desc=desc)])


def sweep(
    run: Callable[[object, int], object],
    values: Iterable,
    seeds: Sequence[int],
    desc: str | None = None,
) -> dict:
    """``{value: over_seeds(lambda s: run(value, s), seeds)}`` for each setting ``value``."""
    return {v: over_seeds(lambda s, v=v: run(v, s), seeds) for v in progress(list(values), desc=desc)}


def mean_and_spread(results: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over the seed axis (axis 0).

    With a single seed the spread is 0 rather than NaN.
    """
    results = np.asarray(results, dtype=float)
    spread = results.std(axis=0, ddof=1) if len(results) > 1 else np.zeros_like(results[0])
    return results.mean(axis=0), spread
