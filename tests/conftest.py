"""Shared fixtures: a seeded generator, float64 by default for numerics, and the cuda marker."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Each xdist worker gets one intra-op thread so that workers do not oversubscribe the cores.
    torch.set_num_threads(1)


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
