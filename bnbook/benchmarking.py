"""Wall-clock comparisons that survive a noisy, shared machine.

Timing two variants one after the other lets a burst of background load land on
one of them only. Here the variants are *interleaved*: every repetition runs
each variant once, in a freshly shuffled order, and ratios are taken within a
repetition (:func:`paired_ratio`) before the median over repetitions, so slow
phases of the machine cancel out of the comparison.

Typical use::

    t = interleaved_timings({"plain": f, "folded": g}, repeats=30)
    print(timing_table(t, baseline="plain"))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import numpy as np

__all__ = [
    "interleaved_timings",
    "median_seconds",
    "paired_ratios",
    "paired_ratio",
    "timing_table",
]


def interleaved_timings(
    fns: Mapping[str, Callable[[], object]],
    repeats: int = 20,
    *,
    number: int = 1,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Time several callables interleaved; return seconds per call, per repetition.

    Parameters
    ----------
    fns : mapping of name -> callable taking no arguments
        The variants to compare. Their results are discarded.
    repeats : int
        Number of repetitions. In each one every variant is timed once, in an
        order drawn from a generator seeded with ``seed``.
    number : int
        Calls per timing; the time reported is their mean (use > 1 for calls
        of a few microseconds, whose single timings are dominated by noise).
    warmup : int
        Untimed calls of each variant before timing (allocations, caches,
        one-off dispatch work).
    seed : int

    Returns
    -------
    dict of name -> numpy.ndarray of shape (repeats,)
        Seconds per call; entry ``i`` of every array comes from repetition ``i``.

    Raises
    ------
    TypeError
        If ``fns`` is not a mapping of callables.
    ValueError
        If ``fns`` is empty, or ``repeats`` or ``number`` < 1, or ``warmup`` < 0.
    """
    if not isinstance(fns, Mapping):
        raise TypeError(f"fns must be a mapping of name -> callable, got {type(fns).__name__}")
    if not fns:
        raise ValueError("fns is empty: nothing to time")
    for name, fn in fns.items():
        if not callable(fn):
            raise TypeError(f"fns[{name!r}] is not callable: {type(fn).__name__}")
    for label, value, low in (
        ("repeats", repeats, 1),
        ("number", number, 1),
        ("warmup", warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{label} must be an int >= {low}, got {value!r}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    rng = np.random.default_rng(seed)
    times = {name: np.empty(repeats) for name in names}
    for i in range(repeats):
        for j in rng.permutation(len(names)):
            fn = fns[names[j]]
            start = time.perf_counter()
            for _ in range(number):
                fn()
            times[names[j]][i] = (time.perf_counter() - start) / number
    return times


def median_seconds(timings: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Median seconds per call of each variant."""
    return {name: float(np.median(t)) for name, t in timings.items()}


def paired_ratios(timings: Mapping[str, np.ndarray], slow: str, fast: str) -> np.ndarray:
    """Per-repetition ratios ``t[slow][i] / t[fast][i]``, shape (repeats,).

    Their spread shows how noisy a comparison is: if the interquartile range
    straddles 1, the run cannot tell the two variants apart.

    Raises
    ------
    KeyError
        If a name is not in ``timings``.
    """
    for name in (slow, fast):
        if name not in timings:
            raise KeyError(f"no timings for {name!r}; have {sorted(timings)}")
    return np.asarray(timings[slow]) / np.asarray(timings[fast])


def paired_ratio(timings: Mapping[str, np.ndarray], slow: str, fast: str) -> float:
    """Median over repetitions of ``t[slow] / t[fast]``: how many times faster ``fast`` is.

    A value above 1 means ``fast`` took less time than ``slow``. The ratio is
    formed within each repetition of :func:`interleaved_timings` and then the
    median is taken, which is more robust to load changes than the ratio of
    two medians.

    Raises
    ------
    KeyError
        If a name is not in ``timings``.
    """
    return float(np.median(paired_ratios(timings, slow, fast)))


def timing_table(
    timings: Mapping[str, np.ndarray],
    baseline: str,
    extra: Mapping[str, Mapping[str, str]] | None = None,
) -> str:
    """A Markdown table: median time, spread, and speed-up over ``baseline`` per variant.

    Columns: variant, median ms, interquartile range in ms, and the
    :func:`paired_ratio` ``baseline / variant`` (above 1 = faster than the
    baseline). ``extra`` adds columns: ``{column title: {variant: text}}``.

    Raises
    ------
    KeyError
        If ``baseline`` is not in ``timings``.
    """
    if baseline not in timings:
        raise KeyError(f"baseline {baseline!r} not in timings {sorted(timings)}")
    extra = extra or {}
    head = ["variant", "median (ms)", "IQR (ms)", f"speed-up vs {baseline}", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, t in timings.items():
        q1, q2, q3 = np.percentile(np.asarray(t) * 1e3, [25, 50, 75])
        row = [
            name,
            f"{q2:.3f}",
            f"{q3 - q1:.3f}",
            f"{paired_ratio(timings, baseline, name):.2f}x",
            *(col.get(name, "") for col in extra.values()),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)
