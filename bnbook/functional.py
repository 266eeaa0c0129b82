"""Reference maths of normalization layers, in plain NumPy.

Every function here mirrors the signature and semantics of its
``torch.nn.functional`` namesake, so that the two can be read side by side and
tested against each other. Shapes follow PyTorch: ``x`` has shape ``(N, C, *)``
where ``*`` is any number of spatial axes (none for a fully connected layer).

All normalizers share one operation, :func:`normalize`: subtract the mean and
divide by the standard deviation over some axes. They differ only in *which*
axes share one mean and one variance.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "normalize",
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_backward_staged",
    "channel_axes",
]


# --------------------------------------------------------------------------- #
# Input validation
# --------------------------------------------------------------------------- #
def _as_float_array(x, name: str = "input") -> np.ndarray:
    """Return ``x`` as a floating NumPy array, or raise ``TypeError``."""
    if not isinstance(x, np.ndarray):
        if hasattr(x, "detach") and hasattr(x, "numpy"):
            raise TypeError(
                f"{name} must be a NumPy array, got a torch.Tensor; "
                "call .detach().numpy() first or use bnbook.nn"
            )
        x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _check_per_channel(a, name: str, num_channels: int) -> np.ndarray | None:
    """Validate an optional per-channel array of shape ``(C,)``."""
    if a is None:
        return None
    a = _as_float_array(a, name)
    if a.shape != (num_channels,):
        raise ValueError(
            f"{name} must have shape ({num_channels},) to match the {num_channels} "
            f"channels of the input (axis 1), got shape {a.shape}"
        )
    return a


def _check_finite(x: np.ndarray, name: str = "input") -> None:
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"{name} contains NaN or infinite values; refusing to update the running "
            "statistics, which would be poisoned for every later evaluation"
        )


def channel_axes(ndim: int) -> tuple[int, ...]:
    """Axes that batch norm reduces over for an input of rank ``ndim``.

    Batch norm keeps axis 1 (channels) and averages over all others: the batch
    axis 0 and the spatial axes ``2, 3, ...``. For a conv feature map
    ``(N, C, H, W)`` that is ``(0, 2, 3)``: one mean per channel over
    ``N * H * W`` values.
    """
    if ndim < 2:
        raise ValueError(f"expected an input of shape (N, C) or (N, C, *), got rank {ndim}")
    return (0, *range(2, ndim))


def _per_channel_view(a: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a ``(C,)`` array so it broadcasts against ``(N, C, *)``."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


# --------------------------------------------------------------------------- #
# The one shared operation
# --------------------------------------------------------------------------- #
def normalize(x, axes, eps: float = 1e-5):
    r"""Standardize ``x`` over ``axes``: :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}`.

    .. math::
        \mu = \frac{1}{m}\sum_{i} x_i, \qquad
        \sigma^2 = \frac{1}{m}\sum_{i} (x_i - \mu)^2

    where the sums run over the ``m`` elements that share the reduced axes.
    The variance is the biased (``1/m``) one, as in Ioffe and Szegedy (2015),
    Algorithm 1. It is computed in two passes, mean first and then the mean
    squared deviation, which stays accurate when the mean is large compared
    with the spread (the one-pass ``E[x^2] - E[x]^2`` does not).

    Parameters
    ----------
    x : ndarray of floats
    axes : tuple of int
        Axes that share one mean and one variance.
    eps : float
        Added to the variance for numerical stability.

    Returns
    -------
    x_hat : ndarray, same shape and dtype as ``x``
    mean, var : ndarray
        The statistics, with the reduced axes kept as size 1.
    """
    x = _as_float_array(x)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = np.mean(centered * centered, axis=axes, keepdims=True)
    x_hat = centered / np.sqrt(var + eps)
    return x_hat, mean, var


# --------------------------------------------------------------------------- #
# Batch normalization
# --------------------------------------------------------------------------- #
def batch_norm(
    x,
    running_mean,
    running_var,
    weight=None,
    bias=None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
):
    r"""Batch normalization, with the semantics of ``torch.nn.functional.batch_norm``.

    In training mode the statistics come from the batch, per channel over every
    axis but axis 1:

    .. math::
        \mu_c = \frac{1}{m}\sum_{n, s} x_{n,c,s}, \quad
        \sigma_c^2 = \frac{1}{m}\sum_{n, s} (x_{n,c,s} - \mu_c)^2, \quad
        y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_c}{\sqrt{\sigma_c^2 + \epsilon}} + \beta_c

    with :math:`m = N \cdot \prod *` values per channel. If running statistics
    are given they are updated **in place**:

    .. math::
        \hat\mu \leftarrow (1 - \text{momentum})\,\hat\mu + \text{momentum}\,\mu_c, \quad
        \hat\sigma^2 \leftarrow (1 - \text{momentum})\,\hat\sigma^2
            + \text{momentum}\,\frac{m}{m - 1}\sigma_c^2

    (the running variance uses the unbiased estimate). In evaluation mode the
    running statistics replace the batch statistics, so each sample's output
    no longer depends on the rest of the batch.

    Parameters
    ----------
    x : ndarray, shape (N, C) or (N, C, *)
    running_mean, running_var : ndarray, shape (C,), or None
        Required in evaluation mode. In training mode, optional; updated in
        place when given.
    weight, bias : ndarray, shape (C,), optional
        :math:`\gamma` and :math:`\beta`; ``None`` means 1 and 0.
    training : bool
        Use batch statistics (True) or running statistics (False).
    momentum : float
        Weight of the new batch in the running average, in ``[0, 1]``.
    eps : float
        Added to the variance before the square root.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``

    Raises
    ------
    TypeError
        If an input is not a floating NumPy array.
    ValueError
        If ``x`` has rank < 2; a per-channel array does not have shape
        ``(C,)``; training with one value per channel; evaluating without
        running statistics; or, when training updates running statistics,
        ``x`` holds NaN or infinity.
    """
    x = _as_float_array(x)
    axes = channel_axes(x.ndim)
    C = x.shape[1]
    running_mean = _check_per_channel(running_mean, "running_mean", C)
    running_var = _check_per_channel(running_var, "running_var", C)
    weight = _check_per_channel(weight, "weight", C)
    bias = _check_per_channel(bias, "bias", C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")

    if training:
        m = x.size // C
        if m <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel when training, got input size "
                f"{tuple(x.shape)}"
            )
        if momentum is None or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
        if running_mean is not None:
            _check_finite(x)
        x_hat, mean, var = normalize(x, axes, eps)
        if running_mean is not None:
            # In place, like torch: the caller's buffers carry the state.
            running_mean *= 1.0 - momentum
            running_mean += momentum * mean.reshape(C)
            running_var *= 1.0 - momentum
            running_var += momentum * var.reshape(C) * (m / (m - 1))
    else:
        if running_mean is None:
            raise ValueError(
                "running_mean and running_var are required in evaluation mode "
                "(training=False); pass training=True to use batch statistics"
            )
        mean = _per_channel_view(running_mean, x.ndim)
        var = _per_channel_view(running_var, x.ndim)
        x_hat = (x - mean) / np.sqrt(var + eps)

    y = x_hat
    if weight is not None:
        y = y * _per_channel_view(weight, x.ndim)
    if bias is not None:
        y = y + _per_channel_view(bias, x.ndim)
    return y.astype(x.dtype, copy=False)


def batch_norm_backward(dy, x, weight=None, eps: float = 1e-5):
    r"""Gradients of training-mode batch norm, in the compact closed form.

    With :math:`\hat x` the normalized input, :math:`m` the number of values
    per channel and sums over the batch and spatial axes,

    .. math::
        \frac{\partial L}{\partial \beta_c} = \sum dy, \qquad
        \frac{\partial L}{\partial \gamma_c} = \sum dy\,\hat x, \qquad
        \frac{\partial L}{\partial x} = \frac{\gamma_c}{m\sqrt{\sigma_c^2+\epsilon}}
            \Big(m\,dy - \sum dy - \hat x \sum dy\,\hat x\Big).

    The input gradient is the upstream gradient with its per-channel mean and
    its component along :math:`\hat x` removed, then scaled: normalization
    makes the output blind to shifting or scaling a channel, so the gradient
    has no component in those two directions.

    Parameters
    ----------
    dy : ndarray, shape (N, C, *)
        Gradient of the loss with respect to the output ``y``.
    x : ndarray, shape (N, C, *)
        The input of the forward pass.
    weight : ndarray, shape (C,), optional
        :math:`\gamma`; ``None`` means 1.
    eps : float

    Returns
    -------
    dx : ndarray, shape (N, C, *)
    dweight, dbias : ndarray, shape (C,)

    Raises
    ------
    ValueError
        If the shapes of ``dy`` and ``x`` differ, ``weight`` does not have
        shape ``(C,)``, or there is one value per channel.
    """
    dy, x, weight, axes, m = _check_backward_inputs(dy, x, weight)
    x_hat, _, var = normalize(x, axes, eps)
    inv_std = 1.0 / np.sqrt(var + eps)
    dbias = dy.sum(axis=axes)
    dweight = (dy * x_hat).sum(axis=axes)
    shape = _per_channel_view(dbias, x.ndim).shape
    scale = _per_channel_view(weight, x.ndim) * inv_std / m
    dx = scale * (m * dy - dbias.reshape(shape) - x_hat * dweight.reshape(shape))
    return dx.astype(x.dtype, copy=False), dweight, dbias


def batch_norm_backward_staged(dy, x, weight=None, eps: float = 1e-5):
    r"""Gradients of training-mode batch norm, node by node through the graph.

    The forward pass is split into elementary steps,

    .. math::
        \mu = \tfrac1m\textstyle\sum x,\quad d = x - \mu,\quad
        v = \tfrac1m\textstyle\sum d^2,\quad s = \sqrt{v + \epsilon},\quad
        r = 1/s,\quad \hat x = d\,r,\quad y = \gamma\hat x + \beta,

    and the chain rule is applied to each step in reverse. It computes the
    same numbers as :func:`batch_norm_backward` with more passes over memory
    and more temporaries; the formulas chapter times the two.

    Parameters and return values are those of :func:`batch_norm_backward`.
    """
    dy, x, weight, axes, m = _check_backward_inputs(dy, x, weight)
    gamma = _per_channel_view(weight, x.ndim)
    # forward, keeping every intermediate node
    mu = x.mean(axis=axes, keepdims=True)
    d = x - mu
    sq = d * d
    v = sq.mean(axis=axes, keepdims=True)
    s = np.sqrt(v + eps)
    r = 1.0 / s
    x_hat = d * r
    # backward, one node at a time
    dbias = dy.sum(axis=axes)
    dweight = (dy * x_hat).sum(axis=axes)
    dx_hat = dy * gamma
    dr = (dx_hat * d).sum(axis=axes, keepdims=True)
    dd = dx_hat * r
    ds = -dr / (s * s)
    dv = ds * 0.5 / np.sqrt(v + eps)
    dsq = np.broadcast_to(dv / m, x.shape)
    dd = dd + 2.0 * d * dsq
    dmu = -dd.sum(axis=axes, keepdims=True)
    dx = dd + np.broadcast_to(dmu / m, x.shape)
    return dx.astype(x.dtype, copy=False), dweight, dbias


def _check_backward_inputs(dy, x, weight):
    x = _as_float_array(x, "x")
    dy = _as_float_array(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy must have the shape of x, {x.shape}, got {dy.shape}")
    axes = channel_axes(x.ndim)
    C = x.shape[1]
    m = x.size // C
    if m <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.shape}"
        )
    weight = _check_per_channel(weight, "weight", C)
    if weight is None:
        weight = np.ones(C, dtype=x.dtype)
    return dy, x, weight, axes, m
