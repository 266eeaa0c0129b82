"""Beyond batch norm: Batch Renormalization, Weight Standardization, SkipInit.

Torch modules for the last section of the alternatives chapter, each small
enough to read in one go:

- :class:`BatchRenorm2d` (Ioffe, 2017): batch norm whose training output is
  corrected towards the running statistics, so training and inference agree
  even for small or non-i.i.d. batches.
- :class:`WSConv2d` (Qiao et al., 2019): a convolution whose weights are
  standardized per output channel at every forward pass; meant to be
  combined with GroupNorm.
- :class:`SkipInitBlock` and :func:`residual_cnn` (De and Smith, 2020): a
  residual block whose branch is multiplied by a learnable scalar that
  starts at zero, so a deep net without normalization starts as the identity
  and trains.

RMSNorm needs no module here: ``torch.nn.RMSNorm`` exists, and
:func:`bnbook.functional.rms_norm` is its NumPy reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bnbook.models import make_norm

__all__ = [
    "BatchRenorm2d",
    "WSConv2d",
    "SkipInitBlock",
    "residual_cnn",
    "to_batch_renorm",
    "to_weight_standardized",
]


class BatchRenorm2d(nn.Module):
    r"""Batch Renormalization for ``(N, C, H, W)`` inputs (Ioffe, 2017).

    Training uses the batch statistics :math:`\mu_B, \sigma_B` like batch norm,
    then corrects them towards the running statistics :math:`\mu, \sigma`:

    .. math::
        r = \operatorname{clip}_{[1/r_{max},\, r_{max}]}\Big(\frac{\sigma_B}{\sigma}\Big), \quad
        d = \operatorname{clip}_{[-d_{max},\, d_{max}]}\Big(\frac{\mu_B - \mu}{\sigma}\Big), \quad
        y = \gamma\Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big) + \beta,

    with :math:`r, d` treated as constants in the backward pass and
    :math:`\sigma = \sqrt{\hat\sigma^2 + \epsilon}`. Without clipping,
    :math:`y = \gamma (x - \mu)/\sigma + \beta`: the inference formula. With
    :math:`r_{max} = 1, d_{max} = 0` it is batch norm. The paper starts there
    and relaxes the limits over training; :attr:`rmax` and :attr:`dmax` are
    plain attributes so a training loop can do the same. Evaluation mode uses
    the running statistics, exactly like ``nn.BatchNorm2d``; running
    statistics are updated like torch's (unbiased running variance).

    Parameters
    ----------
    num_features : int
        ``C``.
    rmax : float >= 1
    dmax : float >= 0
    momentum, eps : float
        As in ``nn.BatchNorm2d``.

    Raises
    ------
    ValueError
        On construction if ``rmax < 1`` or ``dmax < 0``; in forward if the
        input is not 4-D with ``C`` channels, or training with one value per
        channel.
    """

    def __init__(
        self,
        num_features: int,
        rmax: float = 3.0,
        dmax: float = 5.0,
        momentum: float = 0.01,
        eps: float = 1e-5,
    ):
        super().__init__()
        if rmax < 1:
            raise ValueError(f"rmax must be >= 1, got {rmax}")
        if dmax < 0:
            raise ValueError(f"dmax must be >= 0, got {dmax}")
        self.num_features, self.rmax, self.dmax = num_features, rmax, dmax
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input of shape (N, {self.num_features}, H, W), got {tuple(x.shape)}"
            )
        view = (1, -1, 1, 1)
        if not self.training:
            mean, var = self.running_mean, self.running_var
            x_hat = (x - mean.view(view)) / torch.sqrt(var.view(view) + self.eps)
            return x_hat * self.weight.view(view) + self.bias.view(view)
        m = x.numel() // x.shape[1]
        if m <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {x.shape}")
        mean = x.mean(dim=(0, 2, 3))
        var = x.var(dim=(0, 2, 3), unbiased=False)
        std = torch.sqrt(var + self.eps)
        with torch.no_grad():
            running_std = torch.sqrt(self.running_var + self.eps)
            r = (std / running_std).clamp(1.0 / self.rmax, self.rmax)
            d = ((mean - self.running_mean) / running_std).clamp(-self.dmax, self.dmax)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * (m / (m - 1)), self.momentum)
        x_hat = (x - mean.view(view)) / std.view(view) * r.view(view) + d.view(view)
        return x_hat * self.weight.view(view) + self.bias.view(view)


class WSConv2d(nn.Conv2d):
    r"""``nn.Conv2d`` with Weight Standardization (Qiao et al., 2019).

    Every forward pass uses, per output channel ``o``,

    .. math::
        \hat W_{o} = \frac{W_o - \mathrm{mean}(W_o)}{\sqrt{\mathrm{var}(W_o) + \epsilon}}

    over the ``(in_channels / groups, kH, kW)`` weights of that channel. The
    gradient flows through the standardization, as in the paper. Arguments
    are those of ``nn.Conv2d`` plus ``ws_eps``.
    """

    def __init__(self, *args, ws_eps: float = 1e-5, **kwargs):
        super().__init__(*args, **kwargs)
        self.ws_eps = ws_eps

    def standardized_weight(self) -> torch.Tensor:
        """The weight actually used by the convolution, shape of ``weight``."""
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return (w - mean) / torch.sqrt(var + self.ws_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)


class SkipInitBlock(nn.Module):
    r"""Residual block ``x + alpha * f(x)`` with ``alpha`` a learnable scalar starting at 0.

    ``f`` is ``conv3x3 -> norm -> ReLU -> conv3x3 -> norm``. With
    ``alpha = 0`` at initialization the block is the identity, so a stack of
    them passes the signal through unchanged however deep it is: the trick of
    SkipInit (De and Smith, 2020), which trains deep residual nets without
    normalization. Fixup (Zhang et al., 2019) reaches the same start by
    zero-initializing the last layer of each branch.

    Parameters
    ----------
    channels : int
    norm : str
        Any ``kind`` of :func:`bnbook.models.make_norm` (``"none"`` for a
        normalization-free block).
    skipinit : bool
        True: ``alpha`` starts at 0. False: ``alpha`` is fixed at 1 (a plain
        residual block).
    """

    def __init__(self, channels: int, norm: str = "none", skipinit: bool = True):
        super().__init__()
        bias = norm == "none"
        self.branch = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias),
            make_norm(norm, channels, spatial=True),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1, bias=bias),
            make_norm(norm, channels, spatial=True),
        )
        if skipinit:
            self.alpha = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("alpha", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.alpha * self.branch(x))


def residual_cnn(
    depth: int,
    channels: int = 16,
    num_classes: int = 10,
    *,
    in_channels: int = 1,
    norm: str = "none",
    skipinit: bool = True,
    pool: int = 2,
) -> nn.Sequential:
    """Stem conv, ``depth`` :class:`SkipInitBlock` s, average pool to ``pool × pool``, linear.

    Conv weights get He (Kaiming normal) initialization and zero biases.

    Raises
    ------
    ValueError
        If ``depth < 1`` or ``norm`` is unknown.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, got {depth}")
    net = nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, padding=1, bias=norm == "none"),
        make_norm(norm, channels, spatial=True),
        nn.ReLU(),
        *[SkipInitBlock(channels, norm, skipinit) for _ in range(depth)],
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(channels * pool * pool, num_classes),
    )
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            # He initialization keeps the variance of each conv-ReLU branch at its input's:
            # the standard choice, and the one under which plain residual nets blow up.
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return net


def _replace(model: nn.Module, match, build) -> int:
    """Replace, in place, every child module for which ``match`` holds by ``build(child)``."""
    count = 0
    for name, child in model.named_children():
        if match(child):
            setattr(model, name, build(child))
            count += 1
        else:
            count += _replace(child, match, build)
    return count


def to_batch_renorm(model: nn.Module, **kwargs) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` in ``model`` by a :class:`BatchRenorm2d`, in place.

    Affine parameters and running statistics are copied; ``kwargs`` (``rmax``,
    ``dmax``, ``momentum``) go to :class:`BatchRenorm2d`. Returns ``model``.

    Raises
    ------
    ValueError
        If the model has no ``BatchNorm2d``.
    """

    def build(bn: nn.BatchNorm2d) -> BatchRenorm2d:
        brn = BatchRenorm2d(bn.num_features, eps=bn.eps, **kwargs)
        with torch.no_grad():
            if bn.affine:
                brn.weight.copy_(bn.weight)
                brn.bias.copy_(bn.bias)
            if bn.running_mean is not None:
                brn.running_mean.copy_(bn.running_mean)
                brn.running_var.copy_(bn.running_var)
        return brn.train(bn.training)

    if not _replace(model, lambda m: type(m) is nn.BatchNorm2d, build):
        raise ValueError("the model has no nn.BatchNorm2d to replace")
    return model


def to_weight_standardized(model: nn.Module, ws_eps: float = 1e-5) -> nn.Module:
    """Replace every ``nn.Conv2d`` in ``model`` by a :class:`WSConv2d` with the same weights.

    Returns ``model`` (changed in place).

    Raises
    ------
    ValueError
        If the model has no ``nn.Conv2d``.
    """

    def build(conv: nn.Conv2d) -> WSConv2d:
        ws = WSConv2d(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            conv.padding_mode,
            ws_eps=ws_eps,
        )
        ws.load_state_dict(conv.state_dict())
        return ws.train(conv.training)

    if not _replace(model, lambda m: type(m) is nn.Conv2d, build):
        raise ValueError("the model has no nn.Conv2d to replace")
    return model
