"""No data lost, nothing executed: SIGKILL at chosen points of checkpoint writes, corrupt files, pickles.

Kill points are injected in the training subprocess we launch, without touching sdegen: the
script wraps ``os.fsync``, ``os.replace`` or ``os.unlink`` (what an atomic write and the pruning of old
checkpoints go through) and SIGKILLs itself on the n-th call, *before* the call happens; or it
SIGKILLs itself from ``train``'s public ``callback`` after a chosen step. Every kill must leave a
directory from which training resumes to weights (and Adam state, EMA, RNG, loss history) bitwise
equal to an uninterrupted run.

Per checkpoint, an atomic write of the weights and then of the JSON record each do: write a
temporary file, ``fsync`` it, ``os.replace`` it into place, ``fsync`` the directory (2 replaces and
4 fsyncs); from the third checkpoint on (``keep=2``) the oldest record, then its weights, are unlinked.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import sdegen
from sdegen.training import CheckpointError
from sdegen.training.checkpoint import list_checkpoints, read_checkpoint

REPO = Path(__file__).resolve().parents[2]
STEPS, EVERY = 12, 3

SCRIPT = r'''
import os, signal, sys
import torch
torch.set_num_threads(1)
import sdegen

kind, _, n = os.environ.get("KILL_AT", "").partition(":")
n = int(n or 0)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if kind in ("fsync", "replace", "unlink"):
    original, calls = getattr(os, kind), [0]
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            die()
        return original(*args, **kwargs)
    setattr(os, kind, wrapped)

def callback(step, model):
    if kind == "step" and step == n:
        die()

torch.manual_seed(0)
model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=16, depth=1), sdegen.VPSDE())
data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
out = sdegen.train(model, data, steps=int(sys.argv[2]), batch_size=32, lr=1e-3, checkpoint_dir=sys.argv[1],
                   checkpoint_every=int(sys.argv[3]), keep=2, progress=False, seed=0, callback=callback)
print("finished", out.step)
'''


def _launch(tmp_path: Path, directory: Path, kill_at: str = "") -> subprocess.Popen:
    script = tmp_path / "train_script.py"
    if not script.exists():
        script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(REPO), KILL_AT=kill_at, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, str(script), str(directory), str(STEPS), str(EVERY)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, *, killed: bool) -> None:
    out, err = proc.communicate(timeout=300)
    if killed:
        assert proc.returncode == -signal.SIGKILL, (proc.returncode, out, err)
    else:
        assert proc.returncode == 0 and f"finished {STEPS}" in out, (out, err)


def _state(directory: Path) -> tuple[dict, dict]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # a kill must never leave a corrupt checkpoint behind
        found = read_checkpoint(directory)
    assert found is not None
    tensors, meta, _ = found
    return tensors, meta


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _kill_chain(tmp_path: Path, points: list[str], expect_orphans: list[str] = ()) -> int:
    """Run the points one after another on one directory, then resume to the end; compare to a clean run.

    ``expect_orphans``: prefixes of temporary files the kills must have left (the resumed run removes them).
    """
    victim_dir = tmp_path / "victim"
    for point in points:
        _finish(_launch(tmp_path, victim_dir, point), killed=True)
        # after every kill, what is on disk is either nothing yet or a valid checkpoint
        if list_checkpoints(victim_dir):
            _state(victim_dir)
    orphans = sorted(p.name for p in victim_dir.glob(".*.tmp")) if victim_dir.exists() else []
    for prefix in expect_orphans:
        assert any(name.startswith(prefix + ".") for name in orphans), (prefix, orphans)
    _finish(_launch(tmp_path, victim_dir), killed=False)
    assert not list(victim_dir.glob(".*.tmp")), f"orphaned temporary files left: {orphans}"
    threads = torch.get_num_threads()
    try:   # the uninterrupted run, here (bitwise equal across processes: test_reproducibility.py)
        torch.set_num_threads(1)
        _train_in_process(tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    (a, meta_a), (b, meta_b) = _state(tmp_path / "reference"), _state(victim_dir)
    assert meta_a["step"] == meta_b["step"] == STEPS
    _assert_same(a, b)                  # weights, EMA, Adam moments, RNG states, loss history
    return len(points)


def test_sigkill_inside_a_checkpoint_write_loses_nothing(tmp_path):
    # replace 4 is the JSON commit of checkpoint 2 (step 6): the kill leaves its weights file in
    # place without a record, plus a temporary JSON file; the step-3 checkpoint must be used, and
    # the next run removes both orphans (_kill_chain checks that no .tmp file is left).
    assert _kill_chain(tmp_path, ["replace:4"], expect_orphans=[".step-00000006.json"]) == 1


@pytest.mark.slow
def test_chained_sigkills_lose_nothing(tmp_path):
    # fsync 5: checkpoint 2's weights temp file written, not renamed. Then, in the run resumed from
    # step 3, replace 2 is the JSON commit of its first checkpoint; then a kill during pruning.
    assert _kill_chain(tmp_path, ["fsync:5", "replace:2", "unlink:2"]) == 3


KILL_POINTS = [
    "step:2",        # before any checkpoint
    "step:4",        # just after the first checkpoint
    "fsync:1",       # first checkpoint: weights temp file written, not yet synced
    "replace:1",     # first checkpoint: weights synced, not renamed
    "fsync:3",       # first checkpoint: weights in place, JSON temp not synced
    "replace:2",     # first checkpoint: JSON synced, not committed
    "fsync:4",       # first checkpoint committed, directory not yet synced
    "replace:4",     # second checkpoint: JSON not committed
    "unlink:1",      # third checkpoint committed; pruning the oldest record not started
    "unlink:2",      # oldest record removed, its weights file not yet (an orphan)
    "step:11",       # one step before the end
]


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_each_point_loses_nothing(tmp_path, point):
    _kill_chain(tmp_path, [point])


# ---------------------------------------------------------------------------------------------- corruption
def _train_in_process(directory: Path, steps: int = STEPS):
    torch.manual_seed(0)
    model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=16, depth=1), sdegen.VPSDE())
    data = torch.randn(256, 2, generator=torch.Generator().manual_seed(0))
    return sdegen.train(model, data, steps=steps, batch_size=32, lr=1e-3, checkpoint_dir=directory,
                        checkpoint_every=EVERY, keep=2, progress=False, seed=0)


@pytest.mark.parametrize("damage", ["truncate", "garbage_json",
                                    pytest.param("flip_byte", marks=pytest.mark.slow),
                                    pytest.param("delete_weights", marks=pytest.mark.slow)])
def test_corrupt_newest_checkpoint_falls_back_and_resumes_without_loss(tmp_path, damage):
    ref_dir, dmg_dir = tmp_path / "ref", tmp_path / "damaged"
    _train_in_process(ref_dir)
    _train_in_process(dmg_dir, steps=9)             # checkpoints at steps 6 and 9
    step, record = list_checkpoints(dmg_dir)[0]
    assert step == 9
    weights = dmg_dir / json.loads(record.read_text())["weights"]
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif damage == "flip_byte":
        blob = bytearray(weights.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        weights.write_bytes(bytes(blob))
    elif damage == "delete_weights":
        weights.unlink()
    else:
        record.write_text('{"format": "sdegen-checkpoint", "version": 1, "step": 9, "weights": 5')
    with pytest.warns(RuntimeWarning, match="step-00000009"):
        out = _train_in_process(dmg_dir)
    assert out.resumed_from == 6
    _assert_same(_state(ref_dir)[0], _state(dmg_dir)[0])


def test_every_checkpoint_corrupt_is_an_error_not_a_fresh_start(tmp_path):
    _train_in_process(tmp_path, steps=6)
    for _, record in list_checkpoints(tmp_path):
        w = tmp_path / json.loads(record.read_text())["weights"]
        w.write_bytes(w.read_bytes()[:100])
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match="checksum"):
        _train_in_process(tmp_path)
    with pytest.raises(CheckpointError):
        sdegen.load(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before     # nothing overwritten


# ---------------------------------------------------------------------------------------------- security
class _Payload:
    """Unpickling this calls ``Path(marker).touch()``: the marker file shows that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _plant(directory: Path, marker: Path) -> None:
    """Malicious files: raw pickles, a torch.save archive, and a valid-looking record pointing at one."""
    payload = pickle.dumps(_Payload(marker))
    for name in ("model.pt", "model.pkl", "checkpoint.pth", "step-00000099.pt", "step-00000099.safetensors"):
        (directory / name).write_bytes(payload)
    torch.save({"evil": _Payload(marker)}, directory / "torch_archive.pt")
    record = {"format": "sdegen-checkpoint", "version": 1, "step": 99, "weights": "step-00000099.safetensors",
              "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload)}
    good = list_checkpoints(directory)
    if good:   # reuse the genuine model/train configuration so only the weights are malicious
        meta = json.loads(good[0][1].read_text())
        record = dict(meta, **record)
    (directory / "step-00000099.json").write_text(json.dumps(record))
    # a record escaping the directory must not be followed either
    (directory / "step-00000098.json").write_text(json.dumps(dict(record, step=98, weights="../model.pkl")))
    assert not marker.exists()


def test_malicious_pickle_in_checkpoint_dir_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    _train_in_process(ckpt, steps=6)
    (tmp_path / "model.pkl").write_bytes(pickle.dumps(_Payload(marker)))
    _plant(ckpt, marker)
    with pytest.warns(RuntimeWarning, match="step-00000099"):
        model = sdegen.load(ckpt)            # falls back to the genuine step-6 checkpoint
    assert isinstance(model, sdegen.ScoreModel)
    with pytest.warns(RuntimeWarning):
        out = _train_in_process(ckpt, steps=9)
    assert out.resumed_from == 6
    assert not marker.exists()


def test_directory_with_only_malicious_files_is_refused(tmp_path):
    marker = tmp_path / "PWNED"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    _plant(ckpt, marker)
    with pytest.raises(CheckpointError):
        sdegen.load(ckpt)
    from sdegen.cli import main

    assert main(["sample", "--checkpoint", str(ckpt), "--n", "4", "--method", "ode_euler", "--steps", "2",
                 "--quiet", "--out", str(tmp_path / "s.npz")]) != 0
    assert not marker.exists()


def _calls(tree: ast.AST):
    """``(node, owner, name)`` per call: ``owner`` is the module/object name for ``owner.name(...)``,
    ``None`` for a bare ``name(...)`` and ``""`` for a method on an expression."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name):
                yield node, None, f.id
            elif isinstance(f, ast.Attribute):
                yield node, f.value.id if isinstance(f.value, ast.Name) else "", f.attr


def test_library_never_unpickles_or_evaluates():
    # Static scan of every module: torch.load only with weights_only=True; no pickle/marshal loads,
    # no eval/exec, no numpy allow_pickle=True, no yaml.load.
    problems = []
    for path in sorted((REPO / "sdegen").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node, owner, name in _calls(tree):
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            kw = {k.arg: k.value for k in node.keywords}
            if owner == "torch" and name == "load":
                wo = kw.get("weights_only")
                if not (isinstance(wo, ast.Constant) and wo.value is True):
                    problems.append(f"{where}: torch.load without weights_only=True")
            if owner in ("pickle", "marshal", "dill", "cloudpickle", "shelve") and name in ("load", "loads", "open"):
                problems.append(f"{where}: {owner}.{name}")
            if (owner is None or owner == "builtins") and name in ("eval", "exec", "__import__"):
                problems.append(f"{where}: {name}()")
            if owner == "yaml" and name in ("load", "unsafe_load"):
                problems.append(f"{where}: yaml.{name}")
            ap = kw.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                problems.append(f"{where}: allow_pickle=True")
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------- the JSON record
def _one_checkpoint(directory: Path) -> Path:
    torch.manual_seed(0)
    model = sdegen.ScoreModel(sdegen.nn.MLP(2, hidden=16, depth=1), sdegen.VPSDE(), "eps")
    data = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    sdegen.train(model, data, steps=2, batch_size=16, checkpoint_dir=directory, keep=1, progress=False)
    return list_checkpoints(directory)[0][1]


def _edit(record: Path, rehash: bool, **changes) -> None:
    """Edit the record's model spec; with ``rehash`` also recompute its checksum (a deliberate forgery)."""
    from sdegen.training.checkpoint import _record_digest

    meta = json.loads(record.read_text())
    for key, value in changes.items():
        if key == "parameterization":
            meta["model"]["parameterization"] = value
        else:
            meta["model"]["net"]["config"][key] = value
    if rehash:
        meta["record_sha256"] = _record_digest(meta)
    record.write_text(json.dumps(meta))


def test_an_edited_record_is_refused_by_its_checksum(tmp_path):
    record = _one_checkpoint(tmp_path)
    assert sdegen.load(tmp_path).parameterization == "eps"
    _edit(record, rehash=False, parameterization="x0")      # loaded silently before the record had a checksum
    with pytest.raises(CheckpointError, match="JSON record does not match its checksum"):
        sdegen.load(tmp_path)


def test_a_net_config_that_does_not_describe_the_weights_is_refused_before_building(tmp_path, monkeypatch):
    record = _one_checkpoint(tmp_path)
    built = []
    original = sdegen.nn.MLP.__init__

    def counting_init(self, *args, **kwargs):
        built.append(torch.get_default_device().type)
        original(self, *args, **kwargs)

    monkeypatch.setattr(sdegen.nn.MLP, "__init__", counting_init)
    # Checksum recomputed: only the comparison with the stored weights can catch it (7 GB before the fix).
    _edit(record, rehash=True, hidden=6000, depth=24)
    with pytest.raises(CheckpointError, match="does not describe its stored weights"):
        sdegen.load(tmp_path)
    assert built == ["meta"]                         # shapes from a meta-device build only: nothing allocated
    built.clear()
    _edit(record, rehash=True, hidden=10**6)           # over the bound: refused before even a meta build
    with pytest.raises(CheckpointError, match=r"'hidden' must be an int in \[1, 16384\], got 1000000"):
        sdegen.load(tmp_path)
    _edit(record, rehash=True, hidden=16, depth=True)
    with pytest.raises(CheckpointError, match=r"'depth' must be an int in \[1, 256\], got True"):
        sdegen.load(tmp_path)
    assert built == []


def test_a_record_downgraded_to_version_1_loads_only_with_a_warning(tmp_path):
    record = _one_checkpoint(tmp_path)
    meta = json.loads(record.read_text())
    meta["version"] = 1
    del meta["record_sha256"]
    meta["model"]["parameterization"] = "x0"        # an edit that version 1 cannot detect
    record.write_text(json.dumps(meta))
    with pytest.warns(RuntimeWarning, match="version-1 checkpoint record.*cannot be detected"):
        assert sdegen.load(tmp_path).parameterization == "x0"
