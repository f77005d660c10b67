r"""Checkpoints: safetensors weights plus a JSON config, written atomically, verified by sha256.

A checkpoint at step ``k`` is two files in the checkpoint directory:

- ``step-{k:08d}.safetensors``: every tensor (model, EMA, optimizer state, RNG states, loss history);
- ``step-{k:08d}.json``: everything else (model/SDE spec, training options, optimizer hyper-parameters,
  the sha256 and size of the weights file). The JSON is written last and acts as the commit record.

Each file goes to a temporary name, is flushed and ``fsync``-ed, then ``os.replace``-d into place, and
the directory is ``fsync``-ed, so a crash (even SIGKILL or power loss) leaves either the old or the
new checkpoint, never a half-written one. The newest ``keep`` checkpoints are kept; readers verify
the checksum and fall back, with a warning, to the previous good checkpoint when the newest is corrupt.
No pickle anywhere: the model is rebuilt from an explicit table of known classes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..parameterization import ScoreModel
from ..sdes import SubVPSDE, VESDE, VPSDE

__all__ = ["CheckpointError", "RunDirectory", "write_checkpoint", "read_checkpoint", "list_checkpoints",
           "model_spec", "build_model", "load", "data_fingerprint", "check_net_config", "NET_CLASSES",
           "SDE_CLASSES", "NET_LIMITS"]

FORMAT = "sdegen-checkpoint"
VERSION = 2          # 2: the record carries ``record_sha256`` over its own content (1: weights only)
_READABLE = (1, 2)
_NAME = re.compile(r"^step-(\d{8,})\.json$")
_WEIGHTS = re.compile(r"^step-(\d{8,})\.safetensors$")
_TMP = re.compile(r"^\.step-\d{8,}\.(json|safetensors)\..*\.tmp$")
LOCK_NAME = ".sdegen.lock"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


def _net_classes() -> dict[str, type]:
    from ..nn import MLP, UNet  # nn is a leaf package (torch only)

    return {"MLP": MLP, "UNet": UNet}


#: Known SDE classes and the constructor arguments that rebuild them.
SDE_CLASSES: dict[str, tuple[type, tuple[str, ...]]] = {
    "VPSDE": (VPSDE, ("beta_min", "beta_max", "T")),
    "SubVPSDE": (SubVPSDE, ("beta_min", "beta_max", "T")),
    "VESDE": (VESDE, ("sigma_min", "sigma_max", "T")),
}
NET_CLASSES = ("MLP", "UNet")


# ---------------------------------------------------------------------------------------- specs
def model_spec(model: ScoreModel) -> dict[str, Any]:
    """A JSON description of ``model``: net class and config, SDE class and parameters, parameterization.

    Unknown (user) classes are recorded by name with ``"config": None``; [`load`][sdegen.training.checkpoint.load] then needs the
    object passed explicitly.
    """
    net, sde = model.net, model.sde
    net_name = type(net).__name__
    net_cfg = dict(net.config) if net_name in _net_classes() and type(net) is _net_classes()[net_name] else None
    sde_name = type(sde).__name__
    if sde_name in SDE_CLASSES and type(sde) is SDE_CLASSES[sde_name][0]:
        sde_cfg = {k: float(getattr(sde, k)) for k in SDE_CLASSES[sde_name][1]}
    else:
        sde_cfg = None
    return {"net": {"class": net_name, "config": net_cfg}, "sde": {"class": sde_name, "config": sde_cfg},
            "parameterization": model.parameterization, "sigma_data": model.sigma_data}


#: Largest value of each integer field of a network config that `load` will build. A checkpoint's
#: JSON is data from a file: an edited ``hidden`` or ``depth`` must be refused before anything is
#: allocated (hidden 6000 and depth 24 would allocate 7 GB before the weights are found not to fit).
NET_LIMITS: dict[str, dict[str, int]] = {
    "MLP": {"dim": 1 << 20, "hidden": 1 << 14, "depth": 256, "emb_dim": 1 << 14, "num_classes": 1 << 20},
    "UNet": {"in_channels": 1024, "channels": 4096, "num_res_blocks": 64, "heads": 256, "groups": 4096,
             "emb_dim": 1 << 16, "num_classes": 1 << 20, "out_channels": 1024},
}
_MAX_LEVELS, _MAX_MULT = 8, 64


def check_net_config(name: str, cfg: dict[str, Any]) -> None:
    """Refuse a checkpoint's network config whose sizes exceed `NET_LIMITS` (before anything is built).

    Raises:
        CheckpointError: an integer field is not an int or is out of range, or a field is unknown.
    """
    from .._utils import check_int

    if not isinstance(cfg, dict):
        raise CheckpointError(f"network config of {name} must be a JSON object, got {type(cfg).__name__}")
    limits = NET_LIMITS.get(name, {})
    for key, high in limits.items():
        v = cfg.get(key)
        if v is None and key in ("num_classes", "emb_dim", "out_channels"):
            continue
        try:
            check_int(v, f"{name} config field {key!r}", low=1, high=high)
        except (TypeError, ValueError) as err:
            raise CheckpointError(f"refusing to build the checkpoint's network: {err}") from None
    if name == "UNet":
        mults = cfg.get("channel_mults")
        if not (isinstance(mults, list) and 1 <= len(mults) <= _MAX_LEVELS and all(
                isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= _MAX_MULT for m in mults)):
            raise CheckpointError(f"refusing to build the checkpoint's network: UNet config field 'channel_mults' "
                                  f"must be a list of 1..{_MAX_LEVELS} ints in [1, {_MAX_MULT}], got {mults!r}")


def _meta_shapes(cls: type, cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter and buffer shapes of ``cls(**cfg)``, built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        net = cls(**cfg)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def build_model(spec: dict[str, Any], *, net: nn.Module | None = None, sde=None,
                weights: dict[str, Tensor] | None = None) -> ScoreModel:
    """Rebuild a [`ScoreModel`][sdegen.parameterization.ScoreModel] from `model_spec` output (weights not loaded).

    A network rebuilt from the spec is first checked against
    [`NET_LIMITS`][sdegen.training.checkpoint.NET_LIMITS] and, when ``weights`` (the checkpoint's
    ``model.*`` tensors, prefix removed) are given, built on the meta device and compared with their
    names and shapes, so a config that does not describe the stored weights is refused before any
    memory is allocated.
    """
    try:
        if net is None:
            name, cfg = spec["net"]["class"], spec["net"]["config"]
            classes = _net_classes()
            if name not in classes or cfg is None:
                raise CheckpointError(f"the checkpoint's network class {name!r} is not one sdegen can rebuild "
                                      f"(known: {', '.join(classes)}); pass net=<an instance> to load()")
            check_net_config(name, cfg)
            if weights is not None:
                want = {k[len("net."):]: tuple(v.shape) for k, v in weights.items() if k.startswith("net.")}
                try:
                    got = _meta_shapes(classes[name], cfg)
                except (ValueError, TypeError, RuntimeError) as err:
                    raise CheckpointError(f"the checkpoint's network config {cfg} is invalid: {err}") from err
                if got != want:
                    diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
                    raise CheckpointError(f"the checkpoint's network config {cfg} does not describe its stored "
                                          f"weights (differences at {diff[:5]}): the JSON record was edited or "
                                          f"belongs to other weights")
            net = classes[name](**cfg)
        if sde is None:
            name, cfg = spec["sde"]["class"], spec["sde"]["config"]
            if name not in SDE_CLASSES or cfg is None:
                raise CheckpointError(f"the checkpoint's SDE class {name!r} is not one sdegen can rebuild "
                                      f"(known: {', '.join(SDE_CLASSES)}); pass sde=<an instance> to load()")
            sde = SDE_CLASSES[name][0](**cfg)
        return ScoreModel(net, sde, spec["parameterization"], sigma_data=spec["sigma_data"])
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"malformed model spec in checkpoint: {err!r}") from err


# ---------------------------------------------------------------------------------------- atomic io
def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file, ``fsync`` and ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def list_checkpoints(directory) -> list[tuple[int, Path]]:
    """``(step, json_path)`` of every checkpoint record in ``directory``, newest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, key=lambda e: e[0], reverse=True)


def write_checkpoint(directory, step: int, tensors: dict[str, Tensor], meta: dict[str, Any], *,
                     keep: int = 2) -> Path:
    """Write checkpoint ``step`` atomically and prune all but the newest ``keep``. Returns the JSON path."""
    from safetensors.torch import save

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    blob = save(flat)
    stem = f"step-{step:08d}"
    atomic_write_bytes(d / f"{stem}.safetensors", blob)
    record = dict(meta, format=FORMAT, version=VERSION, step=step, weights=f"{stem}.safetensors",
                  sha256=hashlib.sha256(blob).hexdigest(), size=len(blob))
    record = json.loads(json.dumps(record))          # the JSON form (tuples -> lists) is what gets hashed
    record["record_sha256"] = _record_digest(record)
    atomic_write_bytes(d / f"{stem}.json", json.dumps(record, indent=1, sort_keys=True).encode())
    for old_step, old in list_checkpoints(d)[max(int(keep), 1):]:
        old.unlink(missing_ok=True)           # record first: a weights file without record is ignored
        (d / f"step-{old_step:08d}.safetensors").unlink(missing_ok=True)
    return d / f"{stem}.json"


def _record_digest(record: dict[str, Any]) -> str:
    """sha256 of the record's canonical JSON without its own ``record_sha256`` field.

    This detects an edited or damaged record (a changed parameterization, net or SDE config); like
    the weights checksum it is not a signature: whoever can write the directory can recompute it.
    """
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_one(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load as st_load

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON record ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sdegen checkpoint record (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") not in _READABLE:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this sdegen reads "
                              f"{', '.join(map(str, _READABLE))}")
    if meta.get("version") >= 2 and meta.get("record_sha256") != _record_digest(meta):
        raise CheckpointError(f"{path}: the JSON record does not match its checksum (record_sha256): it was "
                              f"edited or is corrupt")
    wpath = path.parent / str(meta.get("weights", ""))
    if wpath.parent != path.parent or not wpath.is_file():
        raise CheckpointError(f"{path}: weights file {meta.get('weights')!r} is missing")
    blob = wpath.read_bytes()
    if len(blob) != meta.get("size") or hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
        raise CheckpointError(f"{wpath}: checksum mismatch (expected sha256 {meta.get('sha256')}, size "
                              f"{meta.get('size')}; got size {len(blob)}): the file is corrupt or truncated")
    try:
        tensors = st_load(blob)
    except Exception as err:  # safetensors raises its own error type
        raise CheckpointError(f"{wpath}: cannot parse safetensors ({err})") from err
    if meta.get("version") == 1:
        warnings.warn(f"{path}: a version-1 checkpoint record (written before sdegen checksummed its records): "
                      f"an edit of its model or training config cannot be detected", RuntimeWarning, stacklevel=4)
    return tensors, meta


def read_checkpoint(directory) -> tuple[dict[str, Tensor], dict[str, Any], Path] | None:
    """The newest valid checkpoint in ``directory`` as ``(tensors, meta, json_path)``; ``None`` if there is none.

    A corrupt newest checkpoint is skipped with a ``RuntimeWarning`` naming it, and the previous
    one is used.

    Raises:
        CheckpointError: checkpoint records exist but none of them is valid.
    """
    problems = []
    for _, path in list_checkpoints(directory):
        try:
            tensors, meta = _read_one(path)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        for msg in problems:
            warnings.warn(f"skipping a bad checkpoint, falling back to {path.name}: {msg}", RuntimeWarning,
                          stacklevel=3)
        return tensors, meta, path
    if problems:
        raise CheckpointError(f"no valid checkpoint in {directory}: " + "; ".join(problems))
    return None


# ---------------------------------------------------------------------------------------- run directory
def data_fingerprint(x: Tensor, y: Tensor | None = None, *, rows: int = 1024) -> dict[str, Any]:
    """Shape, dtype and a sha256 of up to ``rows`` evenly strided rows of the training data (and labels).

    Stored in every checkpoint so that a resume with other data is refused. Hashing a strided
    subsample keeps the cost bounded for large data sets; a change confined to rows between the
    sampled ones is not detected (the shape and dtype always are).
    """
    n = x.shape[0]
    stride = max(1, -(-n // rows))
    h = hashlib.sha256()
    for part in (x, y):
        if part is None:
            continue
        sub = part[::stride].detach().to("cpu").contiguous().reshape(-1)
        h.update(sub.view(torch.uint8).numpy().tobytes())
    return {"shape": list(x.shape), "dtype": str(x.dtype).replace("torch.", ""),
            "labels": None if y is None else str(y.dtype).replace("torch.", ""), "stride": stride,
            "sha256": h.hexdigest()}


class RunDirectory:
    """Exclusive use of a checkpoint directory by one training run (a context manager).

    On entry: the directory is created (and must be a writable directory), no file of the run
    (checkpoint records, weights, the lock, ``extra`` names) may be a symbolic link, the lock file
    ``.sdegen.lock`` is locked with ``fcntl.flock`` (exclusive, non-blocking) and holds the pid, and
    orphans of interrupted atomic writes (``.step-*.tmp``, weights files without a record) are removed.
    The kernel drops a ``flock`` when its process dies, so a lock left by a killed run is taken over
    without a race; a second live writer is refused with the pid that holds the lock.

    Args:
        path: the checkpoint directory.
        extra: other file names the run writes into the directory (checked for symbolic links).
    """

    def __init__(self, path, extra: tuple[str, ...] = ()):
        self.path = Path(path)
        self.extra = tuple(extra)
        self._fd: int | None = None

    def __enter__(self) -> "RunDirectory":
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"checkpoint_dir must be a directory, got {str(p)!r}, which is a file")
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"checkpoint_dir {str(p)!r} cannot be created: {err.strerror or err}") from None
        self._refuse_symlinks()
        self._lock()
        try:
            self._remove_orphans()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _refuse_symlinks(self) -> None:
        for entry in self.path.iterdir():
            name = entry.name
            ours = (_NAME.match(name) or _WEIGHTS.match(name) or name == LOCK_NAME or name in self.extra)
            if ours and entry.is_symlink():
                raise CheckpointError(f"{entry} is a symbolic link; a run directory must not contain links "
                                      f"(a planted link would make the run write elsewhere). Remove it")

    def _lock(self) -> None:
        lock = self.path / LOCK_NAME
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(lock, flags, 0o644)
        except OSError as err:
            raise ValueError(f"checkpoint_dir {str(self.path)!r} is not writable: {err.strerror or err}") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock (Windows): an O_EXCL marker would be needed
            self._fd = fd
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(f"checkpoint_dir {str(self.path)!r} is in use by another training process "
                                  f"(pid {holder}); wait for it to finish or use another directory") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def _remove_orphans(self) -> None:
        records = {m.group(1) for p in self.path.iterdir() if (m := _NAME.match(p.name))}
        for entry in self.path.iterdir():
            m = _WEIGHTS.match(entry.name)
            # Only under the lock: no other writer can be between its two atomic writes.
            if _TMP.match(entry.name) or (m and m.group(1) not in records):
                entry.unlink(missing_ok=True)

    def close(self) -> None:
        """Release the lock (the lock file stays: removing it would race with a process opening it)."""
        if self._fd is not None:
            try:
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
            except (ImportError, OSError):  # pragma: no cover
                pass
            os.close(self._fd)
            self._fd = None


def prefixed(tensors: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of ``tensors`` under ``prefix + '.'``, with the prefix removed."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def load_state_strict(module: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with a `CheckpointError` naming the mismatch."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
           for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or bad:
        raise CheckpointError(f"{what} does not match the model: missing {missing[:5]}, unexpected "
                              f"{unexpected[:5]}, shape mismatches {bad[:5]}")
    module.load_state_dict(state, strict=True)


def load(checkpoint_dir, *, ema: bool = True, net: nn.Module | None = None, sde=None,
         device: torch.device | str | None = None) -> ScoreModel:
    r"""Rebuild the [`ScoreModel`][sdegen.parameterization.ScoreModel] saved by [`sdegen.train`][sdegen.training.train] from its newest valid checkpoint.

    The network and SDE are rebuilt from the JSON config via an explicit table of known classes
    (``MLP``, ``UNet``; ``VPSDE``, ``SubVPSDE``, ``VESDE``); for other classes pass ``net=`` and/or
    ``sde=``. Weights are verified against the recorded sha256.

    Args:
        checkpoint_dir (str | Path): the directory given to ``train(checkpoint_dir=...)``.
        ema: load the EMA weights when the checkpoint has them (the ones to sample with).
        net (torch.nn.Module | None): a network to use instead of rebuilding it.
        sde (SDE | None): an SDE to use instead of rebuilding it.
        device: where to put the model (default CPU).

    Returns:
        The model in ``eval()`` mode.

    Raises:
        CheckpointError: no checkpoint, no valid checkpoint, unknown classes, or mismatched weights.
    """
    found = read_checkpoint(checkpoint_dir)
    if found is None:
        raise CheckpointError(f"no checkpoint found in {checkpoint_dir}")
    tensors, meta, path = found
    model = build_model(meta["model"], net=net, sde=sde, weights=prefixed(tensors, "model"))
    load_state_strict(model, prefixed(tensors, "model"), f"model weights in {path.name}")
    shadow = prefixed(tensors, "ema")
    if ema and shadow:
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k not in shadow or shadow[k].shape != p.shape:
                    raise CheckpointError(f"EMA weights in {path.name} do not match the model at {k!r}")
                p.copy_(shadow[k])
    return model.to(device or "cpu").eval()
