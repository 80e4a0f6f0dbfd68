"""The patches to vLLM, outside an engine: all of them in effect after ``apply_all`` (whether this
process applied them now or an earlier test did), and the memoised ``replay_boundaries`` answers as
vLLM's own."""

import itertools

from dflash_vllm import patches


def test_every_patch_applies_and_reports_itself():
    patches.apply_all()
    assert all(p.applied() for p in patches.PATCHES), [p.name for p in patches.PATCHES if not p.applied()]
    assert patches.apply_all() == [], "a second apply_all changes nothing"


def test_memoised_replay_boundaries_give_vllms_answers():
    import vllm.v1.core.kv_cache_coordinator as coordinator

    patches.apply_all()
    ours, theirs = coordinator.replay_boundaries, coordinator._orig_replay_boundaries
    assert ours is not theirs and ours._dflash_vllm
    for n, block, eagle in itertools.product(range(1, 70), (1, 16, 32), (False, True)):
        assert ours(n, block, use_eagle=eagle) == theirs(n, block, use_eagle=eagle)
        assert ours(n, block, eagle) == theirs(n, block, eagle)
