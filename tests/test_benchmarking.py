"""bnbook.benchmarking: structure of the results, never the timings themselves."""

import numpy as np
import pytest

from bnbook.benchmarking import (
    interleaved_timings,
    median_seconds,
    paired_ratio,
    paired_ratios,
    timing_table,
)


def test_interleaved_timings_calls_every_variant_interleaved():
    calls = []
    fns = {
        "a": lambda: calls.append("a"),
        "b": lambda: calls.append("b"),
        "c": lambda: calls.append("c"),
    }
    t = interleaved_timings(fns, repeats=6, number=2, warmup=1, seed=3)
    assert set(t) == {"a", "b", "c"}
    assert all(v.shape == (6,) and np.all(v >= 0) for v in t.values())
    assert calls[:3] == ["a", "b", "c"]  # warm-up, in order
    timed = calls[3:]
    assert len(timed) == 6 * 3 * 2
    # each repetition holds every variant exactly `number` times, consecutively
    for i in range(6):
        rep = timed[i * 6 : (i + 1) * 6]
        assert sorted(rep) == ["a", "a", "b", "b", "c", "c"]
        assert rep[0] == rep[1] and rep[2] == rep[3] and rep[4] == rep[5]
    orders = {tuple(timed[i * 6 : (i + 1) * 6 : 2]) for i in range(6)}
    assert len(orders) > 1  # the order is shuffled between repetitions


def test_interleaved_timings_is_seeded():
    def order(seed):
        calls = []
        fns = {k: (lambda k=k: calls.append(k)) for k in "abcd"}
        interleaved_timings(fns, repeats=4, warmup=0, seed=seed)
        return calls

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_interleaved_timings_errors():
    with pytest.raises(TypeError, match="mapping"):
        interleaved_timings([lambda: None])
    with pytest.raises(ValueError, match="empty"):
        interleaved_timings({})
    with pytest.raises(TypeError, match=r"fns\['x'\] is not callable"):
        interleaved_timings({"x": 3})
    for kwargs in (
        {"repeats": 0},
        {"number": 0},
        {"warmup": -1},
        {"repeats": 2.5},
        {"repeats": True},
    ):
        with pytest.raises(ValueError, match="must be an int"):
            interleaved_timings({"x": lambda: None}, **kwargs)


def test_median_ratio_and_table():
    t = {"slow": np.array([2.0, 4.0, 6.0]), "fast": np.array([1.0, 1.0, 3.0])}
    assert median_seconds(t) == {"slow": 4.0, "fast": 1.0}
    # per-repetition ratios 2, 4, 2 -> median 2 (the ratio of medians would be 4)
    assert paired_ratios(t, "slow", "fast").tolist() == [2.0, 4.0, 2.0]
    assert paired_ratio(t, "slow", "fast") == 2.0
    assert paired_ratio(t, "slow", "slow") == 1.0
    with pytest.raises(KeyError, match="no timings for 'nope'"):
        paired_ratio(t, "slow", "nope")
    table = timing_table(t, "slow", extra={"note": {"fast": "folded"}})
    lines = table.splitlines()
    assert lines[0] == "| variant | median (ms) | IQR (ms) | speed-up vs slow | note |"
    assert lines[2] == "| slow | 4000.000 | 2000.000 | 1.00x |  |"
    assert lines[3] == "| fast | 1000.000 | 1000.000 | 2.00x | folded |"
    with pytest.raises(KeyError, match="baseline"):
        timing_table(t, "nope")
