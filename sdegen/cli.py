r"""Command line front end: ``sdegen <command>``. Nothing imports this module.

Commands: ``demo`` (train on a built-in 2-D mixture, compare every sampler, table and figures),
``train``, ``sample``, ``likelihood``, ``bench`` and ``info``. Every command takes ``--device`` and
``--seed``. Errors print one line on stderr and exit with status 1 (argument errors: status 2);
set ``SDEGEN_TRACEBACK=1`` to see the full traceback instead.

Method options for ``sample`` are given as ``--opt key=value``; values are parsed as int, float,
``true``/``false``/``none`` or else kept as strings. Nothing from the command line or from a file
is ever evaluated as code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__

__all__ = ["main", "build_parser", "parse_option"]

SDE_NAMES = ("vp", "subvp", "ve")
BENCH_NAMES = ("samplers", "solvers", "likelihood", "overhead")   # what `sdegen bench all` runs
BENCH_EXTRA = ("soak", "device")                       # on request only: long (soak) or GPU timings (device)


class CLIError(Exception):
    """A user error reported as one line (no traceback)."""


# ---------------------------------------------------------------------- small parsers
def parse_option(text: str) -> tuple[str, object]:
    """Parse ``key=value`` into ``(key, value)`` with value an int, float, bool, None or str.

    No evaluation: only the literal forms below are recognised, anything else stays a string.

    Raises:
        CLIError: if ``text`` has no ``=`` or an empty or non-identifier key.
    """
    if "=" not in text:
        raise CLIError(f"--opt expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise CLIError(f"--opt key must be a Python identifier, got {key!r} in {text!r}")
    return key, _literal(raw.strip())


def _literal(raw: str):
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        return raw[1:-1]
    return raw


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise CLIError(f"--device must be cpu, cuda, cuda:N or auto, got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name} requested but CUDA is not available on this machine; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CLIError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                       f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    if dev.type not in ("cpu", "cuda"):
        # meta holds no values, and other backends are untested: refused here rather than deep inside.
        raise CLIError(f"--device must be cpu, cuda, cuda:N or auto (mps where available), got {name!r}")
    return dev


def _make_sde(name: str):
    from .sdes import SubVPSDE, VESDE, VPSDE

    table = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if name not in table:
        raise CLIError(f"--sde must be one of {', '.join(table)}, got {name!r}")
    return table[name]()


def _oracle(name: str, device):
    import torch

    from .oracle import MIXTURE_NAMES, named_mixture

    if name not in MIXTURE_NAMES:
        raise CLIError(f"--oracle must be one of {', '.join(MIXTURE_NAMES)}, got {name!r}")
    return named_mixture(name, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)


def _load_data(name: str, n: int, seed: int, device):
    """Data by name: an oracle mixture, a 2-D set of ``sdegen.data``, ``digits``, or an ``.npz`` file (array ``x``)."""
    import torch

    from . import data as sdata
    from .oracle import MIXTURE_NAMES, named_mixture

    if name.endswith(".npz"):
        import numpy as np

        if not os.path.isfile(name):
            raise CLIError(f"--data file {name!r} does not exist")
        with np.load(name, allow_pickle=False) as f:  # never unpickle objects from a file
            key = next((k for k in ("x", "samples") if k in f.files), None)
            if key is None:
                raise CLIError(f"--data {name!r} must hold an array named 'x' or 'samples', found {f.files}")
            arr = f[key]
        if arr.dtype.kind not in "fiu":      # complex would lose its imaginary part, bool/str are not data
            raise CLIError(f"--data {name!r}: array {key!r} must hold real numbers (float or int), got dtype "
                           f"{arr.dtype}")
        if arr.ndim < 2 or arr.shape[0] < 1:
            raise CLIError(f"--data {name!r}: array {key!r} must have shape (N, *D) with N >= 1, got {arr.shape}")
        if arr.dtype.kind == "f" and not np.isfinite(arr[:n]).all():
            raise CLIError(f"--data {name!r}: array {key!r} holds NaN or inf")
        return torch.as_tensor(arr, dtype=torch.float32, device=device)[:n]
    gen = torch.Generator().manual_seed(seed)
    if name in MIXTURE_NAMES:
        return named_mixture(name, dtype=torch.float32).sample(n, generator=gen).to(device)
    if name in sdata.TOY_2D:
        return sdata.toy_2d(name, n, generator=gen).to(device)
    if name in ("digits", "digits_test"):
        x, _ = sdata.digits("test" if name == "digits_test" else "train")
        return x[:n].to(device)
    raise CLIError(f"--data must be one of {', '.join(_dataset_names())} or an .npz file, got {name!r}")


def _dataset_names() -> list[str]:
    from . import data as sdata
    from .oracle import MIXTURE_NAMES

    return list(dict.fromkeys([*MIXTURE_NAMES, *sdata.TOY_2D, "digits", "digits_test"]))


_CLI_RECORD = "sdegen_cli.json"  # data name and shape, written by `sdegen train` beside the checkpoints

#: ``--opt`` keys that the ``sample`` command sets itself, and the flag to use instead.
_RESERVED_OPTS = {"steps": "--steps", "method": "--method", "generator": "--seed", "seed": "--seed",
                  "seeds": "--seed", "device": "--device", "dtype": "--float64", "progress": "--quiet",
                  "shape": "--n", "batch_size": "--batch-size"}


def _check_out_file(path: str, force: bool) -> None:
    """Refuse to replace an existing ``--out`` file (or anything else at that path) without ``--force``."""
    if os.path.islink(path):
        raise CLIError(f"--out {path!r} is a symbolic link; give the real path")
    if os.path.lexists(path):
        if os.path.isdir(path):
            raise CLIError(f"--out {path!r} is a directory; give a file name ending in .npz or .png")
        if not force:
            raise CLIError(f"--out {path!r} already exists; pass --force to replace it")


def _refuse_links(directory: str) -> None:
    """Refuse a run directory holding symbolic links (a planted link would redirect a write)."""
    if not os.path.isdir(directory):
        return                      # the directory itself may be a link the user made; its entries may not
    for entry in os.scandir(directory):
        if entry.is_symlink():
            raise CLIError(f"--out {directory!r} holds a symbolic link ({entry.name}); a run directory must not "
                           f"contain links. Remove it")


# ---------------------------------------------------------------------- commands
def _cmd_info(args) -> int:
    import torch

    from .sdes import SubVPSDE, VESDE, VPSDE

    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        m, s = sde.marginal(t)
        print(f"{sde!r}")
        print("   t    mean_coef        std   log_snr")
        for ti, mi, si in zip(t.tolist(), m.tolist(), s.tolist()):
            lsnr = float("inf") if si == 0 else 2 * (torch.tensor(mi).log() - torch.tensor(si).log()).item()
            print(f"{ti:4.1f} {mi:12.6g} {si:10.6g} {lsnr:9.3f}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import DemoConfig, run_demo

    over = {k: v for k, v in (("dataset", args.dataset), ("train_steps", args.train_steps),
                              ("n_samples", args.n)) if v is not None}
    cfg = DemoConfig.fast(**over) if args.fast else DemoConfig(**over)
    run_demo(args.out, config=cfg, device=_device(args.device), seed=args.seed, progress=not args.quiet)
    return 0


def _cmd_train(args) -> int:
    import torch

    from . import nn as snn
    from .parameterization import ScoreModel
    from .training import train

    device = _device(args.device)
    data = _load_data(args.data, args.n_data, args.seed, device)
    sde = _make_sde(args.sde)
    torch.manual_seed(args.seed)  # initial weights
    if args.net == "mlp":
        if data.ndim != 2:
            raise CLIError(f"--net mlp needs vector data (N, d), got data of shape {tuple(data.shape)}; use --net unet")
        net = snn.MLP(data.shape[1], hidden=args.hidden, depth=args.depth)
    else:
        if data.ndim != 4:
            raise CLIError(f"--net unet needs image data (N, C, H, W), got data of shape {tuple(data.shape)}")
        net = snn.UNet(data.shape[1])
    if args.sigma_data is not None and args.parameterization != "edm":
        raise CLIError(f"--sigma-data applies to --parameterization edm only, got --parameterization "
                       f"{args.parameterization}")
    sigma_data = 1.0
    if args.parameterization == "edm":
        sigma_data = args.sigma_data if args.sigma_data is not None else float(data.float().std())
        if not sigma_data > 0:
            raise CLIError(f"--sigma-data must be a positive number, got {sigma_data}")
    model = ScoreModel(net, sde, parameterization=args.parameterization, sigma_data=sigma_data).to(device)
    from .training.checkpoint import atomic_write_bytes, list_checkpoints

    _refuse_links(args.out)
    resumed = bool(list_checkpoints(args.out))
    print(f"{'resuming' if resumed else 'training'} {args.net} on {args.data!r} ({tuple(data.shape)}), "
          f"{args.sde} SDE, {args.steps} steps -> {args.out}")
    out = train(model, data, steps=args.steps, batch_size=args.batch_size, lr=args.lr, checkpoint_dir=args.out,
                seed=args.seed, progress=not args.quiet)
    import json

    # Atomic (temporary file + rename): a link planted at this name is replaced, never written through.
    atomic_write_bytes(Path(args.out) / _CLI_RECORD,
                       json.dumps({"data": args.data, "data_shape": list(data.shape[1:])}).encode())
    last = out.history[-1] if out.history else float("nan")
    print(f"done: step {out.step}, last loss {last:.4f}, {out.wall_time:.1f} s; checkpoint in {args.out}")
    return 0


def _score_source(args, device):
    """``(sde, score_fn, shape_tail, oracle_or_None)`` from ``--checkpoint`` or ``--oracle``."""
    if bool(args.checkpoint) == bool(args.oracle):
        raise CLIError("give exactly one of --checkpoint DIR or --oracle NAME")
    if args.oracle:
        gm = _oracle(args.oracle, device)
        sde = _make_sde(args.sde)
        return sde, gm.score_fn(sde), (gm.dim,), gm
    if not os.path.isdir(args.checkpoint):
        raise CLIError(f"--checkpoint must be a checkpoint directory written by `sdegen train`, "
                       f"got {args.checkpoint!r} (not a directory)")
    from .training import load

    model = load(args.checkpoint, device=device)
    return model.sde, model, _data_shape(args.checkpoint, model), None


def _recorded_data(directory: str) -> str | None:
    """The ``--data`` a `sdegen train` run used (from its record), or None."""
    import json

    rec = os.path.join(directory, _CLI_RECORD)
    if not os.path.isfile(rec):
        return None
    with open(rec) as f:
        return json.load(f).get("data")


def _data_shape(directory: str, model) -> tuple[int, ...]:
    import json

    rec = os.path.join(directory, _CLI_RECORD)
    if os.path.isfile(rec):
        with open(rec) as f:
            return tuple(int(v) for v in json.load(f)["data_shape"])
    cfg = getattr(model.net, "config", {}) or {}
    if type(model.net).__name__ == "MLP" and "dim" in cfg:
        return (int(cfg["dim"]),)
    raise CLIError(f"checkpoint {directory!r} does not record the data shape ({_CLI_RECORD} missing); "
                   f"it was not written by `sdegen train`")


def _leave_process_group() -> None:
    """Wait for every rank, then tear the group down (a gloo group left open aborts at exit)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _cmd_sample(args) -> int:
    import torch

    if not args.out.endswith((".npz", ".png")):  # checked before any work is done
        raise CLIError(f"--out must end in .npz or .png, got {args.out!r}")
    _check_out_file(args.out, args.force)
    device = _device(args.device)
    opts = dict(parse_option(o) for o in args.opt)
    for key in opts:
        if key in _RESERVED_OPTS:
            raise CLIError(f"--opt {key}=... is set by the command line itself; use {_RESERVED_OPTS[key]} instead")
    sde, score_fn, tail, _ = _score_source(args, device)
    dtype = torch.float64 if args.float64 else torch.float32
    shape = (args.n, *tail)
    # In chunks (--batch-size) or under torchrun: the seed plan of sdegen.chunked, so that one process
    # and any number of ranks give the same samples for the same --seed and --batch-size.
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or args.batch_size is not None:
        from .distributed import sample_distributed, world

        if args.steps is not None:
            opts["steps"] = args.steps
        try:
            res = sample_distributed(sde, score_fn, args.n, tail, batch_size=args.batch_size or args.n,
                                     method=args.method, seed=args.seed, device=device, dtype=dtype, **opts)
            rank = world()[0]
            if rank == 0:  # every rank holds the gathered samples; rank 0 writes them
                _write_samples(args.out, res.samples.detach().to("cpu"), args, res.nfe)
        finally:
            _leave_process_group()
        if rank != 0:
            return 0
        print(f"{args.n} samples, method {args.method}, NFE {res.nfe} -> {args.out}")
        return 0
    else:
        from .sampling import sample

        gen = torch.Generator(device=device).manual_seed(args.seed)
        with torch.no_grad():
            res = sample(sde, score_fn, shape, method=args.method, steps=args.steps, generator=gen, device=device,
                         dtype=dtype, progress=not args.quiet, **opts)
    x = res.samples.detach().to("cpu")
    _write_samples(args.out, x, args, res.nfe)
    print(f"{args.n} samples, method {args.method}, NFE {res.nfe} -> {args.out}")
    return 0


def _write_samples(path: str, x, args, nfe: int) -> None:
    import numpy as np

    from . import plotting

    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if path.endswith(".npz"):
        import io

        from .training.checkpoint import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, samples=x.numpy(), nfe=np.array(nfe), method=np.array(args.method))
        atomic_write_bytes(Path(path), buf.getvalue())      # replaces a link at the path, never follows it
    elif path.endswith(".png"):
        if x.ndim == 2 and x.shape[1] == 2:
            from .oracle import MIXTURE_NAMES, named_mixture

            # Contours of the true density when it is known (an oracle, or a checkpoint trained on a
            # named mixture); otherwise samples_figure draws a kernel density estimate of the samples.
            name = args.oracle or (_recorded_data(args.checkpoint) if args.checkpoint else None)
            lp = named_mixture(name).log_prob if name in MIXTURE_NAMES else None
            source = f"oracle {args.oracle}" if args.oracle else f"checkpoint {args.checkpoint}"
            fig = plotting.samples_figure(x, log_prob=lp,
                                          title=f"sdegen sample: {source}, method {args.method}, NFE {nfe}")
        elif x.ndim == 4:
            fig = plotting.sample_grid(x[:64], title=f"{args.method} (NFE {nfe})")
        else:
            raise CLIError(f"--out .png needs 2-D points or images (N, C, H, W), got samples of shape "
                           f"{tuple(x.shape)}; write .npz instead")
        plotting.save(fig, path)
    else:
        raise CLIError(f"--out must end in .npz or .png, got {path!r}")


def _cmd_likelihood(args) -> int:
    import torch

    from .likelihood import bits_per_dim, log_likelihood

    device = _device(args.device)
    sde, score_fn, tail, gm = _score_source(args, device)
    dtype = torch.float64 if args.float64 else torch.float32
    if args.data is None and gm is None:
        # The run records its data (sdegen_cli.json, written by `sdegen train`): use it by default.
        args.data = _recorded_data(args.checkpoint)
        if args.data is None:
            raise CLIError(f"--data is required: checkpoint {args.checkpoint!r} does not record its data set "
                           f"({_CLI_RECORD} missing); give a data set name or an .npz file")
        print(f"data: {args.data!r}, as recorded by the training run ({args.n} points, seed {args.seed})")
    if args.data is None:
        x = gm.sample(args.n, generator=torch.Generator(device=device).manual_seed(args.seed))
    else:
        x = _load_data(args.data, args.n, args.seed, device)
    x = x.to(device=device, dtype=dtype)
    if tuple(x.shape[1:]) != tuple(tail):
        raise CLIError(f"--data has samples of shape {tuple(x.shape[1:])} but the model expects {tuple(tail)}")
    if args.images:
        # Images in [-1, 1] stored as 8 bits: snap to the 256-level grid, then uniform dequantization,
        # so the continuous log-density bounds the discrete likelihood (bits_per_dim adds the offset).
        from .likelihood import dequantize

        if float(x.min()) < -1 or float(x.max()) > 1:
            raise CLIError(f"--images needs data in [-1, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]")
        x8 = ((x + 1) / 2 * 255).round() / 255 * 2 - 1
        x = dequantize(x8, generator=torch.Generator(device=device).manual_seed(args.seed + 1))
    # With the oracle the exact p_T replaces the SDE's Gaussian prior, so what remains is solver error.
    prior = gm.perturbed(sde, sde.T).log_prob if gm is not None else "sde"
    res = log_likelihood(sde, score_fn, x, divergence=args.divergence, rtol=args.tol, atol=args.tol, eps=args.eps,
                         prior=prior, generator=torch.Generator(device=device).manual_seed(args.seed))
    lp = res.log_prob.detach().to("cpu", torch.float64)
    nll = float(-lp.mean())
    se = float(lp.std() / len(lp) ** 0.5) if len(lp) > 1 else float("nan")
    d = x[0].numel()
    print(f"{len(lp)} points, d = {d}, divergence {args.divergence}, NFE {res.nfe}")
    print(f"NLL       {nll:.4f} nats  (+- {se:.4f} standard error)")
    print(f"NLL / dim {nll / d:.4f} nats = {nll / d / 0.6931471805599453:.4f} bits")
    if gm is not None:
        exact = float(-gm.log_prob_t(x.to(gm.dtype), args.eps, sde).mean())
        print(f"exact     {exact:.4f} nats  (the oracle's own log p_eps on the same points; exact p_T used)")
    if args.images:
        bpd = bits_per_dim(res.log_prob, x)
        print(f"bits/dim  {float(bpd.mean()):.4f}  (8-bit data in [-1, 1], uniformly dequantized; offset log2(128) "
              f"included)")
    return 0


def _cmd_bench(args) -> int:
    import importlib
    import json

    names = BENCH_NAMES if args.which == "all" else (args.which,)
    os.makedirs(args.out, exist_ok=True)
    summary = {}
    for name in names:
        try:
            mod = importlib.import_module(f"sdegen.bench.{name}")
        except ModuleNotFoundError as e:
            raise CLIError(f"benchmark {name!r} is not available in this installation ({e})") from e
        print(f"running benchmark {name!r}{' (quick)' if args.quick else ''} -> {args.out}")
        summary[name] = mod.run(os.path.join(args.out, name) if len(names) > 1 else args.out, quick=args.quick)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    print(f"wrote {os.path.join(args.out, 'summary.json')}")
    return 0


# ---------------------------------------------------------------------- parser
def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default: cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: 1, or OMP_NUM_THREADS when set; "
                   "bench: torch's default). Small models run fastest on one thread per process")


def _score_args(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("score source (exactly one)")
    src.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory written by `sdegen train`")
    src.add_argument("--oracle", metavar="NAME", help="the exact score of a named mixture "
                     "(8gaussians, anisotropic, gaussian, mixture16, mixture64)")
    p.add_argument("--sde", default="vp", choices=SDE_NAMES, help="SDE for --oracle (default: vp)")
    p.add_argument("--float64", action="store_true", help="compute in float64 (default: float32)")


def build_parser() -> argparse.ArgumentParser:
    """The ``sdegen`` argument parser (one sub-parser per command)."""
    p = argparse.ArgumentParser(prog="sdegen", description="Score-based generative modelling with SDEs.")
    p.add_argument("--version", action="version", version=f"sdegen {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="train a small model on 2-D data and compare every sampler (the main job)",
                       description="Train an MLP score model on a built-in 2-D Gaussian mixture, sample it "
                       "with DDPM ancestral, DDIM, Euler-Maruyama, PC and RK45 (and the exact score of the "
                       "mixture side by side), print a table and write figures.")
    d.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    d.add_argument("--fast", action="store_true", help="a tiny configuration that runs in seconds (for tests)")
    d.add_argument("--dataset", choices=("8gaussians", "anisotropic", "gaussian"), help="2-D data set")
    d.add_argument("--train-steps", type=int, help="training steps (default 8000; 60 with --fast)")
    d.add_argument("--n", type=int, help="samples per method (default 2000; 200 with --fast)")
    _common(d)
    d.set_defaults(func=_cmd_demo)

    t = sub.add_parser("train", help="train a score model; resumes if --out holds a checkpoint",
                       description="Train a score model with denoising score matching. If --out already "
                       "holds a checkpoint, training resumes from it.")
    t.add_argument("--data", default="8gaussians",
                   help="data set: an oracle mixture name, a built-in set of sdegen.data, or an .npz file "
                        "with an array 'x' (default: 8gaussians)")
    t.add_argument("--n-data", type=int, default=20000, help="training points drawn/used (default 20000)")
    t.add_argument("--sde", default="vp", choices=SDE_NAMES, help="forward SDE (default: vp)")
    t.add_argument("--net", default="mlp", choices=("mlp", "unet"), help="network (default: mlp)")
    t.add_argument("--hidden", type=int, default=128, help="MLP width (default 128)")
    t.add_argument("--depth", type=int, default=3, help="MLP residual blocks (default 3)")
    t.add_argument("--parameterization", default="eps", choices=("score", "eps", "x0", "v", "edm"),
                   help="what the network predicts (default: eps; edm: the EDM preconditioned denoiser, "
                        "with --sigma-data)")
    t.add_argument("--sigma-data", type=float, default=None,
                   help="data standard deviation of the edm parameterization (default: that of the training data)")
    t.add_argument("--steps", type=int, default=4000, help="training steps (default 4000)")
    t.add_argument("--batch-size", type=int, default=512, help="batch size (default 512)")
    t.add_argument("--lr", type=float, default=2e-3, help="learning rate (default 2e-3)")
    t.add_argument("--out", required=True, help="checkpoint directory")
    _common(t)
    t.set_defaults(func=_cmd_train)

    s = sub.add_parser("sample", help="sample a checkpoint or an oracle score with any method",
                       description="Draw samples with any sdegen.sample method. Under torchrun the samples "
                       "are split across ranks and gathered on rank 0.")
    _score_args(s)
    s.add_argument("--method", default="rk45", help="a sdegen.sample method (default: rk45)")
    s.add_argument("--steps", type=int, default=None, help="steps for fixed-grid methods")
    s.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="a method option, e.g. --opt rtol=1e-4 --opt corrector=langevin (repeatable)")
    s.add_argument("--n", "--num-samples", dest="n", type=int, default=1000,
                   help="number of samples (default 1000); under torchrun write --num-samples (torchrun "
                        "itself would take --n for an abbreviation of its own options)")
    s.add_argument("--batch-size", type=int, default=None,
                   help="sample in chunks of this many with a per-chunk seed plan (under torchrun the chunks "
                        "are dealt round-robin to the ranks; the result does not depend on the number of ranks)")
    s.add_argument("--out", default="outputs/samples.npz", help=".npz (arrays) or .png (figure)")
    s.add_argument("--force", action="store_true", help="replace --out if it exists (default: refuse)")
    _common(s)
    s.set_defaults(func=_cmd_sample)

    lk = sub.add_parser("likelihood", help="exact log-likelihood (NLL, bits/dim) by the probability-flow ODE",
                        description="Negative log-likelihood of data under a checkpoint or an oracle score, "
                        "by the probability-flow ODE and the instantaneous change of variables.")
    _score_args(lk)
    lk.add_argument("--data", default=None, help="data set name or .npz (default with --oracle: its own samples)")
    lk.add_argument("--n", type=int, default=256, help="number of data points (default 256)")
    lk.add_argument("--divergence", default="exact", choices=("exact", "hutchinson"), help="divergence estimator")
    lk.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of the ODE solver (default 1e-5)")
    lk.add_argument("--eps", type=float, default=1e-5, help="truncation time: computes log p_eps (default 1e-5)")
    lk.add_argument("--images", action="store_true", help="treat the data as 8-bit images in [-1, 1]: dequantize, and report bits/dim")
    _common(lk)
    lk.set_defaults(func=_cmd_likelihood)

    b = sub.add_parser("bench", help="run the benchmarks (JSON + plots)",
                       description="Run the sampler, solver, likelihood and overhead benchmarks; results are JSON files "
                       "and PNG plots in --out. The benchmarks fix their own seeds and devices "
                       "(--seed and --device are accepted for uniformity and not used).")
    b.add_argument("which", nargs="?", default="all", choices=(*BENCH_NAMES, *BENCH_EXTRA, "all"),
                   help="which benchmark (all = samplers, solvers, likelihood and overhead)")
    b.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    b.add_argument("--quick", action="store_true", help="a reduced grid for smoke runs")
    _common(b)
    b.set_defaults(func=_cmd_bench)

    i = sub.add_parser("info", help="print the marginal statistics of the built-in SDEs")
    _common(i)
    i.set_defaults(func=_cmd_info)
    return p


def _check_positive_ints(args) -> None:
    for name in ("n", "steps", "train_steps", "n_data", "batch_size", "hidden", "depth", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    from ._utils import MAX_SEED

    # One rule for every command and path (with or without --batch-size): 0 <= seed < 2**63.
    if not 0 <= args.seed <= MAX_SEED:
        raise CLIError(f"--seed must be an integer in [0, 2**63 - 1], got {args.seed}")


def _set_threads(args) -> None:
    # The models here are small: a second intra-op thread gains little and, on a busy machine,
    # costs several times the CPU per step (spinning threads). One thread per process unless asked.
    threads = getattr(args, "threads", None)
    if threads is None and (os.environ.get("OMP_NUM_THREADS") or args.command == "bench"):
        return
    import torch

    torch.set_num_threads(threads or 1)


def main(argv=None) -> int:
    """Entry point of the ``sdegen`` console script. Returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        _check_positive_ints(args)
        _set_threads(args)
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("sdegen: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users; SDEGEN_TRACEBACK=1 for developers
        if os.environ.get("SDEGEN_TRACEBACK"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        kind = "" if isinstance(e, CLIError) else f"{type(e).__name__}: "
        print(f"sdegen: error: {kind}{msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
