"""Momentum conversion, freezing and precise-BN recalibration (bnbook.running_stats)."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from bnbook import nn as bnn
from bnbook.running_stats import (
    FrozenBatchNorm,
    batch_norm_modules,
    freeze_batch_norm,
    freeze_batch_norm_stats,
    keras_momentum_from_torch,
    recalibrate_batch_norm,
    torch_momentum_from_keras,
)


@pytest.mark.parametrize("keras, torch_m", [(0.99, 0.01), (0.9, 0.1), (0.0, 1.0), (1.0, 0.0)])
def test_momentum_conversion_known_values(keras, torch_m):
    assert torch_momentum_from_keras(keras) == pytest.approx(torch_m, abs=1e-15)
    assert keras_momentum_from_torch(torch_m) == pytest.approx(keras, abs=1e-15)


@pytest.mark.parametrize("m", [0.0, 0.01, 0.1, 0.5, 0.99, 0.999, 1, np.float32(0.3)])
def test_momentum_conversion_round_trip(m):
    assert keras_momentum_from_torch(torch_momentum_from_keras(m)) == pytest.approx(float(m))
    assert isinstance(torch_momentum_from_keras(m), float)


@pytest.mark.parametrize("torch_m", [0.1, 0.01, 0.3])
def test_converted_momentum_gives_the_keras_update(torch_m):
    """One torch update with m equals one Keras update ``new = k * old + (1 - k) * batch``."""
    k = keras_momentum_from_torch(torch_m)
    bn = nn.BatchNorm1d(3, momentum=torch_m)
    with torch.no_grad():
        bn.running_mean.fill_(2.0)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(0))
    bn(x)
    keras_mean = k * 2.0 + (1 - k) * x.mean(0)
    torch.testing.assert_close(bn.running_mean, keras_mean)


@pytest.mark.parametrize("fn", [torch_momentum_from_keras, keras_momentum_from_torch])
def test_momentum_conversion_errors(fn):
    for bad in (-0.1, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
            fn(bad)
    with pytest.raises(ValueError, match="cumulative average"):
        fn(None)
    for bad in ("0.9", True, torch.tensor(0.9)):
        with pytest.raises(TypeError, match="must be a real number"):
            fn(bad)


def small_model(bn2d=nn.BatchNorm2d, bn1d=nn.BatchNorm1d):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        bn2d(4),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        bn1d(6),
        nn.Linear(6, 3),
    )


def test_batch_norm_modules_and_freeze():
    model = small_model(bnn.BatchNorm2d, nn.BatchNorm1d)
    bns = batch_norm_modules(model)
    assert [type(b) for b in bns] == [bnn.BatchNorm2d, nn.BatchNorm1d]
    model.train()
    assert freeze_batch_norm_stats(model) == bns
    assert all(not b.training for b in bns) and model[0].training and model[3].training
    before = [b.running_mean.clone() for b in bns]
    model(torch.randn(8, 1, 4, 4))
    assert all(torch.equal(b.running_mean, m) for b, m in zip(bns, before, strict=True))
    model.train()  # undoes the freeze: the pitfall the chapter shows
    assert all(b.training for b in bns)


def batches(n_batches, batch_size, seed=0, shift=3.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch_size, 1, 4, 4, generator=gen) * 2 + shift for _ in range(n_batches)]


@pytest.mark.parametrize(
    "bns", [(nn.BatchNorm2d, nn.BatchNorm1d), (bnn.BatchNorm2d, bnn.BatchNorm1d)]
)
def test_recalibrate_computes_algorithm_2_population_statistics(bns):
    model = small_model(*bns).eval()
    data = batches(5, 10)
    used = recalibrate_batch_norm(model, data)
    assert used == 5
    # Algorithm 2: E[x] = mean of batch means, Var[x] = m/(m-1) * mean of batch variances,
    # computed here from the conv outputs (parameters did not change).
    conv_out = [model[0](x) for x in data]
    with torch.no_grad():
        means = torch.stack([z.mean(dim=(0, 2, 3)) for z in conv_out])
        variances = torch.stack([z.var(dim=(0, 2, 3), unbiased=True) for z in conv_out])
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert int(bn.num_batches_tracked) == 5


def test_recalibrate_restores_modes_and_momentum():
    model = small_model()
    model[1].momentum = 0.3
    model.train()
    model[3].eval()  # a mixed state must survive too
    modes = {name: m.training for name, m in model.named_modules()}
    params = copy.deepcopy(model.state_dict())
    recalibrate_batch_norm(model, batches(3, 8))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model[1].momentum == 0.3 and model[6].momentum == 0.1
    for k, v in model.state_dict().items():
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(v, params[k]), k


def test_recalibrate_runs_dropout_in_eval_mode():
    """With dropout active the statistics would differ from run to run."""
    model = small_model().train()
    recalibrate_batch_norm(model, batches(2, 8))
    first = model[6].running_var.clone()
    recalibrate_batch_norm(model, batches(2, 8))
    torch.testing.assert_close(model[6].running_var, first, rtol=0, atol=0)


def test_recalibrate_fixes_stale_statistics():
    model = small_model().eval()
    data = batches(4, 32, shift=5.0)
    x = torch.cat(data)
    with torch.no_grad():
        train_mode_like = copy.deepcopy(model).train()[:2](x)  # normalized with batch stats
        stale = model[:2](x)  # running stats still at their init (0, 1)
        recalibrate_batch_norm(model, data)
        fresh = model[:2](x)
    assert (stale - train_mode_like).abs().max() > 1.0
    assert (fresh - train_mode_like).abs().max() < 0.1


def test_recalibrate_accepts_pairs_and_max_batches():
    model = small_model().eval()
    pairs = [(x, torch.zeros(len(x))) for x in batches(6, 8)]
    assert recalibrate_batch_norm(model, iter(pairs), max_batches=2) == 2
    assert int(model[1].num_batches_tracked) == 2


def test_recalibrate_errors_leave_model_untouched():
    model = small_model().eval()
    recalibrate_batch_norm(model, batches(2, 8))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="batches is empty"):
        recalibrate_batch_norm(model, [])
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        recalibrate_batch_norm(model, [batches(1, 8)[0], batches(1, 1)[0]])
    with pytest.raises(TypeError, match="each batch must be a tensor"):
        recalibrate_batch_norm(model, [np.zeros((2, 1, 4, 4))])
    with pytest.raises(ValueError, match="max_batches must be a positive int"):
        recalibrate_batch_norm(model, batches(1, 8), max_batches=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert not model.training and model[1].momentum == 0.1
    with pytest.raises(ValueError, match="no batch norm with running statistics"):
        recalibrate_batch_norm(nn.Sequential(nn.BatchNorm1d(3, track_running_stats=False)), [])


@pytest.mark.parametrize(
    "bns", [(nn.BatchNorm2d, nn.BatchNorm1d), (bnn.BatchNorm2d, bnn.BatchNorm1d)]
)
def test_freeze_batch_norm_survives_train_and_keeps_gamma_trainable(bns):
    model = small_model(*bns)
    model.train()
    model(torch.randn(8, 1, 4, 4) + 1)  # non-trivial running statistics
    model.eval()
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    expected = model(x)
    stats = [b.running_mean.clone() for b in batch_norm_modules(model)]
    assert freeze_batch_norm(model) is model
    assert [type(m) for m in model if isinstance(m, FrozenBatchNorm)] == [FrozenBatchNorm] * 2
    model.train()
    model[3].eval()  # dropout off, so train-mode output is deterministic
    out = model(x)
    torch.testing.assert_close(out, expected)  # eval-mode normalization in train mode
    for b, s in zip(batch_norm_modules(model), stats, strict=True):
        assert not b.training and torch.equal(b.running_mean, s)
    out.sum().backward()
    assert model[1].bn.weight.grad is not None  # gamma still learns
    freeze_batch_norm(model)  # idempotent: no double wrapping
    assert isinstance(model[1].bn, bns[0])


def test_freeze_batch_norm_edge_cases():
    bn = nn.BatchNorm1d(3)
    wrapped = freeze_batch_norm(bn)
    assert isinstance(wrapped, FrozenBatchNorm) and wrapped.bn is bn
    no_stats = nn.BatchNorm1d(3, track_running_stats=False)
    assert freeze_batch_norm(no_stats) is no_stats
    model = nn.Sequential(nn.Linear(2, 3), no_stats)
    assert freeze_batch_norm(model)[1] is no_stats
    with pytest.raises(TypeError, match="expected a BatchNorm module, got Linear"):
        FrozenBatchNorm(nn.Linear(2, 3))
    with pytest.raises(ValueError, match="no statistics to freeze"):
        FrozenBatchNorm(no_stats)
