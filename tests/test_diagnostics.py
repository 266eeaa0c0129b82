"""Tests of bnbook.diagnostics: ReLU firing rates and dead units."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbook.data import load_digits
from bnbook.diagnostics import dead_fraction, firing_rate, relu_activity, relu_modules
from bnbook.models import cnn, mlp
from bnbook.train import train


def _fixed_linear(in_features, biases):
    """Linear layer with zero weights: its output is the bias, whatever the input."""
    layer = nn.Linear(in_features, len(biases))
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.tensor(biases))
    return layer


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 2, 2), (2, 6, 3, 4, 5)])
def test_firing_rate_matches_a_loop(shape):
    torch.manual_seed(0)
    t = torch.randn(shape)
    expected = torch.stack([(t[:, c] > 0).double().mean() for c in range(shape[1])])
    torch.testing.assert_close(firing_rate(t), expected)


def test_firing_rate_counts_zero_as_silent():
    t = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    torch.testing.assert_close(firing_rate(t), torch.tensor([0.0, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("t", [torch.zeros(3), torch.zeros(0, 4)])
def test_firing_rate_rejects_bad_shapes(t):
    with pytest.raises(ValueError, match=r"shape \(N, C, \*\)"):
        firing_rate(t)


def test_relu_modules_finds_every_relu_by_name():
    model = cnn(norm="bn", channels=(4, 4), hidden=8)
    relus = relu_modules(model)
    assert list(relus) == [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    assert len(relus) == 3


def test_relu_modules_rejects_model_without_relu():
    with pytest.raises(ValueError, match="no nn.ReLU"):
        relu_modules(mlp(activation="sigmoid"))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_dead_fraction_of_units_with_constant_input(mode):
    # Units with a negative constant input never fire; the others always do.
    model = nn.Sequential(_fixed_linear(3, [-1.0, 2.0, -0.5, 0.0]), nn.ReLU(),
                          _fixed_linear(4, [1.0, 1.0]), nn.ReLU())  # fmt: skip
    x = torch.randn(10, 3)
    activity = relu_activity(model, x, mode=mode)
    torch.testing.assert_close(
        activity["1"], torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    )
    torch.testing.assert_close(activity["3"], torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert dead_fraction(model, x, mode=mode) == pytest.approx(3 / 6)


def test_relu_activity_pools_batch_and_spatial_positions():
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 3, 3, padding=1)
    model = nn.Sequential(conv, nn.ReLU())
    x = torch.randn(7, 1, 5, 5)
    expected = (conv(x) > 0).double().mean(dim=(0, 2, 3))
    torch.testing.assert_close(relu_activity(model, x, mode="eval")["1"], expected)
    # Chunking does not change the result when no batch statistics are involved.
    torch.testing.assert_close(relu_activity(model, x, batch_size=3, mode="eval")["1"], expected)


def test_train_mode_uses_batch_statistics_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    model = cnn(norm="bn", channels=(4,), hidden=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    x = torch.randn(40, 1, 8, 8) * 5 + 3
    activity = relu_activity(model, x, batch_size=20, mode="train")
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])
    assert not model.training
    # With beta = 0, gamma = 1 each channel's BN output has batch mean 0, so it fires
    # on a sizeable share of every batch.
    (rates,) = activity.values()
    assert torch.all((rates > 0.2) & (rates < 0.8))


def test_eval_mode_uses_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.ReLU())
    with torch.no_grad():
        model[1].running_mean.fill_(1e6)  # pushes every eval-mode output far below zero
    x = torch.randn(16, 2)
    assert dead_fraction(model, x, mode="eval") == 1.0
    assert dead_fraction(model, x, mode="train") == 0.0
    assert model.training  # the mode is restored


def test_dropout_is_switched_off_in_train_mode():
    torch.manual_seed(0)
    model = nn.Sequential(_fixed_linear(2, [1.0] * 50), nn.Dropout(0.9), nn.ReLU())
    activity = relu_activity(model, torch.randn(8, 2), mode="train")
    torch.testing.assert_close(activity["2"], torch.ones(50, dtype=torch.float64))


def test_trailing_single_example_is_skipped_in_train_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU())
    # 5 rows in chunks of 2: a final chunk of one would make BatchNorm1d raise.
    assert 0.0 <= dead_fraction(model, torch.randn(5, 3), batch_size=2) <= 1.0


def test_training_with_a_huge_learning_rate_kills_units_without_bn():
    torch.manual_seed(0)
    data = load_digits()
    model = cnn(norm="none", channels=(8, 8))
    train(model, data, steps=10, lr=2.0, momentum=0.9)
    assert dead_fraction(model, data.x_train[:300], batch_size=60) >= 0.25


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mode": "test"}, "mode must be one of"),
        ({"batch_size": 0}, "batch_size must be positive"),
    ],
)
def test_relu_activity_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        relu_activity(cnn(), torch.randn(4, 1, 8, 8), **kwargs)


def test_relu_activity_rejects_empty_input_and_models_without_relu():
    with pytest.raises(ValueError, match="x is empty"):
        relu_activity(cnn(), torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="no nn.ReLU"):
        dead_fraction(mlp(activation="tanh"), torch.randn(4, 64))
