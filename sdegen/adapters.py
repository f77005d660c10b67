r"""Adapters: models trained elsewhere, seen by sdegen as an SDE plus a score function.

Every adapter returns ``(sde, score_fn)``; hand both to any sdegen sampler or likelihood routine.
Extra keyword arguments given to ``score_fn`` (a sampler's ``model_kwargs``, e.g. class labels)
are passed to the wrapped model unchanged.

| adapter | the model predicts | the SDE |
|---|---|---|
| [`from_discrete_eps`][sdegen.adapters.from_discrete_eps] | $\epsilon$ at integer steps of a $\beta$ schedule | [`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] |
| [`from_diffusers`][sdegen.adapters.from_diffusers] | a ``diffusers`` UNet's $\epsilon$, $x_0$ or $v$ | [`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] |
| [`from_denoiser`][sdegen.adapters.from_denoiser] | $D(x, \sigma) \approx \mathbb E[x_0 \mid x]$ (EDM) | [`VESDE`][sdegen.VESDE] |
| [`from_x0`][sdegen.adapters.from_x0] | $\hat x_0(x, t)$ | any [`AffineSDE`][sdegen.AffineSDE] |
| [`from_v`][sdegen.adapters.from_v] | $\hat v(x, t)$ | any [`AffineSDE`][sdegen.AffineSDE] |
| [`from_flow`][sdegen.adapters.from_flow] | the flow-matching velocity $\hat u(x, t)$ | any [`AffineSDE`][sdegen.AffineSDE] (e.g. `sdegen.FlowMatchingSDE`) |

Every output is converted by the one prediction table,
[`to_score`][sdegen.parameterization.to_score] (Tweedie with $x_t = m(t) x_0 + s(t)\epsilon$:
$\nabla\log p_t = -\hat\epsilon/s = (m\hat x_0 - x)/s^2$; v is the normalised Salimans & Ho v,
$v = a\epsilon - b x_0$ with $a = m/r$, $b = s/r$, $r = \sqrt{m^2+s^2}$, which on VP is ``diffusers``'
``v_prediction``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Collection

import torch
from torch import Tensor

from ._utils import append_dims, check_positive
from .parameterization import denoiser_inputs, to_score
from .sdes import AffineSDE, VESDE
# DiscreteVPSDE lives in sdes/discrete.py; it stays importable here as sdegen.adapters.DiscreteVPSDE.
from .sdes.discrete import AbstractChainModel, ChainPlan, DiscreteVPSDE
from .x0_transforms import ClipX0, ThresholdX0

__all__ = [
    "DiscreteVPSDE",
    "from_discrete_eps",
    "from_denoiser",
    "from_x0",
    "from_v",
    "from_flow",
    "from_diffusers",
    "TIMESTEP_MODES",
]

#: How a discrete-step model is told the noise level at a time between its training steps.
TIMESTEP_MODES = ("continuous", "round")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
# diffusers' prediction_type names -> rows of the one prediction table (sdegen.parameterization).
_TABLE_KIND = {"epsilon": "eps", "sample": "x0", "v_prediction": "v", "flow_velocity": "flow_velocity"}


# ---------------------------------------------------------------------- score functions
class _DiscreteStepScore(AbstractChainModel):
    r"""Score of a discrete-step model on a [`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] (picklable; final class).

    At time $t$ the model receives the step value $u = tN/T - 1 + \text{first\_step}$ (``"continuous"``,
    a float tensor) or that value rounded to the nearest training step in
    ``[first_step, first_step + N - 1]`` (``"round"``, a long tensor). Its output is converted with
    the marginal at $t$ itself.
    """

    def __init__(self, model: Callable, sde: DiscreteVPSDE, *, prediction: str, timesteps: str,
                 first_step: int, call: Callable | None = None):
        self.model, self.sde, self.prediction = model, sde, prediction
        self.timesteps, self.first_step, self.call = timesteps, first_step, call
        self._coefs: dict = {}
        self._steps: dict = {}

    def _coefs_at(self, tv: float) -> tuple:
        r"""``(u, c_x, c_out)`` at the scalar time ``tv``: the model's step value and the score as the linear map
        $c_x x + c_	ext{out} F$ of the prediction table (every row is linear in $(x, F)$), read once per time
        in float64 from [`to_score`][sdegen.parameterization.to_score] itself."""
        c = self._coefs.get(tv)
        if c is None:
            T = self.sde.T
            if not (math.isfinite(tv) and -1e-6 * max(1.0, T) <= tv <= T * (1 + 1e-6)):
                raise ValueError(f"t must lie in [0, {T}], got {tv}")
            t1 = torch.tensor([tv], dtype=torch.float64)
            one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
            u = self.model_steps(t1)
            c_out = float(_prediction_to_score(self.sde, self.prediction, zero, t1, one))
            c_x = float(_prediction_to_score(self.sde, self.prediction, one, t1, zero))
            if len(self._coefs) >= 65536:     # grids revisit few distinct times; bound the memory anyway
                self._coefs.clear()
            c = self._coefs[tv] = (u.item(), u.dtype, c_x, c_out)
        return c

    def model_steps(self, t: Tensor) -> Tensor:
        """The step values the model receives at times ``t`` (``(B,)``)."""
        n = self.sde.n_steps
        u = t * (n / self.sde.T) - 1.0 + self.first_step
        if self.timesteps == "round":
            return u.round().clamp(self.first_step, self.first_step + n - 1).long()
        return u

    def chain_predict(self, x: Tensor, t: Tensor, **model_kwargs) -> tuple:
        r"""``(x0_hat, eps_hat, variance channels or None)`` of one model call, from the chain's $(m, s)$ directly
        ($m^2 + s^2 = 1$), so that $m = 0$ (zero terminal SNR) works for ``sample`` and ``v_prediction``
        models: $\hat x_0 = m x - s v$, $\hat\epsilon = m v + s x$ (diffusers' formulas; the score route
        divides by $m$)."""
        steps = self.model_steps(t)
        out = self.model(x, steps, **model_kwargs) if self.call is None else self.call(self.model, x, steps, model_kwargs)
        var_out = None
        if out.shape[1] == 2 * x.shape[1] and out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:]:
            out, var_out = out[:, : x.shape[1]], out[:, x.shape[1]:]
        m, s = self.sde.marginal(t)
        m, s = append_dims(m, x.ndim), append_dims(s, x.ndim)
        if self.prediction == "epsilon":
            return (x - s * out) / m, out, var_out
        if self.prediction == "sample":
            return out, (x - m * out) / s, var_out
        return m * x - s * out, m * out + s * x, var_out

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        # Fast path (the adapter's own cost was 10-20 tensor ops per call, ~230 us at batch 16): the samplers
        # pass one time for the whole batch (an expanded view, stride 0), so on the CPU the step value and
        # the conversion coefficients come from a per-time table; one op builds the steps, one or two
        # convert. On accelerators reading t would sync the device, so they keep the tensor path.
        fast = (isinstance(t, Tensor) and t.ndim == 1 and t.device.type == "cpu" and t.numel() > 0
                and (t.stride(0) == 0 or t.numel() == 1) and not t.requires_grad)
        if fast:
            tv = t[0].item()
            u, u_dtype, c_x, c_out = self._coefs_at(tv)
            # The steps tensor is reused per (time, batch, dtype) unless the model changed it in place.
            key = (tv, t.numel(), t.dtype)
            hit = self._steps.get(key)
            if hit is None or hit[0]._version != hit[1]:
                steps = torch.full(t.shape, u, dtype=u_dtype if u_dtype == torch.long else t.dtype)
                if len(self._steps) * t.numel() >= 1 << 20:      # at most ~8 MB of cached step values
                    self._steps.clear()
                self._steps[key] = (steps, steps._version)
            else:
                steps = hit[0]
        else:
            steps = self.model_steps(t)
        out = self.model(x, steps, **model_kwargs) if self.call is None else self.call(self.model, x, steps, model_kwargs)
        if out.shape[1] == 2 * x.shape[1] and out.shape[0] == x.shape[0] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]        # learned-variance models: the first half is the mean output
        if not fast or not isinstance(out, Tensor) or out.shape != x.shape or out.requires_grad or x.requires_grad:
            return _prediction_to_score(self.sde, self.prediction, x, t, out)
        return out * c_out if c_x == 0.0 else torch.add(x * c_x, out, alpha=c_out)


def _prediction_to_score(sde: AffineSDE, prediction: str, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
    if not isinstance(out, Tensor) or out.shape != x.shape:
        raise ValueError(f"the model must return a tensor shaped like x {tuple(x.shape)}, "
                         f"got {getattr(out, 'shape', type(out).__name__)}")
    return to_score(_TABLE_KIND[prediction], out, x, t, sde)


def _check_choice(value, name: str, valid) -> str:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}")
    return value


def from_discrete_eps(eps_model: Callable, betas, *, T: float = 1.0, timesteps: str = "continuous",
                      first_step: int = 1, prediction: str = "epsilon") -> tuple[DiscreteVPSDE, Callable]:
    r"""Wrap a discrete-step $\epsilon$-model trained with its own $\beta$ schedule.

    The SDE is [`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] (exact $\bar\alpha_i$ at $t_i = iT/N$, $\log\bar\alpha$ linear in
    between) and the score is $\nabla\log p_t(x) \approx -\hat\epsilon(x, u(t))/s(t)$ (Song et al.
    2021, App. B: DDPM is the VP SDE's discretization).

    **What the model receives.** ``eps_model(x, u, **model_kwargs)`` with ``u`` of shape ``(B,)``:

    - ``timesteps="continuous"`` (default): the fractional step $u = tN/T - 1 + \text{first\_step}$, a
      float tensor. At the training times it is the integer step (as a float); in between it is the
      interpolated value, which sinusoidal / Fourier embeddings accept.
    - ``timesteps="round"``: $u$ rounded to the nearest training step and clamped to
      ``[first_step, first_step + N - 1]``, a long tensor: for models with an embedding table.
      The output is still converted with $s(t)$ at the exact $t$.

    ``first_step`` is the integer the model was trained to read for the *first* noise level
    $\bar\alpha_1$: 1 for sdegen's [`DDPM`][sdegen.ddpm.DDPM] (steps $1..N$), 0 for ``diffusers`` and most
    PyTorch DDPM code (timesteps $0..N-1$).

    Args:
        eps_model: ``eps_model(x, u, **kwargs) -> (B, *D)``.
        betas (Tensor): ``(N,)`` the training schedule $\beta_1..\beta_N$.
        T: end time of the SDE.
        timesteps: ``"continuous"`` or ``"round"``.
        first_step: the model's index of the first noise level (1 or 0, usually).
        prediction: ``"epsilon"`` (default), ``"sample"`` ($x_0$) or ``"v_prediction"``.

    Returns:
        ``(sde, score_fn)``; ``score_fn.model_steps(t)`` shows the step values the model receives.

    Example::

        sde, score_fn = sdegen.adapters.from_discrete_eps(my_unet, betas, first_step=0)
        res = sdegen.sample(sde, score_fn, (16, 3, 32, 32), method="ancestral", steps=len(betas))
    """
    if not callable(eps_model):
        raise TypeError(f"eps_model must be callable eps_model(x, u), got {type(eps_model).__name__}")
    _check_choice(timesteps, "timesteps", TIMESTEP_MODES)
    _check_choice(prediction, "prediction", _PREDICTIONS)
    if not isinstance(first_step, int) or isinstance(first_step, bool):
        raise TypeError(f"first_step must be an int, got {first_step!r}")
    sde = DiscreteVPSDE(betas, T=T)
    return sde, _DiscreteStepScore(eps_model, sde, prediction=prediction, timesteps=timesteps,
                                   first_step=first_step)


class _DenoiserScore:
    r"""$\nabla\log p_t(x) = (D(x, s(t)) - x)/s(t)^2$ for a VE SDE, the table's ``"denoiser"`` row (picklable; final class)."""

    def __init__(self, denoiser: Callable, sde: VESDE):
        self.denoiser, self.sde = denoiser, sde

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        x_in, sigma = denoiser_inputs(x, t, self.sde)
        out = self.denoiser(x_in, sigma, **model_kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"denoiser must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return to_score("denoiser", out, x, t, self.sde)


def from_denoiser(denoiser: Callable, sigma_min: float, sigma_max: float, *, T: float = 1.0) -> tuple[VESDE, Callable]:
    r"""Wrap an EDM / k-diffusion denoiser $D(x, \sigma) \approx \mathbb E[x_0 \mid x_0 + \sigma n = x]$.

    The SDE is ``VESDE(sigma_min, sigma_max, T)`` and the score is Tweedie's
    $\nabla\log p_t(x) = (D(x, \sigma) - x)/\sigma^2$ (Karras et al. 2022, eq. 3) with
    $\sigma = s(t) = \sqrt{\sigma_\text{sched}(t)^2 - \sigma_\min^2}$, the exact noise std of $x_t$ under
    the VE SDE (see [`VESDE`][sdegen.VESDE]); that is the $\sigma$ the denoiser receives, as a ``(B,)``
    tensor: ``denoiser(x, sigma, **model_kwargs)``.

    $s(t)$ falls below ``sigma_min`` for $t < t_\min$ = ``sde.t_from_sigma(sigma_min)``
    $= T\log 2 / (2\log(\sigma_\max/\sigma_\min))$; pass ``eps=t_min`` to a sampler so the denoiser
    is only asked about noise levels it was trained on.

    Args:
        denoiser: ``D(x, sigma, **kwargs) -> (B, *D)``; ``x`` is unscaled ($m = 1$).
        sigma_min (float): lower end of the trained noise range (EDM: 0.002).
        sigma_max (float): upper end of the trained noise range (EDM: 80).
        T: end time.

    Returns:
        ``(sde, score_fn)``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable D(x, sigma), got {type(denoiser).__name__}")
    sde = VESDE(check_positive(sigma_min, "sigma_min"), check_positive(sigma_max, "sigma_max"), T=T)
    return sde, _DenoiserScore(denoiser, sde)


class _ContinuousScore:
    """Score of a continuous-time model ``model(x, t * time_scale, **kwargs)`` (picklable; final class)."""

    def __init__(self, model: Callable, sde: AffineSDE, prediction: str, time_scale: float = 1.0):
        self.model, self.sde, self.prediction, self.time_scale = model, sde, prediction, time_scale

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
        t_in = t if self.time_scale == 1.0 else t * self.time_scale
        return _prediction_to_score(self.sde, self.prediction, x, t, self.model(x, t_in, **model_kwargs))


def _check_affine(sde) -> AffineSDE:
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE (a Gaussian kernel is needed), got {type(sde).__name__}")
    return sde


def from_x0(model: Callable, sde: AffineSDE) -> tuple[AffineSDE, Callable]:
    r"""Wrap a continuous-time data predictor $\hat x_0(x, t)$: $\nabla\log p_t = (m\hat x_0 - x)/s^2$.

    ``model(x, t, **model_kwargs)`` receives the forward time ``t`` ``(B,)`` in ``[0, T]``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t), got {type(model).__name__}")
    return _check_affine(sde), _ContinuousScore(model, sde, "sample")


def from_v(model: Callable, sde: AffineSDE) -> tuple[AffineSDE, Callable]:
    r"""Wrap a continuous-time $v$-predictor, $v = a\epsilon - b x_0$, $a = m/r$, $b = s/r$, $r = \sqrt{m^2+s^2}$.

    This is Salimans & Ho's (2022, eq. 11) $v$ of the variance-normalised state $x/r$, the one v
    convention of sdegen ([`sdegen.parameterization`][sdegen.parameterization], the same as
    ``ScoreModel(net, sde, "v")``). On VP ($r = 1$) it is the usual $v = m\epsilon - s x_0$,
    $\hat x_0 = m x - s\hat v$. The score is $\nabla\log p_t = -x/r^2 - a\hat v/s$.
    ``model(x, t, **model_kwargs)`` receives the forward time ``t`` ``(B,)``.

    Args:
        model: ``model(x, t, **model_kwargs) -> (B, *D)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE].

    Returns:
        ``(sde, score_fn)``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t), got {type(model).__name__}")
    return _check_affine(sde), _ContinuousScore(model, sde, "v_prediction")


def from_flow(model: Callable, sde: AffineSDE, *, time_scale: float = 1.0) -> tuple[AffineSDE, Callable]:
    r"""Wrap a flow-matching / rectified-flow velocity model $\hat u(x, t) \approx \mathbb E[dx_t/dt \mid x_t = x]$.

    For the straight path of `sdegen.FlowMatchingSDE` ($x_t = (1-t)x_0 + t\epsilon$) the training
    target is $u = \epsilon - x_0$ (Lipman et al. 2023, eq. 23; Liu et al. 2023, eq. 1; the convention
    of ``diffusers``' ``FlowMatchEulerDiscreteScheduler``, whose ``sigma`` is this $t$). For any affine
    SDE the score is $\nabla\log p_t = (\hat u - a(t)x)/(-\tfrac12 g(t)^2)$, the ``"flow_velocity"``
    row of the prediction table ([`to_score`][sdegen.parameterization.to_score]).

    Args:
        model: ``model(x, t * time_scale, **model_kwargs) -> (B, *D)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE] of the path (usually `sdegen.FlowMatchingSDE`).
        time_scale: the model receives ``t * time_scale`` (1000 for ``diffusers`` transformers,
            whose ``timestep`` is ``sigma * num_train_timesteps``).

    Returns:
        ``(sde, score_fn)``.
    """
    if not callable(model):
        raise TypeError(f"model must be callable model(x, t), got {type(model).__name__}")
    return _check_affine(sde), _ContinuousScore(model, sde, "flow_velocity", check_positive(time_scale, "time_scale"))


def _call_diffusers_unet(unet, x: Tensor, steps: Tensor, model_kwargs: dict) -> Tensor:
    # return_dict=False: diffusers models then return a plain tuple whose first entry is the output.
    return unet(x, steps, return_dict=False, **model_kwargs)[0]


#: Config fields every DDPM-family scheduler shares, all honoured: the schedule (read as
#: ``alphas_cumprod``), the prediction type and the data-prediction options.
_DIFFUSERS_SCHEDULE_FIELDS = frozenset({
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "prediction_type",
    "rescale_betas_zero_snr", "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio",
    "sample_max_value"})
#: Sampler fields honoured per scheduler class (the adapter's plan reproduces that scheduler's loop).
_DIFFUSERS_SAMPLER_FIELDS = {
    "DDPMScheduler": frozenset({"variance_type", "timestep_spacing", "steps_offset"}),
    "DDIMScheduler": frozenset({"set_alpha_to_one", "timestep_spacing", "steps_offset"}),
    "EulerDiscreteScheduler": frozenset({"timestep_spacing", "steps_offset", "interpolation_type", "use_karras_sigmas",
                                         "use_exponential_sigmas", "use_beta_sigmas", "sigma_min", "sigma_max",
                                         "timestep_type", "final_sigmas_type"}),
    "EulerAncestralDiscreteScheduler": frozenset({"timestep_spacing", "steps_offset"}),
    "DPMSolverMultistepScheduler": frozenset({
        "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final", "use_karras_sigmas",
        "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas", "flow_shift",
        "final_sigmas_type", "lambda_min_clipped", "variance_type", "timestep_spacing", "steps_offset",
        "use_dynamic_shifting", "time_shift_type"}),
}
#: DPMSolverMultistepScheduler values the plan reproduces (name -> (allowed, why not others)). lower_order_final,
#: euler_at_final, lambda_min_clipped, timestep_spacing and steps_offset take any value: the timesteps are read,
#: and with final_sigmas_type="zero" the last step is first order (x0-prediction) whatever they say.
_DPM_VALUES = {
    "solver_order": ((1, 2), "sdegen's order-3 step differs from diffusers' 3M"),
    "algorithm_type": (("dpmsolver++",), "the data-prediction multistep is what sdegen's dpm_solver reproduces"),
    "solver_type": (("midpoint", "heun"), "unknown"),
    "use_karras_sigmas": ((False,), "Karras sigmas fall between training steps"),
    "use_exponential_sigmas": ((False,), "exponential sigmas fall between training steps"),
    "use_beta_sigmas": ((False,), "beta sigmas fall between training steps"),
    "use_lu_lambdas": ((False,), "uniform-lambda steps fall between training steps"),
    "use_flow_sigmas": ((False,), "a flow-matching schedule is not this VP chain"),
    "flow_shift": ((1.0,), "only used with flow sigmas"),
    "final_sigmas_type": (("zero",), "the plan ends at the data"),
    "variance_type": ((None,), "learned variances are not implemented"),
    "use_dynamic_shifting": ((False,), "a flow-matching option"),
    "time_shift_type": (("exponential",), "a flow-matching option"),
}
#: Values the plan reproduces, where a field has others that it does not (name -> (allowed, why not others)).
_EULER_VALUES = {
    # "linspace" gives fractional timesteps (sigma interpolated linearly in the step, not in log abar as the
    # DiscreteVPSDE is) and, like "trailing", starts from sigma_max * z instead of sqrt(sigma_max^2 + 1) * z.
    "timestep_spacing": (("leading",), "only 'leading' starts from N(0, I) on integer steps"),
    "interpolation_type": (("linear",), "'log_linear' spaces sigma geometrically"),
    "use_karras_sigmas": ((False,), "Karras sigmas fall between training steps"),
    "use_exponential_sigmas": ((False,), "exponential sigmas fall between training steps"),
    "use_beta_sigmas": ((False,), "beta sigmas fall between training steps"),
    "sigma_min": ((None,), "only used by the refused sigma spacings"),
    "sigma_max": ((None,), "only used by the refused sigma spacings"),
    "timestep_type": (("discrete",), "continuous timesteps are not chain steps"),
    "final_sigmas_type": (("zero",), "the plan ends at the data"),
}
#: DDPMScheduler.variance_type -> the chain plan's noise variance.
_DIFFUSERS_VARIANCES = {"fixed_small": "posterior", "fixed_small_log": "posterior", "fixed_large": "beta",
                        "learned": "learned", "learned_range": "learned_range"}


def _unset_score(x: Tensor, t: Tensor, **model_kwargs) -> Tensor:
    """Placeholder score of an x0 option built before its score (module level, so the plan stays picklable)."""
    raise RuntimeError("internal: x0 option used before its score was set")


def _diffusers_config(scheduler) -> dict:
    config = getattr(scheduler, "config", None)
    if config is None or getattr(scheduler, "alphas_cumprod", None) is None:
        raise TypeError(f"scheduler must be a diffusers scheduler with alphas_cumprod and config, "
                        f"got {type(scheduler).__name__}")
    # diffusers' FrozenDict is a dict; keys starting with "_" are metadata (class name, version).
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _check_diffusers_fields(name: str, config: dict, ignore: frozenset) -> None:
    honoured = _DIFFUSERS_SCHEDULE_FIELDS | _DIFFUSERS_SAMPLER_FIELDS.get(name, frozenset())
    unsupported = sorted(set(config) - honoured - ignore)
    if unsupported:
        raise ValueError(
            f"from_diffusers does not reproduce {name}'s field(s) {', '.join(unsupported)}; its plan reproduces "
            f"{', '.join(sorted(_DIFFUSERS_SAMPLER_FIELDS))} only. To use the model and its schedule with sdegen's "
            f"own samplers anyway, pass ignore={tuple(unsupported)!r}")
    refused = []
    if config.get("rescale_betas_zero_snr", False) and config.get("prediction_type", "epsilon") == "epsilon":
        refused.append("rescale_betas_zero_snr=True with prediction_type='epsilon' (abar_N = 0: the first step "
                       "needs x0 = (x - eps) / 0; zero terminal SNR needs a 'v_prediction' or 'sample' model)")
    variance = config.get("variance_type", "fixed_small") if name == "DDPMScheduler" else "fixed_small"
    if variance not in _DIFFUSERS_VARIANCES:
        refused.append(f"variance_type={variance!r} (supported: {', '.join(map(repr, _DIFFUSERS_VARIANCES))}; "
                       "diffusers' own 'fixed_large_log' step takes the square root of log(beta) < 0)")
    values = _EULER_VALUES if name.startswith("Euler") else _DPM_VALUES if name.startswith("DPMSolver") else {}
    if values:
        for field, (allowed, why) in values.items():
            if field in config and config[field] not in allowed:
                refused.append(f"{field}={config[field]!r} ({why}; supported: {', '.join(map(repr, allowed))})")
    if refused:
        raise ValueError(f"from_diffusers cannot reproduce {name} with " + "; ".join(refused))


def _diffusers_plan(name: str, scheduler, config: dict, n: int, T: float) -> ChainPlan:
    r"""The chain steps of the scheduler's own loop, read from ``scheduler.timesteps`` (diffusers timestep
    $k$ is chain index $i = k + 1$; a target of diffusers timestep $-1$ is $\bar\alpha = 1$, index 0)."""
    if name not in _DIFFUSERS_SAMPLER_FIELDS:
        return ChainPlan.full(n)
    ks = [int(round(k)) for k in scheduler.timesteps.tolist()]
    if name == "DDPMScheduler":
        # DDPMScheduler.previous_timestep: the next listed timestep once set_timesteps ran, else k - 1.
        strided = bool(getattr(scheduler, "custom_timesteps", False) or getattr(scheduler, "num_inference_steps", None))
        prev = ks[1:] + [-1] if strided else [k - 1 for k in ks]
        return ChainPlan(tuple(k + 1 for k in ks), tuple(p + 1 for p in prev),
                         variance=_DIFFUSERS_VARIANCES[config.get("variance_type", "fixed_small")], eta=1.0,
                         noiseless_step_one=True)
    n_inf = getattr(scheduler, "num_inference_steps", None)
    if name == "DPMSolverMultistepScheduler":
        # DPM-Solver++ (data prediction) on the listed steps, then its first-order step to sigma = 0,
        # which is x0-prediction at the last step: sdegen's dpm_solver on that grid plus the Tweedie step.
        if not n_inf:
            raise ValueError(f"{name}: call scheduler.set_timesteps(num_inference_steps) before from_diffusers")
        steps = tuple(k + 1 for k in ks)
        if steps[0] != n:
            raise ValueError(f"{name} with timestep_spacing={config.get('timestep_spacing')!r}, steps_offset="
                             f"{config.get('steps_offset')!r} starts at timestep {ks[0]} < N - 1 = {n - 1} from "
                             "N(0, I), which sdegen's grids refuse (a grid starts at T, where the prior lives); use "
                             "timestep_spacing='linspace' or 'trailing'")
        dpm = {"grid": torch.tensor(steps, dtype=torch.float64) * (T / n), "order": int(config.get("solver_order", 2)),
               "prediction": "data", "lower_order_final": False, "denoise": True,
               "solver_type": "midpoint" if config.get("solver_type", "midpoint") == "midpoint" else "exact"}
        return ChainPlan(steps, steps[1:] + (0,), variance="posterior", eta=0.0, noiseless_step_one=False,
                         method_options={"dpm_solver": dpm})
    if name.startswith("Euler"):
        # Euler in (x / m, sigma) with the eps implied by x0 is DDIM (eta 0) between the listed steps;
        # Euler ancestral's (sigma_down, sigma_up) split is the posterior step (eta 1). Both end at sigma = 0.
        if not n_inf:
            raise ValueError(f"{name}: call scheduler.set_timesteps(num_inference_steps) before from_diffusers")
        steps = tuple(int(round(k)) + 1 for k in ks)
        eta = 1.0 if name == "EulerAncestralDiscreteScheduler" else 0.0
        return ChainPlan(steps, steps[1:] + (0,), variance="posterior", eta=eta, noiseless_step_one=False)
    if not n_inf:
        raise ValueError("DDIMScheduler: call scheduler.set_timesteps(num_inference_steps) before from_diffusers "
                         "(its loop is defined by those timesteps)")
    stride = config["num_train_timesteps"] // n_inf      # DDIMScheduler.step: prev = k - N // n
    final = 0 if config.get("set_alpha_to_one", True) else 1
    targets = tuple(k - stride + 1 if k - stride >= 0 else final for k in ks)
    return ChainPlan(tuple(k + 1 for k in ks), targets, variance="posterior", eta=0.0, noiseless_step_one=False)


def from_diffusers(unet: Callable, scheduler: object, *, timesteps: str = "continuous", T: float = 1.0,
                   ignore: Collection[str] = (), use_clipped_model_output: bool = False
                   ) -> tuple[DiscreteVPSDE, Callable]:
    r"""Wrap a Hugging Face ``diffusers`` UNet and its scheduler: the model, its schedule and its sampling loop.

    Reads ``scheduler.alphas_cumprod`` ($\bar\alpha$ for diffusers timesteps $k = 0..N-1$, chain index
    $i = k + 1$ at $t_i = iT/N$), ``scheduler.config`` and, for ``DDPMScheduler`` / ``DDIMScheduler``,
    ``scheduler.timesteps`` (call ``scheduler.set_timesteps`` first to sample on fewer steps). The
    UNet is called as ``unet(x, k, return_dict=False, **model_kwargs)[0]`` with the float step
    $k = tN/T - 1$ (``timesteps="continuous"``) or the nearest integer step (``"round"``); models
    with a learned variance ($2C$ output channels) use the first $C$. ``diffusers`` is optional and
    is not imported here.

    **Parity by the natural call.** The returned SDE carries the scheduler's loop as its
    [`ChainPlan`][sdegen.sdes.discrete.ChainPlan], so

        sdegen.sample(sde, score_fn, shape, method="ancestral", generator=g)

    without ``steps=``/``eps=`` reproduces the scheduler's own loop
    (``x = randn(shape, generator=g)``, then ``x = scheduler.step(unet(x, k).sample, k, x, generator=g).prev_sample``)
    sample for sample: the same steps and final step, the same variance, the same draws in the same
    order. ``DDIMScheduler``: ``eta`` defaults to 0 as in ``scheduler.step``; pass ``eta=`` to
    ``sample`` as you would to ``step``. With ``steps=`` every sdegen method runs on its own grid.

    **Config fields.** Each field is honoured or refused by name (a ``ValueError`` lists them):

    | field | how |
    |---|---|
    | ``num_train_timesteps``, ``beta_*``, ``trained_betas`` | the schedule, read as ``alphas_cumprod`` |
    | ``prediction_type`` | ``epsilon``, ``sample``, ``v_prediction`` convert to the score |
    | ``clip_sample``, ``clip_sample_range`` | [`ClipX0`][sdegen.x0_transforms.ClipX0] on the score |
    | ``thresholding``, ``dynamic_thresholding_ratio``, ``sample_max_value`` | [`ThresholdX0`][sdegen.x0_transforms.ThresholdX0] (precedes clipping, as in diffusers) |
    | ``timestep_spacing``, ``steps_offset`` | read through ``scheduler.timesteps`` (DDPM, DDIM) |
    | ``variance_type`` (DDPM) | ``fixed_small``/``fixed_small_log``: $\tilde\beta$; ``fixed_large``: $\beta$; ``learned``, ``learned_range``: the model's extra channels; ``fixed_large_log`` refused |
    | ``set_alpha_to_one`` (DDIM) | the final step's target $\bar\alpha$ (1 or $\bar\alpha_1$) |
    | Euler / Euler ancestral: ``timestep_spacing="leading"``, ``steps_offset``, default sigma options | the plan with $\eta = 0$ / $\eta = 1$; other spacings and sigma options refused |
    | ``rescale_betas_zero_snr`` | $\bar\alpha_N = 0$ kept exactly; the plan's first step takes the model's $\hat x_0$ (``v_prediction``/``sample`` models; refused with ``epsilon``) |
    | any other field (other scheduler classes' solver settings) | refused, unless named in ``ignore`` |

    The x0 options wrap the score, so the clipped $\hat x_0$ goes with the $\hat\epsilon$ it implies: DDPM's
    step exactly, and every sdegen method can use them. ``DDIMScheduler``'s step by default pairs the
    clipped $\hat x_0$ with the model's own $\hat\epsilon$ (``use_clipped_model_output=False``), which no
    score describes: then the score is left unclipped and the plan clips inside its step
    ([`ChainStep`][sdegen.solvers.sde_steps.ChainStep]), so the natural call still reproduces the loop;
    pass ``use_clipped_model_output=True`` for the wrapped score (and diffusers' ``step(...,
    use_clipped_model_output=True)``).

    Args:
        unet: a ``diffusers`` model (``UNet2DModel``, ...) called as above.
        scheduler: a ``diffusers`` scheduler with ``alphas_cumprod`` and ``config``.
        timesteps: ``"continuous"`` or ``"round"`` (see [`from_discrete_eps`][sdegen.adapters.from_discrete_eps]).
        T: end time of the SDE.
        ignore: config field names the caller accepts are not reproduced (e.g. another scheduler
            class's ``solver_order``); the model and its schedule are still wrapped exactly.
        use_clipped_model_output: ``DDIMScheduler`` with ``clip_sample``/``thresholding`` only: as the
            argument of the same name of its ``step`` (see above).

    Returns:
        ``(sde, score_fn)``: a [`DiscreteVPSDE`][sdegen.sdes.discrete.DiscreteVPSDE] with the scheduler's plan,
        and the score (wrapped in the x0 options the config asks for).

    Raises:
        TypeError: ``scheduler`` is not a diffusers scheduler; ``ignore`` is not a collection of names.
        ValueError: an unsupported field or value (named), an unknown ``prediction_type`` or
            ``timesteps``, a ``DDIMScheduler`` whose ``set_timesteps`` was not called.
    """
    config = _diffusers_config(scheduler)
    if isinstance(ignore, str) or not all(isinstance(f, str) for f in ignore):
        raise TypeError(f"ignore must be a collection of config field names, got {ignore!r}")
    name = type(scheduler).__name__
    _check_diffusers_fields(name, config, frozenset(ignore))
    prediction = _check_choice(config.get("prediction_type", "epsilon"), "scheduler.config.prediction_type",
                               _PREDICTIONS)
    _check_choice(timesteps, "timesteps", TIMESTEP_MODES)
    if not isinstance(use_clipped_model_output, bool):
        raise TypeError(f"use_clipped_model_output must be a bool, got {use_clipped_model_output!r}")
    ab = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
    plan = _diffusers_plan(name, scheduler, config, ab.numel(), T)
    sde = DiscreteVPSDE(alphas_cumprod=ab, T=T, plan=plan)
    x0_option = None
    if config.get("thresholding", False):
        x0_option = ThresholdX0(_unset_score, sde, config.get("dynamic_thresholding_ratio", 0.995),
                                config.get("sample_max_value", 1.0))
    elif config.get("clip_sample", False):
        x0_option = ClipX0(_unset_score, sde, config.get("clip_sample_range", 1.0))
    # The plan's own step reads the model (not the score) where a score cannot carry what it needs: x0 at
    # abar = 0 (zero terminal SNR) and learned variances; the x0 option then acts inside that step.
    own_model = plan.variance.startswith("learned") or float(ab[plan.steps[0] - 1]) == 0.0
    ddim_mixed = name == "DDIMScheduler" and not use_clipped_model_output
    if x0_option is not None and (ddim_mixed or own_model):
        # DDIM's default step pairs the transformed x0 with the model's own eps (no score describes the
        # pair); DDPM's uses the transformed x0 and x only, i.e. the eps it implies.
        sde = DiscreteVPSDE(alphas_cumprod=ab, T=T, plan=dataclasses.replace(
            plan, x0_transform=x0_option.transform, eps_from_x0=not ddim_mixed))
        x0_option = None
    score_fn = _DiscreteStepScore(unet, sde, prediction=prediction, timesteps=timesteps, first_step=0,
                                  call=_call_diffusers_unet)
    if x0_option is not None:
        x0_option.score_fn = score_fn
    return sde, score_fn if x0_option is None else x0_option
