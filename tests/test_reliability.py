"""Lossless under pressure: preemption (a KV cache too small for the batch), chunked prefill
(prompts longer than the batched-token budget), prefix-cache reruns and structured outputs, each
compared token for token with plain decoding under the same engine settings."""

from __future__ import annotations

import json
import re

import pytest

from dflash_vllm.bench.engine_job import run_engine_jobs

from .conftest import PROMPTS, engine_kwargs

pytestmark = pytest.mark.engine

K = 7
# vLLM's CPU KV blocks hold 128 tokens: 8 blocks hold 1,024 tokens, less than 9 requests x (prompt + 120)
# need, so the scheduler preempts running requests and recomputes them (target and draft layers
# share the KV-cache group: the draft cache is released and rebuilt with the target's)
PRESSURE = {"num_gpu_blocks_override": 8, "max_num_batched_tokens": 64, "max_num_seqs": 9,
            # JSON without free whitespace: a tiny target otherwise fills the object with blanks
            "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True}}
LONG = [(p * 40)[:600] for p in PROMPTS[2:5]]  # ~150-250 tokens each: prefill in 64-token chunks
REGEX = r"[0-9]{3}-[a-z]{4}"
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "bb", "ccc"]}},
          "required": ["ok", "tag"], "additionalProperties": False}
JOBS = [
    {"name": "pressure", "prompts": PROMPTS, "sampling": {"temperature": 0.0, "max_tokens": 120, "ignore_eos": True}},
    {"name": "chunked", "prompts": LONG, "sampling": {"temperature": 0.0, "max_tokens": 40}},
    {"name": "chunked_again", "prompts": LONG, "sampling": {"temperature": 0.0, "max_tokens": 40}},
    {"name": "regex", "prompts": PROMPTS[:3], "sampling": {"temperature": 0.0, "max_tokens": 24},
     "structured": {"regex": REGEX}},
    {"name": "json", "prompts": PROMPTS[:3], "sampling": {"temperature": 0.0, "max_tokens": 48},
     "structured": {"json": SCHEMA}},
]


TP_JOB = {"name": "tp", "prompts": PROMPTS, "sampling": {"temperature": 0.0, "max_tokens": 60}}


@pytest.fixture(scope="module")
def runs(tiny_pair):
    t, d = tiny_pair.target, tiny_pair.drafter
    out = {}
    for name, kwargs in (("plain", engine_kwargs(t, **PRESSURE)),
                         ("plugin", engine_kwargs(t, d, num_speculative_tokens=K, **PRESSURE,
                                                  additional_config={"dflash": {"adaptive": False}}))):
        out[name] = {j["name"]: j for j in run_engine_jobs({"engine": kwargs, "jobs": JOBS + [TP_JOB]})["jobs"]}
    # tensor parallelism through vLLM itself: 2 CPU ranks, one core each, adaptive on (the default)
    tp2 = run_engine_jobs({"engine": engine_kwargs(t, d, num_speculative_tokens=K, tensor_parallel_size=2),
                           "jobs": [TP_JOB], "env": {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}})
    out["tp2"] = {j["name"]: j for j in tp2["jobs"]}
    return out


def test_tensor_parallel_2_identical_to_plain_tp1(runs):
    ours, plain = runs["tp2"]["tp"], runs["plain"]["tp"]
    print(f"\nTP=2 plugin vs TP=1 plain: {len(ours['token_ids'])} requests, "
          f"{sum(map(len, ours['token_ids']))} tokens, identical={ours['token_ids'] == plain['token_ids']}, "
          f"TP=2 drafts {ours['spec']['num_drafts']}, tau {ours['spec']['acceptance_length']}")
    assert ours["token_ids"] == plain["token_ids"]
    assert ours["spec"]["num_drafts"] > 0


@pytest.mark.parametrize("job", [j["name"] for j in JOBS])
def test_identical_to_plain_decoding(runs, job):
    assert runs["plugin"][job]["token_ids"] == runs["plain"][job]["token_ids"]


def test_pressure_preempts_and_speculates(runs):
    spec = runs["plugin"]["pressure"]["spec"]
    print(f"\npreemptions: plugin {spec['num_preemptions']}, plain {runs['plain']['pressure']['spec']['num_preemptions']}; "
          f"plugin drafts {spec['num_drafts']}, accepted {spec['num_accepted_tokens']}")
    assert spec["num_preemptions"] > 0, "the KV cache was meant to be too small for the batch"
    assert runs["plain"]["pressure"]["spec"]["num_preemptions"] > 0
    assert spec["num_drafts"] > 0


def test_chunked_prefix_rerun_same_acceptance(runs):
    first, again = runs["plugin"]["chunked"]["spec"], runs["plugin"]["chunked_again"]["spec"]
    assert first["num_drafts"] > 0
    for key in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "accepted_per_pos"):
        assert again[key] == first[key], key


def test_structured_outputs_valid(runs):
    for text in runs["plugin"]["regex"]["texts"]:
        assert re.fullmatch(REGEX, text), text
    for text in runs["plugin"]["json"]["texts"]:
        obj = json.loads(text)  # complete, valid JSON that follows the schema
        assert set(obj) == {"ok", "tag"} and isinstance(obj["ok"], bool) and obj["tag"] in ("a", "bb", "ccc"), obj
    assert runs["plugin"]["regex"]["spec"]["num_drafts"] > 0
