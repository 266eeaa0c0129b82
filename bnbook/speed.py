"""The batch-norm implementations the book races, and the memory traffic each one needs.

On a CPU, batch norm does a handful of additions and multiplications per value,
far fewer than memory can deliver values per second, so its speed is set by
how many times it streams tensors of the input's size through memory.
:func:`torch_variants` and :func:`numpy_backward_variants` build closures for
:func:`bnbook.benchmarking.interleaved_timings`; :func:`count_traffic` counts,
for one call, the kernels launched and the input-sized tensors they read and
write.

``benchmarks/bn_speed.py`` runs the full comparison; the scale chapter runs a
short one.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bnbook import functional as npf
from bnbook.nn import functional as bnf

__all__ = ["SHAPE", "torch_variants", "numpy_backward_variants", "count_traffic"]

SHAPE = (128, 64, 16, 16)
"""The benchmark input: a batch of 128 feature maps, 64 channels of 16 x 16."""

TORCH_IMPLEMENTATIONS = {
    "native F.batch_norm": F.batch_norm,
    "composed ops + autograd": bnf.batch_norm,
    "bnbook Function": bnf.batch_norm_fast,
}


def _check_shape(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape must be (N, C, *) with positive sizes, got {shape}")
    return shape


def torch_variants(
    shape=SHAPE, seed: int = 0, dtype=torch.float32
) -> dict[str, Callable[[], object]]:
    """Closures running training-mode forward + backward with each torch implementation.

    All three see the same input ``x`` of ``shape``, upstream gradient ``dy``
    and affine parameters, update running statistics, and return the gradients
    ``(dx, dweight, dbias)`` (computed with ``torch.autograd.grad``, so no
    gradient accumulation is timed).

    Raises
    ------
    ValueError
        If ``shape`` is not ``(N, C, *)`` with positive sizes.
    """
    shape = _check_shape(shape)
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = torch.randn(shape, generator=g, dtype=dtype).requires_grad_()
    dy = torch.randn(shape, generator=g, dtype=dtype)
    w = (torch.rand(C, generator=g, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(C, generator=g, dtype=dtype).requires_grad_()

    def make(fn):
        rm, rv = torch.zeros(C, dtype=dtype), torch.ones(C, dtype=dtype)

        def run():
            y = fn(x, rm, rv, w, b, True, 0.1, 1e-5)
            return torch.autograd.grad(y, (x, w, b), dy)

        return run

    return {name: make(fn) for name, fn in TORCH_IMPLEMENTATIONS.items()}


def numpy_backward_variants(
    shape=SHAPE, seed: int = 0, dtype=np.float32
) -> dict[str, Callable[[], object]]:
    """Closures for the NumPy backward passes: node by node (staged) and closed form (compact).

    Both use :mod:`bnbook.functional` on the same ``x``, ``dy`` and weight.

    Raises
    ------
    ValueError
        If ``shape`` is not ``(N, C, *)`` with positive sizes.
    """
    shape = _check_shape(shape)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = (rng.random(shape[1]) + 0.5).astype(dtype)
    return {
        "staged": lambda: npf.batch_norm_backward_staged(dy, x, w),
        "compact": lambda: npf.batch_norm_backward(dy, x, w),
    }


class _TrafficCounter(TorchDispatchMode):
    def __init__(self, numel: int):
        super().__init__()
        self.numel = numel
        self.kernels = 0
        self.passes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # no data moves
            return out
        operands = [*args, *(kwargs or {}).values()]
        outputs = out if isinstance(out, tuple | list) else (out,)
        big = [
            t
            for t in (*operands, *outputs)
            if isinstance(t, torch.Tensor) and t.numel() >= self.numel
        ]
        if big:
            self.kernels += 1
            self.passes += len(big)
        return out


def count_traffic(fn: Callable[[], object], numel: int) -> dict[str, int]:
    """Count the kernels one call of ``fn`` launches on tensors of at least ``numel`` values.

    Every aten operation that is not a view and has an operand (input or
    output) of ``numel`` values or more counts as a kernel; each such operand
    counts as one pass over memory (one read, or one write; an in-place
    update counts its target twice). Passes made *inside* one kernel are
    invisible here: torch's native batch-norm kernel reads its input more
    than once but is counted as one read.

    Returns
    -------
    dict
        ``{"kernels": int, "passes": int}``.

    Raises
    ------
    ValueError
        If ``numel`` < 1.
    """
    if numel < 1:
        raise ValueError(f"numel must be >= 1, got {numel}")
    with _TrafficCounter(numel) as counter:
        fn()
    return {"kernels": counter.kernels, "passes": counter.passes}
