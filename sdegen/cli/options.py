r"""Command line inputs of ``sdegen``: ``--opt`` values, devices, SDE and data names, output paths.

Every check here raises [`CLIError`][sdegen.cli.options.CLIError], which the entry point prints as one
line. Nothing from the command line or from a file is ever evaluated as code.
"""

from __future__ import annotations

import os

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
    from ..sdes import SubVPSDE, VESDE, VPSDE

    table = {"vp": VPSDE, "subvp": SubVPSDE, "ve": VESDE}
    if name not in table:
        raise CLIError(f"--sde must be one of {', '.join(table)}, got {name!r}")
    return table[name]()


def _oracle(name: str, device):
    import torch

    from ..oracle import MIXTURE_NAMES, named_mixture

    if name not in MIXTURE_NAMES:
        raise CLIError(f"--oracle must be one of {', '.join(MIXTURE_NAMES)}, got {name!r}")
    return named_mixture(name, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)


def _load_data(name: str, n: int, seed: int, device):
    """Data by name: an oracle mixture, a 2-D set of ``sdegen.data``, ``digits``, or an ``.npz`` file (array ``x``)."""
    import torch

    from .. import data as sdata
    from ..oracle import MIXTURE_NAMES, named_mixture

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
    from .. import data as sdata
    from ..oracle import MIXTURE_NAMES

    return list(dict.fromkeys([*MIXTURE_NAMES, *sdata.TOY_2D, "digits", "digits_test"]))



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

