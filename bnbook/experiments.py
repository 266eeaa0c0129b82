"""Repeat an experiment over seeds and sweep a setting, so notebooks hold ideas, not loops."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from bnbook.progress import progress

__all__ = ["over_seeds", "sweep", "mean_and_spread", "format_mean_spread", "compare_runs"]


def over_seeds(
    run: Callable[[int], object], seeds: Sequence[int], desc: str | None = None
) -> np.ndarray:
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
    return {
        v: over_seeds(lambda s, v=v: run(v, s), seeds) for v in progress(list(values), desc=desc)
    }


def mean_and_spread(results: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation over the seed axis (axis 0).

    With a single seed the spread is 0 rather than NaN.
    """
    results = np.asarray(results, dtype=float)
    spread = results.std(axis=0, ddof=1) if len(results) > 1 else np.zeros_like(results[0])
    return results.mean(axis=0), spread


def format_mean_spread(results, digits: int = 3, scale: float = 1.0) -> str:
    """``"mean ± spread"`` of per-seed results (1-D), each multiplied by ``scale`` first.

    Uses :func:`mean_and_spread`; e.g. ``format_mean_spread(accs, 1, 100)`` for percentages.

    Raises
    ------
    ValueError
        If ``results`` is not one-dimensional or is empty.
    """
    results = np.asarray(results, dtype=float)
    if results.ndim != 1 or len(results) == 0:
        raise ValueError(
            f"expected a non-empty 1-D array of per-seed results, got shape {results.shape}"
        )
    mean, spread = mean_and_spread(results * scale)
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def compare_runs(a, b) -> int:
    r"""Whether per-seed results ``a`` are clearly above or below ``b``.

    Returns +1 if :math:`\bar a - \bar b > s_a + s_b`, -1 if
    :math:`\bar b - \bar a > s_a + s_b`, and 0 otherwise (indistinguishable),
    where :math:`\bar a` is the mean over seeds and :math:`s_a` the sample
    standard deviation (:func:`mean_and_spread`). A deliberately simple,
    conservative rule for a handful of seeds, used to choose verdict strings.

    Raises
    ------
    ValueError
        If ``a`` or ``b`` is not a 1-D array with at least two seeds.
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    for name, x in (("a", a), ("b", b)):
        if x.ndim != 1 or len(x) < 2:
            raise ValueError(
                f"{name} must hold one result per seed, at least two; got shape {x.shape}"
            )
    (mean_a, s_a), (mean_b, s_b) = mean_and_spread(a), mean_and_spread(b)
    gap = mean_a - mean_b
    if abs(gap) <= s_a + s_b:
        return 0
    return 1 if gap > 0 else -1
