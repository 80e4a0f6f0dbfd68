"""Run generate jobs on one vLLM engine in a fresh process and write their figures as JSON.

Each mode (plain, built-in DFlash, plugin) gets its own process: the plugin's patches are applied
per process at import, ``DFLASH_VLLM_DISABLE`` must be set before vLLM starts, and one engine's
memory never leaks into the next one's timings.

    python -m dflash_vllm.bench.engine_job SPEC.json OUT.json

SPEC: ``{"env": {...}, "engine": {LLM kwargs}, "jobs": [{"name", "prompts", "sampling": {...},
"max_tokens": [per prompt], "extra_args": [per prompt], "structured": {...}, "concurrency": c}]}``
(all optional). Without ``concurrency`` a job is one ``LLM.generate`` over all its prompts; with it,
a closed loop keeps ``c`` requests in flight (a finished request is replaced by the next prompt),
which is what a server at concurrency ``c`` sees. OUT: per job the token ids, texts, wall time, the
deltas of vLLM's spec-decode counters and per-request spec metrics (when the engine records them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SPEC_COUNTERS = {
    "vllm:spec_decode_num_drafts": "num_drafts",
    "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens",
    "vllm:num_preemptions": "num_preemptions",
}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"
DRAFT_LENGTH = "vllm:dflash_draft_length"  # dflash-vllm's histogram (patches.py)


class EngineJobError(RuntimeError):
    pass


def spec_counters(llm) -> dict[str, Any]:
    out: dict[str, Any] = {v: 0 for v in SPEC_COUNTERS.values()}
    out["accepted_per_pos"] = []
    out["draft_lengths"] = {}  # length -> requests x steps sent exactly that many drafts
    if not llm.llm_engine.log_stats:  # stats disabled: no counters to read
        return out
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[metric.name]] += int(getattr(metric, "value", 0) or 0)
        elif metric.name == PER_POS:
            values = list(getattr(metric, "values", []) or [])
            acc = out["accepted_per_pos"]
            out["accepted_per_pos"] = [a + b for a, b in zip(acc + [0] * len(values), values, strict=False)] \
                if acc else [int(v) for v in values]
        elif metric.name == DRAFT_LENGTH:
            cumulative = sorted((float(le), int(c)) for le, c in metric.buckets.items() if le != "+Inf")
            prev = 0
            for le, c in cumulative:
                out["draft_lengths"][int(le)] = out["draft_lengths"].get(int(le), 0) + c - prev
                prev = c
    return out


def counters_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    delta = {k: after[k] - before[k] for k in SPEC_COUNTERS.values()}
    prev = before["accepted_per_pos"] + [0] * (len(after["accepted_per_pos"]) - len(before["accepted_per_pos"]))
    delta["accepted_per_pos"] = [a - b for a, b in zip(after["accepted_per_pos"], prev, strict=False)]
    delta["draft_lengths"] = {n: c - before["draft_lengths"].get(n, 0) for n, c in after["draft_lengths"].items()
                              if c - before["draft_lengths"].get(n, 0)}
    drafts = delta["num_drafts"]
    delta["acceptance_length"] = 1 + delta["num_accepted_tokens"] / drafts if drafts else None
    return delta


def _run_jobs(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"])
    results = {"engine_start_s": time.perf_counter() - t0, "jobs": []}
    for job in spec["jobs"]:
        results["jobs"].append(_run_job(llm, job))
    return results


def _run_job(llm, job: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    base = dict(job.get("sampling", {}))
    if job.get("structured"):  # e.g. {"regex": ...} or {"json": schema}: vLLM's structured outputs
        base["structured_outputs"] = StructuredOutputsParams(**job["structured"])
    n = len(job["prompts"])
    max_tokens = job.get("max_tokens") or [base.get("max_tokens", 16)] * n
    extra = job.get("extra_args") or [None] * n  # per prompt, e.g. {"dflash": {"max_draft_tokens": 2}}
    params = [SamplingParams(**{**base, "max_tokens": m, **({"extra_args": e} if e else {})})
              for m, e in zip(max_tokens, extra, strict=True)]
    before = spec_counters(llm)
    t = time.perf_counter()
    if job.get("concurrency"):
        outputs = _closed_loop(llm, job["prompts"], params, int(job["concurrency"]))
    else:
        outputs = llm.generate(job["prompts"], params, use_tqdm=False)
    wall = time.perf_counter() - t
    token_ids = [list(o.outputs[0].token_ids) for o in outputs]
    return {
        "name": job.get("name", ""),
        "wall_s": wall,
        "num_output_tokens": sum(len(t) for t in token_ids),
        "token_ids": token_ids,
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outputs],
        "texts": [o.outputs[0].text for o in outputs],
        "spec": counters_delta(before, spec_counters(llm)),
        # per request, when the engine runs with per_request_spec_decode_metrics
        "request_spec": [o.outputs[0].spec_decode_metrics.to_dict() if o.outputs[0].spec_decode_metrics
                         else None for o in outputs],
    }


def _closed_loop(llm, prompts: list[str], params: list, concurrency: int) -> list:
    """Keep ``concurrency`` requests in flight until every prompt has run; outputs in prompt order."""
    engine = llm.llm_engine
    done: dict[int, Any] = {}
    submitted = 0

    def submit() -> None:
        nonlocal submitted
        engine.add_request(f"bench-{submitted}", prompts[submitted], params[submitted])
        submitted += 1

    while submitted < min(concurrency, len(prompts)):
        submit()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[int(out.request_id.split("-")[-1])] = out
                if submitted < len(prompts):
                    submit()
    return [done[i] for i in range(len(prompts))]


def run_engine_jobs(spec: dict[str, Any], *, timeout_s: float = 1800, log_path: str | Path | None = None) -> dict:
    """Run ``spec`` in a fresh Python process; raise EngineJobError with the log's tail on failure."""
    with tempfile.TemporaryDirectory(prefix="dflash-job-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_file.write_text(json.dumps(spec))
        env = {**os.environ, **{k: str(v) for k, v in spec.get("env", {}).items()}}
        log = Path(log_path) if log_path else Path(tmp) / "engine.log"
        with open(log, "w") as fh:
            proc = subprocess.run(
                [sys.executable, "-m", "dflash_vllm.bench.engine_job", str(spec_file), str(out_file)],
                env=env, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout_s, check=False,
            )
        if proc.returncode != 0 or not out_file.exists():
            tail = log.read_text(errors="replace")[-6000:]
            raise EngineJobError(f"engine process exited with {proc.returncode}; log tail:\n{tail}")
        return json.loads(out_file.read_text())


def _serve(spec: dict[str, Any]) -> None:
    """Start the engine once, then run jobs as they come: one JSON line on stdin per job,
    ``{"job": {...}, "out": PATH}``; each result is written to PATH (atomically). EOF: exit."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"])
    _write_json(Path(spec["ready"]), {"engine_start_s": time.perf_counter() - t0})
    for line in sys.stdin:
        if line.strip():
            cmd = json.loads(line)
            _write_json(Path(cmd["out"]), _run_job(llm, cmd["job"]))


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    tmp.replace(path)  # atomic: a reader never sees half a file


class EngineServer:
    """One engine in its own process, kept running so that jobs of several engines can be
    interleaved (a benchmark then compares modes under the same machine conditions)."""

    def __init__(self, spec: dict[str, Any], log_path: str | Path, timeout_s: float = 900):
        self._tmp = tempfile.TemporaryDirectory(prefix="dflash-serve-")
        self._dir = Path(self._tmp.name)
        self._n = 0
        self.timeout_s = timeout_s
        self.log_path = Path(log_path)
        ready = self._dir / "ready.json"
        spec_file = self._dir / "spec.json"
        spec_file.write_text(json.dumps({**spec, "ready": str(ready)}))
        env = {**os.environ, **{k: str(v) for k, v in spec.get("env", {}).items()}}
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dflash_vllm.bench.engine_job", "--serve", str(spec_file)],
            env=env, stdin=subprocess.PIPE, stdout=self._log, stderr=subprocess.STDOUT, text=True)
        self.engine_start_s = self._wait(ready)["engine_start_s"]

    def _wait(self, path: Path) -> dict:
        t0 = time.monotonic()
        while not path.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > self.timeout_s:
                self.close()
                tail = self.log_path.read_text(errors="replace")[-6000:]
                raise EngineJobError(f"engine process {'exited' if self.proc.returncode is not None else 'timed out'}"
                                     f" (code {self.proc.returncode}); log tail:\n{tail}")
            time.sleep(0.05)
        return json.loads(path.read_text())

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        self._n += 1
        out = self._dir / f"out{self._n}.json"
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"job": job, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        return self._wait(out)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                if self.proc.stdin:
                    self.proc.stdin.close()
                self.proc.wait(timeout=60)
            except (subprocess.TimeoutExpired, OSError):
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        self._tmp.cleanup()


if __name__ == "__main__":
    if sys.argv[1] == "--serve":
        _serve(json.loads(Path(sys.argv[2]).read_text()))
        sys.exit(0)
    spec_path, out_path = sys.argv[1], sys.argv[2]
    _write_json(Path(out_path), _run_jobs(json.loads(Path(spec_path).read_text())))
