"""Train several independently initialized copies of a small net as one wide net.

Repeating an experiment over seeds multiplies its cost, and for the book's
tiny networks most of that cost is per-step Python overhead, not arithmetic.
:func:`stack` fuses ``K`` models built by :func:`bnbook.models.cnn` or
:func:`bnbook.models.mlp` into one model whose convolutions are grouped
(``groups=K``) and whose linear layers are block-diagonal, so replica ``k``
only ever sees its own channels. Every normalizer the builders use acts per
channel or per group of consecutive channels, so it stays inside one replica:
batch norm keeps one mean per channel, and a GroupNorm with ``G`` groups
becomes one with ``K * G`` groups. The fused model computes exactly what the
``K`` models compute on the same mini-batches, in one pass; :func:`unstack`
gets a replica back as an ordinary model.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from torch import nn

from bnbook.data import Dataset, minibatches

__all__ = ["GroupedLinear", "MixedNorm", "Stacked", "stack", "unstack", "train_stacked"]

_ELEMENTWISE = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.MaxPool2d, nn.Identity)


class GroupedLinear(nn.Module):
    r"""``K`` independent linear layers applied to consecutive blocks of the features.

    Input ``(N, K * in_features)``, output ``(N, K * out_features)``:
    :math:`y_{n,k} = W_k x_{n,k} + b_k` for each block ``k``.
    """

    def __init__(self, replicas: int, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.replicas, self.in_features, self.out_features = replicas, in_features, out_features
        self.weight = nn.Parameter(torch.empty(replicas, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(replicas, out_features)) if bias else None
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = x.reshape(x.shape[0], self.replicas, self.in_features)
        y = torch.einsum("nki,koi->nko", blocks, self.weight)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(x.shape[0], -1)


class Stacked(nn.Module):
    """``K`` fused replicas: input ``(N, *)`` shared, output ``(N, K, num_classes)``."""

    def __init__(self, body: nn.Sequential, replicas: int, in_channels: int | None):
        super().__init__()
        self.body = body
        self.replicas = replicas
        self.in_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels is not None:
            # Each replica's first (grouped) convolution reads its own copy of the input.
            x = x.repeat(1, self.replicas, *([1] * (x.ndim - 2)))
        return self.body(x).reshape(x.shape[0], self.replicas, -1)


def _cat(tensors):
    return None if tensors[0] is None else torch.cat([t.detach() for t in tensors])


_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)


class MixedNorm(nn.Module):
    """Different normalizers for consecutive runs of replicas, each run fused.

    Replicas whose normalization layers are identical (same type and
    settings) and adjacent share one fused layer; the input's channels are
    split between the runs. This lets one stacked model compare batch, group
    and layer norm side by side.
    """

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        runs: list[list[nn.Module]] = []
        for m in layers:
            if runs and repr(runs[-1][0]) == repr(m) and type(runs[-1][0]) is type(m):
                runs[-1].append(m)
            else:
                runs.append([m])
        self.sizes = [len(r) * _channels(r[0]) for r in runs]
        self.counts = [len(r) for r in runs]
        self.runs = nn.ModuleList([_stack_layer(r, len(r)) for r in runs])

    def locate(self, k: int) -> tuple[nn.Module, int]:
        """The fused layer that holds replica ``k``, and ``k``'s index within it."""
        for run, count in zip(self.runs, self.counts, strict=True):
            if k < count:
                return run, k
            k -= count
        raise IndexError(k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, self.sizes, dim=1)
        return torch.cat([run(p) for run, p in zip(self.runs, parts, strict=True)], dim=1)


def _channels(m: nn.Module) -> int:
    return m.num_channels if isinstance(m, nn.GroupNorm) else m.num_features


def _stack_layer(layers: list[nn.Module], K: int) -> nn.Module:
    first = layers[0]
    same = len({repr(m) for m in layers}) == 1 and all(type(m) is type(first) for m in layers)
    if not same and all(isinstance(m, _NORMS) for m in layers):
        return MixedNorm(layers)
    if not same:
        raise ValueError("the models to stack must have the same layers in the same order")
    if isinstance(first, nn.Conv2d):
        if first.groups != 1:
            raise ValueError("cannot stack grouped convolutions")
        wide = nn.Conv2d(
            K * first.in_channels,
            K * first.out_channels,
            first.kernel_size,
            first.stride,
            first.padding,
            first.dilation,
            groups=K,
            bias=first.bias is not None,
        )
    elif isinstance(first, nn.Linear):
        wide = GroupedLinear(K, first.in_features, first.out_features, first.bias is not None)
        with torch.no_grad():
            wide.weight.copy_(torch.stack([m.weight for m in layers]))
            if wide.bias is not None:
                wide.bias.copy_(torch.stack([m.bias for m in layers]))
        return wide
    elif isinstance(first, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if not first.track_running_stats or first.momentum is None:
            raise ValueError("only batch norm with running statistics and a momentum is supported")
        wide = type(first)(K * first.num_features, first.eps, first.momentum, affine=first.affine)
        wide.running_mean.copy_(_cat([m.running_mean for m in layers]))
        wide.running_var.copy_(_cat([m.running_var for m in layers]))
    elif isinstance(first, nn.GroupNorm):
        wide = nn.GroupNorm(
            K * first.num_groups, K * first.num_channels, first.eps, affine=first.affine
        )
    elif isinstance(first, nn.Flatten) or isinstance(first, _ELEMENTWISE):
        # Channel-wise or position-wise: the same module serves every replica.
        return copy.deepcopy(first)
    else:
        raise ValueError(f"cannot stack a {type(first).__name__} layer")
    with torch.no_grad():
        if getattr(wide, "weight", None) is not None:
            wide.weight.copy_(_cat([m.weight for m in layers]))
        if getattr(wide, "bias", None) is not None:
            wide.bias.copy_(_cat([m.bias for m in layers]))
    return wide


def stack(models: Sequence[nn.Sequential]) -> Stacked:
    """Fuse ``K`` models of identical architecture into one :class:`Stacked` model.

    Parameters
    ----------
    models : sequence of nn.Sequential
        Built by :func:`bnbook.models.cnn` or :func:`bnbook.models.mlp` with
        the same arguments (typically under different seeds), except that
        the normalization layers may differ (batch vs group norm, numbers of
        groups): those are fused run by run in a :class:`MixedNorm`. Supported
        layers: Conv2d, Linear, BatchNorm1d/2d, GroupNorm, ReLU, Sigmoid,
        Tanh, MaxPool2d, Flatten. An MLP must start with Flatten.

    Returns
    -------
    Stacked
        Maps ``(N, *)`` to logits ``(N, K, num_classes)``; replica ``k``'s
        logits equal ``models[k]``'s.

    Raises
    ------
    ValueError
        If fewer than one model is given, the architectures differ, or a
        layer type (e.g. Dropout) is not supported.
    """
    if len(models) < 1:
        raise ValueError("need at least one model to stack")
    K = len(models)
    layers = [list(m) for m in models]
    if len({len(m) for m in layers}) != 1:
        raise ValueError("the models to stack must have the same layers in the same order")
    body = nn.Sequential(*[_stack_layer(list(group), K) for group in zip(*layers, strict=True)])
    first = layers[0][0]
    in_channels = first.in_channels if isinstance(first, nn.Conv2d) else None
    if in_channels is None and not isinstance(first, nn.Flatten):
        raise ValueError("a stacked MLP must start with Flatten")
    if in_channels is None:
        # Flattened input is shared: the first linear layer reads it K times.
        body = nn.Sequential(body[0], _Repeat(K), *list(body)[1:])
    return Stacked(body, K, in_channels)


class _Repeat(nn.Module):
    def __init__(self, K: int):
        super().__init__()
        self.K = K

    def forward(self, x):
        return x.repeat(1, self.K)


def unstack(stacked: Stacked, k: int, like: nn.Sequential) -> nn.Sequential:
    """Replica ``k`` of ``stacked`` as an ordinary model with the architecture of ``like``.

    Raises
    ------
    IndexError
        If ``k`` is not in ``range(K)``.
    """
    K = stacked.replicas
    if not 0 <= k < K:
        raise IndexError(f"replica {k} out of range for {K} replicas")
    model = copy.deepcopy(like)
    wide_layers = [m for m in stacked.body if not isinstance(m, _Repeat)]
    with torch.no_grad():
        for small, wide in zip(model, wide_layers, strict=True):
            _copy_replica(small, wide, k)
    return model


def _copy_replica(small: nn.Module, wide: nn.Module, k: int) -> None:
    if isinstance(wide, MixedNorm):
        wide, k = wide.locate(k)
    if isinstance(wide, GroupedLinear):
        small.weight.copy_(wide.weight[k])
        if wide.bias is not None:
            small.bias.copy_(wide.bias[k])
        return
    for name, t in [*small.named_parameters(), *small.named_buffers()]:
        src = getattr(wide, name)
        if name == "num_batches_tracked":
            t.copy_(src)
        else:
            n = t.shape[0]
            t.copy_(src[k * n : (k + 1) * n])


def train_stacked(
    model: Stacked,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    momentum: float = 0.0,
    seed: int = 0,
) -> torch.Tensor:
    """Train all replicas with SGD on the same mini-batches; return their test accuracies.

    The loss is the *sum* of the replicas' mean cross-entropies, so each
    replica receives exactly the gradient it would get if trained alone.
    Mini-batch order follows ``seed`` (as in :func:`bnbook.train.train`);
    replicas differ only in their initial weights.

    Returns
    -------
    Tensor, shape (K,)
        Test accuracy of each replica in eval mode after ``steps`` updates.

    Raises
    ------
    ValueError
        If ``steps`` is not positive or the batch is larger than the data set.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if batch_size > len(data.x_train):
        raise ValueError(f"batch_size {batch_size} exceeds the {len(data.x_train)} examples")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    model.train()
    step = 0
    while step < steps:
        for xb, yb in minibatches(data.x_train, data.y_train, batch_size, gen):
            logits = model(xb)  # (N, K, classes)
            target = yb[:, None].expand(-1, model.replicas)
            loss = nn.functional.cross_entropy(logits.transpose(1, 2), target) * model.replicas
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        pred = model(data.x_test).argmax(dim=2)
    model.train()
    return (pred == data.y_test[:, None]).float().mean(dim=0)
