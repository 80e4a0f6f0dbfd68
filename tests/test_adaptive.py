"""The adaptive draft-length rule as pure functions: made-up step costs and acceptance curves."""

import numpy as np
import pytest

from dflash_vllm.adaptive import (
    AcceptanceCalibrator,
    AdaptiveController,
    StepCostModel,
    choose_draft_lengths,
    speculation_pays,
)


def gpu_like_cost(fixed=10e-3, per_token=0.05e-3, knee=256):
    """Flat (memory-bound) up to ``knee`` tokens, then linear (compute-bound)."""
    return lambda n: fixed + per_token * np.maximum(np.asarray(n, dtype=np.float64) - knee, 0)


def cpu_like_cost(fixed=5e-3, per_token=0.25e-3):
    return lambda n: fixed + per_token * np.asarray(n, dtype=np.float64)


def curve(r, k=7, first=0.8, decay=0.9):
    """Per-position conditional acceptance, the same for every request."""
    return np.broadcast_to(first * decay ** np.arange(k, dtype=np.float64), (r, k))


@pytest.mark.parametrize(("cost", "single"), [(gpu_like_cost(), 7), (cpu_like_cost(), 4)],
                         ids=["gpu-like", "cpu-like"])
def test_cut_moves_earlier_as_the_batch_grows(cost, single):
    lengths = [int(choose_draft_lengths(curve(r), cost).max()) for r in (1, 4, 16, 64, 256)]
    assert lengths == sorted(lengths, reverse=True), lengths
    # flat cost: every draft; 0.25 ms a token against a 5 ms step: drafts 5+ gain < their cost
    assert lengths[0] == single
    assert lengths[-1] < lengths[0]


def test_no_drafts_when_verification_costs_more_than_any_gain():
    ruinous = lambda n: 1e-3 * np.asarray(n, dtype=np.float64)  # noqa: E731  a token costs a step's worth
    assert choose_draft_lengths(curve(8, first=0.5), ruinous).sum() == 0
    assert not speculation_pays(curve(1, first=0.5)[0], 8, ruinous, draft_cost=0.0)
    # free verification: all drafts pay, as long as the drafter itself is cheap
    free = lambda n: np.full(np.shape(n), 1e-2)  # noqa: E731
    assert speculation_pays(curve(1)[0], 8, free, draft_cost=1e-3)
    assert not speculation_pays(curve(1)[0], 8, free, draft_cost=1.0), "a drafter slower than its gain"


def test_requests_get_lengths_from_their_own_confidence():
    acc = np.array([[0.95] * 7, [0.9, 0.2, 0.1, 0.1, 0.1, 0.1, 0.1], [0.05] * 7])
    lengths = choose_draft_lengths(acc, cpu_like_cost(fixed=5e-3, per_token=1e-3)).tolist()
    assert lengths[0] > lengths[1] > lengths[2] == 0, lengths


def test_caps_are_maxima():
    caps = np.array([0, 2, 7])
    lengths = choose_draft_lengths(curve(3, first=0.99, decay=1.0), gpu_like_cost(), caps=caps)
    assert lengths.tolist() == [0, 2, 7]


def test_cost_model_profile_then_online():
    m = StepCostModel()
    assert not m.known()
    m.set_profile({1: 1e-3, 64: 2e-3, 512: 10e-3})
    c = m.cost([1.0, 64.0, 288.0, 512.0, 1024.0]).tolist()
    assert c[0] == pytest.approx(1e-3) and c[1] == pytest.approx(2e-3) and c[3] == pytest.approx(10e-3)
    assert c[1] < c[2] < c[3] < c[4], "interpolated between points, extrapolated beyond the last"
    # the running engine is twice as slow as the profile: observed buckets win, the others scale
    for _ in range(3):
        assert m.observe(64, 4e-3)
    c = m.cost([64.0, 512.0]).tolist()
    assert c[0] == pytest.approx(4e-3) and c[1] == pytest.approx(20e-3)
    assert not m.observe(64, 1.0), "an idle gap is not a step"


def test_calibrator_learns_what_vllm_accepts():
    cal = AcceptanceCalibrator(num_positions=4, prior_strength=1.0)
    hi, lo = np.full((1, 4), 0.95), np.full((1, 4), 0.15)
    for _ in range(200):  # the drafter is under-confident when it is sure, over-confident otherwise
        cal.observe(hi, [4], [4])
        cal.observe(lo, [4], [0])
    assert cal.estimate(hi).min() > 0.98
    assert cal.estimate(lo)[0, 0] < 0.02
    # only position 0 of the low-confidence drafts was ever tried; later positions borrow what their
    # confidence bin learnt there (pooled over positions) instead of trusting the raw confidence
    assert cal.estimate(lo)[0, 1] < 0.05
    rates = cal.position_rates(4)
    assert rates[0] < rates[1], "position 0 saw the rejections, later positions only acceptances"


def test_controller_stops_and_resumes_with_load():
    ctl = AdaptiveController(max_drafts=7)
    ctl.step_cost.set_profile({1: 5e-3, 8: 6e-3, 64: 20e-3, 512: 150e-3})
    for _ in range(50):  # a drafter whose first draft is accepted 60% of the time
        ctl.observe_outcomes(np.full((1, 7), 0.6), [7], [1])
    for _ in range(3):
        ctl.draft_cost.observe(8, 2e-3)
        ctl.draft_cost.observe(512, 40e-3)
    assert ctl.should_draft(1, 8, 7), "one request: drafting is nearly free"
    assert not ctl.should_draft(64, 512, 7), "64 requests: the drafter and verification cost more"
    assert ctl.should_draft(1, 8, 7), "the load dropped: speculation resumes"

