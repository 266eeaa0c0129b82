"""bnbook.replicas: K models fused into one wide model compute what the K models compute."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbook.data import load_digits
from bnbook.models import cnn, mlp
from bnbook.replicas import GroupedLinear, MixedNorm, stack, train_stacked, unstack


def _models(builder, K=3, **kw):
    torch.manual_seed(0)
    return [builder(**kw).double() for _ in range(K)]


CASES = [
    (cnn, {"norm": "bn", "channels": (4, 8)}),
    (cnn, {"norm": "gn", "channels": (4, 8), "hidden": 8}),
    (cnn, {"norm": "ln", "channels": (4, 8), "hidden": 8}),
    (cnn, {"norm": "in", "channels": (4, 8)}),
    (cnn, {"norm": "bn", "channels": (4, 8), "hidden": 8}),
    (mlp, {"norm": "bn", "hidden": (16, 8), "activation": "relu"}),
    (mlp, {"norm": "none", "hidden": (16,)}),
]


@pytest.mark.parametrize(("builder", "kw"), CASES)
def test_stacked_forward_and_gradients_equal_the_separate_models(builder, kw):
    models = _models(builder, **kw)
    st = stack(models).double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    out = st(x)
    assert out.shape == (6, 3, 10)
    torch.testing.assert_close(out, torch.stack([m(x) for m in models], dim=1))
    loss = nn.functional.cross_entropy(out.transpose(1, 2), y[:, None].expand(-1, 3)) * 3
    loss.backward()
    for m in models:
        nn.functional.cross_entropy(m(x), y).backward()
    for k, m in enumerate(models):
        torch.testing.assert_close(unstack_grads(st, k, models), [p.grad for p in m.parameters()])


def unstack_grads(st, k, models):
    """Replica k's gradients, read through unstack on a copy holding grads as weights."""
    ghost = stack(models).double()
    with torch.no_grad():
        for gp, p in zip(ghost.parameters(), st.parameters(), strict=True):
            gp.copy_(p.grad)
    return list(unstack(ghost, k, models[k]).parameters())


def _mixed(index):
    torch.manual_seed(index)
    if index == 0:
        return [
            cnn(norm=n, channels=(4, 8), hidden=8) for n in ("bn", "bn", "gn", "ln", "gn", "bn")
        ]
    if index == 1:
        return [cnn(norm="gn", channels=(4, 8), groups=g) for g in (1, 2, 2, 4)]
    return [mlp(norm=n, hidden=(16, 8), activation="relu") for n in ("ln", "bn", "gn")]


@pytest.mark.parametrize("index", range(3))
def test_models_with_different_normalizers_stack_into_one(index):
    models = [m.double() for m in _mixed(index)]
    K = len(models)
    st = stack(models).double()
    assert any(isinstance(m, MixedNorm) for m in st.modules())
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    out = st(x)
    singles = [m(x) for m in models]  # one training-mode pass each, like the stacked one
    torch.testing.assert_close(out, torch.stack(singles, dim=1))
    loss = nn.functional.cross_entropy(out.transpose(1, 2), y[:, None].expand(-1, K)) * K
    loss.backward()
    for logits in singles:
        nn.functional.cross_entropy(logits, y).backward()
    for k, m in enumerate(models):
        torch.testing.assert_close(unstack_grads(st, k, models), [p.grad for p in m.parameters()])
        # The running statistics of batch norm replicas, after one training-mode pass.
        single = unstack(st, k, m)
        for b1, b2 in zip(single.buffers(), m.buffers(), strict=True):
            torch.testing.assert_close(b1, b2)


@pytest.mark.parametrize(("builder", "kw"), CASES[:3])
def test_unstack_after_training_matches_the_stacked_replica_in_eval_mode(builder, kw):
    data = load_digits(dtype=torch.float64)
    models = _models(builder, **kw)
    st = stack(models).double()
    acc = train_stacked(st, data, steps=5, batch_size=16, lr=0.05, momentum=0.9)
    st.eval()
    for k, m in enumerate(models):
        single = unstack(st, k, m).eval()
        torch.testing.assert_close(st(data.x_test)[:, k], single(data.x_test))
        expected = (single(data.x_test).argmax(1) == data.y_test).double().mean()
        assert abs(float(acc[k]) - float(expected)) < 1e-6  # accuracy is returned in float32


def test_grouped_linear_blocks_do_not_mix():
    layer = GroupedLinear(2, 3, 4)
    x = torch.randn(5, 6)
    y = layer(x)
    x2 = x.clone()
    x2[:, 3:] += 1.0  # change only the second block's input
    y2 = layer(x2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_stack_errors():
    with pytest.raises(ValueError, match="at least one model"):
        stack([])
    with pytest.raises(ValueError, match="same layers"):
        stack([cnn(norm="bn"), cnn(norm="none")])
    with pytest.raises(ValueError, match="same layers"):
        stack([cnn(channels=(4, 8)), cnn(channels=(8, 8))])
    with pytest.raises(ValueError, match="same layers"):
        stack([cnn(norm="bn"), cnn(norm="bn", hidden=8)])
    with pytest.raises(ValueError, match="cannot stack a Dropout"):
        stack([cnn(norm="bn", dropout=0.5)] * 2)
    with pytest.raises(ValueError, match="must start with Flatten"):
        stack([nn.Sequential(nn.Linear(64, 10))] * 2)
    st = stack([cnn()] * 2)
    with pytest.raises(IndexError, match="replica 2 out of range"):
        unstack(st, 2, cnn())


def test_train_stacked_errors():
    data = load_digits()
    st = stack([cnn()] * 2)
    with pytest.raises(ValueError, match="steps must be positive"):
        train_stacked(st, data, steps=0, batch_size=4, lr=0.1)
    with pytest.raises(ValueError, match="exceeds"):
        train_stacked(st, data, steps=1, batch_size=10**6, lr=0.1)
