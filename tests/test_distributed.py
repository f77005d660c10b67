"""Two CPU processes (torch.multiprocessing spawn + gloo): the gathered samples equal the
single-process run with the same seed plan, and data-parallel training keeps ranks identical."""

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sdegen
from sdegen.chunked import sample_chunked
from sdegen.distributed import sample_distributed, train_distributed, world

WORLD = 2


def _init(rank, store):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)


def _job():
    gm = sdegen.named_mixture("8gaussians")
    sde = sdegen.VPSDE()
    return sde, gm.score_fn(sde)


def _sample_worker(rank, store, outdir):
    _init(rank, store)
    try:
        sde, score = _job()
        assert world() == (rank, WORLD)
        for noise in ("per_chunk", "per_sample"):
            res = sample_distributed(sde, score, 250, (2,), batch_size=40, method="euler_maruyama", steps=10,
                                     seed=5, noise=noise, dtype=torch.float64)
            torch.save({"samples": res.samples, "nfe": res.nfe}, Path(outdir) / f"{noise}-rank{rank}.pt")
        res = sample_distributed(sde, score, 250, (2,), batch_size=40, method="euler_maruyama", steps=10,
                                 seed=5, out=Path(outdir) / "samples.npy", dtype=torch.float64)
        assert res.samples is None and res.path.name == "samples.npy"
    finally:
        dist.destroy_process_group()


def _spawn(fn, *args):
    mp.spawn(fn, args=args, nprocs=WORLD, join=True)


def test_sample_distributed_equals_single_process(tmp_path):
    _spawn(_sample_worker, str(tmp_path / "store"), str(tmp_path))
    sde, score = _job()
    for noise in ("per_chunk", "per_sample"):
        ref = sample_chunked(sde, score, 250, (2,), batch_size=40, method="euler_maruyama", steps=10, seed=5,
                             noise=noise, dtype=torch.float64)
        for rank in range(WORLD):
            got = torch.load(tmp_path / f"{noise}-rank{rank}.pt")
            # Bitwise: every chunk's randomness is fixed by (seed, chunk) whichever rank computes it.
            assert torch.equal(got["samples"], ref.samples)
            assert got["nfe"] == ref.nfe == 7 * 11
    ref = sample_chunked(sde, score, 250, (2,), batch_size=40, method="euler_maruyama", steps=10, seed=5,
                         dtype=torch.float64)
    assert np.array_equal(np.load(tmp_path / "samples.npy"), ref.samples.numpy())
    assert sorted(p.name for p in tmp_path.glob("samples.npy*")) == ["samples.npy"]   # shards removed


def _train_worker(rank, store, outdir):
    _init(rank, store)
    try:
        torch.manual_seed(100 + rank)        # different initial weights: the broadcast must align them
        net = sdegen.nn.MLP(2, hidden=16, depth=1)
        model = sdegen.ScoreModel(net, sdegen.VPSDE())
        data = sdegen.named_mixture("8gaussians", dtype=torch.float32).sample(
            512, generator=torch.Generator().manual_seed(rank))
        ckpt = Path(outdir) / "ckpt"
        out = train_distributed(model, data, steps=6, batch_size=32, lr=1e-2, ema=None, checkpoint_dir=ckpt,
                                checkpoint_every=3, progress=False, seed=1)
        torch.save({k: v.clone() for k, v in out.raw_model.state_dict().items()}, Path(outdir) / f"w{rank}.pt")
        torch.save(out.history, Path(outdir) / f"h{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_train_distributed_keeps_ranks_identical(tmp_path):
    _spawn(_train_worker, str(tmp_path / "store"), str(tmp_path))
    w0, w1 = torch.load(tmp_path / "w0.pt"), torch.load(tmp_path / "w1.pt")
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k
    h0, h1 = torch.load(tmp_path / "h0.pt"), torch.load(tmp_path / "h1.pt")
    assert len(h0) == len(h1) == 6
    assert h0 != h1                       # each rank saw its own batches
    assert all(math.isfinite(v) for v in h0)
    # Only rank 0 wrote checkpoints, and they load.
    assert (tmp_path / "ckpt").is_dir()
    loaded = sdegen.load(tmp_path / "ckpt", ema=False)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, w0[k]), k


def test_single_process_fallback():
    # Without a process group the distributed sampler is the chunked sampler.
    assert not dist.is_initialized() and "WORLD_SIZE" not in os.environ
    sde, score = _job()
    a = sample_distributed(sde, score, 30, (2,), batch_size=8, method="ode_euler", steps=4, seed=2)
    b = sample_chunked(sde, score, 30, (2,), batch_size=8, method="ode_euler", steps=4, seed=2)
    assert torch.equal(a.samples, b.samples)
