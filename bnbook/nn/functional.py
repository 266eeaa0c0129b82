"""Batch norm on torch tensors, written from elementary tensor operations.

:func:`batch_norm` mirrors ``torch.nn.functional.batch_norm`` argument for
argument, but computes everything with means, subtractions and square roots,
so autograd derives its backward pass. It never calls torch's own batch norm.
"""

from __future__ import annotations

import torch

__all__ = [
    "batch_norm",
    "batch_norm_fast",
    "check_batch_norm_args",
    "update_running_stats",
    "check_float_tensor",
    "check_per_channel",
    "check_finite",
    "channel_dims",
]


def channel_dims(ndim: int) -> list[int]:
    """Dims batch norm averages over for an ``(N, C, *)`` tensor: all but dim 1."""
    if ndim < 2:
        raise ValueError(f"expected an input of shape (N, C) or (N, C, *), got {ndim}D input")
    return [0, *range(2, ndim)]


def check_float_tensor(x, name: str = "input") -> None:
    """Raise ``TypeError`` unless ``x`` is a floating-point ``torch.Tensor``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")


def check_per_channel(t: torch.Tensor | None, name: str, num_channels: int) -> None:
    """Raise ``ValueError`` unless ``t`` is None or has shape ``(num_channels,)``."""
    if t is not None and tuple(t.shape) != (num_channels,):
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but the input has {num_channels} channels "
            f"(dim 1); expected shape ({num_channels},)"
        )


def check_finite(x: torch.Tensor) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            "input contains NaN or infinite values; refusing to update the running "
            "statistics, which would be poisoned for every later evaluation"
        )


def check_batch_norm_args(input, running_mean, running_var, weight, bias, training) -> int:
    """Validate the arguments of a ``batch_norm`` call; return the channel count ``C``.

    Raises the ``TypeError``/``ValueError`` documented in :func:`batch_norm`.
    """
    check_float_tensor(input)
    channel_dims(input.dim())
    C = input.shape[1]
    for t, name in (
        (running_mean, "running_mean"),
        (running_var, "running_var"),
        (weight, "weight"),
        (bias, "bias"),
    ):
        check_per_channel(t, name, C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if training and input.numel() // C <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()}"
        )
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are required in evaluation mode "
            "(training=False); pass training=True to use batch statistics"
        )
    return C


@torch.no_grad()
def update_running_stats(running_mean, running_var, mean, var, m: int, momentum: float) -> None:
    r"""In place: :math:`r \leftarrow (1-\text{momentum})\,r + \text{momentum}\,s`.

    ``mean`` and ``var`` are the batch's per-channel mean and *biased* variance
    over ``m`` values; the running variance receives the unbiased
    :math:`\frac{m}{m-1}\sigma^2`, as in Ioffe and Szegedy's Algorithm 2 and torch.
    """
    running_mean.mul_(1.0 - momentum).add_(mean.reshape(-1).to(running_mean.dtype), alpha=momentum)
    unbiased = var.reshape(-1) * (m / (m - 1))
    running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Batch normalization of an ``(N, C, *)`` tensor; see ``torch.nn.functional.batch_norm``.

    .. math::
        y = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta

    with per-channel :math:`\mu, \sigma^2` from the batch (biased variance)
    when ``training``, else from ``running_mean`` / ``running_var``. In
    training, given running buffers are updated in place with
    ``(1 - momentum) * running + momentum * batch_stat``, the variance
    statistic made unbiased by ``m / (m - 1)``.

    Half-precision inputs (float16, bfloat16) are accumulated in float32, as
    torch does, and the result is cast back.

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
    C = check_batch_norm_args(input, running_mean, running_var, weight, bias, training)
    dims = channel_dims(input.dim())
    shape = (1, C) + (1,) * (input.dim() - 2)
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input

    if training:
        m = input.numel() // C
        mean = x.mean(dim=dims, keepdim=True)
        centered = x - mean
        # Corrected two-pass: remove what rounding the mean left in the centred values.
        correction = centered.mean(dim=dims, keepdim=True)
        centered = centered - correction
        mean = mean + correction
        var = (centered * centered).mean(dim=dims, keepdim=True)
        x_hat = centered * torch.rsqrt(var + eps)
        if running_mean is not None:
            check_finite(input)
            update_running_stats(running_mean, running_var, mean, var, m, momentum)
    else:
        mean = running_mean.to(x.dtype).reshape(shape)
        x_hat = (x - mean) * torch.rsqrt(running_var.to(x.dtype).reshape(shape) + eps)

    y = x_hat
    if weight is not None:
        y = y * weight.to(x.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(x.dtype).reshape(shape)
    return y.to(input.dtype)


# The hand-written autograd.Function version; imported last because it uses the checks above.
from bnbook.nn.fast import batch_norm_fast  # noqa: E402
