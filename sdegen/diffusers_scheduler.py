r"""sdegen's fixed-grid samplers inside ``diffusers`` pipelines: a scheduler that speaks diffusers' protocol.

``SdegenScheduler`` (a ``diffusers`` ``SchedulerMixin``/``ConfigMixin``) runs any fixed-grid method of
``sdegen.METHODS`` (``dpm_solver``, ``heun_karras``, ``pc``, ``euler_maruyama``, ``ancestral``, the
multistep catalogue, ...) underneath a pipeline's loop:

    from sdegen.diffusers_scheduler import SdegenScheduler
    pipe.scheduler = SdegenScheduler.from_config(pipe.scheduler.config, method="dpm_solver")
    images = pipe(num_inference_steps=20, generator=g).images

**How the loop is turned inside out.** A pipeline owns the model calls: it asks
``scheduler.timesteps`` for the noise levels, calls the model, and hands the output to
``scheduler.step``. sdegen's methods own their loop and call the score. The scheduler runs
``sdegen.sample`` itself, in a worker thread whose score function hands each state to the pipeline
(``step`` returns it as ``prev_sample``) and waits for the model output the pipeline computes next.
So the pipeline's images are, by construction, ``sdegen.sample`` on the same model from the same
start noise and generator (the worker draws from the generator the pipeline passes to ``step``;
the pipeline's thread is blocked meanwhile, so the draws keep their order). ``timesteps`` lists the
model step of *every* evaluation (a second-order method has two per step; ``order`` is 1 because
each entry is one model call), found once in ``set_timesteps`` by running the method's grid with a
model-free score.

The model sees ``unet(x, k)`` with $k = tN/T - 1$ (diffusers' timestep; a float between training
steps), its output is converted by ``prediction_type`` on the schedule's
[`DiscreteVPSDE`][sdegen.adapters.DiscreteVPSDE] exactly as [`from_diffusers`][sdegen.adapters.from_diffusers]
does; ``scale_model_input`` is the identity and ``init_noise_sigma`` is 1 (VP: $x_T \sim \mathcal N(0, I)$).

``diffusers`` is optional: it is imported when ``SdegenScheduler`` is first accessed.
"""

from __future__ import annotations

import functools
import math
import queue
import threading

import torch
from torch import Tensor

__all__ = ["SdegenScheduler", "schedule_alphas_cumprod"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def schedule_alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                            trained_betas=None) -> Tensor:
    r"""$\bar\alpha_1..\bar\alpha_N$ of a diffusers-style $\beta$ schedule, computed in float32 as diffusers does.

    ``"linear"``: $\beta$ evenly spaced from ``beta_start`` to ``beta_end`` (Ho et al. 2020);
    ``"scaled_linear"``: $\sqrt\beta$ evenly spaced (latent diffusion); ``"squaredcos_cap_v2"``:
    $\beta_i = \min(1 - \bar a(i/N)/\bar a((i-1)/N), 0.999)$, $\bar a(u) = \cos^2(\tfrac{u + 0.008}{1.008}\tfrac\pi2)$
    (Nichol & Dhariwal 2021, eq. 17). ``trained_betas`` overrides all of them.
    """
    if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}")
    n = num_train_timesteps
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float32)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, n, dtype=torch.float32)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def abar(u):
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)], dtype=torch.float32)
    else:
        raise ValueError(f"beta_schedule must be one of {', '.join(map(repr, _BETA_SCHEDULES))}, got {beta_schedule!r}")
    return torch.cumprod(1.0 - betas, dim=0)


class _Abort(BaseException):
    """Raised inside the worker's score call to end a run the pipeline abandoned."""


class _Handoff:
    """The model the worker's ``sdegen.sample`` calls: posts ``x`` to the pipeline and waits for its output."""

    def __init__(self):
        self.requests: queue.Queue = queue.Queue()
        self.replies: queue.Queue = queue.Queue()

    def __call__(self, x: Tensor, steps: Tensor, **model_kwargs) -> Tensor:
        self.requests.put(("eval", x))
        out = self.replies.get()
        if out is None:
            raise _Abort()
        return out


def _run(handoff: _Handoff, kwargs: dict) -> None:
    from .sampling import sample

    try:
        res = sample(**kwargs)
    except _Abort:
        return
    except Exception as err:      # handed to the pipeline's thread, which raises it from step()
        handoff.requests.put(("error", err))
        return
    handoff.requests.put(("done", res.samples))


@functools.lru_cache(maxsize=None)
def _scheduler_class():
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

    from .adapters import DiscreteVPSDE, _DiscreteStepScore, _PREDICTIONS, _check_choice
    from .sampling import METHODS, sample

    class SdegenScheduler(SchedulerMixin, ConfigMixin):
        r"""A ``diffusers`` scheduler running an sdegen fixed-grid method (final class).

        Args:
            num_train_timesteps: $N$, the training steps.
            beta_start: first $\beta$ of the schedule.
            beta_end: last $\beta$ of the schedule.
            beta_schedule: ``"linear"``, ``"scaled_linear"`` or ``"squaredcos_cap_v2"``.
            trained_betas: explicit $\beta_1..\beta_N$ (overrides the schedule).
            prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
            method: a fixed-grid method of ``sdegen.METHODS``.
            method_options: the method's options (JSON values), e.g. ``{"order": 2}``.
            eps: the final time of the method's grid (``sdegen.sample``'s ``eps``).
            T: end time of the SDE.

        Raises:
            ValueError: an unknown or adaptive method, an unknown prediction type or schedule.
        """

        order = 1
        _compatibles = ["DDPMScheduler", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"]

        @register_to_config
        def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                     beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                     method: str = "dpm_solver", method_options: dict | None = None, eps: float = 1e-3,
                     T: float = 1.0):
            if method not in METHODS or not METHODS[method].fixed_grid:
                fixed = [k for k, v in METHODS.items() if v.fixed_grid]
                raise ValueError(f"method must be a fixed-grid method of sdegen.METHODS ({', '.join(fixed)}), "
                                 f"got {method!r}")
            if method_options is not None and not isinstance(method_options, dict):
                raise TypeError(f"method_options must be a dict, got {type(method_options).__name__}")
            self._prediction = _check_choice(prediction_type, "prediction_type", _PREDICTIONS)
            self.alphas_cumprod = schedule_alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule,
                                                          trained_betas)
            self.sde = DiscreteVPSDE(alphas_cumprod=self.alphas_cumprod.double(), T=T)
            self.init_noise_sigma = 1.0
            self.num_inference_steps = None
            self.timesteps = None
            self._handoff = None
            self._worker = None
            self._calls = 0

        # ------------------------------------------------------------------ protocol
        def _sample_kwargs(self, steps: int) -> dict:
            c = self.config
            return dict(sde=self.sde, method=c.method, steps=steps, eps=c.eps, **(c.method_options or {}))

        def set_timesteps(self, num_inference_steps: int, device=None) -> None:
            """Fix the grid (``steps = num_inference_steps`` of the method) and list the model step of every evaluation."""
            if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) \
                    or num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
            self._abort()
            seen = []

            def record(x, t):                 # the score of N(0, I): the grid does not depend on it
                seen.append(float(t[0]))
                return -x

            sample(score_fn=record, shape=None, x_T=torch.zeros(1, 1, dtype=torch.float64),
                   generator=torch.Generator().manual_seed(0), **self._sample_kwargs(num_inference_steps))
            n, T = self.sde.n_steps, self.sde.T
            self.num_inference_steps = num_inference_steps
            # The model step of each evaluation, k = tN/T - 1 (float64, as the adapter computes it).
            self.timesteps = (torch.tensor(seen, dtype=torch.float64) * (n / T) - 1.0).to(device)
            self._calls = 0

        def scale_model_input(self, sample: Tensor, timestep=None) -> Tensor:
            """The identity: a VP model reads the unscaled state."""
            return sample

        def step(self, model_output: Tensor, timestep, sample: Tensor, generator: torch.Generator | None = None,
                 return_dict: bool = True):
            r"""Hand the model output of the current evaluation to the method; return the next state to evaluate.

            The first call starts ``sdegen.sample`` with ``x_T = sample`` and ``generator``; the last returns
            the method's final samples. ``model_output`` may carry a learned variance ($2C$ channels):
            the first $C$ are used.
            """
            if self.timesteps is None:
                raise RuntimeError("call set_timesteps(num_inference_steps) before step()")
            if self._calls >= len(self.timesteps):
                raise RuntimeError(f"step() called {self._calls + 1} times for {len(self.timesteps)} timesteps; "
                                   "call set_timesteps again to start a new run")
            if self._calls == 0:
                self._start(sample, generator)
                self._expect("eval")
            self._handoff.replies.put(model_output)
            self._calls += 1
            kind, value = self._handoff.requests.get()
            if kind == "error":
                self._worker = self._handoff = None
                raise value
            if kind == "done":
                self._worker = self._handoff = None
            if not return_dict:
                return (value,)
            return SchedulerOutput(prev_sample=value)

        def __len__(self) -> int:
            return self.config.num_train_timesteps

        # ------------------------------------------------------------------ the worker
        def _start(self, x_T: Tensor, generator) -> None:
            self._abort()
            self._handoff = handoff = _Handoff()
            score_fn = _DiscreteStepScore(handoff, self.sde, prediction=self._prediction, timesteps="continuous",
                                          first_step=0)
            kwargs = dict(score_fn=score_fn, shape=None, x_T=x_T, generator=generator,
                          **self._sample_kwargs(self.num_inference_steps))
            self._worker = threading.Thread(target=_run, args=(handoff, kwargs), daemon=True,
                                            name="sdegen-scheduler")
            self._worker.start()

        def _expect(self, kind: str) -> None:
            got, value = self._handoff.requests.get()
            if got == "error":
                self._worker = self._handoff = None
                raise value
            if got != kind:
                raise RuntimeError(f"sdegen scheduler: expected {kind!r} from the method, got {got!r}")

        def _abort(self) -> None:
            if self._handoff is not None and self._worker is not None and self._worker.is_alive():
                self._handoff.replies.put(None)
                self._worker.join(timeout=10)
            self._worker = self._handoff = None

        def __del__(self):
            try:
                self._abort()
            except Exception:
                pass

    SdegenScheduler.__module__ = __name__
    return SdegenScheduler


def __getattr__(name: str):
    # The class subclasses diffusers' mixins, so it is built on first access (diffusers stays optional).
    if name == "SdegenScheduler":
        return _scheduler_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
