"""Shared fixtures: one intra-op thread, a seeded generator, and the cuda marker (skipped without a GPU)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for every test: the tensors are small, the suite runs on 2 xdist workers
    on 2 cores, and on a shared machine a second thread mostly waits to be scheduled (measured: an
    example's fast mode 41 s with two threads, 12 s with one; small solver tests ~15x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def generator():
    """A CPU generator with a fixed seed (tests state their own seeds where it matters)."""
    return torch.Generator().manual_seed(1234)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
