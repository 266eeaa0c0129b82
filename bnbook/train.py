"""One small, seeded training loop shared by every experiment in the book.

It trains for a fixed number of *steps* (not epochs), so that runs with and
without batch norm are compared at equal numbers of parameter updates, and it
records what the chapters plot: the training loss at every step, the test
accuracy at regular steps, and optional statistics of chosen layers' inputs,
captured with forward hooks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from bnbook.data import Dataset, minibatches
from bnbook.progress import progress

__all__ = ["seed_everything", "evaluate", "History", "InputRecorder", "train", "steps_to_reach"]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a torch Generator seeded the same way."""
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 - third-party code may use the global state
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy loss and accuracy of ``model`` on ``(x, y)`` in eval mode.

    The model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        acc = (logits.argmax(dim=1) == y).float().mean().item()
    finally:
        model.train(was_training)
    return loss, acc


class InputRecorder:
    """Record a statistic of the *input* of chosen modules during training steps.

    Parameters
    ----------
    modules : mapping of name -> nn.Module
        Where to attach forward hooks.
    statistic : callable, Tensor -> Tensor
        Applied to each hooked module's input (detached); the results are
        stacked per name. For example ``lambda t: torch.quantile(t[:, 0],
        torch.tensor([.15, .5, .85]))`` follows one unit's distribution.

    Only forward passes made while ``active`` is True are recorded, so
    evaluation passes do not pollute the record.
    """

    def __init__(self, modules: Mapping[str, nn.Module], statistic: Callable) -> None:
        self.statistic = statistic
        self.active = False
        self.records: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.active:
                self.records[name].append(self.statistic(inputs[0].detach()).clone())

        return hook

    def stacked(self) -> dict[str, torch.Tensor]:
        """Records as one tensor per name, first axis = recorded step."""
        return {k: torch.stack(v) if v else torch.empty(0) for k, v in self.records.items()}

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for h in self._handles:
            h.remove()
        self._handles = []


@dataclass
class History:
    """What :func:`train` measured.

    ``loss[i]`` is the training loss of step ``i + 1``; ``test_acc[j]`` was
    measured after step ``eval_steps[j]`` (step 0 = before training).
    ``recorded`` holds the :class:`InputRecorder` statistics taken at the steps
    ``record_steps``. ``diverged`` is True if the loss became NaN/inf, in which
    case training stopped early.
    """

    loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    test_loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    record_steps: list[int] = field(default_factory=list)
    recorded: dict[str, torch.Tensor] = field(default_factory=dict)
    diverged: bool = False

    @property
    def final_test_acc(self) -> float:
        """Test accuracy at the last evaluation (0.1-ish chance level if diverged)."""
        return self.test_acc[-1] if self.test_acc else float("nan")


def train(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int = 60,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_every: int = 50,
    train_acc: bool = False,
    record: Mapping[str, nn.Module] | None = None,
    statistic: Callable | None = None,
    record_every: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    desc: str | None = None,
) -> History:
    """Train ``model`` with mini-batch SGD on ``data`` for ``steps`` updates.

    Parameters
    ----------
    model : nn.Module
        Maps ``data.x_train[i:j]`` to logits of shape (batch, num_classes).
    data : Dataset
    steps : int
        Number of parameter updates.
    batch_size, lr, momentum, weight_decay : SGD settings
        ``momentum=0`` is plain SGD.
    seed : int
        Seeds the mini-batch order (the model's initialization is the caller's:
        seed before building it, e.g. with :func:`seed_everything`).
    eval_every : int
        Evaluate test loss/accuracy every this many steps (and at step 0 and at
        the end). With ``train_acc=True`` also the accuracy on the training set.
    record, statistic, record_every :
        Optional forward-hook recording, see :class:`InputRecorder`; by default
        at the evaluation steps.
    optimizer : torch.optim.Optimizer, optional
        Replaces the SGD built from ``lr``, ``momentum``, ``weight_decay``.
    desc : str, optional
        Label of the progress bar (shown only outside CI and book builds).

    Returns
    -------
    History

    Raises
    ------
    ValueError
        If ``steps``, ``eval_every`` or ``record_every`` is not positive, the batch
        is larger than the training set, or only one of ``record`` and
        ``statistic`` is given.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    if eval_every < 1 or (record_every is not None and record_every < 1):
        raise ValueError(
            f"eval_every and record_every must be positive, got {eval_every} and {record_every}"
        )
    if batch_size > len(data.x_train):
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(data.x_train)} training examples"
        )
    if (record is None) != (statistic is None):
        raise ValueError("record and statistic must be given together")
    gen = torch.Generator().manual_seed(seed)
    opt = optimizer or torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    record_every = record_every or eval_every
    recorder = InputRecorder(record, statistic) if record else None
    hist = History()

    def checkpoint(step: int) -> None:
        loss, acc = evaluate(model, data.x_test, data.y_test)
        hist.eval_steps.append(step)
        hist.test_loss.append(loss)
        hist.test_acc.append(acc)
        if train_acc:
            hist.train_acc.append(evaluate(model, data.x_train, data.y_train)[1])

    model.train()
    checkpoint(0)
    step = 0
    bar = progress(total=steps, desc=desc)
    try:
        while step < steps and not hist.diverged:
            for xb, yb in minibatches(data.x_train, data.y_train, batch_size, gen):
                step += 1
                if recorder is not None:
                    recorder.active = step % record_every == 0 or step == 1
                    if recorder.active:
                        hist.record_steps.append(step)
                loss = nn.functional.cross_entropy(model(xb), yb)
                if recorder is not None:
                    recorder.active = False
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                value = loss.item()
                hist.loss.append(value)
                bar.update(1)
                if not math.isfinite(value):
                    hist.diverged = True
                    break
                if step % eval_every == 0 or step == steps:
                    checkpoint(step)
                if step == steps:
                    break
    finally:
        bar.close()
        if recorder is not None:
            hist.recorded = recorder.stacked()
            recorder.remove()
    if hist.diverged:
        # A diverged network predicts at chance or worse; record what it does.
        checkpoint(step)
    return hist


def steps_to_reach(history: History, target: float) -> int | None:
    """First evaluation step at which test accuracy reached ``target``, or None."""
    for step, acc in zip(history.eval_steps, history.test_acc, strict=True):
        if acc >= target:
            return step
    return None
