"""diffusers parity by the natural call, and sdegen's methods as a diffusers scheduler.

Each configuration runs the scheduler's own loop (``x = randn(shape, generator=g)``, then
``x = scheduler.step(unet(x, k).sample, k, x, generator=g).prev_sample``) and
``sdegen.sample(*from_diffusers(unet, scheduler), shape, method="ancestral", generator=g)`` with no
``steps``/``eps`` from an equal generator, in float64. They must agree to 1e-5 (``assert_close``
with rtol = atol = 1e-5): diffusers keeps ``alphas_cumprod`` in float32 and computes its coefficients
from those float32 values while sdegen reads the same values into float64, so the two differ only by
the rounding of the coefficient arithmetic (measured 4e-8 to 1.6e-5; the largest comes from
diffusers' ``1 - abar_t / abar_prev`` in float32 for small beta; with its table in float64 the DDPM
loops agree to 3e-14, asserted below). A wrong step (variance, grid, eta, clipping) moves samples by
1e-2 or more.
"""

import pytest
import torch

import sdegen
from sdegen.adapters import from_diffusers

diffusers = pytest.importorskip("diffusers")
F64 = torch.float64
N_TRAIN = 20
SHAPE = (2, 1, 8, 8)


def _unet(out_channels=1, seed=0):
    torch.manual_seed(seed)   # diffusers initialises weights from the global generator; this is a test
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=out_channels, layers_per_block=1, block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).double().eval()


UNET = None


def unet():
    global UNET
    if UNET is None:
        UNET = _unet()
    return UNET


def _loop(model, scheduler, seed, **step_kwargs):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=F64)
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(model(x, k).sample, k, x, generator=g, **step_kwargs).prev_sample
    return x


def _natural(model, scheduler, seed, **options):
    sde, score_fn = from_diffusers(model, scheduler)
    res = sdegen.sample(sde, score_fn, SHAPE, method="ancestral", generator=torch.Generator().manual_seed(seed),
                        dtype=F64, **options)
    return res


def _ddpm(**config):
    base = dict(num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2, clip_sample=False)
    return diffusers.DDPMScheduler(**{**base, **config})


def _ddim(n_steps, **config):
    base = dict(num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2, clip_sample=False)
    s = diffusers.DDIMScheduler(**{**base, **config})
    s.set_timesteps(n_steps)
    return s


DDPM_CASES = {
    "fixed_small": dict(variance_type="fixed_small"),
    "fixed_small_log": dict(variance_type="fixed_small_log"),
    "fixed_large": dict(variance_type="fixed_large"),
    "v_prediction": dict(prediction_type="v_prediction"),
    "sample": dict(prediction_type="sample", clip_sample=True, clip_sample_range=2.0),
    "clip_sample_default": dict(clip_sample=True),
    "thresholding": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
}


@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_scheduler_by_the_natural_call(case):
    scheduler = _ddpm(**DDPM_CASES[case])
    ref = _loop(unet(), scheduler, 3)
    res = _natural(unet(), scheduler, 3)
    assert res.nfe == N_TRAIN and res.stats["denoise"] is False
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert float(ref.abs().max()) > 0.1
    # diffusers' 1 - abar_t / abar_prev in float32 loses up to ~1e-5 of a small beta; with its table in
    # float64 the two loops agree to round-off: the step is the same, not merely close.
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    torch.testing.assert_close(res.samples, _loop(unet(), scheduler, 3), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spacing,offset,variance", [("leading", 1, "fixed_small"), ("trailing", 0, "fixed_large"),
                                                     ("linspace", 0, "fixed_small")])
def test_strided_ddpm_scheduler(spacing, offset, variance):
    scheduler = _ddpm(timestep_spacing=spacing, steps_offset=offset, variance_type=variance)
    scheduler.set_timesteps(7)
    ref = _loop(unet(), scheduler, 4)
    res = _natural(unet(), scheduler, 4)
    assert res.nfe == 7
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)


DDIM_CASES = {
    "leading_offset1_eta0": (dict(timestep_spacing="leading", steps_offset=1), {}),
    "trailing_eta0": (dict(timestep_spacing="trailing"), {}),
    "linspace_eta0": (dict(timestep_spacing="linspace"), {}),
    "leading_eta05": (dict(), dict(eta=0.5)),
    "trailing_eta1": (dict(timestep_spacing="trailing"), dict(eta=1.0)),
    "no_alpha_to_one": (dict(set_alpha_to_one=False), dict(eta=0.3)),
    "v_prediction": (dict(prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    "clip_clipped_output": (dict(clip_sample=True), dict(use_clipped_model_output=True)),
    "clip_default_output": (dict(clip_sample=True), dict(use_clipped_model_output=False)),
    "threshold_default_output": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.2),
                                 dict(eta=0.4)),
}


@pytest.mark.parametrize("case", list(DDIM_CASES))
def test_ddim_scheduler_by_the_natural_call(case):
    config, step_kwargs = DDIM_CASES[case]
    scheduler = _ddim(6, **config)
    ref = _loop(unet(), scheduler, 5, **step_kwargs)
    eta = step_kwargs.get("eta")
    sde, score_fn = from_diffusers(unet(), scheduler,
                                   use_clipped_model_output=step_kwargs.get("use_clipped_model_output", False))
    res = sdegen.sample(sde, score_fn, SHAPE, method="ancestral", generator=torch.Generator().manual_seed(5),
                        dtype=F64, **({} if eta is None else {"eta": eta}))
    assert res.nfe == 6
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert float(ref.abs().max()) > 0.1


def _euler_loop(model, scheduler, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g, dtype=F64) * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            out = model(scheduler.scale_model_input(x, k), k).sample
            x = scheduler.step(out, k, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("cls,config", [
    ("EulerDiscreteScheduler", dict()),
    ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", steps_offset=1)),
    ("EulerAncestralDiscreteScheduler", dict()),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction")),
])
def test_euler_schedulers_by_the_natural_call(cls, config):
    """Euler in (x/m, sigma) is DDIM (eta 0) and Euler ancestral is the posterior step (eta 1) on the listed steps;
    the scheduler's loop works on x/m, whose final value (sigma = 0) is the sample itself."""
    scheduler = getattr(diffusers, cls)(num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2,
                                        timestep_spacing="leading", **config)
    scheduler.set_timesteps(6)
    ref = _euler_loop(unet(), scheduler, 6)
    res = _natural(unet(), scheduler, 6)
    assert res.nfe == 6
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert float(ref.abs().max()) > 0.1


@pytest.mark.parametrize("config,named", [
    (dict(timestep_spacing="linspace"), "timestep_spacing='linspace'"),
    (dict(timestep_spacing="leading", use_karras_sigmas=True), "use_karras_sigmas=True"),
    (dict(timestep_spacing="leading", interpolation_type="log_linear"), "interpolation_type='log_linear'"),
])
def test_euler_settings_not_reproduced_are_refused(config, named):
    scheduler = diffusers.EulerDiscreteScheduler(num_train_timesteps=N_TRAIN, **config)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match=named):
        from_diffusers(unet(), scheduler)


LEARNED_UNET = None


@pytest.mark.parametrize("variance,steps", [("learned_range", None), ("learned_range", 7), ("learned", None)])
def test_learned_variance_by_the_natural_call(variance, steps):
    """A UNet with 2C output channels: the first C are eps, the rest the variance (diffusers' "learned": the
    variance itself, here made positive by construction; "learned_range": the log-variance interpolation)."""
    global LEARNED_UNET
    if LEARNED_UNET is None:
        LEARNED_UNET = _unet(out_channels=2, seed=1)
    base = LEARNED_UNET

    class Positive(torch.nn.Module):       # "learned" reads the channels as a variance: keep them positive
        def forward(self, x, k, return_dict=True):
            out = base(x, k).sample
            out = torch.cat([out[:, :1], 0.05 * torch.sigmoid(out[:, 1:])], 1)
            return (out,) if not return_dict else diffusers.models.unets.unet_2d.UNet2DOutput(sample=out)

    model = Positive() if variance == "learned" else base
    scheduler = _ddpm(variance_type=variance)
    if steps:
        scheduler.set_timesteps(steps)
    ref = _loop(model, scheduler, 11)
    res = _natural(model, scheduler, 11)
    assert res.nfe == (steps or N_TRAIN)
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    # the variance channels matter: fixed_small on the same model gives a different sample
    fixed = _ddpm(variance_type="fixed_small")
    if steps:
        fixed.set_timesteps(steps)
    assert float((_natural(model, fixed, 11).samples - ref).abs().max()) > 1e-3


def _zero_snr(cls, n_steps=None, **config):
    base = dict(num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2, clip_sample=False,
                rescale_betas_zero_snr=True, timestep_spacing="trailing")
    s = getattr(diffusers, cls)(**{**base, **config})
    if n_steps:
        s.set_timesteps(n_steps)
    return s


@pytest.mark.parametrize("cls,n_steps,config,step_kwargs", [
    ("DDPMScheduler", None, dict(prediction_type="v_prediction"), {}),
    ("DDPMScheduler", 7, dict(prediction_type="v_prediction", clip_sample=True), {}),
    ("DDIMScheduler", 6, dict(prediction_type="v_prediction"), {}),
    ("DDIMScheduler", 6, dict(prediction_type="sample", clip_sample=True), dict(eta=0.5)),
])
def test_zero_terminal_snr_by_the_natural_call(cls, n_steps, config, step_kwargs):
    """abar_N = 0: the prior is exactly N(0, I) and the first step uses the model's x0 (a score cannot carry it)."""
    scheduler = _zero_snr(cls, n_steps, **config)
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    ref = _loop(unet(), scheduler, 12, **step_kwargs)
    sde, score_fn = from_diffusers(unet(), scheduler)
    assert float(sde.alpha_bar[-1]) == 0.0 and float(sde.marginal(torch.ones(1, dtype=F64))[1]) == 1.0
    res = sdegen.sample(sde, score_fn, SHAPE, method="ancestral", generator=torch.Generator().manual_seed(12),
                        dtype=F64, **step_kwargs)
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert bool(torch.isfinite(ref).all()) and float(ref.abs().max()) > 0.1
    with pytest.raises(ValueError, match="zero terminal SNR"):      # a plain score cannot run that plan
        sdegen.sample(sde, lambda x, t: -x, SHAPE, method="ancestral", dtype=F64)


def test_explicit_steps_leave_the_plan():
    """With steps= the method runs on its own uniform grid (the plan is the default, not a constraint)."""
    scheduler = _ddpm()
    sde, score_fn = from_diffusers(unet(), scheduler)
    res = sdegen.sample(sde, score_fn, SHAPE, method="ancestral", steps=5, generator=torch.Generator().manual_seed(0),
                        dtype=F64)
    assert res.nfe == 6 and res.stats["denoise"] is True       # 5 steps to eps, then the Tweedie step
    with pytest.raises(ValueError, match="eta"):
        sdegen.sample(sde, score_fn, SHAPE, method="ancestral", steps=5, eta=0.0, dtype=F64)


@pytest.mark.parametrize("config,named", [
    (dict(variance_type="fixed_large_log"), "variance_type='fixed_large_log'"),
    (dict(rescale_betas_zero_snr=True), "rescale_betas_zero_snr=True with prediction_type='epsilon'"),
])
def test_unsupported_values_are_refused_by_name(config, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(")):
        from_diffusers(unet(), _ddpm(**config))


def test_other_scheduler_fields_are_refused_by_name_unless_ignored():
    scheduler = diffusers.UniPCMultistepScheduler(num_train_timesteps=N_TRAIN)
    with pytest.raises(ValueError) as err:
        from_diffusers(unet(), scheduler)
    for field in ("solver_order", "predict_x0", "solver_type", "use_karras_sigmas", "timestep_spacing"):
        assert field in str(err.value)
    fields = {k for k in scheduler.config if not k.startswith("_")}
    sde, score_fn = from_diffusers(unet(), scheduler, ignore=fields)
    torch.testing.assert_close(sde.alphas_cumprod, scheduler.alphas_cumprod.double())
    with pytest.raises(TypeError, match="ignore"):
        from_diffusers(unet(), scheduler, ignore="solver_order")


def test_ddim_needs_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        from_diffusers(unet(), diffusers.DDIMScheduler(num_train_timesteps=N_TRAIN))


# ---------------------------------------------------------------------- sdegen methods as a diffusers scheduler
BRIDGE_METHODS = {
    "dpm_solver": {},
    "heun_karras": {},
    "pc": {"corrector_steps": 1},
    "euler_maruyama": {},
    "ancestral": {},
}


@pytest.mark.parametrize("method", list(BRIDGE_METHODS))
def test_pipeline_with_sdegen_scheduler_equals_sample(method):
    """A DDPMPipeline using SdegenScheduler gives sdegen.sample's images: same model, noise and generator."""
    from sdegen.diffusers_scheduler import SdegenScheduler

    options = BRIDGE_METHODS[method]
    scheduler = SdegenScheduler(num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2, method=method,
                                method_options=options)
    pipe = diffusers.DDPMPipeline(unet=unet(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=SHAPE[0], generator=torch.Generator().manual_seed(9), num_inference_steps=4,
                  output_type="np").images

    sde, score_fn = from_diffusers(unet(), _ddpm())      # the same schedule, no clipping
    res = sdegen.sample(sde, score_fn, SHAPE, method=method, steps=4, generator=torch.Generator().manual_seed(9),
                        dtype=F64, **options)
    expected = (res.samples / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert len(scheduler.timesteps) == res.nfe
    assert abs(images - expected).max() < 1e-12     # the same computation, not an approximation
    assert images.std() > 1e-3


def test_sdegen_scheduler_config_round_trip(tmp_path):
    from sdegen.diffusers_scheduler import SdegenScheduler

    s = SdegenScheduler(num_train_timesteps=N_TRAIN, beta_schedule="squaredcos_cap_v2", method="dpm_solver",
                        method_options={"order": 2}, prediction_type="v_prediction")
    s.save_config(tmp_path)
    loaded = SdegenScheduler.from_pretrained(tmp_path)
    def public(config):       # "_"-keys are diffusers' bookkeeping (class name, version, defaults used)
        return {k: v for k, v in dict(config).items() if not k.startswith("_")}

    assert public(loaded.config) == public(s.config)
    assert public(SdegenScheduler.from_config(s.config).config) == public(s.config)
    torch.testing.assert_close(loaded.alphas_cumprod, s.alphas_cumprod)
    # From another scheduler's config: its schedule carries over, the method is chosen.
    ddpm = _ddpm(beta_schedule="scaled_linear")
    s2 = SdegenScheduler.from_config(ddpm.config, method="heun_karras")
    torch.testing.assert_close(s2.alphas_cumprod, ddpm.alphas_cumprod)
    assert s2.order == 1 and s2.init_noise_sigma == 1.0
    x = torch.randn(2, 3)
    assert s2.scale_model_input(x, 0) is x
    with pytest.raises(ValueError, match="fixed-grid"):
        SdegenScheduler(method="rk45")
    with pytest.raises(RuntimeError, match="set_timesteps"):
        SdegenScheduler().step(x, 0, x)


@pytest.mark.parametrize("config", [dict(solver_type="midpoint"), dict(solver_type="heun"),
                                    dict(prediction_type="v_prediction", timestep_spacing="trailing"),
                                    dict(solver_order=1, lower_order_final=False)])
def test_dpm_solver_multistep_by_the_natural_call(config):
    """DPM-Solver++ 2M (midpoint and heun) on the scheduler's steps, then its first-order step to sigma = 0:
    sample(method="dpm_solver") without steps= reads the grid and settings from the adapter's plan."""
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, beta_start=1e-3, beta_end=0.2,
                                                      **config)
    scheduler.set_timesteps(6)
    ref = _euler_loop(unet(), scheduler, 8)
    sde, score_fn = from_diffusers(unet(), scheduler)
    res = sdegen.sample(sde, score_fn, SHAPE, method="dpm_solver", generator=torch.Generator().manual_seed(8),
                        dtype=F64)
    assert res.nfe == 6
    torch.testing.assert_close(res.samples, ref, rtol=1e-5, atol=1e-5)
    assert float(ref.abs().max()) > 0.1


@pytest.mark.parametrize("config,named", [(dict(algorithm_type="sde-dpmsolver++"), "algorithm_type"),
                                          (dict(solver_order=3), "solver_order=3"),
                                          (dict(use_karras_sigmas=True), "use_karras_sigmas=True"),
                                          (dict(timestep_spacing="leading"), "timestep_spacing='leading'")])
def test_dpm_solver_settings_not_reproduced_are_refused(config, named):
    scheduler = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=N_TRAIN, **config)
    scheduler.set_timesteps(5)
    with pytest.raises(ValueError, match=named):
        from_diffusers(unet(), scheduler)


def _runnable_blocks():
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "backend.md").read_text()
    return re.findall(r"<!-- runnable: tests/test_diffusers_parity.py runs this block -->\n```python\n(.*?)```",
                      text, flags=re.S)


def test_backend_docs_diffusers_examples_run():
    """The two diffusers examples in docs/backend.md run as printed (their asserts are the parity claims)."""
    blocks = _runnable_blocks()
    assert len(blocks) == 2
    for code in blocks:
        exec(compile(code, "docs/backend.md", "exec"), {})


def test_adapter_with_its_plan_pickles():
    """The SDE (with its plan and in-step clipping) and the score pickle, and sample the same after the round trip."""
    import pickle

    scheduler = _ddim(5, clip_sample=True)
    sde, score_fn = from_diffusers(unet(), scheduler)
    sde2, score2 = pickle.loads(pickle.dumps((sde, score_fn)))
    a = sdegen.sample(sde, score_fn, SHAPE, method="ancestral", generator=torch.Generator().manual_seed(0), dtype=F64)
    b = sdegen.sample(sde2, score2, SHAPE, method="ancestral", generator=torch.Generator().manual_seed(0), dtype=F64)
    assert torch.equal(a.samples, b.samples)


def test_variance_option_overrides_the_plan():
    """variance="beta" on a fixed_small adapter equals the fixed_large scheduler's loop (and the reverse)."""
    ref_large = _loop(unet(), _ddpm(variance_type="fixed_large"), 13)
    res = _natural(unet(), _ddpm(variance_type="fixed_small"), 13, variance="beta")
    torch.testing.assert_close(res.samples, ref_large, rtol=1e-5, atol=1e-5)
    ref_small = _loop(unet(), _ddpm(variance_type="fixed_small"), 13)
    assert float((ref_small - ref_large).abs().max()) > 1e-2
    with pytest.raises(ValueError, match="variance"):
        _natural(unet(), _ddpm(), 13, variance="learned")
    with pytest.raises(ValueError, match="variance"):
        sdegen.sample(sdegen.VPSDE(), lambda x, t: -x, (2, 2), method="ancestral", steps=10, variance="beta")
