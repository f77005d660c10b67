"""The PI controller's rule after a rejection: the first accepted step does not grow (Hairer's dopri5, scipy RK45)."""

from __future__ import annotations

import torch

from sdegen.solvers.controllers import PIController


def test_no_growth_right_after_a_rejection_host_floats():
    c = PIController()
    grow = c.factor(0.01, 1.0, 5, True)
    assert grow > 1.5                                        # a small error grows the step ...
    assert c.factor(0.01, 1.0, 5, True, after_reject=True) == 1.0  # ... but not right after a rejection
    assert PIController(hold_after_reject=False).factor(0.01, 1.0, 5, True, after_reject=True) == grow
    # a step that shrinks anyway is unaffected
    assert c.factor(0.9, 1.0, 5, True, after_reject=True) == c.factor(0.9, 1.0, 5, True) < 1.0


def test_no_growth_right_after_a_rejection_per_sample():
    c = PIController()
    err = torch.tensor([0.01, 0.01, 2.0], dtype=torch.float64)
    ok = err <= 1
    after = torch.tensor([False, True, True])
    fac = c.factor(err, torch.ones(3, dtype=torch.float64), 5, ok, after_reject=after)
    host = [c.factor(float(e), 1.0, 5, bool(a), after_reject=bool(r)) for e, a, r in zip(err, ok, after)]
    assert torch.allclose(fac, torch.tensor(host, dtype=torch.float64), rtol=1e-12)
    assert fac[0] > 1.5 and fac[1] == 1.0 and fac[2] < 1.0
