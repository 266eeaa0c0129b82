"""Tests of bnbook.experiments: repeating over seeds, sweeping a setting, mean and spread."""

from __future__ import annotations

import numpy as np
import pytest

from bnbook.experiments import compare_runs, format_mean_spread, mean_and_spread, over_seeds, sweep


def test_over_seeds_calls_in_order_and_stacks_scalars():
    calls = []

    def run(seed):
        calls.append(seed)
        return seed * 10

    out = over_seeds(run, [3, 1, 2])
    assert calls == [3, 1, 2]
    assert out.shape == (3,) and out.dtype == float
    np.testing.assert_array_equal(out, [30.0, 10.0, 20.0])


def test_over_seeds_stacks_arrays_along_a_new_first_axis():
    out = over_seeds(lambda s: np.full((2, 3), s), [0, 1, 5, 7])
    assert out.shape == (4, 2, 3)
    np.testing.assert_array_equal(out[:, 0, 0], [0, 1, 5, 7])


def test_over_seeds_accepts_lists_and_rejects_ragged_results():
    assert over_seeds(lambda s: [s, s + 1], [0, 1]).shape == (2, 2)
    with pytest.raises(ValueError):
        over_seeds(lambda s: np.zeros(s + 1), [0, 1])


def test_over_seeds_needs_a_seed():
    with pytest.raises(ValueError, match="at least one seed"):
        over_seeds(lambda s: s, [])


def test_sweep_passes_value_and_seed_and_keys_by_value():
    seen = []

    def run(value, seed):
        seen.append((value, seed))
        return value + 100 * seed

    out = sweep(run, [0.1, 1.0, 10.0], seeds=[0, 2])
    assert list(out) == [0.1, 1.0, 10.0]
    assert seen == [(0.1, 0), (0.1, 2), (1.0, 0), (1.0, 2), (10.0, 0), (10.0, 2)]
    np.testing.assert_allclose(out[1.0], [1.0, 201.0])
    assert all(v.shape == (2,) for v in out.values())


def test_sweep_accepts_a_generator_of_values_and_binds_each_value():
    # A late-binding bug would give every key the last value's results.
    out = sweep(lambda v, s: [v, s], (k for k in (1, 2, 3)), seeds=[7])
    assert list(out) == [1, 2, 3]
    for v, res in out.items():
        np.testing.assert_array_equal(res, [[v, 7]])


def test_sweep_propagates_the_empty_seed_error():
    with pytest.raises(ValueError, match="at least one seed"):
        sweep(lambda v, s: v, [1, 2], seeds=[])


def test_mean_and_spread_match_numpy():
    rng = np.random.default_rng(0)
    runs = rng.normal(size=(5, 4, 3))
    mean, spread = mean_and_spread(runs)
    np.testing.assert_allclose(mean, runs.mean(axis=0))
    np.testing.assert_allclose(spread, runs.std(axis=0, ddof=1))
    assert mean.shape == spread.shape == (4, 3)


def test_mean_and_spread_of_scalars_per_seed():
    mean, spread = mean_and_spread([1.0, 2.0, 3.0, 6.0])
    assert mean == pytest.approx(3.0)
    assert spread == pytest.approx(np.std([1.0, 2.0, 3.0, 6.0], ddof=1))


def test_mean_and_spread_single_seed_has_zero_spread_not_nan():
    mean, spread = mean_and_spread(np.array([[0.5, 0.7]]))
    np.testing.assert_array_equal(mean, [0.5, 0.7])
    np.testing.assert_array_equal(spread, [0.0, 0.0])


def test_mean_and_spread_of_over_seeds_results():
    runs = over_seeds(lambda s: np.array([s, 2.0 * s]), [1, 2, 3])
    mean, spread = mean_and_spread(runs)
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(spread, [1.0, 2.0])


def test_format_mean_spread():
    assert format_mean_spread([1.0, 2.0, 3.0]) == "2.000 ± 1.000"
    assert format_mean_spread([0.5, 0.7], digits=1, scale=100) == "60.0 ± 14.1"
    assert format_mean_spread([0.25]) == "0.250 ± 0.000"


@pytest.mark.parametrize("bad", [[], [[1.0, 2.0]], 3.0])
def test_format_mean_spread_rejects_non_1d(bad):
    with pytest.raises(ValueError, match="1-D array of per-seed results"):
        format_mean_spread(bad)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        ([0.9, 0.91, 0.92], [0.5, 0.51, 0.52], 1),  # far apart
        ([0.5, 0.51, 0.52], [0.9, 0.91, 0.92], -1),
        ([0.9, 0.5, 0.7], [0.8, 0.6, 0.65], 0),  # overlapping spreads
        ([1.0, 1.0], [1.0, 1.0], 0),  # identical, zero spread
        ([1.0, 1.0], [0.0, 0.0], 1),  # any gap counts when nothing varies
    ],
)
def test_compare_runs(a, b, expected):
    assert compare_runs(a, b) == expected
    assert compare_runs(b, a) == -expected


def test_compare_runs_threshold_is_the_sum_of_the_spreads():
    a = np.array([0.0, 2.0])  # mean 1, sample std sqrt(2)
    s = np.sqrt(2.0)
    assert compare_runs(a + 2 * s + 1e-9, a) == 1
    assert compare_runs(a + 2 * s - 1e-9, a) == 0


@pytest.mark.parametrize(
    "a, b", [([1.0], [1.0, 2.0]), ([1.0, 2.0], [[1.0, 2.0]]), (1.0, [1.0, 2.0])]
)
def test_compare_runs_needs_two_seeds_each(a, b):
    with pytest.raises(ValueError, match="one result per seed, at least two"):
        compare_runs(a, b)
