"""Figures: what a panel does not show is said, log axes get readable labels, a sample plot is a real figure."""

import matplotlib
import numpy as np
import pytest
import torch

from sdegen import named_mixture, plotting


def test_outside_window_counts_far_and_non_finite_points():
    pts = torch.tensor([[0.0, 0.0], [2.9, -2.9], [3.1, 0.0], [0.0, -3.5], [float("nan"), 0.0], [float("inf"), 1.0]])
    assert plotting.outside_window(pts, 3.0) == 4           # 3.1, -3.5, nan, inf
    assert plotting.outside_window(pts[:2], 3.0) == 0


def test_scatter_panel_title_says_how_many_points_it_does_not_show():
    pts = torch.zeros(100, 2)
    pts[:7, 0] = 50.0                                        # 7 far-away samples a [-3, 3] panel hides
    fig = plotting.scatter_panels({"far": pts, "near": torch.zeros(10, 2)}, lim=3.0)
    titles = [ax.get_title() for ax in fig.axes]
    assert "far\n7/100 outside the window" in titles
    assert "near" in titles
    matplotlib.pyplot.close(fig)


@pytest.mark.parametrize("lo, hi", [(0.05, 0.3), (0.8, 3.0), (1e-6, 1.0), (1e-12, 1e3)])
def test_log_ticks_label_only_major_ticks_that_do_not_collide(lo, hi):
    fig, ax = matplotlib.pyplot.subplots(figsize=(4, 3))
    ax.plot([1, 10], [lo, hi])
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    plotting.log_ticks(ax, "y")
    fig.canvas.draw()
    labels = [t for t in ax.get_yticklabels() if t.get_text() and lo <= t.get_position()[1] <= hi]
    assert len(labels) >= 2, f"need at least two labels on [{lo}, {hi}], got {[t.get_text() for t in labels]}"
    assert not any(t.get_text() for t in ax.get_yticklabels(minor=True))
    boxes = sorted((t.get_window_extent() for t in labels), key=lambda b: b.y0)
    for a, b in zip(boxes, boxes[1:]):
        assert a.y1 <= b.y0, f"tick labels overlap on [{lo}, {hi}]: {[t.get_text() for t in labels]}"
    matplotlib.pyplot.close(fig)


def test_log_ticks_rejects_an_unknown_axis():
    fig, ax = matplotlib.pyplot.subplots()
    with pytest.raises(ValueError, match="axis"):
        plotting.log_ticks(ax, "z")
    matplotlib.pyplot.close(fig)


def test_samples_figure_is_labelled_with_contours(tmp_path):
    gm = named_mixture("8gaussians")
    x = gm.sample(200, generator=torch.Generator().manual_seed(0))
    for lp, legend in ((gm.log_prob, "target density"), (None, "kernel density estimate")):
        fig = plotting.samples_figure(x, title="t", log_prob=lp)
        ax = fig.axes[0]
        assert ax.get_xlabel() and ax.get_ylabel()
        assert ax.collections and any(legend in t.get_text() for t in ax.get_legend().get_texts())
        path = plotting.save(fig, tmp_path / "s.png")
        width, height = matplotlib.image.imread(path).shape[1::-1]
        assert width >= 500 and height >= 500, (width, height)   # not a thumbnail
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        plotting.samples_figure(np.zeros((4, 3)))
