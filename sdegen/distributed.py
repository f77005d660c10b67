r"""Scale-out with ``torch.distributed``: sampling split across ranks, data-parallel training.

Launch with ``torchrun --nproc_per_node=K script.py`` (or ``torch.multiprocessing`` spawn); the
functions here join the process group from the environment if it is not initialised yet
([`init_from_env`][sdegen.distributed.init_from_env]: ``gloo`` on CPU, ``nccl`` when CUDA is available), and run as a single
process when there is no distributed environment at all.

**Sampling** ([`sample_distributed`][sdegen.distributed.sample_distributed]). The job uses the chunk plan of
[`sdegen.chunked`][sdegen.chunked]: chunk $c$ has its own seed derived from ``(seed, c)`` (or per-sample seeds),
and rank $r$ of $W$ computes chunks $c \equiv r \pmod W$. Since a chunk's samples depend only on the
plan, the gathered result is **identical** to ``sample_chunked`` in one process with the same
``seed``, ``batch_size`` and ``noise`` (and for ``noise="per_sample"`` independent of
``batch_size`` too), for any number of ranks.

**Training** ([`train_distributed`][sdegen.distributed.train_distributed]). Data parallelism around [`sdegen.train`][sdegen.training.train]: rank 0's
initial weights are broadcast, each rank draws its own batches (seed ``seed + rank``), and the
gradients are averaged over ranks before every optimiser step, so all ranks keep identical weights
(the update of DistributedDataParallel, Li et al. 2020). Only rank 0 writes checkpoints.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from .chunked import ChunkedResult, ChunkPlan, NpyStreamWriter, sample_chunked
from .sdes import SDE

__all__ = ["init_from_env", "world", "sample_distributed", "train_distributed"]


def init_from_env(backend: str | None = None) -> bool:
    r"""Join the process group described by ``torchrun``'s environment (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``, ``MASTER_PORT``) unless already joined. Returns whether a group is active.

    Args:
        backend: ``"gloo"`` or ``"nccl"`` (default: ``nccl`` if CUDA is available, else ``gloo``).
    """
    if dist.is_available() and dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the active group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(device) -> torch.device:
    """Tensors for collectives live on CUDA with nccl, on the CPU with gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device()) if device is None or torch.device(device).type != "cuda" \
            else torch.device(device)
    return torch.device("cpu")


def sample_distributed(sde: SDE, score_fn: Callable, n_samples: int, sample_shape, *, batch_size: int, method: str,
                       seed: int = 0, noise: str = "per_chunk", out=None, device=None, dtype=torch.float32,
                       model_kwargs: dict | None = None, progress: bool = False,
                       **sample_options) -> ChunkedResult:
    r"""Draw ``n_samples`` samples split across the ranks of the process group and gather them.

    Rank $r$ computes chunks $c \equiv r \pmod W$ of the [`ChunkPlan`][sdegen.chunked.ChunkPlan]. Then:

    - ``out=None``: the chunks are all-gathered; **every** rank returns the full ``(n, *shape)``
      CPU tensor in global order.
    - ``out`` a ``.npy``/``.npz`` path (on a file system all ranks see): each rank streams its chunks to
      a shard file, rank 0 merges the shards into ``out`` chunk by chunk in global order and removes
      them; every rank returns the path (``samples=None``).

    ``nfe`` is the total over all ranks. Arguments as in [`sdegen.chunked.sample_chunked`][sdegen.chunked.sample_chunked].
    With no process group this is ``sample_chunked`` in one process.
    """
    init_from_env()
    rank, size = world()
    plan = ChunkPlan(n_samples, batch_size, seed, noise)
    mine = list(range(rank, plan.n_chunks, size))
    if isinstance(sample_shape, int):
        sample_shape = (sample_shape,)
    sample_shape = tuple(sample_shape)
    if size == 1:
        return sample_chunked(sde, score_fn, n_samples, sample_shape, batch_size=batch_size, method=method,
                              seed=seed, noise=noise, out=out, device=device, dtype=dtype,
                              model_kwargs=model_kwargs, progress=progress, **sample_options)
    t0 = time.perf_counter()
    common = dict(batch_size=batch_size, method=method, seed=seed, noise=noise, device=device, dtype=dtype,
                  model_kwargs=model_kwargs, progress=progress and rank == 0, chunks=mine, **sample_options)
    comm = _comm_device(device)
    if out is None:
        local = sample_chunked(sde, score_fn, n_samples, sample_shape, **common)
        samples = _gather_chunks(plan, local.samples, size, sample_shape, dtype, comm)
        path = None
    else:
        out = Path(out)
        shard = out.with_name(f"{out.name}.rank{rank}-of-{size}.npy")
        local = sample_chunked(sde, score_fn, n_samples, sample_shape, out=shard, **common)
        dist.barrier()
        if rank == 0:
            _merge_shards(plan, out, size, sample_shape, dtype)
        dist.barrier()
        samples, path = None, out
    nfe = torch.tensor([local.nfe], dtype=torch.int64, device=comm)
    dist.all_reduce(nfe)
    return ChunkedResult(samples=samples, path=path, n_samples=n_samples, nfe=int(nfe.item()),
                         chunks=tuple(range(plan.n_chunks)), seconds=time.perf_counter() - t0,
                         stats={**local.stats, "world_size": size})


def _gather_chunks(plan: ChunkPlan, local: Tensor, size: int, sample_shape, dtype, comm) -> Tensor:
    # Every rank's block is padded to the largest block (rank 0 holds the most rows) for all_gather.
    rows = [sum(plan.bounds(c)[1] - plan.bounds(c)[0] for c in range(r, plan.n_chunks, size)) for r in range(size)]
    pad = torch.zeros(max(rows), *sample_shape, dtype=dtype, device=comm)
    pad[: local.shape[0]] = local.to(comm)
    blocks = [torch.empty_like(pad) for _ in range(size)]
    dist.all_gather(blocks, pad)
    out = torch.empty(plan.n_samples, *sample_shape, dtype=dtype)
    offsets = [0] * size
    for c in range(plan.n_chunks):
        r = c % size
        start, stop = plan.bounds(c)
        out[start:stop] = blocks[r][offsets[r]: offsets[r] + stop - start].cpu()
        offsets[r] += stop - start
    return out


def _merge_shards(plan: ChunkPlan, out: Path, size: int, sample_shape, dtype) -> None:
    shards = [out.with_name(f"{out.name}.rank{r}-of-{size}.npy") for r in range(size)]
    arrays = [np.load(p, mmap_mode="r") for p in shards]
    offsets = [0] * size
    np_dtype = torch.empty((), dtype=dtype).numpy().dtype
    with NpyStreamWriter(out, (plan.n_samples, *sample_shape), np_dtype) as writer:
        for c in range(plan.n_chunks):
            r = c % size
            start, stop = plan.bounds(c)
            writer.write(np.asarray(arrays[r][offsets[r]: offsets[r] + stop - start]))
            offsets[r] += stop - start
    del arrays
    for p in shards:
        p.unlink()


class _GradAverager:
    """Average every parameter's gradient over the ranks right after it is accumulated."""

    def __init__(self, params, size: int):
        self.size = size
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in params]

    def _hook(self, p: Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(self.size)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def train_distributed(model, data, *, steps: int, checkpoint_dir=None, seed: int = 0, **train_options: Any):
    r"""Data-parallel [`sdegen.train`][sdegen.training.train] over the ranks of the process group.

    Each rank passes its own ``data`` (the full set, or its shard) and draws batches with seed
    ``seed + rank``; the global batch is ``W * batch_size``. Before training, rank 0's parameters and
    buffers are broadcast. During training every parameter's gradient is all-reduced and divided by
    $W$ as soon as backpropagation produces it, before clipping and the optimiser step, so every rank
    applies the same update (this is DistributedDataParallel's synchronous update; it is done with
    gradient hooks because [`sdegen.train`][sdegen.training.train] owns the forward call and saves the plain module).

    Checkpoints: only rank 0 writes to ``checkpoint_dir`` (the other ranks train without one).
    Resuming a multi-rank run from an existing checkpoint is refused: [`sdegen.train`][sdegen.training.train] restores
    one RNG state and checks the seed, which cannot give each rank its own batches; resume it on
    one process, or start a fresh directory.

    Args:
        model (ScoreModel): [`ScoreModel`][sdegen.parameterization.ScoreModel], same architecture on every rank.
        data (Tensor | tuple[Tensor, Tensor]): as for [`sdegen.train`][sdegen.training.train].
        steps (int): as for [`sdegen.train`][sdegen.training.train].
        **train_options (Any): further options of [`sdegen.train`][sdegen.training.train].
        checkpoint_dir (str | Path | None): rank 0's checkpoint directory (visible to all ranks for resuming).
        seed: base seed.

    Returns:
        result (TrainResult): the [`TrainResult`][sdegen.training.TrainResult] of this rank (identical weights on every rank).
    """
    from .training import train  # the training stack is only needed here

    init_from_env()
    rank, size = world()
    if size == 1:
        return train(model, data, steps=steps, checkpoint_dir=checkpoint_dir, seed=seed, **train_options)
    comm = _comm_device(next(model.parameters()).device)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            buf = t.detach().to(comm).clone()
            dist.broadcast(buf, src=0)
            t.copy_(buf.to(t.device))
    if checkpoint_dir is not None and any(Path(checkpoint_dir).glob("*")):
        raise ValueError(f"checkpoint_dir {str(checkpoint_dir)!r} already holds files; resuming a run on "
                         f"{size} ranks is not supported (resume on one process, or use a fresh directory)")
    dist.barrier()          # every rank has checked before rank 0 creates the directory
    ckpt = checkpoint_dir if rank == 0 else None
    hooks = _GradAverager([p for p in model.parameters() if p.requires_grad], size)
    try:
        result = train(model, data, steps=steps, checkpoint_dir=ckpt, seed=seed + rank,
                       progress=train_options.pop("progress", False) and rank == 0, **train_options)
    finally:
        hooks.remove()
    dist.barrier()
    return result
