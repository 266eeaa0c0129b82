"""Layer, group, instance and RMS norm in bnbook.functional (NumPy) against torch.

Forward outputs (and instance norm's in-place running statistics) are compared
with ``torch.nn.functional`` on several ranks, both dtypes, with and without
the affine step. The generic :func:`normalize_backward` is compared with
autograd through each torch normalizer. The identities that tie the family
together (GN with one group = LN over (C, *), GN with C groups = IN) are
checked, and every error has a test.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bnbook.functional import (
    batch_norm_backward,
    channel_axes,
    group_norm,
    instance_norm,
    layer_norm,
    normalize_backward,
    rms_norm,
)

DTYPES = [np.float32, np.float64]
TOL = {np.float32: {"rtol": 1e-4, "atol": 2e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-12}}
# (input shape, number of trailing axes that layer norm normalizes over)
LN_CASES = [((8, 5), 1), ((4, 3, 6), 1), ((4, 3, 6), 2), ((2, 4, 5, 6), 3), ((3, 2, 3, 4, 5), 2)]
# (input shape, number of groups)
GN_CASES = [((4, 6), 3), ((4, 6, 5), 1), ((4, 6, 5), 2), ((2, 8, 4, 4), 4), ((3, 6, 2, 3, 4), 6)]
IN_SHAPES = [(4, 3, 7), (2, 5, 4, 6), (1, 2, 3, 4), (3, 2, 2, 3, 4)]


def _x(rng, shape, dtype):
    """Input with a large offset and a varying scale, to stress the statistics."""
    return (5.0 + rng.uniform(0.5, 3.0) * rng.normal(size=shape)).astype(dtype)


def _t(a):
    return None if a is None else torch.from_numpy(np.array(a))


# --------------------------------------------------------------------------- #
# Forward against torch
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("shape", "k"), LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_matches_torch(rng, shape, k, dtype, affine):
    x = _x(rng, shape, dtype)
    ns = shape[-k:]
    w = rng.uniform(0.5, 2, ns).astype(dtype) if affine else None
    b = rng.normal(size=ns).astype(dtype) if affine else None
    y = layer_norm(x, ns, w, b, eps=1e-5)
    ty = F.layer_norm(_t(x), ns, _t(w), _t(b), eps=1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])


def test_layer_norm_accepts_an_int_for_one_axis(rng):
    x = rng.normal(size=(3, 4, 5))
    np.testing.assert_array_equal(layer_norm(x, 5), layer_norm(x, (5,)))


@pytest.mark.parametrize(("shape", "groups"), GN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_matches_torch(rng, shape, groups, dtype, affine):
    x = _x(rng, shape, dtype)
    C = shape[1]
    w = rng.uniform(0.5, 2, C).astype(dtype) if affine else None
    b = rng.normal(size=C).astype(dtype) if affine else None
    y = group_norm(x, groups, w, b, eps=1e-3)
    ty = F.group_norm(_t(x), groups, _t(w), _t(b), eps=1e-3)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])


@pytest.mark.parametrize("shape", IN_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.5])
def test_instance_norm_and_running_stats_match_torch(rng, shape, dtype, affine, momentum):
    C = shape[1]
    w = rng.uniform(0.5, 2, C).astype(dtype) if affine else None
    b = rng.normal(size=C).astype(dtype) if affine else None
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    trm, trv = _t(rm), _t(rv)
    for _ in range(3):
        x = _x(rng, shape, dtype)
        y = instance_norm(x, rm, rv, w, b, use_input_stats=True, momentum=momentum)
        ty = F.instance_norm(_t(x), trm, trv, _t(w), _t(b), use_input_stats=True, momentum=momentum)
        assert y.dtype == dtype and y.shape == x.shape
        np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])
        np.testing.assert_allclose(rm, trm.numpy(), **TOL[dtype])
        np.testing.assert_allclose(rv, trv.numpy(), **TOL[dtype])
    x = _x(rng, shape, dtype)
    y = instance_norm(x, rm, rv, w, b, use_input_stats=False)
    ty = F.instance_norm(_t(x), trm, trv, _t(w), _t(b), use_input_stats=False)
    np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])


@pytest.mark.parametrize("shape", IN_SHAPES)
def test_instance_norm_without_running_stats_matches_torch(rng, shape):
    x = _x(rng, shape, np.float64)
    np.testing.assert_allclose(instance_norm(x), F.instance_norm(_t(x)).numpy(), **TOL[np.float64])


@pytest.mark.parametrize(("shape", "k"), LN_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("eps", [None, 1e-3])
@pytest.mark.parametrize("affine", [True, False])
def test_rms_norm_matches_torch(rng, shape, k, dtype, eps, affine):
    # Small inputs make the default eps (machine epsilon) matter.
    x = (rng.normal(size=shape) * (1e-3 if eps is None else 1.0)).astype(dtype)
    ns = shape[-k:]
    w = rng.uniform(0.5, 2, ns).astype(dtype) if affine else None
    y = rms_norm(x, ns, w, eps=eps)
    ty = F.rms_norm(_t(x), ns, _t(w), eps=eps)
    assert y.dtype == dtype and y.shape == x.shape
    np.testing.assert_allclose(y, ty.numpy(), **TOL[dtype])


def test_rms_norm_default_eps_is_the_dtype_machine_epsilon():
    # With x = 0 the output is 0 for any eps; with a tiny constant it exposes eps.
    x = np.full((1, 4), 1e-4, dtype=np.float32)
    expected = 1e-4 / np.sqrt(1e-8 + np.finfo(np.float32).eps)
    np.testing.assert_allclose(rms_norm(x, 4), expected, rtol=1e-5)


# --------------------------------------------------------------------------- #
# One family: identities between the normalizers
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [(4, 6, 5), (2, 8, 4, 4), (3, 6, 2, 3, 4)])
def test_group_norm_with_one_group_is_layer_norm_over_channels_and_positions(rng, shape):
    x = _x(rng, shape, np.float64)
    np.testing.assert_allclose(group_norm(x, 1), layer_norm(x, shape[1:]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6, 5), (2, 8, 4, 4), (3, 6, 2, 3, 4)])
def test_group_norm_with_one_channel_per_group_is_instance_norm(rng, shape):
    x = _x(rng, shape, np.float64)
    w, b = rng.uniform(0.5, 2, shape[1]), rng.normal(size=shape[1])
    np.testing.assert_allclose(
        group_norm(x, shape[1], w, b), instance_norm(x, weight=w, bias=b), rtol=1e-12, atol=1e-12
    )


def test_layer_norm_of_a_sample_does_not_depend_on_the_rest_of_the_batch(rng):
    x = _x(rng, (5, 4, 3, 3), np.float64)
    alone = layer_norm(x[:1], (4, 3, 3))
    np.testing.assert_allclose(layer_norm(x, (4, 3, 3))[:1], alone, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(group_norm(x, 2)[:1], group_norm(x[:1], 2), rtol=1e-12, atol=1e-12)


def test_instance_norm_is_invariant_to_per_image_affine_intensity_changes(rng):
    x = _x(rng, (3, 2, 5, 5), np.float64)
    a, c = rng.uniform(0.2, 5, (3, 1, 1, 1)), rng.normal(0, 10, (3, 1, 1, 1))
    np.testing.assert_allclose(
        instance_norm(a * x + c, eps=0), instance_norm(x, eps=0), rtol=1e-9, atol=1e-9
    )


def test_rms_norm_equals_layer_norm_on_zero_mean_inputs(rng):
    x = rng.normal(size=(4, 10))
    x -= x.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(rms_norm(x, 10, eps=1e-5), layer_norm(x, 10, eps=1e-5), rtol=1e-12)


# --------------------------------------------------------------------------- #
# The generic backward against autograd
# --------------------------------------------------------------------------- #
def _autograd(fn, x, dy):
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    fn(tx).backward(torch.from_numpy(dy))
    return tx.grad.numpy()


@pytest.mark.parametrize(("shape", "k"), LN_CASES)
def test_normalize_backward_over_layer_axes_matches_autograd(rng, shape, k):
    x, dy = _x(rng, shape, np.float64), rng.normal(size=shape)
    ns = shape[-k:]
    w = rng.uniform(0.5, 2, ns)
    axes = tuple(range(len(shape) - k, len(shape)))
    expected = _autograd(lambda t: F.layer_norm(t, ns, torch.from_numpy(w)), x, dy)
    np.testing.assert_allclose(normalize_backward(dy * w, x, axes), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("shape", "groups"), GN_CASES)
def test_normalize_backward_over_group_axes_matches_autograd(rng, shape, groups):
    x, dy = _x(rng, shape, np.float64), rng.normal(size=shape)
    N, C = shape[:2]
    w = rng.uniform(0.5, 2, C)
    view = (1, C) + (1,) * (len(shape) - 2)
    expected = _autograd(lambda t: F.group_norm(t, groups, torch.from_numpy(w)), x, dy)
    grouped = (N, groups, C // groups, *shape[2:])
    dx = normalize_backward(
        (dy * w.reshape(view)).reshape(grouped), x.reshape(grouped), tuple(range(2, len(grouped)))
    )
    np.testing.assert_allclose(dx.reshape(shape), expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", IN_SHAPES)
def test_normalize_backward_over_instance_axes_matches_autograd(rng, shape):
    x, dy = _x(rng, shape, np.float64), rng.normal(size=shape)
    expected = _autograd(F.instance_norm, x, dy)
    dx = normalize_backward(dy, x, tuple(range(2, len(shape))))
    np.testing.assert_allclose(dx, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 5, 6)])
def test_normalize_backward_over_batch_axes_is_batch_norm_backward(rng, shape):
    x, dy = _x(rng, shape, np.float64), rng.normal(size=shape)
    dx, _, _ = batch_norm_backward(dy, x)
    np.testing.assert_allclose(
        normalize_backward(dy, x, channel_axes(len(shape))), dx, rtol=1e-10, atol=1e-12
    )


def test_normalize_backward_float32_keeps_dtype(rng):
    x, dy = _x(rng, (4, 6), np.float32), rng.normal(size=(4, 6)).astype(np.float32)
    assert normalize_backward(dy, x, (1,)).dtype == np.float32


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def test_group_norm_rejects_groups_that_do_not_divide_channels():
    with pytest.raises(ValueError, match="num_groups=4 must be a positive divisor.*C=6"):
        group_norm(np.zeros((2, 6, 3)), 4)
    with pytest.raises(ValueError, match="positive divisor"):
        group_norm(np.zeros((2, 6, 3)), 0)


def test_group_norm_rejects_non_int_groups_and_low_rank():
    with pytest.raises(TypeError, match="num_groups must be an int"):
        group_norm(np.zeros((2, 6, 3)), 2.0)
    with pytest.raises(ValueError, match="rank 1"):
        group_norm(np.zeros(6), 1)


def test_group_norm_rejects_bad_affine_shape():
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        group_norm(np.zeros((2, 6, 3)), 2, weight=np.ones(3))


def test_layer_norm_rejects_mismatched_normalized_shape():
    with pytest.raises(ValueError, match="trailing axes"):
        layer_norm(np.zeros((4, 6, 3)), (4,))
    with pytest.raises(ValueError, match="trailing axes"):
        layer_norm(np.zeros((3,)), (2, 3))
    with pytest.raises(ValueError, match="at least one axis"):
        layer_norm(np.zeros((4, 3)), ())
    with pytest.raises(TypeError, match="normalized_shape must be an int"):
        layer_norm(np.zeros((4, 3)), None)


def test_layer_and_rms_norm_reject_bad_weight_shape():
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(np.zeros((4, 3)), 3, weight=np.ones(4))
    with pytest.raises(ValueError, match="bias must have shape"):
        layer_norm(np.zeros((4, 3)), 3, bias=np.ones((1, 3)))
    with pytest.raises(ValueError, match="weight must have shape"):
        rms_norm(np.zeros((4, 3)), 3, weight=np.ones(4))


def test_alternatives_reject_integer_and_torch_inputs():
    with pytest.raises(TypeError, match="floating dtype"):
        layer_norm(np.zeros((2, 3), dtype=int), 3)
    with pytest.raises(TypeError, match="torch.Tensor"):
        group_norm(torch.zeros(2, 4), 2)
    with pytest.raises(TypeError, match="floating dtype"):
        rms_norm(np.zeros((2, 3), dtype=np.int32), 3)


def test_instance_norm_needs_more_than_one_position_when_using_input_stats():
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        instance_norm(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        instance_norm(np.zeros((4, 3, 1)))


def test_instance_norm_running_stat_errors():
    x = np.ones((2, 3, 4))
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        instance_norm(x, use_input_stats=False)
    with pytest.raises(ValueError, match="given together"):
        instance_norm(x, running_mean=np.zeros(3))
    with pytest.raises(ValueError, match=r"running_var must have shape \(3,\)"):
        instance_norm(x, np.zeros(3), np.ones(2))
    with pytest.raises(ValueError, match="momentum"):
        instance_norm(x, np.zeros(3), np.ones(3), momentum=1.5)
    with pytest.raises(ValueError, match="rank 1"):
        instance_norm(np.ones(3))


def test_normalize_backward_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="dx_hat must have the shape of x"):
        normalize_backward(np.zeros((2, 3)), np.zeros((3, 2)), (1,))
