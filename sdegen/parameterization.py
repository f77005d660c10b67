r"""Parameterizations: turn a raw network into a score function for any [`AffineSDE`][sdegen.AffineSDE].

With the marginal $x_t = m(t)\,x_0 + s(t)\,\epsilon$ (``mean_coef`` $m$, ``std`` $s$, $\sigma = s/m$),
a network output $F$ is read as one of

| parameterization | $F$ predicts | score $\nabla_x\log p_t(x)$ |
|---|---|---|
| ``"score"`` | the score | $F$ |
| ``"eps"`` | $\epsilon$ (Ho et al. 2020, eq. 12) | $-F/s$ |
| ``"x0"`` | $x_0$ | $(m F - x)/s^2$ (Tweedie) |
| ``"v"`` | $v = a\epsilon - b\,x_0$ (Salimans & Ho 2022, §4) | via $\hat x_0 = a\,x/r - b F$ |
| ``"edm"`` | EDM's $F_\theta$ (Karras et al. 2022, eq. 7, Table 1) | via $\hat x_0 = c_\text{skip}\tilde x + c_\text{out}F$ |

**v for any affine SDE.** With $r = \sqrt{m^2 + s^2}$, $a = m/r$, $b = s/r$ (so $a^2+b^2=1$),
$x/r = a x_0 + b\epsilon$ and we define $v = a\epsilon - b x_0$. Then $\hat x_0 = a\,x/r - b v$ and
$\hat\epsilon = b\,x/r + a v$. For VP ($m^2+s^2=1$) this is exactly Salimans & Ho's
$v = \alpha\epsilon - \sigma x_0$; for VE ($m=1$) it is $v = (\epsilon - s x_0)/\sqrt{1+s^2}$.

**EDM.** With $\tilde x = x/m$ (the VE-scaled input, $\tilde x = x_0 + \sigma\epsilon$) and data std
$\sigma_d$ (``sigma_data``): $c_\text{skip} = \sigma_d^2/(\sigma^2+\sigma_d^2)$,
$c_\text{out} = \sigma\sigma_d/\sqrt{\sigma^2+\sigma_d^2}$, $c_\text{in} = 1/\sqrt{\sigma^2+\sigma_d^2}$,
$c_\text{noise} = \tfrac14\log\sigma$, and $\hat x_0 = c_\text{skip}\tilde x + c_\text{out}
F_\theta(c_\text{in}\tilde x, c_\text{noise})$.

**Network inputs.** Except for EDM, the network sees ``(x, t / T)``; EDM's sees
``(c_in * x / m, c_noise)``. [`ScoreModel.net_inputs`][sdegen.parameterization.ScoreModel.net_inputs] returns them.

Every conversion goes through the SDE's Tweedie helpers (``x0_from_score``, ``score_from_x0``,
``eps_from_score``, ``score_from_eps``), so user-defined affine SDEs work unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._utils import append_dims, check_floating, check_positive
from .sdes import AffineSDE

__all__ = ["ScoreModel", "PARAMETERIZATIONS", "v_from_eps_x0"]

PARAMETERIZATIONS = ("score", "eps", "x0", "v", "edm")


def _v_coefs(m: Tensor, s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """$(a, b, r)$ with $r = \\sqrt{m^2+s^2}$, $a = m/r$, $b = s/r$."""
    r = torch.sqrt(m.square() + s.square())
    return m / r, s / r, r


def v_from_eps_x0(sde: AffineSDE, t: Tensor, eps: Tensor, x0: Tensor) -> Tensor:
    r"""The v-target $v = a\epsilon - b x_0$ with $a = m/r$, $b = s/r$, $r = \sqrt{m^2+s^2}$.

    ``eps``, ``x0``: ``(B, *D)``; ``t``: ``(B,)``. Returns ``(B, *D)``.
    """
    m, s = sde.marginal(t)
    a, b, _ = _v_coefs(m, s)
    return append_dims(a, eps.ndim) * eps - append_dims(b, eps.ndim) * x0


class ScoreModel(nn.Module):
    r"""A network read through a parameterization: callable as ``score_fn(x, t, **model_kwargs)``.

    Args:
        net: a module ``net(x, t, **model_kwargs) -> x-shaped`` (e.g. [`sdegen.nn.MLP`][sdegen.nn.MLP]).
        sde: the [`AffineSDE`][sdegen.AffineSDE] whose marginal $(m(t), s(t))$ defines the conversions.
        parameterization: one of ``"score"``, ``"eps"``, ``"x0"``, ``"v"``, ``"edm"`` (see the module
            docstring for the formulas).
        sigma_data: $\sigma_d$ of the EDM preconditioning (ignored otherwise).

    Calling the model returns the score $\nabla_x \log p_t(x)$; [`eps`][sdegen.parameterization.ScoreModel.eps], [`x0`][sdegen.parameterization.ScoreModel.x0], [`v`][sdegen.parameterization.ScoreModel.v]
    and [`score`][sdegen.parameterization.ScoreModel.forward] give each prediction. ``x``: ``(B, *D)``; ``t``: ``(B,)`` (or a float) in
    forward time ``[0, T]``; avoid ``t = 0`` where $s = 0$ (the score is undefined there).

    Raises:
        TypeError: ``net`` not an ``nn.Module`` or ``sde`` not an ``AffineSDE``.
        ValueError: unknown ``parameterization``.
    """

    def __init__(self, net: nn.Module, sde: AffineSDE, parameterization: str = "eps", *, sigma_data: float = 1.0):
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(sde, AffineSDE):
            raise TypeError(f"sde must be an sdegen.AffineSDE (the parameterizations need its marginal), "
                            f"got {type(sde).__name__}")
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
    def score_from_raw(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        r"""Convert a network output ``out`` (this parameterization) into the score. ``t``: ``(B,)``."""
        p, sde = self.parameterization, self.sde
        if p == "score":
            return out
        if p == "eps":
            return sde.score_from_eps(x, t, out)
        return sde.score_from_x0(x, t, self._x0_from_raw(x, t, out))

    def _x0_from_raw(self, x: Tensor, t: Tensor, out: Tensor) -> Tensor:
        m, s = self.sde.marginal(t)
        if self.parameterization == "x0":
            return out
        if self.parameterization == "v":
            a, b, r = _v_coefs(m, s)
            return append_dims(a / r, x.ndim) * x - append_dims(b, x.ndim) * out
        if self.parameterization == "edm":
            c_skip, c_out, _, _ = self._edm_coefs(m, s)
            return append_dims(c_skip / m, x.ndim) * x + append_dims(c_out, x.ndim) * out
        return self.sde.x0_from_score(x, t, self.score_from_raw(x, t, out))

    def raw_from_score(self, x: Tensor, t: Tensor, score: Tensor) -> Tensor:
        r"""Inverse of [`score_from_raw`][sdegen.parameterization.ScoreModel.score_from_raw]: the output a perfect network would give for ``score``."""
        p, sde = self.parameterization, self.sde
        if p == "score":
            return score
        if p == "eps":
            return sde.eps_from_score(x, t, score)
        x0 = sde.x0_from_score(x, t, score)
        if p == "x0":
            return x0
        m, s = sde.marginal(t)
        if p == "v":
            return v_from_eps_x0(sde, t, sde.eps_from_score(x, t, score), x0)
        c_skip, c_out, _, _ = self._edm_coefs(m, s)
        return (x0 - append_dims(c_skip / m, x.ndim) * x) / append_dims(c_out, x.ndim)

    # ------------------------------------------------------------------ predictions
    def forward(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""The score $s_\theta(x, t) \approx \nabla_x \log p_t(x)$. ``x``: ``(B, *D)``; ``t``: ``(B,)``."""
        t = self._time(x, t)
        return self.score_from_raw(x, t, self.raw(x, t, **model_kwargs))

    score = forward

    def eps(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""$\hat\epsilon(x, t)$, the predicted noise in $x = m x_0 + s\epsilon$."""
        t = self._time(x, t)
        out = self.raw(x, t, **model_kwargs)
        if self.parameterization == "eps":
            return out
        if self.parameterization == "v":
            m, s = self.sde.marginal(t)
            a, b, r = _v_coefs(m, s)
            return append_dims(b / r, x.ndim) * x + append_dims(a, x.ndim) * out
        return self.sde.eps_from_score(x, t, self.score_from_raw(x, t, out))

    def x0(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""$\hat x_0(x, t) = \mathbb E[x_0 \mid x_t = x]$ (the denoiser)."""
        t = self._time(x, t)
        return self._x0_from_raw(x, t, self.raw(x, t, **model_kwargs))

    def v(self, x: Tensor, t, **model_kwargs: Any) -> Tensor:
        r"""$\hat v = a\hat\epsilon - b\hat x_0$ (see the module docstring for $a$, $b$)."""
        t = self._time(x, t)
        out = self.raw(x, t, **model_kwargs)
        if self.parameterization == "v":
            return out
        score = self.score_from_raw(x, t, out)
        return v_from_eps_x0(self.sde, t, self.sde.eps_from_score(x, t, score), self.sde.x0_from_score(x, t, score))

    def extra_repr(self) -> str:
        return f"sde={self.sde!r}, parameterization={self.parameterization!r}"
