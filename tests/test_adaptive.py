"""The adaptive draft-length rule as pure functions: made-up step costs and acceptance curves."""

import numpy as np
import pytest

from dflash_vllm.adaptive import (
    AcceptanceCalibrator,
    AdaptiveController,
    RequestFactors,
    StepCostModel,
    choose_draft_lengths,
    choose_draft_lengths_rows,
    choose_requests,
    monotone_fit,
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


def flat(seconds):
    return lambda n: np.full(np.shape(n), seconds)


def test_no_drafts_when_verification_costs_more_than_any_gain():
    ruinous = lambda n: 1e-3 * np.asarray(n, dtype=np.float64)  # noqa: E731  a token costs a step's worth
    assert choose_draft_lengths(curve(8, first=0.5), ruinous).sum() == 0
    gains = np.cumprod(curve(8, first=0.5), axis=1)
    assert not choose_requests(gains, ruinous, flat(0.0), 8).any()
    # free verification: all drafts pay, as long as the drafter itself is cheap
    gains = np.cumprod(curve(1), axis=1)
    assert choose_requests(gains, flat(1e-2), flat(1e-3), 8).all()
    assert not choose_requests(gains, flat(1e-2), flat(1.0), 8).any(), "a drafter slower than its gain"


def test_requests_chosen_by_their_expected_gain():
    good, poor = 0.9 ** np.arange(1, 8), 0.05 ** np.arange(1, 8)
    gains = np.stack([good, poor, good, np.zeros(7)])  # the last one disabled (cap 0)
    drafter = lambda n: 1e-3 + 0.05e-3 * np.asarray(n, dtype=np.float64)  # noqa: E731
    sel = choose_requests(gains, cpu_like_cost(), drafter, 8)
    assert sel.tolist() == [True, False, True, False], "the drafter runs for the requests that pay"
    # a drafter with a large fixed cost pays only with enough good requests to share it
    sel = choose_requests(gains[1:2], cpu_like_cost(), lambda n: np.full(np.shape(n), 4e-3), 8)
    assert not sel.any(), "one poor request alone: a plain step"


def test_request_factors_drop_a_failing_request_and_retry_it():
    f = RequestFactors()
    for _ in range(6):
        f.observe("good", accepted=3.0, expected=3.0)
        f.observe("bad", accepted=0.0, expected=3.0)
    good, bad = f.factors(["good", "bad"]).tolist()
    assert good == pytest.approx(1.0) and bad < 0.15
    assert f.factors(["new"]).tolist() == [1.0], "no evidence: the pooled rates"
    for _ in range(40):  # left out of the block pass: its evidence fades, so it is retried
        f.idle(["bad"])
    assert f.factors(["bad"])[0] > 0.5


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
    # live steps run 2 ms over the profile (scheduler, sampler): observed buckets win, the others shift
    for _ in range(3):
        assert m.observe(64, 4e-3)
    c = m.cost([64.0, 512.0]).tolist()
    assert c[0] == pytest.approx(4e-3) and c[1] == pytest.approx(12e-3)
    assert not m.observe(64, 1.0), "an idle gap is not a step"


def test_a_rarely_seen_slow_bucket_does_not_raise_every_larger_step():
    """Batch 1 on the CPU: 1 token (300 steps) and 8 tokens (300 steps) both cost about 5 ms, but
    the two steps seen at 2 tokens caught a stall (7 ms). A running maximum would price every draft
    at 7 ms; the weighted monotone fit averages the stray bucket into its neighbours."""
    m = StepCostModel()
    for _ in range(300):
        m.observe(1, 4.9e-3)
        m.observe(8, 5.1e-3)
    m.observe(2, 7.1e-3)
    m.observe(2, 7.1e-3)
    c = m.cost([1.0, 2.0, 8.0])
    assert np.all(np.diff(c) >= 0), "still non-decreasing"
    assert c[2] < 5.4e-3 and c[1] < 5.4e-3, c
    # one draft at a 30% chance pays on that near-flat curve (priced at 7.1 ms it would not)
    assert choose_draft_lengths(np.array([[0.3, 0, 0, 0, 0, 0, 0]]), m.cost, draft_cost=1e-3)[0] == 1


def test_a_lone_stalled_sample_does_not_cut_drafts_for_good():
    """Batch 1 on the CPU (figures of a debug run): 1-, 4- and 8-token steps all cost about 3 ms,
    the 8-token bucket seen a few times so far, and one 5-token step caught a stall (11 ms). Fitted
    as a point of the curve, that sample priced 8-token steps at ~5 ms and the cut sent 3 drafts
    from then on (so 5-8-token steps were never measured again): a lone sample is no point."""
    m = StepCostModel()
    for _ in range(300):
        m.observe(1, 2.2e-3)
        m.observe(4, 2.8e-3)
    for _ in range(3):
        m.observe(8, 3.1e-3)
    assert m.observe(5, 11e-3)
    assert m.cost1(8) < 3.3e-3, m.points()
    rates = np.array([[0.63, 0.74, 0.61, 0.77, 0.94, 0.94, 0.83]])
    assert choose_draft_lengths(rates, m.cost, draft_cost=0.8e-3)[0] == 7


def test_the_cut_sends_every_draft_now_and_then():
    """Lengths the cut avoids get measured: one cut in ``full_every`` sends what the caps allow."""
    ctl = AdaptiveController(max_drafts=7, full_every=4)
    ctl.step_cost.set_profile({1: 5e-3, 2: 10e-3, 8: 40e-3})  # every draft costs more than it yields
    conf, caps = np.full((2, 7), 0.2), np.array([7, 3])
    lengths = [ctl.cut(conf, caps).tolist() for _ in range(8)]
    assert lengths == [[0, 0]] * 3 + [[7, 3]] + [[0, 0]] * 3 + [[7, 3]], lengths


def test_a_lone_drafting_request_sends_all_its_drafts():
    """The cut runs when two or more requests draft: where every draft costs more than it yields, a
    pair of requests sends none, a lone one every draft its cap allows (and with the cut on from
    one request, none)."""
    ctl = AdaptiveController(max_drafts=7, full_every=0)
    ctl.step_cost.set_profile({1: 5e-3, 2: 10e-3, 8: 40e-3})
    assert ctl.cut(np.full((2, 7), 0.2), np.array([7, 3])).tolist() == [0, 0]
    assert ctl.cut(np.full((1, 7), 0.2), np.array([5])).tolist() == [5]
    ctl = AdaptiveController(max_drafts=7, full_every=0, cut_from_reqs=1)
    ctl.step_cost.set_profile({1: 5e-3, 2: 10e-3, 8: 40e-3})
    assert ctl.cut(np.full((1, 7), 0.2), np.array([5])).tolist() == [0]


def random_cut_case(rng):
    """A calibrator that has learnt from random outcomes, a cost model with a random profile and
    online steps, and a batch's confidences (some at bin edges), caps and drafting cost."""
    k, r = int(rng.integers(1, 9)), int(rng.integers(1, 17))
    cal = AcceptanceCalibrator(k, prior_strength=float(rng.choice([0.5, 4.0])))
    n = int(rng.integers(0, 300))
    if n:
        cal.observe(rng.random((n, k)).astype(np.float32), rng.integers(0, k + 1, n), rng.integers(0, k + 1, n))
    cost = StepCostModel()
    cost.set_profile({int(t): 3e-3 + 1e-3 * rng.random() * t ** rng.uniform(0.5, 1.2)
                      for t in rng.integers(1, 600, 6).tolist()})
    for _ in range(int(rng.integers(0, 20))):
        cost.observe(int(rng.integers(1, 200)), 3e-3 + 2e-4 * rng.random())
    conf = rng.random((r, k)).astype(np.float32)
    conf[rng.random((r, k)) < 0.2] = rng.choice([0.0, 0.5, 0.95, 1.0])
    return cal, cost, conf, rng.integers(0, k + 1, r), float(rng.choice([0.0, 1e-3, 3e-3]) * rng.random())


def test_the_plain_python_cut_gives_the_numpy_cut_exactly():
    """``estimate_rows`` and ``choose_draft_lengths_rows`` (the cut of a few requests' drafts) are
    the NumPy rule in plain Python: the same estimates to the bit and the same lengths."""
    rng = np.random.default_rng(7)
    for _ in range(500):
        cal, cost, conf, caps, draft = random_cut_case(rng)
        rows = cal.estimate_rows(conf.tolist())
        assert np.array_equal(np.array(rows), cal.estimate(conf))
        want = choose_draft_lengths(cal.estimate(conf), cost.cost, caps=caps, draft_cost=draft).tolist()
        assert choose_draft_lengths_rows(rows, cost.cost_table, caps.tolist(), draft_cost=draft) == want
    table = cost.cost_table(300)
    assert len(table) > 300 and table[:301] == cost.cost(np.arange(301)).tolist()
    # a draft that leaves the rate exactly as it was is not sent (the first maximum), in both
    step = lambda n: np.where(np.asarray(n) <= 2, 2.0, 2.5)  # noqa: E731  2 tokens/2 s = 2.5/2.5 s
    assert choose_draft_lengths(np.array([[0.5], [0.0]]), step).tolist() == [0, 0]
    assert choose_draft_lengths_rows([[0.5], [0.0]], lambda n: step(np.arange(n + 1)).tolist(), [1, 1]) == [0, 0]
    assert choose_draft_lengths_rows([[0.75], [0.0]], lambda n: step(np.arange(n + 1)).tolist(), [1, 1]) == [1, 0]


def test_the_calibrators_list_tables_follow_what_it_learns():
    cal = AcceptanceCalibrator(num_positions=2, prior_strength=1.0)
    conf = [[0.9, 0.9]]
    before = cal.estimate_rows(conf)
    for _ in range(50):
        cal.observe(np.array(conf), [2], [0])  # rejected every time
    after = cal.estimate_rows(conf)
    assert after[0][0] < 0.1 < before[0][0]
    assert np.array_equal(np.array(after), cal.estimate(np.array(conf)))


def test_the_controllers_cut_takes_either_path_to_the_same_lengths(monkeypatch):
    import dflash_vllm.adaptive as adaptive

    rng = np.random.default_rng(3)
    for _ in range(100):
        cal, cost, conf, caps, draft = random_cut_case(rng)
        got = []
        for most in (10_000, 0):  # plain Python, then NumPy
            monkeypatch.setattr(adaptive, "ROWS_CUT_MAX_DRAFTS", most)
            ctl = AdaptiveController(max_drafts=conf.shape[1], full_every=0)
            ctl.calibrator, ctl.step_cost = cal, cost
            got.append(ctl.cut(conf, caps, draft_seconds=draft))
        assert got[0].dtype == got[1].dtype == np.int64 and got[0].tolist() == got[1].tolist()


def test_plain_path_steps_are_not_points_of_the_speculative_step_cost():
    """A step of vLLM's plain path (no rejection sampler, aux-state gather or drafter context pass)
    is timed into ``plain_cost``; only speculative-path steps shape the curve the cut prices drafts
    on. Mixed, plain 1-token steps next to drafting 8-token steps made a first draft look dear."""
    ctl = AdaptiveController(max_drafts=7)
    now = 0.0
    for _ in range(8):
        ctl.end_step(now)
        now += 4e-3
        ctl.begin_step(now, 1, plain=True)
        ctl.end_step(now)
        now += 9e-3
        ctl.begin_step(now, 8)
    assert ctl.plain_cost.cost1(1) == pytest.approx(4e-3)
    assert ctl.step_cost.cost1(8) == pytest.approx(9e-3)
    assert ctl.step_cost.bucket(1) not in ctl.step_cost.online


def test_monotone_fit_pools_violators_by_weight():
    assert monotone_fit(np.array([1.0, 2.0, 3.0]), np.ones(3)).tolist() == [1.0, 2.0, 3.0]
    out = monotone_fit(np.array([1.0, 4.0, 2.0, 5.0]), np.array([1.0, 1.0, 3.0, 1.0]))
    assert out.tolist() == pytest.approx([1.0, 2.5, 2.5, 5.0])


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


def test_calibrator_counts_drafts_sent_without_a_confidence_toward_their_position_only():
    # a lone drafting request sends its drafts uncut, and no confidence is computed for them
    cal = AcceptanceCalibrator(num_positions=3, prior_strength=1.0, prior_rate=0.7)
    for _ in range(100):  # draft 0 accepted, draft 1 rejected, draft 2 never tried
        cal.observe(np.full((1, 3), np.nan), [3], [1])
    rates = cal.position_rates(3)
    assert rates[0] > 0.95 and rates[1] < 0.05 and rates[2] == pytest.approx(0.7)
    assert cal.attempts.sum() == 0, "no confidence bin learnt from them"
    assert cal.estimate(np.full((1, 3), 0.5)) == pytest.approx(np.full((1, 3), 0.5))
    cal.observe(np.array([[0.95, np.nan, 0.2]]), [3], [3])  # a row may mix both
    assert cal.attempts[0].sum() == 1 and cal.attempts[2].sum() == 1 and cal.unbinned_attempts[1] == 101


def test_controller_stops_and_resumes_with_load():
    ctl = AdaptiveController(max_drafts=7)
    ctl.step_cost.set_profile({1: 5e-3, 8: 6e-3, 64: 20e-3, 512: 150e-3})
    for _ in range(50):  # a drafter whose first draft is accepted 60% of the time
        ctl.observe_outcomes(np.full((1, 7), 0.6), [7], [1])
    for _ in range(3):
        ctl.draft_cost.observe(8, 2e-3)
        ctl.draft_cost.observe(512, 40e-3)
    ids = [f"r{i}" for i in range(64)]
    full = np.full(64, 7)
    assert ctl.select(ids[:1], full[:1], 8).all(), "one request: drafting is nearly free"
    assert not ctl.select(ids, full, 8).any(), "64 requests: the drafter and verification cost more"
    assert ctl.select(ids[:1], full[:1], 8).all(), "the load dropped: speculation resumes"


def test_a_batch_drafting_in_full_keeps_its_choice_for_a_few_steps():
    """select() re-runs the cost model every ``reselect_every`` steps for an unchanged batch whose
    every request it chose; a new batch is decided at once."""
    ctl = AdaptiveController(max_drafts=7, reselect_every=4)
    ctl.step_cost.set_profile({1: 5e-3, 8: 5.5e-3})
    for _ in range(ctl.warmup_drafts + 2):
        ctl.end_step(0.0, 1, 8, 1e-4)  # a cheap drafter: drafting pays
    one = np.full(1, 7)
    assert ctl.select(["a"], one, 8).all()
    ctl.step_cost.set_profile({1: 5e-3, 8: 0.5})  # verifying drafts now costs 100x a plain step
    picks = [bool(ctl.select(["a"], one, 8).any()) for _ in range(4)]
    assert picks == [True, True, True, False], "kept for 3 more steps, then re-decided"
    assert ctl.select(["a"], np.zeros(1, dtype=np.int64), 8).sum() == 0, "new caps: decided at once"


def test_a_settled_drafting_batch_skips_the_mode_choice_and_still_retries_on_time(monkeypatch):
    """While the measured rates have settled on drafting, a batch drafting in full keeps mode and
    choice for ``reselect_every`` steps without asking either (the controller's Python is the cost
    at one request); the kept steps count toward the next retry of plain decoding, which comes at
    most ``reselect_every - 1`` steps late. While a mode is still being learnt, every step asks."""
    from dflash_vllm.adaptive import PlainOrDraft

    calls = []
    real = PlainOrDraft.prefer_draft
    monkeypatch.setattr(PlainOrDraft, "prefer_draft", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))

    def controller() -> AdaptiveController:
        ctl = AdaptiveController(max_drafts=7, reselect_every=8, few=False)  # the pooled choice
        ctl.step_cost.set_profile({1: 5e-3, 8: 5.5e-3})
        for _ in range(ctl.warmup_drafts + 2):
            ctl.end_step(0.0, 1, 8, 1e-4)  # a cheap drafter: drafting pays
        return ctl

    one = np.full(1, 7)
    learning = controller()
    assert all(learning.select(["a"], one, 8).all() for _ in range(16))
    assert len(calls) == 16, "drafting's rate not yet known: every step asks"

    ctl = controller()
    for _ in range(ctl.modes.warmup_drafts + 20):
        ctl.modes.observe(1, True, 4.0, 8e-3)  # drafting: 500 tokens/s
    for _ in range(20):
        ctl.modes.observe(1, False, 1.0, 4e-3)  # plain steps: 250 tokens/s
    known = ctl.modes._known(PlainOrDraft.bucket(1))
    # at one request drafting's rate is this text's: its expected yield over the measured cycle time
    interval = ctl.modes.explore_interval(known["plain"], PlainOrDraft.text_rate(known["draft"], ctl.draft_yield(["a"])))
    calls.clear()
    picks = [bool(ctl.select(["a"], one, 8).any()) for _ in range(interval + 16)]
    first_plain = picks.index(False)
    assert interval - 1 <= first_plain < interval - 1 + ctl.reselect_every, (interval, first_plain)
    assert picks[first_plain:first_plain + ctl.modes.explore_cycles] == [False] * ctl.modes.explore_cycles
    assert len(calls) <= first_plain // ctl.reselect_every + ctl.modes.explore_cycles + 4, "one ask per 8 steps"
    assert ctl.select(["b"], one, 8).all() and len(calls) > first_plain // ctl.reselect_every + 4, \
        "another batch: asked at once"


def test_controller_leaves_out_the_request_the_drafter_cannot_predict():
    ctl = AdaptiveController(max_drafts=7)
    ctl.step_cost.set_profile({1: 5e-3, 4: 5.2e-3, 32: 6e-3})
    ctl.draft_cost.observe(32, 3e-3)  # a drafter that costs 60% of a plain step
    ctl.draft_cost.observe(32, 3e-3)
    ids, caps = ["a", "b", "c", "d"], np.full(4, 7)
    for _ in range(10):
        ctl.observe_outcomes(np.full((4, 7), 0.8), [7] * 4, [5, 5, 5, 0], ids)
    assert ctl.select(ids, caps, 8).tolist() == [True, True, True, False]
    assert not ctl.select(["d"], caps[:1], 8).any(), "alone, it decodes plainly"


def test_measured_rates_pick_the_faster_mode_and_keep_checking():
    from dflash_vllm.adaptive import PlainOrDraft

    m = PlainOrDraft()
    rates = {True: 800.0, False: 1300.0}  # drafting delivers fewer tokens/s than plain steps here
    choices = []
    for _ in range(600):
        d = m.prefer_draft(16)
        choices.append(d)
        m.observe(16, d, tokens=rates[d] * 0.01, seconds=0.01)
    late = choices[100:]
    assert sum(late) / len(late) < 0.05, "the slower mode is only retried now and then"
    assert any(late), "...but it is retried"
    rates[True] = 3000.0  # the text turned predictable: drafting wins again
    for _ in range(400):
        d = m.prefer_draft(16)
        choices.append(d)
        m.observe(16, d, tokens=rates[d] * 0.01, seconds=0.01)
    assert sum(choices[-100:]) > 90
    assert not m.observe(16, True, tokens=1, seconds=30.0), "an idle gap is not a step"


def test_retrying_the_slower_mode_costs_about_the_exploration_budget():
    """Plain cycles: 16 tokens in 10 ms (1600 tokens/s); drafting cycles, as under load: 40 tokens
    in 40 ms (1000 tokens/s). Time lost to retried drafting, against plain decoding throughout,
    stays near the 1% budget; a near tie is re-checked far more often."""
    from dflash_vllm.adaptive import PlainOrDraft

    m = PlainOrDraft(explore_budget=0.01)
    cycles = {True: (40.0, 0.04), False: (16.0, 0.01)}
    elapsed = lost = 0.0
    tries = 0
    for _ in range(5000):
        d = m.prefer_draft(16)
        tokens, seconds = cycles[d]
        m.observe(16, d, tokens=tokens, seconds=seconds)
        elapsed += seconds
        if d:
            tries += 1
            lost += seconds - tokens / 1600.0
    assert 0.005 < lost / elapsed < 0.015 and tries > 20, (lost / elapsed, tries)
    known = m._known(m.bucket(16))
    # 4 drafting cycles (40 ms each) per retry, each losing 40 ms x (1 - 1000/1600) = 15 ms against
    # plain steps: 60 ms per retry, 1% of 600 plain cycles of 10 ms
    assert m.explore_interval(known["draft"], known["plain"], 16) == 600
    tie = [1550.0, 99, 62.0, 0.04, 1.0]  # 1550 tokens/s drafting against 1600 plain
    assert m.explore_interval(tie, known["plain"], 16) <= 60, "a near tie is re-checked ten times as often"
    # the same loser judged on 9 cycles only: [rate, count, tokens, seconds, cycles, sum of per-cycle
    # rates, sum of their squares]. Rates spread +-1000 tokens/s a cycle leave 1600 within reach
    # (1000 + 2 x 1000 / 3): re-checked soon; spread +-200 they do not, and the budget rules
    thin = [1000.0, 9, 360.0, 0.36, 9.0, 9000.0, 9 * (1000.0**2 + 1000.0**2)]
    assert not m.clearly_behind(thin, known["plain"])
    assert m.explore_interval(thin, known["plain"], 16) == 4 * m.explore_min
    steady = [1000.0, 9, 360.0, 0.36, 9.0, 9000.0, 9 * (1000.0**2 + 200.0**2)]
    assert m.clearly_behind(steady, known["plain"])
    assert m.explore_interval(steady, known["plain"], 16) == 600
    # at a few requests drafting's rate is one text's: an early judgement is re-checked soon all the same
    assert m.explore_interval(steady, known["plain"], 4) == m.explore_interval(steady, known["plain"]) == 4 * m.explore_min


def test_a_clear_loser_on_its_first_cycles_is_not_retried_early():
    """At 64 requests under load, drafting cycles deliver about half the plain rate, each +-15%
    (plain: 64 tokens in 11 ms; drafting: 45 ms). Its first 8 cycles already say so beyond doubt:
    no quick re-check follows them (each would cost ~20% of the steps it covers), only the budget's
    retries. A drafting rate within its spread of plain decoding is still re-checked soon."""
    from dflash_vllm.adaptive import PlainOrDraft

    rng = np.random.default_rng(0)

    def drafting_cycles(ratio: float, steps: int) -> int:
        m = PlainOrDraft()
        n = 0
        for _ in range(steps):
            d = m.prefer_draft(64)
            if d:
                n += 1
                m.observe(64, True, tokens=ratio * 64 * 45 / 11 * rng.uniform(0.85, 1.15), seconds=0.045)
            else:
                m.observe(64, False, tokens=64.0, seconds=0.011 * rng.uniform(0.97, 1.03))
        return n

    # the 3 warm-up cycles and the 8 that measure drafting, then plain decoding until the budget's retry
    assert drafting_cycles(0.5, 600) == 3 + 8
    # a near tie (0.95x): the quick re-checks run (4 cycles every <= 32 steps) until 16 cycles are in
    assert drafting_cycles(0.95, 600) >= 3 + 16


def _one_request(m, steps: int, draft_cycle) -> list[bool]:
    """``steps`` cycles of PlainOrDraft at one request: plain cycles give 1 token in 4 ms (250
    tokens/s), ``draft_cycle(n)`` the tokens and seconds of the n-th drafting cycle. The choices."""
    drafts, choices = 0, []
    for _ in range(steps):
        d = m.prefer_draft(1)
        choices.append(d)
        if d:
            drafts += 1
            tokens, seconds = draft_cycle(drafts)
        else:
            tokens, seconds = 1.0, 0.004
        m.observe(1, d, tokens=tokens, seconds=seconds)
    return choices


def test_a_fresh_engines_first_drafting_cycles_do_not_price_drafting_out():
    """Drafting gives 4 tokens in 12 ms (333 tokens/s) against 250 for plain cycles, but a fresh
    engine's first three drafting cycles pay one-off costs (1 token in 15 ms each, as measured on
    CPU). They are not counted: drafting is the choice from the start, plain decoding only retried."""
    from dflash_vllm.adaptive import PlainOrDraft

    m = PlainOrDraft()
    choices = _one_request(m, 600, lambda n: (1.0, 0.015) if n <= 3 else (4.0, 0.012))
    assert m.rates[0]["draft"][0] == pytest.approx(333.3, rel=1e-3)
    assert sum(choices[100:]) / 500 > 0.85  # plain retried now and then: ~1% of the time lost


def test_drafting_misjudged_by_an_unlucky_stretch_wins_back():
    """After the warm-up, eight drafting cycles in a row yield a single token (text the drafter
    cannot predict, then predictable text again): plain decoding wins for a while, and drafting,
    judged on few cycles and so retried every 32 steps, takes over again."""
    from dflash_vllm.adaptive import PlainOrDraft

    m = PlainOrDraft()
    bad = range(m.warmup_drafts + 1, m.warmup_drafts + 9)
    choices = _one_request(m, 1500, lambda n: (1.0 if n in bad else 4.0, 0.012))
    assert not all(choices[:60]), "the unlucky stretch makes plain decoding look better"
    assert sum(choices[-500:]) / 500 > 0.85


def _requests_one_at_a_time(ctl, texts: list[str], tokens_each: int = 128) -> list[list[bool]]:
    """Requests served one after another, ``tokens_each`` tokens each: a plain cycle gives 1 token in
    4 ms (250 tokens/s); a drafting cycle on ``hard`` text 1-4 tokens in 11 ms (~160 tokens/s, widely spread), on
    ``easy`` text 7 in 10 ms (700 tokens/s). The drafts' outcomes are learnt as the engine learns
    them (a lone request's 7 drafts, no confidences). Per request, the controller's choice at every
    step."""
    rng = np.random.default_rng(0)
    out = []
    for i, text in enumerate(texts):
        rid, done, choices = f"req{i}", 0, []
        while done < tokens_each:
            d = ctl.wants_draft(1, [rid])
            if d:
                assert ctl.select([rid], np.array([7]), 8).all()
                tokens, seconds = (float(rng.choice([1, 1, 1, 2, 4])), 0.011) if text == "hard" else (7.0, 0.010)
                ctl.observe_outcomes(np.full((1, 7), np.nan), [7], [int(tokens) - 1], [rid])
            else:
                tokens, seconds = 1.0, 0.004
            ctl.modes.observe(1, d, tokens=tokens, seconds=seconds)
            choices.append(d)
            done += tokens
        out.append(choices)
    return out


def test_a_new_request_retries_drafting_judged_on_another_text():
    """At one request, drafting priced out by hard text (a warm-up, then a hard request) is retried
    when the next request begins, not a few hundred steps later: each easy request drafts from its
    first steps. Without the retry on new text, the first easy request runs mostly plain."""
    texts = ["hard", "hard", "easy", "easy", "hard", "easy"]
    runs = _requests_one_at_a_time(AdaptiveController(max_drafts=7, few=False), texts)
    assert sum(runs[1]) <= 4, "on hard text plain decoding wins (one 4-cycle retry)"
    for i in (2, 3, 5):
        assert any(runs[i][:4]) and sum(runs[i]) / len(runs[i]) > 0.8, (i, runs[i][:20])
    ctl = AdaptiveController(max_drafts=7, few=False)
    ctl.modes.turnover_factor = 1  # retries on the budget alone
    late = _requests_one_at_a_time(ctl, texts)
    assert sum(late[2]) / len(late[2]) < 0.5, "the budget alone retries too late for this request"


def test_a_retry_at_one_request_is_not_vetoed_by_another_texts_rates():
    """Drafts learnt on hard text (1 in 7 accepted) make the cost model veto drafting for any new
    request before the drafter runs. A retry of drafting at one request still drafts: it is there
    to measure this request's text (the cut then decides on the drafter's confidences)."""
    ctl = AdaptiveController(max_drafts=7, few=False)  # the pooled choice
    ctl.step_cost.set_profile({1: 4e-3, 8: 5e-3, 64: 20e-3})
    for _ in range(3):
        ctl.draft_cost.observe(8, 3e-3)
    for _ in range(50):
        ctl.observe_outcomes(np.full((1, 7), 0.5), [7], [0])
    caps = np.array([7])
    assert not ctl.select(["old"], caps, 8).any(), "the pooled rates veto drafting"
    for _ in range(12):  # drafting priced out at one request: 130 tokens/s against 250
        ctl.modes.observe(1, True, tokens=1.3, seconds=0.01)
        ctl.modes.observe(1, False, tokens=1.0, seconds=0.004)
    retried = False
    for _ in range(200):  # plain steps until drafting is retried
        if ctl.wants_draft(1, ["new"]):
            assert ctl.modes.retrying
            assert ctl.select(["new"], caps, 8).all(), "the retry drafts"
            retried = True
            break
        ctl.plain_step(0.0, 1, 1)
    assert retried


def test_at_a_few_requests_drafting_is_priced_on_this_texts_expected_yield():
    """At one request the measured drafting rate mixes texts: here the warm-up's text yielded 1.5
    tokens per 10 ms drafting cycle (150 tokens/s) against 250 for plain cycles. The choice takes
    drafting's cycle time from the measurements and its yield from what the drafts of this request
    are expected to give: a request the pooled rates expect 3 accepted drafts of drafts (400 tokens/s),
    one whose drafts keep failing does not; under load the measured rate stands."""
    from dflash_vllm.adaptive import PlainOrDraft

    m = PlainOrDraft()
    m.warmup_drafts = 0
    for _ in range(20):
        m.observe(1, True, 1.5, 0.010)
        m.observe(1, False, 1.0, 0.004)
        m.observe(16, True, 24.0, 0.010)
        m.observe(16, False, 16.0, 0.004)
    assert not m.prefer_draft(1), "measured: plain decoding wins"
    assert m.prefer_draft(1, draft_yield=4.0) and m.settled
    assert not m.prefer_draft(1, draft_yield=2.0)
    assert not m.prefer_draft(16, draft_yield=64.0), "under load the batch's measured rate stands"

    ctl = AdaptiveController(max_drafts=7, few=False)  # the pooled choice
    ctl.modes = m
    for _ in range(40):  # the traffic's drafts: ~3 of 7 accepted
        ctl.observe_outcomes(np.full((1, 7), np.nan), [7], [3], ["other"])
    assert ctl.draft_yield(["new"]) == pytest.approx(4.0, abs=0.4)
    assert ctl.wants_draft(1, ["new"]), "a request with no record of its own: the traffic's yield"
    for _ in range(4):
        ctl.observe_outcomes(np.full((1, 7), np.nan), [7], [0], ["hard"])
    assert ctl.draft_yield(["hard"]) < 2.0
    before = ctl.requests.factors(["hard"])[0]
    assert not ctl.wants_draft(1, ["hard"])
    assert ctl.requests.factors(["hard"])[0] > before, "its record fades while it decodes plainly"
    retried = next(i for i in range(200) if ctl.wants_draft(1, ["hard"]))
    assert 5 < retried < 60


def test_new_requests_under_load_do_not_bring_early_retries():
    """At 16 requests the batch's rate averages many texts: a batch of new requests every step does
    not retry drafting sooner than the exploration budget allows. (Were 16 requests "a few", the
    same run would retry drafting far more often.)"""
    from dflash_vllm.adaptive import PlainOrDraft

    def tries(make) -> float:
        # over six runs: one run's share of retried cycles follows its draws (1.5-2.9x apart)
        choices = []
        for seed in range(6):
            m, rng = make(), np.random.default_rng(seed)
            for i in range(3000):
                d = m.prefer_draft(16, new_text=True)
                if i >= 500:
                    choices.append(d)
                # drafting: 16-64 tokens per 40 ms (800 tokens/s, widely spread); plain: 16 in 13.5 ms
                m.observe(16, d, *((float(rng.choice([16, 16, 24, 40, 64])), 0.04) if d else (16.0, 0.0135)))
        return sum(choices) / len(choices)

    under_load = tries(PlainOrDraft)
    assert 0 < under_load < 0.02, f"retries at the budget's pace (~4 cycles in 400), not {under_load:.3f}"
    assert tries(lambda: PlainOrDraft(turnover_max_reqs=16)) > 2 * under_load


def test_a_retry_of_drafting_waits_while_the_batch_runs_in_lockstep():
    """Requests that would end within a few steps of each other decoding plainly (a closed loop of
    equal-length requests) stay so while no retry of drafting spreads them: a due retry is held while the
    batch runs in lockstep, and starts at the first step out of it. At a few requests, and while
    no retry is due, lockstep is not even asked."""
    from dflash_vllm.adaptive import PlainOrDraft

    def trained() -> PlainOrDraft:
        m = PlainOrDraft()
        m.warmup_drafts = 0
        for _ in range(20):  # drafting 1,200 tokens/s, plain 1,600, at 16 and at 2 requests
            m.observe(16, True, 48.0, 0.040)
            m.observe(16, False, 16.0, 0.010)
            m.observe(2, True, 6.0, 0.005)
            m.observe(2, False, 2.0, 0.00125)
        return m

    asked = []

    def lockstep(answer: bool):
        def ask() -> bool:
            asked.append(answer)
            return answer
        return ask

    free, held = trained(), trained()
    free_tries = [free.prefer_draft(16, lockstep=lockstep(False)) for _ in range(2000)]
    n_asked = len(asked)
    assert 4 <= sum(free_tries) < 200 and 0 < n_asked <= sum(free_tries), "asked only when a retry is due"
    assert free.held == 0
    held_tries = [held.prefer_draft(16, lockstep=lockstep(True)) for _ in range(2000)]
    assert not any(held_tries) and held.held > 1000, "held for as long as the batch runs in lockstep"
    assert held.settled and not held.retrying
    assert held.prefer_draft(16, lockstep=lockstep(False)), "out of lockstep: the due retry starts at once"
    assert held.retrying
    asked.clear()
    few = trained()
    assert sum(few.prefer_draft(2, lockstep=lockstep(True)) for _ in range(2000)) >= 4 and not asked, (
        "at a few requests drafting is priced on the text, retries are not held")

    # and from a drafting step (a closed loop's first request drafted alone; its companions joined)
    ctl = AdaptiveController(max_drafts=7)
    ctl.modes = trained()
    ids, caps = [f"r{i}" for i in range(16)], np.full(16, 7)
    assert not any(ctl.select(ids, caps, 8, lockstep(True)).any() for _ in range(2000))
    assert ctl.declined and ctl.modes.held > 0
    assert ctl.select(ids, caps, 8, lockstep(False)).any(), "out of lockstep: the due retry drafts"


def test_cycles_are_counted_by_mode_not_by_drafts_sent():
    """A drafting step whose drafts were all cut, and the step that hands over to plain decoding,
    are costs of drafting: their cycles count as drafting, whatever they sent. Only plain steps
    (and, with plain steps off, declined ones) feed the plain rate."""
    ctl = AdaptiveController(max_drafts=7)
    ctl.modes.warmup_drafts = 0
    now = 0.0
    for _ in range(10):  # drafting mode: a step with drafts (40 tokens in 20 ms), then one without
        ctl.close_cycle(now, 16, 0)
        ctl.open_cycle(now, 16, 40)
        now += 0.02
        ctl.close_cycle(now, 56, 24)  # 16 + 40 tokens verified, 24 drafts accepted
        ctl.open_cycle(now, 16, 0)  # all drafts cut: 16 tokens, and the context write, in 15 ms
        now += 0.015
    for _ in range(10):  # plain steps: 16 tokens in 8 ms
        ctl.plain_step(now, 16, 16)
        now += 0.008
    ctl.plain_step(now, 16, 16)
    rates = ctl.modes.rates[ctl.modes.bucket(16)]
    assert rates["plain"][0] == pytest.approx(2000.0)
    # (40 + 16) / 35 ms = 1600 tokens/s, the cycle handing over to plain steps included
    assert rates["draft"][0] == pytest.approx(1600.0, rel=0.01)
    plain_cycles, draft_cycles = rates["plain"][1], rates["draft"][1]
    ctl.open_cycle(now, 16, 0, plain=True)  # declined, plain steps off: plain decoding's own path
    ctl.close_cycle(now + 0.008, 16, 0)
    assert (rates["plain"][1], rates["draft"][1]) == (plain_cycles + 1, draft_cycles)


def test_first_block_passes_do_not_price_drafting_out():
    """A first block pass that costs 20x the usual (lazy initialisation) must not stop drafting
    for good: warm-up passes are not counted, and a bucket's early outlier is replaced."""
    ctl = AdaptiveController(max_drafts=7)
    ctl.step_cost.set_profile({1: 5e-3, 8: 5.5e-3})
    ctl.end_step(0.0, 1, 8, 75e-3)  # the first drafting step: 75 ms
    for _ in range(ctl.warmup_drafts + 1):  # the rest of the warm-up, then two counted passes
        ctl.end_step(0.0, 1, 8, 2e-3)
    assert ctl.draft_cost.cost1(8) < 3e-3
    m = StepCostModel()
    m.observe(8, 75e-3)
    m.observe(8, 2e-3)  # a 4x faster second sample replaces the lone first one
    m.observe(8, 2.2e-3)
    assert m.cost1(8) < 3e-3, "the 75 ms sample is gone from the bucket's mean"


def test_vetoed_drafting_is_re_measured_now_and_then():
    ctl = AdaptiveController(max_drafts=7, explore_every=16)
    ctl.step_cost.set_profile({1: 5e-3, 8: 5.5e-3})
    for _ in range(ctl.warmup_drafts + 2):
        ctl.end_step(0.0, 1, 8, 1.0)  # a drafter priced at a second a pass
    picks = [bool(ctl.select(["a"], np.full(1, 7), 8).any()) for _ in range(64)]
    assert sum(picks) == 4 and picks[15], "one drafting step every 16 vetoes"


def test_plain_steps_are_timed_and_drafting_resumes_when_it_pays():
    """Plain steps (the drafter sits them out) feed the plain rate and a step-cost model of their
    own, not the speculative path's; the controller answers each one whether to draft again, and
    asks PlainOrDraft once per step."""
    ctl = AdaptiveController(max_drafts=7)
    for b in (16,):  # drafting measured at 600 tokens/s, plain steps at 1600
        for _ in range(3):
            ctl.modes.observe(b, True, tokens=6.0, seconds=0.01)
    now, answers = 0.0, []
    for _ in range(400):  # drafting's 8 cycles put it clearly behind: its retry falls due ~250 cycles on
        if ctl.wants_draft(16):
            answers.append(True)
            assert ctl.select([f"r{i}" for i in range(16)], np.full(16, 7), 8).shape == (16,)
            ctl.modes.observe(16, True, tokens=6.0, seconds=0.01)
        else:
            answers.append(False)
            ctl.plain_step(now, 16, 16)
            now += 0.01  # 16 tokens in 10 ms
    assert ctl.modes.rates[ctl.modes.bucket(16)]["plain"][0] == pytest.approx(1600.0)
    assert ctl.plain_cost.cost1(16) == pytest.approx(0.01)
    assert not ctl.step_cost.online, "plain decoding's path is not the speculative one"
    late = answers[50:]
    assert 0 < sum(late) < 0.1 * len(late), "plain from now on, drafting retried now and then"


def test_rates_are_robust_to_noisy_cycles_and_a_slow_first_one():
    """Drafting cycles yield 1 to 8 tokens (mean 3.5 per 10 ms: 350 tokens/s) against plain steps
    at 200 tokens/s; the first drafting cycle pays a one-off 300 ms. Drafting must win."""
    from dflash_vllm.adaptive import PlainOrDraft

    rng = np.random.default_rng(0)
    m = PlainOrDraft()
    m.observe(1, True, tokens=1.0, seconds=0.3)
    choices = []
    for _ in range(1000):
        d = m.prefer_draft(1)
        choices.append(d)
        if d:
            m.observe(1, True, tokens=float(rng.choice([1, 1, 2, 3, 8, 6])), seconds=0.01)
        else:
            m.observe(1, False, tokens=1.0, seconds=0.005)
    assert sum(choices[200:]) / 800 > 0.9
    assert m.rates[0]["draft"][0] == pytest.approx(350, rel=0.35)


def test_cut_counts_the_drafter_cost_already_spent():
    """A first draft costs 1 ms more on a 6.4 ms step and the block pass cost 2.2 ms. At a 13%
    chance of acceptance, sending nothing saves the 1 ms but the step still paid the drafter:
    counted in, one draft pays (1.13 tokens / 9.6 ms > 1 / 8.6 ms); left out, it would not."""
    def cost(n):
        return np.interp(n, [1, 2, 8], [6.4e-3, 7.4e-3, 8.0e-3])

    acc = np.array([[0.13, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    assert choose_draft_lengths(acc, cost)[0] == 0
    assert choose_draft_lengths(acc, cost, draft_cost=2.2e-3)[0] == 1


def test_plain_steps_follow_a_run_of_vetoes_or_the_measured_rates_at_once():
    ctl = AdaptiveController(max_drafts=7, plain_after_veto=3)
    ctl.step_cost.set_profile({1: 5e-3, 8: 6e-3, 64: 20e-3, 512: 150e-3})
    for _ in range(50):
        ctl.observe_outcomes(np.full((1, 7), 0.6), [7], [1])
    for _ in range(3):
        ctl.draft_cost.observe(8, 2e-3)
        ctl.draft_cost.observe(512, 40e-3)
    ids, full = [f"r{i}" for i in range(64)], np.full(64, 7)
    declined = []
    for _ in range(4):  # 64 requests: the cost model vetoes every step
        assert not ctl.select(ids, full, 8).any()
        declined.append(ctl.declined)
    assert declined == [False, False, True, True], "a lone veto is noise; a run of them means plain steps"
    assert ctl.select(ids[:1], full[:1], 8).all() and not ctl.declined
    for _ in range(ctl.modes.warmup_drafts + ctl.modes.min_observations):  # plain beats drafting at 16 requests
        ctl.modes.observe(16, True, 16, 0.02)
        ctl.modes.observe(16, False, 16, 0.01)
    assert not ctl.select(ids[:16], full[:16], 8).any() and ctl.declined


def test_prefill_cycles_under_load_are_a_cost_of_their_mode():
    """Drafting's own cycles (56 tokens in 30 ms, 1870 tokens/s) beat plain ones (16 in 9 ms,
    1780 tokens/s), but its requests finish unevenly and every 4th cycle ends with a prefill of a
    new prompt (+20 ms) beside the running requests: 1500 tokens/s over all cycles. Those cycles
    count, so plain decoding is chosen. A cycle whose next step runs none of its requests (the
    engine may have waited idle for them) is not counted."""
    ids = [f"r{i}" for i in range(16)]
    ctl = AdaptiveController(max_drafts=7)
    ctl.modes.warmup_drafts = 0
    now, fresh = 0.0, 0
    for _ in range(40):
        ctl.close_cycle(now, 16, 0, ids)  # plain steps
        ctl.open_cycle(now, 16, 0, plain=True, req_ids=ids)
        now += 0.009
    for i in range(40):
        if i % 4 == 3:  # a request finished last step: its successor prefills 100 prompt tokens
            ids = ids[1:] + [f"new{fresh}"]
            fresh += 1
            ctl.close_cycle(now + 0.02, 15 + 100 + 15 * 3, 40, ids)
            now += 0.02
        else:
            ctl.close_cycle(now, 16 * 4, 40, ids)
        ctl.open_cycle(now, 16, 48, req_ids=ids)
        now += 0.03
    rates = ctl.modes.rates[ctl.modes.bucket(16)]
    assert rates["draft"][0] == pytest.approx(56 / (0.03 + 0.02 / 4), rel=0.03)
    assert not ctl.modes.prefer_draft(16)
    # a whole new batch after the last step: maybe an idle wait, not counted
    cycles = rates["draft"][1]
    ctl.close_cycle(now + 1.0, 16 * 100, 0, [f"idle{i}" for i in range(16)])
    assert rates["draft"][1] == cycles


def test_a_new_load_arriving_is_no_cost_of_the_cycle_before_it():
    """A closed loop's first request is admitted alone, its 15 companions prefilled in the next
    step (here 130 ms): that one-request cycle continues into the next step, but the step brings
    a new load, so it is not counted at one request. A prefill beside the running requests that
    brings fewer new requests than it continues is (the previous test)."""
    ctl = AdaptiveController(max_drafts=7)
    ctl.modes.warmup_drafts = 0
    now = 0.0
    for _ in range(20):  # one request drafting: 3 tokens in 10 ms
        ctl.close_cycle(now, 8, 2, ["a"])
        ctl.open_cycle(now, 1, 7, req_ids=["a"])
        now += 0.010
    rate = ctl.modes.rates[0]["draft"]
    assert rate[0] == pytest.approx(300, rel=1e-6)
    ctl.close_cycle(now + 0.13, 8 + 15 * 48, 2, ["a"] + [f"n{i}" for i in range(15)])
    assert rate[0] == pytest.approx(300, rel=1e-6) and rate[1] == 19
    ctl.open_cycle(now, 2, 14, req_ids=["a", "b"])  # two running: one new beside one continuing counts
    ctl.close_cycle(now + 0.02, 16 + 48, 4, ["a", "c"])
    assert ctl.modes.rates[ctl.modes.bucket(2)]["draft"][1] == 1


def test_a_vetoed_batch_keeps_its_veto_for_a_few_steps(monkeypatch):
    """The cost model's veto of a batch stands for ``reselect_every`` steps of that same batch (the
    rule runs on every plain step while the measured rates prefer drafting); a changed batch is
    judged afresh, and the kept vetoes still count towards re-measuring the drafter."""
    import dflash_vllm.adaptive as adaptive

    calls = []
    real = adaptive.choose_requests
    monkeypatch.setattr(adaptive, "choose_requests", lambda *a, **k: calls.append(1) or real(*a, **k))
    ctl = AdaptiveController(max_drafts=7, explore_every=16, reselect_every=8)
    ctl.step_cost.set_profile({1: 5e-3, 8: 5.5e-3, 64: 20e-3})
    for _ in range(ctl.warmup_drafts + 2):
        ctl.end_step(0.0, 4, 32, 1.0)  # a drafter priced at a second a pass
    batch, caps = ["a", "b", "c", "d"], np.full(4, 7)
    assert not any(ctl.select(batch, caps, 8).any() for _ in range(8))
    assert len(calls) == 1 and ctl.declined, "one judgement for 8 steps; plain steps follow"
    ctl.select(batch, caps, 8)
    assert len(calls) == 2, "judged again after 8 steps"
    ctl.select(batch[:3], caps[:3], 8)
    assert len(calls) == 3, "another batch: judged afresh"
    picks = [bool(ctl.select(batch[:3], caps[:3], 8).any()) for _ in range(16)]
    assert picks.count(True) == 1, "every 16th veto in a row re-measures the drafter, kept ones included"


def test_deferred_timings_fold_into_the_same_estimates_in_order():
    now, deferred = AdaptiveController(max_drafts=7), AdaptiveController(max_drafts=7, defer_every=24)
    rng = np.random.default_rng(0)
    t = 0.0
    for step in range(40):
        n, secs, draft_secs = int(rng.integers(1, 64)), float(rng.uniform(2e-3, 9e-3)), float(rng.uniform(5e-4, 2e-3))
        accepted = int(rng.integers(0, 3))
        for ctl in (now, deferred):
            ctl.begin_step(t + secs, n)
            ctl.close_cycle(t + secs, n, accepted, ["a", "b"])
            ctl.end_step(t + secs + draft_secs, 2, 16, draft_secs)
            ctl.open_cycle(t + secs + draft_secs, 2, 6, req_ids=["a", "b"])
        t += secs + draft_secs
        if step == 2:
            assert now.step_cost.online and not deferred.step_cost.online, "nothing folded before the 24th timing"
    assert len(deferred._deferred) < 24
    deferred.flush()
    assert deferred.step_cost.points() == now.step_cost.points()
    assert deferred.draft_cost.points() == now.draft_cost.points()
    assert deferred.modes.rates == now.modes.rates and now.modes.rates


def test_a_lone_request_decodes_plainly_through_a_hard_stretch_and_tries_again_after_growing_waits():
    """``FewRequests`` at one request: drafting goes on while the request's recent yield is at least
    ``lone_hysteresis`` x the cost ratio; below it, ``wait`` plain steps, one drafting try, and a wait
    ``grow`` times longer after each check that fails; drafting that pays resets the wait; a new
    request starts from the start yield, seeded by the pooled yield (asked once)."""
    from dflash_vllm.adaptive import FewRequests

    rule = FewRequests(alpha=0.3, lone_hysteresis=0.8, wait=4, grow=1.5, max_wait=64)
    ratio = 2.0  # plain pays below 0.8 x 2 = 1.6 tokens per drafting cycle
    asked = []

    def prior() -> float:
        asked.append(1)
        return 4.0

    assert rule.keep_drafting(["a"], ratio, prior) and rule.yields["a"] == 4.0
    cycles = 0
    while rule.keep_drafting(["a"], ratio, prior):
        rule.observe("a", 1.0)  # nothing accepted
        cycles += 1
    assert rule.yields["a"] < 1.6 <= rule.yields["a"] / 0.7 - 0.3 / 0.7, "plain at the first check below"
    assert cycles == 5

    def plain_steps() -> int:
        n = 1
        while not rule.resume(["a"], ratio, prior):
            n += 1
        return n

    waits = []
    for _ in range(4):  # a try that fails each time
        waits.append(plain_steps())
        rule.observe("a", 1.0)
        assert not rule.keep_drafting(["a"], ratio, prior)
    assert waits == [4, 6, 9, 13]
    assert plain_steps() == 20
    rule.observe("a", 8.0)  # the text turned predictable: 7 of 7 accepted
    assert rule.keep_drafting(["a"], ratio, prior)
    for _ in range(6):
        rule.observe("a", 1.0)
        if not rule.keep_drafting(["a"], ratio, prior):
            break
    assert plain_steps() == 4, "drafting that paid reset the wait"
    # the start yield learnt from first cycles: "a" yielded 1.0 in its first (4 + 0.1 x (1 - 4))
    assert rule.start_yield == pytest.approx(3.7) and len(asked) == 1
    assert rule.keep_drafting(["b"], ratio, prior) and rule.yields["b"] == pytest.approx(3.7), "a new request drafts"
    for _ in range(5):
        rule.observe("b", 1.0)  # 3.7 -> 1.45
    assert not rule.keep_drafting(["b"], ratio, prior)
    assert rule.resume(["c"], ratio, prior), "new after a plain step: checked at once, on its start yield"


def test_a_few_requests_draft_while_their_yields_together_pay():
    """At a few requests the batch's yields are summed: one predictable request carries a batch of
    hard ones while their sum pays for the cycle, and a failed check starts plain steps for all;
    a new request during them is checked at once; a request with speculation off (cap 0) counts
    as the one token it yields either way."""
    from dflash_vllm.adaptive import FewRequests

    rule = FewRequests(alpha=0.5, hysteresis=1.0, wait=4, grow=1.5)
    ratio = 3.0  # drafting pays from 3 tokens per request and cycle: 12 at four requests

    def prior() -> float:
        return 3.0

    ids = ["a", "b", "c", "d"]
    assert rule.keep_drafting(ids, ratio, prior), "new text: 4 x 3.0 = 12"
    for rid, tokens in zip(ids, [8.0, 2.0, 2.0, 2.0], strict=True):
        rule.observe(rid, tokens)  # yields 5.5, 2.5, 2.5, 2.5: 13 in all
    assert rule.keep_drafting(ids, ratio, prior)
    capped = FewRequests(alpha=0.5, hysteresis=1.0)
    capped.yields = dict(rule.yields)
    assert not capped.keep_drafting(ids, ratio, prior, caps=np.array([7, 7, 7, 0])), "d yields 1: 11.5"
    for rid in ids[1:]:
        rule.observe(rid, 1.0)  # 5.5 + 3 x 1.75 = 10.75
    assert not rule.keep_drafting(ids, ratio, prior)
    assert [rule.resume(ids, ratio, prior) for _ in range(4)] == [False, False, False, True]
    assert not rule.keep_drafting(ids, ratio, prior), "the try found nothing new: wait 6"
    assert not rule.resume(ids, ratio, prior)
    # "a" ended; "e" starts at 3.09 (the seed 3.0 moved by a, b, c and d's first cycles): 8.34 < 12
    assert not rule.resume(["b", "c", "d", "e"], ratio, prior), "checked at once: still below"
    assert rule.left == 4, "new text: the waits (grown to 9) start short again"
    rule.observe("a", 8.0)
    rule.yields["b"] = rule.yields["c"] = 5.0
    assert rule.resume(["b", "c", "d", "f"], ratio, prior), "a new request, and the batch now pays"
    assert not rule.covers(5) and rule.covers(1) and rule.covers(4)


def test_a_request_joining_during_plain_steps_is_checked_with_the_batchs_caps():
    """A batch that a new request joins during plain steps is checked at once, and the way a
    drafting step is: a request with speculation off (cap 0) counts as the one token it yields
    either way, not as its start yield, whichever way that moves the sum."""
    from dflash_vllm.adaptive import FewRequests

    def prior() -> float:
        return 5.0

    ratio = 3.0  # drafting pays from 3 tokens per request and cycle: 6 at two requests
    for cap, drafts in ((7, True), (0, False)):
        rule = FewRequests(alpha=0.5, hysteresis=1.0, wait=4)
        rule.start_yield = 5.0
        rule.yields = {"a": 2.0}
        rule.left = 3  # plain steps of a wait
        caps = np.array([7, cap])
        assert rule.resume(["a", "new"], ratio, prior, caps) is drafts, (cap, "2 + 5 = 7 or 2 + 1 = 3, against 6")
    # through the controller, the caps the proposer passes
    ctl = AdaptiveController(max_drafts=7)
    ctl.modes.warmup_drafts = 0
    for _ in range(20):
        ctl.modes.observe(2, True, 6.0, 12e-3)
        ctl.modes.observe(2, False, 2.0, 4e-3)
    assert ctl._few_ratio(["a", "b"]) == pytest.approx(3.0)
    ctl.few.start_yield, ctl.few.yields, ctl.few.left = 5.0, {"a": 2.0}, 3
    assert not ctl.wants_draft(2, ["a", "b"], caps=np.array([7, 0]))
    ctl.few.left = 3
    assert ctl.wants_draft(2, ["a", "c"], caps=None)


def test_the_controller_runs_a_few_requests_by_their_own_yields_once_both_modes_are_measured():
    """At 1-4 requests, once drafting's and plain decoding's rates are measured at the batch's size,
    the controller asks ``FewRequests``: ``select`` declines when the yields drop (every request
    drafts otherwise, the cut choosing lengths), ``wants_draft`` resumes after the wait. Before both
    rates are known at that size, and above 4 requests, the pooled choice decides."""
    ctl = AdaptiveController(max_drafts=7)
    one = np.array([7])
    assert ctl._few_ratio(["a"]) is None
    ctl.modes.warmup_drafts = 0
    for _ in range(20):
        ctl.modes.observe(1, True, 4.0, 8e-3)
        ctl.modes.observe(1, False, 1.0, 4e-3)
    assert ctl._few_ratio(["a"]) == pytest.approx(2.0)
    assert ctl._few_ratio(["a", "b"]) is None, "not measured at two requests yet"
    assert ctl.few.lone_hysteresis == 0.7 and ctl.few.hysteresis == 0.7

    decided = []
    for _ in range(12):
        sel = ctl.select(["a"], one, 8)
        decided.append(bool(sel.any()))
        if not sel.any():
            break
        ctl.few.observe("a", 1.0)  # none of the 7 accepted (the proposer hands each yield over)
    assert ctl.few.yields["a"] < 0.7 * 2.0 and ctl.declined
    assert decided[-1] is False and all(decided[:-1])
    assert [ctl.wants_draft(1, ["a"]) for _ in range(4)] == [False, False, False, True]
    assert ctl.select(["a"], one, 8).all(), "the try drafts whatever the cost model says"

    for _ in range(20):
        ctl.modes.observe(4, True, 10.0, 12e-3)
        ctl.modes.observe(4, False, 4.0, 4e-3)
    ids, caps = ["p", "q", "r", "s"], np.full(4, 7)
    assert ctl._few_ratio(ids) == pytest.approx(3.0)
    assert ctl._few_ratio(ids + ["t"]) is None, "above 4 requests: the pooled choice"
    ctl.few.start_yield = 3.0
    assert ctl.select(ids, caps, 8).all(), "new text at its start yield: 12 >= 0.7 x 3 x 4"
    for rid in ids:
        ctl.few.observe(rid, 1.0)
        ctl.few.observe(rid, 1.0)
    assert sum(ctl.few.yields[r] for r in ids) < 0.7 * 3 * 4
    assert not ctl.select(ids, caps, 8).any() and ctl.declined


def test_a_try_of_the_few_requests_rule_sends_every_draft_whatever_the_cut_says():
    """``FewRequests`` judges a try of drafting on the yields of its cycle: the cut would bound them
    (a request sent one draft yields two tokens at most), so the drafting step that ``wants_draft``
    resumed sends every draft the caps allow. Only that one: the steps after it are cut as usual,
    and so is a drafting step the rule did not resume (its check passed while drafting)."""
    def controller(full_tries: bool) -> AdaptiveController:
        ctl = AdaptiveController(max_drafts=7, full_every=0)
        ctl.full_tries = full_tries
        ctl.step_cost.set_profile({1: 5e-3, 2: 10e-3, 8: 40e-3})  # every draft costs more than it yields
        ctl.modes.warmup_drafts = 0
        for _ in range(20):
            ctl.modes.observe(2, True, 4.0, 12e-3)
            ctl.modes.observe(2, False, 2.0, 4e-3)
        return ctl

    ids, caps, conf = ["a", "b"], np.array([7, 3]), np.full((2, 7), 0.2)
    ctl = controller(True)
    assert ctl.select(ids, caps, 8).all(), "new text at the start yield (seeded by the pooled yield)"
    assert ctl.cut(conf, caps).tolist() == [0, 0], "not a try: cut"
    for rid in ids:
        ctl.few.observe(rid, 1.0)
        ctl.few.observe(rid, 1.0)
    assert not ctl.select(ids, caps, 8).any() and ctl.declined
    answers = []
    while not answers or not answers[-1]:
        answers.append(ctl.wants_draft(2, ids))
    assert len(answers) == ctl.few.wait
    assert ctl.select(ids, caps, 8).all()
    assert ctl.cut(conf, caps).tolist() == [7, 3], "the try sends every draft"
    assert ctl.cut(conf, caps).tolist() == [0, 0], "the next drafting step is cut again"
    for rid in ids:
        ctl.few.observe(rid, 8.0)
    assert ctl.select(ids, caps, 8).all() and ctl.cut(conf, caps).tolist() == [0, 0]

    # a try whose step drafts for one request (no cut to skip) spends the flag all the same
    ctl.few.yields = {"a": 1.0, "b": 1.0}
    ctl.few.left = 1
    assert ctl.wants_draft(2, ids) and ctl._try_full
    assert ctl.cut(None, np.array([5])).tolist() == [5]
    assert ctl.cut(conf, caps).tolist() == [0, 0], "a later step is cut"
    # a try whose step never drafted (its requests' caps all 0): the next answer, another rule's, ends it
    ctl.few.yields = {"a": 1.0, "b": 1.0}
    ctl.few.left = 1
    assert ctl.wants_draft(2, ids) and ctl._try_full
    ctl.wants_draft(5, ids + ["c", "d", "e"])  # above 4 requests: the measured rates answer
    assert ctl.cut(conf, caps).tolist() == [0, 0]

    ctl = controller(False)  # tries cut like any drafting step
    ctl.few.yields = {"a": 1.0, "b": 1.0}
    ctl.few.left = 1
    assert ctl.wants_draft(2, ids) and ctl.select(ids, caps, 8).all()
    assert ctl.cut(conf, caps).tolist() == [0, 0]


def test_the_answer_after_a_retry_of_drafting_knows_it_ended():
    """``PlainOrDraft.retry_done`` marks the answer for a retry's last cycle: the proposer then
    hands the outcomes it batches to the controller before the next choice, which judges the retry
    on all of its cycles (with them still waiting, a retry at 1-4 requests that found drafting
    paying on this text handed back to plain decoding for a step)."""
    from dflash_vllm.adaptive import PlainOrDraft

    m = PlainOrDraft(explore_min=8, explore_max=8)
    m.warmup_drafts = 0
    for _ in range(20):
        m.observe(2, True, 2.5, 0.010)
        m.observe(2, False, 2.0, 0.004)
    answers = []
    while len(answers) < 9 + m.explore_cycles:
        answers.append((m.prefer_draft(2), m.retry_done))
        if m.retry_done:
            m.retry_done = False  # as the proposer does once it handed the outcomes over
    retry = [i for i, (draft, _) in enumerate(answers) if draft]
    assert len(retry) == m.explore_cycles and retry == list(range(retry[0], retry[0] + m.explore_cycles))
    assert [done for _, done in answers] == [i == retry[-1] for i in range(len(answers))]


def test_plain_cycles_folded_at_once_equal_as_many_observed_one_by_one():
    """A streak of plain cycles folded in one ``observe_cycles`` leaves both modes' decayed sums
    where that many ``observe`` calls of its mean cycle would."""
    from dflash_vllm.adaptive import PlainOrDraft

    one, folded = PlainOrDraft(warmup_drafts=0), PlainOrDraft(warmup_drafts=0)
    for m in (one, folded):
        for _ in range(10):
            m.observe(16, True, 30.0, 0.020)
            m.observe(16, False, 16.0, 0.008)
    for _ in range(37):
        one.observe(16, False, 16.0, 0.010)
    assert folded.observe_cycles(16, 37, 37 * 16.0, 37 * 0.010)
    b = PlainOrDraft.bucket(16)
    for mode in ("plain", "draft"):
        assert np.allclose(one.rates[b][mode], folded.rates[b][mode], rtol=1e-9), mode
    assert not folded.observe_cycles(16, 5, 5 * 16.0, 5 * 1.0), "an idle engine's cycles are no rate"
