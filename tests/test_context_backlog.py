"""The plain-step backlog of drafter context: what it keeps, what it drops, in which order."""

import numpy as np
import torch

from dflash_vllm.context_backlog import ContextBacklog

H = 4


def _step(req_ids, counts, first_pos, value):
    """Aux states (2 layers) whose rows encode (request, position): layer j holds value + j."""
    t = int(sum(counts))
    pos = torch.cat([torch.arange(p, p + c) for p, c in zip(first_pos, counts, strict=True)])
    owner = torch.cat([torch.full((c,), i, dtype=torch.float32) for i, c in enumerate(counts)])
    aux = [(owner * 1000 + pos + value + j)[:, None].expand(t, H).clone() for j in range(2)]
    return aux, pos, list(req_ids), np.array(counts)


def test_keeps_tokens_of_running_requests_in_order():
    b = ContextBacklog(capacity=64)
    b.record(*_step(["a", "b"], [3, 1], [10, 5], 0.0))  # a prompt chunk of a, one decode of b
    b.record(*_step(["a", "b"], [1, 1], [13, 6], 0.0))
    assert len(b) == 6 and b.pending()
    feats, pos, rows = b.take({"b": 0, "a": 1, "c": 2})  # the batch order changed since
    assert pos.tolist() == [10, 11, 12, 5, 13, 6]
    assert rows.tolist() == [1, 1, 1, 0, 1, 0]
    assert feats.shape == (6, 2 * H)
    assert torch.equal(feats[:, H], feats[:, 0] + 1), "layer order kept side by side"
    assert not b.pending() and b.take({"a": 0}) is None


def test_finished_requests_are_dropped():
    b = ContextBacklog(capacity=64)
    b.record(*_step(["a", "b"], [2, 2], [0, 0], 0.0))
    _, pos, rows = b.take({"b": 0})
    assert rows.tolist() == [0, 0] and pos.tolist() == [0, 1]


def test_ring_keeps_the_newest_tokens():
    b = ContextBacklog(capacity=8)
    for step in range(5):  # 5 steps of 2 requests: 10 tokens through a ring of 8
        b.record(*_step(["a", "b"], [1, 1], [step, step], 0.0))
    _, pos, rows = b.take({"a": 0, "b": 1})
    assert pos.tolist() == [1, 1, 2, 2, 3, 3, 4, 4][-len(pos):] and len(pos) >= 6
    assert pos.tolist()[-2:] == [4, 4], "the newest step is always kept"


def test_a_step_larger_than_the_ring_keeps_its_tail():
    b = ContextBacklog(capacity=4)
    b.record(*_step(["a", "b"], [5, 2], [0, 100], 0.0))
    feats, pos, rows = b.take({"a": 0, "b": 1})
    assert pos.tolist() == [3, 4, 100, 101] and rows.tolist() == [0, 0, 1, 1]
    assert feats[0, 0].item() == 0 * 1000 + 3


def test_zero_capacity_records_nothing():
    b = ContextBacklog(capacity=0)
    b.record(*_step(["a"], [2], [0], 0.0))
    assert not b.pending()
