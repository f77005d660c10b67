r"""One table of adaptive ODE integrators: every entry is a ``sample`` method and a ``log_likelihood`` method.

Numbers are checked on one Gaussian $\mathcal N(\mu, 0.5^2 I)$ in 2-D under VP (float64), where the
oracle gives the exact score, $\log p_t$ and hence the exact likelihood at ``eps`` once the exact
$p_T$ is the prior: only the integrator's error remains.
"""

from __future__ import annotations

import pytest
import torch

import sdegen
from sdegen.likelihood import ODE_METHODS, decode, log_likelihood
from sdegen.sampling import METHODS, _ode_integrator_rows, sample
from sdegen.solvers.ode_integrators import ODE_INTEGRATORS, ODEIntegrator

F64 = torch.float64
EPS = 1e-3


def _problem():
    sde = sdegen.VPSDE()
    gm = sdegen.GaussianMixture(torch.tensor([[0.5, -0.25]], dtype=F64), stds=torch.tensor([0.5], dtype=F64))
    x = gm.sample(3, generator=torch.Generator().manual_seed(0))
    return sde, gm, x


def _rk4_integrate(fn, y0, t0, t1, *, rtol=1e-5, atol=1e-5, steps=64):
    """A fixed-step classical RK4 posing as a new integrator (tolerances accepted, unused)."""
    h = (t1 - t0) / steps
    y = y0
    for k in range(steps):
        t = torch.full((y.shape[0],), t0 + k * h, dtype=y.dtype)
        k1 = fn(y, t)
        k2 = fn(y + 0.5 * h * k1, t + 0.5 * h)
        k3 = fn(y + 0.5 * h * k2, t + 0.5 * h)
        k4 = fn(y + h * k3, t + h)
        y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return y, {"nfe_solver": 4 * steps}


def test_the_public_tuple_is_the_table():
    assert isinstance(ODE_METHODS, tuple)
    assert ODE_METHODS == tuple(ODE_INTEGRATORS)


@pytest.mark.parametrize("name", list(ODE_INTEGRATORS))
def test_every_integrator_is_a_sample_row_with_its_own_defaults(name):
    spec, integ = METHODS[name], ODE_INTEGRATORS[name]
    assert not spec.fixed_grid and not spec.reverse_sde and spec.build is None
    assert dict(spec.options) == integ.options()
    assert set(integ.options()) >= {"rtol", "atol"}
    assert spec.backend() is integ.function
    assert spec.doc == integ.doc


@pytest.mark.parametrize("name", list(ODE_INTEGRATORS))
def test_every_integrator_is_a_likelihood_method_and_both_paths_integrate_alike(name):
    sde, gm, x = _problem()
    score = gm.score_fn(sde)
    # With the exact score and the exact p_T only the ODE error remains: measured 3e-7 (rk45), 1.2e-6
    # (torchdiffeq), 8e-7 (scipy) nats at rtol = atol = 1e-6; the bound 1e-4 leaves a margin of ~100.
    res = log_likelihood(sde, score, x, method=name, rtol=1e-6, atol=1e-6, eps=EPS,
                         prior=lambda z: gm.log_prob_t(z, sde.T, sde))
    assert (res.log_prob - gm.log_prob_t(x, EPS, sde)).abs().max() < 1e-4
    assert res.stats["method"] == name
    # sample() and decode() run the same integrator on the same flow from T to eps: the same numbers.
    z = res.latent
    y = decode(sde, score, z, method=name, rtol=1e-6, atol=1e-6, eps=EPS)
    s = sample(sde, score, None, x_T=z, method=name, rtol=1e-6, atol=1e-6, eps=EPS)
    assert torch.equal(s.samples, y)
    assert (y - x).abs().max() < 1e-4     # and it inverts encode (measured <= 1.8e-6)


def test_a_new_integrator_in_the_table_is_a_likelihood_method_and_builds_a_sample_row(monkeypatch):
    sde, gm, x = _problem()
    score = gm.score_fn(sde)
    with pytest.raises(ValueError, match="unknown method 'rk4_test'"):
        log_likelihood(sde, score, x, method="rk4_test", eps=EPS)
    integ = ODEIntegrator(_rk4_integrate, native=False, doc="probability-flow ODE, RK4 on 64 steps (test)")
    monkeypatch.setitem(ODE_INTEGRATORS, "rk4_test", integ)
    # RK4 with 64 steps on this smooth flow: measured error 2.4e-7 nats; the same bound as above.
    res = log_likelihood(sde, score, x, method="rk4_test", eps=EPS, prior=lambda z: gm.log_prob_t(z, sde.T, sde))
    assert (res.log_prob - gm.log_prob_t(x, EPS, sde)).abs().max() < 1e-4
    assert res.stats["nfe_solver"] == 4 * 64 == res.nfe
    # sample's rows are built from the table when sdegen.sampling is imported (see METHODS); the same
    # builder gives the new entry a row that runs, with the function's options.
    row = _ode_integrator_rows(ODE_INTEGRATORS)["rk4_test"]
    assert dict(row.options) == {"rtol": 1e-5, "atol": 1e-5} and row.doc == integ.doc
    monkeypatch.setitem(METHODS, "rk4_test", row)
    s = sample(sde, score, None, x_T=res.latent, method="rk4_test", eps=EPS)
    assert s.nfe == 4 * 64 and s.stats["nfe_solver"] == 4 * 64
    assert (s.samples - x).abs().max() < 1e-4
    with pytest.raises(ValueError, match="per_sample=True needs a native integrator"):
        log_likelihood(sde, score, x, method="rk4_test", eps=EPS, per_sample=True)


def test_an_integrator_without_tolerances_is_refused():
    def no_tol(fn, y0, t0, t1):
        return y0, {}

    with pytest.raises(TypeError, match="lacks rtol, atol"):
        ODEIntegrator(no_tol, native=False, doc="")
    with pytest.raises(TypeError, match="lacks progress, record_every, per_sample"):
        ODEIntegrator(_rk4_integrate, native=True, doc="")

