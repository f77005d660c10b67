"""The overhead benchmark's wiring (quick mode): its JSON holds every method and a consistent rk45/scipy table."""

import json

from sdegen.bench import overhead


def test_overhead_quick_writes_json_and_plot(tmp_path):
    summary = overhead.run(tmp_path, quick=True)
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert (tmp_path / "overhead.png").stat().st_size > 0
    assert set(data["per_step_us"]) == set(overhead.FIXED)
    assert {r["score"] for r in data["rk45_vs_scipy"]} == {"linear", "tiny-mlp", "oracle"}
    for r in data["rk45_vs_scipy"]:
        # The ratio is recomputed from the stored times; NFE of an adaptive solve is at least the
        # initial derivative + the first-step probe + one 6-stage step.
        assert r["ratio"] == r["scipy_ms"] / r["rk45_ms"]
        assert r["rk45_nfe"] >= 8 and r["scipy_nfe"] >= 8
    assert [r["score"] for r in data["em_vs_torchsde"]] == ["trivial", "oracle"]
    assert all(r["ratio"] == r["torchsde_ms"] / r["euler_maruyama_ms"] for r in data["em_vs_torchsde"])
    assert set(summary["rk45_over_scipy"]) == {f"{r['score']}/B=16/tol=0.001" for r in data["rk45_vs_scipy"]}
