r"""``train``: a resumable training loop for [`ScoreModel`][sdegen.parameterization.ScoreModel] (Adam/AdamW, clipping, warm-up, EMA).

Determinism and exact resume: every random draw comes from two generators owned by the loop (batch
indices on the CPU, noise and times on the model's device) plus the global RNG, which the loop forks
and seeds (so dropout is reproducible and the caller's global state is untouched). All three states,
the optimizer state, the EMA and the loss history go into each checkpoint, so a run interrupted at any
point and restarted with the same arguments reproduces the uninterrupted run bit for bit (CPU).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from .._utils import check_bool, check_int, check_number, check_positive, check_seed
from ..parameterization import ScoreModel
from .checkpoint import (CheckpointError, RunDirectory, atomic_write_bytes, data_fingerprint, list_checkpoints,
                         load_state_strict, model_spec, prefixed, read_checkpoint, write_checkpoint)
from .ema import EMA
from .losses import WEIGHTINGS, ddpm_loss, dsm_loss, smld_loss

__all__ = ["train", "TrainResult", "Trainer", "TrainingDivergedError", "LOSSES", "OPTIMIZERS"]

LOSSES = ("dsm", "smld", "ddpm")
OPTIMIZERS = ("adam", "adamw")
# Options that change the trajectory: a resumed run must use the same values.
_TRAJECTORY_KEYS = ("batch_size", "lr", "optimizer", "weight_decay", "grad_clip", "warmup", "seed", "ema",
                    "loss", "weighting", "eps", "n_levels", "n_steps", "cond_drop", "reduce")


class TrainingDivergedError(FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept on disk."""


@dataclass
class TrainResult:
    """What [`train`][sdegen.training.trainer.train] returns.

    Attributes:
        model: the model to sample with: a copy holding the EMA weights when EMA is on, else ``raw_model``.
        raw_model: the trained model itself (its current, non-averaged weights).
        history: loss per step, from step 1 (restored from the checkpoint on resume).
        step: steps done.
        checkpoint: path of the last checkpoint record written or resumed from (``None`` without a directory).
        resumed_from: the step resumed from, or ``None``.
        wall_time: seconds spent in this call.
    """

    model: ScoreModel
    raw_model: ScoreModel
    history: list[float]
    step: int
    checkpoint: Path | None = None
    resumed_from: int | None = None
    wall_time: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)


def _split_data(data) -> tuple[Tensor, Tensor | None]:
    if isinstance(data, Tensor):
        x, y = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(d, Tensor) for d in data):
        x, y = data
    else:
        raise TypeError(f"data must be a tensor (N, *D) or a pair (x, y) of tensors, got {type(data).__name__}")
    if not x.is_floating_point() or x.ndim < 2 or x.shape[0] < 1:
        raise ValueError(f"data must be a floating tensor of shape (N, *D) with N >= 1, got "
                         f"{x.dtype} {tuple(x.shape)}")
    if y is not None and (y.shape != (x.shape[0],) or y.is_floating_point() or y.is_complex()
                          or y.dtype == torch.bool):
        raise ValueError(f"labels must be an integer tensor of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}")
    # One read of the data before any step (NaN would poison the weights), in chunks of about 16 M
    # values so that the boolean mask never costs a copy of a large data set.
    rows = max(1, (1 << 24) // max(1, x[0].numel()))
    n_bad, first = 0, None
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows]
        bad = ~torch.isfinite(chunk).reshape(chunk.shape[0], -1).all(dim=1)
        k = int(bad.sum())
        if k:
            n_bad += k
            first = start + int(bad.nonzero()[0, 0]) if first is None else first
    if n_bad:
        raise ValueError(f"data must be finite: {n_bad} of {x.shape[0]} rows hold NaN or inf (first: row {first})")
    return x, y


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, other = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                other[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": other}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, v in prefixed(tensors, "optim").items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    for key, v in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"optimizer state does not match the model: {err}") from err


def _rng_tensor(state: Tensor) -> Tensor:
    return state.detach().to("cpu").clone()


def _parse_log(path: Path) -> list[tuple[int, str]] | None:
    """``(step, line)`` of every row of an sdegen training log, or ``None`` if ``path`` is not one.

    A last line cut by a crash is dropped; any other line that does not parse means the file is
    something else, which must not be overwritten.
    """
    is_csv = path.suffix == ".csv"
    lines = path.read_text(errors="replace").splitlines()
    if not lines:
        return []
    if is_csv:
        if lines[0].strip() != "step,loss,lr":
            return None
        lines = lines[1:]
    rows = []
    for k, line in enumerate(lines):
        try:
            step = int(line.split(",")[0]) if is_csv else int(json.loads(line)["step"])
        except (ValueError, KeyError, IndexError, TypeError):
            if k == len(lines) - 1:
                continue            # the last line, cut by a crash
            return None
        rows.append((step, line))
    return rows


def _check_log_file(log_file) -> Path | None:
    """Validate ``log_file`` before training: not a directory or link, and not a file of another kind."""
    if log_file is None:
        return None
    if not isinstance(log_file, (str, os.PathLike)):
        raise TypeError(f"log_file must be a path or None, got {type(log_file).__name__}")
    path = Path(log_file)
    if path.is_symlink():
        raise ValueError(f"log_file {str(path)!r} is a symbolic link; give the real path")
    if path.exists():
        if not path.is_file():
            raise ValueError(f"log_file {str(path)!r} exists and is not a regular file")
        if _parse_log(path) is None:
            raise ValueError(f"log_file {str(path)!r} exists and is not an sdegen training log; refusing to "
                             f"overwrite it (choose another path or remove the file)")
    return path


class _Log:
    """Append-only JSONL (or CSV, by suffix) log of ``step, loss, lr``; truncated to the resume step.

    The path was checked by ``_check_log_file``: it is absent or an sdegen log, never a link.
    """

    def __init__(self, path: Path | None, start_step: int):
        self.path = path
        if self.path is None:
            return
        self.csv = self.path.suffix == ".csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if self.path.exists() and start_step > 0:
            kept = [line for step, line in (_parse_log(self.path) or []) if step <= start_step]
        head = ["step,loss,lr"] if self.csv else []
        atomic_write_bytes(self.path, ("\n".join(head + kept) + ("\n" if head or kept else "")).encode())

    def write(self, rows: list[tuple[int, float, float]]) -> None:
        if self.path is None or not rows:
            return
        buf = io.StringIO()
        if self.csv:
            csv.writer(buf, lineterminator="\n").writerows(rows)
        else:
            for s, loss, lr in rows:
                buf.write(json.dumps({"step": s, "loss": loss, "lr": lr}) + "\n")
        # O_NOFOLLOW: a link planted after the start is not followed.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        with os.fdopen(fd, "a") as f:
            f.write(buf.getvalue())


def train(model: ScoreModel, data, *, steps: int, batch_size: int = 128, lr: float = 2e-4,
          ema: float | None = 0.999, checkpoint_dir=None, checkpoint_every: int = 1000, keep: int = 2,
          optimizer: str = "adam", weight_decay: float = 0.0, grad_clip: float | None = 1.0, warmup: int = 0,
          seed: int = 0, loss: str | Callable = "dsm", weighting: str = "standard", eps: float = 1e-5,
          reduce: str = "mean", n_levels: int = 10, n_steps: int = 1000, cond_drop: float = 0.0,
          progress: bool = True, log_file=None, log_every: int = 10, resume: bool = True,
          overwrite: bool = False, callback: Callable[[int, ScoreModel], None] | None = None) -> TrainResult:
    r"""Train ``model`` on ``data`` by denoising score matching; resumable from ``checkpoint_dir``.

    Each step draws ``batch_size`` rows of ``data`` uniformly with replacement, evaluates the loss
    (``"dsm"``: [`dsm_loss`][sdegen.training.dsm_loss] with ``weighting``; ``"smld"``: `smld_loss`;
    ``"ddpm"``: DDPM's ε objective on ``sde.discretize(n_steps)``; or a callable
    ``loss(model, x0, generator=..., model_kwargs=...) -> scalar``), clips the gradient norm, takes an
    Adam/AdamW step with learning rate $\text{lr}\cdot\min(1, k/\text{warmup})$ at step $k$, and
    updates the EMA.

    Every argument, the data (finite, shape, dtype) and the checkpoint directory (a writable
    directory, free of symbolic links, not in use by another process) are checked before step 1.
    While training, the directory is locked against a second writer; temporary files left by an
    interrupted write are removed at the start.

    With ``checkpoint_dir``, a checkpoint is written atomically every ``checkpoint_every`` steps and at
    the end; if the directory already holds one (and ``resume``), training continues from it up to
    ``steps`` in total, after checking that model and options match. Calling again with the same
    arguments after any interruption gives the same final weights as an uninterrupted run (CPU).

    Args:
        model: a [`ScoreModel`][sdegen.parameterization.ScoreModel]; trained in place.
        data (Tensor | tuple[Tensor, Tensor]): ``(N, *D)`` tensor, or ``(x, y)`` with integer labels ``y`` ``(N,)`` passed as ``y=``.
        steps: total number of optimisation steps.
        batch_size (int): batch size.
        lr (float): peak learning rate.
        ema: EMA decay, or ``None`` for no EMA.
        checkpoint_dir (str | Path | None): where checkpoints are written (``None``: none).
        checkpoint_every (int): steps between checkpoints.
        keep (int): how many checkpoints to keep (>= 2
            keeps a previous good one).
        optimizer: ``"adam"`` or ``"adamw"`` (with ``weight_decay``).
        grad_clip: max global gradient norm, or ``None``.
        warmup: linear learning-rate warm-up steps.
        seed: seed of every random draw of the loop.
        loss (str): the loss (see above).
        weighting (str): its weighting (see above).
        eps (float): smallest training time (see above).
        reduce (str): how per-sample losses are reduced (see above).
        n_levels (int | None): number of noise levels of the SMLD loss (see above).
        n_steps (int | None): number of steps of the DDPM loss (see above).
        cond_drop: probability of replacing a label with the net's ``null_label`` (classifier-free
            guidance training, Ho & Salimans 2022).
        progress: show a tqdm bar with the running loss.
        log_file (str | Path | None): JSONL (or ``.csv``) log of step, loss and learning rate.
        log_every: steps between reads of the loss (each read synchronises with the device).
        resume: continue from an existing checkpoint in ``checkpoint_dir``. The checkpoint must have
            been written for the same model, options and data (shape, dtype and a hash of a strided
            subsample of the rows): anything else is refused. With ``resume=False`` a directory that
            already holds checkpoints is refused unless ``overwrite=True``.
        overwrite: delete the checkpoints already in ``checkpoint_dir`` (after every check passed)
            and start from step 0, whatever ``resume`` says.
        callback: ``callback(step, model)`` after each step (e.g. for tests or custom logging).

    Returns:
        [`TrainResult`][sdegen.training.trainer.TrainResult].

    Raises:
        ValueError / TypeError: bad arguments, non-finite data or data that does not fit the network,
            an unusable ``checkpoint_dir`` or ``log_file`` (checked before anything is written).
        CheckpointError: a corrupt or mismatched checkpoint, a resume with other data or options, a
            run directory in use by another process or holding links (nothing is overwritten).
        TrainingDivergedError: the loss became NaN/inf; the last good checkpoint is left in place.
    """
    # ---- every check before anything is touched
    if not isinstance(model, ScoreModel):
        raise TypeError(f"model must be an sdegen.ScoreModel, got {type(model).__name__}")
    x, y = _split_data(data)
    steps = check_int(steps, "steps", low=1)
    batch_size = check_int(batch_size, "batch_size", low=1)
    checkpoint_every = check_int(checkpoint_every, "checkpoint_every", low=1)
    log_every = check_int(log_every, "log_every", low=1)
    keep = check_int(keep, "keep", low=1)
    warmup = check_int(warmup, "warmup", low=0)
    seed = check_seed(seed)
    n_levels = check_int(n_levels, "n_levels", low=2)
    n_steps = check_int(n_steps, "n_steps", low=1)
    lr = check_positive(lr, "lr")
    weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
    # grad_clip <= 0 would zero every gradient (clip_grad_norm_ scales by max_norm / norm): nothing trains.
    grad_clip = None if grad_clip is None else check_positive(grad_clip, "grad_clip")
    ema = None if ema is None else check_number(ema, "ema", low=0.0, high=1.0, high_open=True)
    eps = check_number(eps, "eps", low=0.0, high=model.sde.T, low_open=True, high_open=True)
    cond_drop = check_number(cond_drop, "cond_drop", low=0.0, high=1.0, high_open=True)
    progress, resume, overwrite = (check_bool(progress, "progress"), check_bool(resume, "resume"),
                                   check_bool(overwrite, "overwrite"))
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}")
    if not callable(loss) and loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)} or a callable; got {loss!r}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
    if reduce not in ("mean", "sum"):
        raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable callback(step, model) or None, got {type(callback).__name__}")
    if cond_drop > 0 and y is None:
        raise ValueError("cond_drop > 0 needs labelled data (x, y)")
    null_label = getattr(model.net, "null_label", None)
    if cond_drop > 0 and null_label is None:
        raise ValueError("cond_drop > 0 needs a class-conditional net with a null_label (e.g. MLP(num_classes=...))")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir must be a path or None, got {type(checkpoint_dir).__name__}")
    log_path = _check_log_file(log_file)

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no trainable parameters")
    device, dtype = params[0].device, params[0].dtype
    if x.dtype != dtype:
        raise ValueError(f"data dtype {x.dtype} differs from the model's parameter dtype {dtype}")

    # Fail on a shape mismatch before any file is touched.
    probe_kwargs = {} if y is None else {"y": y[:2].to(device)}
    was_training = model.training
    try:
        with torch.no_grad():
            model(x[:2].to(device), torch.full((min(2, x.shape[0]),), 0.5 * model.sde.T, device=device, dtype=dtype),
                  **probe_kwargs)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"data of shape {tuple(x.shape)} does not fit the network: {err}") from err

    config = dict(batch_size=batch_size, lr=lr, optimizer=optimizer, weight_decay=weight_decay,
                  grad_clip=grad_clip, warmup=warmup, seed=seed, ema=ema,
                  loss=loss if isinstance(loss, str) else getattr(loss, "__name__", "custom"), weighting=weighting,
                  eps=eps, n_levels=n_levels, n_steps=n_steps, cond_drop=cond_drop, reduce=reduce)
    fingerprint = data_fingerprint(x, y)
    spec = model_spec(model)

    run = contextlib.nullcontext()
    if checkpoint_dir is not None:
        extra = (log_path.name,) if log_path is not None and log_path.parent.resolve() == \
            Path(checkpoint_dir).resolve() else ()
        run = RunDirectory(checkpoint_dir, extra=extra)
    # The caller's model is restored if anything below fails: weights (and buffers) and mode.
    saved_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        with run:
            return _train_locked(model, x, y, params, device, dtype, config, fingerprint, spec, steps=steps,
                                 checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every, keep=keep,
                                 progress=progress, log_path=log_path, log_every=log_every, resume=resume,
                                 overwrite=overwrite, callback=callback, null_label=null_label,
                                 loss_fn=_make_loss(loss, weighting, eps, reduce, n_levels, n_steps))
    except Exception:
        with torch.no_grad():
            model.load_state_dict(saved_state)
        model.train(was_training)
        raise


def _train_locked(model, x, y, params, device, dtype, config, fingerprint, spec, *, steps, checkpoint_dir,
                  checkpoint_every, keep, progress, log_path, log_every, resume, overwrite, callback,
                  null_label, loss_fn) -> TrainResult:
    """The loop of `train`, run with validated arguments while the run directory is locked."""
    batch_size, lr, warmup, seed = config["batch_size"], config["lr"], config["warmup"], config["seed"]
    grad_clip, ema, cond_drop = config["grad_clip"], config["ema"], config["cond_drop"]
    existing = list_checkpoints(checkpoint_dir) if checkpoint_dir is not None else []
    if existing and overwrite:
        for old_step, old in existing:      # record first: a weights file without record is ignored
            old.unlink(missing_ok=True)
            (old.parent / f"step-{old_step:08d}.safetensors").unlink(missing_ok=True)
    elif existing and not resume:
        raise CheckpointError(f"checkpoint_dir {str(checkpoint_dir)!r} already holds a run (newest step "
                              f"{existing[0][0]}); resume=False would mix two runs' checkpoints. Pass "
                              f"resume=True to continue it, overwrite=True to discard it, or another directory")
    opt_cls = torch.optim.Adam if config["optimizer"] == "adam" else torch.optim.AdamW
    opt = opt_cls(params, lr=lr, weight_decay=config["weight_decay"])
    averager = EMA(model, ema) if ema is not None else None
    data_gen = torch.Generator().manual_seed(seed)
    noise_gen = torch.Generator(device=device).manual_seed(seed + 1)
    fork_devices = [device] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=fork_devices):
        # Seed only the generators this run uses (CPU, and the model's GPU), inside the fork: dropout is
        # reproducible and the caller's global RNG state is restored on exit.
        torch.random.default_generator.manual_seed(seed + 2)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed + 2)
        history: list[float] = []
        start, ckpt_path = 0, None
        if checkpoint_dir is not None and resume and not overwrite:
            found = read_checkpoint(checkpoint_dir)
            if found is not None:
                tensors, meta, ckpt_path = found
                _check_match(meta, spec, config, fingerprint, ckpt_path)
                start = int(meta["step"])
                if start > steps:
                    raise ValueError(f"steps={steps} is below the checkpoint's step {start} in {ckpt_path}")
                load_state_strict(model, prefixed(tensors, "model"), f"model weights in {ckpt_path.name}")
                _load_optimizer(opt, tensors, meta["optimizer"])
                if averager is not None:
                    averager.load(prefixed(tensors, "ema"), meta["ema_updates"])
                data_gen.set_state(tensors["rng.data"])
                noise_gen.set_state(tensors["rng.noise"].to(noise_gen.get_state().device))
                torch.set_rng_state(tensors["rng.global"])
                if device.type == "cuda" and "rng.global_cuda" in tensors:
                    torch.cuda.set_rng_state(tensors["rng.global_cuda"], device)
                history = tensors["history.loss"].tolist()[:start]
        resumed_from = start if ckpt_path is not None else None

        log = _Log(log_path, start)
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start, disable=not progress, desc="train", dynamic_ncols=True)
        running = history[-1] if history else None
        pending: list[tuple[int, Tensor, float]] = []
        t_start = time.perf_counter()

        def flush() -> None:
            nonlocal running
            if not pending:
                return
            values = torch.stack([v for _, v, _ in pending]).tolist()
            rows = []
            for (s, _, lr_s), v in zip(pending, values):
                if not math.isfinite(v):
                    where = f"; the last good checkpoint is {ckpt_path}" if ckpt_path else ""
                    log.write(rows)
                    raise TrainingDivergedError(f"training loss became {v} at step {s}{where}. Lower lr, "
                                                f"raise warmup or grad_clip, or check the data for NaN")
                rows.append((s, v, lr_s))
                running = v if running is None else 0.98 * running + 0.02 * v
            history.extend(values)
            log.write(rows)
            bar.update(len(pending))
            bar.set_postfix(loss=f"{running:.4g}")
            pending.clear()

        def save(step: int) -> Path:
            tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
            opt_tensors, opt_meta = _optimizer_tensors(opt)
            tensors.update(opt_tensors)
            if averager is not None:
                tensors.update({f"ema.{k}": v for k, v in averager.state_tensors().items()})
            tensors["rng.data"] = _rng_tensor(data_gen.get_state())
            tensors["rng.noise"] = _rng_tensor(noise_gen.get_state())
            tensors["rng.global"] = _rng_tensor(torch.get_rng_state())
            if device.type == "cuda":
                tensors["rng.global_cuda"] = _rng_tensor(torch.cuda.get_rng_state(device))
            tensors["history.loss"] = torch.tensor(history, dtype=torch.float64)
            meta = {"model": spec, "train": config, "data": fingerprint, "optimizer": opt_meta,
                    "ema_updates": averager.num_updates if averager is not None else 0,
                    "torch_version": torch.__version__}
            return write_checkpoint(checkpoint_dir, step, tensors, meta, keep=keep)

        model.train()
        for step in range(start, steps):
            idx = torch.randint(x.shape[0], (batch_size,), generator=data_gen)
            xb = x[idx].to(device)
            kwargs = {}
            if y is not None:
                yb = y[idx].to(device)
                if cond_drop > 0:
                    drop = torch.rand(batch_size, generator=noise_gen, device=device, dtype=dtype) < cond_drop
                    yb = torch.where(drop, torch.full_like(yb, null_label), yb)
                kwargs["y"] = yb
            lr_now = lr * min(1.0, (step + 1) / warmup) if warmup else float(lr)
            for group in opt.param_groups:
                group["lr"] = lr_now
            opt.zero_grad(set_to_none=True)
            value = loss_fn(model, xb, generator=noise_gen, model_kwargs=kwargs)
            value.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            if averager is not None:
                averager.update(model)
            pending.append((step + 1, value.detach(), lr_now))
            done = step + 1
            due_ckpt = checkpoint_dir is not None and (done % checkpoint_every == 0 or done == steps)
            if due_ckpt or done % log_every == 0 or done == steps:
                flush()
            if due_ckpt:
                ckpt_path = save(done)
            if callback is not None:
                callback(done, model)
        flush()
        bar.close()

    model.eval()
    sampler_model = model
    if averager is not None:
        sampler_model = copy.deepcopy(model)
        averager.copy_to(sampler_model)
    return TrainResult(model=sampler_model, raw_model=model, history=history, step=max(start, steps),
                       checkpoint=ckpt_path, resumed_from=resumed_from,
                       wall_time=time.perf_counter() - t_start, config=config)


def _make_loss(loss, weighting, eps, reduce, n_levels, n_steps) -> Callable:
    if callable(loss):
        return loss
    if loss == "dsm":
        return lambda m, x0, generator, model_kwargs: dsm_loss(m, x0, weighting=weighting, eps=eps, reduce=reduce,
                                                               generator=generator, model_kwargs=model_kwargs)
    if loss == "smld":
        return lambda m, x0, generator, model_kwargs: smld_loss(m, x0, n_levels=n_levels, eps=eps, reduce=reduce,
                                                                generator=generator, model_kwargs=model_kwargs)
    return lambda m, x0, generator, model_kwargs: ddpm_loss(m, x0, n_steps=n_steps, generator=generator,
                                                            model_kwargs=model_kwargs)


def _check_match(meta: dict, spec: dict, config: dict, fingerprint: dict, path: Path) -> None:
    saved = meta.get("model")
    if saved != json.loads(json.dumps(spec)):
        raise CheckpointError(f"checkpoint {path} was written for a different model: saved {saved}, "
                              f"current {spec}. Use another checkpoint_dir or overwrite=True")
    saved_cfg = meta.get("train", {})
    diff = {k: (saved_cfg.get(k), config[k]) for k in _TRAJECTORY_KEYS if saved_cfg.get(k) != config[k]}
    if diff:
        raise CheckpointError(f"checkpoint {path} was written with other training options "
                              f"(saved, current): {diff}. Use the same options, another checkpoint_dir or "
                              f"overwrite=True")
    saved_data = meta.get("data")      # absent in checkpoints written before the fingerprint existed
    if saved_data is not None and saved_data != fingerprint:
        diff = {k: (saved_data.get(k), fingerprint[k]) for k in fingerprint if saved_data.get(k) != fingerprint[k]}
        raise CheckpointError(f"checkpoint {path} was written for other training data (saved, current): {diff}. "
                              f"Resume with the same data, or use another checkpoint_dir or overwrite=True")


class Trainer:
    r"""Options for [`train`][sdegen.training.trainer.train] held once, for repeated or extended runs (a thin convenience).

    ``Trainer(model, data, checkpoint_dir=d, lr=1e-3).fit(steps=2000)`` is ``train(model, data,
    steps=2000, checkpoint_dir=d, lr=1e-3)``; calling `fit` again with more steps continues
    from the checkpoint.
    """

    def __init__(self, model: ScoreModel, data, **options: Any):
        if "steps" in options:
            raise TypeError("give steps to Trainer.fit(steps=...), not to the constructor")
        self.model, self.data, self.options = model, data, dict(options)
        self.result: TrainResult | None = None

    def fit(self, steps: int, **overrides: Any) -> TrainResult:
        """Run [`train`][sdegen.training.trainer.train] up to ``steps`` total steps; returns (and stores) the [`TrainResult`][sdegen.training.trainer.TrainResult]."""
        self.result = train(self.model, self.data, steps=steps, **{**self.options, **overrides})
        return self.result
