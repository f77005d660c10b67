"""Command line front end: ``sdegen <command>``. Nothing imports this module."""

from __future__ import annotations

import argparse
import sys


def _cmd_info(args) -> int:
    import torch

    from . import SubVPSDE, VESDE, VPSDE

    t = torch.linspace(0, 1, 6, dtype=torch.float64)
    for sde in (VPSDE(), SubVPSDE(), VESDE()):
        m, s = sde.marginal(t)
        print(f"{sde!r}")
        print("   t    mean_coef        std   log_snr")
        for ti, mi, si in zip(t.tolist(), m.tolist(), s.tolist()):
            lsnr = float("inf") if si == 0 else 2 * (torch.tensor(mi).log() - torch.tensor(si).log()).item()
            print(f"{ti:4.1f} {mi:12.6g} {si:10.6g} {lsnr:9.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sdegen", description="Score-based generative modelling with SDEs.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print the marginal statistics of the built-in SDEs")
    info.set_defaults(func=_cmd_info)
    demo = sub.add_parser("demo", help="the main job")
    demo.set_defaults(func=_cmd_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, FileNotFoundError, RuntimeError) as e:
        print(f"sdegen: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
