"""Server soak (bounded, loopback only): 64 concurrent OpenAI clients against `vllm serve` with the
plugin, a mix of completions and chat, streamed and not, prompts of a few to ~900 tokens, max_tokens
1 to 200, stop strings, and 10% of the streams closed by the client midway. The same workload then
runs against a server without speculative decoding: every request both completed must match at
T=0, no 5xx, and the plugin server's memory after the soak stays within 10% of after warm-up.

`pytest tests/test_soak.py --soak-minutes 30` keeps the plugin server under load for 30 minutes
(the plain server then runs the same requests). DFLASH_SOAK_REPORT=path.json writes the figures."""

from __future__ import annotations

import json
import os

import pytest

from dflash_vllm.bench.soak import (
    SOAK_CONCURRENCY,
    SOAK_REQUESTS,
    SOAK_SERVER,
    compare,
    make_workload,
    run_workload,
)
from dflash_vllm.serving import vllm_server
from dflash_vllm.training.data import read_prompts

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def soak(request, tmp_path_factory):
    from dflash_vllm.demo import shipped_pair

    pair = shipped_pair()
    assert pair is not None, "dflash_vllm/demo_pair/ is missing: run scripts/build_demo_pair.py"
    target, drafter = pair
    plan = make_workload(read_prompts(target.parent / "eval_prompts.jsonl"), SOAK_REQUESTS, seed=0)
    minutes = request.config.getoption("--soak-minutes")
    tmp = tmp_path_factory.mktemp("soak")
    with vllm_server(target, drafter, log_path=tmp / "plugin.log", **SOAK_SERVER) as (base, pid):
        ours = run_workload(base, str(target), plan, SOAK_CONCURRENCY, server_pid=pid, minutes=minutes)
        alive = run_workload(base, str(target), plan[:4], 4)  # still serving after the soak
        log = (tmp / "plugin.log").read_text(errors="replace")  # before shutdown and its noise
    with vllm_server(target, log_path=tmp / "plain.log", **SOAK_SERVER) as (base, pid):
        plain = run_workload(base, str(target), plan, SOAK_CONCURRENCY, server_pid=pid, count=len(ours.outcomes))
    report = {"plugin": ours.figures, "plain": plain.figures, "comparison": compare(plain, ours),
              "requests_planned": len(plan), "concurrency": SOAK_CONCURRENCY, "minutes": minutes}
    print(json.dumps(report, indent=1))
    if os.environ.get("DFLASH_SOAK_REPORT"):
        with open(os.environ["DFLASH_SOAK_REPORT"], "w") as fh:
            json.dump(report, fh, indent=1)
    return ours, plain, alive, report, log


def test_soak_no_server_errors(soak):
    ours, plain, alive, report, log = soak
    for name, result in (("plugin", ours), ("plain", plain)):
        bad = [o for o in result.outcomes if o.failed]
        assert not bad, f"{name}: {len(bad)} failed requests, first: {bad[0]}"
    assert all(o.status == "ok" for o in alive.outcomes), "the plugin server stopped serving after the soak"
    assert "Traceback" not in log, log[log.index("Traceback"):][:3000]


def test_soak_outputs_identical_to_plain(soak):
    ours, plain, _, report, _ = soak
    cmp = report["comparison"]
    cancelled = report["plugin"]["statuses"].get("cancelled", 0)
    assert cancelled >= 0.05 * len(ours.outcomes), f"only {cancelled} streams were cancelled"
    assert cmp["compared"] >= 0.85 * len(ours.outcomes) - cancelled, report
    assert not cmp["differ"], f"requests {cmp['differ'][:10]} differ from plain decoding"


def test_soak_memory_is_stable(soak):
    ours, *_ = soak
    warm, after = ours.rss_after_warmup_mb, ours.rss_after_soak_mb
    assert warm and after, "resident memory could not be read from /proc"
    assert after <= 1.10 * warm, f"server memory grew from {warm:.0f} MB after warm-up to {after:.0f} MB"
