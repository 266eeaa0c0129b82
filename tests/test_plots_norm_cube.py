"""Smoke tests of bnbook.plots.norm_cube: it draws, shades the right set, and rejects bad input."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from bnbook.plots import norm_cube  # noqa: E402

# Number of shaded cells in a (N, C, HW) = (2, 6, 2) cube with 3 groups (a cube only two
# cells thick, so that every cell is on the surface and drawn).
SHADED = {"bn": 2 * 2, "ln": 6 * 2, "in": 2, "gn": 2 * 2}


@pytest.mark.parametrize("kind", sorted(SHADED))
def test_norm_cube_shades_one_normalization_set(kind):
    fig = plt.figure()
    ax = fig.add_subplot(projection="3d")
    out = norm_cube(ax, kind, shape=(2, 6, 2), groups=3, color="#ff0000")
    assert out is ax and ax.get_title()
    # One Poly3DCollection per cell; the shaded ones carry the (lit) highlight colour.
    rgb = [c.get_facecolor()[0][:3] for c in ax.collections]
    shaded = [c for c in rgb if c[0] > 0 and c[1] == 0 and c[2] == 0]
    assert len(ax.collections) == 2 * 6 * 2
    assert len(shaded) == SHADED[kind]
    plt.close(fig)


def test_norm_cube_creates_axes_when_none_given():
    ax = norm_cube(kind="gn")
    assert ax.name == "3d"
    plt.close(ax.figure)


def test_norm_cube_errors():
    with pytest.raises(ValueError, match="unknown kind"):
        norm_cube(kind="xx")
    with pytest.raises(ValueError, match="must divide"):
        norm_cube(kind="gn", shape=(2, 5, 2), groups=2)
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="3-D Axes"):
        norm_cube(ax, "bn")
    plt.close(fig)
