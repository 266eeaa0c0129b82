r"""Training-mode batch norm as one ``torch.autograd.Function`` with the compact backward.

:func:`bnbook.nn.functional.batch_norm` builds batch norm from a dozen tensor
operations and lets autograd record each of them; its backward then replays
the whole graph node by node and keeps every intermediate tensor alive. Here
the forward and the backward are written by hand, using the closed form of the
gradient (see :func:`bnbook.functional.batch_norm_backward`):

.. math::
    \frac{\partial L}{\partial x} = \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
        \Big(dy - \frac{1}{m}\sum dy - \hat x\,\frac{1}{m}\sum dy\,\hat x\Big).

What makes it fast is counting passes over the ``(N, C, *)`` tensor, since on
a CPU batch norm is limited by memory traffic, not arithmetic. Viewing the
input as ``(N, C, S)`` (``S`` the flattened spatial axes):

- forward: a sum for the mean, ``x - mu`` (the only saved tensor), a sum and a
  batched dot product (``bmm``, no squared temporary) for the variance, and
  ``y = (x - mu) * scale + offset`` with per-channel ``scale, offset``, the
  add in place;
- backward: a sum for :math:`\sum dy`, a batched dot product for
  :math:`\sum dy\,(x-\mu)`, and ``dx`` as one fused multiply-add followed by
  two in-place per-channel updates.

The statistics are the corrected two-pass ones (Chan, Golub and LeVeque
1983): the mean, then the squared deviations, minus the square of the mean
deviation, which removes the rounding error of the float32 mean. They are
accurate for data whose mean is large compared with its spread, where the
one-pass :math:`E[x^2]-E[x]^2` loses every digit and a plain two-pass keeps
the mean's rounding error (see :mod:`bnbook.numerics`).

The backward is not itself differentiable: double backward raises a
``RuntimeError`` (``once_differentiable``). Use
:func:`bnbook.nn.functional.batch_norm` when second derivatives are needed.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from bnbook.nn import functional as bnf

__all__ = ["BatchNormFunction", "batch_norm_fast"]

_HALF = (torch.float16, torch.bfloat16)


def _channel_sum(a: torch.Tensor) -> torch.Tensor:
    """Per-channel sum of an ``(N, C, S)`` tensor: the contiguous axis first, then the batch."""
    return a.sum(dim=2).sum(dim=0)


def _channel_sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-channel :math:`\\sum a\\,b` of two contiguous ``(N, C, S)`` tensors.

    A batch of ``N * C`` dot products of length ``S`` (one ``bmm``) reads both
    tensors once and, unlike ``(a * b).sum()``, writes no ``(N, C, S)``
    temporary. Without spatial axes the dot products are too short to pay off.
    """
    n, c, s = a.shape
    if s < 16:
        return (a * b).sum(dim=(0, 2))
    return torch.bmm(a.view(n * c, 1, s), b.view(n * c, s, 1)).view(n, c).sum(dim=0)


class BatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm over an ``(N, C, S)`` view, with a hand-written backward.

    ``forward(ctx, x, weight, bias, eps)`` takes a contiguous ``(N, C, S)``
    tensor (rank 3: batch, channel, flattened spatial axes) and ``(C,)``
    ``weight``/``bias`` (either may be None) and returns ``(y, mean, var)``:
    the output and the per-channel batch mean and biased variance, the last two
    not differentiable. Call it through :func:`batch_norm_fast`, which checks
    inputs, reshapes and updates running statistics.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        m = x.shape[0] * x.shape[2]
        mean = _channel_sum(x) / m
        centered = x - mean[:, None]
        # Corrected two-pass (Chan, Golub & LeVeque 1983): the float32 mean is off by
        # a rounding error that the centred values still carry; ``shift`` measures it,
        # so the variance and the output are exact up to rounding of small numbers.
        shift = _channel_sum(centered) / m
        var = _channel_sum_of_products(centered, centered) / m - shift * shift
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        offset = -shift * scale if bias is None else bias - shift * scale
        # y = (x - mu) * scale + offset; the add in place, so no second new tensor
        y = centered * scale[:, None]
        y.add_(offset[:, None])
        ctx.save_for_backward(centered, shift, invstd, weight)
        ctx.has_bias = bias is not None
        mean = mean + shift
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar):
        centered, shift, invstd, weight = ctx.saved_tensors
        m = dy.shape[0] * dy.shape[2]
        dy = dy.contiguous()
        sum_dy = _channel_sum(dy)
        # sum of dy * (x - mu), with x - mu = centered - shift
        sum_dy_xmu = _channel_sum_of_products(dy, centered) - shift * sum_dy
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            a = invstd if weight is None else invstd * weight
            k = -(invstd * invstd * sum_dy_xmu) / m
            # dx = a * (dy - sum_dy / m + k * (x - mu)): one new tensor, then in place.
            dx = torch.addcmul(dy, centered, k[:, None])
            dx.add_((-sum_dy / m - k * shift)[:, None]).mul_(a[:, None])
        if weight is not None and ctx.needs_input_grad[1]:
            dweight = sum_dy_xmu * invstd
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = sum_dy
        return dx, dweight, dbias, None


def batch_norm_fast(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch norm with the signature and semantics of ``torch.nn.functional.batch_norm``.

    .. math::
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    for an input of shape ``(N, C)`` or ``(N, C, *)``. In training the
    per-channel :math:`\mu, \sigma^2` (biased) come from the batch through
    :class:`BatchNormFunction`, and given running buffers are updated in place,
    ``running = (1 - momentum) * running + momentum * stat`` with the variance
    made unbiased by ``m / (m - 1)``. In evaluation ``y = x * s + t`` with
    per-channel ``s, t`` from the running statistics, and autograd handles the
    (trivial) backward.

    Half-precision inputs are computed in float32 and the result cast back.

    Raises
    ------
    TypeError
        If ``input`` is not a floating-point tensor.
    ValueError
        Rank below 2; a per-channel tensor whose length is not ``C``; only one
        of ``running_mean`` and ``running_var`` given; one value per channel in
        training; evaluation without running statistics; NaN or infinity in an
        input that would update running statistics.
    """
    C = bnf.check_batch_norm_args(input, running_mean, running_var, weight, bias, training)
    N = input.shape[0]
    x = input.float() if input.dtype in _HALF else input
    w = None if weight is None else weight.to(x.dtype)
    b = None if bias is None else bias.to(x.dtype)

    if training:
        m = input.numel() // C
        x3 = x.reshape(N, C, -1).contiguous()
        y, mean, var = BatchNormFunction.apply(x3, w, b, eps)
        if running_mean is not None:
            # A NaN or inf anywhere in a channel reaches its mean or variance, so
            # checking the 2C statistics is as strict as checking every input value.
            if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
                bnf.check_finite(input)
            bnf.update_running_stats(running_mean, running_var, mean, var, m, momentum)
        return y.reshape(input.shape).to(input.dtype)

    shape = (1, C) + (1,) * (input.dim() - 2)
    scale = torch.rsqrt(running_var.to(x.dtype) + eps)
    if w is not None:
        scale = scale * w
    shift = -running_mean.to(x.dtype) * scale
    if b is not None:
        shift = shift + b
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape)).to(input.dtype)
