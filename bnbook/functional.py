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
    "layer_norm",
    "group_norm",
    "instance_norm",
    "rms_norm",
    "normalize_backward",
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


def _affine_per_channel(x_hat: np.ndarray, weight, bias, dtype) -> np.ndarray:
    """Scale and shift per channel (axis 1): ``gamma * x_hat + beta``, cast to ``dtype``."""
    y = x_hat
    if weight is not None:
        y = y * _per_channel_view(weight, x_hat.ndim)
    if bias is not None:
        y = y + _per_channel_view(bias, x_hat.ndim)
    return y.astype(dtype, copy=False)


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
    with the spread (the one-pass ``E[x^2] - E[x]^2`` does not). The centred
    values are then corrected by their own mean, which is zero in exact
    arithmetic but not when the mean was rounded (the "corrected two-pass"
    algorithm; see :mod:`bnbook.numerics`).

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
    # A mean rounded to the input's precision is off by up to half a spacing;
    # the centred values know by how much.
    correction = centered.mean(axis=axes, keepdims=True)
    centered -= correction
    mean = mean + correction
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
    return _affine_per_channel(x_hat, weight, bias, x.dtype)


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
    # Few passes over memory, few temporaries: view as (N, C, S), sum products with
    # einsum (no product array), and build dx in place from one new array.
    N, C = x.shape[:2]
    x3, dy3 = x.reshape(N, C, -1), dy.reshape(N, C, -1)
    centered = x3 - x3.mean(axis=(0, 2), keepdims=True)
    inv_std = 1.0 / np.sqrt(np.einsum("ncs,ncs->c", centered, centered) / m + eps)
    dbias = dy3.sum(axis=(0, 2))
    sum_dy_centered = np.einsum("ncs,ncs->c", dy3, centered)
    dweight = sum_dy_centered * inv_std
    # dx = gamma * inv_std * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)
    dx = centered * (-(inv_std * inv_std) * sum_dy_centered / m)[:, None]
    dx += dy3
    dx -= (dbias / m)[:, None]
    dx *= (weight * inv_std)[:, None]
    return dx.reshape(x.shape).astype(x.dtype, copy=False), dweight, dbias


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


# --------------------------------------------------------------------------- #
# Alternatives to batch norm: the same operation over other axes
# --------------------------------------------------------------------------- #
# Batch norm reduces over (0, 2, 3, ...): one mean per channel, shared by the
# whole batch. The normalizers below keep axis 0, so every sample is
# normalized on its own and its output does not depend on the rest of the
# batch; they differ only in how they split the other axes.


def _check_normalized_shape(x: np.ndarray, normalized_shape) -> tuple[int, ...]:
    """Validate ``normalized_shape`` against the trailing axes of ``x``."""
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (int(normalized_shape),)
    try:
        shape = tuple(int(s) for s in normalized_shape)
    except TypeError:
        raise TypeError(
            f"normalized_shape must be an int or a sequence of ints, got {normalized_shape!r}"
        ) from None
    if len(shape) == 0:
        raise ValueError("normalized_shape must name at least one axis, got ()")
    if len(shape) > x.ndim or x.shape[x.ndim - len(shape) :] != shape:
        raise ValueError(
            f"normalized_shape={list(shape)} must equal the trailing axes of the input, "
            f"expected an input of shape (*, {', '.join(map(str, shape))}), got {x.shape}"
        )
    return shape


def _check_elementwise(a, name: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """Validate an optional affine array with the shape ``normalized_shape``."""
    if a is None:
        return None
    a = _as_float_array(a, name)
    if a.shape != shape:
        raise ValueError(f"{name} must have shape normalized_shape={shape}, got {a.shape}")
    return a


def layer_norm(x, normalized_shape, weight=None, bias=None, eps: float = 1e-5):
    r"""Layer normalization (Ba et al., 2016), as ``torch.nn.functional.layer_norm``.

    Each sample is standardized over its trailing ``len(normalized_shape)``
    axes, for example over ``(C, H, W)`` of a feature map or over the features
    of each time step of a sequence ``(N, T, D)`` with ``normalized_shape=(D,)``:

    .. math::
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} \odot \gamma + \beta,

    with :math:`\mu, \sigma^2` the biased mean and variance over those axes and
    :math:`\gamma, \beta` of shape ``normalized_shape`` (element-wise).

    Parameters
    ----------
    x : ndarray, shape (*, *normalized_shape)
    normalized_shape : int or tuple of int
        The trailing axes to normalize over (an int means one axis).
    weight, bias : ndarray of shape ``normalized_shape``, optional
        :math:`\gamma` and :math:`\beta`; ``None`` means 1 and 0.
    eps : float

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``

    Raises
    ------
    TypeError
        If an array is not floating point or ``normalized_shape`` is not an int
        or a sequence of ints.
    ValueError
        If ``normalized_shape`` is empty or does not match the trailing axes
        of ``x``, or ``weight``/``bias`` do not have that shape.
    """
    x = _as_float_array(x)
    shape = _check_normalized_shape(x, normalized_shape)
    weight = _check_elementwise(weight, "weight", shape)
    bias = _check_elementwise(bias, "bias", shape)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    y, _, _ = normalize(x, axes, eps)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype, copy=False)


def group_norm(x, num_groups: int, weight=None, bias=None, eps: float = 1e-5):
    r"""Group normalization (Wu and He, 2018), as ``torch.nn.functional.group_norm``.

    The ``C`` channels of each sample are split into ``num_groups`` groups of
    consecutive channels; each group is standardized over its channels and all
    positions, then scaled and shifted per channel:

    .. math::
        y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_{n,g}}{\sqrt{\sigma_{n,g}^2 + \epsilon}}
            + \beta_c, \qquad g = \lfloor c \cdot G / C \rfloor.

    ``num_groups=1`` is layer norm over ``(C, *)``; ``num_groups=C`` is
    instance norm.

    Parameters
    ----------
    x : ndarray, shape (N, C) or (N, C, *)
    num_groups : int
        ``G``; must divide ``C``.
    weight, bias : ndarray, shape (C,), optional
    eps : float

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``

    Raises
    ------
    TypeError
        If an array is not floating point or ``num_groups`` is not an int.
    ValueError
        If ``x`` has rank < 2, ``num_groups`` is not positive or does not
        divide ``C``, or ``weight``/``bias`` do not have shape ``(C,)``.
    """
    x = _as_float_array(x)
    if x.ndim < 2:
        raise ValueError(f"expected an input of shape (N, C) or (N, C, *), got rank {x.ndim}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)):
        raise TypeError(f"num_groups must be an int, got {num_groups!r}")
    N, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(
            f"num_groups={num_groups} must be a positive divisor of the number of "
            f"channels C={C} (input shape {x.shape})"
        )
    weight = _check_per_channel(weight, "weight", C)
    bias = _check_per_channel(bias, "bias", C)
    grouped = x.reshape(N, num_groups, C // num_groups, *x.shape[2:])
    x_hat, _, _ = normalize(grouped, tuple(range(2, grouped.ndim)), eps)
    return _affine_per_channel(x_hat.reshape(x.shape), weight, bias, x.dtype)


def instance_norm(
    x,
    running_mean=None,
    running_var=None,
    weight=None,
    bias=None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
):
    r"""Instance normalization (Ulyanov et al., 2016), as ``torch.nn.functional.instance_norm``.

    Each channel of each sample is standardized over its positions only:

    .. math::
        y_{n,c,s} = \gamma_c \frac{x_{n,c,s} - \mu_{n,c}}{\sqrt{\sigma_{n,c}^2 + \epsilon}}
            + \beta_c .

    With ``use_input_stats=True`` and running statistics given, these are
    updated **in place** the way torch does it: with the batch average of the
    per-instance means and of the per-instance *unbiased* variances,

    .. math::
        \hat\mu_c \leftarrow (1-m)\hat\mu_c + m\,\tfrac1N\textstyle\sum_n \mu_{n,c}, \quad
        \hat\sigma^2_c \leftarrow (1-m)\hat\sigma^2_c
            + m\,\tfrac1N\textstyle\sum_n \tfrac{s}{s-1}\sigma^2_{n,c},

    with :math:`s` positions per channel. With ``use_input_stats=False`` the
    running statistics replace the per-instance ones.

    Parameters
    ----------
    x : ndarray, shape (N, C, *) with at least one spatial axis
    running_mean, running_var : ndarray, shape (C,), optional
        Required when ``use_input_stats=False``.
    weight, bias : ndarray, shape (C,), optional
    use_input_stats : bool
    momentum : float in [0, 1]
    eps : float

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``

    Raises
    ------
    TypeError
        If an array is not floating point.
    ValueError
        If ``x`` has rank < 2; a per-channel array does not have shape
        ``(C,)``; only one of the running statistics is given; using input
        statistics with at most one position per channel; ``momentum`` is
        outside ``[0, 1]``; or ``use_input_stats=False`` without running
        statistics.
    """
    x = _as_float_array(x)
    if x.ndim < 2:
        raise ValueError(f"expected an input of shape (N, C, *), got rank {x.ndim}")
    C = x.shape[1]
    running_mean = _check_per_channel(running_mean, "running_mean", C)
    running_var = _check_per_channel(running_var, "running_var", C)
    weight = _check_per_channel(weight, "weight", C)
    bias = _check_per_channel(bias, "bias", C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if not use_input_stats:
        if running_mean is None:
            raise ValueError("use_input_stats=False needs running_mean and running_var")
        mean = _per_channel_view(running_mean, x.ndim)
        var = _per_channel_view(running_var, x.ndim)
        return _affine_per_channel((x - mean) / np.sqrt(var + eps), weight, bias, x.dtype)

    s = int(np.prod(x.shape[2:]))
    if s <= 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {x.shape}"
        )
    if momentum is None or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
    x_hat, mean, var = normalize(x, tuple(range(2, x.ndim)), eps)
    if running_mean is not None:
        running_mean *= 1.0 - momentum
        running_mean += momentum * mean.reshape(x.shape[:2]).mean(axis=0)
        running_var *= 1.0 - momentum
        running_var += momentum * (var.reshape(x.shape[:2]) * (s / (s - 1))).mean(axis=0)
    return _affine_per_channel(x_hat, weight, bias, x.dtype)


def rms_norm(x, normalized_shape, weight=None, eps: float | None = None):
    r"""RMS normalization (Zhang and Sennrich, 2019), as ``torch.nn.functional.rms_norm``.

    Layer norm without the centring: divide by the root mean square over the
    trailing axes and scale element-wise,

    .. math::
        y = \frac{x}{\sqrt{\tfrac1m \sum x^2 + \epsilon}} \odot \gamma .

    There is no mean subtraction and no bias, so the output keeps the sign
    pattern of the input and is not invariant to shifting it.

    Parameters
    ----------
    x : ndarray, shape (*, *normalized_shape)
    normalized_shape : int or tuple of int
    weight : ndarray of shape ``normalized_shape``, optional
    eps : float, optional
        ``None`` uses the machine epsilon of ``x``'s dtype, as torch does.

    Returns
    -------
    y : ndarray, same shape and dtype as ``x``

    Raises
    ------
    TypeError, ValueError
        As :func:`layer_norm`.
    """
    x = _as_float_array(x)
    shape = _check_normalized_shape(x, normalized_shape)
    weight = _check_elementwise(weight, "weight", shape)
    if eps is None:
        eps = float(np.finfo(x.dtype).eps)
    axes = tuple(range(x.ndim - len(shape), x.ndim))
    # The "variance" about zero instead of about the mean: the one change from layer_norm.
    y = x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    return y.astype(x.dtype, copy=False)


def normalize_backward(dx_hat, x, axes, eps: float = 1e-5):
    r"""Gradient through :func:`normalize` over any ``axes``.

    For :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` with :math:`m`
    elements sharing each mean and variance,

    .. math::
        \frac{\partial L}{\partial x} = \frac{1}{m\sqrt{\sigma^2+\epsilon}}
            \Big(m\,\partial\hat x - \textstyle\sum \partial\hat x
            - \hat x \sum \partial\hat x\,\hat x\Big),

    the sums running over ``axes``. :func:`batch_norm_backward` is this with
    batch norm's axes and ``dx_hat = gamma * dy``; layer, instance and group
    norm differ only in ``axes`` (group norm after reshaping channels into
    groups).

    Parameters
    ----------
    dx_hat : ndarray, shape of ``x``
        Gradient of the loss with respect to the normalized :math:`\hat x`.
    x : ndarray
    axes : tuple of int
    eps : float

    Returns
    -------
    dx : ndarray, same shape and dtype as ``x``

    Raises
    ------
    ValueError
        If the shapes of ``dx_hat`` and ``x`` differ.
    """
    x = _as_float_array(x, "x")
    dx_hat = _as_float_array(dx_hat, "dx_hat")
    if dx_hat.shape != x.shape:
        raise ValueError(f"dx_hat must have the shape of x, {x.shape}, got {dx_hat.shape}")
    x_hat, _, var = normalize(x, axes, eps)
    m = int(np.prod([x.shape[a] for a in np.atleast_1d(axes)]))
    total = dx_hat.sum(axis=axes, keepdims=True)
    along = (dx_hat * x_hat).sum(axis=axes, keepdims=True)
    dx = (m * dx_hat - total - x_hat * along) / (m * np.sqrt(var + eps))
    return dx.astype(x.dtype, copy=False)
