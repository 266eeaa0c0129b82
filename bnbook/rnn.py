"""A small recurrent net with a switchable normalizer, and a sequence task to train it on.

In a recurrent net the same cell runs at every time step, but the statistics
of its pre-activations change from step to step (the hidden state starts at
zero and fills up). Batch norm must therefore keep one set of statistics per
time step (Cooijmans et al., 2016), and has none for steps beyond the longest
training sequence; layer norm normalizes each sample's hidden vector at each
step on its own and needs no statistics at all (Ba et al., 2016).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RNN_NORMS", "NormRNN", "sum_sign_task"]

RNN_NORMS = ("none", "ln", "bn", "bn_shared")


class NormRNN(nn.Module):
    r"""Elman RNN ``h_t = tanh(Norm_t(W_x x_t + W_h h_{t-1}))``, classifier on the last ``h``.

    Input ``(N, T, input_size)``; output logits ``(N, num_classes)``.

    Parameters
    ----------
    input_size, hidden_size, num_classes : int
    norm : {"none", "ln", "bn", "bn_shared"}
        ``"ln"``: LayerNorm over the hidden units at every step. ``"bn"``:
        one BatchNorm1d per time step for the first ``max_steps`` steps;
        later steps reuse the statistics of the last one, the convention of
        Cooijmans et al. (2016). ``"bn_shared"``: one BatchNorm1d whose
        statistics pool all time steps.
    max_steps : int
        Number of per-step batch norms for ``norm="bn"``.

    Raises
    ------
    ValueError
        If ``norm`` is unknown, or the input is not 3-D with ``input_size``
        features.
    """

    def __init__(
        self,
        input_size: int = 1,
        hidden_size: int = 32,
        num_classes: int = 2,
        *,
        norm: str = "none",
        max_steps: int = 20,
    ):
        super().__init__()
        if norm not in RNN_NORMS:
            raise ValueError(f"unknown normalizer {norm!r}; choose one of {RNN_NORMS}")
        self.norm, self.input_size, self.hidden_size = norm, input_size, hidden_size
        # The normalizer's shift replaces the bias.
        self.inp = nn.Linear(input_size, hidden_size, bias=norm == "none")
        self.rec = nn.Linear(hidden_size, hidden_size, bias=False)
        if norm == "ln":
            self.norms = nn.ModuleList([nn.LayerNorm(hidden_size)])
        elif norm == "bn":
            self.norms = nn.ModuleList([nn.BatchNorm1d(hidden_size) for _ in range(max_steps)])
        elif norm == "bn_shared":
            self.norms = nn.ModuleList([nn.BatchNorm1d(hidden_size)])
        else:
            self.norms = nn.ModuleList([nn.Identity()])
        self.out = nn.Linear(hidden_size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[2] != self.input_size:
            raise ValueError(
                f"expected input of shape (N, T, {self.input_size}), got {tuple(x.shape)}"
            )
        h = x.new_zeros(x.shape[0], self.hidden_size)
        drive = self.inp(x)  # all time steps at once
        last = len(self.norms) - 1
        for t in range(x.shape[1]):
            h = torch.tanh(self.norms[min(t, last)](drive[:, t] + self.rec(h)))
        return self.out(h)


def sum_sign_task(n: int, length: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    r"""Sequences of ``length`` i.i.d. N(0, 1) numbers, labelled 1 if their sum is positive.

    The net must integrate its input over the whole sequence, and the rule is
    the same for any length, so a net trained on short sequences can be tested
    on longer ones.

    Returns
    -------
    x : Tensor, shape (n, length, 1)
    y : Tensor of int64, shape (n,)

    Raises
    ------
    ValueError
        If ``n`` or ``length`` is not positive.
    """
    if n < 1 or length < 1:
        raise ValueError(f"n and length must be positive, got n={n}, length={length}")
    x = torch.randn(n, length, 1, generator=generator)
    return x, (x.sum(dim=(1, 2)) > 0).long()
