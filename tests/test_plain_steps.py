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
    p._full_caps = np.zeros(0, dtype=np.int64)
    p._preselected = None
    p._tp_size = 1
    p._sync = False
    p._backlog = None
    p._force_plain = False
    p.plain = True
    p.plain_steps = 0
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
