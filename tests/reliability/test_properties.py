r"""Property tests (hypothesis): valid input never gives NaN, invalid input only documented errors.

Random SDE parameters, data shapes (vectors and images, batch 1), dtypes, methods and time grids.
The score is the exact one for N(0, I) data, $\nabla\log p_t(x) = -x/(m(t)^2 + s(t)^2)$, so every
valid run must return finite samples of the requested shape, dtype and device. Half precision is
refused with a ``TypeError`` naming ``dtype`` (documented in docs/errors.md). ``max_examples`` is kept
small so that the file runs in seconds.
"""

from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sdegen
from sdegen import NonFiniteError, SubVPSDE, VESDE, VPSDE
from sdegen._rng import PerSampleNoise

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

pos = dict(allow_nan=False, allow_infinity=False)


@st.composite
def sdes(draw):
    kind = draw(st.sampled_from(["vp", "subvp", "ve"]))
    T = draw(st.floats(0.5, 2.0, **pos))
    if kind == "ve":
        smin = draw(st.floats(1e-3, 1.0, **pos))
        return VESDE(sigma_min=smin, sigma_max=smin * draw(st.floats(2.0, 1e4, **pos)), T=T)
    bmin = draw(st.floats(0.01, 1.0, **pos))
    bmax = bmin + draw(st.floats(0.0, 30.0, **pos))
    return (VPSDE if kind == "vp" else SubVPSDE)(beta_min=bmin, beta_max=bmax, T=T)


shapes = st.one_of(
    st.tuples(st.integers(1, 3), st.integers(1, 4)),                                     # vectors
    st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4)),  # images
)


def _gaussian_score(sde):
    def score(x, t):
        m, s = sde.marginal(t)
        var = (m * m + s * s).reshape(-1, *([1] * (x.ndim - 1)))
        return -x / var

    return score


FIXED = [m for m, spec in sdegen.METHODS.items() if spec.fixed_grid]


@settings(SETTINGS, max_examples=40)
@given(sde=sdes(), shape=shapes, dtype=st.sampled_from([torch.float32, torch.float64]),
       method=st.sampled_from(FIXED + ["rk45"]), steps=st.integers(2, 12),
       eps_frac=st.floats(1e-5, 0.1, **pos), seed=st.integers(0, 2**32 - 1))
def test_valid_sampling_input_never_gives_nan(sde, shape, dtype, method, steps, eps_frac, seed):
    kwargs = dict(method=method, eps=eps_frac * sde.T, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    if method != "rk45":
        kwargs["steps"] = steps
    try:
        res = sdegen.sample(sde, _gaussian_score(sde), shape, **kwargs)
    except ValueError as err:
        # documented: the ancestral DDPM chain of a VP SDE needs steps > beta_max * T
        assert method in ("ancestral", "pc") and "steps" in str(err), err
        return
    assert res.samples.shape == shape and res.samples.dtype == dtype
    assert torch.isfinite(res.samples).all()
    assert res.nfe >= 1


@SETTINGS
@given(shape=shapes, dtype=st.sampled_from([torch.float16, torch.bfloat16]), method=st.sampled_from(FIXED))
def test_half_precision_is_refused_clearly(shape, dtype, method):
    try:
        sdegen.sample(VPSDE(), lambda x, t: -x, shape, method=method, steps=30, dtype=dtype)
    except TypeError as err:
        assert "dtype" in str(err)
    else:
        raise AssertionError(f"{method} accepted dtype={dtype}")


@SETTINGS
@given(sde=sdes(), t=st.lists(st.floats(0.0, 1.0, **pos), min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_sde_quantities_are_finite_on_the_whole_time_range(sde, t, dtype):
    tt = torch.tensor(t, dtype=dtype) * sde.T
    m, s = sde.marginal(tt)
    assert torch.isfinite(m).all() and torch.isfinite(s).all() and (m > 0).all() and (s >= 0).all()
    assert torch.isfinite(sde.diffusion(tt)).all()
    assert not torch.isnan(sde.log_snr(tt)).any()        # +inf only where s = 0
    x = torch.ones(len(t), 3, dtype=dtype)
    assert torch.isfinite(sde.drift(x, tt)).all()
    assert torch.isfinite(sde.prior_log_prob(x)).all()


@SETTINGS
@given(sde=sdes(), n=st.integers(1, 3), d=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_log_likelihood_of_valid_input_is_finite(sde, n, d, seed):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    res = sdegen.log_likelihood(sde, _gaussian_score(sde), x, rtol=1e-4, atol=1e-4, eps=1e-3 * sde.T)
    assert res.log_prob.shape == (n,) and torch.isfinite(res.log_prob).all()


@SETTINGS
@given(seeds=st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=20, unique=True),
       d=st.lists(st.integers(1, 5), min_size=1, max_size=3), step=st.integers(0, 10**6), data=st.data())
def test_per_sample_noise_is_a_function_of_the_seed_only(seeds, d, step, data):
    shape = (len(seeds), *d)
    noise = PerSampleNoise(seeds, shape, dtype=torch.float64)
    k = data.draw(st.integers(0, len(seeds) - 1))
    alone = PerSampleNoise([seeds[k]], (1, *d), dtype=torch.float64)
    assert torch.equal(alone(step)[0], noise(step)[k])
    assert torch.equal(alone.prior()[0], noise.prior()[k])
    assert torch.isfinite(noise(step)).all()


@SETTINGS
@given(bad_step=st.integers(0, 9), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       method=st.sampled_from(["euler_maruyama", "reverse_diffusion", "ode_euler", "ode_heun"]))
def test_a_bad_score_at_any_step_is_reported_at_that_step(bad_step, value, method):
    grid = torch.linspace(1.0, 1e-3, 11, dtype=torch.float64)
    t_bad = float(grid[bad_step])

    def score(x, t):
        hit = (t - t_bad).abs() < 1e-9
        return torch.where(hit.reshape(-1, 1), torch.full_like(x, value), -x)

    try:
        sdegen.sample(VPSDE(), score, (2, 2), method=method, steps=10, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0))
    except NonFiniteError as err:
        # Heun also evaluates at the end of step bad_step - 1, which is the start of step bad_step
        assert err.step in (bad_step - 1, bad_step), (err.step, bad_step)
    else:
        raise AssertionError("a non-finite score went unnoticed")
