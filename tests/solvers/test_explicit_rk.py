"""The explicit-RK core: the EM/Heun pair reproduces adaptive_sde's step, DOPRI5 keeps its order,
the two implementations (list, buffers) agree for both declared error norms. Float64 throughout."""

import math

import pytest
import torch

from sdegen.solvers.explicit_rk import (HAIRER_NORM, MIXED_MAX_NORM, BufferStepper, Dopri5, EulerHeun, ListStepper,
                                        ODETerm, TableauRK)
from sdegen.solvers.tableaus import DOPRI5, EM_HEUN

F64 = torch.float64


class _Term:
    """dx = v(x, t) dt + sigma(t) dW with v = -(1 + t) x + sin(t), sigma = 0.5 + t (hand-computable)."""

    @staticmethod
    def drift(x, t):
        return -(1 + t)[:, None] * x + torch.sin(t)[:, None]

    @staticmethod
    def diffusion(t):
        return 0.5 + t


def test_em_heun_is_data_with_the_declared_weights():
    # b = (1/2, 1/2) (Heun), embedded b_hat = (1, 0) (Euler): b_err = b - b_hat.
    assert EM_HEUN.c == (0.0, 1.0) and EM_HEUN.a == ((), (1.0,)) and EM_HEUN.b == (0.5, 0.5)
    assert EM_HEUN.b_err == (-0.5, 0.5) and not EM_HEUN.fsal
    assert EulerHeun.tableau is EM_HEUN and EulerHeun.stochastic and EulerHeun.evals_per_step == 2
    assert Dopri5.tableau is DOPRI5 and not Dopri5.stochastic and Dopri5.evals_per_step == 6 and Dopri5.order == 5


@pytest.mark.parametrize("per_sample", [False, True])
def test_em_heun_step_reproduces_the_adaptive_sde_formulas(per_sample):
    # adaptive_sde's module docstring, with h > 0 the step from t down to t - h and F the drift:
    #   x' = x - h F(x, t) + g(t) dW,  x~ = x - h F(x', t - h) + g(t - h) dW,  x'' = (x' + x~) / 2,
    #   delta = max(atol, rtol max(|x'|, |x|)),  E = ||(x' - x'') / delta||_2 / sqrt(n).
    # Computed here entry by entry in Python floats; the core takes the signed dt = -h.
    x = torch.tensor([[0.3, -1.2], [2.0, 0.1]], dtype=F64)
    dw = torch.tensor([[0.05, -0.02], [-0.11, 0.07]], dtype=F64)
    t, h, rtol, atol = 0.6, 0.05, 0.01, 0.003
    F = lambda xi, ti: -(1 + ti) * xi + math.sin(ti)  # noqa: E731
    g = lambda ti: 0.5 + ti  # noqa: E731
    x_new, sq = [], []
    for b in range(2):
        row = []
        for d in range(2):
            xi, wi = float(x[b, d]), float(dw[b, d])
            x_em = xi - h * F(xi, t) + g(t) * wi
            x_tl = xi - h * F(x_em, t - h) + g(t - h) * wi
            x_ie = 0.5 * (x_em + x_tl)
            delta = max(atol, rtol * max(abs(x_em), abs(xi)))
            row.append(x_ie)
            sq.append(((x_em - x_ie) / delta) ** 2)
        x_new.append(row)
    if per_sample:
        err = [math.sqrt((sq[0] + sq[1]) / 2), math.sqrt((sq[2] + sq[3]) / 2)]
    else:
        err = math.sqrt(sum(sq) / 4)
    t0 = torch.full((2,), t, dtype=F64)
    y, e, state = EulerHeun(rtol=rtol, atol=atol, per_sample=per_sample).step(_Term(), x, t0, t0 - h, None, dw)
    torch.testing.assert_close(y, torch.tensor(x_new, dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(e, torch.tensor(err, dtype=F64), rtol=1e-12, atol=0)
    assert state is None  # not FSAL: the next attempt evaluates its own first stage


@pytest.mark.parametrize("make", [lambda: Dopri5(), lambda: TableauRK(EM_HEUN)], ids=["dopri5", "heun"])
def test_convergence_order_on_a_linear_ode(make):
    # y' = lam y on [0, 1] with N fixed steps of the core (no controller): the global error is
    # C N^-p; the fitted slope of log error on log N must be the step's declared order (within 0.2).
    step = make()
    lam = -1.3
    term = ODETerm(lambda y, t: lam * y)
    errs, ns = [], [8, 16, 32] if step.order >= 5 else [16, 32, 64]  # asymptotic, far above rounding
    for n in ns:
        y = torch.ones(1, 1, dtype=F64)
        for i in range(n):
            t0 = torch.full((1,), i / n, dtype=F64)
            y, _, _ = step.step(term, y, t0, torch.full((1,), (i + 1) / n, dtype=F64), None, None)
        errs.append(abs(float(y) - math.exp(lam)))
    slope = -(math.log(errs[-1]) - math.log(errs[0])) / (math.log(ns[-1]) - math.log(ns[0]))
    assert abs(slope - step.order) < 0.2, (slope, errs)


def test_dopri5_error_estimate_is_the_embedded_difference():
    # One step of y' = lam y from y = 1: y_new - y_hat, with y_hat the 4th-order weights, equals
    # h * sum b_err_i k_i; the Hairer norm divides it by atol + rtol max(|y|, |y_new|).
    lam, h, rtol, atol = -2.0, 0.3, 1e-3, 1e-4
    b_hat = [p - q for p, q in zip(DOPRI5.b, DOPRI5.b_err)]
    ks = []
    for i in range(DOPRI5.stages):
        yi = 1.0 + h * sum(a * k for a, k in zip(DOPRI5.a[i], ks))
        ks.append(lam * yi)
    y_new = 1.0 + h * sum(b * k for b, k in zip(DOPRI5.b, ks))
    y_hat = 1.0 + h * sum(b * k for b, k in zip(b_hat, ks))
    err = abs(y_new - y_hat) / (atol + rtol * max(1.0, abs(y_new)))
    zero = torch.zeros(1, dtype=F64)
    y, e, k_last = Dopri5(rtol=rtol, atol=atol).step(ODETerm(lambda y, t: lam * y), torch.ones(1, 1, dtype=F64),
                                                     zero, zero + h, None, None)
    assert float(y) == pytest.approx(y_new, abs=1e-15)
    assert float(e) == pytest.approx(err, rel=1e-9)
    assert float(k_last) == pytest.approx(lam * y_new, abs=1e-15)  # FSAL: the next step's first stage


@pytest.mark.parametrize("norm", [HAIRER_NORM, MIXED_MAX_NORM], ids=["hairer", "mixed_max"])
@pytest.mark.parametrize("tab", [DOPRI5, EM_HEUN], ids=["dopri5", "heun"])
def test_buffer_and_list_implementations_agree(norm, tab):
    # The no-grad buffers and the differentiable list are one step rule: same solution, same norm.
    f = lambda y, t: -(1 + t)[:, None] * y + 0.3  # noqa: E731
    y0 = torch.linspace(-2, 2, 6, dtype=F64).reshape(3, 2)
    k1 = f(y0, torch.zeros(3, dtype=F64))
    fast = BufferStepper(f, tab, y0, k1, 1e-3, 1e-4, norm)
    slow = ListStepper(f, tab, y0, k1, 1e-3, 1e-4, norm)
    for t, dt in ((0.0, 0.2), (0.2, 0.15)):
        e_fast, e_slow = float(fast.attempt(t, dt)), float(slow.attempt(t, dt))
        assert e_fast == pytest.approx(e_slow, rel=1e-12)
        fast.accept(t + dt)
        slow.accept(t + dt)
        torch.testing.assert_close(fast.state(), slow.state(), rtol=0, atol=1e-15)
