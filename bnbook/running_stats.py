r"""Running statistics of batch norm: momentum conventions and re-estimation.

PyTorch updates the running statistics after each training batch as

.. math::

    \hat\mu \leftarrow (1 - m)\,\hat\mu + m\,\mu_B, \qquad
    \hat\sigma^2 \leftarrow (1 - m)\,\hat\sigma^2 + m\,\frac{n}{n-1}\sigma_B^2 ,

with ``momentum`` :math:`m = 0.1` the weight of the *new* batch (``n`` values
per channel in the batch). Keras and TensorFlow write the same update with
``momentum`` :math:`m_K = 0.99` the weight of the *old* value,
:math:`\hat\mu \leftarrow m_K \hat\mu + (1 - m_K)\mu_B`, so
:math:`m = 1 - m_K`. With ``momentum=None`` PyTorch keeps a cumulative
average instead: after batch ``k`` the factor is :math:`1/k`, which averages
all batches with equal weight.

:func:`recalibrate_batch_norm` uses that cumulative average to re-estimate the
statistics of a trained model over chosen batches ("precise BN"), which
computes the population statistics of Algorithm 2 of Ioffe & Szegedy:
:math:`E[x] = E_B[\mu_B]` and :math:`\mathrm{Var}[x] = \frac{n}{n-1}E_B[\sigma_B^2]`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Real

import torch
from torch import nn

from bnbook.fold import is_batch_norm

__all__ = [
    "torch_momentum_from_keras",
    "keras_momentum_from_torch",
    "batch_norm_modules",
    "freeze_batch_norm_stats",
    "FrozenBatchNorm",
    "freeze_batch_norm",
    "recalibrate_batch_norm",
]


def _check_momentum(m, name: str) -> float:
    if m is None:
        raise ValueError(
            f"{name} must be a number, not None: momentum=None in PyTorch (a cumulative "
            "average) has no Keras/TensorFlow equivalent"
        )
    if isinstance(m, bool) or not isinstance(m, Real):
        raise TypeError(f"{name} must be a real number, got {type(m).__name__}")
    m = float(m)
    if not (math.isfinite(m) and 0.0 <= m <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {m!r}")
    return m


def torch_momentum_from_keras(momentum: float) -> float:
    """PyTorch's ``momentum`` (weight of the new batch) from Keras's (weight of the old value).

    ``torch_momentum_from_keras(0.99)`` is 0.01 (up to float rounding): Keras's
    default is ten times slower than PyTorch's default of 0.1.

    Raises
    ------
    TypeError
        If ``momentum`` is not a real number.
    ValueError
        If it is None, NaN or outside [0, 1].
    """
    return 1.0 - _check_momentum(momentum, "Keras momentum")


def keras_momentum_from_torch(momentum: float) -> float:
    """Keras/TensorFlow's ``momentum`` (weight of the old value) from PyTorch's.

    ``keras_momentum_from_torch(0.1)`` is 0.9.

    Raises
    ------
    TypeError
        If ``momentum`` is not a real number.
    ValueError
        If it is None (PyTorch's cumulative average, which Keras lacks), NaN or
        outside [0, 1].
    """
    return 1.0 - _check_momentum(momentum, "PyTorch momentum")


def batch_norm_modules(model: nn.Module) -> list[nn.Module]:
    """Every torch or bnbook batch norm module inside ``model`` (itself included)."""
    return [m for m in model.modules() if is_batch_norm(m)]


def freeze_batch_norm_stats(model: nn.Module) -> list[nn.Module]:
    """Put every batch norm of ``model`` in eval mode and return them.

    Their running statistics then stay fixed and are used for normalization,
    whatever the rest of the model does. ``requires_grad=False`` does not do
    this - it freezes gamma and beta only - and ``model.train()`` undoes it, so
    call this again after every ``model.train()``.
    """
    bns = batch_norm_modules(model)
    for bn in bns:
        bn.eval()
    return bns


class FrozenBatchNorm(nn.Module):
    """A batch norm that normalizes with its running statistics in training mode too.

    Wraps ``bn`` (torch or bnbook, with running statistics) and keeps it in
    eval mode whatever ``train()`` is called with, so ``model.train()`` cannot
    undo the freeze. The statistics never change; gamma and beta remain
    parameters, trainable unless their ``requires_grad`` is switched off. This
    is what Keras does for a ``BatchNormalization`` layer with
    ``trainable=False``. Input and output as ``bn``: (N, C, *).

    Raises
    ------
    TypeError
        If ``bn`` is not a batch norm module.
    ValueError
        If ``bn`` has no running statistics (``track_running_stats=False``).
    """

    def __init__(self, bn: nn.Module) -> None:
        if not is_batch_norm(bn):
            raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None:
            raise ValueError(
                "a batch norm with track_running_stats=False has no statistics to freeze"
            )
        super().__init__()
        self.bn = bn.eval()

    def train(self, mode: bool = True) -> FrozenBatchNorm:
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.bn(input)


def freeze_batch_norm(model: nn.Module) -> nn.Module:
    """Wrap every batch norm of ``model`` with running statistics in :class:`FrozenBatchNorm`.

    In place; returns ``model`` (or the wrapper, if ``model`` is itself a batch
    norm). Unlike :func:`freeze_batch_norm_stats` the freeze survives
    ``model.train()``, so a training loop that calls it can fine-tune the rest.
    State-dict keys of the wrapped modules gain a ``.bn`` level.
    """
    if is_batch_norm(model):
        return FrozenBatchNorm(model) if model.running_mean is not None else model
    for parent in list(model.modules()):
        if isinstance(parent, FrozenBatchNorm):
            continue
        for name, child in list(parent.named_children()):
            if is_batch_norm(child) and child.running_mean is not None:
                setattr(parent, name, FrozenBatchNorm(child))
    return model


def _as_input(batch):
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]  # (x, y) pairs from a loader
    raise TypeError(
        "each batch must be a tensor or a tuple whose first item is the input, "
        f"got {type(batch).__name__}"
    )


@torch.no_grad()
def recalibrate_batch_norm(
    model: nn.Module, batches: Iterable, *, max_batches: int | None = None
) -> int:
    r"""Re-estimate every batch norm's running statistics from ``batches`` ("precise BN").

    Resets the running statistics, then runs ``model`` on the batches with the
    batch norms in training mode, ``momentum=None`` (a cumulative average, so
    every batch weighs the same) and every other module in eval mode (dropout
    off), under ``torch.no_grad()``. Afterwards each module's train/eval mode
    and each batch norm's momentum are restored; the model's parameters never
    change. Each running mean is then the mean of the batch means and each
    running variance the mean of the unbiased batch variances - the population
    statistics of Algorithm 2 of Ioffe & Szegedy when the batches have equal
    size.

    Parameters
    ----------
    model : nn.Module
        Modified in place. Batch norms with ``track_running_stats=False`` are
        left alone.
    batches : iterable
        Input tensors, or tuples ``(x, ...)`` as yielded by a data loader.
    max_batches : int, optional
        Stop after this many batches.

    Returns
    -------
    int
        The number of batches used.

    Raises
    ------
    ValueError
        If the model has no batch norm with running statistics, if
        ``max_batches`` < 1, or if ``batches`` is empty. If this or the forward
        pass raises, the model is left exactly as it was.
    TypeError
        If a batch is neither a tensor nor a tuple starting with one.
    """
    bns = [bn for bn in batch_norm_modules(model) if bn.running_mean is not None]
    if not bns:
        raise ValueError("model has no batch norm with running statistics to recalibrate")
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None, got {max_batches!r}")
    modes = {m: m.training for m in model.modules()}
    saved = [
        (
            bn.momentum,
            bn.running_mean.clone(),
            bn.running_var.clone(),
            bn.num_batches_tracked.clone(),
        )
        for bn in bns
    ]
    count = 0
    ok = False
    try:
        model.eval()
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
            bn.train()
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            model(_as_input(batch))
            count += 1
        if count == 0:
            raise ValueError("batches is empty: no statistics to estimate")
        ok = True
    finally:
        for bn, (momentum, mean, var, tracked) in zip(bns, saved, strict=True):
            bn.momentum = momentum
            if not ok:
                bn.running_mean.copy_(mean)
                bn.running_var.copy_(var)
                bn.num_batches_tracked.copy_(tracked)
        for m, mode in modes.items():
            m.training = mode
    return count
