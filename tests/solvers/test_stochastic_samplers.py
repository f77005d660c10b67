r"""Stochastic and single-step samplers: exact distributions with power, weak orders, identities.

Methods: SDE-DPM-Solver++, SA-Solver, Euler and DPM-2 ancestral, DPM-2, Restart, single-step
DPM-Solver(++) and dpm_fast.

With the exact score of a Gaussian mixture (``GaussianMixture.score_fn``) every sampler should draw
the data distribution up to its discretization bias, on VP, sub-VP, VE and a user
[`AffineSDE`][sdegen.AffineSDE] whose marginal is computed numerically. The check (``_check``):

* mean: per coordinate $z = (\bar x_j - \mu_j)/\sqrt{\Sigma_{jj}/n}$;
* second moments: per entry the mean of $(x_j - \mu_j)(x_k - \mu_k)$ against $\Sigma_{jk}$, standard error
  $\mathrm{sd}/\sqrt n$ from the sample (CLT);
* shape: Kolmogorov-Smirnov of 4 fixed 1-D projections against the exact projected mixture CDF
  $\sum_k w_k\,\Phi((y - u^\top\mu_k)/\sqrt{u^\top\Sigma_k u})$ (one-sample, exact reference).

Pass: every $|z| < 5$ and every KS $p > 10^{-4}$ (about 9 statistics, false-alarm rate below $10^{-3}$).
Seeds are fixed. Power: the same check must fail when the score is multiplied by 1.1. The fast suite
uses $n = 4000$ (second-moment resolution $5\cdot\mathrm{sd}/\sqrt n \approx 0.1\,\Sigma_{jj}$ for these
mixtures); the slow tests use the issue's $n = 10^4$ and also measure the weak order.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import sdegen
from sdegen.sampling import sample
from sdegen.solvers.base import Dynamics, integrate_fixed_grid
from sdegen.solvers.dpm_solver import DPMSolver
from sdegen.solvers.sde_dpm import SDEDPMSolverPP
from sdegen.solvers.ancestral_k import DPM2, EulerAncestral
from sdegen.solvers.restart import Restart, restart_times
from sdegen.solvers.sa_solver import SASolver
from sdegen.grids import get_grid

F64 = torch.float64
Z_MAX, KS_ALPHA = 5.0, 1e-4


def _user_sde():
    r"""A user AffineSDE, $\beta(t) = 0.1 + 30t^2$, VP-like; marginal by quadrature (no closed form given)."""
    return sdegen.AffineSDE(a=lambda t: -0.5 * (0.1 + 30 * t * t), g=lambda t: (0.1 + 30 * t * t).sqrt())


SDES = {
    "vp": sdegen.VPSDE,
    "subvp": sdegen.SubVPSDE,
    "ve": lambda: sdegen.VESDE(sigma_min=0.01, sigma_max=20.0),
    "user": _user_sde,
}
GM = sdegen.GaussianMixture(means=[[1.0, -0.5], [-1.0, 0.5]], stds=[[0.5, 0.3], [0.4, 0.6]], weights=[0.3, 0.7])


def _check(x: torch.Tensor, gm: sdegen.GaussianMixture, n_proj: int = 4) -> dict:
    x = x.to(F64)
    n, d = x.shape
    mu, cov = gm.mean().to(F64), gm.covariance().to(F64)
    z_mean = (x.mean(0) - mu) / (cov.diagonal() / n).sqrt()
    c = x - mu
    prods = c[:, :, None] * c[:, None, :]
    iu = torch.triu_indices(d, d)
    z_cov = ((prods.mean(0) - cov) / (prods.std(0) / math.sqrt(n)))[iu[0], iu[1]]
    dirs = torch.randn(n_proj, d, generator=torch.Generator().manual_seed(123), dtype=F64)
    dirs = dirs / dirs.norm(dim=1, keepdim=True)
    means, covs, w = gm.means.to(F64), gm.covs.to(F64), gm.weights.to(F64)
    ks = []
    for u in dirs:
        loc = (means @ u).numpy()
        scale = torch.einsum("i,kij,j->k", u, covs, u).sqrt().numpy()

        def cdf(y, loc=loc, scale=scale):
            return sum(wk * stats.norm.cdf(y, lk, sk) for wk, lk, sk in zip(w.tolist(), loc, scale))

        ks.append(stats.kstest((x @ u).numpy(), cdf).pvalue)
    zm, zc = z_mean.abs().max().item(), z_cov.abs().max().item()
    ok = bool(torch.isfinite(x).all()) and zm < Z_MAX and zc < Z_MAX and min(ks) > KS_ALPHA
    return {"ok": ok, "z_mean": zm, "z_cov": zc, "ks_p": min(ks)}


def _draw(sde_name: str, method: str, steps: int, n: int, scale: float = 1.0, seed: int = 3, **opts):
    sde = SDES[sde_name]()
    exact = GM.score_fn(sde)
    score = exact if scale == 1.0 else (lambda x, t: scale * exact(x, t))
    return sample(sde, score, (n, 2), method=method, steps=steps, dtype=F64,
                  generator=torch.Generator().manual_seed(seed), **opts).samples


# (method, steps, options): steps keep the discretization bias well below the check's resolution.
CASES = {
    "sde_dpm_1": ("sde_dpm_solver", 60, {"order": 1}),
    "sde_dpm_2m": ("sde_dpm_solver", 40, {"order": 2}),
    "sde_dpm_3m": ("sde_dpm_solver", 40, {"order": 3}),
    "sde_dpm_2m_eta05": ("sde_dpm_solver", 40, {"order": 2, "eta": 0.5, "solver_type": "midpoint"}),
    "euler_ancestral": ("euler_ancestral", 100, {}),
    "euler_ancestral_eta05": ("euler_ancestral", 100, {"eta": 0.5}),
    "dpm2": ("dpm2", 30, {}),
    "dpm2_ancestral": ("dpm2_ancestral", 100, {}),
    "restart": ("restart", 30, {}),
    "sa_solver": ("sa_solver", 100, {}),
    "sa_solver_3_tau05": ("sa_solver", 40, {"predictor_order": 3, "corrector_order": 3, "tau": 0.5}),
    "dpm_fast": ("dpm_fast", 30, {}),
    "singlestep_sde_2": ("dpm_solver_singlestep", 60, {"eta": 1.0, "order": 2}),
    "singlestep_sde_3": ("dpm_solver_singlestep", 60, {"eta": 1.0, "order": 3, "solver_type": "midpoint"}),
    "restart_k4": ("restart", 20, {"restart_count": 4, "restart_sigma": (0.1, 1.0), "restart_steps": 4}),
}
FAST_N = 4000
# One SDE per case in the fast suite (every SDE appears); the slow suite runs every pair at n = 10^4.
# sde_dpm_1 is the same update as euler_ancestral (test_sde_dpm_1_is_euler_ancestral): slow suite only.
FAST = {"sde_dpm_2m": "vp", "sde_dpm_3m": "user", "sde_dpm_2m_eta05": "ve",
        "euler_ancestral": "subvp", "euler_ancestral_eta05": "user", "dpm2": "ve", "dpm2_ancestral": "vp",
        "restart": "subvp", "restart_k4": "ve", "sa_solver": "user", "sa_solver_3_tau05": "vp",
        "singlestep_sde_2": "ve", "singlestep_sde_3": "subvp", "dpm_fast": "user"}
# First-order samplers need more steps for their O(h) bias to sit below the check's resolution.
FAST_STEPS = {"sde_dpm_1": 200, "sde_dpm_2m": 100, "euler_ancestral": 300}


@pytest.mark.parametrize("case", list(FAST))
def test_exact_distribution_fast(case):
    method, steps, opts = CASES[case]
    res = _check(_draw(FAST[case], method, FAST_STEPS.get(case, steps), FAST_N, **opts), GM)
    assert res["ok"], res


# Power, one case per family: the score x 1.1 must fail the same check (measured |z| 6-60 at n = 4000).
# The slow test below checks the power of every case on every SDE at n = 10^4.
POWER = {"sde_dpm_2m": "vp", "euler_ancestral_eta05": "subvp", "dpm2": "user",
         "restart": "ve", "sa_solver": "subvp", "singlestep_sde_3": "user", "dpm_fast": "vp"}


@pytest.mark.parametrize("case", list(POWER))
def test_check_has_power_fast(case):
    method, steps, opts = CASES[case]
    res = _check(_draw(POWER[case], method, FAST_STEPS.get(case, steps), FAST_N, scale=1.1, **opts), GM)
    assert not res["ok"], res


SLOW_STEPS = {"sde_dpm_1": 400, "sde_dpm_2m": 150, "euler_ancestral": 400, "euler_ancestral_eta05": 200,
              "dpm2_ancestral": 150}


@pytest.mark.slow
@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("case", list(CASES))
def test_exact_distribution_10k(case, sde_name):
    method, steps, opts = CASES[case]
    steps = SLOW_STEPS.get(case, steps)
    res = _check(_draw(sde_name, method, steps, 10_000, **opts), GM)
    assert res["ok"], res
    bad = _check(_draw(sde_name, method, steps, 10_000, scale=1.1, **opts), GM)
    assert not bad["ok"], bad


# ------------------------------------------------------------------------------------ exact weak error
MU, SD, EPS = 0.5, 0.5, 1e-3
G1 = sdegen.GaussianMixture(means=[[MU]], stds=[[SD]])


def _exact_moment_error(sde, make, steps: int) -> float:
    r"""Weak error $|E x - m\mu| + |\operatorname{Var} x - (m^2\sigma_d^2 + s^2)|$ at ``eps`` for data
    $\mathcal N(\mu, \sigma_d^2)$, computed exactly, without Monte Carlo.

    With the exact (linear) score of Gaussian data every step is affine in the state and in its unit
    draws, so the output is $x_N = b + j_0 x_T + \sum_k j_k z_k$: one batch row with all sources 0 gives
    $b$, one row per source set to 1 gives $j$. The start $x_T$ is drawn from the exact $p_T$."""
    times = get_grid("karras", sde, steps, EPS)
    solver, times = make(sde, times)
    n = times.numel() - 1
    x = torch.zeros(n + 2, 1, dtype=F64)
    x[1] = 1.0
    z = torch.zeros(n, n + 2, 1, dtype=F64)
    z[torch.arange(n), torch.arange(n) + 2] = 1.0
    out, _, _ = integrate_fixed_grid(solver, Dynamics(sde, G1.score_fn(sde)), x, times, noise=z)
    out = out[:, 0]
    j = out[1:] - out[0]
    mT, sT = (v[0] for v in sde.marginal(times[:1]))
    mean = out[0] + j[0] * mT * MU
    var = j[0] ** 2 * (mT ** 2 * SD ** 2 + sT ** 2) + j[1:].square().sum()
    me, se = (v[0] for v in sde.marginal(times[-1:]))
    return (abs(mean - me * MU) + abs(var - (me ** 2 * SD ** 2 + se ** 2))).item()


MAKERS = {
    "sde_dpm_1": lambda sde, t: (SDEDPMSolverPP.tabulated(sde, t, order=1), t),
    "sde_dpm_2m": lambda sde, t: (SDEDPMSolverPP.tabulated(sde, t, order=2), t),
    "sde_dpm_2m_midpoint": lambda sde, t: (SDEDPMSolverPP.tabulated(sde, t, order=2, solver_type="midpoint"), t),
    "sde_dpm_2m_eta05": lambda sde, t: (SDEDPMSolverPP.tabulated(sde, t, order=2, eta=0.5), t),
    "euler_ancestral": lambda sde, t: (EulerAncestral.tabulated(sde, t), t),
    "euler_ancestral_eta05": lambda sde, t: (EulerAncestral.tabulated(sde, t, eta=0.5), t),
    "dpm2": lambda sde, t: (DPM2.tabulated(sde, t), t),
    "dpm2_ancestral": lambda sde, t: (DPM2.tabulated(sde, t, ancestral=True), t),
    "sa_solver_2_2": lambda sde, t: (SASolver.tabulated(sde, t), t),
}
# SA-Solver approaches its order more slowly (slopes 2.35, 2.18, 2.14 from 40 to 320 steps on VP).
STEPS = {"sa_solver_2_2": (160, 320, 640)}


@pytest.mark.parametrize("sde_name", ["vp", "ve", pytest.param("user", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(MAKERS))
def test_weak_order_from_exact_moments(name, sde_name):
    """Slope of the log weak error over the step count (80 -> 320 steps, Karras grid) within 0.2 of the order.

    Measured on VP: SDE-DPM-Solver++1 = Euler ancestral 0.92-0.96 (weak order 1); 2M-SDE 2.04-2.09;
    DPM-2 and DPM-2 ancestral 2.04-2.05 (for a Gaussian target the ancestral noise of DPM-2 adds no
    first-order error; weak order 1 is the general bound); SA-Solver (2, 2) with tau = 1: 2.1-2.2 from 160 steps."""
    make = MAKERS[name]
    sde = SDES[sde_name]()
    order = make(sde, get_grid("karras", sde, 8, EPS))[0].order   # the order the solver declares
    errs = [_exact_moment_error(sde, make, n) for n in STEPS.get(name, (80, 160, 320))]
    slope = math.log(errs[0] / errs[2]) / math.log(4)
    assert abs(slope - order) < 0.2, (errs, slope)


def test_3m_sde_beats_2m_sde():
    """3M-SDE shows no clean asymptotic weak order on this problem (its error changes sign near 40-80
    steps); it is measured 15-50x below 2M-SDE at 40-80 steps, which this checks with a 5x margin."""
    sde = sdegen.VPSDE()
    for n in (40, 80):
        e3 = _exact_moment_error(sde, lambda s, t: (SDEDPMSolverPP.tabulated(s, t, order=3), t), n)
        e2 = _exact_moment_error(sde, MAKERS["sde_dpm_2m"], n)
        assert e3 < e2 / 5, (n, e3, e2)


# ------------------------------------------------------------------------------------ exact identities
GM3 = sdegen.GaussianMixture(means=[[1.0, 0.0, -1.0], [-0.5, 0.5, 0.0]], stds=[[0.3, 0.5, 0.4], [0.6, 0.2, 0.3]])


def _run(solver, sde, times, seed=0):
    x = sde.prior_sample((7, 3), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return integrate_fixed_grid(solver, Dynamics(sde, GM3.score_fn(sde)), x, times,
                                generator=torch.Generator().manual_seed(seed + 1))[0]


@pytest.mark.parametrize("sde_name", list(SDES))
@pytest.mark.parametrize("order", [1, 2, 3])
def test_sde_dpm_with_eta_zero_is_dpm_solver_pp(order, sde_name):
    """eta = 0: the noise vanishes and the update is DPM-Solver++ (data prediction, exact phi's)."""
    sde = SDES[sde_name]()
    times = get_grid("karras", sde, 12, EPS)
    a = _run(SDEDPMSolverPP.tabulated(sde, times, order=order, eta=0.0), sde, times)
    b = _run(DPMSolver(order=order, prediction="data", n_steps=12, lower_order_final=True).tabulated(sde, times), sde, times)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("sde_name", list(SDES))
def test_sde_dpm_1_is_euler_ancestral(sde_name):
    r"""With $\eta = 1$: $\sigma_\downarrow/\sigma_0 = (\sigma_1/\sigma_0)^2 = e^{-2h}$ and
    $\sigma_\uparrow = \sigma_1\sqrt{1 - e^{-2h}}$, so SDE-DPM-Solver++1 and Euler ancestral are the same
    update (same draws, same samples)."""
    sde = SDES[sde_name]()
    times = get_grid("log_snr", sde, 15, EPS)
    a = _run(SDEDPMSolverPP.tabulated(sde, times, order=1), sde, times)
    b = _run(EulerAncestral.tabulated(sde, times), sde, times)
    torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


def test_dpm2_ancestral_eta_zero_is_dpm2_and_midpoint_is_geometric():
    sde = sdegen.VESDE(sigma_min=0.01, sigma_max=20.0)
    times = get_grid("karras", sde, 10, EPS)
    a = _run(DPM2.tabulated(sde, times, ancestral=True, eta=0.0), sde, times, seed=0)
    b = _run(DPM2.tabulated(sde, times), sde, times, seed=0)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-13)
    # VE: m = 1, sigma = s; the midpoint time's sigma is the geometric mean of the step's sigmas.
    t_mid = DPM2.tabulated(sde, times).table[3][0][0]
    s0, s1 = sde.marginal(times[3:5])[1].tolist()
    assert sde.marginal(torch.tensor([t_mid], dtype=F64))[1].item() == pytest.approx(math.sqrt(s0 * s1), rel=1e-9)


@pytest.mark.parametrize("method,per_step,extra", [
    ("sde_dpm_solver", 1, 1), ("euler_ancestral", 1, 1), ("dpm2", 2, 0), ("dpm2_ancestral", 2, 1)])
def test_nfe_counted(method, per_step, extra):
    calls = []
    exact = GM.score_fn(sdegen.VPSDE())

    def score(x, t):
        calls.append(1)
        return exact(x, t)

    res = sample(sdegen.VPSDE(), score, (5, 2), method=method, steps=12, dtype=F64,
                 generator=torch.Generator().manual_seed(0))
    assert res.nfe == len(calls) == 12 * per_step + extra


def test_restart_time_list_and_nfe():
    """K restarts: the time list jumps up K times, from sigma_min to sigma_max; NFE = 2 per ODE step."""
    sde = sdegen.VPSDE()
    calls = []
    exact = GM.score_fn(sde)

    def score(x, t):
        calls.append(1)
        return exact(x, t)

    res = sample(sde, score, (5, 2), method="restart", steps=10, restart_count=3, restart_steps=4, dtype=F64,
                 generator=torch.Generator().manual_seed(0))
    t = res.times
    up = t[1:] > t[:-1]
    assert int(up.sum()) == 3
    assert res.nfe == len(calls) == 2 * (t.numel() - 1 - 3)
    sig = sde.sigma(t)
    torch.testing.assert_close(sig[:-1][up], torch.full((3,), 0.06, dtype=F64), rtol=1e-9, atol=0)
    torch.testing.assert_close(sig[1:][up], torch.full((3,), 0.30, dtype=F64), rtol=1e-9, atol=0)


@pytest.mark.parametrize("bad,match", [({"eta": -1.0}, "eta"), ({"order": 4}, "order"),
                                       ({"solver_type": "heun2"}, "solver_type")])
def test_sde_dpm_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        sample(sdegen.VPSDE(), GM.score_fn(sdegen.VPSDE()), (2, 2), method="sde_dpm_solver", steps=5, **bad)


@pytest.mark.parametrize("bad,match", [({"restart_sigma": (0.3, 0.06)}, "restart_sigma"),
                                       ({"restart_sigma": (1e-6, 0.3)}, "restart_sigma"),
                                       ({"restart_count": -1}, "restart_count"),
                                       ({"restart_steps": 0}, "restart_steps")])
def test_restart_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        sample(sdegen.VPSDE(), GM.score_fn(sdegen.VPSDE()), (2, 2), method="restart", steps=5, **bad)


def test_singlestep_sde_with_independent_stage_noise_is_biased():
    """diffusers' single-step sde-dpmsolver++ draws every update's noise afresh (``noise="independent"``):
    the final update's noise ignores the noise already in the stage states, which inflates the variance
    (measured |z| 8-13 at 60-100 steps). sdegen's default composes one Ornstein-Uhlenbeck path
    (``noise="brownian"``) and passes the same check (test_exact_distribution_fast above)."""
    res = _check(_draw("vp", "dpm_solver_singlestep", 60, FAST_N, eta=1.0, order=2, noise="independent"), GM)
    assert not res["ok"] and res["z_cov"] > Z_MAX, res


def _gaussian_flow_error(sde, method: str, nfe: int, **opts) -> float:
    r"""Max error at ``eps`` against the exact probability flow of $\mathcal N(\mu, \sigma_d^2)$ data in 1-D:
    $x_\epsilon = m_\epsilon\mu + \sqrt{v_\epsilon/v_T}\,(x_T - m_T\mu)$ with $v_t = m_t^2\sigma_d^2 + s_t^2$ (the
    flow of a Gaussian is the monotone affine transport)."""
    x_T = torch.linspace(-3, 3, 7, dtype=F64).reshape(-1, 1)
    res = sample(sde, G1.score_fn(sde), None, x_T=x_T, method=method, steps=nfe, denoise=False, **opts)
    assert res.nfe == nfe
    (mT, sT), (me, se) = sde.marginal(res.times[:1]), sde.marginal(res.times[-1:])
    vT, ve = mT * mT * SD * SD + sT * sT, me * me * SD * SD + se * se
    exact = me * MU + (ve / vT).sqrt() * (x_T - mT * MU)
    return (res.samples - exact).abs().max().item()


@pytest.mark.parametrize("sde_name", ["vp", "ve", "user"])
@pytest.mark.parametrize("method,opts", [("dpm_fast", {}), ("dpm_solver_singlestep", {"lower_order_final": False}),
                                         ("dpm_solver_singlestep", {"solver_type": "midpoint"})])
def test_single_step_order_3_on_the_exact_flow(method, opts, sde_name):
    """NFE is the budget exactly; the slope of the log error over NFE 48 -> 192 is at least 3 - 0.25
    (measured 3.1-4.0; dpm_fast is uniform in lambda with orders [3, ..., 3, 2, 1]). The exact form with
    ``lower_order_final`` ends in order-2 and order-1 groups on the Karras grid's largest lambda steps,
    which costs it the asymptotic slope (measured 2.5), so that case runs without it."""
    sde = SDES[sde_name]()
    errs = [_gaussian_flow_error(sde, method, n, **opts) for n in (48, 96, 192)]
    slope = math.log(errs[0] / errs[2]) / math.log(4)
    assert slope > 2.75, (errs, slope)


def test_dpm_fast_budget_split():
    from sdegen.solvers.dpm_single import fast_orders, singlestep_orders

    assert fast_orders(10) == [3, 3, 3, 1] and fast_orders(9) == [3, 3, 2, 1] and fast_orders(2) == [2]
    assert all(sum(fast_orders(n)) == n for n in range(1, 60))
    assert singlestep_orders(10, 3) == [3, 3, 3, 1] and singlestep_orders(9, 3) == [3, 3, 2, 1]
    assert singlestep_orders(10, 2) == [2, 2, 2, 2, 1, 1]


@pytest.mark.parametrize("method,opts", [("sde_dpm_solver", {"order": 3}), ("euler_ancestral", {}),
                                         ("dpm2_ancestral", {}), ("restart", {}), ("sa_solver", {}),
                                         ("dpm_solver_singlestep", {"eta": 1.0}), ("dpm_fast", {})])
def test_per_sample_seeds_make_samples_batch_independent(method, opts):
    """With ``seeds=`` every draw (the loop's and the single-step stages') is per sample: sample k is
    bitwise the same in a batch of 7 and alone."""
    sde = sdegen.VPSDE()
    score = GM.score_fn(sde)
    big = sample(sde, score, (7, 2), method=method, steps=12, seeds=list(range(100, 107)), dtype=F64, **opts).samples
    one = sample(sde, score, (1, 2), method=method, steps=12, seeds=[104], dtype=F64, **opts).samples
    assert torch.equal(big[4], one[0])
