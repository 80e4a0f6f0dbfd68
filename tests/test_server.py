"""The OpenAI-compatible server end to end: ``vllm serve`` with the plugin on a loopback port,
the real ``openai`` client, texts equal to a server without speculative decoding at T=0."""

from __future__ import annotations

import urllib.request

import pytest

from dflash_vllm.serving import vllm_server

pytestmark = pytest.mark.engine


def _accepted(base: str) -> float:
    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:spec_decode_num_accepted_tokens_total"))


PROMPTS = ["def encode(self, o):\n", "import json\n\n", "class TextWrapper:\n"]
CHAT = [{"role": "user", "content": "Write a function that adds two numbers."}]


def _exchange(base: str, target) -> dict:
    from openai import OpenAI

    client = OpenAI(base_url=f"{base}/v1", api_key="none")
    model = str(target)
    out = {"completions": [client.completions.create(model=model, prompt=p, max_tokens=40, temperature=0).choices[0].text
                           for p in PROMPTS]}
    out["chat"] = client.chat.completions.create(model=model, messages=CHAT, max_tokens=40,
                                                 temperature=0).choices[0].message.content
    stream = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True)
    out["stream"] = "".join(chunk.choices[0].text for chunk in stream)
    return out


@pytest.fixture(scope="module")
def exchanges(tmp_path_factory):
    from dflash_vllm.demo import shipped_pair

    pair = shipped_pair()
    assert pair is not None, "dflash_vllm/demo_pair/ is missing: run scripts/build_demo_pair.py"
    target, drafter = pair
    tmp = tmp_path_factory.mktemp("server")
    with vllm_server(target, log_path=tmp / "plain.log") as (base, _):
        plain = _exchange(base, target)
        plain["runtime"] = [_request_status(base, target, kw) for kw in RUNTIME_BAD]
    with vllm_server(target, drafter, log_path=tmp / "plugin.log") as (base, _):
        before = _accepted(base)
        ours = _exchange(base, target)
        after = _accepted(base)
        ours["per_request"] = _per_request_options(base, target)
        ours["metrics"] = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
    return plain, ours, before, after, (tmp / "plugin.log").read_text(errors="replace")


BAD_XARGS = [{"dflash_max_draft_tokens": -1}, {"dflash_colour": "red"}, {"dflash_disable": "maybe"}]
# vLLM's own request errors, through the plugin: an empty prompt, max_tokens 0 or past the context,
# a prompt longer than the context (the demo target's max_model_len is 1024)
RUNTIME_BAD = [{"prompt": ""}, {"max_tokens": 0}, {"max_tokens": 100_000}, {"prompt": "x = 1\n" * 2000}]


def _request_status(base: str, target, kwargs: dict) -> tuple[int | None, str]:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
    try:
        client.completions.create(model=str(target), **{"prompt": PROMPTS[1], "max_tokens": 8, **kwargs})
    except openai.APIStatusError as err:
        return err.status_code, str(err)
    return None, "accepted"


def _per_request_options(base: str, target) -> dict:
    """Good requests (capped, disabled) and bad ones (400) at the same time."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")

    def good(xargs):
        return client.completions.create(model=str(target), prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                         extra_body={"vllm_xargs": xargs}).choices[0].text

    def bad(kwargs):
        return _request_status(base, target, kwargs)

    with ThreadPoolExecutor(8) as pool:
        goods = [pool.submit(good, x) for x in ({"dflash_max_draft_tokens": 2}, {"dflash_disable": 1}, {})]
        bads = [pool.submit(bad, {"extra_body": {"vllm_xargs": x}}) for x in BAD_XARGS]
        runtime = [pool.submit(bad, kw) for kw in RUNTIME_BAD]
        return {"good": [f.result() for f in goods], "bad": [f.result() for f in bads],
                "runtime": [f.result() for f in runtime], "after": good({})}


def test_server_texts_equal_plain(exchanges):
    plain, ours, *_ = exchanges
    assert ours["completions"] == plain["completions"]
    assert ours["chat"] == plain["chat"]
    assert ours["stream"] == plain["stream"] == plain["completions"][0]


def test_server_runs_plugin_and_counts_drafts(exchanges):
    *_, before, after, log = exchanges
    assert "DFlash proposer active" in log
    assert after > before


def test_server_per_request_options(exchanges):
    plain, ours, *_ = exchanges
    assert ours["per_request"]["good"] == [plain["completions"][0]] * 3
    for (status, message), key in zip(ours["per_request"]["bad"], ("max_draft_tokens", "colour", "disable"),
                                      strict=True):
        assert status == 400, message
        assert key in message, message


def test_server_runtime_bad_input_fails_that_request_only(exchanges):
    plain, ours, *_ = exchanges
    """vLLM's usual answer (the plain server's) for each, while other requests run alongside."""
    got = [status for status, _ in ours["per_request"]["runtime"]]
    assert got == [status for status, _ in plain["runtime"]], (got, ours["per_request"]["runtime"])
    assert got[-1] == 400, "a prompt longer than the context is a client error"
    assert all(s is None or 400 <= s < 500 for s in got), got
    assert ours["per_request"]["after"] == plain["completions"][0], "the server carries on"


def test_server_exports_draft_length_histogram(exchanges):
    _, ours, *_ = exchanges
    assert "vllm:dflash_draft_length_bucket" in ours["metrics"]
