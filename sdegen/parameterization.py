r"""Predictions and parameterizations: the one table that converts score, eps, x0, v and velocities.

With the marginal $x_t = m(t)\,x_0 + s(t)\,\epsilon$ of an [`AffineSDE`][sdegen.AffineSDE]
(``mean_coef`` $m$, ``std`` $s$, $\sigma = s/m$), a model output $F$ is read as one of the
**predictions** below. Every conversion in sdegen goes through [`to_score`][sdegen.parameterization.to_score]
and [`from_score`][sdegen.parameterization.from_score] (one row per kind, here and nowhere else):
[`ScoreModel`][sdegen.parameterization.ScoreModel], the adapters in [`sdegen.adapters`][sdegen.adapters] and the
flow-matching SDEs all call them.

| kind | $F$ predicts | score $\nabla_x\log p_t(x)$ | $F$ from the score |
|---|---|---|---|
| ``"score"`` | the score | $F$ | $\nabla\log p_t$ |
| ``"eps"`` | $\epsilon$ (Ho et al. 2020, eq. 12) | $-F/s$ | $-s\,\nabla\log p_t$ |
| ``"x0"`` | $x_0$ (Tweedie) | $(mF - x)/s^2$ | $(x + s^2\nabla\log p_t)/m$ |
| ``"denoiser"`` | $D(x/m, \sigma) = \mathbb E[x_0 \mid x_t]$ (Karras et al. 2022, eq. 3) | as ``"x0"`` | as ``"x0"`` |
| ``"v"`` | $v = a\epsilon - b x_0$ (Salimans & Ho 2022, §4, eq. 11; see below) | $-x/r^2 - aF/s$ | $a\hat\epsilon - b\hat x_0$ |
| ``"flow_velocity"`` | $u = \dot m\,x_0 + \dot s\,\epsilon$, the path velocity $dx_t/dt$ (Lipman et al. 2023, eq. 20; Liu et al. 2023) | $(F - \alpha x)/h$ | $\alpha x + h\,\nabla\log p_t$ |

**The one v convention.** $r = \sqrt{m^2 + s^2}$, $a = m/r$, $b = s/r$ (so $a^2 + b^2 = 1$). The
variance-normalised state $x/r = a\,x_0 + b\,\epsilon$ is a VP-type mixture with angle
$\phi = \arctan(b/a)$, and $v = a\epsilon - b x_0 = d(x/r)/d\phi$ is Salimans & Ho's (2022, eq. 11)
$v = \alpha_t\epsilon - \sigma_t x_0$ applied to it. Then $\hat x_0 = a\,x/r - b\hat v$ and
$\hat\epsilon = b\,x/r + a\hat v$. On VP ($m^2 + s^2 = 1$, $r = 1$) this is exactly Salimans & Ho's v and
``diffusers``' ``prediction_type="v_prediction"``; on VE ($m = 1$) $v = (\epsilon - s x_0)/\sqrt{1+s^2}$.
(sdegen < 0.2 read ``adapters.from_v`` as the unnormalised $m\epsilon - s x_0$; it now uses this one.)

**Flow velocity.** The flow-matching target for the path $x_t = m(t)x_0 + s(t)\epsilon$ is its time
derivative $u = \dot m x_0 + \dot s\epsilon$ (for rectified flow, $m = 1 - t$, $s = t$: $u = \epsilon - x_0$).
Its conditional mean given $x_t$ is the probability-flow drift,
$\mathbb E[u \mid x_t = x] = \alpha(t)x - \tfrac12 g(t)^2\nabla\log p_t(x)$ with
$(\alpha, h) = (a(t), -\tfrac12 g(t)^2)$ from ``sde.ode_coefs`` (Song et al. 2021, eq. 13), so the
row holds for **every** affine SDE, not only flow-matching paths. It is not Salimans & Ho's v.

**EDM.** [`ScoreModel`][sdegen.parameterization.ScoreModel] with ``"edm"`` is a denoiser with the
preconditioning of Karras et al. (2022, eq. 7, Table 1): with $\tilde x = x/m$ and data std
$\sigma_d$ (``sigma_data``), $c_\text{skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)$,
$c_\text{out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}$, $c_\text{in} = 1/\sqrt{\sigma^2+\sigma_d^2}$,
$c_\text{noise} = \tfrac14\log\sigma$, and $\hat x_0 = c_\text{skip}\tilde x + c_\text{out}
F_\theta(c_\text{in}\tilde x, c_\text{noise})$; $\hat x_0$ then goes through the ``"x0"`` row.

**Network inputs.** Except for EDM, a [`ScoreModel`][sdegen.parameterization.ScoreModel]'s network sees
``(x, t / T)``; EDM's sees ``(c_in * x / m, c_noise)``.

Shapes: ``x``, outputs ``(B, *D)``; ``t`` ``(B,)`` forward time in ``[0, T]`` (data at 0). Avoid
$t = 0$ where $s = 0$: the score is undefined there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._utils import append_dims, check_floating, check_positive
from .sdes import AffineSDE

__all__ = ["ScoreModel", "PARAMETERIZATIONS", "PREDICTIONS", "to_score", "from_score", "to_x0_eps", "convert",
           "v_from_eps_x0", "denoiser_inputs"]

#: Prediction kinds of the conversion table (see the module docstring).
PREDICTIONS = ("score", "eps", "x0", "denoiser", "v", "flow_velocity")
#: Parameterizations a [`ScoreModel`][sdegen.parameterization.ScoreModel] accepts.
PARAMETERIZATIONS = ("score", "eps", "x0", "v", "flow_velocity", "edm")


def _check_kind(kind) -> str:
    if kind not in PREDICTIONS:
        raise ValueError(f"prediction kind must be one of {', '.join(map(repr, PREDICTIONS))}; got {kind!r}")
    return kind


def _check_sde(sde) -> AffineSDE:
    if not isinstance(sde, AffineSDE):
        raise TypeError(f"sde must be an sdegen.AffineSDE (the conversions need its marginal), got {type(sde).__name__}")
    return sde


def _v_coefs(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""$(a, b, r)$ with $r = \sqrt{m^2+s^2}$, $a = m/r$, $b = s/r$ (``hypot`` avoids overflow)."""
    r = torch.hypot(m, s)
    return m / r, s / r, r


def to_score(kind: str, output: Tensor, x: Tensor, t: Tensor, sde: AffineSDE) -> Tensor:
    r"""Convert a prediction of kind ``kind`` into the score $\nabla_x\log p_t(x)$ (the table's left column).

    Args:
        kind: one of `PREDICTIONS`.
        output: ``(B, *D)`` the prediction $F$.
        x: ``(B, *D)`` the state $x_t$.
        t: ``(B,)`` forward time in ``[0, T]``.
        sde: the [`AffineSDE`][sdegen.AffineSDE] whose marginal defines the prediction.

    Returns:
        ``(B, *D)`` the score.

    Raises:
        ValueError: unknown ``kind`` or ``output`` not shaped like ``x``.
    """
    _check_kind(kind)
    if not isinstance(output, Tensor) or output.shape != x.shape:
        raise ValueError(f"a {kind!r} prediction must be a tensor shaped like x {tuple(x.shape)}, "
                         f"got {getattr(output, 'shape', type(output).__name__)}")
    if kind == "score":
        return output
    if kind == "flow_velocity":
        alpha, h = sde.ode_coefs(t)
        return (output - append_dims(alpha, x.ndim) * x) / append_dims(h, x.ndim)
    if kind in ("x0", "denoiser"):
        return sde.score_from_x0(x, t, output)
    if kind == "eps":
        return sde.score_from_eps(x, t, output)
    # "v": score = -eps_hat / s with eps_hat = b x / r + a v, written without the cancellation of
    # the x0 route: -x / r^2 - a v / s.
    m, s = sde.marginal(t)
    a, _, r = _v_coefs(m, s)
    return -x / append_dims(r.square(), x.ndim) - append_dims(a / s, x.ndim) * output


def from_score(kind: str, score: Tensor, x: Tensor, t: Tensor, sde: AffineSDE) -> Tensor:
    r"""The prediction of kind ``kind`` that a model with score ``score`` makes (the table's right column).

    The inverse of [`to_score`][sdegen.parameterization.to_score]. ``x0`` and ``eps`` come from the
    SDE's Tweedie helpers (``sde.x0_from_score``, ``sde.eps_from_score``):
    $\hat x_0 = (x + s^2\nabla\log p_t)/m$, $\hat\epsilon = -s\nabla\log p_t$.

    Args:
        kind: one of `PREDICTIONS`.
        score: ``(B, *D)``.
        x: ``(B, *D)``.
        t: ``(B,)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE].

    Returns:
        ``(B, *D)``.
    """
    _check_kind(kind)
    if kind == "score":
        return score
    if kind == "flow_velocity":
        alpha, h = sde.ode_coefs(t)
        return torch.addcmul(append_dims(alpha, x.ndim) * x, append_dims(h, x.ndim), score)
    if kind in ("x0", "denoiser"):
        return sde.x0_from_score(x, t, score)
    if kind == "eps":
        return sde.eps_from_score(x, t, score)
    return v_from_eps_x0(sde, t, sde.eps_from_score(x, t, score), sde.x0_from_score(x, t, score))


def to_x0_eps(kind: str, output: Tensor, x: Tensor, t: Tensor, sde: AffineSDE) -> tuple[Tensor, Tensor]:
    r"""The pair $(\hat x_0, \hat\epsilon)$ with $x = m\hat x_0 + s\hat\epsilon$ that a prediction implies.

    The same table as [`to_score`][sdegen.parameterization.to_score], written without the score so that
    the rows that allow it stay finite where $m = 0$ (zero terminal SNR) or $s = 0$:
    ``"x0"``/``"denoiser"``: $\hat\epsilon = (x - mF)/s$; ``"eps"``: $\hat x_0 = (x - sF)/m$;
    ``"v"``: $\hat x_0 = a\,x/r - bF$, $\hat\epsilon = b\,x/r + aF$ (no division by $m$ or $s$);
    ``"score"``: $\hat\epsilon = -sF$, $\hat x_0 = (x + s^2F)/m$; ``"flow_velocity"``: through the score.

    Args:
        kind: one of `PREDICTIONS`.
        output: ``(B, *D)`` the prediction $F$.
        x: ``(B, *D)``.
        t: ``(B,)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE].

    Returns:
        ``(x0_hat, eps_hat)``, each ``(B, *D)``.
    """
    _check_kind(kind)
    if not isinstance(output, Tensor) or output.shape != x.shape:
        raise ValueError(f"a {kind!r} prediction must be a tensor shaped like x {tuple(x.shape)}, "
                         f"got {getattr(output, 'shape', type(output).__name__)}")
    m, s = sde.marginal(t)
    m_, s_ = append_dims(m, x.ndim), append_dims(s, x.ndim)
    if kind in ("x0", "denoiser"):
        return output, (x - m_ * output) / s_
    if kind == "eps":
        return (x - s_ * output) / m_, output
    if kind == "v":
        a, b, r = (append_dims(c, x.ndim) for c in _v_coefs(m, s))
        return a * x / r - b * output, b * x / r + a * output
    score = to_score(kind, output, x, t, sde)
    return sde.x0_from_score(x, t, score), sde.eps_from_score(x, t, score)


def convert(output: Tensor, x: Tensor, t: Tensor, sde: AffineSDE, *, source: str, target: str) -> Tensor:
    r"""Re-express a prediction of kind ``source`` as kind ``target``: ``from_score(target, to_score(source, ...))``.

    Args:
        output: ``(B, *D)`` the ``source`` prediction.
        x: ``(B, *D)``.
        t: ``(B,)``.
        sde: the [`AffineSDE`][sdegen.AffineSDE].
        source: kind of ``output`` (one of `PREDICTIONS`).
        target: wanted kind.

    Returns:
        ``(B, *D)``.
    """
    _check_kind(target)
    if source == target:
        _check_kind(source)
        return output
    return from_score(target, to_score(source, output, x, t, sde), x, t, sde)


def v_from_eps_x0(sde: AffineSDE, t: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
    r"""The v-target $v = a\epsilon - b x_0$ with $a = m/r$, $b = s/r$, $r = \sqrt{m^2+s^2}$ (module docstring).

    ``eps``, ``x0``: ``(B, *D)``; ``t``: ``(B,)``. Returns ``(B, *D)``.
    """
    m, s = sde.marginal(t)
    a, b, _ = _v_coefs(m, s)
    return append_dims(a, eps.ndim) * eps - append_dims(b, eps.ndim) * x0


def denoiser_inputs(x: Tensor, t: Tensor, sde: AffineSDE) -> tuple[Tensor, Tensor]:
    r"""What an EDM-convention denoiser $D(\tilde x, \sigma)$ receives at $(x, t)$: $(x/m, \sigma = s/m)$.

    Its output is read through the ``"denoiser"`` row (= $\hat x_0$). On VE ($m = 1$) this is $(x, s(t))$.
    ``x``: ``(B, *D)``; ``t``: ``(B,)``. Returns ``((B, *D), (B,))``.
    """
    m, s = sde.marginal(t)
    return x / append_dims(m, x.ndim), s / m


class ScoreModel(nn.Module):
    r"""A network read through a parameterization: callable as ``score_fn(x, t, **model_kwargs)``.

    Args:
        net: a module ``net(x, t, **model_kwargs) -> x-shaped`` (e.g. `sdegen.nn.MLP`).
        sde: the [`AffineSDE`][sdegen.AffineSDE] whose marginal $(m(t), s(t))$ defines the conversions.
        parameterization: one of ``"score"``, ``"eps"``, ``"x0"``, ``"v"``, ``"flow_velocity"``,
            ``"edm"`` (see the module docstring for the formulas; ``"v"`` is the normalised
            Salimans–Ho v).
        sigma_data: $\sigma_d$ of the EDM preconditioning (ignored otherwise).

    Calling the model returns the score $\nabla_x \log p_t(x)$; [`prediction`][sdegen.parameterization.ScoreModel.prediction]
    gives any other kind, and ``eps``, ``x0``, ``v`` are shortcuts. ``x``: ``(B, *D)``; ``t``: ``(B,)``
    (or a float) in forward time ``[0, T]``; avoid ``t = 0`` where $s = 0$ (the score is undefined there).

    Raises:
        TypeError: ``net`` not an ``nn.Module`` or ``sde`` not an ``AffineSDE``.
        ValueError: unknown ``parameterization``.
    """

    def __init__(self, net: nn.Module, sde: AffineSDE, parameterization: str = "eps", *, sigma_data: float = 1.0):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        _check_sde(sde)
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {', '.join(PARAMETERIZATIONS)}; "
                             f"got {parameterization!r}")
        self.net = net
        self.sde = sde
        self.parameterization = parameterization
        self.sigma_data = check_positive(sigma_data, "sigma_data")

    # ------------------------------------------------------------------ network call
    def _time(self, x: Tensor, t) -> Tensor:
        check_floating(x, "x")
        if x.ndim < 2:
            raise ValueError(f"x must have shape (B, *D) with at least 2 dims, got {tuple(x.shape)}")
        return self.sde.time(t, x)

    def _edm_coefs(self, m: Tensor, s: Tensor):
        sigma = s / m
        sd2 = self.sigma_data ** 2
        denom = sigma.square() + sd2
        return sd2 / denom, sigma * self.sigma_data / denom.sqrt(), denom.rsqrt(), 0.25 * sigma.log()

    def net_inputs(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        r"""What the network is fed: ``(x, t / T)``, or ``(c_in x / m, c_noise)`` for EDM."""
        t = self._time(x, t)
        if self.parameterization != "edm":
            return x, t / self.sde.T
        m, s = self.sde.marginal(t)
        _, _, c_in, c_noise = self._edm_coefs(m, s)
        return x * append_dims(c_in / m, x.ndim), c_noise

    def raw(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        """The network output $F$ in the model's own parameterization. ``(B, *D)``."""
        x_in, t_in = self.net_inputs(x, t)
        out = self.net(x_in, t_in, **model_kwargs)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise ValueError(f"net must return a tensor shaped like x {tuple(x.shape)}, "
                             f"got {getattr(out, 'shape', type(out).__name__)}")
        return out

    # ------------------------------------------------------------------ conversions (pure functions of F)
    def _kind_and_output(self, x: Tensor, t: Tensor, out: Tensor) -> tuple[str, Tensor]:
        """The table row and prediction for a raw output (EDM: the preconditioned $\\hat x_0$)."""
        if self.parameterization != "edm":
            return self.parameterization, out
        m, s = self.sde.marginal(t)
        c_skip, c_out, _, _ = self._edm_coefs(m, s)
        return "x0", append_dims(c_skip / m, x.ndim) * x + append_dims(c_out, x.ndim) * out

    def score_from_raw(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        r"""Convert a network output ``out`` (this parameterization) into the score. ``t``: ``(B,)``."""
        kind, pred = self._kind_and_output(x, t, out)
        return to_score(kind, pred, x, t, self.sde)

    def raw_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Inverse of [`score_from_raw`][sdegen.parameterization.ScoreModel.score_from_raw]: the output a perfect network would give."""
        if self.parameterization != "edm":
            return from_score(self.parameterization, score, x, t, self.sde)
        m, s = self.sde.marginal(t)
        c_skip, c_out, _, _ = self._edm_coefs(m, s)
        x0 = from_score("x0", score, x, t, self.sde)
        return (x0 - append_dims(c_skip / m, x.ndim) * x) / append_dims(c_out, x.ndim)

    # ------------------------------------------------------------------ predictions
    def forward(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""The score $s_\theta(x, t) \approx \nabla_x \log p_t(x)$. ``x``: ``(B, *D)``; ``t``: ``(B,)``."""
        t = self._time(x, t)
        return self.score_from_raw(x, t, self.raw(x, t, **model_kwargs))

    score = forward

    def prediction(self, kind: str, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""The model's prediction of kind ``kind`` (one of `PREDICTIONS`), through the one table."""
        _check_kind(kind)
        t = self._time(x, t)
        own, pred = self._kind_and_output(x, t, self.raw(x, t, **model_kwargs))
        if own == kind or (own, kind) in (("x0", "denoiser"), ("denoiser", "x0")):
            return pred
        return from_score(kind, to_score(own, pred, x, t, self.sde), x, t, self.sde)

    def eps(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""$\hat\epsilon(x, t)$, the predicted noise in $x = m x_0 + s\epsilon$."""
        return self.prediction("eps", x, t, **model_kwargs)

    def x0(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""$\hat x_0(x, t) = \mathbb E[x_0 \mid x_t = x]$ (the denoiser)."""
        return self.prediction("x0", x, t, **model_kwargs)

    def v(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""$\hat v = a\hat\epsilon - b\hat x_0$ (see the module docstring for $a$, $b$)."""
        return self.prediction("v", x, t, **model_kwargs)

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, parameterization={self.parameterization!r}"
