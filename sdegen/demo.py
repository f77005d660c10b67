r"""The logic of ``sdegen demo``: train a small score model on a 2-D mixture, then compare samplers.

The data set is one of the oracle's 2-D Gaussian mixtures (default ``"8gaussians"``), so the exact
score $\nabla_x \log p_t$ of every marginal is known: each sampler runs twice, once with the learned
score model and once with the exact score, which separates the error of the *model* from the error
of the *sampler*. Quality is a sliced Wasserstein-2 distance to fresh exact samples, printed next to
the exact-vs-exact value of the same statistic (its noise floor at this sample size, as mean ± sd
over ``floor_sets`` independent exact sets), with 128 random directions
(`sdegen.bench._metrics.sliced_wasserstein`).

Time convention: forward time $t \in [0, T]$, data at $t = 0$; every sampler integrates from $T$
down to ``eps``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .bench._metrics import sliced_wasserstein  # re-exported for the examples

__all__ = ["DemoConfig", "DemoRow", "run_demo", "sliced_wasserstein", "format_table", "demo_methods",
           "noise_floor", "UNDERTRAINED_RATIO"]

DATASETS_2D = ("8gaussians", "anisotropic", "gaussian")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of the demo; [`fast`][sdegen.demo.DemoConfig.fast] shrinks everything for tests (seconds instead of minutes).

    Attributes:
        dataset: a 2-D oracle mixture name (``"8gaussians"``, ``"anisotropic"``, ``"gaussian"``).
        train_steps: optimizer steps for the MLP score model.
        batch_size: training batch size.
        lr: Adam learning rate.
        hidden: MLP width.
        depth: number of residual blocks of the MLP.
        n_train: size of the training set drawn from the mixture.
        n_samples: samples per method (and size of the exact reference set).
        ancestral_steps: DDPM chain length $N$ for ancestral sampling (the VP discretization).
        ddim_steps: DDIM steps on the same chain.
        sde_steps: Euler–Maruyama steps; the PC sampler uses half as many (two evaluations per step).
        rk45_tol: ``rtol`` = ``atol`` of the adaptive RK45 probability-flow solver.
        ema: decay of the exponential moving average of the weights used for sampling.
        n_paths: trajectories drawn in the trajectory figure.
        floor_sets: independent exact sample sets behind the noise floor (mean ± sd).
    """

    dataset: str = "8gaussians"
    train_steps: int = 8000
    batch_size: int = 256
    lr: float = 2e-3
    hidden: int = 128
    depth: int = 3
    n_train: int = 20000
    n_samples: int = 2000
    ancestral_steps: int = 1000
    ddim_steps: int = 50
    sde_steps: int = 500
    rk45_tol: float = 1e-4
    ema: float = 0.995
    n_paths: int = 32
    floor_sets: int = 8

    @classmethod
    def fast(cls, **overrides) -> "DemoConfig":
        """A configuration that runs in seconds (for tests and smoke runs); quality is not the point."""
        base = dict(train_steps=60, batch_size=128, ema=0.9, hidden=32, depth=1, n_train=1024, n_samples=200,
                    ancestral_steps=40, ddim_steps=10, sde_steps=40, rk45_tol=1e-2, n_paths=8, floor_sets=3)
        base.update(overrides)
        return cls(**base)


@dataclass
class DemoRow:
    """One line of the demo's table."""

    method: str
    score: str          # "model" or "exact"
    nfe: int
    seconds: float
    distance: float     # sliced Wasserstein-2 to exact samples
    extra: dict = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def demo_methods(sde, cfg: DemoConfig) -> dict[str, Callable]:
    r"""The samplers the demo compares, as ``{label: run(score_fn, shape, generator) -> (samples, nfe)}``.

    - *DDPM ancestral*: ``method="ancestral"`` on the VP SDE: exactly the DDPM chain
      $x_{i-1} = (x_i + \beta_i\,s_\theta(x_i, t_i))/\sqrt{\alpha_i} + \sqrt{\beta_i}\,z$ with
      $N$ = ``ancestral_steps`` (Ho et al. 2020, Alg. 2, written with the score).
    - *DDIM*: ``DDPM.ddim_sample`` with $\eta = 0$ on the chain ``sde.discretize(N)``, the score
      turned into $\epsilon_\theta = -s(t)\,s_\theta$ (Song, Meng & Ermon 2021, eq. 12).
    - *Euler–Maruyama*: the reverse SDE $dx = [f - g^2 s_\theta]\,dt + g\,d\bar w$.
    - *PC*: reverse-diffusion predictor plus one annealed Langevin corrector step per step,
      $\epsilon = 2\alpha(r\,s(t))^2$ with $r = 0.16$ (Song et al. 2021, Alg. 4).
    - *RK45*: the probability-flow ODE $dx/dt = f - \tfrac12 g^2 s_\theta$, adaptive Dormand–Prince.
    """
    from .sampling import sample
    from .solvers.base import CountingScore

    def via_sample(method: str, **options):
        def run(score_fn, shape, generator):
            res = sample(sde, score_fn, shape, method=method, generator=generator, **options)
            return res.samples, res.nfe
        return run

    ddpm = sde.discretize(cfg.ancestral_steps)

    def ddim(score_fn, shape, generator):
        counted = CountingScore(score_fn)   # the samplers' own counter, with its checks of each score output
        x = ddpm.ddim_sample(ddpm.eps_model_from_score(counted), shape, steps=cfg.ddim_steps, eta=0.0,
                             generator=generator, device=generator.device, dtype=torch.float32)
        return x, counted.nfe

    return {
        "DDPM ancestral": via_sample("ancestral", steps=cfg.ancestral_steps),
        "DDIM": ddim,
        "Euler-Maruyama": via_sample("euler_maruyama", steps=cfg.sde_steps),
        # The annealed corrector: the per-sample signal-to-noise rule takes steps ~ 1/|score|^2, which
        # in 2-D blows up between the modes where the score vanishes (seen as scattered outliers).
        "PC (annealed Langevin)": via_sample("pc", steps=max(cfg.sde_steps // 2, 1), predictor="reverse_diffusion",
                                             corrector="annealed_langevin", snr=0.16, corrector_steps=1),
        "RK45 (ODE)": via_sample("rk45", rtol=cfg.rk45_tol, atol=cfg.rk45_tol),
    }


def _train(cfg: DemoConfig, sde, data: Tensor, device, seed: int, progress: bool):
    from . import nn as snn
    from .parameterization import ScoreModel
    from .training import train

    torch.manual_seed(seed)  # the network's initial weights (training itself takes a generator)
    net = snn.MLP(2, hidden=cfg.hidden, depth=cfg.depth)
    model = ScoreModel(net, sde, parameterization="eps").to(device)
    out = train(model, data, steps=cfg.train_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
                ema=cfg.ema, warmup=min(100, cfg.train_steps // 10), progress=progress)
    return out


def run_demo(out_dir: str | os.PathLike = "outputs/demo", *, config: DemoConfig | None = None,
             device: str | torch.device = "cpu", seed: int = 0, progress: bool = True,
             log: Callable[[str], None] = print) -> dict:
    r"""Train, sample with every method (learned and exact score), write the table and the figures.

    Args:
        out_dir: folder for ``samples.png``, ``trajectories.png``, ``training_loss.png``,
            ``results.json`` and ``table.md`` (created).
        config: [`DemoConfig`][sdegen.demo.DemoConfig] (default: the full demo, about 100 s of CPU on one thread).
        device: where to train and sample.
        seed: seeds data, initial weights, training and every sampler.
        progress: show progress bars.
        log: where the table and progress lines go.

    Returns:
        result (dict): ``{"rows": [...], "floor": float, "floor_sd": float, "train_seconds": float,
            "files": [...], ...}``; each row also records ``outside_window``, its points outside the
            plotted window.
    """
    from . import plotting
    from .oracle import named_mixture
    from .sdes import VPSDE

    cfg = config or DemoConfig()
    if cfg.dataset not in DATASETS_2D:
        raise ValueError(f"dataset must be one of {', '.join(DATASETS_2D)} (a 2-D oracle mixture), got {cfg.dataset!r}")
    device = torch.device(device)
    os.makedirs(out_dir, exist_ok=True)
    gm = named_mixture(cfg.dataset, dtype=torch.float32, device=device)
    gm64 = named_mixture(cfg.dataset, dtype=torch.float64)
    sde = VPSDE()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    data = gm.to("cpu").sample(cfg.n_train, generator=gen).to(device)

    log(f"sdegen demo: training an MLP score model on {cfg.dataset!r} ({cfg.n_train} points, "
        f"{cfg.train_steps} steps, VP SDE, eps-parameterization) on {device}")
    t0 = time.perf_counter()
    trained = _train(cfg, sde, data, device, seed, progress)
    _sync(device)
    train_seconds = time.perf_counter() - t0
    model = trained.model
    model.eval()
    log(f"trained in {train_seconds:.1f} s (final loss {_final_loss(trained.history):.4f})")

    exact_score = gm.score_fn(sde)
    ref = gm.to("cpu").sample(cfg.n_samples, generator=torch.Generator().manual_seed(seed + 10_000)).to(device)
    floor, floor_sd = noise_floor(gm, ref, cfg, seed, device)
    log(f"noise floor: SW2 of {cfg.floor_sets} independent exact sets of {cfg.n_samples} points to the "
        f"reference set: {floor:.4f} ± {floor_sd:.4f} (mean ± sd)")

    shape = (cfg.n_samples, 2)
    rows: list[DemoRow] = []
    panels: dict[str, Tensor] = {}
    methods = demo_methods(sde, cfg)
    lim = 3.2 if cfg.dataset == "8gaussians" else 2.5
    outside: dict[tuple[str, str], int] = {}
    n_runs = 2 * len(methods)
    with torch.no_grad():
        for score_name, score_fn in (("model", model), ("exact", exact_score)):
            for label, run in methods.items():
                g = _generator(device, seed + 1)
                if progress:
                    log(f"  [{len(rows) + 1}/{n_runs}] sampling: {label}, {score_name} score ...")
                beat = _Heartbeat(score_fn, log if progress else None)
                _sync(device)
                t1 = time.perf_counter()
                x, nfe = run(beat, shape, g)
                _sync(device)
                secs = time.perf_counter() - t1
                dist = sliced_wasserstein(x, ref, n_proj=128)
                rows.append(DemoRow(label, score_name, int(nfe), secs, dist))
                outside[(label, score_name)] = plotting.outside_window(x, lim)
                panels[f"{label}\nNFE {nfe}, SW {dist:.3f}"] = x
                if progress:
                    log(f"        {score_name:5s} {label:22s} NFE {nfe:5d}  {secs:7.2f} s  SW2 {dist:.4f}")

        if progress:
            log("  trajectories for the figure ...")
        trajs = _trajectories(sde, model, cfg, device, seed)

    table = format_table(rows, floor, floor_sd)
    log("")
    log(table)
    for line in _caveats(rows, outside, lim, floor, floor_sd, cfg):
        log(line)

    files = []
    fig = plotting.scatter_panels(panels, log_prob=gm64.log_prob, lim=lim, ncols=len(methods),
                                  row_labels=["learned score", "exact score"],
                                  title=f"{cfg.dataset}: {cfg.n_samples} samples per method over the exact "
                                        f"density (SW = sliced Wasserstein-2 to data; exact-vs-exact floor "
                                        f"{floor:.3f} ± {floor_sd:.3f})")
    files.append(plotting.save(fig, os.path.join(out_dir, "samples.png")))
    fig = plotting.trajectory_panels(trajs, log_prob=gm64.log_prob, lim=lim,
                                     title="reverse-time trajectories of the learned model, from noise (t = T) "
                                           "to data (t = eps)")
    files.append(plotting.save(fig, os.path.join(out_dir, "trajectories.png")))
    hist = _history(trained.history)
    if hist:
        fig = plotting.loss_curve(hist, title="training loss (denoising score matching)")
        files.append(plotting.save(fig, os.path.join(out_dir, "training_loss.png")))

    result = {
        "config": asdict(cfg),
        "device": str(device),
        "seed": seed,
        "train_seconds": train_seconds,
        "floor": floor,
        "floor_sd": floor_sd,
        "floor_sets": cfg.floor_sets,
        "rows": [dict(asdict(r), outside_window=outside[(r.method, r.score)]) for r in rows],
        "window": lim,
    }
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    files += [os.path.join(out_dir, "results.json"), os.path.join(out_dir, "table.md")]
    result["files"] = files
    log(f"wrote {', '.join(files)}")
    return result


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _history(history) -> list[float]:
    if history is None:
        return []
    out = []
    for h in history:
        if isinstance(h, dict):
            h = h.get("loss", float("nan"))
        out.append(float(h))
    return out


def _final_loss(history) -> float:
    h = _history(history)
    if not h:
        return float("nan")
    tail = h[-min(len(h), 50):]
    return sum(tail) / len(tail)


def _trajectories(sde, model, cfg: DemoConfig, device, seed: int) -> dict[str, list]:
    """Reverse trajectories of a few samples: the stochastic reverse SDE and the deterministic ODE."""
    from .sampling import sample

    shape = (cfg.n_paths, 2)
    x_T = sde.prior_sample(shape, generator=_generator(device, seed + 2), device=device, dtype=torch.float32)
    em = sample(sde, model, shape, method="euler_maruyama", steps=min(cfg.sde_steps, 200), x_T=x_T,
                generator=_generator(device, seed + 3), return_trajectory=True)
    ode = sample(sde, model, shape, method="ode_heun", steps=min(cfg.sde_steps, 100), x_T=x_T,
                 return_trajectory=True)
    return {"reverse SDE (Euler-Maruyama)": em.trajectory, "probability-flow ODE (Heun)": ode.trajectory}


def format_table(rows: list[DemoRow], floor: float | None = None, floor_sd: float | None = None) -> str:
    """A Markdown table: method, score, NFE, wall time, distance to data (and the noise floor, mean ± sd)."""
    lines = ["| method | score | NFE | wall time (s) | SW2 to data |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.method} | {r.score} | {r.nfe} | {r.seconds:.2f} | {r.distance:.4f} |")
    if floor is not None:
        spread = "" if floor_sd is None else f" ± {floor_sd:.4f}"
        lines.append(f"| exact samples (noise floor, mean ± sd) | - | - | - | {floor:.4f}{spread} |")
    return "\n".join(lines)


def noise_floor(gm, ref: Tensor, cfg: DemoConfig, seed: int, device) -> tuple[float, float]:
    r"""Mean and sample standard deviation of SW2(exact set $k$, ``ref``) over ``cfg.floor_sets`` sets.

    This is exactly what each sampler row measures (``n_samples`` points against the same reference
    set), with a perfect sampler: a row within about two sd of the mean is indistinguishable from
    exact sampling at this sample size. One pair alone varies by tens of percent, hence the spread.

    Args:
        gm (GaussianMixture): the exact mixture (``sample(n, generator=...)``).
        ref: ``(n_samples, 2)`` the reference set every row is compared with.
        cfg: the demo settings (``n_samples``, ``floor_sets``).
        seed: the demo seed (set $k$ uses seed ``seed + 20000 + k``).
        device (torch.device | str): where the distances are computed.

    Returns:
        floor (tuple[float, float]): ``(mean, sd)``; sd is 0 for a single set.
    """
    d = torch.tensor([sliced_wasserstein(gm.to("cpu").sample(cfg.n_samples, generator=torch.Generator().manual_seed(
        seed + 20_000 + k)).to(device), ref, n_proj=128) for k in range(cfg.floor_sets)], dtype=torch.float64)
    return float(d.mean()), float(d.std()) if len(d) > 1 else 0.0


#: A learned-score row this many times the noise floor means the model, not the sampler, dominates
#: what the figure shows (rows with the exact score sit at 1-1.5x the floor; the default training
#: gives 1-2.5x). Used for the "undertrained" warning.
UNDERTRAINED_RATIO = 3.0


def _caveats(rows: list[DemoRow], outside: dict, lim: float, floor: float, floor_sd: float,
             cfg: DemoConfig) -> list[str]:
    """Notes a reader of the figure needs: points it does not show, and a model too weak to judge samplers by."""
    notes = []
    for r in rows:
        k = outside[(r.method, r.score)]
        if k:
            notes.append(f"note: {r.method} ({r.score} score): {k} of {cfg.n_samples} samples lie outside the "
                         f"plotted window [-{lim}, {lim}]^2; the figure does not show them, SW2 counts them")
    bad = [r for r in rows if r.score == "model" and not r.distance <= UNDERTRAINED_RATIO * floor]
    if bad:
        worst = ", ".join(f"{r.method} {r.distance:.3g}" for r in bad)
        notes.append(f"warning: the learned score is undertrained for this figure: SW2 > {UNDERTRAINED_RATIO:g}x "
                     f"the noise floor ({floor:.3f} ± {floor_sd:.3f}) for {worst}. The rows compare the model's "
                     f"errors, not the samplers; train longer (--train-steps, now {cfg.train_steps}).")
    return notes


class _Heartbeat:
    """Wraps a score function and logs a progress line at most every ``every`` seconds of sampling.

    Sampling prints nothing else while it runs, and on a busy machine one sampler can take minutes.
    The line is written from inside a score call, so it costs one host read of ``t`` per line only.
    """

    def __init__(self, score_fn: Callable, log: Callable[[str], None] | None, every: float = 5.0):
        self.score_fn, self.log, self.every = score_fn, log, every
        self.calls = 0
        self.start = self.last = time.monotonic()

    def __call__(self, x: Tensor, t, **kwargs) -> Tensor:
        self.calls += 1
        if self.log is not None:
            now = time.monotonic()
            if now - self.last >= self.every:
                self.last = now
                t0 = float(t.reshape(-1)[0]) if isinstance(t, Tensor) else float(t)
                self.log(f"        ... {self.calls} score calls, t = {t0:.3f}, {now - self.start:.0f} s")
        return self.score_fn(x, t, **kwargs)

