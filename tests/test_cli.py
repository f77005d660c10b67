"""The ``sdegen`` command line: help everywhere, safe option parsing, one-line errors, each command end to end.

Commands run in-process through ``sdegen.cli.main`` (cheap); one test runs the real entry point in a
subprocess to check that an error is one line on stderr with no traceback.
"""

import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sdegen import cli
from sdegen.demo import DemoConfig, run_demo, sliced_wasserstein

COMMANDS = ("demo", "train", "sample", "likelihood", "bench", "info")


# ---------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text, key, value", [
    ("steps=10", "steps", 10),
    ("rtol=1e-4", "rtol", 1e-4),
    ("snr=0.16", "snr", 0.16),
    ("denoise=false", "denoise", False),
    ("per_sample=True", "per_sample", True),
    ("corrector=none", "corrector", None),
    ("corrector=langevin", "corrector", "langevin"),
    ("solver='dopri5'", "solver", "dopri5"),
    ("x=a=b", "x", "a=b"),
])
def test_parse_option_literals(text, key, value):
    k, v = cli.parse_option(text)
    assert k == key
    assert v == value and type(v) is type(value)


def test_parse_option_never_evaluates_code():
    # A would-be expression stays an inert string: nothing is imported or called.
    k, v = cli.parse_option("solver=__import__('os').getcwd()")
    assert (k, v) == ("solver", "__import__('os').getcwd()")
    k, v = cli.parse_option("steps=[1, 2]")
    assert v == "[1, 2]"


@pytest.mark.parametrize("text", ["steps", "=3", "1x=2", "a b=3"])
def test_parse_option_rejects_malformed(text):
    with pytest.raises(cli.CLIError, match="--opt"):
        cli.parse_option(text)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_device_and_seed(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--device" in out and "--seed" in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert command in out


# ---------------------------------------------------------------------- errors
def _one_line_error(capsys, argv, *needles):
    rc = cli.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and err[0].startswith("sdegen: error:"), err
    for needle in needles:
        assert needle in err[0]
    return err[0]


def test_unknown_method_lists_valid_ones(capsys, tmp_path):
    _one_line_error(capsys, ["sample", "--oracle", "gaussian", "--method", "nope", "--out", str(tmp_path / "s.npz")],
                    "nope", "euler_maruyama", "rk45")


def test_unknown_method_option_is_an_error(capsys, tmp_path):
    _one_line_error(capsys, ["sample", "--oracle", "gaussian", "--method", "rk45", "--opt", "foo=1",
                             "--out", str(tmp_path / "s.npz")], "foo", "rtol")


@pytest.mark.parametrize("argv, needle", [
    (["sample", "--oracle", "nope"], "--oracle"),
    (["sample"], "exactly one of --checkpoint"),
    (["sample", "--checkpoint", "/no/such/dir"], "--checkpoint"),
    (["sample", "--oracle", "gaussian", "--n", "0"], "--n"),
    (["sample", "--oracle", "gaussian", "--out", "samples.txt", "--method", "ode_euler", "--steps", "2"], ".npz or .png"),
    (["sample", "--oracle", "gaussian", "--device", "tpu"], "--device"),
    (["train", "--data", "no_such_set", "--out", "unused"], "--data"),
    (["likelihood", "--oracle", "gaussian", "--data", "missing.npz"], "missing.npz"),
])
def test_bad_arguments_give_one_line(capsys, tmp_path, monkeypatch, argv, needle):
    monkeypatch.chdir(tmp_path)
    _one_line_error(capsys, argv, needle)


# ---------------------------------------------------------------------- no silent overwrite, no links
SAMPLE = ["sample", "--oracle", "gaussian", "--method", "ode_euler", "--steps", "2", "--n", "4", "--quiet"]


def test_out_is_never_replaced_without_force(capsys, tmp_path):
    out = tmp_path / "s.npz"
    out.write_bytes(b"my results")
    _one_line_error(capsys, SAMPLE + ["--out", str(out)], "already exists; pass --force")
    assert out.read_bytes() == b"my results"
    assert cli.main(SAMPLE + ["--out", str(out), "--force"]) == 0
    assert np.load(out)["samples"].shape == (4, 2)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = tmp_path / "link.npz"
    link.symlink_to(victim)
    for extra in ([], ["--force"]):
        _one_line_error(capsys, SAMPLE + ["--out", str(link)] + extra, "is a symbolic link")
    assert victim.read_bytes() == b"precious"
    (tmp_path / "d.npz").mkdir()
    _one_line_error(capsys, SAMPLE + ["--out", str(tmp_path / "d.npz"), "--force"], "is a directory")


def test_train_refuses_a_planted_link_in_the_run_directory(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run / "sdegen_cli.json").symlink_to(victim)
    _one_line_error(capsys, ["train", "--data", "moons", "--n-data", "64", "--hidden", "8", "--depth", "1",
                             "--batch-size", "16", "--steps", "2", "--out", str(run), "--quiet"],
                    "symbolic link", "sdegen_cli.json")
    assert victim.read_text() == "precious" and sorted(p.name for p in run.iterdir()) == ["sdegen_cli.json"]


@pytest.mark.parametrize("opt, flag", [("steps=5", "--steps"), ("generator=1", "--seed"), ("dtype=float64", "--float64"),
                                       ("device=cpu", "--device"), ("method=euler_maruyama", "--method")])
def test_opt_cannot_set_what_the_command_line_sets(capsys, tmp_path, opt, flag):
    _one_line_error(capsys, SAMPLE + ["--opt", opt, "--out", str(tmp_path / "s.npz")],
                    f"--opt {opt.split('=')[0]}=... is set by the command line itself; use {flag}")
    assert not (tmp_path / "s.npz").exists()


@pytest.mark.parametrize("device", ["meta", "mps", "cuda:99", "xla"])
def test_unusable_devices_are_refused_up_front(capsys, tmp_path, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("mps is usable here")
    _one_line_error(capsys, SAMPLE + ["--device", device, "--out", str(tmp_path / "s.npz")], "--device")


@pytest.mark.parametrize("seed", ["-5", str(2**70)])
@pytest.mark.parametrize("chunks", [[], ["--batch-size", "2"]])
def test_seed_out_of_range_is_refused_on_every_path(capsys, tmp_path, seed, chunks):
    _one_line_error(capsys, SAMPLE + chunks + ["--seed", seed, "--out", str(tmp_path / "s.npz")],
                    "--seed must be an integer in [0, 2**63 - 1]", seed)


def test_seed_zero_and_the_largest_seed_run(tmp_path):
    for seed in ("0", str(2**63 - 1)):
        assert cli.main(SAMPLE + ["--seed", seed, "--out", str(tmp_path / f"s{seed}.npz")]) == 0


@pytest.mark.parametrize("array, needle", [
    (np.ones((8, 2)) + 1j, "must hold real numbers (float or int), got dtype complex128"),
    (np.array([[0.0, np.nan]] * 8), "holds NaN or inf"),
    (np.ones((8, 2), dtype=bool), "got dtype bool"),
    (np.ones(8), "must have shape (N, *D)"),
])
def test_data_files_with_values_that_would_be_changed_are_refused(capsys, tmp_path, array, needle):
    path = tmp_path / "d.npz"
    np.savez(path, x=array)
    _one_line_error(capsys, ["train", "--data", str(path), "--steps", "2", "--out", str(tmp_path / "run"), "--quiet"],
                    needle)
    _one_line_error(capsys, ["likelihood", "--oracle", "gaussian", "--data", str(path), "--n", "4"], needle)
    assert not (tmp_path / "run").exists()


def test_error_from_the_real_entry_point_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sdegen.cli", "sample", "--oracle", "8gaussians", "--method", "nope",
                           "--out", str(tmp_path / "s.npz")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdegen: error:")


# ---------------------------------------------------------------------- commands end to end
def test_sample_oracle_npz_matches_target_and_is_reproducible(tmp_path, capsys):
    # Gaussian data N(0.5, 0.5^2 I): the exact score and 40 Heun steps; n = 400 samples give a
    # standard error of the mean of 0.5 / 20 = 0.025 per coordinate and of the std of about
    # 0.5 / sqrt(2 * 400) = 0.018; we allow 4 standard errors plus the solver's small bias.
    argv = ["sample", "--oracle", "gaussian", "--method", "ode_heun", "--steps", "40", "--n", "400",
            "--float64", "--quiet", "--seed", "3"]
    assert cli.main(argv + ["--out", str(tmp_path / "a.npz")]) == 0
    assert cli.main(argv + ["--out", str(tmp_path / "b.npz")]) == 0
    a = np.load(tmp_path / "a.npz")
    b = np.load(tmp_path / "b.npz")
    x = a["samples"]
    assert x.shape == (400, 2) and x.dtype == np.float64
    np.testing.assert_array_equal(x, b["samples"])          # same seed, same samples
    assert int(a["nfe"]) == 2 * 40                          # Heun: 2 evaluations per step
    assert np.all(np.abs(x.mean(0) - 0.5) < 4 * 0.025 + 0.01)
    assert np.all(np.abs(x.std(0) - 0.5) < 4 * 0.018 + 0.01)
    assert "NFE" in capsys.readouterr().out


def test_sample_with_method_options_and_png(tmp_path):
    out = tmp_path / "pc.png"
    rc = cli.main(["sample", "--oracle", "8gaussians", "--method", "pc", "--steps", "5", "--n", "50", "--quiet",
                   "--opt", "corrector=langevin", "--opt", "snr=0.1", "--opt", "corrector_steps=2", "--out", str(out)])
    assert rc == 0
    assert out.stat().st_size > 1000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_train_resumes_and_sample_loads_the_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    base = ["train", "--data", "moons", "--n-data", "64", "--hidden", "8", "--depth", "1", "--batch-size", "16",
            "--out", str(run), "--quiet"]
    assert cli.main(base + ["--steps", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("training") and "step 3" in first
    assert cli.main(base + ["--steps", "5"]) == 0
    second = capsys.readouterr().out
    assert second.startswith("resuming") and "step 5" in second
    assert json.loads((run / "sdegen_cli.json").read_text())["data_shape"] == [2]
    assert cli.main(["sample", "--checkpoint", str(run), "--method", "euler_maruyama", "--steps", "4", "--n", "10",
                     "--quiet", "--out", str(tmp_path / "s.npz")]) == 0
    x = np.load(tmp_path / "s.npz")["samples"]
    assert x.shape == (10, 2) and np.isfinite(x).all()


def test_likelihood_with_the_oracle_matches_the_true_density(capsys):
    # Exact score, exact p_T, float64, tolerance 1e-6: the ODE error is far below 1e-3 nats (the
    # likelihood tests bound it per point); the printout rounds to 1e-4.
    rc = cli.main(["likelihood", "--oracle", "8gaussians", "--n", "4", "--tol", "1e-6", "--float64", "--quiet"])
    assert rc == 0
    out = capsys.readouterr().out
    nll = float(next(ln for ln in out.splitlines() if ln.startswith("NLL ")).split()[1])
    exact = float(next(ln for ln in out.splitlines() if ln.startswith("exact")).split()[1])
    assert math.isfinite(nll) and abs(nll - exact) < 2e-3


def test_likelihood_bits_per_dim_of_8bit_data(tmp_path, capsys):
    # Data on [-1, 1] under the exact score of N(0.5, 0.5^2 I): bits/dim must be
    # NLL / (d ln 2) + log2(128), the dequantization offset for 256 levels on a width-2 range.
    x = torch.rand(6, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    np.savez(tmp_path / "x.npz", x=x.numpy())
    rc = cli.main(["likelihood", "--oracle", "gaussian", "--data", str(tmp_path / "x.npz"), "--images",
                   "--tol", "1e-6", "--float64", "--quiet"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    nll = float(next(ln for ln in lines if ln.startswith("NLL ")).split()[1])
    bpd = float(next(ln for ln in lines if ln.startswith("bits/dim")).split()[1])
    # The printout rounds both to 1e-4; bpd is a mean of per-point values, NLL a mean: same average.
    assert abs(bpd - (nll / (2 * math.log(2)) + 7.0)) < 2e-4


def test_bench_dispatches_to_each_benchmark_module(tmp_path, monkeypatch, capsys):
    # The benchmarks themselves are tested by their authors; here only the wiring: each module's
    # run(out_dir, quick=...) is called once and the results are gathered in summary.json.
    calls = []
    for name in cli.BENCH_NAMES:
        mod = types.ModuleType(f"sdegen.bench.{name}")
        mod.run = (lambda n: lambda out_dir, quick=False: calls.append((n, out_dir, quick)) or {"ok": n})(name)
        monkeypatch.setitem(sys.modules, f"sdegen.bench.{name}", mod)
    assert cli.main(["bench", "all", "--quick", "--out", str(tmp_path)]) == 0
    assert [c[0] for c in calls] == list(cli.BENCH_NAMES) and all(c[2] for c in calls)
    assert all(c[1] == os.path.join(str(tmp_path), c[0]) for c in calls)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {n: {"ok": n} for n in cli.BENCH_NAMES}


def test_info_prints_each_sde(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "VPSDE" in out and "SubVPSDE" in out and "VESDE" in out


# ---------------------------------------------------------------------- the demo
def _tiny(**kw):
    return DemoConfig.fast(train_steps=5, n_train=256, n_samples=64, ancestral_steps=25, ddim_steps=4,
                           sde_steps=6, n_paths=4, **kw)


def test_demo_writes_table_and_figures_with_counted_nfe(tmp_path):
    cfg = _tiny()
    res = run_demo(tmp_path, config=cfg, progress=False, log=lambda s: None)
    rows = res["rows"]
    assert len(rows) == 10 and {r["score"] for r in rows} == {"model", "exact"}
    nfe = {r["method"]: r["nfe"] for r in rows if r["score"] == "exact"}
    assert nfe["DDPM ancestral"] == cfg.ancestral_steps          # one score call per DDPM step, no denoising
    assert nfe["DDIM"] == cfg.ddim_steps
    assert nfe["Euler-Maruyama"] == cfg.sde_steps + 1              # + the final Tweedie denoising step
    assert nfe["PC (annealed Langevin)"] == 2 * (cfg.sde_steps // 2) + 1    # predictor + 1 corrector step, + denoise
    assert all(math.isfinite(r["distance"]) and r["seconds"] >= 0 for r in rows)
    for name in ("samples.png", "trajectories.png", "training_loss.png", "results.json", "table.md"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert table.count("\n| ") == 11                               # 10 rows + the noise floor
    assert json.loads((tmp_path / "results.json").read_text())["floor"] == res["floor"]


def test_demo_cli_passes_its_options_to_run_demo(tmp_path, monkeypatch):
    # run_demo itself is exercised above; here only the command's plumbing (no second training run).
    seen = {}
    monkeypatch.setattr("sdegen.demo.run_demo", lambda out, **kw: seen.update(out=out, **kw) or {})
    rc = cli.main(["demo", "--fast", "--train-steps", "3", "--n", "32", "--dataset", "anisotropic",
                   "--out", str(tmp_path), "--seed", "7", "--quiet"])
    assert rc == 0
    cfg = seen["config"]
    assert (cfg.train_steps, cfg.n_samples, cfg.dataset) == (3, 32, "anisotropic")
    assert cfg.ancestral_steps == DemoConfig.fast().ancestral_steps        # --fast shrinks the rest
    assert seen["seed"] == 7 and seen["progress"] is False and str(seen["device"]) == "cpu"
    assert seen["out"] == str(tmp_path)


def test_demo_rejects_a_dataset_without_an_exact_score(tmp_path):
    with pytest.raises(ValueError, match="dataset"):
        run_demo(tmp_path, config=_tiny(dataset="moons"), progress=False, log=lambda s: None)


# ---------------------------------------------------------------------- the distance
def test_sliced_wasserstein_of_a_shift_is_its_projected_length():
    # Shifting every point by mu shifts each projection by theta . mu, so
    # SW2^2 = mean_l (theta_l . mu)^2 exactly; for random unit theta in 2-D, E[(theta . u)^2] = 1/2 with
    # variance 1/8, so with L = 4096 directions the relative standard error of SW2^2 is
    # sqrt(1/8 / 4096) / (1/2) = 1.1 %; 4 standard errors of SW2^2 are 4.4 %, i.e. 2.2 % of SW2.
    x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mu = torch.tensor([0.3, -0.4], dtype=torch.float64)
    d = sliced_wasserstein(x, x + mu, n_proj=4096)
    assert abs(d - 0.5 / math.sqrt(2)) < 0.022 * 0.5 / math.sqrt(2)
    assert sliced_wasserstein(x, x.flip(0)) == 0.0                 # order does not matter
    with pytest.raises(ValueError, match="dimension"):
        sliced_wasserstein(x, torch.cat([x, x], 1))


@pytest.mark.cuda
def test_demo_on_cuda(tmp_path):
    res = run_demo(tmp_path, config=_tiny(), device="cuda", progress=False, log=lambda s: None)
    assert res["device"].startswith("cuda") and len(res["rows"]) == 10
    assert all(math.isfinite(r["distance"]) for r in res["rows"])


@pytest.mark.cuda
def test_sample_on_cuda_through_the_cli(tmp_path):
    rc = cli.main(["sample", "--oracle", "8gaussians", "--method", "rk45", "--n", "64", "--device", "cuda",
                   "--quiet", "--out", str(tmp_path / "s.npz")])
    assert rc == 0
    assert np.load(tmp_path / "s.npz")["samples"].shape == (64, 2)


def test_sample_under_torchrun_equals_one_process_with_the_same_chunks(tmp_path):
    # Two gloo ranks deal the chunks of the seed plan between them; one process with the same
    # --batch-size computes every chunk itself: the gathered samples must be identical.
    torchrun = Path(sys.executable).with_name("torchrun")
    common = ["sample", "--oracle", "gaussian", "--method", "ode_euler", "--steps", "5", "--num-samples", "20",
              "--batch-size", "8", "--quiet"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "sdegen.cli", *common,
                           "--out", str(tmp_path / "dist.npz")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert cli.main(common + ["--out", str(tmp_path / "one.npz")]) == 0
    dist = np.load(tmp_path / "dist.npz")
    one = np.load(tmp_path / "one.npz")
    assert dist["samples"].shape == (20, 2)
    np.testing.assert_array_equal(dist["samples"], one["samples"])
    assert int(dist["nfe"]) == int(one["nfe"]) == 3 * 5          # 3 chunks (8, 8, 4), 5 Euler steps each
