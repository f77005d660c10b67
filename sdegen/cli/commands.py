r"""The ``sdegen`` commands: ``info``, ``demo``, ``train``, ``sample``, ``likelihood`` and ``bench``.

Each ``cmd_*`` takes the parsed arguments and returns the exit status; [`sdegen.cli`][sdegen.cli] builds
the parser and dispatches to them.
"""

from __future__ import annotations

import os
from pathlib import Path

from .options import (BENCH_NAMES, CLIError, _check_out_file, _device, _load_data, _make_sde, _oracle,
                      _refuse_links, parse_option)

_CLI_RECORD = "sdegen_cli.json"  # data name and shape, written by `sdegen train` beside the checkpoints

#: ``--opt`` keys that the ``sample`` command sets itself, and the flag to use instead.
_RESERVED_OPTS = {"steps": "--steps", "method": "--method", "generator": "--seed", "seed": "--seed",
                  "seeds": "--seed", "device": "--device", "dtype": "--float64", "progress": "--quiet",
                  "shape": "--n", "batch_size": "--batch-size"}



def cmd_info(args) -> int:
    import torch

    from ..sdes import SubVPSDE, VESDE, VPSDE

    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        m, s = sde.marginal(t)
        print(f"{sde!r}")
        print("   t    mean_coef        std   log_snr")
        for ti, mi, si in zip(t.tolist(), m.tolist(), s.tolist()):
            lsnr = float("inf") if si == 0 else 2 * (torch.tensor(mi).log() - torch.tensor(si).log()).item()
            print(f"{ti:4.1f} {mi:12.6g} {si:10.6g} {lsnr:9.3f}")
    return 0


def cmd_demo(args) -> int:
    from ..demo import DemoConfig, run_demo

    over = {k: v for k, v in (("dataset", args.dataset), ("train_steps", args.train_steps),
                              ("n_samples", args.n)) if v is not None}
    cfg = DemoConfig.fast(**over) if args.fast else DemoConfig(**over)
    run_demo(args.out, config=cfg, device=_device(args.device), seed=args.seed, progress=not args.quiet)
    return 0


def cmd_train(args) -> int:
    import torch

    from .. import nn as snn
    from ..parameterization import ScoreModel
    from ..training import train

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
    from ..training.checkpoint import atomic_write_bytes, list_checkpoints

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
    from ..training import load

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


def cmd_sample(args) -> int:
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
        from ..distributed import sample_distributed, world

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
        from ..sampling import sample

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

    from .. import plotting

    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    if path.endswith(".npz"):
        import io

        from ..training.checkpoint import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, samples=x.numpy(), nfe=np.array(nfe), method=np.array(args.method))
        atomic_write_bytes(Path(path), buf.getvalue())      # replaces a link at the path, never follows it
    elif path.endswith(".png"):
        if x.ndim == 2 and x.shape[1] == 2:
            from ..oracle import MIXTURE_NAMES, named_mixture

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


def cmd_likelihood(args) -> int:
    import torch

    from ..likelihood import bits_per_dim, log_likelihood

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
        from ..likelihood import dequantize

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


def cmd_bench(args) -> int:
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

