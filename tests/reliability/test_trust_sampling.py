"""Issue 14 items 4-8 and issue 16's part-way start, through the public entry points.

Each case is a mechanism's contract: the one counted-score wrapper checks every score output's dtype,
device and the input's version counter (4, 5); adaptive solvers report non-finite values as
``NonFiniteError`` naming the sample, step and time, and a non-finite start state as bad input (6);
user grids are checked once (7); backend options are checked against the backend itself (8).
The part-way start is checked against the exact answer: with the exact score of Gaussian data,
noising exact data to ``t_start`` and integrating back gives the data distribution.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import sdegen
from sdegen.grids import karras, user_grid
from sdegen.likelihood import log_likelihood
from sdegen.sampling import METHODS, sample
from sdegen.solvers.backends import backend_options
from sdegen.solvers.base import NonFiniteError
from sdegen.solvers.rk45 import rk45_integrate

# Gaussian data N(MU, diag(VAR)) in 2-D: p_t is N(m MU, m^2 VAR + s^2), so its score is exact.
MU = torch.tensor([0.5, -1.0], dtype=torch.float64)
VAR = torch.tensor([0.25, 0.5], dtype=torch.float64)
CHEAP = {"adaptive_sde": {"rtol": 0.1, "atol": 0.1}, "rk45": {"rtol": 1e-3, "atol": 1e-3}}


def gauss_score(sde):
    def score(x, t):
        m, s = sde.marginal(t)
        m, s = m.to(x.dtype)[:, None], s.to(x.dtype)[:, None]
        mu, var = MU.to(x.dtype), VAR.to(x.dtype)
        return -(x - m * mu) / (m * m * var + s * s)

    return score


def _steps(method):
    # ancestral on a VPSDE is the DDPM chain, which needs steps > beta_max * T = 20
    return (25 if method == "ancestral" else 3) if METHODS[method].fixed_grid else None


def _sample(method, score, *, dtype=torch.float32, n=4, sde=None, **kw):
    sde = sde or sdegen.VPSDE()
    opts = {"steps": _steps(method), **CHEAP.get(method, {}), **kw}
    return sample(sde, score, (n, 2), method=method, dtype=dtype, generator=torch.Generator().manual_seed(0), **opts)


# ------------------------------------------------------------------------------------------- item 4: dtype
@pytest.mark.parametrize("method", list(METHODS))
def test_score_dtype_drift_is_refused_by_every_method(method):
    score = gauss_score(sdegen.VPSDE())
    with pytest.raises(TypeError, match=r"x's dtype and device \(torch.float32 on cpu\), got torch.float64"):
        _sample(method, lambda x, t: score(x.double(), t.double()))


@pytest.mark.parametrize("bad", [torch.bool, torch.int64, torch.complex64])
def test_non_float_scores_are_refused(bad):
    with pytest.raises(TypeError, match=f"got {bad}"):
        _sample("euler_maruyama", lambda x, t: torch.zeros(x.shape, dtype=bad))


def test_likelihood_refuses_dtype_drift():
    x = torch.randn(3, 2)
    score = gauss_score(sdegen.VPSDE())
    with pytest.raises(TypeError, match="got torch.float64"):
        log_likelihood(sdegen.VPSDE(), lambda y, t: score(y.double(), t.double()), x, rtol=1e-3, atol=1e-3)


def test_samples_keep_the_state_dtype():
    res = _sample("ode_heun", gauss_score(sdegen.VPSDE()))
    assert res.samples.dtype == torch.float32


# ------------------------------------------------------------------------------------ item 5: in place
@pytest.mark.parametrize("method", list(METHODS))
def test_score_modifying_x_in_place_is_detected(method):
    score = gauss_score(sdegen.VPSDE())

    def bad(x, t):
        out = score(x, t)
        x.mul_(1.0)           # value unchanged, but an in-place write: detected by the version counter
        return out

    with pytest.raises(RuntimeError, match="modified its input x in place"):
        _sample(method, bad)


# ----------------------------------------------------------------------------------- item 6: non-finite
def _nan_below(score, t_bad, sample_idx=None):
    """The score with NaN for t < t_bad (for one sample, or all)."""

    def fn(x, t):
        out = score(x, t)
        mask = (t < t_bad)[:, None].expand_as(out)
        if sample_idx is not None:
            mask = mask & (torch.arange(x.shape[0]) == sample_idx)[:, None]
        return torch.where(mask, torch.full_like(out, math.nan), out)

    return fn


@pytest.mark.parametrize("method,kw,bad", [("rk45", {}, 2), ("rk45", {"per_sample": True}, 2), ("adaptive_sde", {}, 2),
                                           ("adaptive_sde", {"per_sample": True}, None), ("ode_heun", {}, 2),
                                           ("euler_maruyama", {}, 2)])
def test_nonfinite_score_names_sample_step_and_time(method, kw, bad):
    # bad: the sample whose score turns NaN (None: all; per-sample adaptive_sde calls the score on the
    # running samples only, so a position in the call is not a sample index).
    sde = sdegen.VPSDE()
    score = _nan_below(gauss_score(sde), 0.5, sample_idx=bad)
    steps = 20 if METHODS[method].fixed_grid else None
    with pytest.raises(NonFiniteError, match=f"sample {bad or 0}") as info:
        sample(sde, score, (4, 2), method=method, steps=steps, dtype=torch.float64,
               generator=torch.Generator().manual_seed(0), **{**CHEAP.get(method, {}), **kw})
    err = info.value
    assert err.sample == (bad or 0) and isinstance(err.step, int)
    # The first bad step is where the score turns NaN, within one step (fixed grid: dt = 0.05).
    assert 0.5 - 0.06 <= err.t <= 0.5 + 0.06, err.t
    assert err.x is not None and bool(torch.isfinite(err.x).all())
    if err.x_t is not None:
        assert err.x_t >= err.t


@pytest.mark.parametrize("method", ["rk45", "adaptive_sde", "torchdiffeq", "scipy", "ode_euler"])
def test_nan_in_x_T_is_bad_input_not_the_score(method):
    x_T = torch.randn(4, 2)
    x_T[1, 0] = math.nan
    with pytest.raises(ValueError, match=r"x_T contains NaN/inf \(first in sample 1\)"):
        sample(sdegen.VPSDE(), gauss_score(sdegen.VPSDE()), None, method=method, steps=_steps(method), x_T=x_T,
               **CHEAP.get(method, {}))


def test_nonfinite_score_at_the_start_is_a_nonfinite_error_not_a_time_error():
    # Formerly "t must lie in [0.0, 1.0], got values in [nan, nan]" (a NaN first step).
    sde = sdegen.VPSDE()
    for per_sample in (False, True):
        with pytest.raises(NonFiniteError, match="sample 0") as info:
            sample(sde, lambda x, t: x * math.nan, (3, 2), method="rk45", per_sample=per_sample)
        assert info.value.step == 0 and info.value.t == 1.0 and info.value.sample == 0
    with pytest.raises(ValueError, match="y0 contains NaN"):
        rk45_integrate(lambda y, t: -y, torch.tensor([[math.nan, 0.0]]), 1.0, 0.5)


def test_likelihood_nonfinite_score_is_a_nonfinite_error():
    sde = sdegen.VPSDE()
    score = gauss_score(sde)

    def fn(x, t):   # NaN above t = 0.5 (the likelihood integrates upwards)
        return torch.where((t > 0.5)[:, None], torch.full_like(x, math.nan), score(x, t))

    with pytest.raises(NonFiniteError):
        log_likelihood(sde, fn, torch.randn(3, 2, dtype=torch.float64), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- item 7: grids
def test_user_grid_must_start_at_T():
    sde = sdegen.VPSDE()
    with pytest.raises(ValueError, match="must start at T = 1.0.*got 0.5.*t_start=0.5"):
        _sample("ode_euler", gauss_score(sde), grid=torch.tensor([0.5, 0.2, 0.01], dtype=torch.float64), steps=None)


def test_user_grid_conflicting_steps_or_eps_is_an_error():
    sde = sdegen.VPSDE()
    g = torch.tensor([1.0, 0.5, 0.01], dtype=torch.float64)
    score = gauss_score(sde)
    with pytest.raises(ValueError, match="steps=5 contradicts the grid, which has 2 steps"):
        sample(sde, score, (4, 2), method="ode_euler", grid=g, steps=5)
    with pytest.raises(ValueError, match="eps=0.001 contradicts the grid, which ends at 0.01"):
        sample(sde, score, (4, 2), method="ode_euler", grid=g, eps=1e-3)
    # Consistent values are fine; without them the grid sets both.
    res = sample(sde, score, (4, 2), method="ode_euler", grid=g, steps=2, eps=0.01)
    assert res.times.tolist() == [1.0, 0.5, 0.01] and res.nfe == 2


@pytest.mark.parametrize("grid,err,match", [
    (torch.tensor([[1.0, 0.5], [0.2, 0.01]]), ValueError, r"must be 1-D, got shape \(2, 2\)"),
    (torch.tensor([1.0, 0.5, 0.7, 0.01]), ValueError, "strictly decreasing.*times\\[1\\] = 0.5"),
    (torch.tensor([1.0, math.nan, 0.01]), ValueError, "must be finite"),
    (torch.tensor([1.5, 0.5, 0.01]), ValueError, r"must lie in \(0, T\]"),
    (torch.tensor([1.0, 0.5, 0.0]), ValueError, r"must lie in \(0, T\]"),
    (torch.tensor([1.0]), ValueError, "at least 2 times"),
    (torch.tensor([True, False]), TypeError, "real times"),
    (["a", "b"], TypeError, "1-D sequence of real times"),
    ({1.0, 0.5}, TypeError, "grid must be a name, or a 1-D tensor"),
])
def test_bad_user_grids(grid, err, match):
    with pytest.raises(err, match=match):
        sample(sdegen.VPSDE(), gauss_score(sdegen.VPSDE()), (4, 2), method="ode_heun", grid=grid)


@pytest.mark.parametrize("method", ["ode_heun", "euler_maruyama", "dpm_solver", "heun_karras"])
def test_list_and_numpy_grids_equal_the_tensor_grid(method):
    sde = sdegen.VPSDE()
    g = [1.0, 0.6, 0.3, 0.1, 0.01]
    ref = _sample(method, gauss_score(sde), grid=torch.tensor(g, dtype=torch.float64), steps=None, dtype=torch.float64)
    for form in (g, tuple(g), np.array(g), np.array(g, dtype=np.float32)):
        res = _sample(method, gauss_score(sde), grid=form, steps=None, dtype=torch.float64)
        if isinstance(form, np.ndarray) and form.dtype == np.float32:
            torch.testing.assert_close(res.samples, ref.samples, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(res.samples, ref.samples)
        assert res.nfe == ref.nfe


def test_eps_bool_is_refused():
    with pytest.raises(TypeError, match="eps must be a float"):
        _sample("ode_euler", gauss_score(sdegen.VPSDE()), eps=True)


# -------------------------------------------------------------------------------- item 8: backend options
@pytest.mark.parametrize("method,typo,valid", [("torchdiffeq", "max_stepz", "max_num_steps"),
                                               ("scipy", "max_stepz", "first_step, max_step"),
                                               ("torchsde", "dtz", "levy_area_approximation, options")])
def test_unknown_backend_options_are_errors(method, typo, valid):
    with pytest.raises(TypeError, match=f"unknown option\\(s\\) {typo}; valid options: .*{valid}"):
        _sample(method, gauss_score(sdegen.VPSDE()), **{typo: 1})


def test_likelihood_scipy_unknown_option_is_an_error():
    with pytest.raises(TypeError, match="scipy solver 'RK45' got unknown option\\(s\\) max_stepz"):
        log_likelihood(sdegen.VPSDE(), gauss_score(sdegen.VPSDE()), torch.randn(2, 2), method="scipy", max_stepz=0.1)


def test_backend_options_come_from_the_backend():
    assert "step_size" in backend_options("torchdiffeq", "euler")
    assert "max_num_steps" in backend_options("torchdiffeq", "dopri5")
    assert backend_options("scipy", "RK45") == ("first_step", "max_step")
    assert {"min_step", "lband", "uband"} <= set(backend_options("scipy", "LSODA"))
    # Valid options still reach the backend: a tiny max_step forces many steps.
    few = _sample("scipy", gauss_score(sdegen.VPSDE()), dtype=torch.float64)
    many = _sample("scipy", gauss_score(sdegen.VPSDE()), dtype=torch.float64, max_step=0.01)
    assert many.nfe > few.nfe and many.nfe >= 6 * 99


# --------------------------------------------------------------------------- issue 16: start part-way
def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return MU + VAR.sqrt() * torch.randn(n, 2, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("method,kw,sde", [
    ("rk45", {"rtol": 1e-6, "atol": 1e-6}, sdegen.VPSDE()),
    ("rk45", {"rtol": 1e-6, "atol": 1e-6}, sdegen.VESDE()),
    ("dpm_solver", {"steps": 20}, sdegen.VPSDE()),
    ("heun_karras", {"steps": 30}, sdegen.VPSDE()),
    ("ode_heun", {"steps": 50, "grid": "quadratic"}, sdegen.SubVPSDE()),
    ("euler_maruyama", {"steps": 400}, sdegen.VPSDE()),
    ("ancestral", {"steps": 1000}, sdegen.VPSDE()),
    ("adaptive_sde", {"rtol": 1e-3, "atol": 1e-3}, sdegen.VPSDE()),
])
def test_start_part_way_from_exact_data_gives_the_data(method, kw, sde):
    # Exact data noised to t_start by the exact transition is a sample of p_{t_start}; integrating with
    # the exact score gives p_eps = N(m MU, m^2 VAR + s^2) at eps (the data up to O(eps)). n = 4000:
    # standard errors of the mean sqrt(var/n) and of the variance var sqrt(2/(n-1)); 4.5 SE bounds
    # (8 checks: false-alarm probability ~5e-5). Starting at T instead (t_start ignored) moves the
    # variance by ~25 %, i.e. > 10 SE.
    n, eps = 4000, 1e-3
    res = sample(sde, gauss_score(sde), None, method=method, x_init=_data(n, 1), strength=0.5, eps=eps,
                 generator=torch.Generator().manual_seed(2), **kw)
    assert abs(float(res.times[0]) - 0.5 * sde.T) < 1e-12
    m, s = (float(v) for v in sde.marginal(torch.tensor([eps], dtype=torch.float64)))
    t_final = float(res.times[-1])
    if t_final == 0.0:      # denoised (reverse-SDE methods): Tweedie's E[x0 | x_eps] has variance VAR^2/(VAR + s^2/m^2)
        mean, var = MU, VAR.square() / (VAR + (s / m) ** 2)
    else:
        mean, var = m * MU, m * m * VAR + s * s
    x = res.samples
    se_mean, se_var = (var / n).sqrt(), var * math.sqrt(2 / (n - 1))
    assert bool(((x.mean(0) - mean).abs() < 4.5 * se_mean).all()), (x.mean(0), mean)
    assert bool(((x.var(0) - var).abs() < 4.5 * se_var).all()), (x.var(0), var)


def test_t_start_T_is_ordinary_sampling():
    sde = sdegen.VPSDE()
    for method in ("euler_maruyama", "dpm_solver", "rk45"):
        kw = {"steps": 10} if METHODS[method].fixed_grid else {"rtol": 1e-3, "atol": 1e-3}
        runs = [sample(sde, gauss_score(sde), (8, 2), method=method, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64, **kw, **extra)
                for extra in ({}, {"t_start": 1.0}, {"strength": 1.0})]
        assert all(torch.equal(r.samples, runs[0].samples) for r in runs[1:])


def test_x_init_is_the_exact_transition():
    # x_init noised inside sample() equals the state m x0 + s z built by hand from the same draw.
    sde = sdegen.VPSDE()
    x0 = _data(16, 3)
    res = sample(sde, gauss_score(sde), None, method="ode_heun", steps=10, x_init=x0, t_start=0.3,
                 generator=torch.Generator().manual_seed(5))
    m, s = (float(v) for v in sde.marginal(torch.tensor([0.3], dtype=torch.float64)))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref = sample(sde, gauss_score(sde), None, method="ode_heun", steps=10, x_T=x0 * m + z * s, t_start=0.3)
    assert torch.equal(res.samples, ref.samples)
    assert res.times[0] == 0.3 and res.nfe == 20


@pytest.mark.parametrize("method,grid", [("ode_euler", "uniform"), ("ode_euler", "log_snr"), ("pc", "karras"),
                                         ("dpm_solver", "karras"), ("heun_karras", "karras"),
                                         ("dpm_solver", "quadratic")])
def test_grids_respect_t_start(method, grid):
    sde = sdegen.VPSDE()
    res = sample(sde, gauss_score(sde), None, method=method, steps=8, grid=grid, x_init=_data(4, 0),
                 t_start=0.4, denoise=False)
    want = sdegen.grids.get_grid(grid, sde, 8, 1e-3, t_start=0.4) if grid != "karras" else karras(sde, 8, t_start=0.4)
    torch.testing.assert_close(res.times, want, rtol=0, atol=0)
    assert res.times[0] == 0.4


X0 = torch.zeros(4, 2)


@pytest.mark.parametrize("kw,err,match", [
    ({"x_init": X0, "t_start": 1e-3}, ValueError, "eps=0.001 must lie below t_start"),
    ({"x_init": X0, "t_start": 1.5}, ValueError, r"t_start must lie in \(eps, T\]"),
    ({"x_init": X0, "t_start": True}, TypeError, "t_start must be a real number"),
    ({"x_init": X0, "strength": 0.0}, ValueError, r"strength must lie in \(0, 1\]"),
    ({"x_init": X0, "strength": 1.5}, ValueError, r"strength must lie in \(0, 1\]"),
    ({"x_init": X0, "strength": 0.5, "t_start": 0.5}, ValueError, "not both"),
    ({"t_start": 0.5}, ValueError, "needs the data to start from"),
    ({"x_init": X0}, ValueError, "needs t_start= or strength="),
    ({"x_init": X0, "x_T": X0, "strength": 0.5}, ValueError, "x_init= .* or x_T= .*not both"),
    ({"x_init": torch.full((4, 2), math.nan), "strength": 0.5}, ValueError, "x_init contains NaN"),
    ({"x_init": X0, "strength": 0.5, "grid": torch.tensor([1.0, 0.5, 0.01])}, ValueError,
     "must start at t_start = 0.5"),
])
def test_t_start_errors(kw, err, match):
    sde = sdegen.VPSDE()
    with pytest.raises(err, match=match):
        sample(sde, gauss_score(sde), None if "x_init" in kw else (4, 2), method="ode_heun", **kw)


def test_t_start_needs_an_affine_sde_and_a_chain_time():
    custom = sdegen.CustomSDE(lambda x, t: -x, lambda t: torch.ones_like(t))
    with pytest.raises(TypeError, match="not an AffineSDE"):
        sample(custom, lambda x, t: -x, None, method="euler_maruyama", steps=5, x_init=torch.zeros(2, 2),
               t_start=0.5)
    vp = sdegen.VPSDE()
    with pytest.raises(ValueError, match="t_start=0.3333 is not on it"):
        sample(vp, gauss_score(vp), None, method="ancestral", steps=100, x_init=torch.zeros(2, 2), t_start=0.3333)
    res = sample(vp, gauss_score(vp), None, method="ancestral", steps=100, x_init=torch.zeros(2, 2), strength=0.3)
    assert res.nfe == 30 and abs(float(res.times[0]) - 0.3) < 1e-12


def test_user_grid_function_checks_steps_eps_and_start():
    sde = sdegen.VPSDE()
    g = user_grid([1.0, 0.5, 0.01], sde, steps=2, eps=0.01)
    assert g.dtype == torch.float64 and g.tolist() == [1.0, 0.5, 0.01]
    assert user_grid(np.array([0.5, 0.1]), sde, t_start=0.5).tolist() == [0.5, 0.1]


def test_score_modifying_t_in_place_is_detected():
    score = gauss_score(sdegen.VPSDE())

    def bad(x, t):
        t.mul_(1.0)
        return score(x, t)

    with pytest.raises(RuntimeError, match="modified its input t in place"):
        _sample("rk45", bad)
