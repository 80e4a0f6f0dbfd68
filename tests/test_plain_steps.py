"""The proposer's choice after a plain step: a veto of the cost model keeps the step plain (no
speculative step to find out), and a choice to draft is kept for that very batch's ``propose``."""

from types import SimpleNamespace

import numpy as np
import pytest

from dflash_vllm.adaptive import AdaptiveController
from dflash_vllm.proposer import DFlashVllmProposer

K = 7


def _proposer(num_reqs: int) -> DFlashVllmProposer:
    """The proposer's state that ``stay_plain`` reads, without an engine around it."""
    p = DFlashVllmProposer.__new__(DFlashVllmProposer)
    ids = [f"r{i}" for i in range(num_reqs)]
    p._runner = SimpleNamespace(input_batch=SimpleNamespace(req_ids=ids),
                                requests={r: SimpleNamespace(sampling_params=None) for r in ids})
    p.variable_lengths = True
    p.num_speculative_tokens = K
    p._caps = {}
    p._full_caps = np.zeros(0, dtype=np.int64)
    p._preselected = None
    p._lockstep_seen = None
    p._tp_size = 1
    p._sync = False
    p._backlog = None
    p._force_plain = False
    p.plain = True
    p.plain_steps = 0
    p._streak = None
    p._describe_every = 500
    ctl = p.adaptive = AdaptiveController(max_drafts=K)
    ctl.step_cost.set_profile({1: 5e-3, 8: 6e-3, 64: 20e-3, 512: 150e-3})
    for _ in range(50):  # first drafts accepted 60% of the time
        ctl.observe_outcomes(np.full((1, K), 0.6), [K], [1])
    for _ in range(3):
        ctl.draft_cost.observe(8, 2e-3)
        ctl.draft_cost.observe(512, 40e-3)
    return p


def test_a_cost_model_veto_stays_plain_without_a_speculative_step():
    p = _proposer(64)
    # PlainOrDraft has no drafting figures at 64 requests (it would say: draft, to learn), but
    # the cost model vetoes: the next step stays plain, and nothing is left for propose
    assert p.adaptive.modes.prefer_draft(64)
    assert p.stay_plain(64, 64) is True
    assert p.plain_steps == 1 and p._preselected is None


def test_a_choice_to_draft_is_kept_for_propose():
    p = _proposer(1)
    assert p.stay_plain(1, 1) is False, "one request: drafting pays"
    assert p.plain is False
    req_ids, sel = p._preselected
    assert req_ids == ["r0"] and sel.tolist() == [True]


def test_a_per_request_cap_of_zero_is_respected_after_plain_steps():
    p = _proposer(1)
    p._caps = {"r0": 0}  # drafting disabled for the only request: nothing can pay
    assert p.stay_plain(1, 1) is True and p._preselected is None


def test_forced_plain_steps_never_draft():
    """DFLASH_VLLM_FORCE_PLAIN=1 (a diagnostic): plain steps even where drafting pays."""
    p = _proposer(1)
    p._force_plain = True
    assert all(p.stay_plain(1, 1) for _ in range(50)) and p._preselected is None
    assert p.plain_steps == 50


def test_plain_steps_record_the_drafters_context_for_when_drafting_resumes():
    """Each plain step keeps its tokens' target features and positions, per request, whether the
    step decodes (one token each) or also prefills a prompt chunk."""
    import torch

    from dflash_vllm.context_backlog import ContextBacklog

    p = _proposer(2)
    p._force_plain = True
    p._ones = np.ones(0, dtype=np.int64)
    p._backlog = ContextBacklog(capacity=64)

    def step(counts, first):
        qsl = torch.tensor(np.concatenate(([0], np.cumsum(counts))), dtype=torch.int32)
        pos = torch.cat([torch.arange(f, f + c) for f, c in zip(first, counts, strict=True)])
        aux = [pos[:, None].float().expand(-1, 4) + 1000 * j for j in range(2)]  # layer j: position + 1000 j
        cad = SimpleNamespace(query_start_loc_cpu=qsl)
        assert p.stay_plain(2, int(sum(counts)), aux, pos, cad) is True

    step([3, 1], [0, 7])  # r0 prefills 3 tokens, r1 decodes
    step([1, 1], [3, 8])
    step([1, 1], [4, 9])
    feats, pos, rows = p._backlog.take({"r1": 0, "r0": 1})
    assert pos.tolist() == [0, 1, 2, 7, 3, 8, 4, 9]
    assert rows.tolist() == [1, 1, 1, 0, 1, 0, 1, 0]
    assert torch.equal(feats[:, 0], pos.float()) and torch.equal(feats[:, 4], pos.float() + 1000)


def _measured(ctl: AdaptiveController, num_reqs: int, draft_tokens: float, draft_s: float, plain_tokens: float,
              plain_s: float) -> None:
    """20 cycles of each mode measured at ``num_reqs`` requests (no warm-up drafts skipped)."""
    ctl.modes.warmup_drafts = 0
    for _ in range(20):
        ctl.modes.observe(num_reqs, True, draft_tokens, draft_s)
        ctl.modes.observe(num_reqs, False, plain_tokens, plain_s)


def _lockstep_runner(produced, prompt_lens, max_tokens):
    ids = [f"r{i}" for i in range(len(produced))]
    batch = SimpleNamespace(req_ids=ids, num_tokens_no_spec=np.add(prompt_lens, produced),
                            num_prompt_tokens=np.asarray(prompt_lens))
    reqs = {r: SimpleNamespace(sampling_params=None if m is None else SimpleNamespace(max_tokens=m))
            for r, m in zip(ids, max_tokens, strict=True)}
    return SimpleNamespace(input_batch=batch, requests=reqs), ids


def test_lockstep_is_as_many_tokens_left_for_every_request():
    from dflash_vllm.proposer import in_lockstep

    runner, ids = _lockstep_runner([5, 5, 5], [40, 7, 300], [128, 128, 128])
    assert in_lockstep(runner, ids), "prompts of any length, one max_tokens, started together"
    runner, ids = _lockstep_runner([5, 5, 6], [40, 7, 300], [128, 128, 128])
    assert in_lockstep(runner, ids), "one request admitted a step before the others"
    runner, ids = _lockstep_runner([5, 9, 4], [40, 7, 300], [128, 128, 128])
    assert in_lockstep(runner, ids, slack=5) and not in_lockstep(runner, ids, slack=4)
    runner, ids = _lockstep_runner([5, 25, 6], [40, 7, 300], [128, 148, 129])
    assert in_lockstep(runner, ids), "started apart, ending together"
    runner, ids = _lockstep_runner([5, 5, 5], [40, 7, 300], [128, 100, 128])
    assert not in_lockstep(runner, ids), "one request ends 28 steps before the others"
    runner, ids = _lockstep_runner([5, 5], [40, 7], [128, None])
    assert not in_lockstep(runner, ids)
    assert not in_lockstep(runner, [])


def test_a_due_retry_of_drafting_is_held_for_a_batch_in_lockstep():
    """After plain steps at 16 requests with drafting measured the loser, the retry that falls due
    is held while every request has as many tokens left, and starts once a request that ends far
    sooner takes one's place."""
    p = _proposer(16)
    ctl = p.adaptive
    _measured(ctl, 16, 40.0, 0.040, 16.0, 0.010)
    runner, ids = _lockstep_runner([3] * 16, list(range(20, 36)), [64] * 16)
    p._runner = runner
    assert all(p.stay_plain(16, 16) for _ in range(1500))
    assert ctl.modes.held > 100, "the retry fell due and was held ever since"
    assert not ctl.modes.retrying
    runner.input_batch.req_ids[4] = "new"  # a request ended, another took its place
    runner.requests["new"] = SimpleNamespace(sampling_params=SimpleNamespace(max_tokens=32))
    runner.input_batch.num_tokens_no_spec[4] = runner.input_batch.num_prompt_tokens[4]
    p.stay_plain(16, 16)  # (the cost model may still veto the step's drafts)
    assert ctl.modes.retrying, "out of lockstep: the due retry of drafting starts"


def test_each_verified_cycle_of_a_few_drafting_requests_feeds_their_yields():
    """The few-request rule learns every step (not in the batches the calibration learns in): each
    request's 1 + accepted drafts goes to ``FewRequests`` when at most ``max_reqs`` requests drafted;
    a request whose drafts the scheduler did not verify as sent is skipped."""
    import torch

    p = _proposer(3)
    p._outcomes, p._outcome_steps = [], 0
    few = p.adaptive.few
    few.yields = {"r0": 3.0, "r1": 3.0, "r2": 3.0}
    p._sent = {"r0": (None, 7), "r1": (None, 3), "r2": (None, 5)}
    cad = SimpleNamespace(query_start_loc_cpu=torch.tensor([0, 8, 12, 15]))  # r2 verified 2 drafts, not 5
    assert p._learn_from_last_step(["r0", "r1", "r2"], cad, torch.tensor([4, 0, 0])) == 6
    assert few.yields == {"r0": 3.3, "r1": 3.3, "r2": 3.0}

    p = _proposer(5)
    p._outcomes, p._outcome_steps = [], 0
    ids = [f"r{i}" for i in range(5)]
    p.adaptive.few.yields = dict.fromkeys(ids, 3.0)
    p._sent = {r: (None, 7) for r in ids}
    cad = SimpleNamespace(query_start_loc_cpu=torch.arange(0, 41, 8))
    assert p._learn_from_last_step(ids, cad, torch.zeros(5, dtype=torch.int64)) == 35
    assert p.adaptive.few.yields == dict.fromkeys(ids, 3.0), "5 drafting requests: the pooled choice's business"


def _settled_on_plain(num_reqs: int, streaks: bool, capacity: int = 0) -> DFlashVllmProposer:
    """A proposer whose measured rates put drafting at 16 requests at 0.8x plain decoding, on a
    clock of 10 ms per step; ``streaks`` False: the controller is asked every step (the old path)."""
    import itertools

    from dflash_vllm.context_backlog import ContextBacklog

    p = _proposer(num_reqs)
    # out of lockstep (a due retry is not held): requests with 64, 114, ... tokens to go
    p._runner, _ = _lockstep_runner([3] * num_reqs, [20] * num_reqs, [64 + 50 * i for i in range(num_reqs)])
    ctl = p.adaptive
    _measured(ctl, num_reqs, 1.6 * num_reqs, 0.020, 1.0 * num_reqs, 0.010)
    clock = itertools.count(0.0, 0.010)
    p._now = lambda: next(clock)
    p._ones = np.ones(0, dtype=np.int64)
    p._backlog = ContextBacklog(capacity) if capacity else None
    if not streaks:
        ctl.plain_horizon = lambda num_reqs: 0
    return p


def _plain_run(p: DFlashVllmProposer, num_reqs: int, steps: int, until_draft: bool = False,
               positions_read: list | None = None, join_every: int = 0) -> list[bool]:
    """``steps`` decoding steps (one token per request, features = position); the answers, up to
    the first that drafts with ``until_draft``. With ``positions_read`` the positions go as a
    callable (as the runner passes them), and each step whose positions were read is appended.
    ``join_every``: every that many steps a request ends and a new one joins in its row, its step
    prefilling 6 of its prompt's tokens."""
    import torch

    out = []
    decode = SimpleNamespace(query_start_loc_cpu=torch.arange(num_reqs + 1))
    for t in range(steps):
        cad, num_tokens = decode, num_reqs
        if join_every and t % join_every == join_every - 1:
            row = (t // join_every) % num_reqs
            p._runner.input_batch.req_ids[row] = f"j{t}"
            counts = torch.ones(num_reqs, dtype=torch.int64)
            counts[row] = 6
            cad = SimpleNamespace(query_start_loc_cpu=torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)]))
            num_tokens = num_reqs + 5
        pos = torch.full((num_tokens,), t, dtype=torch.int64)
        if positions_read is not None:
            pos = lambda _p=pos, _t=t: positions_read.append(_t) or _p  # noqa: E731
        out.append(p.stay_plain(num_reqs, num_tokens, [torch.full((num_tokens, 1), float(t))], pos, cad))
        if until_draft and not out[-1]:
            break
        p.plain = True  # (a drafting answer: the engine would run propose; here plain again)
    return out


def test_a_streak_of_plain_steps_answers_as_asking_every_step_would():
    """Above a few requests, the steps the measured rates are sure to run plain run as a streak
    without the controller: the same answers on the same steps (the retry of drafting falls due on
    the same step), the plain rate learnt alike, and far fewer questions."""
    from dflash_vllm.adaptive import PlainOrDraft

    asked = {}
    runs = {}
    for streaks in (False, True):
        p = _settled_on_plain(16, streaks)
        ctl = p.adaptive
        calls = []
        wants = ctl.wants_draft
        ctl.wants_draft = lambda *a, _w=wants, _c=calls, **k: _c.append(1) or _w(*a, **k)
        runs[streaks] = _plain_run(p, 16, 400)
        p._end_streak()  # (the run ended inside one)
        ctl.flush()
        asked[streaks] = (len(calls), ctl.modes.rates[PlainOrDraft.bucket(16)]["plain"])
    assert runs[True] == runs[False]
    assert not all(runs[True]), "the retry of drafting fell due within the run"
    assert asked[True][0] < asked[False][0] / 4, (asked[True][0], asked[False][0])
    assert np.allclose(asked[True][1], asked[False][1], rtol=1e-6), "the same decayed sums of the plain rate"


def test_a_streak_of_the_measured_rates_holds_while_requests_join():
    """Out of lockstep under load a request joins every few steps, its step prefilling its prompt.
    The measured rates' streak holds through it (the batch keeps its size): the same answers as
    asking every step, the retry of drafting due on the same step, and the controller asked only
    when a streak begins (before, each join ended the streak and the next step began another)."""
    asked, runs = {}, {}
    for streaks in (False, True):
        p = _settled_on_plain(16, streaks)
        calls = []
        wants = p.adaptive.wants_draft
        p.adaptive.wants_draft = lambda *a, _w=wants, _c=calls, **k: _c.append(1) or _w(*a, **k)
        runs[streaks] = _plain_run(p, 16, 400, join_every=3)
        asked[streaks] = len(calls)
        if streaks:
            streak = p._streak
            assert streak is not None and streak.req_ids is None
            assert _plain_run(p, 16, 3, join_every=3) == [True] * 3 and p._streak is streak, "a join keeps it"
    assert runs[True] == runs[False]
    assert not all(runs[True]), "the retry of drafting fell due within the run"
    # asked at the run's start and around the two retries of drafting (4 drafting answers each and
    # the step after): 12 of 400 steps, where ending each streak at a join asked 270 times
    assert asked[True] <= 16, (asked[True], asked[False])


def test_a_new_load_ends_a_streak_and_its_wait_is_no_plain_cycle():
    """A batch whose requests are all new (a new load, after the engine idled 0.3 s) is no join: a
    streak just begun ends there, and the cycle that held the wait is not counted, as
    ``close_cycle`` leaves such cycles out. Counted in the streak (its first two cycles are
    always timed), it made plain decoding ~6% dearer over the 300 steps that follow."""
    import torch

    p = _settled_on_plain(16, True)
    rates = p.adaptive.modes.rates
    assert _plain_run(p, 16, 1) == [True] and p._streak is not None and p._streak.steps == 0
    before = rates[p.adaptive.modes.bucket(16)]["plain"][0]
    clock = p._now
    p._now = lambda: clock() + 0.3
    p._runner.input_batch.req_ids[:] = [f"n{i}" for i in range(16)]
    new = SimpleNamespace(query_start_loc_cpu=torch.arange(0, 17 * 40, 40))
    assert p.stay_plain(16, 16 * 40, [torch.zeros(16 * 40, 1)], torch.zeros(16 * 40, dtype=torch.int64), new)
    _plain_run(p, 16, 300)
    p._end_streak()
    p.adaptive.flush()
    assert rates[p.adaptive.modes.bucket(16)]["plain"][0] == pytest.approx(before, rel=0.01)


def test_a_streak_keeps_only_the_features_still_in_the_ring_when_it_ends():
    """The backlog copies a streak step's features only if the ring still holds them when the
    streak ends: at resumption the backlog holds what recording every step would have left."""
    kept = {}
    for streaks in (False, True):
        p = _settled_on_plain(16, streaks, capacity=64)
        answers = _plain_run(p, 16, 400, until_draft=True)
        first_draft = answers.index(False)
        feats, pos, rows = p._backlog.take({f"r{i}": i for i in range(16)})
        kept[streaks] = (first_draft, pos.tolist(), rows.tolist(), feats[:, 0].tolist())
    assert kept[True] == kept[False]
    assert len(kept[True][1]) == 64


def test_a_batch_in_lockstep_that_ends_before_its_streak_records_nothing():
    """A streak of the measured rates longer than a batch in lockstep has left (its requests all
    end together, before drafting could resume for them) copies none of its features; the same
    streak over requests that end apart keeps the newest ones as usual."""
    kept = {}
    for lockstep in (True, False):
        p = _settled_on_plain(16, True, capacity=8192)  # holds the streak's 400 steps x 16 tokens
        p.adaptive.modes.explore_interval = lambda *a, **k: 400  # the next retry 400 steps away
        left = [60] * 16 if lockstep else [60 + 50 * i for i in range(16)]
        p._runner, _ = _lockstep_runner([3] * 16, [20] * 16, [3 + n for n in left])
        assert _plain_run(p, 16, 50) == [True] * 50
        assert p._streak is not None and p._streak.req_ids is None and p._streak.left > 300
        kept[lockstep] = len(p._backlog)
    assert kept[True] == 16, "the first step's tokens only (recorded before its streak began)"
    assert kept[False] > 16


def test_a_streak_reads_the_positions_only_of_the_steps_it_records():
    """The runner hands positions as a callable: a streak step that records nothing never reads
    them, and the backlog holds what it holds with positions handed as tensors."""
    import torch

    p = _settled_on_plain(16, True, capacity=64)
    read: list[int] = []
    answers = _plain_run(p, 16, 400, until_draft=True, positions_read=read)
    first_draft = answers.index(False)
    feats, pos, _ = p._backlog.take({f"r{i}": i for i in range(16)})
    assert sorted(set(pos.tolist())) == sorted(set(read[-4:])) == list(range(first_draft - 4, first_draft))
    assert torch.equal(feats[:, 0], pos.float())
    assert 4 <= len(read) < first_draft / 4, (len(read), first_draft)


def test_a_few_requests_streak_ends_when_a_request_joins():
    """At a few requests the wait's steps run as a streak while the batch keeps its requests; a
    request joining is checked at once, as when asked every step."""
    p = _settled_on_plain(2, True)  # both modes measured at 2 requests: FewRequests decides
    ctl = p.adaptive
    ctl.few.yields = {"r0": 1.2, "r1": 1.2}
    ctl.few.left = 16  # in a wait of plain steps
    assert _plain_run(p, 2, 1) == [True]
    assert p._streak is not None and p._streak.req_ids == ["r0", "r1"], "the wait's steps: a streak"
    assert _plain_run(p, 2, 5) == [True] * 5 and p._streak.steps == 5
    ctl.few.start_yield = 8.0  # a joining request is expected to yield well
    p._runner.input_batch.req_ids[1] = "r9"
    assert _plain_run(p, 2, 1) == [False], "the new request is checked at once"
    assert p._streak is None and ctl.few.left == 16 - 1 - 5


def test_a_kept_veto_of_the_cost_model_runs_as_a_streak_with_the_same_answers():
    """Where drafting is unmeasured at 64 requests and the cost model vetoes it, the veto kept for
    the batch runs as a streak: the same answers (its exploring drafting step included), vetoes
    counted alike, far fewer questions."""
    import itertools

    from dflash_vllm.adaptive import PlainOrDraft

    seen = {}
    for streaks in (False, True):
        p = _proposer(64)
        ctl = p.adaptive
        clock = itertools.count(0.0, 0.020)
        p._now = lambda _c=clock: next(_c)
        p._ones = np.ones(0, dtype=np.int64)
        if not streaks:
            ctl.plain_horizon = lambda num_reqs: 0
        calls = []
        select = ctl.select
        ctl.select = lambda *a, _s=select, _c=calls, **k: _c.append(1) or _s(*a, **k)
        answers = _plain_run(p, 64, 300)
        p._end_streak()
        seen[streaks] = (answers, len(calls), ctl._vetoed[PlainOrDraft.bucket(64)])
    assert seen[True][0] == seen[False][0]
    assert not all(seen[True][0]), "the exploring drafting step came within the run"
    assert seen[True][2] == seen[False][2]
    assert seen[True][1] < seen[False][1] / 4, (seen[True][1], seen[False][1])


def test_a_held_retry_runs_as_a_streak_until_the_batchs_first_request_ends():
    """A retry of drafting held for a batch in lockstep holds as a streak while the batch keeps its
    requests, at most until its first request reaches ``max_tokens``: holds counted as asking every
    step counts them, far fewer questions."""
    import itertools

    seen = {}
    for streaks in (False, True):
        p = _proposer(16)
        ctl = p.adaptive
        _measured(ctl, 16, 40.0, 0.040, 16.0, 0.010)
        p._runner, _ = _lockstep_runner([3] * 16, list(range(20, 36)), [64] * 16)  # 61 tokens to go
        clock = itertools.count(0.0, 0.010)
        p._now = lambda _c=clock: next(_c)
        if not streaks:
            ctl.plain_horizon = lambda num_reqs: 0
        calls = []
        wants = ctl.wants_draft
        ctl.wants_draft = lambda *a, _w=wants, _c=calls, **k: _c.append(1) or _w(*a, **k)
        answers = [p.stay_plain(16, 16) for _ in range(1500)]
        if streaks:
            assert p._streak is not None and p._streak.left < 61
            assert not p._streak.record, "a held batch's features would serve a few drafting steps at most"
        p._end_streak()
        seen[streaks] = (answers, ctl.modes.held, len(calls))
    assert seen[True][0] == seen[False][0] and all(seen[True][0])
    assert seen[True][1] == seen[False][1] > 100
    assert seen[True][2] < seen[False][2] / 10
