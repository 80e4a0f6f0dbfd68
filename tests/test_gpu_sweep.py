"""The real-shape sweep script (run on a GPU) in its CPU smoke mode, and its planning on made-up costs."""

from dflash_vllm.bench.gpu_sweep import RATES, main, plan


def test_smoke_run_times_every_shape_and_plans_every_cell(tmp_path):
    out = main(["--smoke", "--json", str(tmp_path / "sweep.json")])
    batches = out["shapes"]["batches"]
    assert set(out["verify_seconds"]) == {str(b) for b in batches}
    assert all(t > 0 for v in out["verify_seconds"].values() for t in v.values())
    assert [(r["batch"], r["p"]) for r in out["rows"]] == [(b, p) for b in batches for p in RATES]
    assert all(0 <= r["draft_length"] <= 15 for r in out["rows"])
    assert (tmp_path / "sweep.json").stat().st_size > 0


def _costs(per_token_ms: float, batches=(1, 8, 64)) -> dict[int, dict[int, float]]:
    """A step costs 10 ms plus ``per_token_ms`` for each token it verifies."""
    return {b: {q: (10 + per_token_ms * b * q) / 1e3 for q in (1, 2, 4, 8, 16)} for b in batches}


def test_plan_drafts_fully_when_verification_is_free_and_stops_when_it_is_dear():
    free = plan(_costs(0.0), {1: 1e-3, 8: 1e-3, 64: 1e-3})
    assert all(r["draft_length"] == 15 for r in free if r["p"] >= 0.7)
    dear = plan(_costs(2.0), {1: 1e-3, 8: 1e-3, 64: 1e-3})
    at = {(r["batch"], r["p"]): r for r in dear}
    assert not at[64, 0.5]["drafting"] and at[64, 0.5]["draft_length"] == 0
    assert at[64, 0.5]["speedup_vs_plain"] == 1.0
    # the cut moves earlier as the batch grows, and never loses to plain decoding in the model
    for p in RATES:
        assert at[1, p]["draft_length"] >= at[8, p]["draft_length"] >= at[64, p]["draft_length"]
    assert all(r["speedup_vs_plain"] >= 1.0 for r in dear)
