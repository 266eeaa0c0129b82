r"""Fold an inference-mode batch norm into the convolution or linear layer before it.

In eval mode a batch norm layer is a fixed per-channel affine map of its input
``z``: it uses the running statistics :math:`\mu, \sigma^2`, not the batch's,

.. math::

    \mathrm{BN}(z) = \gamma \frac{z - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta .

If ``z = W * x + b`` comes from a convolution or linear layer, the two compose
into one layer of the same shape with

.. math::

    W' = W \cdot \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}, \qquad
    b' = (b - \mu) \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta ,

the scale applied to every weight of output channel ``c`` (``b = 0`` for a
layer without bias; ``gamma = 1, beta = 0`` for ``affine=False``). The folded
layer saves a pass over the activations at inference. It is exact only in eval
mode: in training mode batch norm uses the statistics of each batch, which no
fixed layer can reproduce.

The arithmetic is done in float64 and the result cast back to the layer's
dtype, so the folded weights carry one rounding error, not several. Works with
``torch.nn.BatchNorm1d/2d/3d`` and :mod:`bnbook.nn`'s modules, which have the
same buffers and parameters.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
from torch import nn

from bnbook.nn.batchnorm import _BatchNorm as _BnbookBatchNorm

__all__ = [
    "fold_conv_bn",
    "fold_linear_bn",
    "fold_batch_norms",
    "foldable_pairs",
    "is_batch_norm",
]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Input rank each batch norm class accepts, to catch e.g. Conv2d -> BatchNorm1d,
# a pairing that fails at run time and that folding must not silently "fix".
_BN_RANKS = {
    nn.BatchNorm1d: (2, 3),
    nn.BatchNorm2d: (4,),
    nn.BatchNorm3d: (5,),
}


def is_batch_norm(module: nn.Module) -> bool:
    """True for torch's and bnbook's batch norm modules (any ``BatchNorm*``)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, _BnbookBatchNorm))


def _bn_ranks(bn: nn.Module) -> tuple[int, ...] | None:
    if isinstance(bn, _BnbookBatchNorm):
        return bn._ranks
    for cls, ranks in _BN_RANKS.items():
        if isinstance(bn, cls):
            return ranks
    return None  # e.g. SyncBatchNorm accepts any rank


def _check_bn(bn: nn.Module, out_channels: int, layer: str) -> None:
    if not is_batch_norm(bn):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.training:
        raise ValueError(
            f"{type(bn).__name__} is in training mode, where it normalizes with each "
            "batch's statistics and folding would not be exact: call .eval() first"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"{type(bn).__name__} has no running statistics (track_running_stats=False): "
            "it normalizes with batch statistics even in eval mode and cannot be folded"
        )
    if isinstance(bn.running_mean, nn.parameter.UninitializedBuffer):
        raise ValueError(f"{type(bn).__name__} is lazy and uninitialized: run one forward first")
    if bn.num_features != out_channels or bn.running_mean.numel() != out_channels:
        raise ValueError(
            f"{type(bn).__name__}({bn.num_features}) cannot follow {layer} "
            f"with {out_channels} output channels"
        )


def _scale_shift(bn: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(s, t)`` with ``BN(z) = s * z + t`` in eval mode, in ``dtype``."""
    mean = bn.running_mean.detach().to(dtype)
    var = bn.running_var.detach().to(dtype)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.detach().to(dtype)
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias.detach().to(dtype)
    return scale, shift


def _work_dtype(device: torch.device) -> torch.dtype:
    # float64 keeps the fold to one rounding; MPS has no float64.
    return torch.float32 if device.type == "mps" else torch.float64


def _folded_params(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    work = _work_dtype(weight.device)
    scale, shift = _scale_shift(bn, work)
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    w = weight.detach().to(work) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    b = shift if bias is None else bias.detach().to(work) * scale + shift
    return w.to(weight.dtype), b.to(weight.dtype if bias is None else bias.dtype)


def _check_initialized(layer: nn.Module) -> None:
    if isinstance(layer.weight, nn.parameter.UninitializedParameter):
        raise ValueError(f"{type(layer).__name__} is lazy and uninitialized: run one forward first")


def _overrides_forward(module: nn.Module, base: type) -> bool:
    return type(module).forward is not base.forward


def _filled(folded: nn.Module, w: torch.Tensor, b: torch.Tensor, requires_grad: bool) -> nn.Module:
    """Copy the folded weight and bias into a fresh layer, in eval mode like its sources."""
    with torch.no_grad():
        folded.weight.copy_(w)
        folded.bias.copy_(b)
    folded.weight.requires_grad_(requires_grad)
    folded.bias.requires_grad_(requires_grad)
    return folded.eval()


def fold_conv_bn(conv: nn.Module, bn: nn.Module) -> nn.Module:
    r"""Return a new convolution equal to ``bn(conv(x))`` for modules in eval mode.

    Computes :math:`W' = W \gamma / \sqrt{\sigma^2 + \epsilon}` (per output
    channel) and :math:`b' = (b - \mu)\gamma / \sqrt{\sigma^2 + \epsilon} + \beta`
    from the running statistics; see the module docstring. Grouped and
    depthwise convolutions fold the same way, because each output channel
    still owns its own slice of the weight.

    Parameters
    ----------
    conv : torch.nn.Conv1d, Conv2d or Conv3d
        Output shape (N, C, \*); any stride, padding, dilation, groups.
    bn : BatchNorm1d, BatchNorm2d or BatchNorm3d (torch or bnbook)
        With ``num_features == C`` and running statistics.

    Returns
    -------
    torch.nn.Conv1d, Conv2d or Conv3d
        A fresh module of the same class as the base of ``conv``, in eval mode,
        always with a bias, on the same device and with the same dtype.
        ``conv`` and ``bn`` are not modified.

    Raises
    ------
    TypeError
        If ``conv`` is not a Conv1d/2d/3d (transposed convolutions, whose
        weight is laid out (C_in, C_out / groups, \*), are rejected), if its
        class overrides ``forward``, or if ``bn`` is not a batch norm.
    ValueError
        If either module is in training mode, if ``bn`` has no running
        statistics (``track_running_stats=False``), if the channel counts
        differ, or if ``bn`` expects inputs of another rank (e.g. a
        BatchNorm1d after a Conv2d).
    """
    if isinstance(conv, nn.modules.conv._ConvTransposeNd):
        raise TypeError(
            f"{type(conv).__name__}: transposed convolutions are not supported "
            "(their weight is laid out (C_in, C_out / groups, *kernel))"
        )
    base = next((cls for cls in _CONVS if isinstance(conv, cls)), None)
    if base is None:
        raise TypeError(f"expected nn.Conv1d, Conv2d or Conv3d, got {type(conv).__name__}")
    if _overrides_forward(conv, base):
        raise TypeError(
            f"{type(conv).__name__} overrides forward; folding would drop its behaviour"
        )
    if conv.training:
        raise ValueError(f"{type(conv).__name__} is in training mode: call .eval() first")
    _check_initialized(conv)
    _check_bn(bn, conv.out_channels, type(conv).__name__)
    ranks = _bn_ranks(bn)
    if ranks is not None and conv.weight.dim() not in ranks:
        raise ValueError(
            f"{type(bn).__name__} expects {' or '.join(f'{r}D' for r in ranks)} inputs but "
            f"{type(conv).__name__} outputs {conv.weight.dim()}D tensors"
        )
    w, b = _folded_params(conv.weight, conv.bias, bn)
    folded = base(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
        device=w.device,
        dtype=w.dtype,
    )
    return _filled(folded, w, b, conv.weight.requires_grad)


def fold_linear_bn(linear: nn.Module, bn: nn.Module) -> nn.Linear:
    r"""Return a new ``nn.Linear`` equal to ``bn(linear(x))`` for modules in eval mode.

    Same formula as :func:`fold_conv_bn`, with the scale applied to each row
    of the (out_features, in_features) weight. As in torch, the linear output
    must have shape (N, out_features): batch norm normalizes dim 1, a linear
    layer transforms the last dim, and the two agree only for 2-D tensors.

    Raises
    ------
    TypeError
        If ``linear`` is not an ``nn.Linear`` (or overrides ``forward``), or
        ``bn`` is not a batch norm.
    ValueError
        If either module is in training mode, ``bn`` has no running statistics,
        ``bn.num_features != linear.out_features``, or ``bn`` is a BatchNorm2d/3d.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
    if _overrides_forward(linear, nn.Linear):
        raise TypeError(
            f"{type(linear).__name__} overrides forward; folding would drop its behaviour"
        )
    if linear.training:
        raise ValueError("Linear is in training mode: call .eval() first")
    _check_initialized(linear)
    _check_bn(bn, linear.out_features, "Linear")
    ranks = _bn_ranks(bn)
    if ranks is not None and 2 not in ranks:
        raise ValueError(f"{type(bn).__name__} does not accept the 2-D output of a Linear layer")
    w, b = _folded_params(linear.weight, linear.bias, bn)
    folded = nn.Linear(
        linear.in_features, linear.out_features, bias=True, device=w.device, dtype=w.dtype
    )
    return _filled(folded, w, b, linear.weight.requires_grad)


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether ``layer -> bn`` is a pair :func:`fold_batch_norms` folds."""
    if not is_batch_norm(bn) or bn.running_mean is None:
        return False
    if isinstance(layer, nn.modules.conv._ConvTransposeNd) or isinstance(
        getattr(layer, "weight", None), nn.parameter.UninitializedParameter
    ):
        return False
    for base in (*_CONVS, nn.Linear):
        if isinstance(layer, base) and not _overrides_forward(layer, base):
            out = layer.out_features if base is nn.Linear else layer.out_channels
            rank = 2 if base is nn.Linear else layer.weight.dim()
            ranks = _bn_ranks(bn)
            return bn.num_features == out and (ranks is None or rank in ranks)
    return False


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Qualified names ``(layer, bn)`` of the pairs :func:`fold_batch_norms` would fold.

    A pair is a Conv1d/2d/3d or Linear directly followed, inside the same
    ``nn.Sequential``, by a batch norm of matching channels and rank that has
    running statistics. Pairs are looked for in every Sequential at any depth,
    also inside custom modules; a custom module's own ``forward`` is never
    analysed, since the order in which it calls its children is unknown.
    """
    pairs = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        items = list(module.named_children())
        for (name_a, a), (name_b, b) in zip(items, items[1:], strict=False):
            if _foldable(a, b):
                dot = f"{prefix}." if prefix else ""
                pairs.append((dot + name_a, dot + name_b))
    return pairs


def _fold_sequential(seq: nn.Sequential) -> None:
    items = list(seq.named_children())
    kept: OrderedDict[str, nn.Module] = OrderedDict()
    i = 0
    while i < len(items):
        name, module = items[i]
        nxt = items[i + 1][1] if i + 1 < len(items) else None
        if nxt is not None and _foldable(module, nxt):
            fold = fold_linear_bn if isinstance(module, nn.Linear) else fold_conv_bn
            kept[name] = fold(module, nxt)
            i += 2  # the batch norm is absorbed
        else:
            kept[name] = module
            i += 1
    # Keep the surviving children's names, so their state_dict keys do not change.
    for key in list(seq._modules):
        del seq._modules[key]
    for key, module in kept.items():
        seq.add_module(key, module)


def fold_batch_norms(model: nn.Module) -> nn.Module:
    """Return a deep copy of ``model`` with every foldable conv/linear -> BN pair folded.

    Each pair listed by :func:`foldable_pairs` is replaced by the layer from
    :func:`fold_conv_bn` / :func:`fold_linear_bn`, and the batch norm is
    removed from its Sequential; the other children keep their names (so the
    printout shows a gap where a BN was). Batch norms that do not directly
    follow such a layer - first in the model, after an activation or pooling,
    without running statistics - are left as they are. The original model is
    not modified. In eval mode the copy computes the same function as
    ``model`` up to floating-point rounding.

    Raises
    ------
    TypeError
        If ``model`` is not an ``nn.Module``.
    ValueError
        If ``model`` or any submodule is in training mode.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise ValueError(
            f"fold_batch_norms needs a model in eval mode, but {training[:3]} "
            f"{'is' if len(training) == 1 else 'are'} training: call model.eval() first"
        )
    folded = copy.deepcopy(model)
    for module in list(folded.modules()):
        if isinstance(module, nn.Sequential):
            _fold_sequential(module)
    return folded
