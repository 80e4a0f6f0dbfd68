"""The shipped demo pair: vLLM through the plugin, vLLM's built-in DFlash and the pure-PyTorch
reference agree on acceptance (a gap over 5% is a bug in one of them), outputs stay lossless."""

from __future__ import annotations

import pytest

from dflash_vllm.bench.engine_job import run_engine_jobs
from dflash_vllm.demo import shipped_pair
from dflash_vllm.training.data import read_prompts

from .conftest import engine_kwargs

pytestmark = pytest.mark.engine
N_PROMPTS, MAX_TOKENS = 12, 64


@pytest.fixture(scope="module")
def demo():
    pair = shipped_pair()
    assert pair is not None, "dflash_vllm/demo_pair/ is missing: run scripts/build_demo_pair.py"
    target, drafter = pair
    prompts = read_prompts(target.parent / "eval_prompts.jsonl")[:N_PROMPTS]
    job = {"name": "greedy", "prompts": prompts, "sampling": {"temperature": 0.0, "max_tokens": MAX_TOKENS}}
    kw = dict(max_model_len=1024)
    fixed = {"additional_config": {"dflash": {"adaptive": False}}}  # full blocks, as the reference drafts
    # adaptive (the default), one request with speculation disabled in the same batch
    mixed = {**job, "name": "mixed", "extra_args": [{"dflash": {"disable": True}}] + [None] * (len(prompts) - 1)}
    runs = {
        "plain": run_engine_jobs({"engine": engine_kwargs(target, **kw), "jobs": [job]})["jobs"][0],
        "plugin": run_engine_jobs({"engine": engine_kwargs(target, drafter, **kw, **fixed),
                                   "jobs": [job]})["jobs"][0],
        "adaptive": run_engine_jobs({"engine": engine_kwargs(target, drafter, **kw,
                                                             per_request_spec_decode_metrics="detailed"),
                                     "jobs": [mixed]})["jobs"][0],
        "builtin": run_engine_jobs({"engine": engine_kwargs(target, drafter, **kw), "jobs": [job],
                                    "env": {"DFLASH_VLLM_DISABLE": "1"}})["jobs"][0],
    }
    from dflash_vllm.reference import evaluate

    runs["reference"] = evaluate(target, drafter, prompts, max_new_tokens=MAX_TOKENS)
    return runs


def test_demo_pair_lossless(demo):
    assert demo["plugin"]["token_ids"] == demo["plain"]["token_ids"]
    assert demo["builtin"]["token_ids"] == demo["plain"]["token_ids"]


def test_demo_pair_tau_agrees_with_reference(demo):
    ours, ref = demo["plugin"]["spec"]["acceptance_length"], demo["reference"]["tau"]
    assert ref > 2.0, f"the demo drafter should accept well (reference tau {ref:.2f})"
    assert abs(ours - ref) / ref < 0.05, f"plugin tau {ours:.3f} vs reference tau {ref:.3f}"


def test_builtin_loads_export_with_same_tau(demo):
    ours, theirs = demo["plugin"]["spec"], demo["builtin"]["spec"]
    # same checkpoint, same outputs; float rounding of near-ties may flip a few drafts either way
    assert theirs["acceptance_length"] == pytest.approx(ours["acceptance_length"], rel=0.05)
    assert theirs["num_accepted_tokens"] > 0


def test_adaptive_lossless_with_variable_lengths(demo):
    """Adaptive on: outputs identical to plain decoding while requests of one batch get different
    draft lengths, and a request with speculation disabled gets none (others still speculate)."""
    run = demo["adaptive"]
    assert run["token_ids"] == demo["plain"]["token_ids"]
    lengths = {int(n): c for n, c in run["spec"]["draft_lengths"].items()}
    assert len(lengths) >= 2, f"expected several draft lengths, got {lengths}"
    assert sum(n * c for n, c in lengths.items()) == run["spec"]["num_draft_tokens"]
    per_req = run["request_spec"]
    assert per_req[0] is None or per_req[0]["num_draft_tokens"] == 0, per_req[0]
    assert sum(m["num_draft_tokens"] for m in per_req[1:]) > 0
    # How many drafts pay depends on this machine's step costs (at 11 requests on a CPU most steps
    # run plain and drafts are cut to 1-3), so tau is no measure here. What the cut must do on any
    # machine: drop the block's unlikely tail, so the drafts it sends are accepted at a higher rate
    # than full blocks are (a miscalibrated or reversed confidence fails this).
    rate = run["spec"]["num_accepted_tokens"] / run["spec"]["num_draft_tokens"]
    full = demo["plugin"]["spec"]
    full_rate = full["num_accepted_tokens"] / full["num_draft_tokens"]
    assert rate > full_rate, f"adaptive drafts accepted at {rate:.2f}, full blocks at {full_rate:.2f}"


def test_demo_command_is_lossless_and_drafts(capsys):
    """`scripts/demo.sh` (= `dflash-vllm demo`): one request at a time on the shipped pair, the
    plugin's text equals plain decoding's, and drafts are sent and accepted."""
    from dflash_vllm.demo import run_demo

    assert run_demo(None, None, max_tokens=32, num_speculative_tokens=None) == 0
    out = capsys.readouterr().out
    assert "the shipped demo pair (trained)" in out
    assert "greedy output identical to plain decoding: True" in out
    tau = float(out.split("mean acceptance length (tau): ")[1].split()[0])
    assert tau > 1.5, out[-600:]
