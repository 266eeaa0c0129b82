"""bnbook.numerics: variance algorithms in float32 against a float64 reference."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnbook import functional as npf
from bnbook import numerics
from bnbook.nn import functional as bnf

# (mean, std) of float32 test data: a spread 1e4 times and 1e6 times below the mean
OFFSETS = [(1e4, 1.0), (1e4, 1e-2)]


def _offset_data(rng, mean, std):
    """float32 data (512 values x 8 channels) and the float64 copy of the same values."""
    x32 = (mean + std * rng.standard_normal((512, 8))).astype(np.float32)
    return x32, x32.astype(np.float64)


def _rel_err(got, want):
    return np.max(np.abs(np.asarray(got, dtype=np.float64) - want) / np.abs(want))


def _variance(method, x):
    if method == "naive":
        return numerics.variance_naive(x, axis=0)
    if method == "two_pass":
        return numerics.variance_two_pass(x, axis=0)
    if method == "corrected":
        return numerics.variance_corrected(x, axis=0)
    if method == "welford":
        n, _, m2 = numerics.welford(x, axis=0)
        return m2 / n
    acc = None
    for chunk in np.array_split(x, 5):
        part = numerics.partial_stats(chunk, axis=0)
        acc = part if acc is None else numerics.chan_merge(acc, part)
    return acc[2] / acc[0]


@pytest.mark.parametrize(("mean", "std"), OFFSETS)
def test_naive_variance_fails_on_offset_float32_data(rng, mean, std):
    x32, x64 = _offset_data(rng, mean, std)
    assert _rel_err(_variance("naive", x32), x64.var(axis=0)) > 10.0


def test_naive_variance_is_fine_on_centred_data(rng):
    x = rng.standard_normal((512, 8)).astype(np.float32)
    assert _rel_err(numerics.variance_naive(x, axis=0), x.astype(np.float64).var(axis=0)) < 1e-4


# With std 1e-2 the float32 grid at 1e4 (spacing 2**-10 ~ 1e-3) is a tenth of a std: a
# float32 mean is then off by up to 5% of a std, which the plain methods inherit and
# only the corrected two-pass removes.
TOLERANCES = {
    (1e4, 1.0): {"two_pass": 1e-3, "welford": 1e-3, "chan": 1e-3, "corrected": 1e-5},
    (1e4, 1e-2): {"two_pass": 3e-2, "welford": 0.3, "chan": 0.1, "corrected": 1e-5},
}


@pytest.mark.parametrize(("mean", "std"), OFFSETS)
@pytest.mark.parametrize("method", ["two_pass", "corrected", "welford", "chan"])
def test_stable_variances_pass_on_offset_float32_data(rng, mean, std, method):
    x32, x64 = _offset_data(rng, mean, std)
    got = _variance(method, x32)
    assert np.asarray(got).dtype == np.float32
    assert _rel_err(got, x64.var(axis=0)) < TOLERANCES[(mean, std)][method]


def test_welford_matches_numpy(rng):
    x = rng.standard_normal((50, 3, 4))
    n, mean, m2 = numerics.welford(x, axis=0)
    assert n == 50
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2 / n, x.var(axis=0), rtol=1e-12)
    n1, mean1, _ = numerics.welford(x, axis=2)
    assert n1 == 4
    np.testing.assert_allclose(mean1, x.mean(axis=2), rtol=1e-12)


def test_partial_stats_multiple_axes(rng):
    x = rng.standard_normal((6, 3, 4, 5))
    n, mean, m2 = numerics.partial_stats(x, axis=(0, 2, 3))
    assert n == 120 and mean.shape == (3,)
    np.testing.assert_allclose(m2 / n, x.var(axis=(0, 2, 3)), rtol=1e-12)


def test_merge_stats_equals_pairwise_chan_and_whole(rng):
    x = rng.standard_normal((40, 3)) * 3 + 5
    chunks = np.split(x, [3, 10, 11, 40])[:4]  # uneven sizes 3, 7, 1, 29
    parts = [numerics.partial_stats(c, axis=0) for c in chunks]
    counts = np.array([p[0] for p in parts], dtype=float)[:, None]
    n, mean, m2 = numerics.merge_stats(
        counts, np.stack([p[1] for p in parts]), np.stack([p[2] for p in parts])
    )
    np.testing.assert_allclose(n, 40)
    np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(m2 / n, x.var(axis=0), rtol=1e-12)
    acc = parts[0]
    for p in parts[1:]:
        acc = numerics.chan_merge(acc, p)
    np.testing.assert_allclose(acc[1], mean, rtol=1e-12)
    np.testing.assert_allclose(acc[2], m2, rtol=1e-12)


def test_merge_stats_accepts_torch_and_empty_chunks():
    x = torch.randn(10, 4, dtype=torch.float64)
    counts = torch.tensor([[6.0], [0.0], [4.0]], dtype=torch.float64)
    means = torch.stack([x[:6].mean(0), torch.zeros(4, dtype=torch.float64), x[6:].mean(0)])
    m2s = torch.stack(
        [
            ((x[:6] - x[:6].mean(0)) ** 2).sum(0),
            torch.zeros(4, dtype=torch.float64),
            ((x[6:] - x[6:].mean(0)) ** 2).sum(0),
        ]
    )
    n, mean, m2 = numerics.merge_stats(counts, means, m2s)
    torch.testing.assert_close(mean, x.mean(0))
    torch.testing.assert_close(m2 / n, x.var(0, unbiased=False))


def test_errors():
    with pytest.raises(TypeError, match="floating"):
        numerics.variance_naive(np.arange(4))
    with pytest.raises(ValueError, match="non-empty"):
        numerics.variance_two_pass(np.zeros((0, 3)))
    with pytest.raises(TypeError, match="floating"):
        numerics.welford(np.ones((3, 2), dtype=int))
    with pytest.raises(ValueError, match="both counts are 0"):
        numerics.chan_merge((0, 0.0, 0.0), (0, 0.0, 0.0))


# --- bnbook's batch norms on offset data ----------------------------------------------


@pytest.fixture
def offset_images(rng):
    x64 = 1e4 + 1e-2 * rng.standard_normal((16, 4, 6, 6))
    x32 = x64.astype(np.float32)
    # the float64 reference sees exactly the float32 inputs
    return x32, x32.astype(np.float64)


def test_numpy_batch_norm_accurate_on_offset_float32(offset_images):
    x32, x64 = offset_images
    want = npf.batch_norm(x64, None, None, training=True)
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    got = npf.batch_norm(x32, rm, rv, training=True, momentum=1.0)
    assert got.dtype == np.float32
    # bounded by the rounding of the float32 mean (up to ~5% of the std here); the
    # naive variance would be wrong a million-fold
    assert np.max(np.abs(got - want)) < 0.15
    assert _rel_err(rv, x64.var(axis=(0, 2, 3), ddof=1)) < 1e-2


@pytest.mark.parametrize("fn", [bnf.batch_norm, bnf.batch_norm_fast], ids=["composed", "fast"])
def test_torch_batch_norms_accurate_on_offset_float32(offset_images, fn):
    x32, x64 = offset_images
    want = F.batch_norm(torch.from_numpy(x64), None, None, training=True)
    rm, rv = torch.zeros(4), torch.ones(4)
    got = fn(torch.from_numpy(x32), rm, rv, training=True, momentum=1.0)
    # bounded by the rounding of the float32 mean (up to ~5% of the std here) for the
    # composed version; the fast one corrects for it
    assert (got.double() - want).abs().max() < (0.15 if fn is bnf.batch_norm else 1e-5)
    assert _rel_err(rv.numpy(), x64.var(axis=(0, 2, 3), ddof=1)) < 1e-2
