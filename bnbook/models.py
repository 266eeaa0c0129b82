"""Small MLPs and CNNs for the digits, with the normalizer as a switch.

Every experiment in the book varies one thing at a time: which normalizer
(none, batch, group, layer, instance), where it sits relative to the
activation, which activation, dropout, whether the layer before the
normalizer has a bias, and the scale of the initial weights. These builders
expose exactly those switches.
"""

from __future__ import annotations

from torch import nn

from bnbook import nn as bnn

__all__ = ["NORMS", "make_norm", "make_activation", "mlp", "cnn", "sample_cnn", "init_weights"]

NORMS = ("none", "bn", "bnbook", "gn", "ln", "in")
ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def make_norm(kind: str, num_features: int, spatial: bool, groups: int = 4) -> nn.Module:
    """A normalization layer for ``num_features`` channels.

    Parameters
    ----------
    kind : {"none", "bn", "bnbook", "gn", "ln", "in"}
        ``"bn"`` is torch's BatchNorm, ``"bnbook"`` this book's from-scratch
        BatchNorm (same maths, slower). ``"ln"`` normalizes each sample over all
        its channels (and positions) - implemented as GroupNorm with one group,
        which equals LayerNorm over (C, H, W) with per-channel affine
        parameters. ``"in"`` is GroupNorm with one channel per group, i.e.
        InstanceNorm with affine parameters.
    num_features : int
    spatial : bool
        True after a conv layer (input (N, C, H, W)), False after a linear layer.
    groups : int
        Number of groups for ``"gn"`` (must divide ``num_features``).
    """
    if kind == "none":
        return nn.Identity()
    if kind == "bn":
        return nn.BatchNorm2d(num_features) if spatial else nn.BatchNorm1d(num_features)
    if kind == "bnbook":
        return bnn.BatchNorm2d(num_features) if spatial else bnn.BatchNorm1d(num_features)
    if kind in ("gn", "ln", "in"):
        g = {"gn": groups, "ln": 1, "in": num_features}[kind]
        if num_features % g:
            raise ValueError(f"groups={g} does not divide num_features={num_features}")
        if kind == "in" and not spatial:
            raise ValueError("instance norm needs spatial positions; use it after conv layers")
        return nn.GroupNorm(g, num_features)
    raise ValueError(f"unknown normalizer {kind!r}; choose one of {NORMS}")


def make_activation(name: str) -> nn.Module:
    """``"relu"``, ``"sigmoid"`` or ``"tanh"`` as a module."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


def _block(layer, width, norm, activation, placement, spatial, groups, dropout) -> list[nn.Module]:
    if placement not in ("before", "after"):
        raise ValueError(f"placement must be 'before' or 'after' the activation, got {placement!r}")
    normalizer = make_norm(norm, width, spatial, groups)
    act = make_activation(activation)
    mods = [layer, normalizer, act] if placement == "before" else [layer, act, normalizer]
    if dropout:
        mods.append(nn.Dropout(dropout))
    return [m for m in mods if not isinstance(m, nn.Identity)]


def mlp(
    in_features: int = 64,
    hidden: tuple[int, ...] = (100, 100, 100),
    num_classes: int = 10,
    *,
    norm: str = "none",
    activation: str = "sigmoid",
    placement: str = "before",
    dropout: float = 0.0,
    bias: bool | None = None,
    groups: int = 4,
) -> nn.Sequential:
    """Fully connected net: ``[Linear -> Norm -> Act] * len(hidden) -> Linear``.

    Input (N, in_features) or images (N, 1, H, W), flattened first. ``bias=None``
    drops the linear bias exactly when a normalizer follows the layer directly,
    where the normalizer's mean subtraction would cancel it.
    """
    layers: list[nn.Module] = [nn.Flatten()]
    width_in = in_features
    for width in hidden:
        has_bias = (norm == "none" or placement == "after") if bias is None else bias
        linear = nn.Linear(width_in, width, bias=has_bias)
        layers += _block(linear, width, norm, activation, placement, False, groups, dropout)
        width_in = width
    layers.append(nn.Linear(width_in, num_classes))
    return nn.Sequential(*layers)


def cnn(
    in_channels: int = 1,
    channels: tuple[int, ...] = (16, 32),
    num_classes: int = 10,
    *,
    image_size: int = 8,
    norm: str = "bn",
    activation: str = "relu",
    placement: str = "before",
    dropout: float = 0.0,
    conv_bias: bool | None = None,
    groups: int = 4,
    hidden: int = 0,
) -> nn.Sequential:
    """Conv net: ``[Conv3x3 -> Norm -> Act -> MaxPool2] * len(channels) -> (FC) -> FC``.

    Each block halves the image size. ``conv_bias=None`` drops the conv bias
    exactly when a normalizer follows the conv directly. ``hidden > 0`` adds a
    fully connected hidden layer (normalized with BatchNorm1d/others when
    ``norm`` allows it on vectors) before the classifier.

    Raises
    ------
    ValueError
        If the image is too small for the number of pooling blocks, or an
        option is unknown.
    """
    size = image_size // 2 ** len(channels)
    if size < 1:
        raise ValueError(f"{len(channels)} pooling blocks do not fit an image of {image_size}px")
    layers: list[nn.Module] = []
    c_in = in_channels
    for c in channels:
        has_bias = (norm == "none" or placement == "after") if conv_bias is None else conv_bias
        conv = nn.Conv2d(c_in, c, kernel_size=3, padding=1, bias=has_bias)
        layers += _block(conv, c, norm, activation, placement, True, groups, 0.0)
        layers.append(nn.MaxPool2d(2))
        c_in = c
    layers.append(nn.Flatten())
    features = c_in * size * size
    if hidden:
        vec_norm = "none" if norm == "in" else norm
        has_bias = vec_norm == "none" or placement == "after"
        fc = nn.Linear(features, hidden, bias=has_bias)
        layers += _block(fc, hidden, vec_norm, activation, placement, False, groups, dropout)
        features = hidden
    elif dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def sample_cnn(in_channels: int = 1, image_size: int = 8, num_classes: int = 10) -> nn.Sequential:
    """The sample model of source-material section 4, with its shapes fixed.

    The source writes conv(3->64)-BN-ReLU-pool, conv(64->128)-BN-ReLU-pool,
    FC(128*7*7 -> 512)-BN1d-ReLU-FC(512->10). A flattened size of 128*7*7
    after two 2x2 poolings implies 28x28 inputs, and 3 input channels implies
    colour: no standard data set is both (MNIST is 28x28 grey, CIFAR-10 is
    32x32 colour). Here the flattened size is computed from ``in_channels``
    and ``image_size`` (1 and 8 for the digits, 1 and 28 for MNIST), and the
    conv/linear layers before BN have no bias, which BN's mean subtraction
    would cancel anyway.
    """
    if image_size % 4:
        raise ValueError(f"image_size must be divisible by 4 (two 2x2 poolings), got {image_size}")
    s = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1, bias=False),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(128 * s * s, 512, bias=False),
        nn.BatchNorm1d(512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


def init_weights(model: nn.Module, std: float) -> nn.Module:
    """Re-initialize every conv/linear weight from N(0, std^2) and zero the biases.

    Used to reproduce small-Gaussian initializations (Ioffe & Szegedy's
    Figure 1) and to sweep the initial scale. Seed torch first for
    reproducibility. Returns the model for chaining.
    """
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model
