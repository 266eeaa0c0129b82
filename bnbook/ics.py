"""Santurkar et al. (2018)'s tests of the internal-covariate-shift story.

Three measurements, each on one mini-batch ``(x, y)`` and the model's current
weights :math:`W = (W_1, \\dots, W_k)`:

- :func:`gradient_shift` - ICS measured through its effect on optimization:
  how much the gradient of layer ``i`` changes when the layers before it take
  their gradient step (their Definition 2.1).
- :class:`NoisyShiftScale` and :func:`add_noise` - "noisy BN": a random,
  per-channel shift and scale, redrawn at every training step, that creates
  internal covariate shift on purpose.
- :func:`gradient_path` - the loss and the gradient along the gradient
  direction (their "loss landscape", "gradient predictiveness" and
  "effective beta-smoothness").

The functions leave the model untouched: parameters are swapped in with
:func:`torch.func.functional_call` and batch norm's running statistics are
updated on copies. The model is evaluated in its current train/eval mode, so
call them in training mode to see batch statistics, as during training; the
model must be deterministic (no dropout), or the measured differences would
include dropout noise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

__all__ = [
    "GradientShift",
    "gradient_shift",
    "NoisyShiftScale",
    "add_noise",
    "GradientPath",
    "gradient_path",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loss(model: nn.Module, params: dict, x, y, loss_fn: LossFn) -> torch.Tensor:
    # Fresh copies of the buffers: a training-mode batch norm would otherwise
    # update the model's own running statistics at every probe.
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    return loss_fn(functional_call(model, (params, buffers), (x,)), y)


def _check_batch(x: torch.Tensor, y: torch.Tensor) -> None:
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if len(x) < 2:
        raise ValueError("need a batch of at least 2 examples (batch norm needs 2)")


@dataclass(frozen=True)
class GradientShift:
    """Result of :func:`gradient_shift`, one entry per probed layer.

    Attributes
    ----------
    l2 : torch.Tensor, shape (k,)
        :math:`\\lVert G_i - G'_i \\rVert_2`.
    cosine : torch.Tensor, shape (k,)
        :math:`\\langle G_i, G'_i \\rangle / (\\lVert G_i \\rVert \\lVert G'_i \\rVert)`.
    grad_norm : torch.Tensor, shape (k,)
        :math:`\\lVert G_i \\rVert_2`, to put ``l2`` on a relative scale.
    """

    l2: torch.Tensor
    cosine: torch.Tensor
    grad_norm: torch.Tensor

    @property
    def relative(self) -> torch.Tensor:
        """:math:`\\lVert G_i - G'_i \\rVert / \\lVert G_i \\rVert`, shape (k,)."""
        return self.l2 / self.grad_norm


def gradient_shift(
    model: nn.Module,
    layers: Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> GradientShift:
    r"""Internal covariate shift as the change of a layer's gradient (Santurkar et al., Def. 2.1).

    For each probed layer :math:`i` with weight :math:`W_i`,

    .. math::

        G_i  &= \nabla_{W_i} L(W_1, \dots, W_k;\ x, y), \\
        G'_i &= \nabla_{W_i} L(W_1 - \eta g_1, \dots, W_{i-1} - \eta g_{i-1},
                W_i, \dots, W_k;\ x, y),

    where :math:`g_j` is each earlier parameter's gradient on the same batch
    and :math:`\eta` = ``lr``: :math:`G'_i` is the gradient layer :math:`i`
    would see after the layers before it took their plain SGD step. If ICS
    hampered training, :math:`G'_i` would differ from :math:`G_i` a lot (large
    :math:`\ell_2` distance, cosine well below 1).

    "Layers before :math:`W_i`" are all parameters registered before it in
    ``model.parameters()`` (weights, biases and batch-norm :math:`\gamma,\beta`
    of earlier layers), which for an ``nn.Sequential`` is the data-flow order.

    Parameters
    ----------
    model : nn.Module
        Maps ``x`` of shape ``(N, *)`` to logits ``(N, classes)``. Not modified.
    layers : sequence of nn.Module
        The probed layers, each with a ``weight`` parameter of ``model``.
    x, y : torch.Tensor
        One mini-batch, shapes ``(N, *)`` and ``(N,)``.
    lr : float
        Step size :math:`\eta` of the earlier layers' update.
    loss_fn : callable
        ``loss_fn(logits, y)`` -> scalar.

    Returns
    -------
    GradientShift
        Tensors of shape (len(layers),).

    Raises
    ------
    ValueError
        If ``layers`` is empty, a layer's weight is not a parameter of
        ``model``, ``lr`` is not positive, or the batch is too small.
    """
    if not layers:
        raise ValueError("need at least one layer to probe")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    _check_batch(x, y)
    params = dict(model.named_parameters())
    names = list(params)
    position = {id(p): i for i, p in enumerate(params.values())}
    targets = []
    for layer in layers:
        w = getattr(layer, "weight", None)
        if not isinstance(w, nn.Parameter) or id(w) not in position:
            raise ValueError(f"{layer!r} has no weight parameter belonging to the model")
        targets.append(position[id(w)])

    grads = torch.autograd.grad(_loss(model, params, x, y, loss_fn), list(params.values()))
    l2, cos, norm = [], [], []
    for t in targets:
        moved = {
            n: (params[n] - lr * g).detach() if j < t else params[n]
            for j, (n, g) in enumerate(zip(names, grads, strict=True))
        }
        (g_after,) = torch.autograd.grad(_loss(model, moved, x, y, loss_fn), [params[names[t]]])
        g_before = grads[t].flatten()
        g_after = g_after.flatten()
        l2.append(torch.linalg.vector_norm(g_before - g_after))
        cos.append(nn.functional.cosine_similarity(g_before, g_after, dim=0))
        norm.append(torch.linalg.vector_norm(g_before))
    return GradientShift(torch.stack(l2), torch.stack(cos), torch.stack(norm))


class NoisyShiftScale(nn.Module):
    r"""A random per-channel affine distortion, redrawn at every training forward pass.

    In training mode, for input ``x`` of shape ``(N, C, *)``,

    .. math::

        y_{nc\ldots} = a_c^{(t)}\, x_{nc\ldots} + b_c^{(t)}, \qquad
        a_c^{(t)} \sim U(a_{lo}, a_{hi}), \quad b_c^{(t)} \sim U(-s, s),

    with fresh :math:`a^{(t)}, b^{(t)}` (shape (C,)) at every call, i.e. at
    every step :math:`t`. Placed after a batch-norm layer, it makes each
    channel's distribution have a non-zero mean and a non-unit variance that
    change from step to step: deliberate internal covariate shift, as in
    Santurkar et al.'s "noisy BatchNorm" (they add i.i.d. noise per activation
    from a time-varying distribution; here all examples of a batch share one
    shift and scale, so the *distribution* of the next layer's input moves,
    which is exactly what ICS means).

    In eval mode it applies the expected map :math:`y = \bar a\, x`,
    :math:`\bar a = (a_{lo} + a_{hi}) / 2` (the shift has mean 0).
    Draws use torch's global random generator: seed it with ``torch.manual_seed``.

    Parameters
    ----------
    shift : float
        Largest shift :math:`s \ge 0`.
    scale : (float, float)
        Range :math:`(a_{lo}, a_{hi})` of the scale, :math:`0 < a_{lo} \le a_{hi}`.

    Raises
    ------
    ValueError
        If ``shift`` is negative, the scale range is invalid, or the input has
        fewer than 2 dimensions.
    """

    def __init__(self, shift: float = 1.0, scale: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        lo, hi = scale
        if shift < 0:
            raise ValueError(f"shift must be non-negative, got {shift}")
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must satisfy 0 < lo <= hi, got {scale}")
        self.shift = float(shift)
        self.scale = (float(lo), float(hi))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim < 2:
            raise ValueError(f"expected input of shape (N, C, *), got {tuple(x.shape)}")
        lo, hi = self.scale
        if not self.training:
            return x * ((lo + hi) / 2)
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        a = lo + (hi - lo) * torch.rand(shape, dtype=x.dtype, device=x.device)
        b = self.shift * (2 * torch.rand(shape, dtype=x.dtype, device=x.device) - 1)
        return a * x + b

    def extra_repr(self) -> str:
        return f"shift={self.shift}, scale={self.scale}"


def add_noise(
    model: nn.Sequential,
    shift: float = 1.0,
    scale: tuple[float, float] = (0.5, 2.0),
    before: tuple[type, ...] = (nn.Sigmoid, nn.ReLU, nn.Tanh),
) -> nn.Sequential:
    """A new ``nn.Sequential`` with a :class:`NoisyShiftScale` before each activation.

    In ``Linear -> BN -> act`` blocks the noise lands right after batch norm
    (Santurkar et al.'s noisy BN); in ``Linear -> act`` blocks of a network
    without BN it lands at the same place, so both networks get the same
    noise. The modules are shared with ``model``, not copied.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Sequential``.
    ValueError
        If it contains none of the ``before`` modules.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    layers: list[nn.Module] = []
    for m in model:
        if isinstance(m, before):
            layers.append(NoisyShiftScale(shift, scale))
        layers.append(m)
    if len(layers) == len(model):
        raise ValueError(f"the model has no {[t.__name__ for t in before]} module")
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class GradientPath:
    """Result of :func:`gradient_path`; every tensor has shape (K,), one entry per step size.

    Attributes
    ----------
    step_sizes : torch.Tensor
        :math:`\\eta_k`.
    loss : torch.Tensor
        :math:`L(W - \\eta_k g)`.
    grad_change : torch.Tensor
        :math:`\\lVert \\nabla L(W - \\eta_k g) - g \\rVert_2`.
    beta : torch.Tensor
        ``grad_change / (eta_k * ||g||)``: the gradient's change per unit
        distance moved, a local estimate of the smoothness constant.
    loss0 : float
        :math:`L(W)`.
    """

    step_sizes: torch.Tensor
    loss: torch.Tensor
    grad_change: torch.Tensor
    beta: torch.Tensor
    loss0: float

    @property
    def loss_range(self) -> float:
        """max - min of the loss over the step sizes (and W itself): how bumpy the path is."""
        all_losses = torch.cat([self.loss, self.loss.new_tensor([self.loss0])])
        return float(all_losses.max() - all_losses.min())

    @property
    def max_grad_change(self) -> float:
        """Santurkar et al.'s gradient predictiveness (smaller = more predictive)."""
        return float(self.grad_change.max())

    @property
    def max_beta(self) -> float:
        """Santurkar et al.'s effective beta-smoothness (smaller = smoother)."""
        return float(self.beta.max())


def gradient_path(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    step_sizes: Sequence[float],
    loss_fn: LossFn = nn.functional.cross_entropy,
) -> GradientPath:
    r"""The loss and the gradient at points along the (negative) gradient direction.

    With :math:`g = \nabla L(W; x, y)` over all parameters, for each step size
    :math:`\eta_k` it evaluates :math:`W_k = W - \eta_k g`,
    :math:`L(W_k)` and :math:`\lVert \nabla L(W_k) - g \rVert`, all on the same
    batch. A small gradient change means the gradient at :math:`W` predicts
    the gradient a step away ("gradient predictiveness"); the ratio
    :math:`\lVert \nabla L(W_k) - g\rVert / \lVert W_k - W \rVert` bounds the
    smoothness constant :math:`\beta` from below along that direction.

    Parameters
    ----------
    model : nn.Module
        Not modified.
    x, y : torch.Tensor
        One mini-batch, shapes ``(N, *)`` and ``(N,)``.
    step_sizes : sequence of float
        The :math:`\eta_k`, each positive.
    loss_fn : callable

    Returns
    -------
    GradientPath

    Raises
    ------
    ValueError
        If ``step_sizes`` is empty or has a non-positive entry, the gradient
        is zero, or the batch is too small.
    """
    etas = torch.as_tensor(list(step_sizes), dtype=torch.float64)
    if etas.numel() == 0 or not bool((etas > 0).all()):
        raise ValueError(
            f"step_sizes must be a non-empty list of positive numbers, got {step_sizes}"
        )
    _check_batch(x, y)
    params = dict(model.named_parameters())
    loss0 = _loss(model, params, x, y, loss_fn)
    g = torch.autograd.grad(loss0, list(params.values()))
    g_flat = torch.cat([t.flatten() for t in g])
    g_norm = torch.linalg.vector_norm(g_flat)
    if g_norm == 0:
        raise ValueError("the gradient is zero: there is no direction to follow")
    losses, changes = [], []
    for eta in etas.tolist():
        moved = {
            n: (p.detach() - eta * gp).requires_grad_()
            for (n, p), gp in zip(params.items(), g, strict=True)
        }
        loss = _loss(model, moved, x, y, loss_fn)
        g_new = torch.autograd.grad(loss, list(moved.values()))
        losses.append(loss.detach())
        changes.append(torch.linalg.vector_norm(torch.cat([t.flatten() for t in g_new]) - g_flat))
    losses_t = torch.stack(losses).double()
    changes_t = torch.stack(changes).double()
    return GradientPath(
        etas, losses_t, changes_t, changes_t / (etas * g_norm.double()), float(loss0.detach())
    )
