"""bnbook.plots.percentile_lines: the percentile plot of Figure 1 (b, c)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest

from bnbook.plots import new_axes, percentile_lines


def test_percentile_lines_draws_one_line_per_level_and_a_band():
    fig, (ax,) = new_axes()
    q = np.array([[-1.0, 0.0, 1.0], [-2.0, 0.5, 2.0]])
    assert percentile_lines(ax, [0, 10], q, label="BN") is ax
    assert [line.get_label() for line in ax.lines] == [
        "BN: 15th percentile",
        "BN: 50th percentile",
        "BN: 85th percentile",
    ]
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [0.0, 0.5])
    assert len(ax.collections) == 1  # the shaded 15th-85th band
    plt.close(fig)


def test_percentile_lines_shape_error():
    fig, (ax,) = new_axes()
    with pytest.raises(ValueError, match="shape"):
        percentile_lines(ax, [0, 10, 20], np.zeros((2, 3)))
    plt.close(fig)
