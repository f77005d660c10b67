"""The one NFE counter: ``CountingScore`` counts and checks plain score calls and a model's named methods alike."""

from __future__ import annotations

import pytest
import torch

from sdegen.solvers.base import CountingScore


class _Model:
    def __call__(self, x, t, **kw):
        return -x

    def chain_predict(self, x, t, scale=1.0):
        return x * scale, -x, None

    def bad_predict(self, x, t):
        x.mul_(2.0)  # an in-place edit of the solver's state
        return x, x, None


def test_call_method_counts_with_model_kwargs():
    c = CountingScore(_Model(), {"scale": 3.0})
    x, t = torch.ones(2, 3), torch.full((2,), 0.5)
    x0, eps, var = c.call_method("chain_predict", x, t)
    assert c.nfe == 1 and torch.equal(x0, 3 * x) and var is None


def test_call_method_refuses_in_place_edits_like_a_score_call():
    c = CountingScore(_Model())
    x, t = torch.ones(2, 3), torch.full((2,), 0.5)
    with pytest.raises(RuntimeError, match="modified its input x in place"):
        c.call_method("bad_predict", x, t)
