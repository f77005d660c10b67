"""The soak benchmark (slow): many batches of sampling and likelihoods, no memory growth, no leaked graphs."""

import pytest

from sdegen.bench import soak


@pytest.mark.slow
def test_soak_shows_no_memory_growth_and_no_leaked_graphs(tmp_path):
    res = soak.run(tmp_path, quick=True)
    assert res["all_finite"]
    assert res["leaked_graphs"] == 0          # no returned tensor carries an autograd graph
    assert res["alive_after_del"] == 0        # nothing (e.g. a reference cycle) keeps results alive
    assert res["param_grads"] == 0            # likelihoods do not accumulate .grad into the model
    assert res["live_tensor_growth"] <= 0     # the number of live tensors is flat after warm-up
    # RSS after warm-up: allocator noise is a few MiB; a leak of one batch of results per iteration
    # (7 results of 64 x 2 floats plus graphs) would show as a steady slope, so bound both.
    assert res["growth_mib"] < 8.0
    assert res["slope_mib_per_iter"] < 1.0
    assert (tmp_path / "soak.json").exists() and (tmp_path / "soak.png").exists()
