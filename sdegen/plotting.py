r"""Figures in one consistent style: samples over density contours, sample grids, trajectories, error vs NFE.

Every function draws with matplotlib's non-interactive ``Agg`` backend (selected on import here,
so figures work on headless machines), takes tensors or arrays on any device (copied to the host
once, at the end of the work), and returns the ``matplotlib.figure.Figure`` it made; [`save`][sdegen.plotting.save]
writes it as PNG and closes it. Nothing here is imported by the library core (front ends only).

Time convention in trajectory plots: forward time $t \in [0, T]$ with data at $t = 0$; a reverse
trajectory starts at $t = T$ (noise) and ends near $t = \varepsilon$ (data).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless and deterministic; front ends never need a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

__all__ = [
    "STYLE",
    "to_numpy",
    "density_grid",
    "plot_density",
    "scatter_panels",
    "outside_window",
    "samples_figure",
    "trajectory_panels",
    "loss_curve",
    "sample_grid",
    "error_vs_nfe",
    "log_ticks",
    "save",
]

#: Shared matplotlib settings: every sdegen figure is drawn inside ``plt.rc_context(STYLE)``.
STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.grid": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "Blues",
}

_SAMPLE_COLOR = "#d62728"  # red points on blue contours stay readable in greyscale prints too
_DATA_COLOR = "#1f77b4"


def to_numpy(x) -> np.ndarray:
    """A float64 NumPy copy of a tensor (any device) or array-like."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def density_grid(log_prob: Callable[[torch.Tensor], torch.Tensor], lim: float, n: int = 120):
    r"""Evaluate $p(x) = \exp \log p(x)$ on an ``n`` x ``n`` grid over $[-\text{lim}, \text{lim}]^2$.

    Args:
        log_prob: ``(B, 2) -> (B,)`` log-density (e.g. ``GaussianMixture.log_prob``), called once
            on float64 CPU points.
        lim: half-width of the square window.
        n: grid points per axis.

    Returns:
        grid (tuple[numpy.ndarray, numpy.ndarray, numpy.ndarray]): ``(X, Y, P)`` arrays of shape ``(n, n)`` for ``contour``/``contourf``.
    """
    xs = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(xs, xs, indexing="xy")
    pts = torch.stack([X.reshape(-1), Y.reshape(-1)], 1)
    with torch.no_grad():
        P = log_prob(pts).exp().reshape(n, n)
    return to_numpy(X), to_numpy(Y), to_numpy(P)


def plot_density(ax, grid, *, filled: bool = True) -> None:
    """Draw the target density from [`density_grid`][sdegen.plotting.density_grid] as shaded contours (the background)."""
    X, Y, P = grid
    levels = np.linspace(0.0, P.max(), 8)[1:]  # skip level 0: it would shade the whole panel
    if filled:
        ax.contourf(X, Y, P, levels=np.concatenate([levels, [P.max() * 1.01]]), cmap="Blues", alpha=0.55)
    ax.contour(X, Y, P, levels=levels, colors=_DATA_COLOR, linewidths=0.5, alpha=0.8)


def _square(ax, lim: float) -> None:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_xticks([-math.floor(lim), 0, math.floor(lim)])
    ax.set_yticks([-math.floor(lim), 0, math.floor(lim)])


def outside_window(points, lim: float) -> int:
    r"""How many 2-D points lie outside the square $[-\text{lim}, \text{lim}]^2$ (non-finite ones count).

    Args:
        points (Tensor | numpy.ndarray): ``(N, 2)`` points.
        lim: half-width of the window.

    Returns:
        count (int): the number of points a panel of half-width ``lim`` does not show.
    """
    pts = to_numpy(points)
    inside = np.isfinite(pts).all(axis=1) & (np.abs(pts) <= lim).all(axis=1)
    return int(len(pts) - inside.sum())


def scatter_panels(panels: Mapping[str, object], *, log_prob=None, lim: float = 3.0, ncols: int | None = None,
                   max_points: int = 2000, title: str | None = None, row_labels: Sequence[str] | None = None):
    r"""One 2-D scatter panel per entry, each over the target density's contours.

    Args:
        panels: ``{panel title: samples (N, 2)}`` in display order (a ``None`` value leaves the
            panel blank, e.g. a method that does not apply).
        log_prob (Callable | None): optional target log-density ``(B, 2) -> (B,)`` drawn as contours behind every panel.
        lim: half-width of each square panel.
        ncols: panels per row (default: all in one row).
        max_points: at most this many points per panel (the first ones), so panels stay comparable.
        title: figure title.
        row_labels: optional label per row, written left of the row's first panel.

    Returns:
        fig (matplotlib.figure.Figure): the figure. A panel whose points fall outside the window
            (or are not finite) says how many in its title, so a clean-looking panel cannot hide
            far-away samples; [`outside_window`][sdegen.plotting.outside_window] counts them.
    """
    names = list(panels)
    if not names:
        raise ValueError("panels must name at least one set of samples, got an empty mapping")
    ncols = ncols or len(names)
    nrows = math.ceil(len(names) / ncols)
    grid = density_grid(log_prob, lim) if log_prob is not None else None
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.4 * nrows), squeeze=False)
        for ax in axes.flat:
            ax.set_visible(False)
        for k, name in enumerate(names):
            ax = axes.flat[k]
            ax.set_visible(True)
            if grid is not None:
                plot_density(ax, grid)
            pts = panels[name]
            label = name
            if pts is not None:
                pts = to_numpy(pts)[:max_points]
                ax.scatter(pts[:, 0], pts[:, 1], s=2.0, c=_SAMPLE_COLOR, alpha=0.6, linewidths=0)
                out = outside_window(pts, lim)
                if out:
                    label = f"{name}\n{out}/{len(pts)} outside the window"
            else:
                ax.text(0.5, 0.5, "n/a", ha="center", va="center", transform=ax.transAxes, color="0.4")
            ax.set_title(label, color="#b00000" if label != name else "black")
            _square(ax, lim)
        if row_labels is not None:
            for r, label in enumerate(row_labels[:nrows]):
                axes[r, 0].set_ylabel(label, fontsize=10, fontweight="bold")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def samples_figure(samples, *, title: str | None = None, log_prob=None, lim: float | None = None,
                   max_points: int = 20000):
    r"""One labelled 2-D scatter of samples over density contours (what ``sdegen sample --out x.png`` writes).

    With ``log_prob`` the contours are the target density (e.g. an oracle mixture); without it, a
    Gaussian kernel density estimate of the samples themselves (Scott's bandwidth, on at most 2000
    points), and the legend says which. Points outside the window are counted in the title.

    Args:
        samples (Tensor | numpy.ndarray): ``(N, 2)`` samples.
        title: figure title (the count of points outside the window is appended when non-zero).
        log_prob (Callable | None): optional target log-density ``(B, 2) -> (B,)``.
        lim: half-width of the square window (default: the 99.5 % quantile of $|x|$, rounded up to
            a half, at least 1).
        max_points: at most this many points are drawn (the first ones).

    Returns:
        fig (matplotlib.figure.Figure): a 5.5 x 5.5 inch figure (about 600 px at the style's dpi).
    """
    pts = to_numpy(samples)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) == 0:
        raise ValueError(f"samples must have shape (N, 2) with N >= 1, got {pts.shape}")
    finite = pts[np.isfinite(pts).all(axis=1)]
    if lim is None:
        q = float(np.quantile(np.abs(finite), 0.995)) if len(finite) else 1.0
        lim = max(1.0, math.ceil(2 * q * 1.05) / 2)
    out = outside_window(pts, lim)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.5, 5.5))
        if log_prob is not None:
            plot_density(ax, density_grid(log_prob, lim))
            contour_label = "target density"
        elif len(finite) >= 10:
            from scipy.stats import gaussian_kde

            kde = gaussian_kde(finite[:2000].T)
            X, Y, P = density_grid(lambda z: torch.from_numpy(np.log(np.maximum(kde(z.numpy().T), 1e-300))), lim)
            plot_density(ax, (X, Y, P), filled=False)
            contour_label = "kernel density estimate of the samples"
        else:
            contour_label = None
        shown = pts[:max_points]
        ax.scatter(shown[:, 0], shown[:, 1], s=3.0, c=_SAMPLE_COLOR, alpha=0.5, linewidths=0,
                   label=f"{len(shown)} samples")
        if contour_label:
            ax.plot([], [], color=_DATA_COLOR, lw=0.8, label=f"contours: {contour_label}")
        _square(ax, lim)
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
        full = title or ""
        if out:
            full += f"{chr(10) if full else ''}{out} of {len(pts)} points outside the window"
        if full:
            ax.set_title(full)
        fig.tight_layout()
    return fig


def trajectory_panels(trajectories: Mapping[str, Sequence[tuple[float, object]]], *, log_prob=None,
                      lim: float = 3.0, n_paths: int = 24, title: str | None = None):
    r"""Reverse-time trajectories in 2-D: one row per sampler, the paths in the plane (left) and the
    first coordinate against time (right).

    Args:
        trajectories: ``{row title: [(t, x), ...]}``, snapshots with ``x`` of shape ``(B, 2)`` as in
            ``SampleResult.trajectory``, ordered from $t = T$ (noise) to $t \approx 0$ (data).
        log_prob (Callable | None): optional data log-density drawn as contours behind the paths.
        lim: half-width of the 2-D window.
        n_paths: number of paths drawn per row (the first ones).
        title: figure title.

    Returns:
        fig (matplotlib.figure.Figure): the figure.
    """
    if not trajectories:
        raise ValueError("trajectories must name at least one trajectory, got an empty mapping")
    grid = density_grid(log_prob, lim) if log_prob is not None else None
    rows = list(trajectories.items())
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(rows), 2, figsize=(8.0, 3.3 * len(rows)), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 1.4]})
        for (name, traj), (a0, a1) in zip(rows, axes):
            if len(traj) < 2:
                raise ValueError(f"trajectory {name!r} must hold at least 2 snapshots, got {len(traj)}")
            ts = np.array([float(t) for t, _ in traj])
            xs = np.stack([to_numpy(x)[:n_paths] for _, x in traj])  # (S, P, 2)
            colors = plt.get_cmap("viridis")(np.linspace(0, 1, xs.shape[1]))
            if grid is not None:
                plot_density(a0, grid, filled=False)
            for p in range(xs.shape[1]):
                a0.plot(xs[:, p, 0], xs[:, p, 1], lw=0.6, color=colors[p], alpha=0.8)
                a1.plot(ts, xs[:, p, 0], lw=0.6, color=colors[p], alpha=0.8)
            a0.scatter(xs[0, :, 0], xs[0, :, 1], s=9, marker="o", facecolors="none", edgecolors="0.35",
                       linewidths=0.7, label=f"start: noise, t = {ts[0]:.2g}", zorder=3)
            a0.scatter(xs[-1, :, 0], xs[-1, :, 1], s=10, c=_SAMPLE_COLOR, label=f"end: sample, t = {ts[-1]:.2g}",
                       zorder=3)
            a0.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=2, frameon=False, fontsize=7)
            _square(a0, lim)
            a0.set_title(name)
            a1.set_xlim(ts.max(), ts.min())  # sampling runs from T (left) to eps (right)
            a1.set_xlabel("forward time t (sampling runs from left to right)")
            a1.set_ylabel("first coordinate $x_1$")
            a1.set_title(f"{name}: $x_1$ against t")
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    return fig


def loss_curve(losses: Sequence[float], *, title: str | None = None, smooth: int = 50):
    """Training loss per step (light) and its running mean over ``smooth`` steps (dark).

    Returns:
        fig (matplotlib.figure.Figure): the figure.
    """
    y = np.asarray(losses, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise ValueError(f"losses must be a non-empty 1-D sequence, got shape {y.shape}")
    k = max(1, min(smooth, y.size))
    run = np.convolve(y, np.ones(k) / k, mode="valid")
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 3.0))
        ax.plot(np.arange(1, y.size + 1), y, lw=0.5, color=_DATA_COLOR, alpha=0.35, label="per step")
        ax.plot(np.arange(k, y.size + 1), run, lw=1.4, color=_DATA_COLOR, label=f"mean of {k} steps")
        ax.set_xlabel("training step")
        ax.set_ylabel("loss")
        if np.all(y > 0):
            ax.set_yscale("log")
            log_ticks(ax, "y")
        ax.legend(frameon=False)
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def sample_grid(images, *, nrow: int | None = None, value_range: tuple[float, float] = (-1.0, 1.0),
                title: str | None = None, cmap: str = "gray"):
    r"""A grid of images ``(N, C, H, W)`` (C = 1 or 3), scaled from ``value_range`` to [0, 1].

    Returns:
        fig (matplotlib.figure.Figure): the figure.
    """
    arr = to_numpy(images)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape (N, C, H, W) with C in (1, 3), got {arr.shape}")
    lo, hi = value_range
    arr = np.clip((arr - lo) / (hi - lo), 0.0, 1.0)
    n = arr.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    _, c, h, w = arr.shape
    pad = 1
    canvas = np.ones((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c))
    for k in range(n):
        r, q = divmod(k, ncol)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = \
            arr[k].transpose(1, 2, 0)
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(0.45 * ncol + 0.4, 0.45 * nrow + 0.4))
        ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap=cmap if c == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_axis_off()
        if title:
            ax.set_title(title)
    return fig


def error_vs_nfe(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, ylabel: str,
                 floor: float | None = None, floor_label: str = "exact-vs-exact noise floor",
                 title: str | None = None, logy: bool = True):
    r"""Error against the number of score evaluations (NFE), one line per method, log-log axes.

    Args:
        curves: ``{method: (nfe values, error values)}``.
        ylabel: what the error is (e.g. "sliced Wasserstein to data").
        floor: optional noise floor: the error between two exact sample sets of the same size, below
            which differences are noise. A float draws a line; ``(low, mean, high)`` draws the mean as a
            line over a shaded band (e.g. the range over several exact-vs-exact pairs).
        title: figure title.
        logy: log scale on the error axis.

    Returns:
        fig (matplotlib.figure.Figure): the figure.
    """
    with plt.rc_context(STYLE):
        fig, ax = plt.subplots(figsize=(7.2, 3.8))
        markers = "osD^v<>ph*"
        for k, (name, (nfe, err)) in enumerate(curves.items()):
            order = np.argsort(np.asarray(nfe, dtype=float))
            ax.plot(np.asarray(nfe, dtype=float)[order], np.asarray(err, dtype=float)[order],
                    marker=markers[k % len(markers)], ms=4, lw=1.2, label=name)
        if floor is not None:
            lo, mid, hi = (floor, floor, floor) if np.ndim(floor) == 0 else floor
            ax.axhline(mid, color="0.3", ls="--", lw=0.9, label=floor_label)
            if hi > lo:
                ax.axhspan(lo, hi, color="0.5", alpha=0.15, lw=0)
        ax.set_xscale("log")
        if logy:
            ax.set_yscale("log")
        log_ticks(ax)
        ax.set_xlabel("score evaluations (NFE)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: curves stay visible
        if title:
            ax.set_title(title)
        fig.tight_layout()
    return fig


def log_ticks(ax, axis: str = "both") -> None:
    r"""Readable tick labels on the log-scaled axes of ``ax``: call after the data are drawn.

    Matplotlib labels the minor ticks of a log axis spanning less than about one decade, and its
    labels then collide. Here minor ticks stay unlabelled; labels sit at $1, 2, 5 \times 10^k$ when the
    axis spans at most two decades, else at the powers of the base only (every other one beyond
    eight decades), written as plain numbers (``0.02``, ``500``, ``1e-06``).

    Args:
        ax (matplotlib.axes.Axes): the axes to fix.
        axis: ``"x"``, ``"y"`` or ``"both"``; axes that are not log-scaled are left alone.
    """
    from matplotlib import ticker

    if axis not in ("x", "y", "both"):
        raise ValueError(f"axis must be 'x', 'y' or 'both', got {axis!r}")
    for name in ("x", "y") if axis == "both" else (axis,):
        target = ax.xaxis if name == "x" else ax.yaxis
        if target.get_scale() != "log":
            continue
        lo, hi = sorted(ax.get_xlim() if name == "x" else ax.get_ylim())
        base = getattr(target.get_transform(), "base", 10.0)
        decades = math.log(hi / lo, base) if lo > 0 and hi > lo else 1.0
        subs = (1.0, 2.0, 5.0) if base == 10 and decades <= 2 else (1.0,)
        target.set_major_locator(ticker.LogLocator(base=base, subs=subs, numticks=12))
        target.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        target.set_minor_formatter(ticker.NullFormatter())
        if decades > 8:
            ticks = [t for t in target.get_major_locator().tick_values(lo, hi) if lo <= t <= hi]
            target.set_major_locator(ticker.FixedLocator(ticks[::2]))


def save(fig, path: str | os.PathLike) -> str:
    """Write ``fig`` as PNG to ``path`` (parent folders created) and close it. Returns the path."""
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
