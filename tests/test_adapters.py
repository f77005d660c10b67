"""Adapters: foreign models seen as (sde, score_fn), checked against the exact oracle.

The oracle gives exact eps, x0, v and denoiser predictions for a Gaussian mixture at any time, so
every adapter's score must equal the oracle's score to float64 round-off, and the diffusers
equivalence is exact up to the float32 coefficients diffusers computes.
"""

import math

import pytest
import torch

import sdegen
from sdegen.adapters import from_denoiser, from_discrete_eps, from_diffusers, from_v, from_x0

from schedules import cosine_betas, linear_betas

F64 = torch.float64


def test_adapter_errors():
    # DiscreteVPSDE's own errors: tests/sdes/test_discrete.py (the class lives in sdegen/sdes/discrete.py).
    with pytest.raises(ValueError, match="timesteps"):
        from_discrete_eps(lambda x, i: x, linear_betas(5), timesteps="floor")
    with pytest.raises(ValueError, match="prediction"):
        from_discrete_eps(lambda x, i: x, linear_betas(5), prediction="score")
    with pytest.raises(TypeError, match="eps_model"):
        from_discrete_eps(3, linear_betas(5))
    with pytest.raises(TypeError, match="AffineSDE"):
        from_x0(lambda x, t: x, sdegen.CustomSDE(lambda x, t: -x, lambda t: 1.0))


def _exact_eps_model(gm, sde, first_step, received):
    """The exact eps-model of a mixture, reading the (fractional) step value it receives."""
    n = sde.n_steps

    def eps_model(x, u, label=None):
        received.append((u.dtype, u.clone(), label))
        t = (u.to(F64) + 1 - first_step) * (sde.T / n)
        _, s = sde.marginal(t)
        return -s[:, None] * gm.score(x, t, sde)

    return eps_model


@pytest.mark.parametrize("first_step", [0, 1])
def test_from_discrete_eps_matches_oracle_score(first_step, generator):
    gm = sdegen.named_mixture("anisotropic")
    betas = cosine_betas(40)
    received = []
    sde, score_fn = from_discrete_eps(lambda x, u, **kw: eps(x, u, **kw), betas, first_step=first_step)
    eps = _exact_eps_model(gm, sde, first_step, received)
    x = torch.randn(64, 2, generator=generator, dtype=F64)
    t = torch.rand(64, generator=generator, dtype=F64) * 0.98 + 0.01
    out = score_fn(x, t, label="cat")
    torch.testing.assert_close(out, gm.score(x, t, sde), rtol=1e-10, atol=1e-10)
    dtype, u, label = received[-1]
    assert dtype == F64 and label == "cat"            # model_kwargs pass through untouched
    torch.testing.assert_close(u, t * 40 - 1 + first_step)
    # At a training time the model receives exactly the integer step.
    ti = torch.tensor([1 / 40, 0.5, 1.0], dtype=F64)
    torch.testing.assert_close(score_fn.model_steps(ti), torch.tensor([0.0, 19.0, 39.0], dtype=F64) + first_step)


def test_from_discrete_eps_round_mode(generator):
    gm = sdegen.named_mixture("gaussian")
    received = []
    sde, score_fn = from_discrete_eps(lambda x, u: eps(x, u), linear_betas(10), timesteps="round", first_step=0)
    eps = _exact_eps_model(gm, sde, 0, received)
    t = torch.tensor([0.001, 0.1, 0.149, 0.151, 1.0], dtype=F64)
    score_fn(torch.zeros(5, 2, dtype=F64), t)
    dtype, u, _ = received[-1]
    assert dtype == torch.long
    assert u.tolist() == [0, 0, 0, 1, 9]
    # On the training times the rounded model is the exact one.
    ti = torch.arange(1, 11, dtype=F64) / 10
    x = torch.randn(10, 2, generator=generator, dtype=F64)
    torch.testing.assert_close(score_fn(x, ti), gm.score(x, ti, sde), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("sde", [sdegen.VPSDE(), sdegen.SubVPSDE(), sdegen.VESDE(0.01, 20.0)],
                         ids=["vp", "subvp", "ve"])
def test_from_x0_and_from_v_match_oracle(sde, generator):
    gm = sdegen.named_mixture("8gaussians")
    x = torch.randn(128, 2, generator=generator, dtype=F64) * 2
    t = torch.rand(128, generator=generator, dtype=F64) * 0.9 + 0.05

    def x0_model(x, t, **kw):
        return sde.x0_from_score(x, t, gm.score(x, t, sde))

    def v_model(x, t, **kw):
        m, s = (v[:, None] for v in sde.marginal(t))
        x0, r = x0_model(x, t), (m.square() + s.square()).sqrt()
        # sdegen's one v convention: v = (m eps - s x0)/r, r = sqrt(m^2 + s^2), eps = (x - m x0)/s.
        return (m * (x - m * x0) / s - s * x0) / r

    for adapter, model in ((from_x0, x0_model), (from_v, v_model)):
        sde_out, score_fn = adapter(model, sde)
        assert sde_out is sde
        torch.testing.assert_close(score_fn(x, t), gm.score(x, t, sde), rtol=1e-9, atol=1e-9)


def test_from_denoiser_matches_oracle(generator):
    # Data N(mu, tau^2 I): the exact denoiser is E[x0 | x0 + sigma n = x] = (tau^2 x + sigma^2 mu)/(tau^2 + sigma^2).
    gm = sdegen.named_mixture("gaussian")
    mu, tau2 = 0.5, 0.25
    seen = []

    def denoiser(x, sigma, cond=None):
        seen.append((sigma.shape, cond))
        s2 = sigma[:, None].square()
        return (tau2 * x + s2 * mu) / (tau2 + s2)

    sde, score_fn = from_denoiser(denoiser, 0.002, 80.0)
    assert isinstance(sde, sdegen.VESDE) and sde.sigma_min == 0.002 and sde.sigma_max == 80.0
    x = torch.randn(32, 2, generator=generator, dtype=F64) * 3
    t = torch.rand(32, generator=generator, dtype=F64) * 0.9 + 0.05
    torch.testing.assert_close(score_fn(x, t, cond=3), gm.score(x, t, sde), rtol=1e-10, atol=1e-12)
    assert seen[-1] == (torch.Size([32]), 3)
    # The documented t_min: the denoiser sees sigma_min there.
    t_min = sde.t_from_sigma(torch.tensor(0.002, dtype=F64))
    torch.testing.assert_close(sde.marginal(t_min.reshape(1))[1], torch.tensor([0.002], dtype=F64))


def test_adapter_sampling_matches_oracle_moments():
    """An exact eps-model through from_discrete_eps samples the data distribution (ancestral, DDPM grid)."""
    gm = sdegen.named_mixture("gaussian")            # N(0.5, 0.25 I) in 2-D
    received = []
    sde, score_fn = from_discrete_eps(lambda x, u: eps(x, u), linear_betas(100, 1e-4, 0.1))
    eps = _exact_eps_model(gm, sde, 1, received)
    n = 2000
    res = sdegen.sample(sde, score_fn, (n, 2), method="ancestral", steps=99, eps=1 / 100,
                        generator=torch.Generator().manual_seed(5), dtype=F64)
    x = res.samples
    # Mean: SE = 0.5/sqrt(n) = 0.011 per coordinate; 5 SE plus the O(1/N) discretization bias.
    assert (x.mean(0) - 0.5).abs().max() < 5 * 0.5 / math.sqrt(n) + 0.01
    # Variance: SE of the sample variance = sigma^2 sqrt(2/n) = 0.0079.
    assert (x.var(0) - 0.25).abs().max() < 5 * 0.25 * math.sqrt(2 / n) + 0.01
    assert res.nfe == 100


# ---------------------------------------------------------------------- diffusers
def _tiny_unet(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)   # diffusers initialises weights from the global generator; this is a test
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    return unet.eval()


def _diffusers_loop(unet, scheduler, x_T, generator):
    x = x_T
    scheduler.set_timesteps(scheduler.config.num_train_timesteps)
    with torch.no_grad():
        for k in scheduler.timesteps:
            eps_hat = unet(x, k).sample
            x = scheduler.step(eps_hat, k, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusers_ddpm_loop_equivalence(prediction_type):
    """sdegen's ancestral sampler on the adapter reproduces diffusers' DDPM loop sample for sample.

    Aligned: (1) the grid: steps=N-1 from T to eps=T/N visits the training steps t_N..t_1 and the
    final Tweedie step equals DDPM's noiseless last step; (2) the variance: ancestral uses
    beta-tilde = diffusers' "fixed_small"; (3) clipping off; (4) the noise: both draw x_T and then
    one N(0, I) per noisy step from the same generator in the same order; (5) float64 everywhere
    (diffusers keeps alphas_cumprod in float32, the adapter reads those values, so only the
    rounding of the coefficient arithmetic differs).
    """
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet().double()
    n = 12
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=n, beta_schedule="linear", beta_start=1e-3,
                                        beta_end=0.3, clip_sample=False, variance_type="fixed_small",
                                        prediction_type=prediction_type)
    shape = (3, 1, 8, 8)
    g_ref = torch.Generator().manual_seed(7)
    x_T = torch.randn(shape, generator=g_ref, dtype=F64)
    ref = _diffusers_loop(unet, scheduler, x_T, g_ref)

    # Both time modes give the model the integer steps on this grid; one per prediction type keeps it quick.
    for timesteps in (("continuous",) if prediction_type == "epsilon" else ("round",)):
        sde, score_fn = from_diffusers(unet, scheduler, timesteps=timesteps)
        res = sdegen.sample(sde, score_fn, shape, method="ancestral", steps=n - 1, eps=1.0 / n,
                            generator=torch.Generator().manual_seed(7), dtype=F64)
        assert res.nfe == n
        torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert float(ref.abs().max()) > 0.1     # a non-trivial output


def test_diffusers_adapter_runs_other_samplers():
    diffusers = pytest.importorskip("diffusers")
    unet = _tiny_unet(1)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=50)
    sde, score_fn = from_diffusers(unet, scheduler)
    res = sdegen.sample(sde, score_fn, (2, 1, 8, 8), method="ode_heun", steps=4,
                        generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (2, 1, 8, 8) and res.samples.dtype == torch.float32
    assert bool(torch.isfinite(res.samples).all()) and res.nfe == 8
    with pytest.raises(TypeError, match="scheduler"):
        from_diffusers(unet, object())


@pytest.mark.cuda
def test_adapters_on_cuda(generator):
    gm = sdegen.named_mixture("anisotropic")
    received = []
    sde, score_fn = from_discrete_eps(lambda x, u: eps(x, u), cosine_betas(40))
    eps = _exact_eps_model(gm.to("cuda"), sde, 1, received)
    x = torch.randn(64, 2, generator=generator, dtype=F64)
    t = torch.rand(64, generator=generator, dtype=F64) * 0.98 + 0.01
    out = score_fn(x.cuda(), t.cuda())
    assert out.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), gm.score(x, t, sde), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("prediction", ["epsilon", "sample", "v_prediction"])
def test_discrete_step_score_fast_path_equals_the_table(prediction):
    """The per-time coefficient path (one time for the batch, as the samplers pass it) equals the tensor path
    through the prediction table, for the model's steps and the score; out-of-range times still raise."""
    received = []

    def model(x, u):
        received.append(u)
        return torch.sin(3 * x) + 0.01 * u[:, None]

    sde, score_fn = from_discrete_eps(model, cosine_betas(40), first_step=0, prediction=prediction)
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    for tv in (1.0, 0.4125, 0.0251):
        t_view = torch.full((1,), tv, dtype=F64).expand(5)          # stride 0: the fast path
        t_plain = torch.full((5,), tv, dtype=F64) + torch.zeros(5, dtype=F64)
        fast, slow = score_fn(x, t_view), score_fn(x, t_plain)
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(received[-2], received[-1], rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="t must lie"):
        score_fn(x, torch.full((1,), 1.5, dtype=F64).expand(5))


def test_discrete_step_score_reused_steps_survive_an_in_place_edit():
    """The fast path reuses the steps tensor per time; a model that edits it in place gets a fresh one next call."""
    seen = []

    def model(x, u):
        seen.append(u.clone())
        u.add_(100.0)                       # a hostile model
        return torch.zeros_like(x)

    sde, score_fn = from_discrete_eps(model, cosine_betas(40), first_step=0)
    x = torch.zeros(3, 2, dtype=F64)
    t = torch.full((1,), 0.5, dtype=F64).expand(3)
    score_fn(x, t)
    score_fn(x, t)
    torch.testing.assert_close(seen[0], seen[1])
    torch.testing.assert_close(seen[0], torch.full((3,), 19.0, dtype=F64))     # u = tN/T - 1 = 19
