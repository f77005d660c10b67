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

from .. import __version__
from .commands import cmd_bench, cmd_demo, cmd_info, cmd_likelihood, cmd_sample, cmd_train
from .options import BENCH_EXTRA, BENCH_NAMES, SDE_NAMES, CLIError, parse_option

__all__ = ["main", "build_parser", "parse_option", "CLIError"]


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
    d.set_defaults(func=cmd_demo)

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
    t.set_defaults(func=cmd_train)

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
    s.set_defaults(func=cmd_sample)

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
    lk.set_defaults(func=cmd_likelihood)

    b = sub.add_parser("bench", help="run the benchmarks (JSON + plots)",
                       description="Run the sampler, solver, likelihood and overhead benchmarks; results are JSON files "
                       "and PNG plots in --out. The benchmarks fix their own seeds and devices "
                       "(--seed and --device are accepted for uniformity and not used).")
    b.add_argument("which", nargs="?", default="all", choices=(*BENCH_NAMES, *BENCH_EXTRA, "all"),
                   help="which benchmark (all = samplers, solvers, likelihood and overhead)")
    b.add_argument("--out", default="bench_results", help="output folder (default: bench_results)")
    b.add_argument("--quick", action="store_true", help="a reduced grid for smoke runs")
    _common(b)
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser("info", help="print the marginal statistics of the built-in SDEs")
    _common(i)
    i.set_defaults(func=cmd_info)
    return p


def _check_positive_ints(args) -> None:
    for name in ("n", "steps", "train_steps", "n_data", "batch_size", "hidden", "depth", "threads"):
        v = getattr(args, name, None)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be a positive integer, got {v}")
    from .._utils import MAX_SEED

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
