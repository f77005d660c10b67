"""The benchmarks' method lists are read from sdegen.METHODS: every row, and a new one, is benchmarked."""

from __future__ import annotations

import pytest
import torch

import sdegen
from sdegen.bench import _methods, best_of, device, samplers, solvers
from sdegen.sampling import METHODS, sample


@pytest.fixture
def new_row(monkeypatch):
    """A new fixed-grid probability-flow row (ODE Euler under another name), as if added to METHODS."""
    monkeypatch.setitem(METHODS, "ode_euler_again", METHODS["ode_euler"])
    yield "ode_euler_again"
    _methods.nfe_line.cache_clear()


def test_every_row_is_in_each_benchmark():
    rows = set(METHODS)
    fixed = {m for m, spec in METHODS.items() if spec.fixed_grid}
    assert set(samplers.FIXED) == {m for m, spec in METHODS.items() if spec.build is not None}
    assert set(samplers.accuracy_knobs()) == rows
    assert set(device._method_options()) == rows
    bench_rows = {method for method, *_ in {**solvers._methods(False), **solvers._tol_methods(False)}.values()}
    assert bench_rows == rows
    swept = {method for method, *_ in best_of._sweep_methods().values()}
    deterministic = {m for m in samplers.FIXED if not METHODS[m].reverse_sde} - best_of._NOT_DETERMINISTIC
    assert swept == deterministic
    # the overhead table times every native row; the adapters to other libraries are compared elsewhere
    assert set(_methods.native_methods()) == rows - {"torchdiffeq", "scipy", "torchsde"}
    assert fixed == set(_methods.fixed_step_methods())


def test_a_new_row_is_benchmarked(new_row):
    assert new_row in _methods.loop_methods()
    assert samplers.accuracy_knobs()[new_row] == [25, 50, 100, 200, 400]   # one evaluation per step
    label = solvers._methods(False)[new_row]
    assert label[0] == new_row and label[1] == {} and label[2](40) == 40 and label[3] == "ode"
    assert solvers._overhead_of(new_row) == new_row and solvers._overhead_options(new_row) == {}
    assert best_of._sweep_methods()[new_row][2](40) == 40
    assert device._method_options()[new_row] == {"steps": 100}


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.fixed_grid])
def test_steps_for_nfe_spends_at_most_the_budget_and_one_more_step_exceeds_it(method):
    sde = sdegen.VPSDE()

    def nfe(steps):
        return sample(sde, lambda x, t: -x, (2, 2), method=method, steps=steps, dtype=torch.float64,
                      generator=torch.Generator().manual_seed(0)).nfe

    steps = _methods.steps_for_nfe(method, 60)
    assert nfe(steps) <= 60 < nfe(steps + 1)
