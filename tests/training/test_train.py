"""Training loop: exact resume (also after SIGKILL), atomic checksummed checkpoints, bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import sdegen
from sdegen.nn import MLP
from sdegen.training import CheckpointError, Trainer, TrainingDivergedError, load, train
from sdegen.training.checkpoint import list_checkpoints, read_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _data(n=256, labels=False):
    x = sdegen.named_mixture("8gaussians", dtype=torch.float32).sample(n, generator=torch.Generator().manual_seed(1))
    if not labels:
        return x
    return x, (torch.atan2(x[:, 1], x[:, 0]) > 0).long() + (x[:, 0] > 0).long()   # 3 classes


def _model(seed=0, **net_kw):
    torch.manual_seed(seed)
    return sdegen.ScoreModel(MLP(2, hidden=16, depth=1, **net_kw), sdegen.VPSDE(), "eps")


OPTS = dict(batch_size=32, lr=1e-3, progress=False, checkpoint_every=3, warmup=4)


def _snapshot(directory):
    """Name -> sha256 of every file: to show that nothing was overwritten."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in Path(directory).iterdir()}


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_in_process_is_bitwise_exact(tmp_path):
    # Dropout (global RNG), label dropout (noise generator), warm-up, EMA and Adam state all matter here.
    data = _data(labels=True)
    kw = dict(OPTS, cond_drop=0.2, log_file=tmp_path / "b" / "log.jsonl")
    full = train(_model(num_classes=3, dropout=0.1), data, steps=10, checkpoint_dir=tmp_path / "a", **kw)
    part = _model(num_classes=3, dropout=0.1)
    train(part, data, steps=7, checkpoint_dir=tmp_path / "b", **kw)            # stops after the step-6 checkpoint + 1
    with pytest.warns(RuntimeWarning, match="falling back"):
        # The newest checkpoint (step 7) gets corrupted: resume falls back to step 6 and still matches.
        newest = tmp_path / "b" / "step-00000007.safetensors"
        blob = bytearray(newest.read_bytes())
        blob[-3] ^= 0xFF
        newest.write_bytes(bytes(blob))
        again = train(_model(num_classes=3, dropout=0.1, seed=99), data, steps=10, checkpoint_dir=tmp_path / "b", **kw)
    assert again.resumed_from == 6
    _assert_same_state(full.raw_model, again.raw_model)
    _assert_same_state(full.model, again.model)                               # EMA weights
    assert full.history == again.history and len(again.history) == 10
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11))                                       # log truncated at resume, no duplicates


def test_load_rebuilds_the_ema_model(tmp_path):
    model = _model()
    rng_before = torch.get_rng_state()
    res = train(model, _data(), steps=5, checkpoint_dir=tmp_path, **OPTS)
    assert torch.equal(torch.get_rng_state(), rng_before)                  # the caller's global RNG is untouched
    loaded = load(tmp_path)
    assert isinstance(loaded.net, MLP) and isinstance(loaded.sde, sdegen.VPSDE)
    assert loaded.parameterization == "eps" and not loaded.training
    x, t = _data(8), torch.linspace(0.1, 0.9, 8)
    assert torch.equal(loaded(x, t), res.model(x, t))
    assert torch.equal(load(tmp_path, ema=False)(x, t), res.raw_model(x, t))
    assert len(list_checkpoints(tmp_path)) == 2                               # the newest and one previous


def test_corrupt_and_truncated_checkpoints(tmp_path):
    train(_model(), _data(), steps=6, checkpoint_dir=tmp_path, **OPTS)
    (tmp_path / "step-00000006.safetensors").write_bytes((tmp_path / "step-00000006.safetensors").read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        _, meta, _ = read_checkpoint(tmp_path)
    assert meta["step"] == 3
    (tmp_path / "step-00000003.json").write_text("{not json")
    before = _snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        load(tmp_path)
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        train(_model(), _data(), steps=9, checkpoint_dir=tmp_path, **OPTS)
    assert _snapshot(tmp_path) == before                                     # nothing overwritten
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load(tmp_path / "empty")


def test_mismatched_checkpoint_is_refused(tmp_path):
    train(_model(), _data(), steps=3, checkpoint_dir=tmp_path, **OPTS)
    before = _snapshot(tmp_path)
    other = sdegen.ScoreModel(MLP(2, hidden=32, depth=1), sdegen.VPSDE(), "eps")
    with pytest.raises(CheckpointError, match="different model"):
        train(other, _data(), steps=6, checkpoint_dir=tmp_path, **OPTS)
    with pytest.raises(CheckpointError, match=r"other training options .*'lr'"):
        train(_model(), _data(), steps=6, checkpoint_dir=tmp_path, **dict(OPTS, lr=5e-4))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load(tmp_path, net=MLP(2, hidden=32, depth=1))
    assert _snapshot(tmp_path) == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    from sdegen.training import dsm_loss

    calls = []

    def nan_at_step_7(model, x0, generator, model_kwargs):
        calls.append(1)
        value = dsm_loss(model, x0, generator=generator)
        return value * float("nan") if len(calls) == 7 else value

    with pytest.raises(TrainingDivergedError, match=r"loss became nan at step 7; the last good checkpoint is .*step-00000006"):
        train(_model(), _data(), steps=12, checkpoint_dir=tmp_path, loss=nan_at_step_7, **dict(OPTS, log_every=1))
    assert list_checkpoints(tmp_path)[0][0] == 6
    load(tmp_path)                                                           # still valid



def test_bad_data_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match=r"data of shape \(256, 3\) does not fit the network.*\(B, 2\)"):
        train(_model(), torch.randn(256, 3), steps=3, checkpoint_dir=tmp_path / "c", **OPTS)
    assert not (tmp_path / "c").exists()
    with pytest.raises(ValueError, match="labels must be an integer tensor"):
        train(_model(), (_data(), torch.zeros(5)), steps=3, **OPTS)
    with pytest.raises(ValueError, match="optimizer must be one of adam, adamw"):
        train(_model(), _data(), steps=3, optimizer="sgd", **OPTS)
    with pytest.raises(ValueError, match="cond_drop > 0 needs labelled data"):
        train(_model(), _data(), steps=3, cond_drop=0.1, **OPTS)


def test_unknown_sde_needs_an_explicit_object_and_trainer_extends(tmp_path):
    sde = sdegen.AffineSDE(a=lambda t: -0.5 * (1 + t), g=lambda t: (1 + t).sqrt())
    torch.manual_seed(0)
    model = sdegen.ScoreModel(MLP(2, hidden=16, depth=1), sde, "v")
    trainer = Trainer(model, _data(), checkpoint_dir=tmp_path, optimizer="adamw", weight_decay=0.01,
                      log_file=tmp_path / "log.csv", **OPTS)
    trainer.fit(4)
    res = trainer.fit(6)
    assert res.resumed_from == 4 and len(res.history) == 6
    assert (tmp_path / "log.csv").read_text().splitlines()[0] == "step,loss,lr"
    assert len((tmp_path / "log.csv").read_text().splitlines()) == 7
    with pytest.raises(CheckpointError, match="pass sde="):
        load(tmp_path)
    assert load(tmp_path, sde=sde).parameterization == "v"


_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    torch.set_num_threads(1)
    import sdegen
    from sdegen.nn import MLP
    ckpt, delay = sys.argv[1], float(sys.argv[2])
    torch.manual_seed(0)
    model = sdegen.ScoreModel(MLP(2, hidden=32, depth=2), sdegen.VPSDE(), "eps")
    data = sdegen.named_mixture("8gaussians", dtype=torch.float32).sample(512, generator=torch.Generator().manual_seed(1))
    sdegen.train(model, data, steps=40, batch_size=64, lr=1e-3, warmup=5, checkpoint_dir=ckpt, checkpoint_every=4,
                 progress=False, log_file=ckpt + "/log.jsonl", callback=lambda step, m: time.sleep(delay))
    print("finished")
""")


def test_sigkill_mid_run_resumes_to_identical_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def launch(d, delay):
        return subprocess.Popen([sys.executable, str(script), str(tmp_path / d), str(delay)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    straight = launch("straight", 0.0)
    victim = launch("killed", 0.1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        done = list_checkpoints(tmp_path / "killed")
        if done and done[0][0] >= 8:
            break
        assert victim.poll() is None, victim.communicate()
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    killed_at = list_checkpoints(tmp_path / "killed")[0][0]
    assert 8 <= killed_at < 40
    resumed = launch("killed", 0.0)
    for proc in (straight, resumed):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "finished" in out, err
    a, meta_a, _ = read_checkpoint(tmp_path / "straight")
    b, meta_b, _ = read_checkpoint(tmp_path / "killed")
    assert meta_a["step"] == meta_b["step"] == 40
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k                                   # weights, EMA, Adam moments, RNG, history
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))


@pytest.mark.cuda
def test_cuda_training_resume_and_load(tmp_path):
    data = _data(labels=True)
    kw = dict(OPTS, cond_drop=0.2)
    full = train(_model(num_classes=3).cuda(), data, steps=8, checkpoint_dir=tmp_path / "a", **kw)
    part = _model(num_classes=3).cuda()
    train(part, data, steps=4, checkpoint_dir=tmp_path / "b", **kw)
    again = train(_model(num_classes=3).cuda(), data, steps=8, checkpoint_dir=tmp_path / "b", **kw)
    # Same device and inputs: the same result (GPU kernels used here are deterministic for these sizes).
    for k, v in full.raw_model.state_dict().items():
        torch.testing.assert_close(v, again.raw_model.state_dict()[k], rtol=1e-5, atol=1e-6)
    loaded = load(tmp_path / "a", device="cuda")
    x = data[0][:8].cuda()
    t = torch.full((8,), 0.5, device="cuda")
    torch.testing.assert_close(loaded(x, t, y=data[1][:8].cuda()), full.model(x, t, y=data[1][:8].cuda()))
