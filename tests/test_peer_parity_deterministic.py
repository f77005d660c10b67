"""Same model, same grid, same x_T: sdegen's deterministic multistep samplers equal diffusers' schedulers.

The scheduler's discrete schedule becomes a ``DiscreteVPSDE`` (``from_discrete_eps`` with its betas,
``first_step=0``, ``timesteps="round"``): its timestep k sits at t = (k + 1)/1000, where the SDE's
marginal is exactly the scheduler's alphas_cumprod[k], and the model receives the integer k.
diffusers stores its noise levels in float32; the tests overwrite them with the float64 values of
the same schedule (``scheduler.sigmas`` / ``alphas_cumprod``) so that the comparison is of the
algorithms, to float64 round-off (tolerance 1e-10 on states of size ~1), not of float32 rounding.
"""

from __future__ import annotations

import pytest
import torch

import sdegen
from sdegen.adapters import from_discrete_eps

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
N_TRAIN = 1000
TOL = 1e-10


def eps_model(x, k):
    """A nonlinear, time-dependent stand-in for a UNet (diffusers schedulers accept any output)."""
    u = (k.to(x.dtype) / N_TRAIN).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.4 * x * (1 + u) + 0.2 * torch.sin(3 * x) - 0.1 * u


def _setup(sched, n):
    sched.set_timesteps(n)
    sde, score = from_discrete_eps(eps_model, sched.betas.to(F64), first_step=0, timesteps="round")
    x_T = torch.randn(6, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    return sde, score, x_T


def _times(steps) -> torch.Tensor:
    return (torch.as_tensor(steps, dtype=F64) + 1) / N_TRAIN


def _run_diffusers(sched, x):
    for t in sched.timesteps:
        out = eps_model(sched.scale_model_input(x, t), t.reshape(1).expand(x.shape[0]))
        x = sched.step(out, t, x).prev_sample
    return x


def _sigma_min_grid(sched, sde):
    """The scheduler's timesteps and final ``sigma_min`` level (timestep 0) as sdegen times; its sigmas in float64."""
    times = torch.cat([_times(sched.timesteps), _times([0])])
    sched.sigmas = sde.sigma(times).to(F64)
    return times


@pytest.mark.parametrize("order,predict_x0,variant", [(1, True, "bh2"), (2, True, "bh2"), (3, True, "bh2"),
                                                      (2, False, "bh1"), (3, False, "bh2"), (2, True, "bh1")])
def test_unipc_equals_diffusers(order, predict_x0, variant):
    sched = diffusers.UniPCMultistepScheduler(solver_order=order, predict_x0=predict_x0, solver_type=variant,
                                              final_sigmas_type="sigma_min")
    sde, score, x_T = _setup(sched, 10)
    times = _sigma_min_grid(sched, sde)
    want = _run_diffusers(sched, x_T.clone())
    res = sdegen.sample(sde, score, None, method="unipc", x_T=x_T, grid=times, order=order,
                        prediction="data" if predict_x0 else "noise", variant=variant)
    assert res.nfe == 10
    torch.testing.assert_close(res.samples, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_equals_diffusers(order):
    sched = diffusers.DEISMultistepScheduler(solver_order=order)     # ends at sigma_min (timestep 0) always
    sde, score, x_T = _setup(sched, 10)     # N < 15: diffusers lowers the final orders, as sdegen's default
    times = _sigma_min_grid(sched, sde)
    want = _run_diffusers(sched, x_T.clone())
    res = sdegen.sample(sde, score, None, method="deis", x_T=x_T, grid=times, order=order)
    torch.testing.assert_close(res.samples, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_dpm_solver_2m_equals_diffusers(algorithm, solver_type):
    sched = diffusers.DPMSolverMultistepScheduler(solver_order=2, algorithm_type=algorithm, solver_type=solver_type,
                                                  final_sigmas_type="sigma_min")
    sde, score, x_T = _setup(sched, 10)
    times = _sigma_min_grid(sched, sde)
    want = _run_diffusers(sched, x_T.clone())
    ours = "midpoint" if solver_type == "midpoint" else "exact"
    res = sdegen.sample(sde, score, None, method="dpm_solver", x_T=x_T, grid=times, order=2, lower_order_final=True,
                        prediction="data" if algorithm == "dpmsolver++" else "noise", solver_type=ours)
    # DPMSolverMultistepScheduler.step casts the state to float32 on every step (diffusers 0.42,
    # "upcast"), so parity holds to float32 round-off: 10 steps x 2^-24 x |x| ~ 1e-6; tolerance 1e-5.
    torch.testing.assert_close(res.samples, want, rtol=0, atol=1e-5)
    # the other form differs by far more than round-off (the 2M gap the issue measured)
    other = sdegen.sample(sde, score, None, method="dpm_solver", x_T=x_T, grid=times, order=2,
                          prediction="data" if algorithm == "dpmsolver++" else "noise",
                          solver_type="exact" if ours == "midpoint" else "midpoint")
    assert float((other.samples - want).abs().max()) > 1e-3


def _pndm_float64(sched, sde):
    """diffusers' PNDM reads alphas_cumprod at integer timesteps: the float64 values of the same schedule."""
    ab = sde.alphas_cumprod
    sched.alphas_cumprod = ab
    sched.final_alpha_cumprod = ab[0]


@pytest.mark.parametrize("skip_prk", [False, True], ids=["pndm_prk", "plms"])
def test_pndm_equals_diffusers(skip_prk):
    # "trailing" spacing: timesteps 999, 949, ..., 49, each step 1000 // 20 = 50 (the step diffusers'
    # PNDM assumes), PRK midpoints 25 below; the last step goes to final_alpha_cumprod = alphas_cumprod[0].
    sched = diffusers.PNDMScheduler(skip_prk_steps=skip_prk, timestep_spacing="trailing")
    sde, score, x_T = _setup(sched, 20)
    _pndm_float64(sched, sde)
    want = _run_diffusers(sched, x_T.clone())
    times = _times(torch.cat([torch.arange(999, 0, -50), torch.zeros(1)]))
    res = sdegen.sample(sde, score, None, method="pndm", x_T=x_T, grid=times, warmup="heun" if skip_prk else "prk")
    assert res.nfe == (20 + 1 if skip_prk else 20 + 9) == len(sched.timesteps)
    torch.testing.assert_close(res.samples, want, rtol=0, atol=TOL)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_lms_equals_diffusers(order):
    sched = diffusers.LMSDiscreteScheduler()
    sde, score, x_T = _setup(sched, 10)     # linspace spacing 999/9 = 111: integer timesteps 999, 888, ..., 0
    times = _times(sched.timesteps.round())
    sched.sigmas = torch.cat([sde.sigma(times), torch.zeros(1, dtype=F64)])
    m_T, m_end = sde.marginal(times[[0, -1]])[0].tolist()
    # diffusers works on x / m (sigma space) and ends at sigma = 0, which no sdegen grid reaches (t > 0):
    # compare the states after its first N - 1 steps, i.e. at timestep 0.
    x = x_T.clone() / m_T
    for t in sched.timesteps[:-1]:
        out = eps_model(sched.scale_model_input(x, t), t.round().long().reshape(1).expand(x.shape[0]))
        x = sched.step(out, t, x, order=order).prev_sample
    res = sdegen.sample(sde, score, None, method="lms", x_T=x_T, grid=times, order=order)
    torch.testing.assert_close(res.samples, x * m_end, rtol=0, atol=TOL)


def test_unipc_equals_diffusers_on_a_tiny_unet():
    """The same with a random float64 ``UNet2DModel`` on 8x8 images (the issue's setting)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 8), norm_num_groups=4,
                                 down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D")).double().eval()
    sched = diffusers.UniPCMultistepScheduler(final_sigmas_type="sigma_min")
    sched.set_timesteps(8)
    model = lambda x, k: unet(x, k).sample
    sde, score = from_discrete_eps(model, sched.betas.to(F64), first_step=0, timesteps="round")
    times = _sigma_min_grid(sched, sde)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(model(x, t.reshape(1).expand(2)), t, x).prev_sample
    res = sdegen.sample(sde, score, None, method="unipc", x_T=x_T, grid=times)
    torch.testing.assert_close(res.samples, x, rtol=0, atol=TOL)
