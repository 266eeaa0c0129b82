"""bnbook.functional (NumPy) against torch.nn.functional.batch_norm, plus properties.

Forward outputs, in-place running statistics and the compact and staged
backward passes are compared with PyTorch on ranks 2-5, both dtypes, with and
without the affine step; the backward passes are also checked against finite
differences. Every error the module raises has a test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnbook.functional import (
    batch_norm,
    batch_norm_backward,
    batch_norm_backward_staged,
    channel_axes,
    normalize,
)

pytestmark = pytest.mark.usefixtures("torch_one_thread")

SHAPES = [(8, 3), (2, 5), (5, 4, 7), (4, 3, 5, 6), (2, 2, 1, 1), (3, 2, 3, 4, 5)]
DTYPES = [np.float32, np.float64]
TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
BACKWARDS = [batch_norm_backward, batch_norm_backward_staged]


def _data(rng, shape, dtype, affine=True):
    """Input with channel-dependent offset and scale, per-channel parameters."""
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    loc = rng.normal(0, 3, C).reshape(view)
    scale = rng.uniform(0.5, 4, C).reshape(view)
    x = (loc + scale * rng.normal(size=shape)).astype(dtype)
    w = rng.uniform(0.5, 2, C).astype(dtype) if affine else None
    b = rng.normal(size=C).astype(dtype) if affine else None
    return x, w, b


def _t(a):
    return None if a is None else torch.from_numpy(np.array(a))


# --------------------------------------------------------------------------- #
# Forward and running statistics against torch
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.3])
def test_training_steps_then_eval_match_torch(rng, shape, dtype, affine, momentum):
    C = shape[1]
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    trm, trv = torch.zeros(C, dtype=torch.from_numpy(rm).dtype), torch.ones(C).to(_t(rv).dtype)
    for _ in range(3):
        x, w, b = _data(rng, shape, dtype, affine)
        y = batch_norm(x, rm, rv, w, b, training=True, momentum=momentum)
        ty = F.batch_norm(_t(x), trm, trv, _t(w), _t(b), training=True, momentum=momentum)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])
        np.testing.assert_allclose(rm, trm.numpy(), **TOL[dtype])
        np.testing.assert_allclose(rv, trv.numpy(), **TOL[dtype])
    x, w, b = _data(rng, shape, dtype, affine)
    y = batch_norm(x, rm, rv, w, b, training=False)
    ty = F.batch_norm(_t(x), trm, trv, _t(w), _t(b), training=False)
    np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_training_without_running_stats_matches_torch(rng, shape, dtype):
    x, w, b = _data(rng, shape, dtype)
    y = batch_norm(x, None, None, w, b, training=True)
    ty = F.batch_norm(_t(x), None, None, _t(w), _t(b), training=True)
    np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])


def test_running_stats_are_updated_in_place_with_unbiased_variance(rng):
    x = rng.normal(size=(6, 2, 3))
    rm, rv = np.zeros(2), np.ones(2)
    ids = id(rm), id(rv)
    batch_norm(x, rm, rv, training=True, momentum=1.0)
    assert (id(rm), id(rv)) == ids
    np.testing.assert_allclose(rm, x.mean(axis=(0, 2)))
    np.testing.assert_allclose(rv, x.var(axis=(0, 2), ddof=1))


def test_eval_does_not_touch_running_stats_and_is_per_sample(rng):
    x = rng.normal(size=(5, 3, 4))
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    before = rm.copy(), rv.copy()
    y = batch_norm(x, rm, rv, training=False)
    np.testing.assert_array_equal(rm, before[0])
    np.testing.assert_array_equal(rv, before[1])
    single = np.concatenate([batch_norm(x[i : i + 1], rm, rv) for i in range(5)])
    np.testing.assert_allclose(y, single)


def test_momentum_zero_freezes_and_one_replaces(rng):
    x = rng.normal(2.0, 3.0, size=(10, 2))
    rm, rv = np.zeros(2), np.ones(2)
    batch_norm(x, rm, rv, training=True, momentum=0.0)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    batch_norm(x, rm, rv, training=True, momentum=1.0)
    np.testing.assert_allclose(rm, x.mean(axis=0))


# --------------------------------------------------------------------------- #
# Properties of the transform
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
def test_normalized_channels_have_mean_zero_and_variance_one(rng, shape):
    x, _, _ = _data(rng, shape, np.float64)
    y = batch_norm(x, None, None, training=True, eps=0.0)
    axes = channel_axes(len(shape))
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_invariant_to_positive_scale_and_shift_per_channel(rng, shape):
    x, w, b = _data(rng, shape, np.float64)
    view = (1, shape[1]) + (1,) * (len(shape) - 2)
    a = rng.uniform(0.1, 10, shape[1]).reshape(view)
    c = rng.normal(0, 100, shape[1]).reshape(view)
    y = batch_norm(x, None, None, w, b, training=True, eps=0.0)
    np.testing.assert_allclose(batch_norm(a * x + c, None, None, w, b, training=True, eps=0.0), y)
    # a negative scale flips the sign of the normalized value
    z = batch_norm(-x, None, None, training=True, eps=0.0)
    np.testing.assert_allclose(z, -batch_norm(x, None, None, training=True, eps=0.0))


@pytest.mark.parametrize("shape", SHAPES)
def test_gamma_std_beta_mean_recover_the_identity(rng, shape):
    x, _, _ = _data(rng, shape, np.float64)
    axes = channel_axes(x.ndim)
    eps = 1e-5
    gamma = np.sqrt(x.var(axis=axes) + eps)
    beta = x.mean(axis=axes)
    np.testing.assert_allclose(batch_norm(x, None, None, gamma, beta, training=True, eps=eps), x)


def test_large_offset_does_not_destroy_precision(rng):
    # two-pass variance: a one-pass E[x^2] - E[x]^2 would cancel catastrophically here
    x = rng.normal(size=(64, 3))
    y = batch_norm(x, None, None, training=True)
    np.testing.assert_allclose(batch_norm(x + 1e8, None, None, training=True), y, atol=1e-6)


def test_normalize_returns_statistics_with_kept_axes(rng):
    x = rng.normal(size=(4, 3, 5))
    x_hat, mean, var = normalize(x, (0, 2), eps=0.0)
    assert mean.shape == var.shape == (1, 3, 1)
    np.testing.assert_allclose(var.ravel(), x.var(axis=(0, 2)))
    np.testing.assert_allclose(x_hat.std(axis=(0, 2)), 1.0)


@pytest.mark.parametrize(
    ("ndim", "axes"), [(2, (0,)), (3, (0, 2)), (4, (0, 2, 3)), (5, (0, 2, 3, 4))]
)
def test_channel_axes(ndim, axes):
    assert channel_axes(ndim) == axes


# --------------------------------------------------------------------------- #
# Backward passes
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_backward_matches_torch_autograd(rng, shape, dtype, affine, backward):
    x, w, b = _data(rng, shape, dtype, affine)
    dy = rng.normal(size=shape).astype(dtype)
    tx = _t(x).requires_grad_()
    tw = _t(w if affine else np.ones(shape[1], dtype)).requires_grad_()
    tb = _t(b if affine else np.zeros(shape[1], dtype)).requires_grad_()
    F.batch_norm(tx, None, None, tw, tb, training=True).backward(_t(dy))
    dx, dw, db = backward(dy, x, w)
    assert dx.dtype == dtype and dx.shape == x.shape and dw.shape == db.shape == (shape[1],)
    tol = {"rtol": 1e-3, "atol": 1e-4} if dtype == np.float32 else TOL[dtype]
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    np.testing.assert_allclose(dw, tw.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)


@pytest.mark.parametrize("shape", SHAPES)
def test_compact_equals_staged(rng, shape):
    x, w, _ = _data(rng, shape, np.float64)
    dy = rng.normal(size=shape)
    for a, b in zip(
        batch_norm_backward(dy, x, w), batch_norm_backward_staged(dy, x, w), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def _loss(x, w, b, dy):
    return float(np.sum(dy * batch_norm(x, None, None, w, b, training=True)))


def _numeric_grad(f, a, h=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + h
        up = f()
        a[i] = old - h
        down = f()
        a[i] = old
        g[i] = (up - down) / (2 * h)
    return g


@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 3), (2, 2, 2, 3), (2, 1, 2, 2, 2)])
@pytest.mark.parametrize("backward", BACKWARDS)
def test_backward_matches_finite_differences(rng, shape, backward):
    x, w, b = _data(rng, shape, np.float64)
    dy = rng.normal(size=shape)
    dx, dw, db = backward(dy, x, w)
    f = lambda: _loss(x, w, b, dy)  # noqa: E731
    np.testing.assert_allclose(dx, _numeric_grad(f, x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, _numeric_grad(f, w), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, _numeric_grad(f, b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backward", BACKWARDS)
def test_input_gradient_is_orthogonal_to_ones_and_x_hat(rng, shape, backward):
    x, w, _ = _data(rng, shape, np.float64)
    dy = rng.normal(size=shape)
    # exact for eps = 0; with eps > 0, x_hat has variance var / (var + eps) < 1
    dx, _, _ = backward(dy, x, w, eps=0.0)
    axes = channel_axes(x.ndim)
    x_hat, _, _ = normalize(x, axes, eps=0.0)
    scale = np.abs(dx).sum(axis=axes) + np.abs(dy).sum(axis=axes)  # dx = 0 when m = 2
    np.testing.assert_allclose(dx.sum(axis=axes) / scale, 0.0, atol=1e-12)
    np.testing.assert_allclose((dx * x_hat).sum(axis=axes) / scale, 0.0, atol=1e-12)


def test_weight_none_means_ones(rng):
    x, _, _ = _data(rng, (4, 3, 2), np.float64)
    dy = rng.normal(size=x.shape)
    for a, b in zip(
        batch_norm_backward(dy, x), batch_norm_backward(dy, x, np.ones(3)), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_rank_below_two_is_rejected():
    with pytest.raises(ValueError, match=r"shape \(N, C\) or \(N, C, \*\), got rank 1"):
        batch_norm(np.ones(4), None, None, training=True)
    with pytest.raises(ValueError, match="got rank 0"):
        channel_axes(0)
    with pytest.raises(ValueError, match="got rank 1"):
        batch_norm_backward(np.ones(4), np.ones(4))


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_per_channel_array_with_wrong_length_is_rejected(name):
    x = np.ones((4, 3, 2))
    kwargs = {"running_mean": np.zeros(3), "running_var": np.ones(3)}
    kwargs[name] = np.ones(4)
    with pytest.raises(ValueError, match=rf"{name} must have shape \(3,\).*got shape \(4,\)"):
        batch_norm(x, training=True, **kwargs)


def test_one_value_per_channel_in_training_is_rejected_like_torch():
    x = np.ones((1, 3))
    with pytest.raises(ValueError) as torch_error:
        F.batch_norm(torch.ones(1, 3), None, None, training=True)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        batch_norm(x, None, None, training=True)
    assert str(torch_error.value).startswith("Expected more than 1 value per channel when training")
    for backward in BACKWARDS:
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            backward(x, x)
    # one value per channel is fine in evaluation mode
    assert batch_norm(x, np.zeros(3), np.ones(3)).shape == (1, 3)


def test_eval_without_running_stats_is_rejected():
    with pytest.raises(ValueError, match="required in evaluation mode"):
        batch_norm(np.ones((4, 3)), None, None, training=False)


def test_running_mean_without_running_var_is_rejected():
    with pytest.raises(ValueError, match="must be given together"):
        batch_norm(np.ones((4, 3)), np.zeros(3), None, training=True)
    with pytest.raises(ValueError, match="must be given together"):
        batch_norm(np.ones((4, 3)), None, np.ones(3), training=False)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_cannot_poison_running_stats(rng, bad):
    x = rng.normal(size=(4, 3, 2))
    x[1, 2, 0] = bad
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="NaN or infinite values"):
        batch_norm(x, rm, rv, training=True)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)
    # without running statistics nothing persists, so the values just flow through
    with np.errstate(invalid="ignore"):  # inf - inf in the centring step
        y = batch_norm(x, None, None, training=True)
    assert np.isnan(y[:, 2]).all() and np.isfinite(y[:, :2]).all()


@pytest.mark.parametrize("momentum", [-0.1, 1.5, None])
def test_bad_momentum_is_rejected(momentum):
    with pytest.raises(ValueError, match="momentum must be a number in"):
        batch_norm(np.ones((4, 3)), np.zeros(3), np.ones(3), training=True, momentum=momentum)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.ones((4, 3), dtype=np.int64), "floating dtype, got int64"),
        (np.ones((4, 3), dtype=bool), "floating dtype, got bool"),
        ([[1, 2], [3, 4]], "floating dtype"),
        ("abc", "floating dtype"),
        (torch.ones(4, 3), "got a torch.Tensor"),
    ],
)
def test_non_float_or_non_array_input_raises_type_error(x, message):
    with pytest.raises(TypeError, match=message):
        batch_norm(x, None, None, training=True)


def test_non_float_per_channel_array_raises_type_error():
    with pytest.raises(TypeError, match="weight must have a floating dtype"):
        batch_norm(np.ones((4, 3)), None, None, np.ones(3, dtype=int), training=True)


def test_lists_of_floats_are_accepted():
    y = batch_norm([[1.0, 2.0], [3.0, 6.0]], None, None, training=True, eps=0.0)
    np.testing.assert_allclose(y, [[-1.0, -1.0], [1.0, 1.0]])


@pytest.mark.parametrize("backward", BACKWARDS)
def test_backward_errors(backward):
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match=r"dy must have the shape of x, \(4, 3\), got \(4, 2\)"):
        backward(np.ones((4, 2)), x)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        backward(x, x, np.ones(2))
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        backward(x, x.astype(int))
    with pytest.raises(TypeError, match="dy must be a NumPy array"):
        backward(torch.ones(4, 3), x)
