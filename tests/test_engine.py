"""End to end through vLLM on CPU: plain decoding, vLLM's built-in DFlash and this plugin.

Each mode runs in its own engine process (module-scoped: four engine starts for the whole file).
"""

from __future__ import annotations

import numpy as np
import pytest

from dflash_vllm.bench import trace
from dflash_vllm.bench.engine_job import run_engine_jobs
from dflash_vllm.bench.trace import TRACE_ENV
from dflash_vllm.proposer import DUMP_FEATURES_ENV, LOCKSTEP_SLACK

from .conftest import PROMPTS, engine_kwargs

pytestmark = pytest.mark.engine

K = 7  # block size 8
# Per-request budgets, none a multiple of the block, so requests end at different steps.
MAX_TOKENS = [45, 13, 60, 29, 51, 37, 22, 3, 58]
GREEDY = {"name": "greedy", "prompts": PROMPTS, "sampling": {"temperature": 0.0}, "max_tokens": MAX_TOKENS}
# requests started together with one max_tokens, run to it: decoding plainly, they end together
LOCKSTEP = {"name": "lockstep", "prompts": PROMPTS[:4], "sampling": {"temperature": 0.0, "ignore_eos": True},
            "max_tokens": [40] * 4}
PROPOSER_LINE = "DFlash proposer active"
FIXED = {"additional_config": {"dflash": {"adaptive": False}}}  # fixed length: comparable with the built-in
# per-request control: no drafts, at most 2, at most 0 through the flat vllm_xargs spelling, defaults
CAPS = [{"dflash": {"disable": True}}, {"dflash": {"max_draft_tokens": 2}}, {"dflash_max_draft_tokens": 0},
        None, None, None, None, None, None]


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
        "plugin": _run(tmp, "plugin", engine_kwargs(t, d, num_speculative_tokens=K, **FIXED), [
            GREEDY, {**GREEDY, "name": "greedy_again"},
            _sampled("sampled_a", 1234), _sampled("sampled_b", 1234), _sampled("sampled_c", 99),
        ], env={DUMP_FEATURES_ENV: str(tmp / "features.pt")}),
        "features": tmp / "features.pt",
        "plugin_no_prefix_cache": _run(tmp, "plugin_npc", engine_kwargs(t, d, num_speculative_tokens=K,
                                                                           prefix_caching=False, **FIXED),
                                       [GREEDY]),
        # per-request caps on fixed-length drafts (the random drafter gives adaptive nothing to send;
        # adaptive on a trained drafter: test_demo_pair), per-request metrics recorded
        "capped": _run(tmp, "capped", engine_kwargs(
            t, d, num_speculative_tokens=K, per_request_spec_decode_metrics="detailed", **FIXED), [
            {**GREEDY, "name": "capped", "extra_args": CAPS}]),
        "adaptive": _run(tmp, "adaptive", engine_kwargs(t, d, num_speculative_tokens=K), [GREEDY, LOCKSTEP],
                         env={TRACE_ENV: str(tmp / "trace")}),
        "trace": tmp / "trace",
        # the Triton kernels (block inputs, context K/V, draft selection) under TRITON_INTERPRET=1
        "triton": _run(tmp, "triton", engine_kwargs(
            t, d, num_speculative_tokens=K,
            additional_config={"dflash": {"adaptive": False, "kernels": "triton"}}), [GREEDY],
            env={"TRITON_INTERPRET": "1"}),
        "builtin": _run(tmp, "builtin", engine_kwargs(t, d, num_speculative_tokens=K), [GREEDY],
                        env={"DFLASH_VLLM_DISABLE": "1"}),
    }


def test_plugin_proposer_is_the_one_running(runs):
    assert PROPOSER_LINE in runs["plugin"]["log"]
    assert "target_layer_ids=[1, 3]" in runs["plugin"]["log"]
    assert PROPOSER_LINE not in runs["builtin"]["log"], "DFLASH_VLLM_DISABLE=1 must restore the built-in"
    assert runs["plugin"]["jobs"]["greedy"]["spec"]["num_drafts"] > 0


@pytest.mark.parametrize(("mode", "job"), [("plugin", "greedy"), ("plugin_no_prefix_cache", "greedy"),
                                           ("builtin", "greedy"), ("capped", "capped"),
                                           ("adaptive", "greedy"), ("triton", "greedy")])
def test_greedy_identical_to_plain_decoding(runs, mode, job):
    plain = runs["plain"]["jobs"]["greedy"]["token_ids"]
    got = runs[mode]["jobs"][job]["token_ids"]
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


def test_per_request_control(runs):
    """One batch: disabled requests get no drafts while the others speculate; a cap is a maximum
    (vLLM's own per-request metrics and dflash-vllm's draft-length histogram)."""
    job = runs["capped"]["jobs"]["capped"]
    per_req = job["request_spec"]
    assert all(m is not None for m in per_req[3:]), "per-request metrics missing"
    for i in (0, 2):  # disabled (nested and flat spelling): no verify step ever carried a draft
        assert per_req[i] is None or per_req[i]["num_draft_tokens"] == 0, per_req[i]
    assert per_req[1]["num_draft_tokens"] > 0 and max(per_req[1]["per_step_drafted"]) == 2
    for i, m in enumerate(per_req[3:], start=3):
        if len(job["token_ids"][i]) > 2:  # (the random target ends some requests at once with EOS)
            assert m["num_draft_tokens"] > 0 and max(m["per_step_drafted"]) == K, (i, m)
    lengths = {int(n): c for n, c in job["spec"]["draft_lengths"].items()}
    assert {2, K} <= set(lengths) and max(lengths) == K, lengths
    assert sum(n * c for n, c in lengths.items()) == job["spec"]["num_draft_tokens"]


def test_adaptive_stops_drafting_what_is_never_accepted(runs):
    """The random drafter's drafts are (almost) never accepted: adaptive mode learns it and sends far
    fewer drafts than fixed mode, with the same outputs (checked above)."""
    adaptive, fixed = runs["adaptive"]["jobs"]["greedy"]["spec"], runs["plugin"]["jobs"]["greedy"]["spec"]
    assert adaptive["num_draft_tokens"] < 0.5 * fixed["num_draft_tokens"], (adaptive, fixed)
    assert "adaptive=True" in runs["adaptive"]["log"]
    assert "target step profile" in runs["adaptive"]["log"]


def test_lockstep_is_read_from_the_engines_requests(runs):
    """The plain steps' lockstep (the batch's requests all within LOCKSTEP_SLACK tokens of each other
    in what they have left to max_tokens: a retry of drafting is held while it lasts) as the adaptive
    engine read it from vLLM's input batch agrees, step by step, with the tokens left read apart from
    each request's state. The greedy job (started together, max_tokens 3-60) has steps of three or
    more requests out of lockstep; the lockstep job (four started within a step or two, one
    max_tokens, no EOS) is in lockstep throughout. (Whether greedy requests come within the slack
    near their ends depends on what each accepted, which the measured timings steer.)"""
    events = trace.read_events(str(runs["trace"]))
    admitted = np.cumsum([e["new"] for e in events])  # the greedy job's prompts, then the lockstep job's
    start = int(np.argmax(admitted > len(GREEDY["prompts"])))
    assert admitted[start] > len(GREEDY["prompts"]) and admitted[-1] == len(GREEDY["prompts"]) + len(LOCKSTEP["prompts"])
    read = [e for e in events if e.get("left") is not None]
    assert len(read) > 20
    for e in read:
        assert None not in e["left"] and len(e["left"]) == e["reqs"], e
        assert e["lockstep"] == (max(e["left"]) - min(e["left"]) <= LOCKSTEP_SLACK), e
    greedy = [e["lockstep"] for e in events[:start] if "lockstep" in e and e["reqs"] > 2]
    assert greedy and not all(greedy), greedy
    lockstep = [e["lockstep"] for e in events[start:] if "lockstep" in e]
    assert len(lockstep) > 10 and all(lockstep), lockstep


def test_triton_kernels_draft_what_the_references_draft(runs):
    """kernels='triton' (interpreter) and the PyTorch references: the same drafts, so the same
    acceptance counts, position by position."""
    ours, ref = runs["triton"]["jobs"]["greedy"]["spec"], runs["plugin"]["jobs"]["greedy"]["spec"]
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        assert ours[key] == ref[key], key
    # the context K/V went through the fused kernel into the CPU backend's own cache layout
    assert "context_kv kernel writes the draft KV cache (CPUAttentionBackendImpl" in runs["triton"]["log"]
    assert "context_kv kernel not usable" not in runs["triton"]["log"]
