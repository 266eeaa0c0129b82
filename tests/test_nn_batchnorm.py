"""bnbook.nn (torch, from elementary ops) against torch.nn and torch.nn.functional.

The modules must be drop-in replacements for ``torch.nn.BatchNorm1d/2d/3d``:
the same outputs, running statistics, ``num_batches_tracked``, gradients,
state_dict keys, repr and input checks.
"""

from __future__ import annotations

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bnbook.nn as bnn
from bnbook.nn import functional as bnf

pytestmark = pytest.mark.usefixtures("torch_one_thread")

CLASSES = {
    "1d": (bnn.BatchNorm1d, nn.BatchNorm1d),
    "2d": (bnn.BatchNorm2d, nn.BatchNorm2d),
    "3d": (bnn.BatchNorm3d, nn.BatchNorm3d),
}
# (kind, input shape): every rank each class accepts, including 1x1 spatial maps
CASES = [
    ("1d", (8, 3)),
    ("1d", (4, 3, 7)),
    ("2d", (4, 3, 5, 6)),
    ("2d", (2, 3, 1, 1)),
    ("3d", (2, 3, 3, 4, 2)),
]
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}
# Input gradients are differences of nearly equal terms (with m = 2 they vanish up to eps),
# so float32 gradients get a looser absolute tolerance than float32 outputs.
GRAD_TOL = {torch.float32: {"rtol": 1e-3, "atol": 1e-3}, torch.float64: TOL[torch.float64]}
SUPPORTS_BIAS_FLAG = "bias" in inspect.signature(nn.BatchNorm1d.__init__).parameters


def _pair(kind, C, **kwargs):
    ours_cls, torch_cls = CLASSES[kind]
    ours, ref = ours_cls(C, **kwargs), torch_cls(C, **kwargs)
    if ours.affine:  # non-trivial parameters, shared by both
        with torch.no_grad():
            ours.weight.uniform_(0.5, 2.0)
            ours.bias.normal_()
        ref.load_state_dict(ours.state_dict())
    return ours, ref


def _batch(shape, dtype, gen):
    C = shape[1]
    view = (1, C) + (1,) * (len(shape) - 2)
    loc = torch.randn(view, generator=gen, dtype=dtype) * 3
    scale = torch.rand(view, generator=gen, dtype=dtype) * 3 + 0.5
    return loc + scale * torch.randn(shape, generator=gen, dtype=dtype)


def _assert_same_state(ours, ref, tol):
    for name, b in ref.named_buffers():
        ob = getattr(ours, name)
        assert ob.dtype == b.dtype, name
        torch.testing.assert_close(ob, b, **tol)


# --------------------------------------------------------------------------- #
# Modules against torch.nn
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("kind", "shape"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_module_matches_torch(kind, shape, dtype, momentum, affine, track):
    gen = torch.Generator().manual_seed(0)
    tol = TOL[dtype]
    ours, ref = _pair(kind, shape[1], momentum=momentum, affine=affine,
                      track_running_stats=track, dtype=dtype)  # fmt: skip
    for _ in range(3):  # training steps: outputs, gradients, running statistics
        x = _batch(shape, dtype, gen)
        dy = torch.randn(shape, generator=gen, dtype=dtype)
        xo, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        yo, yr = ours(xo), ref(xr)
        assert yo.dtype == dtype
        torch.testing.assert_close(yo, yr, **tol)
        yo.backward(dy)
        yr.backward(dy)
        torch.testing.assert_close(xo.grad, xr.grad, **GRAD_TOL[dtype])
        for (name, po), pr in zip(ours.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(po.grad, pr.grad, **GRAD_TOL[dtype], msg=name)
        _assert_same_state(ours, ref, tol)
    if track:
        assert int(ours.num_batches_tracked) == 3
    ours.eval()
    ref.eval()
    x = _batch(shape, dtype, gen)
    torch.testing.assert_close(ours(x), ref(x), **tol)
    _assert_same_state(ours, ref, tol)


def test_momentum_none_is_the_plain_average_of_batch_statistics():
    gen = torch.Generator().manual_seed(1)
    bn = bnn.BatchNorm2d(3, momentum=None, dtype=torch.float64)
    batches = [_batch((4, 3, 2, 2), torch.float64, gen) for _ in range(5)]
    for x in batches:
        bn(x)
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x in batches])
    variances = torch.stack([x.var(dim=(0, 2, 3)) for x in batches])  # unbiased
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))


def test_eval_output_of_a_sample_does_not_depend_on_the_batch():
    gen = torch.Generator().manual_seed(2)
    bn = bnn.BatchNorm2d(3)
    for _ in range(4):
        bn(_batch((6, 3, 4, 4), torch.float32, gen))
    bn.eval()
    x = _batch((5, 3, 4, 4), torch.float32, gen)
    single = torch.cat([bn(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(bn(x), single)


def test_reset_and_constructor_options():
    bn = bnn.BatchNorm1d(4, eps=1e-3, dtype=torch.float64)
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert bn.num_batches_tracked.dtype == torch.long
    bn(torch.randn(8, 4, dtype=torch.float64) + 5)
    bn.reset_running_stats()
    assert bn.running_mean.eq(0).all() and bn.running_var.eq(1).all()
    assert int(bn.num_batches_tracked) == 0
    plain = bnn.BatchNorm1d(4, affine=False, track_running_stats=False)
    assert plain.weight is None and plain.bias is None and plain.running_mean is None
    assert list(plain.state_dict()) == []


@pytest.mark.skipif(not SUPPORTS_BIAS_FLAG, reason="torch < 2.6 has no bias= argument")
def test_scale_without_shift_matches_torch():
    gen = torch.Generator().manual_seed(3)
    ours, ref = bnn.BatchNorm2d(3, bias=False), nn.BatchNorm2d(3, bias=False)
    assert ours.bias is None and list(ours.state_dict()) == list(ref.state_dict())
    x = _batch((4, 3, 2, 2), torch.float32, gen)
    torch.testing.assert_close(ours(x), ref(x))


# --------------------------------------------------------------------------- #
# The functional form against torch.nn.functional.batch_norm
# --------------------------------------------------------------------------- #
SHAPES = [(8, 3), (2, 5), (5, 4, 7), (4, 3, 5, 6), (3, 2, 3, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("momentum", [0.1, 0.3])
@pytest.mark.parametrize("affine", [True, False])
def test_functional_matches_torch(shape, dtype, training, momentum, affine):
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = _batch(shape, dtype, gen)
    w = torch.rand(C, generator=gen, dtype=dtype) + 0.5 if affine else None
    b = torch.randn(C, generator=gen, dtype=dtype) if affine else None
    rm = torch.randn(C, generator=gen, dtype=dtype)
    rv = torch.rand(C, generator=gen, dtype=dtype) + 0.5
    ours_stats, ref_stats = (rm.clone(), rv.clone()), (rm.clone(), rv.clone())
    args = (w, b, training, momentum, 1e-5)
    y = bnf.batch_norm(x, *ours_stats, *args)
    torch.testing.assert_close(y, F.batch_norm(x, *ref_stats, *args), **TOL[dtype])
    for o, r in zip(ours_stats, ref_stats, strict=True):
        torch.testing.assert_close(o, r, **TOL[dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_functional_gradients_match_torch(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    inputs = [
        _batch(shape, dtype, gen),
        torch.rand(C, generator=gen, dtype=dtype) + 0.5,
        torch.randn(C, generator=gen, dtype=dtype),
    ]
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    ours = [t.clone().requires_grad_() for t in inputs]
    ref = [t.clone().requires_grad_() for t in inputs]
    bnf.batch_norm(ours[0], None, None, *ours[1:], training=True).backward(dy)
    F.batch_norm(ref[0], None, None, *ref[1:], training=True).backward(dy)
    for o, r in zip(ours, ref, strict=True):
        torch.testing.assert_close(o.grad, r.grad, **GRAD_TOL[dtype])


@pytest.mark.parametrize("shape", [(5, 2), (3, 2, 3), (2, 2, 2, 2), (2, 2, 1, 2, 2)])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_float64(shape, training):
    gen = torch.Generator().manual_seed(0)
    C = shape[1]
    x = _batch(shape, torch.float64, gen).requires_grad_()
    w = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(C, generator=gen, dtype=torch.float64).requires_grad_()
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64) * 2

    def f(x, w, b):
        # running buffers are only read in eval and not updated here in training
        stats = (None, None) if training else (rm, rv)
        return bnf.batch_norm(x, *stats, w, b, training=training)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_half_precision_is_accumulated_in_float32():
    gen = torch.Generator().manual_seed(4)
    x = _batch((16, 3, 4, 4), torch.float32, gen).to(torch.bfloat16)
    y = bnf.batch_norm(x, None, None, training=True)
    assert y.dtype == torch.bfloat16
    # both round a float32 result to bfloat16: at most a rounding step apart (2^-7 near 1)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, training=True), rtol=0, atol=2**-6)


# --------------------------------------------------------------------------- #
# state_dict, loading and repr
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kind", list(CLASSES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_keys_and_repr_match_torch(kind, affine, track):
    ours_cls, torch_cls = CLASSES[kind]
    kwargs = {"eps": 1e-3, "momentum": 0.3, "affine": affine, "track_running_stats": track}
    ours, ref = ours_cls(5, **kwargs), torch_cls(5, **kwargs)
    assert list(ours.state_dict()) == list(ref.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert ours._version == ref._version
    if SUPPORTS_BIAS_FLAG:
        assert repr(ours) == repr(ref)
    else:
        assert repr(ours).replace("bias=True, ", "") == repr(ref)


def test_state_dict_round_trip_with_torch():
    gen = torch.Generator().manual_seed(5)
    ref = nn.BatchNorm2d(3)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2.0)
    for _ in range(3):
        ref(_batch((4, 3, 2, 2), torch.float32, gen))
    ours = bnn.BatchNorm2d(3)
    ours.load_state_dict(ref.state_dict())
    for (k, v), (k2, v2) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert k == k2
        torch.testing.assert_close(v, v2, rtol=0, atol=0)
    ours(_batch((4, 3, 2, 2), torch.float32, gen))  # a 4th step in ours only
    back = nn.BatchNorm2d(3)
    back.load_state_dict(ours.state_dict())
    assert int(back.num_batches_tracked) == 4
    torch.testing.assert_close(back.running_mean, ours.running_mean, rtol=0, atol=0)
    x = _batch((4, 3, 2, 2), torch.float32, gen)
    torch.testing.assert_close(back.eval()(x), ours.eval()(x))


@pytest.mark.parametrize("trained", [False, True])
def test_old_state_dict_without_num_batches_tracked_loads_like_torch(trained):
    gen = torch.Generator().manual_seed(6)
    source = nn.BatchNorm1d(3)
    source(_batch((8, 3), torch.float32, gen))
    old = source.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1  # as saved by torch < 0.4.1
    ours, ref = bnn.BatchNorm1d(3), nn.BatchNorm1d(3)
    if trained:  # torch keeps the module's own count rather than resetting it
        for _ in range(2):
            x = _batch((8, 3), torch.float32, gen)
            ours(x)
            ref(x)
    ours.load_state_dict(old)  # strict: the missing key must not be an error
    ref.load_state_dict(old)
    _assert_same_state(ours, ref, {"rtol": 0, "atol": 0})
    assert int(ours.num_batches_tracked) == (2 if trained else 0)
    # a version-2 dict that lacks the key is an ordinary missing key
    bad = source.state_dict()
    del bad["num_batches_tracked"]
    with pytest.raises(RuntimeError, match="Missing key.*num_batches_tracked"):
        bnn.BatchNorm1d(3).load_state_dict(bad)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def _same_value_error(ours, ref, x) -> str:
    """Both modules reject ``x`` with a ValueError, word for word the same; return it."""
    with pytest.raises(ValueError) as ref_error:
        ref(x)
    with pytest.raises(ValueError) as ours_error:
        ours(x)
    assert str(ours_error.value) == str(ref_error.value)
    return str(ours_error.value)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [("1d", (4,)), ("1d", (2, 3, 4, 5)), ("2d", (4, 3)), ("2d", (2, 3, 4)), ("2d", (2, 3, 1, 1, 1)),
     ("3d", (2, 3, 4, 5))],
)  # fmt: skip
def test_wrong_rank_is_rejected_with_torchs_message(kind, shape):
    ours_cls, torch_cls = CLASSES[kind]
    x = torch.randn(shape)
    _same_value_error(ours_cls(3), torch_cls(3), x)


def test_rank_below_two_is_rejected_by_the_functional():
    with pytest.raises(ValueError, match=r"\(N, C\) or \(N, C, \*\), got 1D input"):
        bnf.batch_norm(torch.ones(4), None, None, training=True)


@pytest.mark.parametrize("track", [True, False])
def test_channel_mismatch_is_rejected(track):
    bn = bnn.BatchNorm2d(4, track_running_stats=track)
    with pytest.raises(ValueError, match=r"BatchNorm2d\(4\) got an input with 3 channels"):
        bn(torch.randn(2, 3, 4, 4))


@pytest.mark.parametrize("name", ["running_mean", "running_var", "weight", "bias"])
def test_functional_per_channel_shape_mismatch_is_rejected(name):
    kwargs = {"running_mean": torch.zeros(3), "running_var": torch.ones(3)}
    kwargs[name] = torch.ones(2)
    with pytest.raises(ValueError, match=rf"{name} has shape \(2,\).*expected shape \(3,\)"):
        bnf.batch_norm(torch.randn(4, 3), training=True, **kwargs)


@pytest.mark.parametrize(
    ("kind", "shape"), [("1d", (1, 3)), ("1d", (1, 3, 1)), ("2d", (1, 3, 1, 1))]
)
def test_one_value_per_channel_in_training_is_rejected_like_torch(kind, shape):
    ours_cls, torch_cls = CLASSES[kind]
    x = torch.randn(shape)
    message = _same_value_error(ours_cls(3), torch_cls(3), x)
    assert message.startswith("Expected more than 1 value per channel when training")
    # fine in evaluation mode, where the running statistics are used
    torch.testing.assert_close(ours_cls(3).eval()(x), torch_cls(3).eval()(x))


def test_functional_eval_without_running_stats_is_rejected():
    with pytest.raises(ValueError, match="required in evaluation mode"):
        bnf.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_module_without_running_stats_uses_batch_stats_in_eval_like_torch():
    gen = torch.Generator().manual_seed(7)
    ours, ref = _pair("2d", 3, track_running_stats=False)
    x = _batch((4, 3, 2, 2), torch.float32, gen)
    torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


@pytest.mark.parametrize(("rm", "rv"), [(torch.zeros(3), None), (None, torch.ones(3))])
@pytest.mark.parametrize("training", [True, False])
def test_running_mean_without_running_var_is_rejected(rm, rv, training):
    with pytest.raises(ValueError, match="must be given together"):
        bnf.batch_norm(torch.randn(4, 3), rm, rv, training=training)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_cannot_poison_running_stats(bad):
    bn = bnn.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2)
    x[0, 1, 0, 0] = bad
    with pytest.raises(ValueError, match="NaN or infinite values"):
        bn(x)
    for k, v in bn.state_dict().items():  # a rejected batch leaves no trace
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    # in evaluation mode nothing is updated, so the value simply propagates
    y = bn.eval()(x)
    assert not torch.isfinite(y[0, 1, 0, 0]) and torch.isfinite(y[1:]).all()


@pytest.mark.parametrize("momentum", [-0.1, 1.5])
def test_bad_momentum_is_rejected(momentum):
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None"):
        bnn.BatchNorm1d(3, momentum=momentum)


@pytest.mark.parametrize("num_features", [0, -2, 2.5, "3"])
def test_bad_num_features_is_rejected(num_features):
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        bnn.BatchNorm1d(num_features)


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.ones(4, 3, dtype=torch.long), "floating dtype, got torch.int64"),
        (torch.ones(4, 3, dtype=torch.bool), "floating dtype, got torch.bool"),
        ([[1.0, 2.0, 3.0]] * 4, "must be a torch.Tensor, got list"),
    ],
)
def test_non_float_or_non_tensor_input_raises_type_error(x, message):
    with pytest.raises(TypeError, match=message):
        bnn.BatchNorm1d(3)(x)
    with pytest.raises(TypeError, match=message):
        bnf.batch_norm(x, None, None, training=True)
