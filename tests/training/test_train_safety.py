"""Training never loses work or data: checks before step 1, the caller's model restored on failure, no
mixing of runs, one writer per run directory, no writes through links, orphans of killed writes removed.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

import sdegen
from sdegen.nn import MLP
from sdegen.training import CheckpointError, TrainingDivergedError, train
from sdegen.training.checkpoint import list_checkpoints, read_checkpoint

OPTS = dict(batch_size=16, lr=1e-3, progress=False, checkpoint_every=2)


def _data(n=64, seed=1):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def _model():
    torch.manual_seed(0)
    return sdegen.ScoreModel(MLP(2, hidden=8, depth=1), sdegen.VPSDE(), "eps")


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Steps:
    """A callback recording the steps run (a refused call must run none)."""

    def __init__(self):
        self.seen = []

    def __call__(self, step, model):
        self.seen.append(step)


# ------------------------------------------------------------------------------------ checks before step 1
BAD_OPTIONS = [
    (dict(lr=True), TypeError, "lr must be a real number, got True"),
    (dict(lr="1e-3"), TypeError, "lr must be a real number, got '1e-3'"),
    (dict(eps=True), TypeError, "eps must be a real number, got True"),
    (dict(eps=1.0), ValueError, "eps must be a finite number in (0, 1)"),
    (dict(warmup=True), TypeError, "warmup must be an int >= 0, got True"),
    (dict(warmup=2.5), TypeError, "warmup must be an int >= 0, got 2.5"),
    (dict(seed=1.7), TypeError, "seed must be an int in [0, "),
    (dict(seed=-5), ValueError, "seed must be an int in [0, "),
    (dict(seed=2**70), ValueError, "seed must be an int in [0, "),
    (dict(keep=0), ValueError, "keep must be an int >= 1, got 0"),
    (dict(keep="a"), TypeError, "keep must be an int >= 1, got 'a'"),
    (dict(grad_clip=0.0), ValueError, "grad_clip must be a finite positive number, got 0.0"),
    (dict(grad_clip=-1.0), ValueError, "grad_clip must be a finite positive number, got -1.0"),
    (dict(ema=True), TypeError, "ema must be a real number, got True"),
    (dict(ema=1.0), ValueError, "ema must be a finite number in [0, 1)"),
    (dict(batch_size=True), TypeError, "batch_size must be an int >= 1, got True"),
    (dict(weight_decay=-1.0), ValueError, "weight_decay must be a finite non-negative number"),
    (dict(n_levels=1.0), TypeError, "n_levels must be an int >= 2"),
    (dict(cond_drop=True), TypeError, "cond_drop must be a real number"),
    (dict(reduce="max"), ValueError, "reduce must be 'mean' or 'sum'"),
    (dict(resume="yes"), TypeError, "resume must be True or False"),
    (dict(callback=3), TypeError, "callback must be callable"),
    (dict(checkpoint_dir=3), TypeError, "checkpoint_dir must be a path"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_OPTIONS, ids=[next(iter(b)) + "=" + repr(next(iter(b.values())))
                                                            for b, _, _ in BAD_OPTIONS])
def test_bad_option_is_refused_before_step_1(tmp_path, bad, exc, match):
    model, steps = _model(), _Steps()
    before = _weights(model)
    kwargs = dict(OPTS, checkpoint_dir=tmp_path / "run", callback=steps)
    kwargs.update(bad)
    with pytest.raises(exc) as info:
        train(model, _data(), steps=4, **kwargs)
    assert match in str(info.value)
    assert steps.seen == [] and not (tmp_path / "run").exists()
    assert _same(before, _weights(model))


def test_nan_data_is_refused_before_step_1_and_the_model_is_untouched(tmp_path):
    data = _data()
    data[17, 1] = float("nan")
    data[40, 0] = float("inf")
    model, steps = _model(), _Steps()
    before = _weights(model)
    with pytest.raises(ValueError, match=r"data must be finite: 2 of 64 rows hold NaN or inf \(first: row 17\)"):
        train(model, data, steps=4, checkpoint_dir=tmp_path / "run", callback=steps, **OPTS)
    assert steps.seen == [] and not (tmp_path / "run").exists()
    assert _same(before, _weights(model))


def test_unusable_checkpoint_dir_is_refused_before_step_1(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("mine")
    steps = _Steps()
    with pytest.raises(ValueError, match="checkpoint_dir must be a directory.*which is a file"):
        train(_model(), _data(), steps=4, checkpoint_dir=a_file, callback=steps, **OPTS)
    # /proc refuses new entries even for root (a read-only place on every Linux)
    with pytest.raises(ValueError, match="checkpoint_dir '/proc/sdegen-run' cannot be created"):
        train(_model(), _data(), steps=4, checkpoint_dir="/proc/sdegen-run", callback=steps, **OPTS)
    with pytest.raises(ValueError, match="cannot be created"):
        train(_model(), _data(), steps=4, checkpoint_dir=a_file / "sub", callback=steps, **OPTS)
    assert steps.seen == [] and a_file.read_text() == "mine"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories (covered by /proc above)")
def test_read_only_checkpoint_dir_is_refused_before_step_1(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    steps = _Steps()
    try:
        with pytest.raises(ValueError, match="is not writable"):
            train(_model(), _data(), steps=4, checkpoint_dir=ro, callback=steps, **OPTS)
    finally:
        ro.chmod(0o700)
    assert steps.seen == []


# ------------------------------------------------------------------------------------ the caller's model
def test_failure_during_training_restores_the_callers_model(tmp_path):
    model = _model()
    model.eval()
    before = _weights(model)

    def boom(step, m):
        if step == 3:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        train(model, _data(), steps=6, callback=boom, **OPTS)
    assert _same(before, _weights(model)) and not model.training

    def nan_loss(m, x0, generator, model_kwargs):
        return sdegen.dsm_loss(m, x0, generator=generator) * float("nan")

    with pytest.raises(TrainingDivergedError):
        train(model, _data(), steps=6, loss=nan_loss, log_every=1, **OPTS)
    assert _same(before, _weights(model))
    out = train(model, _data(), steps=2, **OPTS)             # a successful call still trains in place
    assert out.raw_model is model and not _same(before, _weights(model))


# ------------------------------------------------------------------------------------ no mixing of runs
def test_resume_with_other_data_or_options_is_refused(tmp_path):
    run = tmp_path / "run"
    train(_model(), _data(), steps=4, checkpoint_dir=run, **OPTS)
    model = _model()
    before = _weights(model)
    with pytest.raises(CheckpointError, match=r"other training data.*'sha256'"):
        train(model, _data(seed=2), steps=8, checkpoint_dir=run, **OPTS)      # same shape, other values
    with pytest.raises(CheckpointError, match=r"other training data.*'shape': \(\[64, 2\], \[65, 2\]\)"):
        train(model, _data(n=65), steps=8, checkpoint_dir=run, **OPTS)
    with pytest.raises(CheckpointError, match=r"other training options.*'lr': \(0.001, 0.002\)"):
        train(model, _data(), steps=8, checkpoint_dir=run, **dict(OPTS, lr=2e-3))
    assert _same(before, _weights(model))
    assert list_checkpoints(run)[0][0] == 4
    out = train(model, _data(), steps=8, checkpoint_dir=run, **OPTS)          # the same data resumes
    assert out.resumed_from == 4 and out.step == 8


def test_resume_false_over_a_run_is_refused_unless_overwrite(tmp_path):
    run = tmp_path / "run"
    train(_model(), _data(), steps=6, checkpoint_dir=run, **OPTS)
    with pytest.raises(CheckpointError, match="already holds a run .newest step 6.*overwrite=True"):
        train(_model(), _data(seed=2), steps=4, checkpoint_dir=run, resume=False, **OPTS)
    assert [s for s, _ in list_checkpoints(run)] == [6, 4]
    out = train(_model(), _data(seed=2), steps=4, checkpoint_dir=run, resume=False, overwrite=True, **OPTS)
    assert out.resumed_from is None and [s for s, _ in list_checkpoints(run)] == [4, 2]
    fresh = train(_model(), _data(seed=2), steps=4, checkpoint_dir=tmp_path / "fresh", **OPTS)
    a, b = read_checkpoint(run)[0], read_checkpoint(tmp_path / "fresh")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)    # nothing of the old run left
    assert fresh.step == 4


def test_log_file_never_overwrites_another_file(tmp_path):
    other = tmp_path / "notes.jsonl"
    other.write_text("my notes\nline two\n")
    steps = _Steps()
    with pytest.raises(ValueError, match="is not an sdegen training log; refusing to overwrite"):
        train(_model(), _data(), steps=4, log_file=other, callback=steps, **OPTS)
    assert other.read_text() == "my notes\nline two\n" and steps.seen == []
    csv_other = tmp_path / "table.csv"
    csv_other.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not an sdegen training log"):
        train(_model(), _data(), steps=4, log_file=csv_other, **OPTS)
    assert csv_other.read_text() == "a,b\n1,2\n"
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    link = tmp_path / "log.jsonl"
    link.symlink_to(victim)
    with pytest.raises(ValueError, match="is a symbolic link"):
        train(_model(), _data(), steps=4, log_file=link, **OPTS)
    assert victim.read_text() == "keep"
    log = tmp_path / "train.jsonl"                      # an sdegen log is rewritten by the next run
    train(_model(), _data(), steps=4, log_file=log, log_every=1, **OPTS)
    train(_model(), _data(), steps=3, log_file=log, log_every=1, **OPTS)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]


# ------------------------------------------------------------------------------------ one writer
def _hold_lock(directory, conn):
    from sdegen.training.checkpoint import RunDirectory

    with RunDirectory(directory):
        conn.send("locked")
        conn.recv()                    # until killed


def test_a_second_writer_is_refused_and_a_dead_writers_lock_is_taken_over(tmp_path):
    import multiprocessing as mp

    run = tmp_path / "run"
    ctx = mp.get_context("fork")       # a real second process, without importing torch again
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_hold_lock, args=(str(run), child))
    proc.start()
    try:
        assert parent.poll(60) and parent.recv() == "locked"
        model, steps = _model(), _Steps()
        before = _weights(model)
        with pytest.raises(CheckpointError, match=rf"in use by another training process \(pid {proc.pid}\)"):
            train(model, _data(), steps=4, checkpoint_dir=run, callback=steps, **OPTS)
        assert steps.seen == [] and _same(before, _weights(model)) and not list_checkpoints(run)
    finally:
        os.kill(proc.pid, signal.SIGKILL)   # dies holding the lock: the lock file stays, with its pid
        proc.join(30)
    assert (run / ".sdegen.lock").read_text().strip() == str(proc.pid)
    out = train(_model(), _data(), steps=4, checkpoint_dir=run, **OPTS)
    assert out.step == 4 and (run / ".sdegen.lock").read_text().strip() == str(os.getpid())


def test_the_same_process_cannot_train_twice_into_one_directory(tmp_path):
    run = tmp_path / "run"

    def nested(step, model):
        if step == 1:
            train(_model(), _data(), steps=2, checkpoint_dir=run, **OPTS)

    with pytest.raises(CheckpointError, match="in use by another training process"):
        train(_model(), _data(), steps=2, checkpoint_dir=run, callback=nested, **OPTS)
    train(_model(), _data(), steps=2, checkpoint_dir=run, **OPTS)              # released after the failure


# ------------------------------------------------------------------------------------ links and orphans
def test_a_planted_link_in_the_run_directory_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (run / "step-00000002.json").symlink_to(victim)
    steps = _Steps()
    with pytest.raises(CheckpointError, match="is a symbolic link"):
        train(_model(), _data(), steps=4, checkpoint_dir=run, callback=steps, **OPTS)
    assert victim.read_text() == "precious" and steps.seen == []


def test_orphans_of_interrupted_writes_are_removed_at_the_start(tmp_path):
    run = tmp_path / "run"
    train(_model(), _data(), steps=2, checkpoint_dir=run, **OPTS)
    orphans = [run / ".step-00000004.safetensors.k2j3h4.tmp", run / ".step-00000004.json.x9.tmp",
               run / "step-00000004.safetensors"]           # weights whose record was never committed
    for p in orphans:
        p.write_bytes(b"\0" * 1000)
    (run / "notes.txt").write_text("not ours")
    out = train(_model(), _data(), steps=4, checkpoint_dir=run, **OPTS)
    assert out.resumed_from == 2
    assert not any(p.exists() for p in orphans[:2])
    assert (run / "notes.txt").read_text() == "not ours"
    assert sorted(p.name for p in run.iterdir() if p.name.endswith(".tmp")) == []
    assert read_checkpoint(run)[1]["step"] == 4


def _train_and_wait(directory, conn):
    """Train in a forked process, pausing after step 1 until the parent says go."""
    def pause(step, model):
        if step == 1:
            conn.send("training")
            conn.recv()

    try:
        out = train(_model(), _data(), steps=4, checkpoint_dir=directory, callback=pause, **OPTS)
        conn.send(("done", out.step))
    except BaseException as err:           # reported to the parent, which asserts on it
        conn.send(("error", repr(err)))


def test_two_processes_training_into_one_directory_one_is_refused(tmp_path):
    import multiprocessing as mp

    run = tmp_path / "run"
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_train_and_wait, args=(str(run), child))
    proc.start()
    try:
        assert parent.poll(120) and parent.recv() == "training"
        with pytest.raises(CheckpointError, match=rf"in use by another training process \(pid {proc.pid}\)"):
            train(_model(), _data(seed=5), steps=4, checkpoint_dir=run, **OPTS)
        parent.send("go")
        assert parent.poll(120) and parent.recv() == ("done", 4)
    finally:
        proc.join(60)
    # The directory holds the first run alone: equal to the same run made in another directory.
    train(_model(), _data(), steps=4, checkpoint_dir=tmp_path / "alone", **OPTS)
    a, b = read_checkpoint(run)[0], read_checkpoint(tmp_path / "alone")[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
