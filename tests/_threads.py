"""A fixture shared by the front-end tests (imported by them; pytest puts ``tests/`` on ``sys.path``)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these problems are tiny, and on a shared machine a second thread mostly
    waits to be scheduled (measured: an example's fast mode 41 s with two threads, 12 s with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
