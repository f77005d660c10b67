r"""Guided score functions: classifier-free guidance and classifier guidance.

Each function takes a score function and returns a new one, ``score_fn(x, t, **model_kwargs)``,
usable by every sampler. Model inputs such as class labels travel as ``model_kwargs``
(``sdegen.sample(..., model_kwargs={"y": labels})``) and reach the wrapped model unchanged.

By Bayes' rule the class-conditional score is

$$\nabla_x \log p_t(x \mid y) = \nabla_x \log p_t(x) + \nabla_x \log p_t(y \mid x)$$

(Song et al. 2021, eq. 14 / App. I.1). A guidance scale $w$ multiplies the second term, which
sharpens $p_t(x)\,p_t(y \mid x)^w$; for $w \ne 1$ the samples are *not* exact draws from any
tilted data distribution (the tilt of $p_t$ at each $t$ is not the diffusion of one tilted $p_0$),
so $w = 1$ is the only exact choice.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from ._utils import check_number

__all__ = ["classifier_free", "classifier", "classifier_grad"]


def _check_scale(scale, name: str = "scale") -> float:
    return check_number(scale, name)


class _ClassifierFree:
    """Picklable classifier-free guided score (final class); see [`classifier_free`][sdegen.guidance.classifier_free]."""

    def __init__(self, score_fn: Callable, scale: float, null_kwargs: dict, batched: bool):
        self.score_fn, self.scale, self.null_kwargs, self.batched = score_fn, scale, null_kwargs, batched

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        uncond_kwargs = {**model_kwargs, **self.null_kwargs}
        if self.batched:
            s_cond, s_null = self._both(x, t, model_kwargs, uncond_kwargs)
        else:
            s_cond = self.score_fn(x, t, **model_kwargs)
            s_null = self.score_fn(x, t, **uncond_kwargs)
        if x.requires_grad and torch.is_grad_enabled():
            # Differentiated in x (log_likelihood): one branch cut from the graph would silently drop
            # its Jacobian while the other keeps the result differentiable.
            for name, part, weight in (("conditional", s_cond, self.scale), ("unconditional", s_null, 1 - self.scale)):
                if weight != 0 and isinstance(part, Tensor) and not part.requires_grad:
                    raise ValueError(f"the {name} score of classifier-free guidance does not depend on x through "
                                     f"autograd (computed under torch.no_grad(), from x.detach(), or through numpy) "
                                     f"while the guided score is being differentiated in x (e.g. by log_likelihood)")
        return s_null + self.scale * (s_cond - s_null)

    def _both(self, x: Tensor, t: Tensor, cond: dict, null: dict) -> tuple[Tensor, Tensor]:
        B = x.shape[0]
        merged = {}
        for key in cond.keys() | null.keys():
            a, b = cond.get(key), null.get(key)
            if a is b:
                merged[key] = a
                continue
            if not (isinstance(a, Tensor) and isinstance(b, Tensor)):
                raise TypeError(f"classifier_free(batched=True) concatenates the conditional and null "
                                f"inputs; model_kwargs[{key!r}] must be a tensor in both, got "
                                f"{type(a).__name__} and {type(b).__name__}")
            a, b = _per_sample(a, B, key), _per_sample(b, B, key)
            merged[key] = torch.cat([a, b], 0)
        out = self.score_fn(torch.cat([x, x], 0), torch.cat([t, t], 0), **merged)
        return out[:B], out[B:]


def _per_sample(v: Tensor, B: int, key: str) -> Tensor:
    """``v`` with leading dimension ``B`` (a 0-d or batch-1 tensor is broadcast)."""
    if v.ndim == 0:
        v = v.reshape(1)
    if v.shape[0] == 1:
        v = v.expand(B, *v.shape[1:])
    if v.shape[0] != B:
        raise ValueError(f"model_kwargs[{key!r}] must have batch dimension {B} (or 1), got shape {tuple(v.shape)}")
    return v


def classifier_free(score_fn: Callable, scale: float, null_kwargs: Mapping[str, Any] | None = None, *,
                    batched: bool = False) -> Callable:
    r"""Classifier-free guidance: $\tilde s = s(x, t \mid \varnothing) + w\,[s(x, t \mid y) - s(x, t \mid \varnothing)]$.

    $w$ = ``scale``: 1 gives the conditional model, 0 the unconditional one, $w > 1$ stronger
    guidance. (Ho & Salimans 2022, eq. 6, write $\tilde\epsilon = (1+w')\epsilon_c - w'\epsilon_\varnothing$:
    their $w'$ is ``scale - 1``; scores and $\epsilon$ combine the same way since $s = -\epsilon/s(t)$.)

    The conditional call gets the sampler's ``model_kwargs``; the unconditional call gets
    ``{**model_kwargs, **null_kwargs}``: ``null_kwargs`` overrides the conditioning inputs with
    the "no condition" value the model was trained with (e.g. ``{"y": null_label}`` or
    ``{"y": None}``) and leaves other inputs as they are.

    Args:
        score_fn: conditional score ``score_fn(x, t, **model_kwargs)``.
        scale: guidance scale $w$ (any finite real).
        null_kwargs: the overrides for the unconditional call (default: none, i.e. the same call).
        batched: make one call on the concatenated batch ``[x, x]`` (conditional first) instead of
            two; every differing kwarg must then be a tensor with batch dimension ``B`` (or 1).

    Returns:
        A score function. A sampler's ``nfe`` counts calls of it: each makes two model evaluations
        (one of twice the batch with ``batched=True``).
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    if null_kwargs is None:
        null_kwargs = {}
    if not isinstance(null_kwargs, Mapping):
        raise TypeError(f"null_kwargs must be a dict of model inputs, got {type(null_kwargs).__name__}")
    return _ClassifierFree(score_fn, _check_scale(scale), dict(null_kwargs), bool(batched))


class _Classifier:
    """Picklable classifier-guided score (final class); see [`classifier`][sdegen.guidance.classifier]."""

    def __init__(self, score_fn: Callable, grad_fn: Callable, scale: float):
        self.score_fn, self.grad_fn, self.scale = score_fn, grad_fn, scale

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        grad = self.grad_fn(x, t, **model_kwargs)
        if not isinstance(grad, Tensor) or grad.shape != x.shape:
            raise ValueError(f"the classifier gradient must be shaped like x {tuple(x.shape)}, "
                             f"got {getattr(grad, 'shape', type(grad).__name__)}")
        if x.requires_grad and torch.is_grad_enabled() and not grad.requires_grad and self.scale != 0:
            # The caller differentiates the guided score in x (log_likelihood's divergence): a detached
            # guidance term would silently drop its Jacobian, the Hessian of log p_t(y | x).
            raise ValueError(
                "the classifier gradient grad_log_prob(x, t) is detached from x (requires_grad=False: "
                "computed under torch.no_grad(), from x.detach(), with .detach(), or through numpy) while the "
                "guided score is being differentiated in x (e.g. by log_likelihood); its derivative would be "
                "silently missing. Build it with sdegen.guidance.classifier_grad(log_prob), which keeps it "
                "differentiable (create_graph), or return a gradient computed with create_graph=True.")
        return self.score_fn(x, t, **model_kwargs) + self.scale * grad


def classifier(score_fn: Callable, grad_log_prob: Callable, scale: float = 1.0) -> Callable:
    r"""Classifier guidance: $\tilde s = s(x, t) + w\,\nabla_x \log p_t(y \mid x)$.

    (Song et al. 2021, eq. 14; Dhariwal & Nichol 2021, Alg. 1 with scale $w$.) With the exact
    noisy classifier and $w = 1$ this is exactly the class-conditional score.

    Args:
        score_fn: unconditional score ``score_fn(x, t, **model_kwargs)``.
        grad_log_prob: ``grad_log_prob(x, t, **model_kwargs) -> (B, *D)``, the gradient in $x$ of the
            log-probability of the wanted class under a classifier of *noisy* inputs $x_t$ (it
            receives the sampler's ``model_kwargs``, e.g. the labels ``y``). Build one from a
            log-probability with [`classifier_grad`][sdegen.guidance.classifier_grad].
        scale: guidance scale $w$.

    Returns:
        A score function (both callables receive the same ``model_kwargs``). When it is differentiated
        in ``x`` (``log_likelihood``), a ``grad_log_prob`` output that is detached from ``x`` is refused
        with ``ValueError`` rather than silently dropping its Jacobian;
        [`classifier_grad`][sdegen.guidance.classifier_grad] keeps it differentiable.
    """
    if not callable(score_fn):
        raise TypeError(f"score_fn must be callable, got {type(score_fn).__name__}")
    if not callable(grad_log_prob):
        raise TypeError(f"grad_log_prob must be callable grad(x, t, **kwargs), got {type(grad_log_prob).__name__}")
    return _Classifier(score_fn, grad_log_prob, _check_scale(scale))


class _AutogradGrad:
    """Picklable autograd gradient of a log-probability (final class); see [`classifier_grad`][sdegen.guidance.classifier_grad]."""

    def __init__(self, log_prob: Callable):
        self.log_prob = log_prob

    def __call__(self, x: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        if x.requires_grad and torch.is_grad_enabled():
            # The caller differentiates the guided score in x (log_likelihood): keep the graph of the
            # gradient (create_graph) so that its Jacobian, the Hessian of log p_t(y | x), is not lost.
            lp = self._log_prob(x, t, model_kwargs)
            if not lp.requires_grad:
                raise ValueError("log_prob(x, t) does not depend on x through autograd (computed under "
                                 "torch.no_grad(), from x.detach(), or through numpy); its gradient is unknown")
            (grad,) = torch.autograd.grad(lp.sum(), x, create_graph=True)
            return grad
        # Samplers run under torch.no_grad(); the gradient needs a local graph, discarded afterwards.
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            lp = self._log_prob(xg, t, model_kwargs)
            if not lp.requires_grad:
                raise ValueError("log_prob(x, t) does not depend on x through autograd (computed under "
                                 "torch.no_grad(), from x.detach(), or through numpy); its gradient is unknown")
            (grad,) = torch.autograd.grad(lp.sum(), xg)
        return grad.detach()

    def _log_prob(self, x: Tensor, t: Tensor, model_kwargs: dict) -> Tensor:
        lp = self.log_prob(x, t, **model_kwargs)
        if not isinstance(lp, Tensor) or lp.shape != (x.shape[0],):
            raise ValueError(f"log_prob must return shape ({x.shape[0]},), "
                             f"got {getattr(lp, 'shape', type(lp).__name__)}")
        return lp


def classifier_grad(log_prob: Callable) -> Callable:
    r"""$\nabla_x \log p_t(y \mid x)$ by autograd from ``log_prob(x, t, **model_kwargs) -> (B,)``.

    Per-sample log-probabilities are summed before differentiating, which gives each sample its own
    gradient because sample $b$'s term depends only on $x_b$. Works inside samplers (which run
    under ``torch.no_grad()``): the graph is built locally and discarded. When the caller itself
    differentiates in $x$ ([`log_likelihood`][sdegen.likelihood.log_likelihood]: ``x`` requires grad
    under enabled autograd) the gradient keeps its graph (``create_graph=True``), so the guided score
    stays differentiable and its divergence includes $\nabla_x^2\log p_t(y \mid x)$.

    Args:
        log_prob: ``log_prob(x, t, **model_kwargs) -> (B,)``, built from ``x`` with torch operations.

    Returns:
        ``grad(x, t, **model_kwargs) -> (B, *D)``.

    Raises:
        TypeError: ``log_prob`` not callable. (At call time, ``ValueError`` when ``log_prob``'s output
            does not depend on ``x`` through autograd.)
    """
    if not callable(log_prob):
        raise TypeError(f"log_prob must be callable log_prob(x, t, **kwargs), got {type(log_prob).__name__}")
    return _AutogradGrad(log_prob)
