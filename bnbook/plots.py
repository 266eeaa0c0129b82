"""Plotting functions reused across chapters (matplotlib only).

Each function draws on an ``Axes`` it is given (or creates one) and returns it,
so a notebook can arrange several panels and keep control of the figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["new_axes", "mean_band"]


def new_axes(ncols: int = 1, width: float = 4.2, height: float = 3.2, **kwargs):
    """A row of ``ncols`` axes in a figure sized for the book's text column."""
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False, **kwargs)
    return fig, axes[0]


def mean_band(ax, x, runs, label: str | None = None, color=None, alpha: float = 0.2, **line_kw):
    """Plot the mean of ``runs`` (shape (seeds, len(x))) with a +-1 std band.

    The band shows the spread over seeds; with one run only the line is drawn.
    """
    runs = np.atleast_2d(np.asarray(runs, dtype=float))
    if runs.shape[1] != len(x):
        raise ValueError(f"runs have {runs.shape[1]} points per seed but x has {len(x)}")
    mean = runs.mean(axis=0)
    (line,) = ax.plot(x, mean, label=label, color=color, **line_kw)
    if len(runs) > 1:
        std = runs.std(axis=0, ddof=1)
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=alpha, lw=0)
    return ax
