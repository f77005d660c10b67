"""DPM-Solver and EDM's Heun step, which run on per-step host float64 coefficients built by ``prepare``,
against independent references: the textbook updates written here with the marginals evaluated on the
device at every step (the formulas of the solvers' former per-step paths), to round-off."""

import math

import pytest
import torch

import sdegen
from sdegen._utils import append_dims
from sdegen.grids import get_grid
from sdegen.solvers.base import CountingScore, Dynamics, integrate_fixed_grid
from sdegen.solvers.dpm_solver import DPMSolver
from sdegen.solvers.edm import HeunKarras


def _dpm_reference(order, prediction, lower_order_final, solver_type, sde, score, x, times):
    r"""Multistep DPM-Solver(++) from Lu et al. 2022b (eqs. in ``sdegen.solvers.dpm_solver``): per step the
    marginals at ``t0``, ``t1`` on the device, $\varphi_k$/$\psi_k$ of $h$, and the $\lambda$-derivatives of the
    prediction by Newton divided differences on the stored (lambda, y) pairs."""
    n = times.numel() - 1
    hist = []
    for i in range(n):
        t0, t1 = times[i].expand(x.shape[0]), times[i + 1].expand(x.shape[0])
        m0, s0 = sde.marginal(t0)
        m1, s1 = sde.marginal(t1)
        lam0, lam1 = (m0 / s0).log(), (m1 / s1).log()
        sc = score(x, t0)
        if prediction == "data":
            y = (x + append_dims(s0.square(), x.ndim) * sc) / append_dims(m0, x.ndim)   # Tweedie x0
        else:
            y = -append_dims(s0, x.ndim) * sc                                          # eps_hat
        hist = (hist + [(lam0, y)])[-order:]
        k = min(order, len(hist))
        if lower_order_final:
            k = max(1, min(k, n - i))
        d1 = d2 = None
        if k >= 2:
            (l0, y0), (l1, y1) = hist[-1], hist[-2]
            h0 = append_dims(l0 - l1, x.ndim)
            d10 = (y0 - y1) / h0
            d1 = d10
            if k >= 3:
                l2, y2 = hist[-3]
                h1 = append_dims(l1 - l2, x.ndim)
                dd = (d10 - (y1 - y2) / h1) / (h0 + h1)
                # p(l) = y0 + d10 (l - l0) + dd (l - l0)(l - l1): p'(l0) = d10 + dd h0, p'' = 2 dd.
                d1, d2 = d10 + dd * h0, 2 * dd
        h = lam1 - lam0
        if prediction == "data":
            em1 = torch.expm1(-h)
            c = (-em1, h + em1, 0.5 * h * h - h - em1)
            lin, out = s1 / s0, m1
        else:
            ep1 = torch.expm1(h)
            c = (ep1, ep1 - h, ep1 - h - 0.5 * h * h)
            lin, out = m1 / m0, -s1
        if k == 2 and solver_type == "midpoint":
            c = (c[0], 0.5 * h * c[0], c[2])
        acc = append_dims(c[0], x.ndim) * y
        if d1 is not None:
            acc = acc + append_dims(c[1], x.ndim) * d1
        if d2 is not None:
            acc = acc + append_dims(c[2], x.ndim) * d2
        x = append_dims(lin, x.ndim) * x + append_dims(out, x.ndim) * acc
    return x


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE()], ids=repr)
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("prediction", ["data", "noise"])
@pytest.mark.parametrize("lower_order_final", [False, True])
def test_dpm_solver_equals_the_textbook_update(sde, order, prediction, lower_order_final):
    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = get_grid("karras", sde, 12, 1e-3, rho=7.0)
    for solver_type in ("exact", "midpoint") if order == 2 else ("exact",):
        want = _dpm_reference(order, prediction, lower_order_final, solver_type, sde, score, x, times)
        solver = DPMSolver(order=order, prediction=prediction, n_steps=12, lower_order_final=lower_order_final,
                           solver_type=solver_type)
        got, _, _ = integrate_fixed_grid(solver, Dynamics(sde, CountingScore(score)), x, times)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.equal(got, x)  # it moved


def _heun_reference(solver, sde, score, x, times, noise=None):
    r"""EDM Alg. 2 in $(\hat x = x/m, \sigma = s/m)$ with marginals on the device per step; churn from the unit
    draws ``noise[i]`` (the loop's $dw_i/\sqrt{|\Delta t_i|}$)."""
    n = times.numel() - 1
    for i in range(n):
        t0, t1 = times[i].expand(x.shape[0]), times[i + 1].expand(x.shape[0])
        m0, s0 = sde.marginal(t0)
        m1, s1 = sde.marginal(t1)
        sig0, sig1 = s0 / m0, s1 / m1
        xs = x / append_dims(m0, x.ndim)
        t_hat, m_hat, s_hat, sig_hat = t0, m0, s0, sig0
        if solver.s_churn > 0:
            gamma = min(solver.s_churn / solver.n_steps, math.sqrt(2.0) - 1.0)
            in_range = (sig0 >= solver.s_tmin) & (sig0 <= solver.s_tmax)
            sig_max = sde.sigma(torch.full_like(t0, sde.T))
            sig_hat = torch.where(in_range, torch.minimum(sig0 * (1 + gamma), sig_max), sig0)
            t_hat = torch.where(in_range, sde.t_from_sigma(sig_hat).to(t0.dtype), t0)
            m_hat, s_hat = sde.marginal(t_hat)
            add = (sig_hat.square() - sig0.square()).clamp_min(0).sqrt() * solver.s_noise
            xs = xs + append_dims(add, x.ndim) * noise[i]
        h = append_dims(sig1 - sig_hat, x.ndim)
        d = -append_dims(s_hat, x.ndim) * score(xs * append_dims(m_hat, x.ndim), t_hat)    # (x^ - D)/sigma, Tweedie
        xs_euler = xs + h * d
        if solver.final_euler and i == n - 1:
            return xs_euler * append_dims(m1, x.ndim)
        d1 = -append_dims(s1, x.ndim) * score(xs_euler * append_dims(m1, x.ndim), t1)
        x = (xs + 0.5 * h * (d + d1)) * append_dims(m1, x.ndim)
    return x


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE()], ids=repr)
@pytest.mark.parametrize("grid", ["karras", "uniform", "log_snr"])
@pytest.mark.parametrize("final_euler", [False, True])
def test_heun_karras_equals_the_textbook_update(sde, grid, final_euler):
    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = get_grid(grid, sde, 9, 1e-3)
    solver = HeunKarras(n_steps=9, final_euler=final_euler)
    want = _heun_reference(solver, sde, score, x, times)
    counted = CountingScore(score)
    got, _, _ = integrate_fixed_grid(solver, Dynamics(sde, counted), x, times)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert counted.nfe == solver.nfe(9) == 18 - final_euler
    assert not torch.equal(got, x)


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.VESDE()], ids=repr)
@pytest.mark.parametrize("churn", [dict(s_churn=1.0), dict(s_churn=40.0, s_tmin=0.05, s_tmax=10.0, s_noise=1.003)],
                         ids=["churn1", "churn40_range"])
def test_heun_karras_churn_equals_the_textbook_update(sde, churn):
    # The churned noise level, its time and marginal are grid quantities too: the prepared step uses the same
    # unit draws z_i = dw_i / sqrt|dt_i| as the reference (noise= gives the loop's draws).
    score = sdegen.named_mixture("anisotropic").score_fn(sde)
    x = sde.prior_sample((32, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    times = get_grid("karras", sde, 12, 1e-3)
    noise = torch.randn((12, 32, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    solver = HeunKarras(n_steps=12, **churn)
    want = _heun_reference(solver, sde, score, x, times, noise)
    got, _, _ = integrate_fixed_grid(solver, Dynamics(sde, CountingScore(score)), x, times, noise=noise)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    deterministic, _, _ = integrate_fixed_grid(HeunKarras(n_steps=12), Dynamics(sde, CountingScore(score)), x, times)
    assert (got - deterministic).abs().max() > 1e-3      # the churn noise reached the result
