"""Adaptive Dormand–Prince 5(4): accuracy on analytic ODEs, NFE accounting, controller, errors, per-sample mode."""

import math
import warnings

import pytest
import torch

from sdegen.solvers.base import NonFiniteError, StepSizeError
from sdegen.solvers.rk45 import DOPRI5, ButcherTableau, PIController, rk45_integrate

F64 = torch.float64


class Counting:
    """Counts calls of an ODE right-hand side (NFE is counted, never computed by formula)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, y, t):
        self.calls += 1
        return self.fn(y, t)


def linear(lam):
    return lambda y, t: lam * y


def rotation(omega):
    # y' = A y with A = [[0, -w], [w, 0]]: y(t) = R(w t) y0, |y| is conserved.
    def fn(y, t):
        return omega * torch.stack([-y[:, 1], y[:, 0]], dim=1)
    return fn


def rotate(y0, angle):
    c, s = math.cos(angle), math.sin(angle)
    return torch.stack([c * y0[:, 0] - s * y0[:, 1], s * y0[:, 0] + c * y0[:, 1]], dim=1)


# ---------------------------------------------------------------------------------------------- tableau
def test_dopri5_order_conditions():
    # Quadrature conditions sum_i b_i c_i^(k-1) = 1/k hold up to the method's order (5) for b and
    # up to 4 for the embedded weights b_hat = b - b_err; the error weights sum to zero.
    b, c = DOPRI5.b, DOPRI5.c
    b_hat = [p - q for p, q in zip(b, DOPRI5.b_err)]
    for k in range(1, 6):
        assert sum(bi * ci ** (k - 1) for bi, ci in zip(b, c)) == pytest.approx(1 / k, abs=1e-14)
    for k in range(1, 5):
        assert sum(bi * ci ** (k - 1) for bi, ci in zip(b_hat, c)) == pytest.approx(1 / k, abs=1e-14)
    assert sum(DOPRI5.b_err) == pytest.approx(0.0, abs=1e-15)
    # FSAL: the last row of a is b.
    assert DOPRI5.fsal and DOPRI5.a[-1] == DOPRI5.b[:-1]


def test_tableau_rejects_inconsistent_rows():
    with pytest.raises(ValueError, match="row 1"):
        ButcherTableau(c=(0.0, 0.5), a=((), (0.4,)), b=(0.0, 1.0), b_err=(0.0, 0.0), order=1, error_order=1, fsal=False)


# ---------------------------------------------------------------------------------------------- controller
def test_i_controller_formula_and_clamps():
    ctrl = PIController(safety=0.9, min_factor=0.2, max_factor=10.0, beta=0.0)
    # I controller: 0.9 * err^(-1/5).
    assert ctrl.factor(0.5, 1.0, 5, True) == pytest.approx(0.9 * 0.5 ** -0.2)
    assert ctrl.factor(1e-12, 1.0, 5, True) == 10.0           # clamped growth
    assert ctrl.factor(1e6, 1.0, 5, False) == 0.2              # clamped shrink
    assert ctrl.factor(0.01, 1.0, 5, False) == 1.0             # no growth right after a rejection
    assert ctrl.factor(float("nan"), 1.0, 5, False) == 0.2
    t = ctrl.factor(torch.tensor([0.5, 1e-12, 1e6, float("nan")], dtype=F64), torch.ones(4, dtype=F64), 5,
                    torch.tensor([True, True, False, False]))
    torch.testing.assert_close(t, torch.tensor([0.9 * 0.5 ** -0.2, 10.0, 0.2, 0.2], dtype=F64))


def test_pi_controller_uses_previous_error():
    ctrl = PIController(beta=0.04)
    alpha = 0.2 - 0.75 * 0.04
    assert ctrl.factor(0.5, 0.25, 5, True) == pytest.approx(0.9 * 0.5 ** -alpha * 0.25 ** 0.04)


@pytest.mark.parametrize("kwargs", [dict(safety=0.0), dict(min_factor=1.5), dict(max_factor=0.5), dict(beta=0.3)])
def test_controller_validates(kwargs):
    with pytest.raises(ValueError):
        PIController(**kwargs)


# ---------------------------------------------------------------------------------------------- accuracy
@pytest.mark.parametrize("t0,t1", [(0.0, 2.0), (2.0, 0.0), (1.0, 0.001)])
def test_linear_ode_error_within_tolerance(t0, t1):
    lam = -1.3
    y0 = torch.linspace(0.5, 2.0, 6, dtype=F64).reshape(3, 2)
    exact = y0 * math.exp(lam * (t1 - t0))
    for tol in (1e-4, 1e-7, 1e-10):
        y1, stats, _ = rk45_integrate(linear(lam), y0, t0, t1, rtol=tol, atol=tol)
        # The local error per unit step is kept below tol; on this non-stiff problem the global
        # error stays within a small multiple of tol * (1 + |y|) (measured ~0.1x; bound 10x).
        bound = 10 * tol * (1 + exact.abs())
        assert ((y1 - exact).abs() <= bound).all(), (tol, (y1 - exact).abs().max())
        assert y1.dtype == F64 and y1.shape == y0.shape


def test_rotation_error_and_convergence_in_rtol():
    y0 = torch.tensor([[1.0, 0.0], [0.3, -0.7]], dtype=F64)
    exact = rotate(y0, 2 * math.pi * 1.5)
    errs, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7, 1e-9):
        fn = Counting(rotation(2 * math.pi))
        y1, stats, _ = rk45_integrate(fn, y0, 0.0, 1.5, rtol=tol, atol=tol)
        errs.append(float((y1 - exact).abs().max()))
        nfes.append(fn.calls)
        assert errs[-1] < 100 * tol
    # Tighter tolerance: strictly smaller error, strictly more work. For a 5th-order method the
    # error scales roughly like tol (error per unit step control), NFE like tol^(-1/5).
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert all(a < b for a, b in zip(nfes, nfes[1:])), nfes
    slope = math.log(errs[0] / errs[-1]) / math.log(1e-3 / 1e-9)
    assert 0.7 < slope < 1.3, slope


def test_time_dependent_ode_receives_batched_time():
    # y' = cos(t) per sample: y(t1) = y0 + sin(t1) - sin(t0); checks the stage times c_i h.
    seen = []

    def fn(y, t):
        seen.append(t.shape)
        return torch.cos(t)[:, None].expand_as(y)

    y0 = torch.zeros(4, 3, dtype=F64)
    y1, _, _ = rk45_integrate(fn, y0, 3.0, 0.5, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y1, torch.full_like(y0, math.sin(0.5) - math.sin(3.0)), rtol=0, atol=1e-8)
    assert set(seen) == {torch.Size([4])}


# ---------------------------------------------------------------------------------------------- NFE and stats
@pytest.mark.parametrize("per_sample", [False, True])
def test_fsal_nfe_accounting(per_sample):
    # FSAL: 1 initial evaluation, 1 for the automatic first step, then 6 per attempted step.
    # A too-large first step forces rejections, so both counts are exercised.
    y0 = torch.ones(3, 2, dtype=F64)
    for first_step, extra in ((None, 2), (1.0, 1)):
        fn = Counting(linear(-20.0))
        _, stats, _ = rk45_integrate(fn, y0, 0.0, 1.0, rtol=1e-6, atol=1e-6, first_step=first_step,
                                     per_sample=per_sample)
        attempts = stats["steps"] if per_sample else stats["accepted"] + stats["rejected"]
        assert fn.calls == stats["nfe"] == extra + 6 * attempts
        if first_step is not None:
            assert stats["rejected"] > 0


def test_trajectory_recording_and_t0_equals_t1():
    y0 = torch.ones(2, 2, dtype=F64)
    y1, stats, traj = rk45_integrate(linear(-1.0), y0, 1.0, 0.0, record_every=2)
    ts = [t for t, _ in traj]
    assert ts[0] == 1.0 and ts[-1] == 0.0 and all(a > b for a, b in zip(ts, ts[1:]))
    assert len(traj) == 2 + (stats["accepted"] - 1) // 2
    torch.testing.assert_close(traj[-1][1], y1)
    times = stats["times"]
    assert times.dtype == F64 and len(times) == stats["accepted"] + 1
    assert times[0] == 1.0 and times[-1] == 0.0 and (times[1:] < times[:-1]).all()
    y_same, stats0, _ = rk45_integrate(linear(-1.0), y0, 0.5, 0.5)
    assert y_same is y0 and stats0["nfe"] == 0


def test_progress_bar_runs(capsys):
    y1, _, _ = rk45_integrate(linear(-1.0), torch.ones(2, 1, dtype=F64), 0.0, 1.0, progress=True)
    y2, _, _ = rk45_integrate(linear(-1.0), torch.ones(2, 1, dtype=F64), 0.0, 1.0, progress=True, per_sample=True)
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)


def test_float32_keeps_dtype():
    y0 = torch.ones(5, 2, dtype=torch.float32)
    y1, _, _ = rk45_integrate(linear(-1.0), y0, 0.0, 1.0, rtol=1e-5, atol=1e-5)
    assert y1.dtype == torch.float32
    torch.testing.assert_close(y1, torch.full_like(y0, math.exp(-1.0)), rtol=0, atol=1e-4)


def test_tolerance_below_dtype_resolution_warns():
    import warnings

    y0 = torch.ones(5, 2, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="below the resolution of torch.float32"):
        rk45_integrate(linear(-1.0), y0, 0.0, 0.1, rtol=1e-9, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rk45_integrate(linear(-1.0), y0, 0.0, 0.1, rtol=1e-5, atol=1e-9)         # rtol resolvable: quiet
        rk45_integrate(linear(-1.0), y0.double(), 0.0, 0.1, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------- per-sample
def test_per_sample_equals_each_sample_alone():
    # Each sample has its own controller and RMS norm: the batched per-sample solve must reproduce
    # solving every sample on its own (same steps, same result), whatever the other samples do.
    lams = torch.tensor([-0.5, -30.0, -300.0, 0.7], dtype=F64)
    y0 = torch.tensor([[1.0, 2.0], [0.5, -1.0], [1.0, 1.0], [-2.0, 0.1]], dtype=F64)

    def fn(y, t):
        return lams[:, None] * y * (1 + 0.5 * torch.sin(3 * t))[:, None]

    y1, stats, _ = rk45_integrate(fn, y0, 0.0, 1.0, rtol=1e-7, atol=1e-9, per_sample=True)
    for i in range(4):
        yi, si, _ = rk45_integrate(lambda y, t: lams[i] * y * (1 + 0.5 * torch.sin(3 * t))[:, None],
                                   y0[i:i + 1], 0.0, 1.0, rtol=1e-7, atol=1e-9)
        torch.testing.assert_close(y1[i:i + 1], yi, rtol=1e-12, atol=1e-14)
        assert int(stats["accepted_per_sample"][i]) == si["accepted"]
        assert int(stats["rejected_per_sample"][i]) == si["rejected"]
    # The easy samples took far fewer steps than the stiff one.
    acc = stats["accepted_per_sample"]
    assert acc[0] * 5 < acc[2] and acc[3] * 5 < acc[2]


def test_per_sample_finished_samples_do_not_change():
    lams = torch.tensor([-1.0, -200.0], dtype=F64)
    values = []

    def fn(y, t):
        values.append((t.clone(), y.clone()))
        return lams[:, None] * y

    y1, stats, _ = rk45_integrate(fn, torch.ones(2, 1, dtype=F64), 0.0, 1.0, per_sample=True)
    final = y1[0, 0]
    # Trailing calls in which the easy sample sits at t1 with its final value: every attempted step
    # of the stiff sample after the easy one finished (6 calls each) leaves it untouched.
    n_const = 0
    for t, y in reversed(values):
        if not (t[0] == 1.0 and y[0, 0] == final):
            break
        n_const += 1
    acc = stats["accepted_per_sample"]
    assert n_const >= 6 * (int(acc[1]) - int(acc[0])) - 6
    assert float(final) == pytest.approx(math.exp(-1.0), abs=1e-5)


# ---------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("per_sample", [False, True])
def test_step_size_underflow_carries_state(per_sample):
    # y' = y^2, y(0) = 1 blows up at t = 1: the step size must underflow there.
    with pytest.raises(StepSizeError, match="underflow") as info:
        rk45_integrate(lambda y, t: y * y, torch.ones(2, 1, dtype=F64), 0.0, 2.0, per_sample=per_sample)
    e = info.value
    t = float(torch.as_tensor(e.t).max())
    assert 0.99 < t < 1.01  # the numerical blow-up time carries the solver error
    assert float(torch.as_tensor(e.dt).abs().max()) < 1e-10
    assert e.x is not None and e.x.shape == (2, 1) and float(e.x.min()) > 50


@pytest.mark.parametrize("per_sample", [False, True])
def test_max_steps_guard(per_sample):
    with pytest.raises(StepSizeError, match="max_steps=3") as info:
        rk45_integrate(linear(-1.0), torch.ones(2, 1, dtype=F64), 0.0, 10.0, max_steps=3, per_sample=per_sample)
    assert info.value.steps == 3 and info.value.x is not None


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("where", ["start", "later"])
def test_non_finite_rhs_raises(per_sample, where):
    if where == "start":
        fn = lambda y, t: y * float("nan")  # noqa: E731
    else:
        fn = lambda y, t: torch.where((t > 0.5)[:, None], torch.full_like(y, float("inf")), -y)  # noqa: E731
    with pytest.raises(NonFiniteError) as info:
        rk45_integrate(fn, torch.ones(3, 1, dtype=F64), 0.0, 2.0, per_sample=per_sample)
    assert info.value.t == pytest.approx(0.0 if where == "start" else 0.5, abs=1e-9)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rtol=-1.0), "rtol"), (dict(rtol=0.0, atol=0.0), "both"), (dict(max_steps=0), "max_steps"),
    (dict(first_step=-0.1), "first_step"), (dict(record_every=0), "record_every"),
])
def test_argument_validation(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        rk45_integrate(linear(-1.0), torch.ones(2, 1, dtype=F64), 0.0, 1.0, **kwargs)


def test_bad_rhs_shape_and_times():
    with pytest.raises(ValueError, match="shaped like y"):
        rk45_integrate(lambda y, t: y[:, :1], torch.ones(2, 3, dtype=F64), 0.0, 1.0)
    with pytest.raises(TypeError, match="t1"):
        rk45_integrate(linear(-1.0), torch.ones(2, 3, dtype=F64), 0.0, float("inf"))
    with pytest.raises(TypeError, match="floating"):
        rk45_integrate(linear(-1.0), torch.ones(2, 3, dtype=torch.long), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("per_sample", [False, True])
def test_cuda_stays_on_device_and_syncs_once_per_step(per_sample):
    dev = torch.device("cuda")
    lam = torch.tensor([-1.0, -3.0], device=dev, dtype=F64)
    y0 = torch.ones(2, 4, device=dev, dtype=F64)
    fn = lambda y, t: lam[:, None] * y  # noqa: E731
    rk45_integrate(fn, y0, 0.0, 1.0, per_sample=per_sample)  # warm-up
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y1, stats, _ = rk45_integrate(fn, y0, 0.0, 1.0, per_sample=per_sample)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert y1.device.type == "cuda" and y1.dtype == F64
    torch.testing.assert_close(y1, torch.exp(lam)[:, None].expand(2, 4), rtol=0, atol=1e-5)
    syncs = sum("synchroniz" in str(w.message) for w in rec)
    steps = stats["steps"] if per_sample else stats["accepted"] + stats["rejected"]
    # One host read per step, plus a constant number at start-up and for the final statistics.
    assert syncs <= steps + 6, (syncs, steps)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("t0,t1", [(1.0, 1e-3), (1e-3, 1.0)])
def test_never_evaluates_outside_the_interval(per_sample, t0, t1):
    # A nearly constant solution makes the automatic first step huge; a score function is only
    # defined on [0, T], so no stage (and no first-step probe) may leave [min(t0,t1), max(t0,t1)].
    lo, hi = min(t0, t1), max(t0, t1)

    def fn(y, t):
        assert ((t >= lo - 1e-12) & (t <= hi + 1e-12)).all(), t
        return 1e-9 * y

    y1, stats, _ = rk45_integrate(fn, torch.ones(3, 2, dtype=F64), t0, t1, per_sample=per_sample)
    torch.testing.assert_close(y1, torch.full_like(y1, math.exp(1e-9 * (t1 - t0))))


def test_gradients_flow_through_the_solve_and_match_the_fast_path():
    # With y0 requiring grad the solver keeps every stage as a fresh tensor (autograd-safe); for
    # y' = lam y, dy(1)/dy0 = exp(lam) up to the solver tolerance. The no-grad fast path (stage
    # buffers) must give the same numbers to rounding.
    lam = -0.7
    y0 = torch.full((3, 2), 1.5, dtype=F64, requires_grad=True)
    y1, stats, _ = rk45_integrate(linear(lam), y0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    (g,) = torch.autograd.grad(y1.sum(), y0)
    torch.testing.assert_close(g, torch.full_like(g, math.exp(lam)), rtol=0, atol=1e-7)
    with torch.no_grad():
        y_fast, stats_fast, _ = rk45_integrate(linear(lam), y0, 0.0, 1.0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(y_fast, y1.detach(), rtol=1e-13, atol=1e-13)
    assert stats_fast["accepted"] == stats["accepted"] and stats_fast["nfe"] == stats["nfe"]
