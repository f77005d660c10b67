"""The demo's numbers a newcomer reads, and the command-line frictions of a first session."""

import argparse

import matplotlib.image
import pytest
import torch

import sdegen
from sdegen import cli
from sdegen.demo import UNDERTRAINED_RATIO, DemoConfig, DemoRow, _caveats, _Heartbeat, noise_floor


def test_noise_floor_is_mean_and_sd_of_independent_exact_sets():
    gm = sdegen.named_mixture("8gaussians", dtype=torch.float32)
    ref = gm.sample(300, generator=torch.Generator().manual_seed(5))
    cfg = DemoConfig(n_samples=300, floor_sets=6)
    mean, sd = noise_floor(gm, ref, cfg, seed=0, device="cpu")
    again = noise_floor(gm, ref, cfg, seed=0, device="cpu")
    assert (mean, sd) == again                                  # seeded: the same floor every run
    # Six distances between independent sets of 300 points differ: the spread is real and smaller
    # than the mean (SW2 between two exact sets of n points is O(n^-1/2) with O(n^-1/2) spread).
    assert 0 < sd < mean
    assert noise_floor(gm, ref, DemoConfig(n_samples=300, floor_sets=1), seed=0, device="cpu")[1] == 0.0


def test_caveats_name_hidden_points_and_an_undertrained_model():
    cfg = DemoConfig(n_samples=100, train_steps=60)
    floor = 0.1
    rows = [DemoRow("DDIM", "model", 10, 0.1, UNDERTRAINED_RATIO * floor * 1.5),
            DemoRow("Euler-Maruyama", "model", 10, 0.1, floor),
            DemoRow("DDIM", "exact", 10, 0.1, floor)]
    outside = {("DDIM", "model"): 7, ("Euler-Maruyama", "model"): 0, ("DDIM", "exact"): 0}
    notes = _caveats(rows, outside, 3.2, floor, 0.02, cfg)
    assert any("DDIM (model score): 7 of 100" in n for n in notes)
    warn = [n for n in notes if n.startswith("warning")]
    assert len(warn) == 1 and "DDIM 0.45" in warn[0] and "Euler" not in warn[0] and "60" in warn[0]
    assert _caveats(rows[1:], outside, 3.2, floor, 0.02, cfg) == []
    rows[1].distance = float("nan")                             # a NaN row is never "fine"
    assert any("Euler-Maruyama nan" in n for n in _caveats(rows[1:], outside, 3.2, floor, 0.02, cfg))


def test_heartbeat_passes_calls_through_and_logs_only_when_due():
    lines = []
    score = lambda x, t, **kw: x * 2 + kw.get("y", 0)            # noqa: E731
    quiet = _Heartbeat(score, lines.append, every=3600.0)
    x = torch.ones(3, 2)
    assert torch.equal(quiet(x, torch.full((3,), 0.5), y=1), x * 2 + 1)
    assert lines == [] and quiet.calls == 1
    loud = _Heartbeat(score, lines.append, every=0.0)
    loud(x, torch.full((3,), 0.25))
    assert len(lines) == 1 and "1 score calls" in lines[0] and "t = 0.250" in lines[0]
    _Heartbeat(score, None, every=0.0)(x, torch.full((3,), 0.25))   # no log: silent
    assert len(lines) == 1


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"sdegen {sdegen.__version__}"


def test_threads_default_to_one_unless_asked(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        torch.set_num_threads(2)
        cli._set_threads(argparse.Namespace(command="demo", threads=None))
        assert torch.get_num_threads() == 1
        cli._set_threads(argparse.Namespace(command="demo", threads=2))
        assert torch.get_num_threads() == 2
        cli._set_threads(argparse.Namespace(command="bench", threads=None))   # bench: left alone
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("OMP_NUM_THREADS", "2")                           # the user asked already
        cli._set_threads(argparse.Namespace(command="sample", threads=None))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert cli.main(["demo", "--threads", "0"]) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A two-step `sdegen train` run on a named mixture (its record names the data)."""
    out = tmp_path_factory.mktemp("run") / "ck"
    before = torch.get_num_threads()
    rc = cli.main(["train", "--out", str(out), "--steps", "2", "--n-data", "64", "--batch-size", "32",
                   "--hidden", "8", "--depth", "1", "--quiet"])
    torch.set_num_threads(before)
    assert rc == 0
    return out


def test_likelihood_of_a_checkpoint_uses_the_recorded_data(tiny_run, capsys):
    rc = cli.main(["likelihood", "--checkpoint", str(tiny_run), "--n", "4", "--tol", "1e-2", "--quiet"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "'8gaussians', as recorded by the training run" in out.out


def test_sample_png_is_a_labelled_figure(tiny_run, tmp_path):
    png = tmp_path / "x.png"
    rc = cli.main(["sample", "--checkpoint", str(tiny_run), "--n", "64", "--steps", "4", "--method", "ode_euler",
                   "--out", str(png), "--quiet"])
    assert rc == 0
    h, w = matplotlib.image.imread(png).shape[:2]
    assert w >= 500 and h >= 500, (w, h)


def test_train_accepts_the_edm_parameterization(tmp_path):
    out = tmp_path / "edm"
    before = torch.get_num_threads()
    rc = cli.main(["train", "--out", str(out), "--steps", "2", "--n-data", "64", "--batch-size", "32",
                   "--hidden", "8", "--depth", "1", "--parameterization", "edm", "--quiet"])
    torch.set_num_threads(before)
    assert rc == 0
    model = sdegen.load(out)
    data = sdegen.named_mixture("8gaussians").sample(64, generator=torch.Generator().manual_seed(0))
    assert model.parameterization == "edm"
    assert model.sigma_data == pytest.approx(float(data.float().std()), rel=0.05)   # the data's own scale
    assert cli.main(["train", "--out", str(tmp_path / "x"), "--steps", "2", "--sigma-data", "0.5", "--quiet"]) == 1


def test_ddim_row_counts_through_the_one_counter_and_keeps_the_numbers():
    # The demo's DDIM counts its score calls with CountingScore: one call per DDIM step, the samples
    # bit for bit those of the chain run on the raw score, and the counter's output checks apply.
    from sdegen.demo import demo_methods

    sde, cfg = sdegen.VPSDE(), DemoConfig.fast()
    score = sdegen.named_mixture("8gaussians", dtype=torch.float32).score_fn(sde)
    ddim = demo_methods(sde, cfg)["DDIM"]
    x, nfe = ddim(score, (16, 2), torch.Generator().manual_seed(0))
    chain = sde.discretize(cfg.ancestral_steps)
    y = chain.ddim_sample(chain.eps_model_from_score(score), (16, 2), steps=cfg.ddim_steps, eta=0.0,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    assert nfe == cfg.ddim_steps
    assert torch.equal(x, y)
    with pytest.raises(TypeError, match="x's dtype and device"):
        ddim(lambda x, t: score(x, t).double(), (16, 2), torch.Generator().manual_seed(0))
