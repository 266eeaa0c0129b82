"""bnbook.ics: gradient shift (ICS), noisy BN and the gradient-path measurements."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bnbook.ics import NoisyShiftScale, add_noise, gradient_path, gradient_shift
from bnbook.models import mlp


def _net(norm="bn", activation="sigmoid", seed=0):
    torch.manual_seed(seed)
    return mlp(
        in_features=5, hidden=(7, 6, 4), num_classes=3, norm=norm, activation=activation
    ).double()


def _batch(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randint(
        0, 3, (n,), generator=g
    )


def _linears(model):
    return [m for m in model if isinstance(m, nn.Linear)]


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _grads(model, x, y):
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("norm", ["none", "bn"])
@pytest.mark.parametrize("activation", ["sigmoid", "relu"])
def test_gradient_shift_matches_explicit_update(norm, activation):
    model = _net(norm, activation)
    x, y = _batch()
    lr = 0.7
    layers = _linears(model)
    out = gradient_shift(model, layers, x, y, lr)
    grads = _grads(copy.deepcopy(model), x, y)
    names = [n for n, _ in model.named_parameters()]
    for k, layer in enumerate(layers):
        i = [p is layer.weight for p in model.parameters()].index(True)
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for j, p in enumerate(moved.parameters()):
                if j < i:
                    p -= lr * grads[j]
        after = _grads(moved, x, y)[i].flatten()
        before = grads[i].flatten()
        torch.testing.assert_close(out.l2[k], (before - after).norm(), msg=names[i])
        cos = before @ after / (before.norm() * after.norm())
        torch.testing.assert_close(out.cosine[k], cos)
        torch.testing.assert_close(out.grad_norm[k], before.norm())
    torch.testing.assert_close(out.relative, out.l2 / out.grad_norm)
    # the first layer has nothing before it: its gradient cannot change
    assert out.l2[0] == 0 and out.cosine[0] == pytest.approx(1.0)
    assert out.l2.shape == out.cosine.shape == (len(layers),)


def test_gradient_shift_leaves_model_untouched():
    model = _net("bn")
    model.train()
    x, y = _batch()
    before = _state(model)
    gradient_shift(model, _linears(model)[1:], x, y, lr=0.5)
    gradient_path(model, x, y, [0.1, 0.5])
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # parameters and BN running statistics alike
    assert all(p.grad is None for p in model.parameters())


def test_gradient_shift_grows_with_lr():
    model = _net("none")
    x, y = _batch()
    small = gradient_shift(model, _linears(model)[1:], x, y, lr=0.01)
    large = gradient_shift(model, _linears(model)[1:], x, y, lr=1.0)
    assert torch.all(large.l2 > small.l2)


def test_gradient_shift_errors():
    model = _net()
    x, y = _batch()
    with pytest.raises(ValueError, match="at least one layer"):
        gradient_shift(model, [], x, y, 0.1)
    with pytest.raises(ValueError, match="lr"):
        gradient_shift(model, _linears(model), x, y, 0.0)
    with pytest.raises(ValueError, match="belonging to the model"):
        gradient_shift(model, [nn.Linear(2, 2)], x, y, 0.1)
    with pytest.raises(ValueError, match="belonging to the model"):
        gradient_shift(model, [nn.ReLU()], x, y, 0.1)
    with pytest.raises(ValueError, match="rows"):
        gradient_shift(model, _linears(model), x, y[:-1], 0.1)
    with pytest.raises(ValueError, match="at least 2"):
        gradient_shift(model, _linears(model), x[:1], y[:1], 0.1)


# ---------------------------------------------------------------- noisy BN
@pytest.mark.parametrize("shape", [(6, 4), (5, 3, 4, 4), (2, 3, 5)])
def test_noise_is_one_affine_map_per_channel_within_range(shape):
    torch.manual_seed(0)
    noise = NoisyShiftScale(shift=1.5, scale=(0.5, 3.0))
    x = torch.randn(shape, dtype=torch.float64)
    y = noise(x)
    # per channel, y = a x + b with the same (a, b) for every example and position
    xc = x.transpose(0, 1).flatten(1)
    yc = y.transpose(0, 1).flatten(1)
    a = (yc[:, 1] - yc[:, 0]) / (xc[:, 1] - xc[:, 0])
    b = yc[:, 0] - a * xc[:, 0]
    torch.testing.assert_close(yc, a[:, None] * xc + b[:, None])
    assert torch.all((a >= 0.5) & (a <= 3.0)) and torch.all(b.abs() <= 1.5)


def test_noise_changes_every_step_is_seeded_and_eval_is_the_mean_map():
    noise = NoisyShiftScale(shift=1.0, scale=(0.5, 2.0))
    x = torch.randn(8, 3)
    torch.manual_seed(3)
    first, second = noise(x), noise(x)
    assert not torch.allclose(first, second)
    torch.manual_seed(3)
    assert torch.equal(noise(x), first)
    noise.eval()
    torch.testing.assert_close(noise(x), 1.25 * x)
    assert "shift=1.0" in repr(noise)


def test_noise_shift_and_scale_statistics():
    # 20,000 channels: one draw of (a_c, b_c) per channel
    torch.manual_seed(0)
    b = NoisyShiftScale(shift=2.0, scale=(1.0, 3.0))(torch.zeros(2, 20000))[0]
    assert b.mean().abs() < 0.05 and b.abs().max() <= 2.0
    assert b.var().item() == pytest.approx(4 / 3, rel=0.05)  # U(-2, 2)
    a = NoisyShiftScale(shift=0.0, scale=(1.0, 3.0))(torch.ones(2, 20000))[0]
    assert a.mean().item() == pytest.approx(2.0, abs=0.05) and a.min() >= 1.0 and a.max() <= 3.0


def test_noise_passes_gradients():
    noise = NoisyShiftScale(shift=1.0, scale=(0.5, 2.0))
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(5)
    noise(x).sum().backward()
    torch.manual_seed(5)
    a_plus_b = noise(torch.ones(1, 3, dtype=torch.float64))
    torch.manual_seed(5)
    b = noise(torch.zeros(1, 3, dtype=torch.float64))
    torch.testing.assert_close(x.grad, (a_plus_b - b).expand(4, 3))


def test_noise_errors():
    with pytest.raises(ValueError, match="shift"):
        NoisyShiftScale(shift=-1.0)
    with pytest.raises(ValueError, match="scale range"):
        NoisyShiftScale(scale=(2.0, 1.0))
    with pytest.raises(ValueError, match="scale range"):
        NoisyShiftScale(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        NoisyShiftScale()(torch.ones(3))


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_add_noise_inserts_before_each_activation(norm):
    model = _net(norm)
    noisy = add_noise(model, shift=0.5, scale=(0.8, 1.2))
    kinds = [type(m) for m in noisy]
    acts = [i for i, k in enumerate(kinds) if k is nn.Sigmoid]
    assert len(acts) == 3 and all(kinds[i - 1] is NoisyShiftScale for i in acts)
    before = nn.BatchNorm1d if norm == "bn" else nn.Linear
    assert all(kinds[i - 2] is before for i in acts)
    assert len(noisy) == len(model) + 3
    assert noisy[1] is model[1]  # modules are shared, not copied
    assert noisy[acts[0] - 1].shift == 0.5 and noisy[acts[0] - 1].scale == (0.8, 1.2)
    x, _ = _batch()
    noisy.eval()
    model.eval()
    assert noisy(x).shape == model(x).shape


def test_add_noise_errors():
    with pytest.raises(TypeError, match="Sequential"):
        add_noise(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no"):
        add_noise(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------- gradient path
def test_gradient_path_on_a_quadratic():
    """Least squares: L(w) = |Xw - t|^2 / N has Hessian H = 2 X^T X / N, so along -g
    L(w - eta g) = L - eta |g|^2 + eta^2 g^T H g / 2 and the gradient changes by eta H g:
    the effective smoothness |H g| / |g| is the same for every step size."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    t = torch.randn(10, 1, dtype=torch.float64)
    loss_fn = nn.functional.mse_loss
    etas = [0.01, 0.1, 0.3]
    path = gradient_path(model, x, t, etas, loss_fn=loss_fn)
    w = model.weight.detach().flatten()
    h = 2 * x.T @ x / 10
    g = h @ w - 2 * x.T @ t.flatten() / 10
    loss0 = loss_fn(model(x), t).item()
    for k, eta in enumerate(etas):
        expected = loss0 - eta * g @ g + eta**2 * g @ h @ g / 2
        assert path.loss[k].item() == pytest.approx(expected.item(), rel=1e-10)
        assert path.grad_change[k].item() == pytest.approx((eta * h @ g).norm().item(), rel=1e-10)
    torch.testing.assert_close(
        path.beta, torch.full((3,), ((h @ g).norm() / g.norm()).item(), dtype=torch.float64)
    )
    assert path.loss0 == pytest.approx(loss0)
    assert path.max_beta == pytest.approx(path.beta.max().item())
    assert path.max_grad_change == pytest.approx(path.grad_change[-1].item())
    all_losses = path.loss.tolist() + [loss0]
    assert path.loss_range == pytest.approx(max(all_losses) - min(all_losses))
    torch.testing.assert_close(path.step_sizes, torch.tensor(etas, dtype=torch.float64))


def test_gradient_path_matches_explicit_steps_with_bn():
    model = _net("bn", "relu")
    x, y = _batch()
    path = gradient_path(model, x, y, [0.05, 0.2])
    g = _grads(copy.deepcopy(model), x, y)
    for k, eta in enumerate([0.05, 0.2]):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, gp in zip(moved.parameters(), g, strict=True):
                p -= eta * gp
        loss = nn.functional.cross_entropy(moved(x), y).item()
        change = torch.cat(
            [(a - b).flatten() for a, b in zip(_grads(moved, x, y), g, strict=True)]
        ).norm()
        assert path.loss[k].item() == pytest.approx(loss, rel=1e-9)
        assert path.grad_change[k].item() == pytest.approx(change.item(), rel=1e-9)


def test_gradient_path_errors():
    model = _net()
    x, y = _batch()
    with pytest.raises(ValueError, match="step_sizes"):
        gradient_path(model, x, y, [])
    with pytest.raises(ValueError, match="step_sizes"):
        gradient_path(model, x, y, [0.1, -0.1])
    with pytest.raises(ValueError, match="at least 2"):
        gradient_path(model, x[:1], y[:1], [0.1])
    with pytest.raises(ValueError, match="zero"):
        gradient_path(model, x, y, [0.1], loss_fn=lambda logits, y: 0 * logits.sum())
