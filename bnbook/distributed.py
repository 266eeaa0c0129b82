r"""Batch norm when one batch is split over several processes.

Data-parallel training gives each of ``P`` workers a slice of the batch. A plain
batch norm then normalizes each slice with its own statistics: every worker
sees a batch of ``N / P`` and the model behaves as if trained with that batch
size (:func:`ghost_batch_norm` computes exactly this in one process).
:class:`SyncBatchNorm` instead combines the per-channel statistics of all
workers, so the output equals one batch norm over the concatenated batch.

``torch.nn.SyncBatchNorm`` does this only on GPUs (on CPU it raises
"SyncBatchNorm expected input tensor to be on GPU"); the class here runs on
CPU with the gloo backend, so it can be tried on a laptop with
:func:`launch`, which starts ``P`` local processes on 127.0.0.1.

Communication per training step, per batch-norm layer, ``C`` channels:

- forward: every worker contributes its count, mean and sum of squared
  deviations :math:`(n_k, \mu_k, M_{2,k})` (``3C`` float64 numbers, one
  ``all_gather``) and all merge them with Chan's formula
  (:func:`bnbook.numerics.merge_stats`), which, unlike summing
  :math:`\sum x` and :math:`\sum x^2`, does not cancel catastrophically;
- backward: one ``all_reduce`` of the two per-channel gradient sums
  :math:`\sum dy` and :math:`\sum dy\,(x-\mu)` (``2C`` numbers).
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from bnbook.nn import functional as bnf
from bnbook.nn.batchnorm import _BatchNorm
from bnbook.nn.fast import batch_norm_fast
from bnbook.numerics import merge_stats

__all__ = ["SyncBatchNorm", "ghost_batch_norm", "launch", "is_synchronized"]

_HALF = (torch.float16, torch.bfloat16)


def is_synchronized(process_group=None) -> bool:
    """True when ``torch.distributed`` is initialized and the group has more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode batch norm of an ``(N, C, S)`` slice with statistics shared by a group."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        n, C = x.shape[0] * x.shape[2], x.shape[1]
        f64 = torch.float64
        if n > 0:
            local_mean = x.sum(dim=(0, 2), dtype=f64) / n
            d = x - local_mean.to(x.dtype)[:, None]
            # corrected two-pass: the float64 sum of d removes the rounding of the mean
            d_sum = d.sum(dim=(0, 2), dtype=f64)
            m2 = (d * d).sum(dim=(0, 2), dtype=f64) - d_sum * d_sum / n
            local_mean = local_mean.to(x.dtype).to(f64) + d_sum / n
        else:  # an empty slice contributes nothing (n_k = 0 and a finite mean)
            local_mean = torch.zeros(C, dtype=f64, device=x.device)
            m2 = torch.zeros(C, dtype=f64, device=x.device)
        mine = torch.stack([torch.full_like(m2, float(n)), local_mean, m2])
        parts = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, mine, group=group)
        parts = torch.stack(parts)  # (P, 3, C)
        count, mean, m2 = merge_stats(parts[:, 0], parts[:, 1], parts[:, 2])
        total = int(count[0].item())
        if total <= 1:
            raise ValueError(
                f"Expected more than 1 value per channel across all processes when "
                f"training, got {total}"
            )
        var = m2 / total
        invstd64 = torch.rsqrt(var + eps)
        mean_x = mean.to(x.dtype)
        # x - mean = centered - shift, with the float64 remainder of the rounded mean
        shift = (mean - mean_x.to(f64)).to(x.dtype)
        invstd = invstd64.to(x.dtype)
        centered = x - mean_x[:, None]
        scale = invstd if weight is None else invstd * weight
        offset = -shift * scale if bias is None else bias - shift * scale
        y = centered * scale[:, None]
        y.add_(offset[:, None])
        ctx.save_for_backward(centered, shift, invstd, weight)
        ctx.total, ctx.group, ctx.has_bias = total, group, bias is not None
        mean, var = mean.to(x.dtype), var.to(x.dtype)
        total_t = torch.tensor(float(total), dtype=x.dtype)
        ctx.mark_non_differentiable(mean, var, total_t)
        return y, mean, var, total_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        centered, shift, invstd, weight = ctx.saved_tensors
        f64 = torch.float64
        dy = dy.contiguous()
        sum_dy = dy.sum(dim=(0, 2), dtype=f64)
        sum_dy_xmu = (dy * centered).sum(dim=(0, 2), dtype=f64) - shift.to(f64) * sum_dy
        dweight = (sum_dy_xmu * invstd.to(f64)).to(dy.dtype) if weight is not None else None
        dbias = sum_dy.to(dy.dtype) if ctx.has_bias else None
        # The input gradient needs the sums over the whole batch: one all_reduce.
        sums = torch.stack([sum_dy, sum_dy_xmu])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
        g_sum_dy, g_sum_dy_xmu = (s.to(dy.dtype) for s in sums)
        a = invstd if weight is None else invstd * weight
        k = -(invstd * invstd * g_sum_dy_xmu) / ctx.total
        dx = torch.addcmul(dy, centered, k[:, None])
        dx.add_((-g_sum_dy / ctx.total - k * shift)[:, None]).mul_(a[:, None])
        return (
            dx,
            dweight if ctx.needs_input_grad[1] else None,
            dbias if ctx.needs_input_grad[2] else None,
            None,
            None,
        )


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm whose training statistics span every process of a group.

    Same constructor as ``torch.nn.SyncBatchNorm``; input ``(N, C)`` or
    ``(N, C, *)``, where ``N`` (the local batch) may differ between processes
    and may be zero on some. In training, with ``torch.distributed``
    initialized and more than one process in ``process_group``, the output on
    every process equals that of one batch norm over the concatenation of all
    local batches:

    .. math::
        y = \gamma\,\frac{x - \mu}{\sqrt{\sigma^2+\epsilon}} + \beta,\qquad
        \mu, \sigma^2 \text{ over } \textstyle\sum_k n_k \text{ values per channel,}

    the running statistics are updated identically everywhere with the
    unbiased variance :math:`\sigma^2 \cdot n / (n - 1)` of the global count
    ``n``, and the input gradient is that of the global batch norm. The
    parameter gradients are each process's own share; data-parallel training
    (DDP) sums or averages them across processes, as it does for every other
    parameter.

    Otherwise (evaluation mode, ``torch.distributed`` not initialized, or a
    group of one process) it falls back to plain, local batch norm
    (:func:`bnbook.nn.fast.batch_norm_fast`), exactly like
    ``bnbook.nn.BatchNorm2d``.

    Every process of the group must call forward and backward the same number
    of times (the collectives pair up across processes).

    Raises
    ------
    TypeError
        If the input is not a floating-point tensor.
    ValueError
        If the input has rank < 2 or the wrong number of channels, or if the
        whole group holds one value per channel in training.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype
        )
        self.process_group = process_group

    _functional = staticmethod(batch_norm_fast)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _normalize(self, input: torch.Tensor, factor: float) -> torch.Tensor:
        if self.training and is_synchronized(self.process_group):
            return self._synchronized(input, factor if self.track_running_stats else None)
        return super()._normalize(input, factor)

    def _synchronized(self, input: torch.Tensor, factor: float | None) -> torch.Tensor:
        N, C = input.shape[0], input.shape[1]
        x = input.float() if input.dtype in _HALF else input
        w = None if self.weight is None else self.weight.to(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        x3 = x.reshape(N, C, math.prod(input.shape[2:])).contiguous()
        y, mean, var, total = _SyncBatchNormFunction.apply(x3, w, b, self.eps, self.process_group)
        if factor is not None:
            total = int(total.item())
            bnf.update_running_stats(self.running_mean, self.running_var, mean, var, total, factor)
        return y.reshape(input.shape).to(input.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", process_group={self.process_group}"

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None):
        """Return ``module`` with every batch-norm layer replaced by a :class:`SyncBatchNorm`.

        Like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: ``torch.nn``
        and ``bnbook.nn`` ``BatchNorm1d/2d/3d`` layers (and a bare layer passed
        as ``module``) are replaced by copies that share their parameters and
        running statistics; other modules are kept. Converts in place and also
        returns the result.
        """
        bn_types = (torch.nn.modules.batchnorm._BatchNorm, _BatchNorm)
        if isinstance(module, bn_types) and not isinstance(module, cls):
            new = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
            )
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            if module.track_running_stats:
                new.running_mean = module.running_mean
                new.running_var = module.running_var
                new.num_batches_tracked = module.num_batches_tracked
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return module


def ghost_batch_norm(
    input: torch.Tensor,
    ghost_batch_size: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    r"""Training-mode batch norm applied separately to consecutive chunks of the batch.

    The ``(N, C, *)`` input is split along the batch axis into chunks of
    ``ghost_batch_size`` samples (the last may be smaller) and each chunk is
    normalized with its own statistics (Hoffer et al. 2017). This is exactly
    what ``P`` workers with plain, unsynchronized batch norm compute when each
    holds one chunk; with ``ghost_batch_size >= N`` it is ordinary batch norm.

    Raises
    ------
    ValueError
        If ``ghost_batch_size`` is not a positive int, or a chunk holds only one
        value per channel.
    """
    if isinstance(ghost_batch_size, bool) or not isinstance(ghost_batch_size, int):
        raise ValueError(f"ghost_batch_size must be a positive int, got {ghost_batch_size!r}")
    if ghost_batch_size < 1:
        raise ValueError(f"ghost_batch_size must be a positive int, got {ghost_batch_size!r}")
    bnf.check_float_tensor(input)
    chunks = input.split(ghost_batch_size, dim=0)
    return torch.cat([batch_norm_fast(c, None, None, weight, bias, True, 0.0, eps) for c in chunks])


# --------------------------------------------------------------------------- #
# Running a function on P local processes
# --------------------------------------------------------------------------- #
def _loopback_interface() -> str | None:
    for _, name in socket.if_nameindex():
        if name.startswith("lo"):
            return name
    return None


def _to_plain(obj):
    """Tensors to NumPy arrays (pickled by value, unlike tensors in a multiprocessing queue)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy()
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_plain(v) for v in obj)
    return obj


def _worker(rank, world_size, port, timeout, fn, args, results):
    try:
        iface = _loopback_interface()
        if iface is not None:
            os.environ.setdefault("GLOO_SOCKET_IFNAME", iface)
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world_size + 1, False, timedelta(seconds=timeout))
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout),
        )
        try:
            out = _to_plain(fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
        results.put((rank, True, out))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def launch(fn: Callable, world_size: int = 2, args: tuple = (), timeout: float = 120.0) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh processes joined by gloo.

    The processes talk over 127.0.0.1 only (a ``TCPStore`` on a free port
    chosen by the operating system, gloo on the loopback interface), use one
    thread each, and are always ended when this returns. ``fn`` must be
    importable (defined at module level) because the processes are started
    with ``spawn``. Tensors in the results come back as NumPy arrays.

    Returns
    -------
    list
        ``fn``'s return value on each rank, in rank order.

    Raises
    ------
    ValueError
        If ``world_size`` < 1 or ``timeout`` <= 0.
    RuntimeError
        If a process raised (its traceback is included) or did not finish
        within ``timeout`` seconds.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    ctx = mp.get_context("spawn")
    store = dist.TCPStore(
        "127.0.0.1",
        0,
        world_size + 1,
        True,
        timedelta(seconds=timeout),
        wait_for_workers=False,
    )
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=_worker,
            args=(rank, world_size, store.port, timeout, fn, args, results),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + timeout
    out: dict[int, object] = {}
    try:
        for p in procs:
            p.start()
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(
                    f"distributed run timed out after {timeout} s; finished ranks: {sorted(out)}"
                )
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and all(i not in out for i in dead):
                    raise RuntimeError(
                        f"worker(s) {dead} exited with code(s) "
                        f"{[procs[i].exitcode for i in dead]} without a result"
                    ) from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
            out[rank] = value
        for p in procs:
            p.join(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        results.close()
        results.join_thread()
        del store
    return [out[r] for r in range(world_size)]
