r"""Large sampling jobs on one machine: fixed-size chunks, a reproducible seed plan, streaming writes.

The job "``n_samples`` samples of shape ``sample_shape``" is cut into chunks of ``batch_size``
(the last one shorter): chunk $c$ holds global samples $[c\,b, \min(n, (c+1)\,b))$. Each chunk is an
independent [`sdegen.sample`][sdegen.chunked.sample] call whose randomness is fixed by the **seed plan**:

- ``noise="per_chunk"`` (default, fastest): chunk $c$ uses a ``torch.Generator`` seeded with
  $\mathrm{splitmix64}(\text{seed} \cdot 2^{32} + c)$. The result depends on ``(seed, batch_size)``
  only, not on which process computes which chunk or in what order.
- ``noise="per_sample"``: sample $k$ draws its noise from its own counter-based stream
  (`sdegen._rng.PerSampleNoise` with seed $\text{seed}\cdot 2^{40} + k$), so each sample is
  also independent of ``batch_size``, bitwise.

Chunks are written as they finish into one ``.npy`` file (header first, then the rows in order,
with plain sequential writes: no memory map, so resident memory stays one chunk's worth) or into a
``samples.npy`` member of an ``.npz`` archive (streamed into the zip). Memory therefore stays
$O(\text{batch\_size})$ whatever ``n_samples`` is; ``examples/backend.py --memory`` measures it.
"""

from __future__ import annotations

import math
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ._rng import PerSampleNoise, splitmix64
from .sampling import sample
from .sdes import SDE
from .solvers.base import progress_bar

__all__ = ["sample_chunked", "ChunkedResult", "ChunkPlan", "NpyStreamWriter", "NOISE_PLANS"]

#: Seed plans: how the randomness of a chunk is derived from ``seed``.
NOISE_PLANS = ("per_chunk", "per_sample")
_MAX_SEED = 1 << 24            # seed * 2**40 + k must stay below 2**64 for per-sample seeds


@dataclass(frozen=True)
class ChunkPlan:
    r"""The partition of ``n_samples`` into chunks of ``batch_size`` and the seed of each chunk."""

    n_samples: int
    batch_size: int
    seed: int = 0
    noise: str = "per_chunk"

    def __post_init__(self):
        for name in ("n_samples", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < _MAX_SEED:
            raise ValueError(f"seed must be an int in [0, 2**24), got {self.seed!r}")
        if self.noise not in NOISE_PLANS:
            raise ValueError(f"noise must be one of {', '.join(map(repr, NOISE_PLANS))}, got {self.noise!r}")

    @property
    def n_chunks(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def bounds(self, c: int) -> tuple[int, int]:
        """Global sample range ``[start, stop)`` of chunk ``c``."""
        if not 0 <= c < self.n_chunks:
            raise IndexError(f"chunk index must lie in [0, {self.n_chunks}), got {c}")
        start = c * self.batch_size
        return start, min(self.n_samples, start + self.batch_size)

    def chunk_seed(self, c: int) -> int:
        """The ``torch.Generator`` seed of chunk ``c`` (``"per_chunk"`` plan), below 2**63."""
        return splitmix64((self.seed << 32) + c) >> 1

    def randomness(self, c: int, sample_shape: tuple[int, ...], device, dtype) -> dict[str, Any]:
        """Keyword arguments for [`sdegen.sample`][sdegen.chunked.sample]: ``generator=`` or ``seeds=``."""
        if self.noise == "per_chunk":
            g = torch.Generator(device=device)
            g.manual_seed(self.chunk_seed(c))
            return {"generator": g}
        start, stop = self.bounds(c)
        base = self.seed << 40
        return {"seeds": PerSampleNoise(range(base + start, base + stop), (stop - start, *sample_shape),
                                        device=device, dtype=dtype)}


@dataclass(frozen=True)
class ChunkedResult:
    """What [`sample_chunked`][sdegen.chunked.sample_chunked] returns.

    Attributes:
        samples: ``(n, *shape)`` CPU tensor when no ``out`` file was given, else ``None``.
        path: the written ``.npy``/``.npz`` file, or ``None``.
        n_samples: number of samples produced (by this process, for a subset of chunks).
        nfe: total score evaluations over all chunks.
        chunks: indices of the chunks computed.
        seconds: wall time.
    """

    samples: Tensor | None
    path: Path | None
    n_samples: int
    nfe: int
    chunks: tuple[int, ...]
    seconds: float
    stats: dict = field(default_factory=dict)


class NpyStreamWriter:
    r"""Write a C-order ``.npy`` array of known shape row block by row block (or into an ``.npz``).

    The header is written first; [`write`][sdegen.chunked.NpyStreamWriter.write] appends rows. Nothing is memory-mapped, so the
    process holds one block at a time. Use as a context manager; `close` checks that exactly
    ``shape[0]`` rows were written.
    """

    def __init__(self, path, shape: tuple[int, ...], dtype, *, member: str = "samples"):
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.rows = 0
        self._zip = None
        if self.path.suffix == ".npz":
            self._zip = zipfile.ZipFile(self.path, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self._f = self._zip.open(f"{member}.npy", "w", force_zip64=True)
        elif self.path.suffix == ".npy":
            self._f = open(self.path, "wb")
        else:
            raise ValueError(f"out must end in .npy or .npz, got {str(path)!r}")
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape}
        np.lib.format.write_array_header_2_0(self._f, header)

    def write(self, block) -> None:
        """Append rows ``(r, *shape[1:])`` (a tensor or array)."""
        arr = block.detach().cpu().numpy() if isinstance(block, Tensor) else np.asarray(block)
        if arr.shape[1:] != self.shape[1:]:
            raise ValueError(f"block rows must have shape {self.shape[1:]}, got {arr.shape[1:]}")
        if self.rows + arr.shape[0] > self.shape[0]:
            raise ValueError(f"writing {arr.shape[0]} rows would exceed the declared {self.shape[0]}")
        self._f.write(np.ascontiguousarray(arr, dtype=self.dtype).tobytes())
        self.rows += arr.shape[0]

    def close(self) -> None:
        self._f.close()
        if self._zip is not None:
            self._zip.close()
        if self.rows != self.shape[0]:
            raise ValueError(f"{self.path}: wrote {self.rows} rows of the declared {self.shape[0]}")

    def __enter__(self) -> "NpyStreamWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the original error; do not validate a half-written file
            self._f.close()
            if self._zip is not None:
                self._zip.close()


def _slice_kwargs(model_kwargs: dict | None, n: int, start: int, stop: int) -> dict:
    """Per-sample tensors (leading dimension ``n``) are sliced to the chunk; other values pass unchanged."""
    out = {}
    for k, v in (model_kwargs or {}).items():
        out[k] = v[start:stop] if isinstance(v, Tensor) and v.ndim > 0 and v.shape[0] == n else v
    return out


def iter_chunks(plan: ChunkPlan, sde: SDE, score_fn: Callable, sample_shape, chunks: Iterable[int], *,
                method: str, device=None, dtype=None, model_kwargs: dict | None = None,
                **sample_options) -> Iterator[tuple[int, Tensor, int]]:
    """Yield ``(c, samples, nfe)`` for each chunk index in ``chunks``, computed by [`sdegen.sample`][sdegen.chunked.sample]."""
    for c in chunks:
        start, stop = plan.bounds(c)
        res = sample(sde, score_fn, (stop - start, *sample_shape), method=method, device=device, dtype=dtype,
                     model_kwargs=_slice_kwargs(model_kwargs, plan.n_samples, start, stop),
                     **plan.randomness(c, sample_shape, device if device is not None else "cpu", dtype),
                     **sample_options)
        yield c, res.samples, res.nfe


def sample_chunked(sde: SDE, score_fn: Callable, n_samples: int, sample_shape, *, batch_size: int, method: str,
                   seed: int = 0, noise: str = "per_chunk", out=None, device=None, dtype=torch.float32,
                   model_kwargs: dict | None = None, chunks: Iterable[int] | None = None, progress: bool = False,
                   **sample_options) -> ChunkedResult:
    r"""Draw ``n_samples`` samples in chunks of ``batch_size`` with a reproducible seed plan.

    Every chunk is ``sdegen.sample(sde, score_fn, (b, *sample_shape), method=method, ...)`` with the
    chunk's generator (see the module docstring for the plans); results are moved to the CPU and
    either written to ``out`` as they finish or collected in memory.

    Args:
        sde (SDE): the forward SDE, as for [`sdegen.sample`][sdegen.chunked.sample].
        score_fn (Callable): the score, as for [`sdegen.sample`][sdegen.chunked.sample].
        method (str): a sampling method name, as for [`sdegen.sample`][sdegen.chunked.sample].
        **sample_options (Any): further options of [`sdegen.sample`][sdegen.chunked.sample] (``steps=``, ``eps=``,
            method options; not ``generator``/``seeds``/``shape``, which the plan sets).
        n_samples: total number of samples $n$.
        sample_shape (tuple[int, ...]): ``D``, the shape of one sample (e.g. ``(2,)`` or ``(1, 28, 28)``).
        batch_size: chunk size $b$ (memory is $O(b)$).
        seed: an int in ``[0, 2**24)``.
        noise: ``"per_chunk"`` or ``"per_sample"``.
        out (str | Path | None): ``None`` (return ``samples``) or a ``.npy``/``.npz`` path written in streaming fashion
            (in ``.npz`` the array is ``"samples"``).
        device (torch.device | str | None): where the chunks are computed.
        dtype (torch.dtype | None): precision of the chunks (the file is saved in it too).
        model_kwargs: passed to the score; tensors with leading dimension ``n_samples`` are per-sample
            inputs and are sliced to each chunk (e.g. the labels of all samples).
        chunks: compute only these chunk indices (default all, in order); the distributed sampler
            uses this. With ``out``, the file then holds just those chunks, in the order given.
        progress: a tqdm bar over chunks.

    Returns:
        [`ChunkedResult`][sdegen.chunked.ChunkedResult].
    """
    plan = ChunkPlan(n_samples, batch_size, seed, noise)
    if isinstance(sample_shape, int):
        sample_shape = (sample_shape,)
    sample_shape = tuple(sample_shape)
    for key in ("generator", "seeds", "shape", "x_T"):
        if key in sample_options:
            raise TypeError(f"sample_chunked sets {key} itself (from seed/noise and batch_size); do not pass {key}=")
    chunk_list = list(range(plan.n_chunks)) if chunks is None else [int(c) for c in chunks]
    rows = sum(plan.bounds(c)[1] - plan.bounds(c)[0] for c in chunk_list)
    t_start = time.perf_counter()
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    writer = NpyStreamWriter(out, (rows, *sample_shape), np_dtype) if out is not None else None
    held: list[Tensor] = []
    nfe = 0
    bar = progress_bar(progress, len(chunk_list), "chunks")
    try:
        for _, x, k in iter_chunks(plan, sde, score_fn, sample_shape, chunk_list, method=method, device=device,
                                   dtype=dtype, model_kwargs=model_kwargs, **sample_options):
            nfe += k
            if writer is not None:
                writer.write(x)
            else:
                held.append(x.detach().cpu())
            if bar is not None:
                bar.update(1)
    except BaseException:
        if writer is not None:
            writer.__exit__(RuntimeError, None, None)
        raise
    finally:
        if bar is not None:
            bar.close()
    if writer is not None:
        writer.close()
    samples = (torch.cat(held) if held else torch.empty(0, *sample_shape, dtype=dtype)) if writer is None else None
    return ChunkedResult(samples=samples, path=None if out is None else Path(out), n_samples=rows, nfe=nfe,
                         chunks=tuple(chunk_list), seconds=time.perf_counter() - t_start,
                         stats={"batch_size": batch_size, "seed": seed, "noise": noise, "method": method})
