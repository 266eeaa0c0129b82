"""bnbook.train: the seeded training loop, its evaluation, recording and divergence check."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bnbook.data import load_digits, minibatches
from bnbook.models import mlp
from bnbook.train import History, InputRecorder, evaluate, seed_everything, steps_to_reach, train


@pytest.fixture(scope="module")
def digits():
    return load_digits().flat()


def _model(seed=0, norm="bn"):
    seed_everything(seed)
    return mlp(hidden=(32,), norm=norm, activation="relu")


def test_seed_everything_returns_matching_generator():
    g = seed_everything(7)
    a = torch.rand(3)
    assert torch.equal(
        torch.rand(3, generator=g), torch.rand(3, generator=torch.Generator().manual_seed(7))
    )
    seed_everything(7)
    assert torch.equal(torch.rand(3), a)


def test_same_seed_same_run_different_seed_different_run(digits):
    runs = [train(_model(0), digits, steps=30, lr=0.1, seed=0, eval_every=10) for _ in range(2)]
    assert runs[0].loss == runs[1].loss and runs[0].test_acc == runs[1].test_acc
    other = train(_model(0), digits, steps=30, lr=0.1, seed=1, eval_every=10)
    assert other.loss != runs[0].loss  # a different mini-batch order


def test_loss_decreases_and_accuracy_rises_in_a_few_dozen_steps(digits):
    h = train(_model(), digits, steps=40, lr=0.1, momentum=0.9, eval_every=40)
    assert sum(h.loss[-5:]) / 5 < 0.5 * h.loss[0]
    assert h.test_acc[0] < 0.3 < 0.8 < h.final_test_acc
    assert not h.diverged


def test_eval_steps_include_start_and_end_without_duplicates(digits):
    h = train(_model(), digits, steps=25, lr=0.1, eval_every=10, train_acc=True)
    assert h.eval_steps == [0, 10, 20, 25]
    assert len(h.test_acc) == len(h.test_loss) == len(h.train_acc) == 4
    assert len(h.loss) == 25
    assert all(0.0 <= a <= 1.0 for a in h.test_acc + h.train_acc)
    h = train(_model(), digits, steps=50, lr=0.1, eval_every=25)  # crosses an epoch (22 batches)
    assert h.eval_steps == [0, 25, 50] and len(h.loss) == 50


def test_final_evaluation_matches_evaluate(digits):
    model = _model()
    h = train(model, digits, steps=15, lr=0.1, eval_every=100)
    loss, acc = evaluate(model, digits.x_test, digits.y_test)
    assert h.test_acc[-1] == acc and h.test_loss[-1] == loss
    assert model.training  # train() leaves the model in training mode


def test_evaluate_uses_eval_mode_and_restores_mode():
    model = nn.Sequential(nn.BatchNorm1d(2))
    model[0].running_mean.fill_(100.0)  # eval mode would use these: logits become very negative
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1])
    loss, acc = evaluate(model, x, y)
    assert acc == 1.0 and model.training
    expected = nn.functional.cross_entropy((x - 100) / math.sqrt(1 + 1e-5), y).item()
    assert loss == pytest.approx(expected)
    model.eval()
    evaluate(model, x, y)
    assert not model.training


def test_recorder_records_training_passes_at_chosen_steps(digits):
    model = _model()
    first_linear = model[1]
    h = train(
        model,
        digits,
        steps=12,
        lr=0.1,
        seed=3,
        eval_every=4,
        record={"in": first_linear, "size": model[2]},
        statistic=lambda t: torch.tensor([float(len(t)), float(t.sum())]),
        record_every=5,
    )
    assert h.record_steps == [1, 5, 10]
    rec = h.recorded["in"]
    assert rec.shape == (3, 2)
    # only training batches (60 rows) were recorded, never the 449-row evaluations
    assert torch.all(rec[:, 0] == 60) and torch.all(h.recorded["size"][:, 0] == 60)
    # step 1 recorded the input of the first mini-batch that train() drew
    xb, _ = next(minibatches(digits.x_train, digits.y_train, 60, torch.Generator().manual_seed(3)))
    assert rec[0, 1].item() == pytest.approx(xb.sum().item(), rel=1e-5)
    # the hooks are gone afterwards
    assert not first_linear._forward_hooks and not model[2]._forward_hooks


def test_record_every_defaults_to_eval_every(digits):
    model = _model()
    h = train(
        model, digits, steps=9, lr=0.1, eval_every=3, record={"a": model[1]}, statistic=torch.mean
    )
    assert h.record_steps == [1, 3, 6, 9] and h.recorded["a"].shape == (4,)


def test_hooks_removed_even_when_training_fails(digits):
    model = _model()

    def boom(t):
        raise RuntimeError("statistic failed")

    with pytest.raises(RuntimeError, match="statistic failed"):
        train(model, digits, steps=3, lr=0.1, record={"a": model[1]}, statistic=boom)
    assert not model[1]._forward_hooks


def test_input_recorder_inactive_by_default():
    layer = nn.Linear(2, 2)
    rec = InputRecorder({"l": layer}, torch.sum)
    layer(torch.ones(3, 2))
    assert rec.stacked()["l"].numel() == 0
    rec.active = True
    layer(torch.ones(3, 2))
    assert rec.stacked()["l"].tolist() == [6.0]
    rec.remove()
    assert not layer._forward_hooks


def test_divergence_is_detected_and_stops_training(digits):
    h = train(_model(norm="none"), digits, steps=200, lr=1e6, eval_every=50)
    assert h.diverged
    assert len(h.loss) < 200 and not math.isfinite(h.loss[-1])
    assert all(math.isfinite(v) for v in h.loss[:-1])
    assert h.eval_steps[-1] == len(h.loss)  # evaluated once more where it stopped
    assert h.final_test_acc < 0.5


def test_custom_optimizer_is_used(digits):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    train(model, digits, steps=5, lr=10.0, optimizer=opt)
    # lr=0 optimizer: the weights did not move (BN running stats are buffers, not parameters)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"steps": 0}, "steps"),
        ({"steps": 5, "batch_size": 5000}, "batch_size"),
        ({"steps": 5, "statistic": torch.mean}, "together"),
        ({"steps": 5, "eval_every": 0}, "eval_every"),
        ({"steps": 5, "record_every": -1}, "record_every"),
    ],
)
def test_argument_errors(digits, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train(_model(), digits, **kwargs)


def test_argument_error_record_without_statistic(digits):
    model = _model()
    with pytest.raises(ValueError, match="together"):
        train(model, digits, steps=5, record={"a": model[1]})


def test_steps_to_reach():
    h = History(eval_steps=[0, 10, 20, 30], test_acc=[0.1, 0.5, 0.9, 0.95])
    assert steps_to_reach(h, 0.5) == 10
    assert steps_to_reach(h, 0.91) == 30
    assert steps_to_reach(h, 0.99) is None
    assert math.isnan(History().final_test_acc) and h.final_test_acc == 0.95
