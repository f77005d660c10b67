r"""diffusers' deterministic schedulers on sdegen's exact-score problems, for ``sdegen bench solvers``.

A scheduler knows only a discrete VP schedule $\bar\alpha_k$, $k = 0..999$. Any affine SDE is one in
disguise: with $\sigma = s/m$ the VP-normalized state $x/\sqrt{m^2 + s^2}$ has $\bar\alpha = 1/(1 + \sigma^2)$,
and the noise prediction $\hat\epsilon = -s\nabla\log p_t$ is the same in every normalization. So the
peer runs on $\bar\alpha_k = 1/(1 + \sigma(t_k)^2)$ at $t_k = \epsilon + k(T - \epsilon)/999$ (timestep 999 is
$T$, timestep 0 the final time $\epsilon$), with the exact score, from the same $x_T$, with the
scheduler's own defaults (timestep spacing, order, solver type) except ``final_sigmas_type="sigma_min"``
so that it stops at $\epsilon$ like the sdegen methods and the reference. LMS always ends at
$\sigma = 0$: its state one step earlier, at timestep 0 ($t = \epsilon$), is compared.
"""

from __future__ import annotations

import time

import torch

#: peer label -> (diffusers scheduler class name, constructor options)
PEERS = {
    "diffusers DPMSolverMultistep (2M midpoint)": ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "diffusers UniPCMultistep (bh2, order 2)": ("UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}),
    "diffusers DEISMultistep (order 2)": ("DEISMultistepScheduler", {}),
    "diffusers LMSDiscrete (order 4)": ("LMSDiscreteScheduler", {}),
}
N_TRAIN = 1000


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


def run_peer(label: str, sde, score_fn, x_T: torch.Tensor, nfe: int, eps: float = 1e-3):
    r"""One peer run: ``(samples at eps in sdegen's state, nfe, wall seconds)``; the model receives the
    VP-normalized state and returns $\hat\epsilon = -s\nabla\log p_t$ at the scheduler's timestep."""
    import diffusers
    import numpy as np

    name, opts = PEERS[label]
    t, betas = _schedule(sde, eps)
    sched = getattr(diffusers, name)(trained_betas=betas.float().numpy(), num_train_timesteps=N_TRAIN, **opts)
    lms = name == "LMSDiscreteScheduler"
    sched.set_timesteps(nfe + 1 if lms else nfe)
    # diffusers rounds its noise levels to float32; the schedule's own float64 values keep the
    # comparison about the algorithm (the peers' float32 state casts, e.g. DPMSolverMultistep, remain).
    ab64 = 1.0 / (1.0 + sde.sigma(t).square())
    sig64 = ((1 - ab64) / ab64).sqrt()
    steps = sched.timesteps.to(torch.float64)
    levels = torch.from_numpy(np.interp(steps.numpy(), np.arange(N_TRAIN), sig64.numpy()))
    sched.sigmas = torch.cat([levels, sig64[:1] if not lms else levels.new_zeros(1)])
    m_T, s_T = sde.marginal(torch.tensor([sde.T], dtype=torch.float64))
    scale_T = float((m_T.square() + s_T.square()).sqrt())
    # the schedulers' state: VP-normalized x / sqrt(m^2 + s^2); LMS works in sigma space, x / m
    x = x_T / (float(m_T) if lms else scale_T)
    nfe_done = 0
    t0 = time.perf_counter()
    todo = sched.timesteps[:-1] if lms else sched.timesteps
    for k in todo:
        xin = sched.scale_model_input(x, k)
        tk = eps + float(k) * ((sde.T - eps) / (N_TRAIN - 1))
        tt = torch.full((x.shape[0],), tk, dtype=x.dtype)
        m, s = sde.marginal(tt)
        scale = (m.square() + s.square()).sqrt()[:, None]
        eps_hat = -s[:, None] * score_fn(xin * scale, tt)
        nfe_done += 1
        x = sched.step(eps_hat, k, x).prev_sample
    wall = time.perf_counter() - t0
    m_e, s_e = sde.marginal(torch.tensor([eps], dtype=torch.float64))
    if lms:
        # sigma-space state: x / m
        return x * float(m_e), nfe_done, wall
    return x * float((m_e.square() + s_e.square()).sqrt()), nfe_done, wall


def best_lines(result, nfes=(5, 10, 20, 50)) -> list[str]:
    """Markdown: per problem and NFE, the best sdegen ODE method and the best peer by trajectory error."""
    lines = ["## Best sdegen method against the best diffusers peer (ODE trajectory error at eps)", "",
             "| problem | NFE | best sdegen | error | best peer | error |", "|---|---|---|---|---|---|"]
    any_row = False
    for prob in result["problems"]:
        rows = [r for r in prob["rows"] if "traj_err" in r and "tol" not in r.get("knob", {})]
        for n in nfes:
            ours = [r for r in rows if r["nfe"] == n and not r["method"].startswith("diffusers")]
            peers = [r for r in rows if r["nfe"] == n and r["method"].startswith("diffusers")]
            if not ours or not peers:
                continue
            a = min(ours, key=lambda r: r["traj_err"])
            b = min(peers, key=lambda r: r["traj_err"])
            lines.append(f"| {prob['mixture']}/{prob['sde']} | {n} | {a['method']} | {a['traj_err']:.2e} | "
                         f"{b['method']} | {b['traj_err']:.2e} |")
            any_row = True
    return lines + [""] if any_row else []
