r"""diffusers' deterministic schedulers on sdegen's exact-score problems, for ``sdegen bench solvers``.

A scheduler knows only a discrete VP schedule $\bar\alpha_k$, $k = 0..999$. Any affine SDE is one in
disguise: with $\sigma = s/m$ the VP-normalized state $x/\sqrt{m^2 + s^2}$ has $\bar\alpha = 1/(1 + \sigma^2)$,
and the noise prediction $\hat\epsilon = -s\nabla\log p_t$ is the same in every normalization. So the
peer runs on $\bar\alpha_k = 1/(1 + \sigma(t_k)^2)$ at $t_k = \epsilon + k(T - \epsilon)/999$ (timestep 999 is
$T$, timestep 0 the final time $\epsilon$; $\bar\alpha$ in float64), with the exact score at the time of
each of the scheduler's noise levels, from the same $x_T$, with
``final_sigmas_type="sigma_min"`` so that it stops at $\epsilon$ like the sdegen methods and the reference.
LMS always ends at $\sigma = 0$: its state one step earlier, at timestep 0 ($t = \epsilon$), is compared.

[`PEERS`][sdegen.bench.peers.PEERS] are the four schedulers with their defaults; [`sweep_configs`][sdegen.bench.peers.sweep_configs]
gives each of them the freedom sdegen's methods get from ``grid=`` and their orders: solver order,
solver type, data or noise prediction and every spacing that starts at $T$ and ends at $\epsilon$
(``linspace``, ``trailing``, Karras, exponential, beta and, for DPMSolverMultistep, Lu's uniform-λ
sigmas). ``timestep_spacing="leading"`` is left out: its first timestep is below 999, so it would
integrate a prior draw from a later time than $T$ (a different problem, not a different grid).

Only deterministic schedulers are compared: the error measured is the distance to the exact
probability-flow solution from the same $x_T$, which a stochastic sampler does not approximate. The
stochastic schedulers (EulerAncestral, ``sde-dpmsolver++``, SASolver, KDPM2Ancestral) equal sdegen's
``euler_ancestral``, ``sde_dpm_solver``, ``sa_solver`` and ``dpm2_ancestral`` on the same grid and noise
(``tests/test_peer_parity_stochastic.py``), so on distribution metrics they can only tie.
"""

from __future__ import annotations

import time

import torch

#: peer label -> (diffusers scheduler class name, constructor options): the defaults
PEERS = {
    "diffusers DPMSolverMultistep (2M midpoint)": ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "diffusers UniPCMultistep (bh2, order 2)": ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "diffusers DEISMultistep (order 2)": ("DEISMultistepScheduler", {}),
    "diffusers LMSDiscrete (order 4)": ("LMSDiscreteScheduler", {}),
}
N_TRAIN = 1000

#: spacing label -> scheduler options (``lu_lambdas`` only for DPMSolverMultistep)
SPACINGS = {
    "linspace": {},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "beta": {"use_beta_sigmas": True},
    "lu_lambdas": {"use_lu_lambdas": True},
}


def sweep_configs() -> list[tuple[str, str, str, dict]]:
    r"""Every peer configuration of the sweep: ``(label, spacing, class name, options)``.

    DPMSolverMultistep: orders 2 and 3, ``solver_type`` midpoint and heun, ``algorithm_type``
    ``dpmsolver++`` and ``dpmsolver``; UniPCMultistep: orders 1-3, bh1 and bh2, data and noise
    prediction; DEISMultistep: orders 1-3; LMSDiscrete (order 4); each on every spacing of `SPACINGS`
    (``lu_lambdas`` for DPMSolverMultistep only).
    """
    out = []
    base = [("DPMSolverMultistepScheduler", f"DPM-{o}M {st} {alg}",
             {"solver_order": o, "solver_type": st, "algorithm_type": alg, "final_sigmas_type": "sigma_min"})
            for o in (2, 3) for st in ("midpoint", "heun") for alg in ("dpmsolver++", "dpmsolver")]
    base += [("UniPCMultistepScheduler", f"UniPC-{o} {v} {'x0' if x0 else 'eps'}",
              {"solver_order": o, "solver_type": v, "predict_x0": x0, "final_sigmas_type": "sigma_min"})
             for o in (1, 2, 3) for v in ("bh1", "bh2") for x0 in (True, False)]
    base += [("DEISMultistepScheduler", f"DEIS-{o}", {"solver_order": o}) for o in (1, 2, 3)]
    base += [("LMSDiscreteScheduler", "LMS-4", {})]
    for name, label, opts in base:
        for sp, sp_opts in SPACINGS.items():
            if sp == "lu_lambdas" and name != "DPMSolverMultistepScheduler":
                continue
            out.append((label, sp, name, {**opts, **sp_opts}))
    return out


def available() -> bool:
    """Whether diffusers is importable (the peers are skipped otherwise)."""
    try:
        import diffusers  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means: no peers
        return False
    return True


def _schedule(sde, eps: float):
    t = eps + torch.arange(N_TRAIN, dtype=torch.float64) * ((sde.T - eps) / (N_TRAIN - 1))
    ab = 1.0 / (1.0 + sde.sigma(t).square())
    betas = 1.0 - ab / torch.cat([ab.new_ones(1), ab[:-1]])
    return t, betas


_SPACING_KEYS = ("timestep_spacing", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas")


def _prepare(name: str, opts: dict, sde, nfe: int, eps: float):
    r"""The scheduler set to ``nfe`` evaluations with float64 levels, the model times, their number, and
    whether it is LMS (which ends at sigma = 0)."""
    import diffusers
    import numpy as np

    t, betas = _schedule(sde, eps)
    spacing = {k: v for k, v in opts.items() if k in _SPACING_KEYS}
    sched = getattr(diffusers, name)(trained_betas=betas.float().numpy(), num_train_timesteps=N_TRAIN,
                                     **{k: v for k, v in opts.items() if k not in _SPACING_KEYS})
    # The spacings computed from sigmas (Karras, exponential, beta, Lu) take log sigma_min; in float32 the
    # smallest sigma of sub-VP and VE rounds to 0 (alpha_bar = 1 - 1e-8 is 1.0), so the schedule's
    # alpha_bar is set in float64 before the spacing options and the timesteps.
    ab64 = 1.0 / (1.0 + sde.sigma(t).square())
    sched.alphas_cumprod = ab64.clone()
    for attr, value in (("alpha_t", ab64.sqrt()), ("sigma_t", (1 - ab64).sqrt())):
        if hasattr(sched, attr):
            setattr(sched, attr, value)
    if hasattr(sched, "lambda_t"):
        sched.lambda_t = ab64.sqrt().log() - (1 - ab64).sqrt().log()
    sched.register_to_config(**spacing)
    lms = name == "LMSDiscreteScheduler"
    sched.set_timesteps(nfe + 1 if lms else nfe)
    sig64 = ((1 - ab64) / ab64).sqrt()
    sig = sched.sigmas.to(torch.float64).clone()
    n_model = len(sched.timesteps) - (1 if lms else 0)
    if not any(k.startswith("use_") and v for k, v in spacing.items()):
        # timestep spacings: the float64 levels of those timesteps (diffusers rounds them to float32)
        steps = sched.timesteps.to(torch.float64).numpy()
        sig[:len(steps)] = torch.from_numpy(np.interp(steps, np.arange(N_TRAIN), sig64.numpy()))
    if not lms:
        sig[-1] = sig64[0]  # final_sigmas_type="sigma_min" (DEIS: always): the level of eps
    first, last = float(sig64[-1]), float(sig64[0])
    # LMS ends at sigma = 0; the state one step earlier (after the last model call) must be at eps
    bad_last = lms and abs(float(sig[n_model]) / last - 1) > 1e-4
    if abs(float(sig[0]) / first - 1) > 1e-4 or bad_last:
        raise ValueError(f"{name} {opts}: noise levels {float(sig[0]):.4g} .. {float(sig[n_model]):.4g} do not run "
                         f"from sigma(T) = {first:.4g} to sigma(eps) = {last:.4g}")
    sig[0] = first
    if lms:
        sig[n_model] = last
    sched.sigmas = sig
    t_model = sde.t_from_sigma(sig[:n_model]).to(torch.float64).clamp(eps, sde.T)
    t_model[0] = sde.T
    return sched, t_model, n_model, lms


def scheduler_times(name: str, opts: dict, sde, nfe: int, eps: float = 1e-3) -> torch.Tensor:
    r"""The peer's time grid as sdegen times: ``(nfe + 1,)`` float64, from ``T`` down to ``eps`` (the times of
    its model evaluations, then ``eps``), e.g. to run an sdegen method on exactly the peer's grid."""
    _, t_model, _, _ = _prepare(name, opts, sde, nfe, eps)
    return torch.cat([t_model, t_model.new_tensor([eps])])


def run_scheduler(name: str, opts: dict, sde, score_fn, x_T: torch.Tensor, nfe: int, eps: float = 1e-3):
    r"""One run of diffusers' scheduler ``name`` with ``opts``: ``(samples at eps in sdegen's state, nfe, wall s)``.

    The scheduler's own noise levels $\sigma_k$ are its grid; the model is evaluated at the exact time
    $t = \sigma^{-1}(\sigma_k)$ of each (diffusers would round to an integer timestep, which with the
    sigma-based spacings can give two steps the same timestep), receives the VP-normalized state and
    returns $\hat\epsilon = -s\nabla\log p_t$.

    Raises:
        ValueError: the configuration does not start at $T$ or, for LMS, its last model evaluation is
            not at $\epsilon$: it would solve a different problem.
    """
    sched, t_model, n_model, lms = _prepare(name, opts, sde, nfe, eps)
    m_T, s_T = sde.marginal(torch.tensor([sde.T], dtype=torch.float64))
    scale_T = float((m_T.square() + s_T.square()).sqrt())
    # the schedulers' state: VP-normalized x / sqrt(m^2 + s^2); LMS works in sigma space, x / m
    x = x_T / (float(m_T) if lms else scale_T)
    t0 = time.perf_counter()
    for i, k in enumerate(sched.timesteps[:n_model]):
        xin = sched.scale_model_input(x, k)
        tt = torch.full((x.shape[0],), float(t_model[i]), dtype=x_T.dtype)
        m, s = sde.marginal(tt)
        scale = (m.square() + s.square()).sqrt()[:, None]
        eps_hat = -s[:, None] * score_fn(xin.to(x_T.dtype) * scale, tt)
        x = sched.step(eps_hat, k, x).prev_sample
    wall = time.perf_counter() - t0
    m_e, s_e = sde.marginal(torch.tensor([eps], dtype=torch.float64))
    if lms:
        # sigma-space state: x / m
        return x.to(x_T.dtype) * float(m_e), n_model, wall
    return x.to(x_T.dtype) * float((m_e.square() + s_e.square()).sqrt()), n_model, wall


def run_peer(label: str, sde, score_fn, x_T: torch.Tensor, nfe: int, eps: float = 1e-3):
    r"""The default peer ``label`` of `PEERS`: ``(samples at eps in sdegen's state, nfe, wall seconds)``."""
    name, opts = PEERS[label]
    return run_scheduler(name, opts, sde, score_fn, x_T, nfe, eps)
