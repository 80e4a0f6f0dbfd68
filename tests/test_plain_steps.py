"""The proposer's choice after a plain step: a veto of the cost model keeps the step plain (no
speculative step to find out), and a choice to draft is kept for that very batch's ``propose``."""

from types import SimpleNamespace

import numpy as np

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
    p._preselected = None
    p._tp_size = 1
    p._sync = False
    p._backlog = None
    p._force_plain = False
    p.plain = True
    p.plain_steps = 0
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
