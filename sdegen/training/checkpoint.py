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

__all__ = ["CheckpointError", "write_checkpoint", "read_checkpoint", "list_checkpoints", "model_spec",
           "build_model", "load", "NET_CLASSES", "SDE_CLASSES"]

FORMAT = "sdegen-checkpoint"
VERSION = 1
_NAME = re.compile(r"^step-(\d{8,})\.json$")


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


def build_model(spec: dict[str, Any], *, net: nn.Module | None = None, sde=None) -> ScoreModel:
    """Rebuild a [`ScoreModel`][sdegen.parameterization.ScoreModel] from `model_spec` output (weights not loaded)."""
    try:
        if net is None:
            name, cfg = spec["net"]["class"], spec["net"]["config"]
            classes = _net_classes()
            if name not in classes or cfg is None:
                raise CheckpointError(f"the checkpoint's network class {name!r} is not one sdegen can rebuild "
                                      f"(known: {', '.join(classes)}); pass net=<an instance> to load()")
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
    atomic_write_bytes(d / f"{stem}.json", json.dumps(record, indent=1, sort_keys=True).encode())
    for old_step, old in list_checkpoints(d)[max(int(keep), 1):]:
        old.unlink(missing_ok=True)           # record first: a weights file without record is ignored
        (d / f"step-{old_step:08d}.safetensors").unlink(missing_ok=True)
    return d / f"{stem}.json"


def _read_one(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    from safetensors.torch import load as st_load

    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable JSON record ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an sdegen checkpoint record (format={meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this sdegen reads {VERSION}")
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
    model = build_model(meta["model"], net=net, sde=sde)
    load_state_strict(model, prefixed(tensors, "model"), f"model weights in {path.name}")
    shadow = prefixed(tensors, "ema")
    if ema and shadow:
        with torch.no_grad():
            for k, p in model.named_parameters():
                if k not in shadow or shadow[k].shape != p.shape:
                    raise CheckpointError(f"EMA weights in {path.name} do not match the model at {k!r}")
                p.copy_(shadow[k])
    return model.to(device or "cpu").eval()
