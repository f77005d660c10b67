"""Fault injection: bad score functions, the ends of the time range, and adaptive step-size failures.

Every sampler method must turn a score that returns NaN/inf (from some time on) or that explodes at
small t into a :class:`NonFiniteError` naming the step and the time, with the last good state; the
SDEs must stay finite at t = 0 and t = T; RK45 must report step-size underflow and ``max_steps``
as :class:`StepSizeError` with the state reached.
"""

from __future__ import annotations

import math

import pytest
import torch

import sdegen
from sdegen import NonFiniteError, StepSizeError, SubVPSDE, VESDE, VPSDE

ADAPTIVE = {m for m, spec in sdegen.METHODS.items() if not spec.fixed_grid}
T_BAD = 0.5
# Known defects, routed to the owners (strict xfail: the test fails once the defect is fixed).
KNOWN: dict = {}  # every fault below is now caught; add (method, fault): reason for a new known defect


def _bad_after(t_bad: float, value: float):
    """A score that is exact for N(0, I) data (-x) for t >= t_bad and ``value`` below it."""

    def score(x, t):
        bad = (t < t_bad).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.where(bad, torch.full_like(x, value), -x)

    return score


def _exploding(x, t):
    r"""$-x\,e^{0.2/t^2}$: moderate at t = 1 (x1.22), overflows float64 for $t < 0.0168$."""
    return -x * torch.exp(0.2 / t.square()).reshape(-1, *([1] * (x.ndim - 1)))


FAULTS = {
    "nan": (_bad_after(T_BAD, math.nan), T_BAD),
    "inf": (_bad_after(T_BAD, math.inf), T_BAD),
    # adaptive solvers would crawl through the stiff smooth explosion; give them an abrupt one
    "explode": (_exploding, math.sqrt(0.2 / 709.0)),
}


def _cases():
    for method in sdegen.METHODS:
        for fault in FAULTS:
            reason = KNOWN.get((method, fault))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(method, fault, id=f"{method}-{fault}", marks=marks)


@pytest.mark.parametrize("method,fault", list(_cases()))
def test_non_finite_score_is_caught_with_step_and_time(method, fault):
    score, t_fault = FAULTS[fault]
    if fault == "explode" and method in ADAPTIVE:
        score, t_fault = _bad_after(0.01, math.inf), 0.01
    steps = None if method in ADAPTIVE else 100
    # bounded retries, so that a solver that keeps rejecting NaN steps fails fast
    opts = {"max_steps": 5000} if "max_steps" in sdegen.METHODS[method].allowed_options() else {}
    with pytest.raises(NonFiniteError) as info:
        sdegen.sample(VPSDE(), score, (3, 2), method=method, steps=steps, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0), **opts)
    err = info.value
    assert isinstance(err.step, int) and err.step >= 0, err
    assert err.t is not None and math.isfinite(err.t), err
    # Fixed grids of 100 steps (spacing <= 0.03 near t = 0.5 and <= 0.01 near t = 0.017, also on
    # Karras/log-SNR grids): the first bad step starts within one step of the fault time. Adaptive
    # steps may be long, but a step that fails starts at or above the fault time.
    h = 0.01 if fault == "explode" else 0.03
    # Adaptive solvers name either the start of the failing step (>= the fault time) or, for the
    # external backends, the time of the first non-finite evaluation (< the fault time, >= eps).
    lo, hi = (1e-3 - 1e-9, t_fault + 0.3) if method in ADAPTIVE else (t_fault - h, t_fault + h)
    if fault == "explode" and method not in ADAPTIVE:
        hi = 0.2  # an explicit step becomes unstable once g^2 |score| dt >> 1, before the score overflows
    assert lo <= err.t <= hi, (err.t, t_fault, str(err))
    assert f"{err.t:.4g}"[:4] in str(err) or "t=" in str(err)
    if err.x is not None:
        assert torch.isfinite(err.x).all()


def test_transient_nan_in_fixed_grid_names_the_first_bad_step():
    calls = {"n": 0}

    def score(x, t):
        calls["n"] += 1
        return torch.full_like(x, math.nan) if calls["n"] == 7 else -x

    with pytest.raises(NonFiniteError) as info:
        sdegen.sample(VPSDE(), score, (2, 3), method="euler_maruyama", steps=40, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(1))
    # call 7 is step 6 (one evaluation per step), starting at t = 1 - 6 (1 - eps) / 40
    assert info.value.step == 6
    assert info.value.t == pytest.approx(1 - 6 * (1 - 1e-3) / 40, abs=1e-12)


@pytest.mark.parametrize("sde", [VPSDE(), SubVPSDE(), VESDE(), VPSDE(beta_min=1e-4, beta_max=1e-3),
                                 VESDE(sigma_min=1e-4, sigma_max=1e4)], ids=repr)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sde_quantities_are_finite_at_the_ends_of_the_time_range(sde, dtype):
    T = sde.T
    t = torch.tensor([0.0, 1e-12, 1e-7, 1e-3, T - 1e-7, T], dtype=dtype)
    x = torch.linspace(-3, 3, 6 * 4, dtype=dtype).reshape(6, 4)
    m, s = sde.marginal(t)
    for name, v in {"mean_coef": m, "std": s, "diffusion": sde.diffusion(t), "drift": sde.drift(x, t),
                    "sigma": sde.sigma(t), "prior_log_prob": sde.prior_log_prob(x)}.items():
        assert torch.isfinite(v).all(), (name, v)
    assert (s >= 0).all() and s[0] == 0 and (m > 0).all()
    # log-SNR is +inf exactly at t = 0 (s = 0) and finite elsewhere, never NaN
    lsnr = sde.log_snr(t)
    assert not torch.isnan(lsnr).any() and torch.isfinite(lsnr[1:]).all(), lsnr
    r, q = sde.transition(t[:-1], t[1:])
    assert torch.isfinite(r).all() and torch.isfinite(q).all() and (q >= 0).all()
    f, G = sde.discretize_step(x, t.clamp_min(1e-3), 1e-3)
    assert torch.isfinite(f).all() and torch.isfinite(G).all()
    # Tweedie conversions wherever s > 0
    score = -x / s.clamp_min(1e-30).square().reshape(-1, 1)
    tt, xx, ss = t[1:], x[1:], score[1:]
    for v in (sde.x0_from_score(xx, tt, ss), sde.eps_from_score(xx, tt, ss), sde.score_from_x0(xx, tt, xx)):
        assert torch.isfinite(v).all()


@pytest.mark.parametrize("sde", [VPSDE(), VESDE()], ids=repr)
@pytest.mark.parametrize("method", ["euler_maruyama", "rk45"])
@pytest.mark.parametrize("eps", [1e-8])
def test_sampling_to_tiny_eps_stays_finite(sde, method, eps):
    gm = sdegen.named_mixture("gaussian")
    steps = None if method in ADAPTIVE else 50
    res = sdegen.sample(sde, gm.score_fn(sde), (16, 2), method=method, steps=steps, eps=eps, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(2))
    assert torch.isfinite(res.samples).all()
    # the exact oracle score gives samples near N(0.5, 0.25 I): a loose sanity bound (16 points)
    assert res.samples.mean().sub(0.5).abs() < 0.6


def test_oracle_score_is_finite_at_t_zero_and_T():
    gm = sdegen.named_mixture("8gaussians")
    x = gm.sample(8, generator=torch.Generator().manual_seed(3))
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        for t in (0.0, sde.T):
            assert torch.isfinite(gm.score_fn(sde)(x, torch.full((8,), t, dtype=x.dtype))).all()
            assert torch.isfinite(gm.log_prob_t(x, t, sde)).all()


# ---------------------------------------------------------------------------------------------- RK45
def test_rk45_max_steps_is_a_step_size_error_with_the_state():
    with pytest.raises(StepSizeError) as info:
        sdegen.sample(VPSDE(), lambda x, t: -x, (4, 2), method="rk45", max_steps=3, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(4))
    err = info.value
    assert "max_steps" in str(err)
    assert err.x is not None and err.x.shape == (4, 2) and torch.isfinite(err.x).all()
    assert err.t is not None and 0 < float(err.t) <= 1.0


def test_rk45_step_size_underflow_is_a_step_size_error_with_the_state():
    # A score with a jump at t = 0.5 that grows with x makes the error estimate never small enough
    # at the jump: the step shrinks below the spacing of floats at t.
    def jumpy(x, t):
        return torch.where((t < 0.5).reshape(-1, 1), 1e12 * torch.sign(torch.sin(1e9 * x)), -x)

    with pytest.raises((StepSizeError, NonFiniteError)) as info:
        sdegen.sample(VPSDE(), jumpy, (2, 2), method="rk45", rtol=1e-10, atol=1e-10, max_steps=20_000,
                      dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    err = info.value
    assert err.x is not None and torch.isfinite(err.x).all()
    assert err.t is not None


def test_non_finite_x_T_is_refused_or_caught():
    x_T = torch.zeros(3, 2, dtype=torch.float64)
    x_T[1, 0] = math.nan
    with pytest.raises((ValueError, NonFiniteError)):
        sdegen.sample(VPSDE(), lambda x, t: -x, None, x_T=x_T, method="euler_maruyama", steps=10)
