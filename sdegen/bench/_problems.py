r"""Oracle problems shared by the solver benchmark and its best-of comparison: the SDEs by name and the
exact-flow reference."""

from __future__ import annotations

import torch

import sdegen

F64 = torch.float64
EPS = 1e-3   # truncation time of every run


def _sde(name: str):
    return {"vp": sdegen.VPSDE(), "subvp": sdegen.SubVPSDE(), "ve": sdegen.VESDE()}[name]


def _reference(sde, sf, x_T):
    try:
        return sdegen.sample(sde, sf, None, x_T=x_T, method="rk45", rtol=1e-9, atol=1e-9).samples, "rk45 rtol=1e-9"
    except Exception:  # noqa: BLE001 - fall back to an independent high-order reference
        res = sdegen.sample(sde, sf, None, x_T=x_T, method="dpm_solver", steps=2000, grid="log_snr")
        return res.samples, "dpm_solver-3, 2000 log-SNR steps"
