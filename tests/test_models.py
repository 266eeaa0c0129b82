"""Tests of bnbook.models: shapes, layer order, biases, the sample model, init, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from bnbook import nn as bnn
from bnbook.models import NORMS, cnn, init_weights, make_activation, make_norm, mlp, sample_cnn

NORM_TYPES = {
    "bn": nn.BatchNorm2d,
    "bnbook": bnn.BatchNorm2d,
    "gn": nn.GroupNorm,
    "ln": nn.GroupNorm,
    "in": nn.GroupNorm,
}
ACTS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _layers_before_norm(model: nn.Module):
    """(layer, next module or None) for every conv/linear layer of a Sequential."""
    mods = list(model)
    return [
        (m, n)
        for m, n in zip(mods, mods[1:] + [None], strict=True)
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]


@pytest.mark.parametrize(
    "norm, placement, activation",
    list(itertools.product(NORMS, ("before", "after"), ("relu", "sigmoid", "tanh"))),
)
def test_cnn_output_shape_and_layer_order(norm, placement, activation):
    torch.manual_seed(0)
    model = cnn(norm=norm, placement=placement, activation=activation, channels=(8, 16))
    out = model(torch.randn(6, 1, 8, 8))
    assert out.shape == (6, 10)
    mods = list(model)
    conv_idx = [i for i, m in enumerate(mods) if isinstance(m, nn.Conv2d)]
    assert len(conv_idx) == 2
    for i in conv_idx:
        nxt = [type(m) for m in mods[i + 1 : i + 4]]
        if norm == "none":
            assert nxt[:2] == [ACTS[activation], nn.MaxPool2d]
        elif placement == "before":
            assert nxt == [NORM_TYPES[norm], ACTS[activation], nn.MaxPool2d]
        else:
            assert nxt == [ACTS[activation], NORM_TYPES[norm], nn.MaxPool2d]


@pytest.mark.parametrize("norm", [n for n in NORMS if n != "in"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_mlp_output_shape_for_vectors_and_images(norm, placement):
    model = mlp(in_features=64, hidden=(12, 8), norm=norm, placement=placement)
    assert model(torch.randn(5, 64)).shape == (5, 10)
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("placement", ["before", "after"])
def test_cnn_bias_dropped_exactly_when_norm_follows(norm, placement):
    model = cnn(norm=norm, placement=placement, channels=(8, 16), hidden=12)
    pairs = _layers_before_norm(model)
    assert len(pairs) == 4  # two convs, the hidden layer, the classifier
    norm_types = (nn.BatchNorm1d, nn.BatchNorm2d, bnn.BatchNorm1d, bnn.BatchNorm2d, nn.GroupNorm)
    for layer, nxt in pairs[:-1]:
        assert (layer.bias is None) == isinstance(nxt, norm_types), (layer, nxt)
        # Instance norm has no vector form, so nothing normalizes the hidden FC layer.
        expected = norm != "none" and placement == "before"
        if isinstance(layer, nn.Linear) and norm == "in":
            expected = False
        assert (layer.bias is None) == expected
    assert pairs[-1][0].bias is not None  # the classifier always keeps its bias


@pytest.mark.parametrize("norm", ["none", "bn", "gn"])
@pytest.mark.parametrize("placement", ["before", "after"])
def test_mlp_bias_dropped_exactly_when_norm_follows(norm, placement):
    model = mlp(hidden=(8, 8), norm=norm, placement=placement)
    hidden = [m for m in model if isinstance(m, nn.Linear)][:-1]
    for layer in hidden:
        assert (layer.bias is None) == (norm != "none" and placement == "before")


@pytest.mark.parametrize("flag", [True, False])
def test_explicit_bias_overrides_the_default(flag):
    convs = [m for m in cnn(norm="bn", conv_bias=flag) if isinstance(m, nn.Conv2d)]
    assert all((c.bias is not None) == flag for c in convs)
    linears = [m for m in mlp(norm="bn", bias=flag) if isinstance(m, nn.Linear)][:-1]
    assert all((lin.bias is not None) == flag for lin in linears)


def test_cnn_hidden_layer_and_dropout():
    model = cnn(norm="bn", channels=(4,), hidden=16, dropout=0.3)
    assert any(isinstance(m, nn.BatchNorm1d) for m in model)
    drops = [m for m in model if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0].p == 0.3
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    # Without a hidden layer, dropout acts right before the classifier.
    model = cnn(norm="none", channels=(4,), dropout=0.5)
    assert isinstance(list(model)[-2], nn.Dropout)


def test_cnn_bnbook_matches_torch_batchnorm():
    torch.manual_seed(0)
    ours = cnn(norm="bnbook", channels=(4, 8))
    torch.manual_seed(0)
    ref = cnn(norm="bn", channels=(4, 8))
    x = torch.randn(7, 1, 8, 8)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("image_size, channels", [(16, (4, 4, 4)), (28, (4, 8)), (4, (2, 2))])
def test_cnn_other_image_sizes(image_size, channels):
    model = cnn(in_channels=3, channels=channels, image_size=image_size)
    assert model(torch.randn(2, 3, image_size, image_size)).shape == (2, 10)


def test_cnn_rejects_image_too_small():
    with pytest.raises(ValueError, match="pooling blocks do not fit"):
        cnn(channels=(4, 4, 4, 4), image_size=8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"norm": "batch"}, "unknown normalizer"),
        ({"activation": "gelu"}, "unknown activation"),
        ({"placement": "middle"}, "placement must be"),
    ],
)
def test_cnn_and_mlp_reject_unknown_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cnn(**kwargs)
    with pytest.raises(ValueError, match=match):
        mlp(**kwargs)


@pytest.mark.parametrize(
    "kind, spatial, expected",
    [
        ("none", True, nn.Identity),
        ("bn", True, nn.BatchNorm2d),
        ("bn", False, nn.BatchNorm1d),
        ("bnbook", True, bnn.BatchNorm2d),
        ("bnbook", False, bnn.BatchNorm1d),
        ("gn", True, nn.GroupNorm),
        ("ln", False, nn.GroupNorm),
        ("in", True, nn.GroupNorm),
    ],
)
def test_make_norm_types(kind, spatial, expected):
    assert type(make_norm(kind, 8, spatial)) is expected


def test_make_norm_groups():
    assert make_norm("gn", 8, True, groups=2).num_groups == 2
    assert make_norm("ln", 8, True).num_groups == 1
    assert make_norm("in", 8, True).num_groups == 8


def test_make_norm_errors():
    with pytest.raises(ValueError, match="does not divide"):
        make_norm("gn", 6, True, groups=4)
    with pytest.raises(ValueError, match="instance norm needs spatial"):
        make_norm("in", 8, False)
    with pytest.raises(ValueError, match="unknown normalizer"):
        make_norm("batchnorm", 8, True)


def test_make_activation():
    for name, cls in ACTS.items():
        assert isinstance(make_activation(name), cls)
    with pytest.raises(ValueError, match="unknown activation 'elu'"):
        make_activation("elu")


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("image_size", [8, 28, 32])
def test_sample_cnn_fits_its_input(in_channels, image_size):
    model = sample_cnn(in_channels=in_channels, image_size=image_size)
    out = model(torch.randn(4, in_channels, image_size, image_size))
    assert out.shape == (4, 10)
    fc = [m for m in model if isinstance(m, nn.Linear)][0]
    assert fc.in_features == 128 * (image_size // 4) ** 2


def test_sample_cnn_has_no_bias_in_front_of_batch_norm():
    model = sample_cnn()
    pairs = _layers_before_norm(model)
    for layer, nxt in pairs[:-1]:
        assert isinstance(nxt, nn.BatchNorm1d | nn.BatchNorm2d)
        assert layer.bias is None
    assert pairs[-1][0].bias is not None
    # 64 + 128 + 512 biases saved relative to the source's version.
    assert sum(layer.weight.shape[0] for layer, _ in pairs[:-1]) == 704


@pytest.mark.parametrize("image_size", [6, 10, 30])
def test_sample_cnn_rejects_sizes_not_divisible_by_4(image_size):
    with pytest.raises(ValueError, match="divisible by 4"):
        sample_cnn(image_size=image_size)


@pytest.mark.parametrize("std", [1e-3, 0.5, 4.0])
def test_init_weights_std_and_zero_bias(std):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 64, 3), nn.BatchNorm2d(64), nn.Linear(256, 200))
    model[1].weight.data.fill_(3.0)
    assert init_weights(model, std) is model
    for layer in (model[0], model[2]):
        w = layer.weight.detach()
        assert abs(w.std().item() / std - 1) < 0.03
        assert abs(w.mean().item()) < 0.03 * std
        assert torch.count_nonzero(layer.bias) == 0
    # Normalization layers are left alone.
    assert torch.all(model[1].weight == 3.0)


@pytest.mark.parametrize("std", [0.0, -1.0, float("nan")])
def test_init_weights_rejects_non_positive_std(std):
    with pytest.raises(ValueError, match="std must be positive"):
        init_weights(nn.Linear(2, 2), std)
