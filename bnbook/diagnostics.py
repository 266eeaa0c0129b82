"""Measurements of a network's hidden units: how often each ReLU fires, and which never do.

A ReLU unit (one channel of a conv layer, one feature of a linear layer) is
*dead* on a set of inputs when its output is zero for every input and every
spatial position: it then passes no gradient to the weights in front of it,
and plain gradient descent cannot revive it. The claim that "Linear -> BN ->
ReLU avoids dead ReLUs" is tested with these functions.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["relu_modules", "firing_rate", "relu_activity", "dead_fraction"]

_MODES = ("train", "eval")


def relu_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.ReLU`` in ``model``, keyed by its name in ``model.named_modules()``.

    Meant for :func:`bnbook.train.train`'s ``record`` argument, together with
    :func:`firing_rate` as the ``statistic``.

    Raises
    ------
    ValueError
        If the model has no ``nn.ReLU``.
    """
    relus = {name: m for name, m in model.named_modules() if isinstance(m, nn.ReLU)}
    if not relus:
        raise ValueError("the model has no nn.ReLU module")
    return relus


def firing_rate(t: torch.Tensor) -> torch.Tensor:
    r"""Share of positive entries of each unit of ``t``: the units lie along axis 1.

    For ``t`` of shape (N, C, *) returns shape (C,) with
    :math:`\frac{1}{N \prod *} \sum_{n, *} [t_{n c *} > 0]`. Applied to a ReLU's
    input (or output) it is the share of inputs for which the unit fires; 0
    means the unit was silent on the whole batch.

    Raises
    ------
    ValueError
        If ``t`` has fewer than 2 dimensions or no entries.
    """
    if t.ndim < 2 or t.numel() == 0:
        raise ValueError(f"expected a non-empty tensor of shape (N, C, *), got {tuple(t.shape)}")
    return (t > 0).transpose(0, 1).flatten(1).double().mean(dim=1)


@torch.no_grad()
def relu_activity(
    model: nn.Module, x: torch.Tensor, batch_size: int | None = None, mode: str = "train"
) -> dict[str, torch.Tensor]:
    r"""Share of positive outputs of every unit of every ``nn.ReLU`` in ``model``.

    For a ReLU whose output ``a`` has shape (N, C, *), unit ``c`` gets
    :math:`\frac{1}{N \prod *} \sum_{n, *} [a_{n c *} > 0]`, accumulated over
    all of ``x``. A unit with activity 0 is dead on ``x``.

    Parameters
    ----------
    model : nn.Module
        Must contain at least one ``nn.ReLU`` module.
    x : torch.Tensor, shape (N, *)
        Inputs, fed in chunks of ``batch_size`` rows.
    batch_size : int, optional
        Chunk size (default: all of ``x`` at once). In ``"train"`` mode it is the
        batch over which batch norm computes its statistics, so use the training
        batch size; a trailing chunk of one row is skipped, because batch norm
        cannot normalize a single example.
    mode : {"train", "eval"}
        ``"train"`` runs a copy of the model in training mode (batch statistics,
        as during training, but dropout off so the measurement is
        deterministic); the model's running statistics are left untouched.
        ``"eval"`` runs the model in evaluation mode (running statistics).

    Returns
    -------
    dict of str -> torch.Tensor of shape (C,)
        Keyed by the ReLU modules' names in ``model.named_modules()``.

    Raises
    ------
    ValueError
        If ``mode`` is unknown, ``batch_size`` is not positive, ``x`` is empty,
        or the model has no ``nn.ReLU``.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if len(x) == 0:
        raise ValueError("x is empty")
    batch_size = len(x) if batch_size is None else batch_size
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    was_training = model.training
    # Training mode would update the running statistics: work on a copy.
    net = copy.deepcopy(model) if mode == "train" else model
    net.train(mode == "train")
    for m in net.modules():
        if isinstance(m, nn.Dropout | nn.Dropout1d | nn.Dropout2d):
            m.eval()
    relus = relu_modules(net)
    positive: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            dims = [d for d in range(output.ndim) if d != 1]
            fired = (output > 0).sum(dim=dims)
            positive[name] = positive.get(name, 0) + fired
            counts[name] = counts.get(name, 0) + output.numel() // output.shape[1]

        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in relus.items()]
    try:
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size]
            if mode == "train" and len(chunk) == 1 and start > 0:
                continue
            net(chunk)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: positive[name].double() / counts[name] for name in relus}


def dead_fraction(
    model: nn.Module, x: torch.Tensor, batch_size: int | None = None, mode: str = "train"
) -> float:
    """Share of all ReLU units in ``model`` that never fire on ``x``.

    Pools the units of every ``nn.ReLU`` (channels of conv layers, features of
    linear layers); see :func:`relu_activity` for the arguments and errors.
    """
    activity = torch.cat(list(relu_activity(model, x, batch_size, mode).values()))
    return float((activity == 0).double().mean())
