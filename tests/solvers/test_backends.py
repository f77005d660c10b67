"""Backends (torchdiffeq, scipy, torchsde) against the native RK45 and against the mathematics."""

import math

import pytest
import torch

import sdegen
from sdegen.solvers.backends import scipy_integrate, torchdiffeq_integrate, torchsde_integrate
from sdegen.solvers.base import StepSizeError
from sdegen.solvers.rk45 import rk45_integrate

F64 = torch.float64
EPS = 1e-3
SDES = {"vp": sdegen.VPSDE, "subvp": sdegen.SubVPSDE, "ve": sdegen.VESDE}


def pf_problem(name, n=16, seed=0):
    sde = SDES[name]()
    gm = sdegen.named_mixture("8gaussians")
    ode = sde.reverse(gm.score_fn(sde), probability_flow=True)
    x_T = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sde, ode, x_T


class InInterval:
    """Counts calls and checks every evaluation time lies in [lo, hi] (scores are undefined outside)."""

    def __init__(self, fn, lo, hi):
        self.fn, self.lo, self.hi, self.calls = fn, lo, hi, 0

    def __call__(self, y, t):
        self.calls += 1
        assert t.shape == (y.shape[0],)
        assert float(t.min()) >= self.lo - 1e-12 and float(t.max()) <= self.hi + 1e-12, (float(t.min()), float(t.max()))
        return self.fn(y, t)


@pytest.mark.parametrize("name", list(SDES))
def test_ode_backends_agree_with_native_rk45(name):
    sde, ode, x_T = pf_problem(name)
    tol = 1e-7
    ref, _, _ = rk45_integrate(ode.drift, x_T, sde.T, EPS, rtol=tol, atol=tol)
    for backend in (torchdiffeq_integrate, scipy_integrate):
        fn = InInterval(ode.drift, EPS, sde.T)
        y1, stats = backend(fn, x_T, sde.T, EPS, rtol=tol, atol=tol)
        # Both solvers keep the global error at a small multiple of tol (measured ~3e-7 here);
        # they differ by at most the sum of their errors.
        torch.testing.assert_close(y1, ref, rtol=0, atol=1e-5)
        assert stats["nfe_solver"] == fn.calls > 0
        assert y1.dtype == F64 and y1.shape == x_T.shape


def test_torchdiffeq_fixed_grid_and_options():
    # Euler with a fixed step on y' = -y from 1 to 0: (1 + h)^n with h = 1/n exactly.
    y0 = torch.ones(2, 3, dtype=F64)
    y1, stats = torchdiffeq_integrate(lambda y, t: -y, y0, 1.0, 0.0, solver="euler", step_size=0.01)
    torch.testing.assert_close(y1, torch.full_like(y0, 1.01 ** 100))
    assert stats["nfe_solver"] == 100


def test_scipy_reports_steps_and_failure():
    y0 = torch.ones(2, 1, dtype=F64)
    y1, stats = scipy_integrate(lambda y, t: -y, y0, 0.0, 1.0, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(y1, torch.full_like(y0, math.exp(-1.0)), rtol=0, atol=1e-7)
    assert stats["nfe_solver"] == stats["nfev"] and stats["accepted"] > 0
    # y' = y^2 blows up at t = 1: solve_ivp fails and the adapter raises with the time.
    with pytest.raises(StepSizeError, match="failed at t=") as info:
        scipy_integrate(lambda y, t: y * y, y0, 0.0, 2.0)
    assert 0.99 < info.value.t < 1.01


def test_float32_kept():
    y0 = torch.ones(3, 2, dtype=torch.float32)
    for backend in (torchdiffeq_integrate, scipy_integrate):
        y1, _ = backend(lambda y, t: -y, y0, 0.0, 1.0)
        assert y1.dtype == torch.float32
        torch.testing.assert_close(y1, torch.full_like(y0, math.exp(-1.0)), rtol=0, atol=1e-4)


@pytest.mark.parametrize("backend,solver,valid", [
    (torchdiffeq_integrate, "rk99", "dopri5"), (scipy_integrate, "rk45", "RK45"),
])
def test_unknown_ode_solver_lists_valid(backend, solver, valid):
    with pytest.raises(ValueError, match=valid):
        backend(lambda y, t: -y, torch.ones(1, 1, dtype=F64), 0.0, 1.0, solver=solver)


# ---------------------------------------------------------------------------------------------- torchsde
def reverse_sde(name="vp", data="gaussian"):
    sde = SDES[name]()
    gm = sdegen.named_mixture(data)
    return sde, gm, sde.reverse(gm.score_fn(sde))


@pytest.mark.parametrize("solver", ["euler", "srk"])
def test_torchsde_reproducible_from_generator(solver):
    sde, _, rev = reverse_sde()
    x_T = sde.prior_sample((16, 2), generator=torch.Generator().manual_seed(3), dtype=F64)
    runs = [torchsde_integrate(rev.drift, rev.diffusion, x_T, sde.T, EPS, solver=solver, steps=20,
                               generator=torch.Generator().manual_seed(seed))[0] for seed in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])


def test_torchsde_euler_is_euler_maruyama_in_negated_time():
    # torchsde's Euler step in s = -t: y <- y + (-b(y, -s)) ds + g(-s) dW, with dW the Brownian
    # interval's increments. Rebuild the same path from the reported entropy and step by hand.
    import torchsde

    sde, _, rev = reverse_sde("ve")
    steps, T = 10, sde.T
    x_T = sde.prior_sample((4, 2), generator=torch.Generator().manual_seed(0), dtype=F64)
    y1, stats = torchsde_integrate(rev.drift, rev.diffusion, x_T, T, EPS, steps=steps,
                                   generator=torch.Generator().manual_seed(1))
    ds = (T - EPS) / steps
    assert stats["nfe_solver"] == steps + 1  # sdeint evaluates the drift once more at the start
    bm = torchsde.BrownianInterval(t0=-T, t1=-EPS, size=(4, 2), dtype=F64, entropy=stats["entropy"], dt=ds)
    y = x_T
    s1 = -T
    for i in range(steps):
        # The adapter's grid: steps of ds (1 + 1e-9), the last one clipped to -eps.
        s0, s1 = s1, (-EPS if i == steps - 1 else s1 + ds * (1 + 1e-9))
        t = torch.full((4,), -s0, dtype=F64)
        y = y - rev.drift(y, t) * (s1 - s0) + rev.diffusion(t)[:, None] * bm(s0, s1)
    torch.testing.assert_close(y1, y, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_torchsde_samples_gaussian_data():
    # Data N(0.5, 0.5^2 I) with the exact score: the reverse SDE ends (up to O(ds) bias and the
    # eps = 1e-3 perturbation, ~2e-4 in variance) at that Gaussian. n = 4000 draws in 2-D: the mean
    # has standard error 0.5 / sqrt(4000) = 0.0079 per coordinate, the variance 0.25 * sqrt(2/4000)
    # = 0.0056; we allow 5 standard errors plus a 0.01 discretization budget (200 Euler steps).
    sde, gm, rev = reverse_sde("vp")
    n = 4000
    x_T = sde.prior_sample((n, 2), generator=torch.Generator().manual_seed(11), dtype=F64)
    y1, stats = torchsde_integrate(rev.drift, rev.diffusion, x_T, sde.T, EPS, steps=200,
                                   generator=torch.Generator().manual_seed(12))
    assert stats["nfe_solver"] >= 200
    assert (y1.mean(0) - 0.5).abs().max() < 5 * 0.0079 + 0.01
    assert (y1.var(0) - 0.25).abs().max() < 5 * 0.0056 + 0.01


def test_torchsde_validation():
    sde, _, rev = reverse_sde()
    x = torch.zeros(2, 2, dtype=F64)
    with pytest.raises(ValueError, match="euler"):
        torchsde_integrate(rev.drift, rev.diffusion, x, 1.0, EPS, solver="heun")
    with pytest.raises(ValueError, match="steps"):
        torchsde_integrate(rev.drift, rev.diffusion, x, 1.0, EPS, steps=0)


@pytest.mark.cuda
def test_backends_on_cuda():
    dev = torch.device("cuda")
    sde = sdegen.VPSDE()
    gm = sdegen.named_mixture("8gaussians", device=dev)
    ode = sde.reverse(gm.score_fn(sde), probability_flow=True)
    rev = sde.reverse(gm.score_fn(sde))
    x_T = sde.prior_sample((8, 2), generator=torch.Generator(dev).manual_seed(0), device=dev, dtype=F64)
    ref, _, _ = rk45_integrate(ode.drift, x_T, 1.0, EPS, rtol=1e-7, atol=1e-7)
    for backend in (torchdiffeq_integrate, scipy_integrate):
        y1, _ = backend(ode.drift, x_T, 1.0, EPS, rtol=1e-7, atol=1e-7)
        assert y1.device.type == "cuda"
        torch.testing.assert_close(y1, ref, rtol=0, atol=1e-5)
    a, b = (torchsde_integrate(rev.drift, rev.diffusion, x_T, 1.0, EPS, steps=10,
                               generator=torch.Generator(dev).manual_seed(1))[0] for _ in range(2))
    assert a.device.type == "cuda" and torch.equal(a, b)


def _drift_of(sde):
    return lambda y, t: -0.5 * sde.diffusion(t)[:, None] ** 2 * y


@pytest.mark.parametrize("backend", ["torchdiffeq", "scipy", "torchsde"])
def test_backends_count_and_check_through_counting_score(backend):
    # The adapters count right-hand-side calls with CountingScore, so its checks hold for them: a
    # right-hand side in another dtype than the state, or one that edits y in place, is refused.
    sde = sdegen.VPSDE()
    y0 = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))

    def run(fn):
        if backend == "torchsde":
            return torchsde_integrate(fn, sde.diffusion, y0, 1.0, EPS, steps=5,
                                      generator=torch.Generator().manual_seed(0))
        integrate = torchdiffeq_integrate if backend == "torchdiffeq" else scipy_integrate
        return integrate(fn, y0, 1.0, EPS, rtol=1e-3, atol=1e-3)

    calls = [0]
    drift = _drift_of(sde)

    def counted_here(y, t):
        calls[0] += 1
        return drift(y, t)

    _, stats = run(counted_here)
    assert stats["nfe_solver"] == calls[0] > 0
    with pytest.raises(TypeError, match="x's dtype and device"):
        run(lambda y, t: drift(y, t).double())

    def in_place(y, t):
        out = drift(y, t)
        y.mul_(1.0)
        return out

    with pytest.raises(RuntimeError, match="in place"):
        run(in_place)
