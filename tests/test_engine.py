"""End to end through vLLM on CPU: plain decoding, vLLM's built-in DFlash and this plugin.

Each mode runs in its own engine process (module-scoped: four engine starts for the whole file).
"""

from __future__ import annotations

import pytest

from dflash_vllm.bench.engine_job import run_engine_jobs
from dflash_vllm.proposer import DUMP_FEATURES_ENV

from .conftest import PROMPTS, engine_kwargs

pytestmark = pytest.mark.engine

K = 7  # block size 8
# Per-request budgets, none a multiple of the block, so requests end at different steps.
MAX_TOKENS = [45, 13, 60, 29, 51, 37, 22, 3, 58]
GREEDY = {"name": "greedy", "prompts": PROMPTS, "sampling": {"temperature": 0.0}, "max_tokens": MAX_TOKENS}
PROPOSER_LINE = "DFlash proposer active"


def first_difference(a: list[int], b: list[int]) -> int:
    return next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _sampled(name, seed):
    return {"name": name, "prompts": PROMPTS[:4],
            "sampling": {"temperature": 0.9, "top_p": 0.95, "seed": seed, "max_tokens": 40}}


def _run(tmp_path, name, kwargs, jobs, env=None):
    log = tmp_path / f"{name}.log"
    result = run_engine_jobs({"engine": kwargs, "jobs": jobs, "env": env or {}}, log_path=log)
    result["log"] = log.read_text(errors="replace")
    result["jobs"] = {j["name"]: j for j in result["jobs"]}
    return result


@pytest.fixture(scope="module")
def runs(tiny_pair, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("engine")
    t, d = tiny_pair.target, tiny_pair.drafter
    return {
        "plain": _run(tmp, "plain", engine_kwargs(t), [GREEDY]),
        "plugin": _run(tmp, "plugin", engine_kwargs(t, d, num_speculative_tokens=K), [
            GREEDY, {**GREEDY, "name": "greedy_again"},
            _sampled("sampled_a", 1234), _sampled("sampled_b", 1234), _sampled("sampled_c", 99),
        ], env={DUMP_FEATURES_ENV: str(tmp / "features.pt")}),
        "features": tmp / "features.pt",
        "plugin_no_prefix_cache": _run(tmp, "plugin_npc", engine_kwargs(t, d, num_speculative_tokens=K,
                                                                           prefix_caching=False), [GREEDY]),
        "builtin": _run(tmp, "builtin", engine_kwargs(t, d, num_speculative_tokens=K), [GREEDY],
                        env={"DFLASH_VLLM_DISABLE": "1"}),
    }


def test_plugin_proposer_is_the_one_running(runs):
    assert PROPOSER_LINE in runs["plugin"]["log"]
    assert "target_layer_ids=[1, 3]" in runs["plugin"]["log"]
    assert PROPOSER_LINE not in runs["builtin"]["log"], "DFLASH_VLLM_DISABLE=1 must restore the built-in"
    assert runs["plugin"]["jobs"]["greedy"]["spec"]["num_drafts"] > 0


@pytest.mark.parametrize("mode", ["plugin", "plugin_no_prefix_cache", "builtin"])
def test_greedy_identical_to_plain_decoding(runs, mode):
    plain = runs["plain"]["jobs"]["greedy"]["token_ids"]
    got = runs[mode]["jobs"]["greedy"]["token_ids"]
    assert [len(t) for t in plain] != [len(plain[0])] * len(plain), "requests should end at different steps"
    for i, (a, b) in enumerate(zip(plain, got, strict=True)):
        assert a == b, f"prompt {i}: first difference at token {first_difference(a, b)}"


def test_acceptance_counts_equal_builtin(runs):
    ours, theirs = runs["plugin"]["jobs"]["greedy"]["spec"], runs["builtin"]["jobs"]["greedy"]["spec"]
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        assert ours[key] == theirs[key], key


def test_prefix_cache_hit_keeps_acceptance(runs):
    jobs = runs["plugin"]["jobs"]
    assert jobs["greedy_again"]["token_ids"] == jobs["greedy"]["token_ids"]
    assert jobs["greedy_again"]["spec"] == jobs["greedy"]["spec"]
    no_cache = runs["plugin_no_prefix_cache"]["jobs"]["greedy"]["spec"]
    assert no_cache == jobs["greedy"]["spec"]


def test_sampling_runs_within_vocabulary(runs, tiny_pair):
    jobs = runs["plugin"]["jobs"]
    a, c = jobs["sampled_a"]["token_ids"], jobs["sampled_c"]["token_ids"]
    assert all(0 <= t < tiny_pair.vocab_size for seq in a + c for t in seq)
    assert a != c, "another seed should change the sample"
    assert a != runs["plugin"]["jobs"]["greedy"]["token_ids"][:4]
    assert jobs["sampled_a"]["spec"]["num_drafts"] > 0


@pytest.mark.xfail(strict=True, reason=(
    "vLLM 0.32 speculative decoding on CPU is not seed-reproducible at T > 0: the built-in DFlash "
    "(DFLASH_VLLM_DISABLE=1) gives different tokens for the same seed too, while plain decoding does not"))
def test_sampling_reproducible_with_seed(runs):
    jobs = runs["plugin"]["jobs"]
    assert jobs["sampled_a"]["token_ids"] == jobs["sampled_b"]["token_ids"]


def test_proposer_features_equal_trainer_features(runs, tiny_pair):
    """The target-layer convention from both sides: the features vLLM hands our proposer for the
    first step (all prompt tokens) equal those the trainer takes from the HF target."""
    import torch
    from transformers import AutoModelForCausalLM

    from dflash_vllm.checkpoint import parse_draft_spec
    from dflash_vllm.checkpoint import read_config as read
    from dflash_vllm.reference import target_features

    layer_ids = parse_draft_spec(read(tiny_pair.drafter)).target_layer_ids
    target = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target), dtype=torch.float32).eval()
    # Whole prompts seen in one step: a request's slice starts at position 0 and is contiguous.
    # (Which step holds which prompts depends on scheduling, so every dumped step is searched.)
    checked = 0
    for dump in torch.load(runs["features"]):
        loc = dump["query_start_loc"].tolist()
        for a, b in zip(loc[:-1], loc[1:], strict=True):
            pos = dump["positions"][a:b]
            if b - a < 2 or int(pos[0]) != 0 or not torch.equal(pos, torch.arange(b - a)):
                continue
            with torch.no_grad():
                _, feats = target_features(target, dump["token_ids"][a:b][None].long(), layer_ids)
            torch.testing.assert_close(dump["features"][a:b], feats[0], rtol=1e-4, atol=1e-4)
            checked += 1
    assert checked >= 2, f"expected several whole prompts in the dumped steps, found {checked}"
