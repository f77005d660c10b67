"""Max |sdegen - diffusers| per configuration of tests/test_diffusers_parity.py (float64, one tiny random UNet).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python scripts/diffusers_parity_errors.py`` from the repository root.
The tests assert these at 1e-5; this prints the measured values (diffusers computes its coefficients
from float32 alphas_cumprod, which bounds the agreement; see the test module docstring).
"""
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch  # noqa: E402
import sdegen  # noqa: E402
import diffusers  # noqa: E402
import test_diffusers_parity as T  # noqa: E402
from sdegen.adapters import from_diffusers  # noqa: E402
u = T.unet()
def nat(s, seed, method="ancestral", **kw):
    sde, sc = from_diffusers(u, s, use_clipped_model_output=kw.pop("ucmo", False))
    return sdegen.sample(sde, sc, T.SHAPE, method=method, generator=torch.Generator().manual_seed(seed), dtype=T.F64, **kw).samples
for case, cfg in T.DDPM_CASES.items():
    s = T._ddpm(**cfg); print(f"DDPM {case:22s} {float((nat(s,3)-T._loop(u,s,3)).abs().max()):.1e}")
for sp, off, var in [("leading",1,"fixed_small"),("trailing",0,"fixed_large"),("linspace",0,"fixed_small")]:
    s = T._ddpm(timestep_spacing=sp, steps_offset=off, variance_type=var); s.set_timesteps(7)
    print(f"DDPM 7 steps {sp}/{off}/{var:12s} {float((nat(s,4)-T._loop(u,s,4)).abs().max()):.1e}")
for case, (cfg, kw) in T.DDIM_CASES.items():
    s = T._ddim(6, **cfg); ref = T._loop(u, s, 5, **kw)
    o = {} if "eta" not in kw else {"eta": kw["eta"]}
    print(f"DDIM {case:22s} {float((nat(s,5,ucmo=kw.get('use_clipped_model_output',False),**o)-ref).abs().max()):.1e}")
s = T._ddim(6, clip_sample=True)
print("  (DDIM clip: use_clipped_model_output True vs False loops differ by", f"{float((T._loop(u,s,5,use_clipped_model_output=True)-T._loop(u,s,5)).abs().max()):.1e})")
for cls, cfg in [("EulerDiscreteScheduler", {}), ("EulerDiscreteScheduler", dict(prediction_type="v_prediction", steps_offset=1)),
                 ("EulerAncestralDiscreteScheduler", {}), ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction"))]:
    s = getattr(diffusers, cls)(num_train_timesteps=20, beta_start=1e-3, beta_end=0.2, timestep_spacing="leading", **cfg); s.set_timesteps(6)
    print(f"{cls} {cfg} {float((nat(s,6)-T._euler_loop(u,s,6)).abs().max()):.1e}")
for cfg in [dict(solver_type="midpoint"), dict(solver_type="heun"), dict(prediction_type="v_prediction", timestep_spacing="trailing"), dict(solver_order=1, lower_order_final=False)]:
    s = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=20, beta_start=1e-3, beta_end=0.2, **cfg); s.set_timesteps(6)
    print(f"DPMSolverMultistep {cfg} {float((nat(s,8,'dpm_solver')-T._euler_loop(u,s,8)).abs().max()):.1e}")
lu = T._unet(out_channels=2, seed=1)
for var, st in [("learned_range", None), ("learned_range", 7)]:
    s = T._ddpm(variance_type=var)
    if st: s.set_timesteps(st)
    sde, sc = from_diffusers(lu, s)
    r = sdegen.sample(sde, sc, T.SHAPE, method="ancestral", generator=torch.Generator().manual_seed(11), dtype=T.F64).samples
    print(f"DDPM {var} steps={st}: {float((r - T._loop(lu, s, 11)).abs().max()):.1e}")
for cls, n, cfg, kw in [("DDPMScheduler", None, dict(prediction_type="v_prediction"), {}),
                        ("DDPMScheduler", 7, dict(prediction_type="v_prediction", clip_sample=True), {}),
                        ("DDIMScheduler", 6, dict(prediction_type="v_prediction"), {}),
                        ("DDIMScheduler", 6, dict(prediction_type="sample", clip_sample=True), dict(eta=0.5))]:
    s = T._zero_snr(cls, n, **cfg)
    print(f"zero-SNR {cls} {n} {cfg} {kw}: {float((nat(s,12,**kw)-T._loop(u,s,12,**kw)).abs().max()):.1e}")
