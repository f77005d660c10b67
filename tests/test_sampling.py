"""Contract of ``sdegen.sample`` over every method; bad input; the reference implementation's faults."""

from __future__ import annotations

import math

import pytest
import torch

import sdegen
from sdegen.sampling import METHODS, sample
from sdegen.solvers.base import NonFiniteError


GM = sdegen.named_mixture("gaussian")
ALL_METHODS = list(METHODS)
FIXED = {"euler_maruyama": 1, "reverse_diffusion": 1, "ancestral": 1, "pc": 2, "ode_euler": 1, "ode_heun": 2}


class Counter:
    """Independent count of score calls (the test does not trust the library's counter)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        return self.fn(x, t)


def _steps(method):
    return 25 if METHODS[method].fixed_grid else None


# Loose tolerances where a method's defaults are tight: the contract is about plumbing, not accuracy.
CONTRACT_OPTS = {"adaptive_sde": {"rtol": 0.1, "atol": 0.1}, "rk45": {"rtol": 1e-3, "atol": 1e-3}}


def _run(method, sde=None, *, dtype=torch.float64, seed=0, n=32, **kw):
    sde = sde or sdegen.VPSDE()
    kw = {**CONTRACT_OPTS.get(method, {}), **kw}
    score = Counter(GM.score_fn(sde))
    res = sample(sde, score, (n, 2), method=method, steps=kw.pop("steps", _steps(method)), dtype=dtype,
                 generator=torch.Generator().manual_seed(seed), **kw)
    return res, score


@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_contract_shape_dtype_nfe_reproducible(method, dtype):
    res, score = _run(method, dtype=dtype)
    assert res.samples.shape == (32, 2) and res.samples.dtype == dtype and res.samples.device.type == "cpu"
    assert torch.isfinite(res.samples).all()
    assert res.nfe == score.calls
    if method in FIXED:
        denoise = 1 if METHODS[method].reverse_sde and method != "ancestral" else 0
        # VP ancestral is the DDPM chain down to t = 0: nothing to denoise
        assert res.nfe == 25 * FIXED[method] + denoise
        assert res.times.shape[0] == 26 + denoise
    if METHODS[method].build is not None:
        # Every fixed-grid method: the counted NFE is the solver's declared formula (evals_per_step per step,
        # or its own nfe(steps) where the first or last steps differ), plus the final denoising call.
        assert res.nfe == res.stats["declared_nfe"] + int(res.stats["denoise"])
    again, _ = _run(method, dtype=dtype)
    assert torch.equal(res.samples, again.samples)
    other, _ = _run(method, dtype=dtype, seed=1)
    assert not torch.equal(res.samples, other.samples)


@pytest.mark.parametrize("method", ["ancestral", "pc", "euler_maruyama"])
@pytest.mark.parametrize("sde", [sdegen.SubVPSDE(), sdegen.VESDE(sigma_max=10.0)], ids=["subvp", "ve"])
def test_other_sdes_run(method, sde):
    res, score = _run(method, sde)
    assert torch.isfinite(res.samples).all() and res.nfe == score.calls


def test_subvp_with_langevin_corrector():
    """Fault 1 of the reference: sub-VP + Langevin corrector crashed (no discrete alphas)."""
    res, score = _run("pc", sdegen.SubVPSDE(), predictor="euler_maruyama", corrector="langevin", steps=10)
    assert torch.isfinite(res.samples).all()
    assert res.nfe == score.calls == 10 * 2 + 1


def test_em_on_probability_flow():
    """Fault 2: EM on the probability-flow ODE raised. Here the ODE's Euler step is a predictor of its
    own (and equals ``ode_euler``); asking EM for ``probability_flow`` is a clear option error."""
    a, _ = _run("pc", predictor="ode_euler", corrector=None, denoise=False)
    b, _ = _run("ode_euler")
    assert torch.equal(a.samples, b.samples)
    with pytest.raises(TypeError, match="probability_flow.*valid options: denoise"):
        _run("euler_maruyama", probability_flow=True)


@pytest.mark.parametrize("predictor", ["reverse_diffusion", "euler_maruyama", "ancestral"])
def test_pc_without_corrector_counts_only_predictor(predictor):
    """Fault 3: the reference reported N*(n_steps+1) evaluations even without a corrector."""
    res, score = _run("pc", predictor=predictor, corrector=None, steps=25)
    denoise = 0 if predictor == "ancestral" else 1
    assert res.nfe == score.calls == 25 + denoise
    plain, _ = _run(predictor, steps=25)
    assert torch.equal(res.samples, plain.samples)


class PerSampleSeeds:
    """A minimal per-sample noise source: sample b's draws depend only on its own seed."""

    def __init__(self, seeds):
        self.seeds = seeds

    def _draw(self, i, d, dtype):
        rows = [torch.randn(d, generator=torch.Generator().manual_seed(s * 100_003 + i), dtype=dtype)
                for s in self.seeds]
        return torch.stack(rows)

    def prior(self, shape, device, dtype):
        return self._draw(0, shape[1], dtype).to(device)

    def __call__(self, i):
        return self._draw(i + 1, 2, torch.float64)


@pytest.mark.parametrize("opts", [{"method": "pc", "corrector": "langevin", "snr": 0.1},
                                  {"method": "ancestral"}, {"method": "euler_maruyama"}])
def test_per_sample_noise_makes_samples_independent_of_batch(opts):
    """Fault 5: with per-sample noise, a sample (including its Langevin step) ignores its batch-mates."""
    sde = sdegen.VPSDE()
    out = []
    for seeds in ([11, 12, 13], [11, 12, 99]):
        res = sample(sde, GM.score_fn(sde), (3, 2), steps=25, dtype=torch.float64, seeds=PerSampleSeeds(seeds),
                     **opts)
        out.append(res.samples)
    assert torch.allclose(out[0][:2], out[1][:2], rtol=0, atol=1e-13)
    assert not torch.allclose(out[0][2], out[1][2])


def test_vp_ancestral_is_the_ddpm_chain():
    """VP ancestral with N steps equals DDPM.sample of vp.discretize(N) with the same generator."""
    vp = sdegen.VPSDE()
    N = 50
    ddpm = vp.discretize(N)

    def eps_model(x, i):
        return torch.tanh(x) * (i[:, None].to(x.dtype) / N) + 0.1

    for dtype, tol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        a = ddpm.sample(eps_model, (64, 2), generator=torch.Generator().manual_seed(4), dtype=dtype)
        res = sample(vp, ddpm.score_fn(eps_model), (64, 2), method="ancestral", steps=N, dtype=dtype,
                     generator=torch.Generator().manual_seed(4))
        assert res.nfe == N and float(res.times[-1]) == 0.0
        assert torch.allclose(res.samples, a, rtol=tol, atol=tol), (res.samples - a).abs().max()


@pytest.mark.parametrize("method", ["euler_maruyama", "reverse_diffusion", "pc", "ode_euler", "ode_heun"])
@pytest.mark.parametrize("grid", ["quadratic", "log_snr", "karras"])
def test_grid_option_sets_the_time_grid(method, grid):
    sde = sdegen.VPSDE()
    score = Counter(GM.score_fn(sde))
    res = sample(sde, score, (8, 2), method=method, steps=7, grid=grid, dtype=torch.float64,
                 generator=torch.Generator().manual_seed(0))
    want = sdegen.grids.get_grid(grid, sde, 7, 1e-3)
    n_grid = 8 if METHODS[method].reverse_sde else 7   # reverse-SDE methods add the denoising step at eps
    torch.testing.assert_close(res.times[:8], want, rtol=0, atol=0)
    assert len(res.times) == n_grid + 1 and res.nfe == score.calls == 7 * FIXED[method] + (n_grid - 7)


def test_user_grid_tensor_sets_the_steps():
    sde = sdegen.VPSDE()
    times = sdegen.grids.karras(sde, 6, 1e-3, rho=3.0)
    for method, nfe in (("ode_heun", 12), ("ode_euler", 6), ("heun_karras", 11), ("dpm_solver", 6)):
        score = Counter(GM.score_fn(sde))
        res = sample(sde, score, (4, 2), method=method, grid=times, dtype=torch.float64)
        # heun_karras' final Euler step (2N - 1 evaluations) must see the user grid's N, not steps' default.
        assert res.nfe == score.calls == nfe, method
        torch.testing.assert_close(res.times, times, rtol=0, atol=0)


def test_grid_option_errors():
    sde = sdegen.VPSDE()
    with pytest.raises(ValueError, match="unknown grid 'nope'; choose one of uniform, quadratic, log_snr, karras"):
        sample(sde, GM.score_fn(sde), (2, 2), method="ode_euler", steps=3, grid="nope")
    with pytest.raises(ValueError, match="DDPM chain on its own grid"):
        sample(sde, GM.score_fn(sde), (2, 2), method="pc", predictor="ancestral", steps=3, grid="quadratic")
    custom = sdegen.CustomSDE(lambda x, t: -x, lambda t: torch.ones_like(t))
    with pytest.raises(TypeError, match="'log_snr' grid needs an AffineSDE"):
        sample(custom, lambda x, t: -x, (2, 2), method="euler_maruyama", steps=3, grid="log_snr")
    res = sample(custom, lambda x, t: -x, (2, 2), method="euler_maruyama", steps=3, grid="quadratic")
    torch.testing.assert_close(res.times, sdegen.grids.quadratic(custom, 3, 1e-3), rtol=0, atol=0)


def test_trajectory_and_thinning():
    res, _ = _run("euler_maruyama", steps=10, return_trajectory=True)
    assert len(res.trajectory) == 10 + 1 + 1            # start, 10 steps, denoised
    assert res.trajectory[0][0] == pytest.approx(1.0) and res.trajectory[-1][0] == 0.0
    assert torch.equal(res.trajectory[-1][1], res.samples)
    res, _ = _run("ode_heun", steps=10, return_trajectory=4)
    assert [t for t, _ in res.trajectory] == pytest.approx([1.0, float(res.times[4]), float(res.times[8]),
                                                            float(res.times[10])])
    assert res.trajectory is not None and _run("ode_heun")[0].trajectory is None


def test_model_kwargs_reach_the_score():
    seen = []

    def score(x, t, label=None):
        seen.append(label)
        return -x

    sample(sdegen.VPSDE(), score, (4, 2), method="ode_euler", steps=3, model_kwargs={"label": 7})
    assert seen == [7, 7, 7]


def test_x_T_is_the_start():
    sde = sdegen.VPSDE()
    x_T = torch.randn(16, 2, dtype=torch.float64)
    a = sample(sde, GM.score_fn(sde), (16, 2), method="ode_euler", steps=4, x_T=x_T)
    b = sample(sde, GM.score_fn(sde), None, method="ode_euler", steps=4, x_T=x_T.clone())
    assert torch.equal(a.samples, b.samples) and a.samples.dtype == torch.float64


def test_progress_bar_runs(capsys):
    res, _ = _run("ode_euler", steps=3, progress=True)
    assert res.nfe == 3


# ------------------------------------------------------------------------------------------------- bad input
def _bad(**kw):
    args = {"method": "euler_maruyama", "steps": 3}
    args.update(kw)
    sde = args.pop("sde", sdegen.VPSDE())
    score = args.pop("score") if "score" in args else GM.score_fn(sde)
    shape = args.pop("shape", (4, 2))
    return sample(sde, score, shape, **args)


@pytest.mark.parametrize("kw,err,match", [
    ({"method": "magic"}, ValueError, "unknown method 'magic'; valid methods: euler_maruyama"),
    ({"method": "pc", "predictor": "rk4"}, ValueError, "unknown predictor 'rk4'; valid: 'euler_maruyama'"),
    ({"method": "pc", "corrector": "hmc"}, ValueError, "unknown corrector 'hmc'; valid: 'langevin'"),
    ({"method": "pc", "snr": -1.0}, ValueError, "snr must be a finite positive"),
    ({"method": "pc", "corrector_steps": 0}, ValueError, "corrector_steps must be an int >= 1, got 0"),
    ({"method": "ode_euler", "rtol": 1e-3}, TypeError, "unknown option.*rtol.*valid options: denoise"),
    ({"steps": 0}, ValueError, "steps must be an int >= 1, got 0"),
    ({"steps": 2.5}, ValueError, "steps must be an int >= 1, got 2.5"),
    ({"steps": True}, ValueError, "steps must be an int >= 1"),
    ({"method": "rk45", "steps": 10}, ValueError, "adaptive and takes no steps"),
    ({"eps": 0.0}, ValueError, r"eps must lie in \(0, T=1.0\), got 0.0"),
    ({"eps": 1.0}, ValueError, r"eps must lie in \(0, T=1.0\)"),
    ({"eps": "a"}, TypeError, "eps must be a float"),
    ({"score": lambda x, t: x[:, :1]}, ValueError, r"shaped like x \(4, 2\), got \(4, 1\)"),
    ({"dtype": torch.float16}, TypeError, "dtype must be torch.float32 or torch.float64, got torch.float16"),
    ({"dtype": torch.bfloat16}, TypeError, "dtype must be torch.float32 or torch.float64"),
    ({"x_T": torch.zeros(5, 2)}, ValueError, r"x_T must have shape \(4, 2\)"),
    ({"x_T": torch.zeros(4, 2), "dtype": torch.float64}, TypeError, "x_T has dtype torch.float32"),
    ({"x_T": torch.zeros(4, 2, dtype=torch.float16)}, TypeError, "dtype must be torch.float32"),
    ({"return_trajectory": 0}, ValueError, "return_trajectory must be a bool or an int >= 1"),
    ({"denoise": "yes"}, TypeError, "denoise must be a bool"),
    ({"shape": None}, ValueError, "shape must be given"),
    ({"sde": "vp", "score": lambda x, t: -x}, TypeError, "sde must be an sdegen.SDE"),
    ({"seeds": object()}, TypeError, "seeds must be an int offset"),
])
def test_bad_input(kw, err, match):
    with pytest.raises(err, match=match):
        _bad(**kw)


def test_denoise_needs_a_kernel():
    sde = sdegen.CustomSDE(drift=lambda x, t: -x, diffusion=lambda t: 1.0)
    res = sample(sde, lambda x, t: -x, (4, 2), method="euler_maruyama", steps=3)
    assert res.nfe == 3 and res.stats["denoise"] is False          # default: skipped where impossible
    with pytest.raises(TypeError, match="denoise=True is impossible here: CustomSDE is not an AffineSDE"):
        sample(sde, lambda x, t: -x, (4, 2), method="euler_maruyama", steps=3, denoise=True)
    with pytest.raises(TypeError, match="grid ends at t=0"):
        _bad(method="ancestral", denoise=True, steps=30)
    with pytest.raises(ValueError, match=r"needs steps > beta_max \* T = 20; got steps=3"):
        _bad(method="ancestral")
    with pytest.raises(TypeError, match="needs an AffineSDE"):
        sample(sde, lambda x, t: -x, (4, 2), method="ancestral", steps=3)


@pytest.mark.parametrize("method", ["euler_maruyama", "ode_heun", "ancestral", "pc"])
def test_nan_score_names_step_and_time(method):
    def score(x, t):
        return torch.where(t[:, None] < 0.55, torch.full_like(x, math.nan), -x)

    with pytest.raises(NonFiniteError) as info:
        _bad(method=method, score=score, steps=10, sde=sdegen.VESDE())
    # grid t_k = 1 - 0.0999 k: step k = 5 is the first to evaluate at t < 0.55, except Heun, whose
    # step 4 already evaluates at its end point t_5.
    step = 4 if method == "ode_heun" else 5
    assert info.value.step == step and info.value.t == pytest.approx(1 - step * 0.0999)
    assert torch.isfinite(info.value.x).all()


# ------------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("method", ALL_METHODS)
@pytest.mark.parametrize("sde", [sdegen.VESDE(), sdegen.VPSDE(), sdegen.SubVPSDE()], ids=["ve", "vp", "subvp"])
def test_cuda_every_method(method, sde):
    """Fault 4: VE sampling failed on CUDA (tables left on the CPU). Every method stays on the device."""
    if method == "torchsde":
        pytest.importorskip("torchsde")
    gm = sdegen.named_mixture("gaussian", device="cuda")
    score = Counter(gm.score_fn(sde))
    res = sample(sde, score, (64, 2), method=method, steps=_steps(method), device="cuda",
                 generator=torch.Generator(device="cuda").manual_seed(0))
    assert res.samples.device.type == "cuda" and res.samples.dtype == torch.float32
    assert torch.isfinite(res.samples).all() and res.nfe == score.calls
    again = sample(sde, gm.score_fn(sde), (64, 2), method=method, steps=_steps(method), device="cuda",
                   generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(res.samples, again.samples)


@pytest.mark.cuda
def test_cuda_matches_cpu_for_deterministic_flow():
    sde = sdegen.VESDE()
    x_T = sde.prior_sample((64, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cpu = sample(sde, GM.score_fn(sde), None, method="ode_heun", steps=50, x_T=x_T).samples
    gm = sdegen.named_mixture("gaussian", device="cuda")
    gpu = sample(sde, gm.score_fn(sde), None, method="ode_heun", steps=50, x_T=x_T.cuda()).samples
    assert torch.allclose(gpu.cpu(), cpu, atol=1e-8)
