"""Reproducibility: bitwise-identical CPU results across processes, and samples independent of batch-mates.

Two separate Python processes run every sampling method, the DDPM samplers, both likelihood
estimators and a short training run from the same seeds and write the results to a safetensors
file; the files must be byte-identical. Then, in this process, per-sample seeds
(:class:`~sdegen._rng.PerSampleNoise`) must make sample k bitwise identical whether it is drawn in a
batch of 1, 7 or 1,000, for every method whose steps are per-sample (fixed grids, RK45's
``per_sample`` mode).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sdegen
from sdegen._rng import PerSampleNoise

REPO = Path(__file__).resolve().parents[2]

SCRIPT = r'''
import sys
import torch
import sdegen
from safetensors.torch import save_file
from sdegen._rng import PerSampleNoise

out = {}
sde = sdegen.VPSDE()
gm = sdegen.named_mixture("8gaussians")
score = gm.score_fn(sde)
methods = sys.argv[2].split(",") if len(sys.argv) > 2 else list(sdegen.METHODS)
dtypes = (torch.float32, torch.float64) if len(sys.argv) <= 2 else (torch.float64,)
for method in methods:
    fixed = sdegen.METHODS[method].fixed_grid
    steps = 30 if fixed else None
    for dtype in dtypes:
        res = sdegen.sample(sde, score, (16, 2), method=method, steps=steps, dtype=dtype,
                            generator=torch.Generator().manual_seed(7))
        out[f"sample.{method}.{dtype}"] = res.samples
        out[f"nfe.{method}.{dtype}"] = torch.tensor(res.nfe)
    if fixed and method != "torchsde":   # torchsde ignores seeds: see test_seeded_sampling_is_repeatable
        res = sdegen.sample(sde, score, (16, 2), method=method, steps=steps, dtype=torch.float64,
                            seeds=PerSampleNoise.from_offset(100, 16, (16, 2), dtype=torch.float64))
        out[f"seeded.{method}"] = res.samples
ddpm = sdegen.DDPM.linear(50)
eps_model = lambda x, i: 0.1 * x
out["ddpm.sample"] = ddpm.sample(eps_model, (8, 2), generator=torch.Generator().manual_seed(3))
out["ddpm.ddim"] = ddpm.ddim_sample(eps_model, (8, 2), steps=10, eta=1.0, generator=torch.Generator().manual_seed(3))
x = gm.sample(6, generator=torch.Generator().manual_seed(4))
for div in ("exact", "hutchinson"):
    ll = sdegen.log_likelihood(sde, score, x, divergence=div, generator=torch.Generator().manual_seed(5))
    out[f"loglik.{div}"] = ll.log_prob
torch.manual_seed(0)
model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=16, depth=1), sde)
res = sdegen.train(model, gm.sample(128, generator=torch.Generator().manual_seed(6)).float(), steps=8,
                   batch_size=16, lr=1e-3, progress=False, seed=3)
out.update({f"train.{k}": v for k, v in res.model.state_dict().items()})
out["train.history"] = torch.tensor(res.history, dtype=torch.float64)
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
print("done", len(out))
'''


def _two_runs(tmp_path: Path, methods: list[str] | None) -> tuple[dict, dict]:
    script = tmp_path / "repro.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    extra = [",".join(methods)] if methods else []
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / f"run{k}.safetensors"), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / f"run{k}.safetensors") for k in range(2))
    assert a.keys() == b.keys()
    differing = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differing, differing
    digest = [hashlib.sha256((tmp_path / f"run{k}.safetensors").read_bytes()).hexdigest() for k in range(2)]
    assert digest[0] == digest[1]
    return a, b


def test_samplers_likelihood_and_trainer_are_bitwise_identical_across_processes(tmp_path):
    a, _ = _two_runs(tmp_path, ["euler_maruyama", "rk45"])
    assert {"loglik.exact", "loglik.hutchinson", "ddpm.sample", "train.history"} <= a.keys()


@pytest.mark.slow
def test_every_sampler_is_bitwise_identical_across_processes_in_both_precisions(tmp_path):
    a, _ = _two_runs(tmp_path, None)
    assert {k.split(".")[1] for k in a if k.startswith("sample.")} == set(sdegen.METHODS)


# ---------------------------------------------------------------------------------------------- batch-mates
FIXED_GRID = ["euler_maruyama", "reverse_diffusion", "ancestral", "pc", "ode_euler", "ode_heun"]


def _per_sample_score(x, t):
    """An analytic score that acts on each sample alone (a network with batch-independent kernels)."""
    gm_mean, var = 0.5, 0.25                               # N(0.5, 0.25 I) data under VP
    m, s = sdegen.VPSDE().marginal(t)
    m, s = m.reshape(-1, 1), s.reshape(-1, 1)
    return (m * gm_mean - x) / (m * m * var + s * s)


@pytest.mark.parametrize("method,opts", [(m, {}) for m in FIXED_GRID] + [("rk45", {"per_sample": True})])
def test_sample_k_does_not_depend_on_its_batch_mates(method, opts):
    steps = None if method == "rk45" else 30   # ancestral on VP needs steps > beta_max = 20
    big_seeds = list(range(5000, 6000))

    def draw(seeds):
        noise = PerSampleNoise(seeds, (len(seeds), 2), dtype=torch.float64)
        return sdegen.sample(sdegen.VPSDE(), _per_sample_score, (len(seeds), 2), method=method, steps=steps,
                             dtype=torch.float64, seeds=noise, **opts).samples

    big = draw(big_seeds)
    mates = [11, big_seeds[3], 2**40, big_seeds[999], 0, 77, big_seeds[500]]
    seven = draw(mates)
    one = draw([big_seeds[500]])
    pairs = [(seven[1], big[3]), (seven[3], big[999]), (seven[6], big[500]), (one[0], big[500])]
    if method == "rk45":
        # Per-sample step sizes make the path of sample k its own, but RK45 combines its stages with
        # one batched matrix product whose rounding depends on the batch size: equal to ~1e-15.
        for a, b in pairs:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    else:
        assert all(torch.equal(a, b) for a, b in pairs)


SEEDS_IGNORED: dict = {}  # torchsde now derives its Brownian seed from the per-sample noise


@pytest.mark.parametrize("method", [
    pytest.param(m, marks=[pytest.mark.xfail(strict=True, reason=SEEDS_IGNORED[m])] if m in SEEDS_IGNORED else [])
    for m in sdegen.METHODS])
def test_seeded_sampling_is_repeatable(method):
    steps = 30 if sdegen.METHODS[method].fixed_grid else None

    def draw():
        noise = PerSampleNoise([3, 1, 4, 1 << 50], (4, 2), dtype=torch.float64)
        return sdegen.sample(sdegen.VPSDE(), _per_sample_score, (4, 2), method=method, steps=steps,
                             dtype=torch.float64, seeds=noise).samples

    assert torch.equal(draw(), draw())


def test_seeded_sampling_differs_across_seeds_and_matches_the_prior_draw():
    noise = PerSampleNoise([1, 2, 3], (3, 2), dtype=torch.float64)
    res = sdegen.sample(sdegen.VPSDE(), _per_sample_score, (3, 2), method="ode_euler", steps=3,
                        dtype=torch.float64, seeds=noise, return_trajectory=True)
    x_T = res.trajectory[0][1]
    assert torch.equal(x_T, noise.prior() * sdegen.VPSDE().prior_std())
    assert not torch.equal(res.samples[0], res.samples[1])


@pytest.mark.cuda
def test_cuda_per_sample_seeds_are_batch_invariant_and_close_to_cpu():
    seeds = list(range(64))

    def draw(s, device):
        return sdegen.sample(sdegen.VPSDE(), _per_sample_score, (len(s), 2), method="euler_maruyama", steps=20,
                             dtype=torch.float64, device=device,
                             seeds=PerSampleNoise(s, (len(s), 2), device=device, dtype=torch.float64)).samples

    big = draw(seeds, "cuda")
    assert torch.equal(draw(seeds[5:6], "cuda")[0], big[5])
    # the noise is bitwise equal on both devices; the arithmetic of the steps agrees to rounding
    torch.testing.assert_close(big.cpu(), draw(seeds, "cpu"), rtol=1e-12, atol=1e-12)
