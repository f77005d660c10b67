r"""Solver interfaces and the one loop that drives every fixed-grid solver.

Time convention: samplers integrate forward time $t$ *downwards*, from ``T`` to ``eps``; every
step has $t_1 < t_0$ and a signed $\Delta t = t_1 - t_0 < 0$. Brownian increments ``dw`` for a
step have variance $|\Delta t|$ and are drawn by the loop (or supplied by a test that refines one
path), never by the solver.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..sdes import SDE, ReverseSDE
from .brownian import BrownianPath
from .controllers import FixedGrid
from .marginal_rows import GridCoefficients, check_table_grid

__all__ = [
    "SampleResult",
    "NonFiniteError",
    "StepSizeError",
    "CountingScore",
    "check_finite_state",
    "Dynamics",
    "AbstractFixedGridSolver",
    "TabulatedSolver",
    "integrate_fixed_grid",
    "GridSteps",
    "progress_bar",
]


@dataclass(frozen=True)
class SampleResult:
    """What every sampler returns.

    Attributes:
        samples: ``(B, *D)`` final samples.
        nfe: number of score-function evaluations actually made (counted by a wrapper).
        trajectory: ``[(t, x), ...]`` snapshots (``x`` detached copies), or ``None``.
        times: 1-D float64 CPU tensor of the times visited (the grid, or accepted steps).
        stats: solver statistics, e.g. ``{"accepted": 31, "rejected": 2}`` for adaptive solvers.
    """

    samples: Tensor
    nfe: int
    trajectory: list[tuple[float, Tensor]] | None = None
    times: Tensor | None = None
    stats: dict = field(default_factory=dict)


class NonFiniteError(FloatingPointError):
    """The state or the score became NaN/inf during integration.

    Attributes:
        step: index of the first bad step (0 = the step leaving the start time), or ``None``.
        t: forward time at the start of that step (the solver runs from ``T`` down to ``eps``).
        sample: index in the batch of a sample that went bad (the first non-finite one when the error
            was detected; for the fixed-grid loop that is at the end of the checked block), or ``None``
            where unknown.
        x: the last good state, ``(B, *D)`` with every entry finite (or ``None`` where none exists):
            the state the failing step started from. Adaptive solvers check every step, so it is the
            state at ``t`` (per-sample ``rk45``: each sample at its own time). The fixed-grid loop
            reads its finiteness flags once every ``check_every`` steps, so ``x`` is the last state
            it checked, at time ``x_t``, up to ``check_every`` steps before ``step``.
        x_t: the forward time of ``x`` (``None`` for per-sample states or when ``x`` is ``None``).
    """

    def __init__(self, message: str, *, step: int | None = None, t: float | None = None, x: Tensor | None = None,
                 sample: int | None = None, x_t: float | None = None):
        super().__init__(message)
        self.step, self.t, self.x, self.sample, self.x_t = step, t, x, sample, x_t


class StepSizeError(RuntimeError):
    """An adaptive solver's step size underflowed or it exceeded ``max_steps``; the state is kept."""

    def __init__(self, message: str, *, t: Any = None, dt: Any = None, x: Tensor | None = None, steps: int | None = None):
        super().__init__(message)
        self.t, self.dt, self.x, self.steps = t, dt, x, steps


def check_finite_state(x: Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the first bad sample if ``x`` has NaN/inf entries.

    One host read, made once at an entry point (never per step): a non-finite start state is bad
    input and is reported as such, not later as a non-finite score.
    """
    if x.numel() == 0:
        return
    ok = torch.isfinite(x.reshape(x.shape[0], -1) if x.ndim else x.reshape(1, 1)).all(-1)
    if not bool(ok.all()):
        raise ValueError(f"{name} contains NaN/inf (first in sample {int(torch.nonzero(~ok)[0])}); "
                         "it must be finite")


class CountingScore:
    r"""Wrap a score function: count evaluations, bind ``model_kwargs``, check every output.

    Every sampler, adaptive solver, backend adapter and the likelihood call the score through this
    one wrapper, so its checks hold for all of them. Each call checks, without reading any value
    (no device-to-host synchronisation, a few hundred nanoseconds):

    - the output is a tensor shaped like ``x`` (else ``ValueError``);
    - its dtype and device are ``x``'s (else ``TypeError`` naming both): a float64 score for a
      float32 state would silently promote the samples, and bool, integer or complex outputs are
      not scores;
    - neither ``x`` nor ``t`` was modified in place (their autograd version counters are unchanged;
      else ``RuntimeError``): solvers reuse both after the call, so an in-place edit would change
      the samples.

    The count is a Python int incremented per call. ``nfe`` is what
    [`SampleResult`][sdegen.solvers.base.SampleResult] reports.

    Args:
        score_fn: ``score_fn(x, t, **model_kwargs)``.
        model_kwargs: extra keyword arguments passed to every call unchanged (e.g. labels).
    """

    def __init__(self, score_fn: Callable[..., Tensor], model_kwargs: dict | None = None):
        if not callable(score_fn):
            raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
        if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
            raise TypeError(f"model_kwargs must be a dict of keyword arguments, got {type(model_kwargs).__name__}")
        self.score_fn = score_fn
        self.model_kwargs = dict(model_kwargs or {})
        self.nfe = 0

    def call_method(self, name: str, x: Tensor, t: Tensor):
        """``score_fn.<name>(x, t, **model_kwargs)``, counted as one evaluation: a model's richer output
        (e.g. a chain model's ``chain_predict``) in place of its score, by the same counter and with the
        same in-place check on ``x`` and ``t`` (its output is the method's own, so no shape check)."""
        self.nfe += 1
        versions = x._version, t._version
        out = getattr(self.score_fn, name)(x, t, **self.model_kwargs)
        self._check_inputs_unchanged(x, t, versions)
        return out

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        x_version, t_version = x._version, t._version
        out = self.score_fn(x, t, **self.model_kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"score_fn must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}")
        if out.dtype is not x.dtype or out.device != x.device:
            raise TypeError(f"score_fn must return a tensor with x's dtype and device ({x.dtype} on {x.device}), "
                            f"got {out.dtype} on {out.device}; cast inside the score function "
                            "(e.g. return s.to(x.dtype)) or sample in the model's dtype")
        if x._version != x_version or t._version != t_version:  # inline: this runs once per evaluation
            self._check_inputs_unchanged(x, t, (x_version, t_version))
        return out

    @staticmethod
    def _check_inputs_unchanged(x: Tensor, t: Tensor, versions: tuple[int, int]) -> None:
        """``RuntimeError`` if the call modified ``x`` or ``t`` in place (autograd version counters)."""
        if (x._version, t._version) != versions:
            name = "x" if x._version != versions[0] else "t"
            raise RuntimeError(f"score_fn modified its input {name} in place ({name}'s version counter changed during "
                               f"the call); the solver reuses {name} after the call, so the samples would change "
                               f"silently. Work on a copy ({name} = {name}.clone()) or use out-of-place operations")


#: The term every solver consumes is [`sdegen.ReverseSDE`][sdegen.sdes.base.ReverseSDE] (the reverse-time
#: SDE, or with ``probability_flow=True`` its probability-flow ODE); ``Dynamics`` is its former
#: name inside the solvers, kept as an alias.
Dynamics = ReverseSDE


class AbstractFixedGridSolver(abc.ABC):
    """A step rule on a given time grid. Subclasses are frozen dataclasses holding options only.

    Class attributes:
        order: the convergence order the tests read and measure: the global order for ODE solvers
            (``tests/solvers/test_method_table.py`` fits it for every ODE row); for SDE solvers the weak
            order on exact Gaussian moments (``tests/solvers/test_stochastic_samplers.py``), which for
            Euler–Maruyama equals its strong order 1 under additive noise (measured on one refined
            Brownian path, ``tests/solvers/test_integrator.py``).
        stochastic: whether ``step`` consumes ``dw``.
        evals_per_step: score evaluations per step (for the expected-NFE contract test).
    """

    order: ClassVar[float]
    stochastic: ClassVar[bool]
    evals_per_step: ClassVar[int] = 1

    def init_state(self, dyn: Dynamics, x: Tensor, t0: Tensor) -> Any:
        """Initial solver state (multistep history). Default: ``None``."""
        return None

    def prepare(self, coefs: GridCoefficients) -> "AbstractFixedGridSolver":
        """This solver ready for the grid of ``coefs`` (a [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients]).

        The loop calls it once per run, before the first step: a solver with per-step weights builds
        them here from the grid's columns (float64, on the host), so every run on an affine SDE takes
        one code path however the solver was constructed. Default: the solver itself."""
        return self

    def nfe(self, steps: int) -> int:
        """Score evaluations this solver makes over ``steps`` grid steps (the contract test checks the
        counted NFE against it for every method). Default: ``steps * evals_per_step``."""
        return steps * self.evals_per_step

    @abc.abstractmethod
    def step(self, dyn: Dynamics, x: Tensor, t0: Tensor, t1: Tensor, state: Any,
             dw: Tensor | None) -> tuple[Tensor, Tensor | None, Any]:
        """Advance ``x`` from ``t0`` to ``t1 < t0`` (each ``(B,)``) on the term ``dyn``.

        ``dw``: Brownian increment with variance ``|t1 - t0|`` per entry (``None`` for deterministic
        solvers). Returns ``(x, error, state)``: ``error`` is the step's local error estimate for a
        step-size controller (an embedded pair's difference, ``(B, *D)``) or ``None`` for a rule without
        one; a fixed grid ignores it."""


@dataclass(frozen=True)
class TabulatedSolver(AbstractFixedGridSolver):
    """A solver whose steps read a per-step table built for one grid (dataclass fields ``table`` and
    ``table_times``, ``None`` until prepared).

    [`prepare`][sdegen.solvers.base.TabulatedSolver.prepare] builds the table from the grid's
    [`GridCoefficients`][sdegen.solvers.marginal_rows.GridCoefficients] (`build_table`, the subclass's
    job) or, for a solver that has one already, checks that it was built for that grid (``ValueError``
    otherwise, [`check_table_grid`][sdegen.solvers.marginal_rows.check_table_grid]): a table is never
    applied to another grid's steps.
    """

    #: Per-step host-float weights for the grid (built by `prepare`; leave ``None``). Keyword-only, so
    #: subclasses list their options first.
    table: tuple | None = field(default=None, repr=False, kw_only=True)
    #: The grid ``table`` was built for (set by `prepare`).
    table_times: tuple | None = field(default=None, repr=False, kw_only=True)

    def build_table(self, coefs: GridCoefficients) -> "TabulatedSolver":
        """This solver with its table for the grid of ``coefs`` (float64 host weights)."""
        raise NotImplementedError

    def prepare(self, coefs: GridCoefficients) -> "TabulatedSolver":
        """The solver with its table for the grid of ``coefs``; one that has a table is checked against it."""
        if self.table is not None:
            check_table_grid(self, coefs)
            return self
        return self.build_table(coefs)

    @classmethod
    def tabulated(cls, sde: SDE, times: Tensor, **options) -> "TabulatedSolver":
        """``cls(**options)`` prepared for ``times`` (decreasing): every weight computed once in float64 on
        the host from the grid's `GridCoefficients`."""
        return cls(**options).prepare(GridCoefficients(sde, times))


def progress_bar(progress: bool, total: float, desc: str, *, time_bar: bool = False):
    """The one tqdm bar of the integrators (``None`` when ``progress`` is false; tqdm imported lazily).

    Args:
        progress: whether to show a bar.
        total: its total (steps, or a time span when ``time_bar``).
        desc: its label.
        time_bar: format the counts as times (adaptive solvers advance by a time, not a step).
    """
    if not progress:
        return None
    from tqdm.auto import tqdm

    if time_bar:
        return tqdm(total=total, desc=desc, leave=False,
                    bar_format="{l_bar}{bar}| {n:.4g}/{total:.4g} [{elapsed}<{remaining}{postfix}]")
    return tqdm(total=total, desc=desc, leave=False)


def integrate_fixed_grid(
    solver: AbstractFixedGridSolver,
    dyn: Dynamics,
    x: Tensor,
    times: Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: Tensor | Callable[[int], Tensor] | None = None,
    progress: bool = False,
    record_every: int | None = None,
    check_every: int = 16,
    desc: str | None = None,
    brownian: BrownianPath | None = None,
    callback: Callable[[dict], Any] | None = None,
) -> tuple[Tensor, list[tuple[float, Tensor]] | None, Any]:
    r"""Run ``solver`` over the decreasing grid ``times`` (``(n+1,)``, ``times[0]`` = start).

    The fixed-grid entry of the one loop, [`drive`][sdegen.solvers.loop.drive], in its grid mode
    ([`GridSteps`][sdegen.solvers.base.GridSteps]: the grid is the controller, every step accepted): it
    prepares the solver for the grid once ([`AbstractFixedGridSolver.prepare`][sdegen.solvers.base.AbstractFixedGridSolver.prepare])
    and owns the Brownian path, the non-finite checks, the progress bar, the trajectory and the
    ``callback`` hook; the score's checks are the counted score's.

    Brownian path: step $i$ gets $dw_i$ from ``brownian`` when given (e.g. one path refined,
    `sdegen.solvers.brownian.BrownianPath.from_increments`); else
    $dw_i = \sqrt{|t_{i+1} - t_i|}\,z_i$, $z_i \sim \mathcal N(0, I)$ from ``generator``; or ``noise[i]``
    (shape ``(n, *x.shape)``, unit-variance draws); or ``noise(i)`` when ``noise`` is a callable
    (per-sample seeded noise that does not depend on batch-mates). Non-finite states are detected with one on-device
    flag per step and checked every ``check_every`` steps (one host sync per block, not per step);
    the error names the first bad step, its time and the sample.

    ``callback``, when given, is called after every step with a dict ``{"i": step, "t": t_i,
    "t_next": t_{i+1}, "x": state at t_{i+1}}`` (as k-diffusion's sampler callback); it must not
    modify ``x`` in place.

    Returns:
        ``(x, trajectory or None, final solver state)``.
    """
    grid = FixedGrid(times, x)
    solver = solver.prepare(GridCoefficients(dyn.sde, grid.times_cpu))
    if brownian is None:
        brownian = BrownianPath(grid.t_list, x, generator=generator, noise=noise)
    elif brownian.steps() not in (None, grid.n):
        raise ValueError(f"brownian covers {brownian.steps()} steps, the grid has {grid.n}")
    from .loop import drive  # the one loop (adaptive.py imports this module)

    steps = GridSteps(solver, dyn, x, grid, brownian, check_every, callback)
    t_list = grid.t_list
    x, _, traj = drive(steps, t_list[0], t_list[-1], x, name=desc or type(solver).__name__, max_steps=grid.n,
                       progress=progress, record_every=record_every, time_bar=False,
                       keep_times=False)
    return x, traj, steps.solver_state


class GridSteps:
    r"""The fixed-grid mode of the one loop ([`drive`][sdegen.solvers.loop.drive]): the grid is the controller.

    Attempt $i$ is step $i$ of the grid, always accepted, with ``dw`` from the Brownian path. Every
    value the loop needs (counts, whether it runs, the time) is known on the host, so an attempt makes
    no device-to-host read; non-finite states are detected with one on-device flag per step (the
    state's sum, float32 for half types), read once every ``check_every`` steps (one sync per block),
    and the error names the first bad step, its time and the sample. (A finite state whose sum
    overflows, entries beyond ~1e38, is not an error; in a block that ends non-finite, such an
    earlier overflow would be named as the first bad step.) ``callback`` (if given) sees ``{"i", "t", "t_next", "x"}`` after each step.
    """

    __slots__ = ("solver", "dyn", "x", "x_start", "t_list", "vecs", "n", "dw_of", "check_every", "callback",
                 "pending", "last_good", "last_checked", "solver_state", "show", "flag_dtype")

    def __init__(self, solver: AbstractFixedGridSolver, dyn: Dynamics, x: Tensor, grid: FixedGrid,
                 brownian: BrownianPath, check_every: int, callback: Callable[[dict], Any] | None):
        self.solver, self.dyn, self.x, self.x_start = solver, dyn, x, x
        self.t_list, self.vecs, self.n = grid.t_list, grid.vecs, grid.n
        self.dw_of = brownian.dw if solver.stochastic else None
        self.check_every, self.callback = check_every, callback
        # Per-step host work is kept to the minimum (the per-step overhead budget is tens of µs): the
        # finiteness flags stay on the device as 0-d tensors until a block check reads them all.
        self.pending: list[Tensor] = []
        self.last_good, self.last_checked = x, 0
        self.solver_state = solver.init_state(dyn, x, self.vecs[0])
        self.show = False
        self.flag_dtype = torch.float32 if x.element_size() < 4 else None

    def attempt(self, i: int) -> tuple[int, int, bool, float, float, float]:
        # Locals and one fused test: this runs once per step inside the per-step overhead budget.
        vecs, dw_of = self.vecs, self.dw_of
        x, _, self.solver_state = self.solver.step(self.dyn, self.x, vecs[i], vecs[i + 1], self.solver_state,
                                                   None if dw_of is None else dw_of(i))
        self.x = x
        pending = self.pending
        # The state's sum as the finiteness flag: one reduction kernel (isfinite(x).all() is two and an
        # allocation, ~6.5 us against ~1.6 us at batch 16 on a CPU); NaN/inf in x make the sum
        # non-finite. Half types are summed in float32, so that only a state beyond ~1e38 could
        # overflow a finite sum; `_check` tells the two apart on the error path.
        pending.append(x.sum(dtype=self.flag_dtype))
        running = i + 1 < self.n
        if len(pending) == self.check_every or not running:
            self._check(i)
        t_next = self.t_list[i + 1]
        if self.callback is not None:
            self.callback({"i": i, "t": self.t_list[i], "t_next": t_next, "x": x})
        return 1, 0, running, t_next, (abs(t_next - self.t_list[i]) if self.show else 0.0), t_next

    def _check(self, i: int) -> None:
        ok = torch.isfinite(torch.stack(self.pending))
        x, t_list = self.x, self.t_list
        # A non-finite sum with a finite state is an overflow of the sum of huge finite entries (NaN/inf
        # never turn finite again under a step's arithmetic): no error then (error path only).
        if not bool(ok.all()) and not bool(torch.isfinite(x).all()):
            # Error path only: the reads below are no longer on the hot loop. NaN/inf never turns
            # finite again under a step's arithmetic, so a sample bad at step `bad` is still bad now.
            B = x.shape[0]
            bad = self.last_checked + int(torch.nonzero(~ok)[0])
            sample_k = int(torch.nonzero(~torch.isfinite(x).reshape(B, -1).all(1))[0])
            if not bool(torch.isfinite(self.x_start).all()):
                raise ValueError("the start state x contains NaN/inf (sample "
                                 f"{int(torch.nonzero(~torch.isfinite(self.x_start).reshape(B, -1).all(1))[0])}); "
                                 "the input is bad, not the score")
            raise NonFiniteError(
                f"sampling state became non-finite at step {bad} (t={t_list[bad]:.6g} -> "
                f"{t_list[bad + 1]:.6g}), sample {sample_k} non-finite; the score function likely returned "
                "NaN/inf there", step=bad, t=t_list[bad], x=self.last_good, sample=sample_k,
                x_t=t_list[self.last_checked])
        self.last_good, self.last_checked, self.pending = x, i + 1, []

    def state(self) -> Tensor:
        return self.x

    def per_sample_stats(self) -> dict:
        return {}

    def max_steps_error(self, max_steps: int) -> Exception:  # pragma: no cover - the grid always ends
        return RuntimeError(f"the fixed grid did not end after {max_steps} steps")
