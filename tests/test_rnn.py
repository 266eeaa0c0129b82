"""bnbook.rnn: the normalized recurrent net and the sum-sign sequence task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bnbook.rnn import RNN_NORMS, NormRNN, sum_sign_task


def test_sum_sign_task_labels_and_shapes():
    x, y = sum_sign_task(50, 7, torch.Generator().manual_seed(0))
    assert x.shape == (50, 7, 1) and y.shape == (50,) and y.dtype == torch.int64
    torch.testing.assert_close(y, (x.sum(dim=(1, 2)) > 0).long())
    with pytest.raises(ValueError, match="must be positive"):
        sum_sign_task(0, 5, torch.Generator())


def _manual(model, x):
    """The recurrence written out with torch.nn.functional, for LN and no normalization."""
    h = torch.zeros(x.shape[0], model.hidden_size, dtype=x.dtype)
    for t in range(x.shape[1]):
        a = model.inp(x[:, t]) + h @ model.rec.weight.T
        if model.norm == "ln":
            ln = model.norms[0]
            a = nn.functional.layer_norm(a, (model.hidden_size,), ln.weight, ln.bias, ln.eps)
        h = torch.tanh(a)
    return model.out(h)


@pytest.mark.parametrize("norm", ["none", "ln"])
def test_norm_rnn_matches_the_written_out_recurrence(norm):
    torch.manual_seed(0)
    model = NormRNN(2, 6, 3, norm=norm).double()
    x = torch.randn(4, 9, 2, dtype=torch.float64)
    torch.testing.assert_close(model(x), _manual(model, x))


@pytest.mark.parametrize("norm", RNN_NORMS)
def test_norm_rnn_runs_on_sequences_longer_than_max_steps(norm):
    torch.manual_seed(0)
    model = NormRNN(1, 5, 2, norm=norm, max_steps=4)
    out = model(torch.randn(8, 10, 1))
    assert out.shape == (8, 2)
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 10, 1))).all()


def test_per_step_batch_norm_keeps_separate_statistics_per_step():
    torch.manual_seed(0)
    model = NormRNN(1, 5, 2, norm="bn", max_steps=3)
    model(torch.randn(16, 3, 1) + 2.0)
    means = [m.running_mean.clone() for m in model.norms]
    assert len(means) == 3 and not torch.allclose(means[0], means[2])


def test_layer_norm_rnn_output_of_a_sample_does_not_depend_on_the_batch():
    torch.manual_seed(0)
    model = NormRNN(1, 5, 2, norm="ln").double()
    x = torch.randn(6, 8, 1, dtype=torch.float64)
    torch.testing.assert_close(model(x)[:1], model(x[:1]))


def test_norm_rnn_errors():
    with pytest.raises(ValueError, match="unknown normalizer"):
        NormRNN(norm="gn")
    with pytest.raises(ValueError, match=r"expected input of shape \(N, T, 1\)"):
        NormRNN()(torch.zeros(4, 5))
