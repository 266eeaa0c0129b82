r"""Ways to compute a mean and a variance, and how accurate each is in floating point.

Batch norm needs a per-channel variance. Four textbook ways to get it:

- :func:`variance_naive`, one pass: :math:`\sigma^2 = E[x^2] - E[x]^2`.
  Both terms are close to :math:`\mu^2` when the mean is large compared with
  the spread, and their difference loses about :math:`2\log_{10}(\mu/\sigma)`
  decimal digits (catastrophic cancellation). In float32 (about 7 digits) data
  with mean :math:`10^4` and std :math:`10^{-2}` lose everything.
- :func:`variance_two_pass`: the mean first, then the mean squared deviation.
  Accurate, but reads the data twice.
- :func:`variance_corrected`: two passes plus a correction for the rounding
  error of the computed mean (Chan, Golub and LeVeque 1983), the most accurate
  here; :mod:`bnbook.nn.fast` uses it.
- :func:`welford`: one streaming pass that updates a running mean and a sum of
  squared deviations :math:`M_2` (Welford 1962).
- :func:`merge_stats` / :func:`chan_merge`: partial statistics
  :math:`(n_k, \mu_k, M_{2,k})` of separate chunks (threads, devices, workers)
  merged exactly (Chan, Golub and LeVeque 1979):

  .. math::
      n = \sum_k n_k, \quad \mu = \frac{1}{n}\sum_k n_k\mu_k, \quad
      M_2 = \sum_k M_{2,k} + \sum_k n_k(\mu_k - \mu)^2.

  This is what a synchronized batch norm computes across processes
  (``bnbook.distributed.SyncBatchNorm``).

Functions take NumPy arrays and compute in the array's own dtype, so that the
float32 errors are the ones a float32 implementation would make. The merge
formulas use arithmetic only and accept torch tensors as well.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "variance_naive",
    "variance_two_pass",
    "variance_corrected",
    "welford",
    "partial_stats",
    "chan_merge",
    "merge_stats",
]


def _float_array(x) -> np.ndarray:
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"expected a floating-point array, got dtype {x.dtype}")
    if x.size == 0:
        raise ValueError("expected a non-empty array")
    return x


def variance_naive(x, axis=None) -> np.ndarray:
    r"""Biased variance in one pass, :math:`\frac1n\sum x^2 - (\frac1n\sum x)^2`.

    Computed in ``x.dtype``. Inaccurate when :math:`|\mu| \gg \sigma`, and can
    even come out negative; shown here as the thing not to do.

    Parameters
    ----------
    x : ndarray of floats
    axis : int or tuple of int, optional
        Axes to reduce; all by default.

    Raises
    ------
    TypeError
        If ``x`` is not floating point.
    ValueError
        If ``x`` is empty.
    """
    x = _float_array(x)
    mean = x.mean(axis=axis, dtype=x.dtype)
    mean_sq = (x * x).mean(axis=axis, dtype=x.dtype)
    return mean_sq - mean * mean


def variance_two_pass(x, axis=None) -> np.ndarray:
    r"""Biased variance in two passes, :math:`\frac1n\sum (x - \mu)^2` with :math:`\mu` first.

    Computed in ``x.dtype``; same parameters and errors as :func:`variance_naive`.
    """
    x = _float_array(x)
    mean = x.mean(axis=axis, dtype=x.dtype, keepdims=True)
    d = x - mean
    return (d * d).mean(axis=axis, dtype=x.dtype)


def variance_corrected(x, axis=None) -> np.ndarray:
    r"""Corrected two-pass variance, :math:`\frac1n\sum d^2 - (\frac1n\sum d)^2`.

    In exact arithmetic :math:`\sum d = 0`. In floating point the computed mean
    :math:`\bar x` is off by a rounding error, which inflates :math:`\sum d^2`
    by :math:`n(\bar x - \mu)^2`; :math:`\sum d` measures that error and the
    second term removes it (Chan, Golub and LeVeque 1983). Nothing large
    cancels, because the :math:`d` are small. Computed in ``x.dtype``; same
    parameters and errors as :func:`variance_naive`.
    """
    x = _float_array(x)
    d = x - x.mean(axis=axis, dtype=x.dtype, keepdims=True)
    shift = d.mean(axis=axis, dtype=x.dtype)
    return (d * d).mean(axis=axis, dtype=x.dtype) - shift * shift


def welford(x, axis: int = 0):
    r"""Welford's streaming algorithm along ``axis``: one slice at a time, one pass.

    For each new slice :math:`x_k` (vectorized over the other axes):

    .. math::
        \delta = x_k - \mu_{k-1}, \quad \mu_k = \mu_{k-1} + \delta / k, \quad
        M_{2,k} = M_{2,k-1} + \delta\,(x_k - \mu_k).

    Parameters
    ----------
    x : ndarray of floats
    axis : int
        The axis streamed over.

    Returns
    -------
    count : int
    mean, m2 : ndarray
        Shape of ``x`` without ``axis``, dtype of ``x``. The biased variance is
        ``m2 / count``.

    Raises
    ------
    TypeError, ValueError
        As :func:`variance_naive`.
    """
    x = np.moveaxis(_float_array(x), axis, 0)
    mean = np.zeros(x.shape[1:], dtype=x.dtype)
    m2 = np.zeros(x.shape[1:], dtype=x.dtype)
    for k, xk in enumerate(x, start=1):
        delta = xk - mean
        mean += delta / x.dtype.type(k)
        m2 += delta * (xk - mean)
    return x.shape[0], mean, m2


def partial_stats(x, axis=None):
    """Count, mean and sum of squared deviations ``(n, mu, M2)`` of one chunk, two-pass.

    The summary that :func:`merge_stats` combines; ``M2 / n`` is the biased
    variance. Same parameters and errors as :func:`variance_naive`.
    """
    x = _float_array(x)
    n = x.size if axis is None else int(np.prod([x.shape[a] for a in np.atleast_1d(axis)]))
    mean = x.mean(axis=axis, dtype=x.dtype, keepdims=True)
    d = x - mean
    return n, np.squeeze(mean, axis=axis), (d * d).sum(axis=axis, dtype=x.dtype)


def chan_merge(a, b):
    r"""Merge two summaries ``(n, mean, M2)`` into the summary of the union.

    .. math::
        n = n_a + n_b,\quad \delta = \mu_b - \mu_a,\quad
        \mu = \mu_a + \delta\,\frac{n_b}{n},\quad
        M_2 = M_{2,a} + M_{2,b} + \delta^2\,\frac{n_a n_b}{n}

    (Chan, Golub and LeVeque 1979). Works elementwise on floats, NumPy arrays
    or torch tensors.

    Raises
    ------
    ValueError
        If both counts are zero (a plain number check; per-element counts are
        the caller's business).
    """
    n_a, mean_a, m2_a = a
    n_b, mean_b, m2_b = b
    if np.ndim(n_a) == 0 and np.ndim(n_b) == 0 and n_a + n_b == 0:
        raise ValueError("cannot merge two empty summaries (both counts are 0)")
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta * delta * (n_a * n_b / n)


def merge_stats(counts, means, m2s):
    r"""Merge ``K`` summaries at once, stacked along axis 0.

    .. math::
        n = \sum_k n_k,\quad \mu = \frac1n\sum_k n_k\mu_k,\quad
        M_2 = \sum_k M_{2,k} + \sum_k n_k(\mu_k - \mu)^2

    Algebraically the same as folding :func:`chan_merge`; every term is a sum of
    non-negative numbers or a weighted mean, so nothing cancels. Accepts NumPy
    arrays or torch tensors (``counts`` shaped to broadcast against ``means``).
    An empty chunk must have ``n_k = 0`` and a finite mean (``0``).

    Returns
    -------
    n, mean, m2
        The summary of the union; the biased variance is ``m2 / n``.
    """
    n = counts.sum(0)
    mean = (counts * means).sum(0) / n
    d = means - mean
    return n, mean, m2s.sum(0) + (counts * d * d).sum(0)
