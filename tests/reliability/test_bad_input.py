"""Bad input at every public entry point: the expected exception and a message naming the argument.

Each row of ``CASES`` is one bad call. The same table generates ``docs/errors.md`` (the error each
bad input gets, with the actual message); ``test_errors_doc_is_current`` fails when the page is
stale. Regenerate it with::

    .venv/bin/python tests/reliability/test_bad_input.py
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import sdegen
from sdegen import AffineSDE, CustomSDE, GaussianMixture, SubVPSDE, VESDE, VPSDE
from sdegen._rng import PerSampleNoise

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "errors.md"


class CLIExit(Exception):
    """The CLI returned a non-zero exit status (``code``) and printed ``message`` on stderr."""

    def __init__(self, code: int, message: str):
        super().__init__(f"exit status {code}: {message}")
        self.code = code


def cli(*argv: str) -> None:
    """Run ``sdegen <argv>`` in-process; raise :class:`CLIExit` unless it exits with status 0."""
    from sdegen.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(argv))
        except SystemExit as e:  # argparse errors
            code = e.code
    if code:
        lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
        raise CLIExit(int(code), lines[-1] if lines else "")


@dataclass(frozen=True)
class Case:
    entry: str          # the public entry point
    bad: str            # the bad input, in words
    call: Callable[[], object]
    exc: type           # expected exception type (a subclass is fine)
    match: str          # a substring of the message, naming the argument
    xfail: str | None = None   # a known defect, routed to its owner (strict: fails once fixed)


def _vp():
    return VPSDE()


def _score(x, t):
    return -x


def _wrong_shape_score(x, t):
    return x[:, :1]


def _nan_a_sde():
    return AffineSDE(a=lambda t: -0.5 * torch.ones_like(t), g=lambda t: torch.full_like(t, float("inf")))


def _sample(**kw):
    args = dict(sde=_vp(), score_fn=_score, shape=(4, 2), method="euler_maruyama", steps=5)
    args.update(kw)
    return sdegen.sample(args.pop("sde"), args.pop("score_fn"), args.pop("shape"), **args)


def _loglik(**kw):
    args = dict(sde=_vp(), score_fn=_score, x=torch.zeros(3, 2, dtype=torch.float64))
    args.update(kw)
    return sdegen.log_likelihood(args.pop("sde"), args.pop("score_fn"), args.pop("x"), **args)


def _model(dim=2):
    return sdegen.ScoreModel(sdegen.nn.MLP(dim, hidden=16, depth=1), VPSDE())


def _train(**kw):
    args = dict(model=_model(), data=torch.randn(32, 2, generator=torch.Generator().manual_seed(0)),
                steps=2, batch_size=8, progress=False)
    args.update(kw)
    return sdegen.train(args.pop("model"), args.pop("data"), **args)


def _eps_model(x, i):
    return torch.zeros_like(x)


def _ddpm():
    return sdegen.DDPM.linear(10)


def _bad_json_dir():
    import tempfile

    d = Path(tempfile.gettempdir()) / f"sdegen-badckpt-{os.getpid()}"
    d.mkdir(exist_ok=True)
    (d / "step-00000001.json").write_text("{not json")
    return d



def _tmp(name: str) -> Path:
    """A fresh path under one per-process temporary folder (removed and recreated per call)."""
    import shutil
    import tempfile

    base = Path(tempfile.gettempdir()) / f"sdegen-badinput-{os.getpid()}"
    if not base.exists():
        import atexit

        atexit.register(shutil.rmtree, base, ignore_errors=True)    # this process's files only
    path = base / name
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _file(name: str, text: str = "not a directory") -> Path:
    path = _tmp(name)
    path.write_text(text)
    return path


def _nan_data():
    x = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    x[3, 1] = float("nan")
    return x


def _dir_with_a_run() -> Path:
    """A directory holding a checkpoint record (its contents are not read before the refusal)."""
    d = _tmp("run-exists")
    d.mkdir()
    (d / "step-00000002.json").write_text("{}")
    return d


def _dir_with_a_link() -> Path:
    d = _tmp("run-link")
    d.mkdir()
    (d / "step-00000002.json").symlink_to(_file("victim", "precious"))
    return d


def _train_while_locked():
    from sdegen.training.checkpoint import RunDirectory

    d = _tmp("run-locked")
    with RunDirectory(d):       # this process holds the lock; a second writer is refused
        return _train(checkpoint_dir=d)


@functools.lru_cache(maxsize=None)
def _trained_run() -> Path:
    """A real 2-step run (made once per process), copied by the cases that damage it."""
    d = _tmp("run-real")
    _train(checkpoint_dir=d, keep=1)
    return d


def _copy_of_run(name: str) -> Path:
    import shutil

    d = _tmp(name)
    shutil.copytree(_trained_run(), d)
    return d


def _resume_with_other_data():
    d = _copy_of_run("run-other-data")
    return _train(checkpoint_dir=d, steps=4, data=torch.randn(32, 2, generator=torch.Generator().manual_seed(9)))


def _edited_record(rehash: bool, **changes) -> Path:
    import json

    from sdegen.training.checkpoint import _record_digest, list_checkpoints

    d = _copy_of_run("run-edited")
    record = list_checkpoints(d)[0][1]
    meta = json.loads(record.read_text())
    for key, value in changes.items():
        if key == "parameterization":
            meta["model"]["parameterization"] = value
        else:
            meta["model"]["net"]["config"][key] = value
    if rehash:
        meta["record_sha256"] = _record_digest(meta)
    record.write_text(json.dumps(meta))
    return d


def _npz(name: str, array) -> str:
    import numpy as np

    path = _tmp(name)
    np.savez(path, x=array)
    return str(path)


def _existing_out() -> str:
    return str(_file("exists.npz", "my results"))


def _linked_out() -> str:
    path = _tmp("linked.npz")
    path.symlink_to(_file("victim-out", "precious"))
    return str(path)


_CLI_SAMPLE = ("sample", "--oracle", "gaussian", "--method", "ode_euler", "--steps", "2", "--n", "4", "--quiet")


def _cli_sample(*extra: str) -> None:
    cli(*_CLI_SAMPLE, "--out", str(_tmp("cli-out.npz")), *extra)


def _cli_train_into(directory: Path, *extra: str) -> None:
    cli("train", "--data", "moons", "--n-data", "64", "--hidden", "8", "--depth", "1", "--batch-size", "16",
        "--steps", "2", "--quiet", "--out", str(directory), *extra)


def _detached_score(x, t):
    return -x.detach()


def _no_grad_score(x, t):
    with torch.no_grad():
        return -x


def _float64_score(x, t):
    return -x.double()


def _in_place_score(x, t):
    x.mul_(1.0)
    return -x


def _nan_score(x, t):
    return x * float("nan")


def _from_diffusers(scheduler: str, **kwargs):
    import diffusers

    from sdegen.adapters import from_diffusers

    return from_diffusers(lambda x, t: x, getattr(diffusers, scheduler)(num_train_timesteps=20), **kwargs)


def _inpaint(**kw):
    from sdegen.conditional import inpaint

    return inpaint(_vp(), _score, torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), **kw)

nan, inf = float("nan"), float("inf")

CASES: list[Case] = [
    # ---------------------------------------------------------------- SDE constructors
    Case("VPSDE", "beta_min=-1", lambda: VPSDE(beta_min=-1), ValueError, "beta_min"),
    Case("VPSDE", "beta_min=0", lambda: VPSDE(beta_min=0), ValueError, "beta_min"),
    Case("VPSDE", "beta_max=nan", lambda: VPSDE(beta_max=nan), ValueError, "beta_max"),
    Case("VPSDE", "beta_max < beta_min", lambda: VPSDE(beta_min=5.0, beta_max=1.0), ValueError, "beta_max"),
    Case("VPSDE", "beta_min='abc' (a string)", lambda: VPSDE(beta_min="abc"), TypeError, "beta_min"),
    Case("VPSDE", "T=0", lambda: VPSDE(T=0), ValueError, "T must"),
    Case("VPSDE", "T=inf", lambda: VPSDE(T=inf), ValueError, "T must"),
    Case("SubVPSDE", "beta_max=-3", lambda: SubVPSDE(beta_max=-3), ValueError, "beta_max"),
    Case("VESDE", "sigma_min=0", lambda: VESDE(sigma_min=0), ValueError, "sigma_min"),
    Case("VESDE", "sigma_min > sigma_max", lambda: VESDE(sigma_min=5.0, sigma_max=1.0), ValueError, "sigma_min"),
    Case("VESDE", "sigma_max=inf", lambda: VESDE(sigma_max=inf), ValueError, "sigma_max"),
    Case("VESDE", "T=-1", lambda: VESDE(T=-1), ValueError, "T must"),
    Case("CustomSDE", "drift=3 (not callable)", lambda: CustomSDE(3, lambda t: t), TypeError, "drift"),
    Case("CustomSDE", "diffusion='g' (not callable)", lambda: CustomSDE(lambda x, t: x, "g"), TypeError, "diffusion"),
    Case("CustomSDE", "prior_std=0", lambda: CustomSDE(lambda x, t: x, lambda t: t, prior_std=0), ValueError,
         "prior_std"),
    Case("CustomSDE.drift", "drift returns the wrong shape",
         lambda: CustomSDE(lambda x, t: x[:, :1], lambda t: t).drift(torch.zeros(2, 3), torch.ones(2)),
         ValueError, "drift(x, t)"),
    Case("AffineSDE", "a given without g", lambda: AffineSDE(a=lambda t: -t), ValueError, "g(t)"),
    Case("AffineSDE", "a=1.0 (not callable)", lambda: AffineSDE(a=1.0, g=lambda t: t), TypeError, "a must"),
    Case("AffineSDE", "grid_size=2", lambda: AffineSDE(a=lambda t: -t, g=lambda t: t, grid_size=2), ValueError,
         "grid_size"),
    Case("AffineSDE.marginal", "g(t) = inf", lambda: _nan_a_sde().marginal(0.5), ValueError, "not finite"),
    # ---------------------------------------------------------------- SDE methods
    Case("SDE.marginal", "t=1.5 > T", lambda: _vp().marginal(1.5), ValueError, "t must lie in"),
    Case("SDE.marginal", "t=-0.1", lambda: _vp().marginal(-0.1), ValueError, "t must lie in"),
    Case("SDE.marginal", "t=nan", lambda: _vp().marginal(nan), ValueError, "t must lie in"),
    Case("SDE.marginal", "t='0.5' (a string)", lambda: _vp().marginal("0.5"), TypeError, "t must"),
    Case("SDE.marginal", "t of shape (2, 2)", lambda: _vp().marginal(torch.ones(2, 2) * 0.5), ValueError, "t must"),
    Case("SDE.prior_sample", "shape=(0, 2)", lambda: _vp().prior_sample((0, 2)), ValueError, "shape"),
    Case("SDE.prior_sample", "shape=5 (no data dims)", lambda: _vp().prior_sample(5), ValueError, "shape"),
    Case("SDE.prior_log_prob", "integer x", lambda: _vp().prior_log_prob(torch.ones(2, 2, dtype=torch.int64)),
         TypeError, "x must"),
    Case("SDE.reverse", "score_fn='s' (not callable)", lambda: _vp().reverse("s"), TypeError, "score_fn"),
    # ---------------------------------------------------------------- oracle
    Case("GaussianMixture", "means with NaN", lambda: GaussianMixture(torch.tensor([[0.0, nan]])), ValueError,
         "means"),
    Case("GaussianMixture", "means of shape (1, 1, 2)", lambda: GaussianMixture(torch.zeros(1, 1, 2)), ValueError,
         "means"),
    Case("GaussianMixture", "stds=-1", lambda: GaussianMixture(torch.zeros(2, 2), stds=-1.0), ValueError, "std"),
    Case("GaussianMixture", "weights not summing to 1",
         lambda: GaussianMixture(torch.zeros(2, 2), weights=torch.tensor([0.5, 0.7])), ValueError, "weights"),
    Case("GaussianMixture", "covariance not positive definite",
         lambda: GaussianMixture(torch.zeros(1, 2), covs=torch.tensor([[[1.0, 2.0], [2.0, 1.0]]])), ValueError,
         "cov"),
    Case("GaussianMixture", "covs and stds both given",
         lambda: GaussianMixture(torch.zeros(1, 2), covs=torch.eye(2)[None], stds=1.0), ValueError, "stds"),
    Case("GaussianMixture.log_prob", "x of dimension 3 for a 2-D mixture",
         lambda: sdegen.named_mixture("gaussian").log_prob(torch.zeros(4, 3, dtype=torch.float64)), ValueError,
         "x"),
    Case("named_mixture", "unknown name", lambda: sdegen.named_mixture("nope"), ValueError, "8gaussians"),
    Case("GaussianMixture.score_fn", "a non-affine SDE",
         lambda: sdegen.named_mixture("gaussian").score_fn(CustomSDE(lambda x, t: x, lambda t: t)), TypeError,
         "AffineSDE"),
    # ---------------------------------------------------------------- sample()
    Case("sample", "sde='vp' (a string)", lambda: _sample(sde="vp"), TypeError, "sde must"),
    Case("sample", "method='nope'", lambda: _sample(method="nope"), ValueError, "euler_maruyama"),
    Case("sample", "method=None", lambda: _sample(method=None), ValueError, "method"),
    Case("sample", "unknown option foo=1", lambda: _sample(foo=1), TypeError, "foo"),
    Case("sample", "steps=0", lambda: _sample(steps=0), ValueError, "steps"),
    Case("sample", "steps=2.5", lambda: _sample(steps=2.5), ValueError, "steps"),
    Case("sample", "steps=True", lambda: _sample(steps=True), ValueError, "steps"),
    Case("sample", "steps= for the adaptive rk45", lambda: _sample(method="rk45", steps=10), ValueError, "steps"),
    Case("sample", "eps=0", lambda: _sample(eps=0.0), ValueError, "eps"),
    Case("sample", "eps=1.5 > T", lambda: _sample(eps=1.5), ValueError, "eps"),
    Case("sample", "eps=nan", lambda: _sample(eps=nan), ValueError, "eps"),
    Case("sample", "eps='small'", lambda: _sample(eps="small"), TypeError, "eps"),
    Case("sample", "shape=(0, 2)", lambda: _sample(shape=(0, 2)), ValueError, "shape"),
    Case("sample", "shape=(2,) (no data dims)", lambda: _sample(shape=(2,)), ValueError, "shape"),
    Case("sample", "shape=None and no x_T", lambda: _sample(shape=None), ValueError, "shape"),
    Case("sample", "dtype=torch.int64", lambda: _sample(dtype=torch.int64), TypeError, "dtype"),
    Case("sample", "dtype=torch.float16", lambda: _sample(dtype=torch.float16), TypeError, "dtype"),
    Case("sample", "x_T of another shape than shape", lambda: _sample(x_T=torch.zeros(3, 2)), ValueError, "x_T"),
    Case("sample", "x_T a list", lambda: _sample(x_T=[[0.0, 0.0]]), TypeError, "x_T"),
    Case("sample", "x_T of dtype float16", lambda: _sample(x_T=torch.zeros(4, 2, dtype=torch.float16)), TypeError,
         "dtype"),
    Case("sample", "score_fn=None", lambda: _sample(score_fn=None), TypeError, "score_fn"),
    Case("sample", "score_fn returns the wrong shape", lambda: _sample(score_fn=_wrong_shape_score), ValueError,
         "score_fn"),
    Case("sample", "return_trajectory=-1", lambda: _sample(return_trajectory=-1), ValueError, "return_trajectory"),
    Case("sample", "seeds='abc'", lambda: _sample(seeds="abc"), TypeError, "seeds"),
    Case("sample", "seeds for 3 samples, shape for 4",
         lambda: _sample(seeds=PerSampleNoise([1, 2, 3])), ValueError, "seeds"),
    Case("sample", "denoise='yes'", lambda: _sample(denoise="yes"), TypeError, "denoise"),
    Case("sample", "pc with corrector='nope'", lambda: _sample(method="pc", corrector="nope"), ValueError,
         "corrector"),
    Case("sample", "pc with predictor='nope'", lambda: _sample(method="pc", predictor="nope"), ValueError,
         "predictor"),
    Case("sample", "pc with corrector_steps=0", lambda: _sample(method="pc", corrector_steps=0), ValueError,
         "corrector_steps"),
    Case("sample", "pc with snr=-1", lambda: _sample(method="pc", snr=-1.0), ValueError, "snr"),
    Case("sample", "rk45 with rtol=-1", lambda: _sample(method="rk45", steps=None, rtol=-1.0), ValueError, "rtol"),
    Case("sample", "rk45 with atol=nan", lambda: _sample(method="rk45", steps=None, atol=nan), ValueError, "atol"),
    Case("sample", "torchdiffeq with solver='nope'",
         lambda: _sample(method="torchdiffeq", steps=None, solver="nope"), ValueError, "solver"),
    Case("sample", "scipy with solver='nope'", lambda: _sample(method="scipy", steps=None, solver="nope"),
         ValueError, "solver"),
    Case("sample", "torchsde with solver='nope'", lambda: _sample(method="torchsde", steps=None, solver="nope"),
         ValueError, "solver"),
    Case("sample", "model_kwargs=[1] (not a dict)", lambda: _sample(model_kwargs=[1]), TypeError, "model_kwargs"),
    # ---------------------------------------------------------------- log_likelihood()
    Case("log_likelihood", "divergence='nope'", lambda: _loglik(divergence="nope"), ValueError, "divergence"),
    Case("log_likelihood", "x of shape (3,) (no batch)", lambda: _loglik(x=torch.zeros(3, dtype=torch.float64)),
         ValueError, "x"),
    Case("log_likelihood", "integer x", lambda: _loglik(x=torch.zeros(3, 2, dtype=torch.int64)), TypeError, "x"),
    Case("log_likelihood", "rtol=-1", lambda: _loglik(rtol=-1.0), ValueError, "rtol"),
    Case("log_likelihood", "eps=0", lambda: _loglik(eps=0.0), ValueError, "eps"),
    Case("log_likelihood", "sde='vp' (a string)", lambda: _loglik(sde="vp"), TypeError, "sde"),
    Case("log_likelihood", "score_fn=None", lambda: _loglik(score_fn=None), TypeError, "score_fn"),
    # ---------------------------------------------------------------- DDPM
    Case("DDPM", "empty betas", lambda: sdegen.DDPM([]), ValueError, "betas"),
    Case("DDPM", "a beta equal to 0", lambda: sdegen.DDPM([0.1, 0.0]), ValueError, "betas"),
    Case("DDPM", "a beta equal to 1", lambda: sdegen.DDPM([0.1, 1.0]), ValueError, "betas"),
    Case("DDPM", "NaN beta", lambda: sdegen.DDPM([0.1, nan]), ValueError, "betas"),
    Case("DDPM", "2-D betas", lambda: sdegen.DDPM(torch.full((2, 2), 0.1)), ValueError, "betas"),
    Case("DDPM", "variance='nope'", lambda: sdegen.DDPM([0.1], variance="nope"), ValueError, "variance"),
    Case("DDPM.linear", "n_steps=0", lambda: sdegen.DDPM.linear(0), ValueError, "n_steps"),
    Case("DDPM.cosine", "n_steps=-1", lambda: sdegen.DDPM.cosine(-1), ValueError, "n_steps"),
    Case("VPSDE.discretize", "n_steps=0", lambda: _vp().discretize(0), ValueError, "n_steps"),
    Case("DDPM.q_sample", "step i=11 of a 10-step chain",
         lambda: _ddpm().q_sample(torch.zeros(2, 2), 11, torch.zeros(2, 2)), ValueError, "i"),
    Case("DDPM.ddim_sample", "steps=20 > n_steps=10", lambda: _ddpm().ddim_sample(_eps_model, (2, 2), steps=20),
         ValueError, "steps"),
    Case("DDPM.ddim_sample", "eta=-1", lambda: _ddpm().ddim_sample(_eps_model, (2, 2), steps=5, eta=-1.0),
         ValueError, "eta"),
    Case("DDPM.sample", "shape=(0, 2)", lambda: _ddpm().sample(_eps_model, (0, 2)), ValueError, "shape"),
    # ---------------------------------------------------------------- models
    Case("ScoreModel", "net is a function", lambda: sdegen.ScoreModel(_score, VPSDE()), TypeError, "net"),
    Case("ScoreModel", "a non-affine SDE",
         lambda: sdegen.ScoreModel(sdegen.nn.MLP(2), CustomSDE(lambda x, t: x, lambda t: t)), TypeError, "sde"),
    Case("ScoreModel", "parameterization='nope'",
         lambda: sdegen.ScoreModel(sdegen.nn.MLP(2), VPSDE(), "nope"), ValueError, "parameterization"),
    Case("nn.MLP", "activation='nope'", lambda: sdegen.nn.MLP(2, activation="nope"), ValueError, "activation"),
    Case("nn.MLP", "time_embedding='nope'", lambda: sdegen.nn.MLP(2, time_embedding="nope"), ValueError,
         "time_embedding"),
    # ---------------------------------------------------------------- train()
    Case("train", "model is a bare nn.Module", lambda: _train(model=sdegen.nn.MLP(2)), TypeError, "model"),
    Case("train", "integer data", lambda: _train(data=torch.zeros(8, 2, dtype=torch.int64)), ValueError, "data"),
    Case("train", "1-D data", lambda: _train(data=torch.zeros(8)), ValueError, "data"),
    Case("train", "data a list", lambda: _train(data=[[0.0, 1.0]]), TypeError, "data"),
    Case("train", "data of dimension 3 for a 2-D net", lambda: _train(data=torch.zeros(8, 3)), ValueError, "data"),
    Case("train", "float64 data for a float32 model", lambda: _train(data=torch.zeros(8, 2, dtype=torch.float64)),
         ValueError, "dtype"),
    Case("train", "steps=0", lambda: _train(steps=0), ValueError, "steps"),
    Case("train", "batch_size=0", lambda: _train(batch_size=0), ValueError, "batch_size"),
    Case("train", "lr=-1", lambda: _train(lr=-1.0), ValueError, "lr"),
    Case("train", "lr=nan", lambda: _train(lr=nan), ValueError, "lr"),
    Case("train", "optimizer='sgd'", lambda: _train(optimizer="sgd"), ValueError, "optimizer"),
    Case("train", "loss='nope'", lambda: _train(loss="nope"), ValueError, "loss"),
    Case("train", "weighting='nope'", lambda: _train(weighting="nope"), ValueError, "weighting"),
    Case("train", "cond_drop=1.5", lambda: _train(cond_drop=1.5), ValueError, "cond_drop"),
    Case("train", "checkpoint_every=0", lambda: _train(checkpoint_every=0), ValueError, "checkpoint_every"),
    Case("load", "a directory without checkpoints", lambda: sdegen.load(ROOT / "docs"), RuntimeError,
         "no checkpoint"),
    Case("load", "a record that is not JSON", lambda: sdegen.load(_bad_json_dir()), RuntimeError, "JSON"),
    # ---------------------------------------------------------------- per-sample noise
    Case("PerSampleNoise", "seeds=[]", lambda: PerSampleNoise([]), ValueError, "seeds"),
    Case("PerSampleNoise", "seeds=[1.5]", lambda: PerSampleNoise([1.5]), TypeError, "seeds"),
    Case("PerSampleNoise", "seeds=[-1]", lambda: PerSampleNoise([-1]), ValueError, "seeds"),
    Case("PerSampleNoise", "seeds='abc'", lambda: PerSampleNoise("abc"), TypeError, "seeds"),
    Case("PerSampleNoise", "shape[0] != len(seeds)", lambda: PerSampleNoise([1, 2], (3, 2)), ValueError, "shape"),
    Case("PerSampleNoise", "dtype=torch.int64", lambda: PerSampleNoise([1], (1, 2), dtype=torch.int64), TypeError,
         "dtype"),
    Case("PerSampleNoise.__call__", "step i=-1", lambda: PerSampleNoise([1], (1, 2))(-1), ValueError, "i (the step"),
    Case("PerSampleNoise.from_offset", "batch=0", lambda: PerSampleNoise.from_offset(0, 0), ValueError, "batch"),
    # ---------------------------------------------------------------- command line
    Case("CLI", "unknown command `sdegen fly`", lambda: cli("fly"), CLIExit, "invalid choice"),
    Case("CLI", "`sample --method nope`", lambda: cli("sample", "--oracle", "gaussian", "--method", "nope",
                                                       "--n", "4", "--quiet"), CLIExit, "method"),
    Case("CLI", "`sample --opt rtol` (no =)", lambda: cli("sample", "--oracle", "gaussian", "--opt", "rtol",
                                                          "--quiet"), CLIExit, "--opt"),
    Case("CLI", "`sample --opt 1x=2` (bad key)", lambda: cli("sample", "--oracle", "gaussian", "--opt", "1x=2",
                                                             "--quiet"), CLIExit, "--opt"),
    Case("CLI", "`sample --opt` with code as the value",
         lambda: cli("sample", "--oracle", "gaussian", "--method", "rk45", "--n", "4", "--quiet",
                     "--opt", "rtol=__import__('os').getcwd()"), CLIExit, "rtol"),
    Case("CLI", "`sample --n 0`", lambda: cli("sample", "--oracle", "gaussian", "--n", "0"), CLIExit, "--n"),
    Case("CLI", "`sample --oracle nope`", lambda: cli("sample", "--oracle", "nope", "--n", "4"), CLIExit,
         "--oracle"),
    Case("CLI", "`sample --checkpoint` of a missing directory",
         lambda: cli("sample", "--checkpoint", "/nonexistent/sdegen-ckpt", "--n", "4"), CLIExit, "checkpoint"),
    Case("CLI", "`sample --device quantum`", lambda: cli("sample", "--oracle", "gaussian", "--device", "quantum"),
         CLIExit, "--device"),
    Case("CLI", "`sample --sde nope`", lambda: cli("sample", "--oracle", "gaussian", "--sde", "nope"), CLIExit,
         "--sde"),
    Case("CLI", "`likelihood --divergence nope`", lambda: cli("likelihood", "--oracle", "gaussian",
                                                              "--divergence", "nope"), CLIExit, "--divergence"),
    Case("CLI", "`train` without --out", lambda: cli("train"), CLIExit, "--out"),
    Case("CLI", "`train --data missing.npz`",
         lambda: cli("train", "--data", "/nonexistent/missing.npz", "--out", "/nonexistent/out"), CLIExit, "--data"),
    Case("CLI", "`train --lr abc`", lambda: cli("train", "--lr", "abc", "--out", "x"), CLIExit, "--lr"),
    Case("CLI", "`bench nope`", lambda: cli("bench", "nope"), CLIExit, "invalid choice"),

    # ================================================================ issue 14: numbers (True, strings, ints)
    Case("VPSDE", "beta_min=True", lambda: VPSDE(beta_min=True), TypeError, "beta_min"),
    Case("VESDE", "sigma_max='50' (a string)", lambda: VESDE(sigma_max="50"), TypeError, "sigma_max"),
    Case("sample", "eps=True", lambda: _sample(eps=True), TypeError, "eps"),
    Case("sample", "eps='0.01' (a string)", lambda: _sample(eps="0.01"), TypeError, "eps"),
    Case("sample", "strength='0.5' (a string)", lambda: _sample(x_init=torch.zeros(4, 2), shape=None, strength="0.5"),
         TypeError, "strength"),
    Case("sample", "pc with snr=True", lambda: _sample(method="pc", snr=True), TypeError, "snr"),
    Case("sample", "rk45 with rtol='1e-3' (a string)", lambda: _sample(method="rk45", steps=None, rtol="1e-3"),
         TypeError, "rtol"),
    Case("sample", "dpm_solver with order=True", lambda: _sample(method="dpm_solver", order=True), TypeError, "order"),
    Case("sample", "dpm_solver with order=2.0", lambda: _sample(method="dpm_solver", order=2.0), TypeError, "order"),
    Case("sample", "heun_karras with s_churn=True", lambda: _sample(method="heun_karras", s_churn=True), TypeError,
         "s_churn"),
    Case("sample", "heun_karras with final_euler='no'", lambda: _sample(method="heun_karras", final_euler="no"),
         TypeError, "final_euler"),
    Case("sample", "heun_karras with rho=True", lambda: _sample(method="heun_karras", rho=True), ValueError, "rho"),
    Case("grids.log_snr", "eps='0.01' (a string)", lambda: sdegen.grids.log_snr(VPSDE(), 5, eps="0.01"), TypeError,
         "eps"),
    Case("GaussianMixture", "stds=True", lambda: GaussianMixture(torch.zeros(1, 2), stds=True), TypeError, "stds"),
    Case("sample", "sde_dpm_solver with lower_order_final='no'",
         lambda: _sample(method="sde_dpm_solver", lower_order_final="no"), TypeError, "lower_order_final"),
    Case("sample", "dpm_solver_singlestep with eta=True", lambda: _sample(method="dpm_solver_singlestep", eta=True),
         TypeError, "eta"),
    Case("inpaint", "eps='0.01' (a string)", lambda: _inpaint(eps="0.01"), TypeError, "eps"),
    Case("inpaint", "smc with ess_threshold=True", lambda: _inpaint(method="smc", ess_threshold=True), TypeError,
         "ess_threshold"),
    Case("log_likelihood", "eps=True", lambda: _loglik(eps=True), TypeError, "eps"),
    Case("log_likelihood", "rtol='1e-3' (a string)", lambda: _loglik(rtol="1e-3"), TypeError, "rtol"),
    Case("DDPM.linear", "beta_start=True", lambda: sdegen.DDPM.linear(10, beta_start=True), TypeError, "beta_start"),
    Case("DDPM.ddim_sample", "eta=True", lambda: _ddpm().ddim_sample(_eps_model, (2, 2), steps=5, eta=True),
         TypeError, "eta"),
    Case("ScoreModel", "sigma_data=True", lambda: sdegen.ScoreModel(sdegen.nn.MLP(2), VPSDE(), "edm", sigma_data=True),
         TypeError, "sigma_data"),
    Case("classifier_free", "scale=True", lambda: sdegen.guidance.classifier_free(_score, scale=True), TypeError,
         "scale"),
    Case("nn.MLP", "dropout=True (would drop everything)", lambda: sdegen.nn.MLP(2, dropout=True), ValueError,
         "dropout"),
    Case("train", "lr=True", lambda: _train(lr=True), TypeError, "lr"),
    Case("train", "lr='1e-3' (a string)", lambda: _train(lr="1e-3"), TypeError, "lr"),
    Case("train", "eps=True", lambda: _train(eps=True), TypeError, "eps"),
    Case("train", "warmup=True", lambda: _train(warmup=True), TypeError, "warmup"),
    Case("train", "seed=1.7 (ran seed 1)", lambda: _train(seed=1.7), TypeError, "seed"),
    Case("train", "seed=-5", lambda: _train(seed=-5), ValueError, "seed"),
    Case("train", "keep=0 (kept one)", lambda: _train(keep=0), ValueError, "keep"),
    Case("train", "keep='a' (failed after training)", lambda: _train(keep="a"), TypeError, "keep"),
    Case("train", "grad_clip=0 (trained nothing)", lambda: _train(grad_clip=0.0), ValueError, "grad_clip"),
    Case("train", "grad_clip=-1 (ascended)", lambda: _train(grad_clip=-1.0), ValueError, "grad_clip"),
    Case("train", "ema=1.0", lambda: _train(ema=1.0), ValueError, "ema"),
    # ================================================================ issue 14: training never loses work or data
    Case("train", "data with NaN", lambda: _train(data=_nan_data()), ValueError, "data must be finite"),
    Case("train", "checkpoint_dir is a file", lambda: _train(checkpoint_dir=_file("ckpt-file")), ValueError,
         "checkpoint_dir"),
    Case("train", "checkpoint_dir cannot be created (/proc)", lambda: _train(checkpoint_dir="/proc/sdegen-run"),
         ValueError, "checkpoint_dir"),
    Case("train", "log_file is an unrelated existing file", lambda: _train(log_file=_file("notes.jsonl", "notes\nmore\n")),
         ValueError, "log_file"),
    Case("train", "resume=False over an existing run", lambda: _train(checkpoint_dir=_dir_with_a_run(), resume=False),
         sdegen.training.CheckpointError, "overwrite=True"),
    Case("train", "resume with other data", _resume_with_other_data, sdegen.training.CheckpointError,
         "other training data"),
    Case("train", "a second writer in the same checkpoint_dir", _train_while_locked, sdegen.training.CheckpointError,
         "in use by another training process"),
    Case("train", "a planted link in the checkpoint_dir", lambda: _train(checkpoint_dir=_dir_with_a_link()),
         sdegen.training.CheckpointError, "symbolic link"),
    # ================================================================ issue 14: the checkpoint record
    Case("load", "parameterization edited in the JSON record",
         lambda: sdegen.load(_edited_record(False, parameterization="x0")), sdegen.training.CheckpointError, "checksum"),
    Case("load", "net config hidden=10**6 (checksum recomputed)",
         lambda: sdegen.load(_edited_record(True, hidden=10**6)), sdegen.training.CheckpointError, "hidden"),
    Case("load", "net config hidden=6000, depth=24 (checksum recomputed)",
         lambda: sdegen.load(_edited_record(True, hidden=6000, depth=24)), sdegen.training.CheckpointError,
         "does not describe its stored weights"),
    # ================================================================ issue 14: scores that would give wrong numbers
    Case("log_likelihood", "score computed from x.detach()", lambda: _loglik(score_fn=_detached_score), ValueError,
         "autograd"),
    Case("log_likelihood", "score computed under torch.no_grad()", lambda: _loglik(score_fn=_no_grad_score),
         ValueError, "autograd"),
    Case("log_likelihood", "hutchinson, score from x.detach()",
         lambda: _loglik(score_fn=_detached_score, divergence="hutchinson"), ValueError, "autograd"),
    Case("sample", "score returns float64 for a float32 state", lambda: _sample(score_fn=_float64_score), TypeError,
         "dtype"),
    Case("sample", "adaptive_sde, score returns float64", lambda: _sample(score_fn=_float64_score,
                                                                          method="adaptive_sde", steps=None),
         TypeError, "dtype"),
    Case("sample", "score returns an integer tensor",
         lambda: _sample(score_fn=lambda x, t: torch.zeros(x.shape, dtype=torch.int64)), TypeError, "dtype"),
    Case("sample", "score modifies x in place", lambda: _sample(score_fn=_in_place_score), RuntimeError, "in place"),
    Case("sample", "rk45, score returns NaN", lambda: _sample(score_fn=_nan_score, method="rk45", steps=None),
         sdegen.NonFiniteError, "sample 0"),
    Case("sample", "adaptive_sde, score returns NaN",
         lambda: _sample(score_fn=_nan_score, method="adaptive_sde", steps=None), sdegen.NonFiniteError, "sample 0"),
    Case("sample", "x_T with NaN", lambda: _sample(shape=None, x_T=torch.tensor([[0.0, nan]] * 4)), ValueError, "x_T"),
    Case("log_likelihood", "score returns NaN", lambda: _loglik(score_fn=_nan_score), sdegen.NonFiniteError,
         "sample 0"),
    # ================================================================ issue 14: grids and backend options
    Case("sample", "grid that does not start at T",
         lambda: _sample(method="ode_euler", steps=None, grid=torch.tensor([0.5, 0.2, 0.01])), ValueError, "grid"),
    Case("sample", "grid with a contradicting steps=",
         lambda: _sample(method="ode_euler", steps=5, grid=torch.tensor([1.0, 0.5, 0.01])), ValueError, "steps=5"),
    Case("sample", "grid with a contradicting eps=",
         lambda: _sample(method="ode_euler", steps=None, eps=1e-3, grid=torch.tensor([1.0, 0.5, 0.01])), ValueError,
         "eps=0.001"),
    Case("sample", "2-D grid", lambda: _sample(method="ode_euler", steps=None, grid=torch.tensor([[1.0, 0.5], [0.2, 0.01]])),
         ValueError, "1-D"),
    Case("sample", "torchdiffeq option typo max_stepz=", lambda: _sample(method="torchdiffeq", steps=None, max_stepz=0.1),
         TypeError, "max_stepz"),
    Case("sample", "scipy option typo max_stepz=", lambda: _sample(method="scipy", steps=None, max_stepz=0.1),
         TypeError, "max_stepz"),
    Case("sample", "torchsde option typo max_stepz=", lambda: _sample(method="torchsde", max_stepz=0.1), TypeError,
         "max_stepz"),
    Case("log_likelihood", "scipy option typo max_stepz=", lambda: _loglik(method="scipy", max_stepz=0.1), TypeError,
         "max_stepz"),
    # ================================================================ issue 14: DDPM and foreign schedulers
    Case("DDPM.score_fn", "t=1.5 > T", lambda: VPSDE().discretize(100).score_fn(_eps_model)(torch.zeros(2, 2),
                                                                                           torch.full((2,), 1.5)),
         ValueError, "t must lie in"),
    Case("DDPM.score_fn", "t=nan", lambda: VPSDE().discretize(100).score_fn(_eps_model)(torch.zeros(2, 2),
                                                                                       torch.full((2,), nan)),
         ValueError, "t must lie in"),
    Case("DDPM.vlb", "x0 with NaN", lambda: _ddpm().vlb(_eps_model, torch.tensor([[0.0, nan]])), ValueError, "x0"),
    Case("DDPM.sample", "1-D x_T", lambda: _ddpm().sample(_eps_model, None, x_T=torch.zeros(6)), ValueError, "x_T"),
    Case("DDPM.sample", "eps_model returns float64 for a float32 chain",
         lambda: _ddpm().sample(lambda x, i: torch.zeros_like(x, dtype=torch.float64), (2, 2)), TypeError, "dtype"),
    Case("from_diffusers", "ignore='solver_order' (a string, not a collection)",
         lambda: _from_diffusers("UniPCMultistepScheduler", ignore="solver_order"), TypeError, "ignore"),
    Case("from_diffusers", "UniPCMultistepScheduler (fields it does not reproduce)",
         lambda: _from_diffusers("UniPCMultistepScheduler"), ValueError, "solver_order"),
    # ================================================================ issue 14: command line
    Case("CLI", "`sample --out` of an existing file", lambda: cli(*_CLI_SAMPLE, "--out", _existing_out()), CLIExit,
         "--force"),
    Case("CLI", "`sample --out` a symbolic link", lambda: cli(*_CLI_SAMPLE, "--out", _linked_out(), "--force"),
         CLIExit, "symbolic link"),
    Case("CLI", "`sample --opt steps=5`", lambda: _cli_sample("--opt", "steps=5"), CLIExit, "--steps"),
    Case("CLI", "`sample --opt generator=1`", lambda: _cli_sample("--opt", "generator=1"), CLIExit, "--seed"),
    Case("CLI", "`sample --opt dtype=float64`", lambda: _cli_sample("--opt", "dtype=float64"), CLIExit, "--float64"),
    Case("CLI", "`sample --device meta`", lambda: _cli_sample("--device", "meta"), CLIExit, "--device"),
    Case("CLI", "`sample --device xla`", lambda: _cli_sample("--device", "xla"), CLIExit, "--device"),
    Case("CLI", "`sample --seed -5`", lambda: _cli_sample("--seed", "-5"), CLIExit, "--seed"),
    Case("CLI", "`sample --seed -5 --batch-size 2`", lambda: _cli_sample("--seed", "-5", "--batch-size", "2"), CLIExit,
         "--seed"),
    Case("CLI", "`sample --seed 2**70`", lambda: _cli_sample("--seed", str(2**70)), CLIExit, "--seed"),
    Case("CLI", "`train --data` with complex values", lambda: cli("train", "--data", _npz("c.npz", [[1 + 1j, 0j]] * 8),
                                                                  "--out", str(_tmp("run-c")), "--quiet"),
         CLIExit, "real numbers"),
    Case("CLI", "`train --out` holding a planted link", lambda: _cli_train_into(_dir_with_a_link()), CLIExit,
         "symbolic link"),
]


def _run(case: Case) -> BaseException | None:
    try:
        case.call()
    except Exception as err:  # noqa: BLE001 - we record what each bad input gets
        return err
    return None


def _first_line(err: BaseException) -> str:
    """The message's first line, with machine-specific paths replaced (so the page is stable)."""
    import tempfile

    text = str(err).strip().splitlines()
    line = text[0] if text else ""
    line = line.replace(f"sdegen-badckpt-{os.getpid()}", "sdegen-badckpt")
    line = line.replace(f"sdegen-badinput-{os.getpid()}", "sdegen-badinput").replace(f"pid {os.getpid()}", "pid <pid>")
    return line.replace(str(ROOT), "<repo>").replace(tempfile.gettempdir(), "<tmp>")


@pytest.mark.parametrize("case", [
    pytest.param(c, id=f"{c.entry}:{c.bad}",
                 marks=[pytest.mark.xfail(strict=True, reason=c.xfail)] if c.xfail else [])
    for c in CASES])
def test_bad_input_is_refused_with_a_clear_error(case: Case):
    err = _run(case)
    assert err is not None, f"{case.entry} accepted {case.bad} without an error"
    assert isinstance(err, case.exc), f"{case.entry} with {case.bad}: expected {case.exc.__name__}, got " \
                                      f"{type(err).__name__}: {err}"
    assert not isinstance(err, (AssertionError, AttributeError, IndexError, KeyError, ZeroDivisionError)), err
    assert case.match in str(err), f"{case.entry} with {case.bad}: message does not name {case.match!r}: {err}"


def test_cli_option_values_are_never_evaluated(tmp_path):
    # A value that would create a file if evaluated as Python stays a string (and is refused).
    from sdegen.cli import parse_option

    marker = tmp_path / "evaluated"
    payload = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    key, value = parse_option(f"rtol={payload}")
    assert key == "rtol" and value == payload and isinstance(value, str)
    with pytest.raises(CLIExit):
        cli("sample", "--oracle", "gaussian", "--method", "rk45", "--n", "4", "--quiet", "--out",
            str(tmp_path / "s.npz"), "--opt", f"rtol={payload}")
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------- the page
def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


HEADER = """# Errors and bad input

sdegen validates its arguments at every public entry point: a bad input raises a clear exception
whose message names the argument, the expected and the received value; unknown options list the
valid ones. The table below is generated from the test table in
`tests/reliability/test_bad_input.py` (each row is run by the test suite, which also checks that
this page is current). Regenerate it with

    .venv/bin/python tests/reliability/test_bad_input.py

"""

FOOTER = """
## Numerical faults

| fault | error |
|---|---|
| the score returns NaN/inf at some step (every fixed-grid method) | `NonFiniteError` with `.step`, `.t` and `.x` (the last good state) |
| the score explodes as t → 0 | `NonFiniteError` naming the first non-finite step and its time |
| the adaptive step size of `rk45` underflows | `StepSizeError` with `.t`, `.dt`, `.x`, `.steps` |
| `rk45` exceeds `max_steps` | `StepSizeError` with the state reached |
| the training loss becomes NaN/inf | `TrainingDivergedError`; the last good checkpoint is kept, the model passed to `train` gets its weights back |
| the newest checkpoint is truncated or corrupt (sha256 mismatch) | `RuntimeWarning`, the previous good checkpoint is used |
| the JSON record of a checkpoint was edited (its `record_sha256` no longer matches) | treated as corrupt: `RuntimeWarning` and the previous one, or `CheckpointError` |
| a network config in a record does not describe the stored weights, or exceeds the size bounds | `CheckpointError` before any memory is allocated (shapes from a meta-device build) |
| a checkpoint directory holds a pickle (`.pt`, `.pkl`) or a record pointing at one | never unpickled; `CheckpointError` |

`tests/reliability/test_faults.py` injects each fault; `tests/reliability/test_checkpoints.py` kills a
training process with SIGKILL at several points and checks that resuming loses nothing.

## Training never loses work or data

* Every option, the data (finite, shape, dtype) and `checkpoint_dir` (a writable directory without
  symbolic links, not in use) are checked before step 1; nothing is written before that.
* If `train` fails (a bad checkpoint, a diverged loss, an exception in a callback), the model passed
  to it gets back the weights and train/eval mode it had on entry.
* A checkpoint stores a fingerprint of the data (shape, dtype, sha256 of a strided subsample of up
  to 1,024 rows) beside the training options: resuming with other data or options is refused.
  `resume=False` over a directory that holds a run is refused; `overwrite=True` discards that run.
* A run directory is locked (`.sdegen.lock`, `fcntl.flock`, holding the pid) for the whole run: a
  second process (or a second call in the same process) training into it is refused with the pid of
  the holder. The kernel releases the lock when its process dies, so a killed run's lock is taken over.
* Temporary files of an interrupted atomic write (`.step-*.tmp`) and weights files without a
  committed record are removed when the next run starts.
* `log_file` is never a link and never a file other than an sdegen training log; `sdegen sample
  --out` refuses an existing file without `--force` and a link always; files are written atomically
  (temporary file and rename), so a link planted at a name is replaced, never written through.

`tests/training/test_train_safety.py` checks each point (a forked second process holds the lock).

## Reproducibility

* **CPU**: the same seed (a `torch.Generator` state, or `train(seed=...)`) and the same inputs give
  bitwise-identical samples, likelihoods and trained weights, also across separate processes
  (`tests/reliability/test_reproducibility.py`). Results can change with the PyTorch version.
* **Per-sample seeds**: `sample(..., seeds=PerSampleNoise(seeds, shape))` (or
  `PerSampleNoise.from_offset(offset, batch, shape)`) gives sample *k* noise that depends only on
  its own seed, so it is identical in a batch of 1, 7 or 1,000. The draws use integer hashing and
  `+ - * /` only, so they are bitwise equal on CPU and CUDA, for any batch size and thread count.
  The *samples* still pass through the score network, whose batched kernels may round differently
  for different batch sizes (see below).
* **CUDA**: a fixed seed gives the same result on the same GPU, driver and PyTorch build only when
  the score network's kernels are deterministic. Set
  `torch.use_deterministic_algorithms(True)`, `torch.backends.cudnn.benchmark = False` and the
  environment variable `CUBLAS_WORKSPACE_CONFIG=:4096:8` before the first CUDA call; matrix
  multiplications may still pick batch-size-dependent algorithms, and TF32
  (`torch.backends.cuda.matmul.allow_tf32`) changes results. CPU and CUDA results are not bitwise
  equal (different floating-point kernels); they agree to rounding.
"""


def render() -> str:
    rows = ["| # | entry point | bad input | error raised | message |", "|---|---|---|---|---|"]
    for k, case in enumerate(CASES, 1):
        err = _run(case)
        kind = "no error" if err is None else type(err).__name__
        if isinstance(err, CLIExit):
            kind = f"exit status {err.code}"
            msg = _first_line(err).split(": ", 1)[-1]
        else:
            msg = "" if err is None else _first_line(err)
        if len(msg) > 160:
            msg = msg[:157] + "..."
        rows.append(f"| {k} | `{case.entry}` | {_escape(case.bad)} | {kind} | {_escape(msg)} |")
    return HEADER + summary() + "\n".join(rows) + "\n" + FOOTER


def counts() -> dict[str, int]:
    """Rows of the table per entry point (``SDE.marginal`` counts under ``SDE``), in table order."""
    out: dict[str, int] = {}
    for case in CASES:
        key = case.entry.split(".")[0]
        out[key] = out.get(key, 0) + 1
    return out


def summary() -> str:
    per = counts()
    table = "\n".join(["| entry point | bad inputs |", "|---|---|"] + [f"| `{e}` | {n} |" for e, n in per.items()])
    return f"{len(CASES)} bad inputs through {len(per)} entry points:\n\n{table}\n\n"


def test_errors_doc_is_current():
    assert DOC.exists(), f"{DOC} is missing; run: .venv/bin/python tests/reliability/test_bad_input.py"
    assert DOC.read_text() == render(), \
        f"{DOC} is stale; regenerate it with: .venv/bin/python tests/reliability/test_bad_input.py"


if __name__ == "__main__":
    os.chdir(ROOT)
    DOC.write_text(render())
    print(f"wrote {DOC} ({len(CASES)} cases)", file=sys.stderr)
    for entry, n in counts().items():
        print(f"  {entry:20s} {n:4d}", file=sys.stderr)
