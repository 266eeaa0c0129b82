"""Plotting functions reused across chapters (matplotlib only).

Each function draws on an ``Axes`` it is given (or creates one) and returns it,
so a notebook can arrange several panels and keep control of the figure.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["new_axes", "mean_band", "percentile_lines", "norm_cube"]


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


def percentile_lines(
    ax, steps, quantiles, levels=(15, 50, 85), color=None, label: str | None = None
):
    """Plot how a distribution evolves: one line per percentile, the outer pair shaded.

    Parameters
    ----------
    ax : matplotlib Axes
    steps : sequence, length T
        Training step of each record.
    quantiles : array-like, shape (T, len(levels))
        The recorded percentiles, lowest level first (e.g. from
        :class:`bnbook.train.InputRecorder` with ``torch.quantile``).
    levels : tuple of numbers
        The percentile of each column, used in the legend.

    Raises
    ------
    ValueError
        If ``quantiles`` does not have shape (len(steps), len(levels)).
    """
    q = np.asarray(quantiles, dtype=float)
    if q.shape != (len(steps), len(levels)):
        raise ValueError(f"quantiles have shape {q.shape}, expected {(len(steps), len(levels))}")
    prefix = f"{label}: " if label else ""
    color = color or "C0"
    styles = [":", "-", "--"] if len(levels) == 3 else ["-"] * len(levels)
    for j, (level, style) in enumerate(zip(levels, styles, strict=True)):
        ax.plot(steps, q[:, j], style, color=color, label=f"{prefix}{level}th percentile")
    ax.fill_between(steps, q[:, 0], q[:, -1], color=color, alpha=0.15, lw=0)
    return ax


NORM_CUBE_KINDS = {
    "bn": "Batch Norm",
    "ln": "Layer Norm",
    "in": "Instance Norm",
    "gn": "Group Norm",
}


def norm_cube(ax=None, kind: str = "bn", shape=(6, 6, 6), groups: int = 2, color="C0"):
    """Draw the (N, C, H×W) cube of a feature map and shade one normalization set.

    The shaded cells share one mean and one variance (after Wu and He, 2018,
    Fig. 2): for ``"bn"`` one channel across the batch and all positions; for
    ``"ln"`` one sample across channels and positions; for ``"in"`` one sample
    and one channel; for ``"gn"`` one sample and one group of
    ``C / groups`` consecutive channels.

    Parameters
    ----------
    ax : a 3-D matplotlib Axes (``projection="3d"``), optional
    kind : {"bn", "ln", "in", "gn"}
    shape : (N, C, HW)
        Number of cells drawn along each axis.
    groups : int
        Groups for ``"gn"``; must divide ``C``.

    Raises
    ------
    ValueError
        If ``kind`` is unknown, ``groups`` does not divide ``C``, or ``ax`` is
        not a 3-D Axes.
    """
    if kind not in NORM_CUBE_KINDS:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(NORM_CUBE_KINDS)}")
    N, C, HW = shape
    if groups < 1 or C % groups:
        raise ValueError(f"groups={groups} must divide the C={C} channels drawn")
    if ax is None:
        ax = plt.figure(figsize=(3, 3)).add_subplot(projection="3d")
    if not hasattr(ax, "voxels"):
        raise ValueError('ax must be a 3-D Axes, e.g. fig.add_subplot(projection="3d")')
    shared = np.zeros(shape, dtype=bool)
    if kind == "bn":
        shared[:, 0, :] = True
    elif kind == "ln":
        shared[0, :, :] = True
    elif kind == "in":
        shared[0, 0, :] = True
    else:
        shared[0, : C // groups, :] = True
    colors = np.empty(shape, dtype=object)
    colors[:] = "#ffffff10"
    colors[shared] = color
    ax.voxels(np.ones(shape, dtype=bool), facecolors=colors, edgecolor="#55555540", lw=0.3)
    ax.set_xlabel("N (batch)", labelpad=-12)
    ax.set_ylabel("C (channels)", labelpad=-12)
    ax.set_zlabel("H, W (positions)", labelpad=-12)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_zticks([])
    ax.set_box_aspect(shape)
    ax.set_title(NORM_CUBE_KINDS[kind])
    return ax
