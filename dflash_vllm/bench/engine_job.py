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


def _job_params(job: dict[str, Any]) -> list:
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    base = dict(job.get("sampling", {}))
    if job.get("structured"):  # e.g. {"regex": ...} or {"json": schema}: vLLM's structured outputs
        base["structured_outputs"] = StructuredOutputsParams(**job["structured"])
    n = len(job["prompts"])
    max_tokens = job.get("max_tokens") or [base.get("max_tokens", 16)] * n
    extra = job.get("extra_args") or [None] * n  # per prompt, e.g. {"dflash": {"max_draft_tokens": 2}}
    return [SamplingParams(**{**base, "max_tokens": m, **({"extra_args": e} if e else {})})
            for m, e in zip(max_tokens, extra, strict=True)]


def _job_result(llm, job: dict[str, Any], outputs: list, wall: float, before: dict[str, Any]) -> dict[str, Any]:
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


def _run_job(llm, job: dict[str, Any]) -> dict[str, Any]:
    params = _job_params(job)
    before = spec_counters(llm)
    if job.get("concurrency"):
        loop = ClosedLoop(llm, job["prompts"], params, int(job["concurrency"]))
        loop.run()
        return _loop_result(llm, job, loop, before)
    t = time.perf_counter()
    outputs = llm.generate(job["prompts"], params, use_tqdm=False)
    return _job_result(llm, job, outputs, time.perf_counter() - t, before)


def _core_pids(llm) -> list[int]:
    """The engine core processes of ``llm`` when it runs them apart (vLLM's default multiprocessing,
    as served); [] for an engine core in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``)."""
    manager = getattr(getattr(llm.llm_engine.engine_core, "resources", None), "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", None) or [] if p.pid]


class ClosedLoop:
    """``concurrency`` requests in flight until every prompt has run (a finished request is replaced
    by the next prompt), stepped in slices of wall time: ``run(seconds)`` steps the engine until the
    slice is over or the loop is done, and between slices the engine is left alone, its requests
    still in flight, while another engine runs. ``wall_s`` sums the slices, so the loop's rate is
    what it would be run in one go, but measured in the same seconds as the other engines' loops.
    ``llm`` is a ``vllm.LLM`` (anything whose ``llm_engine`` has ``add_request``/``step``/
    ``has_unfinished_requests``).

    ``full_s`` and ``full_tokens``: the loop at full load, from its start to the first finished
    request that no prompt is left to replace (until then all ``concurrency`` slots were busy), and
    the output tokens produced by then (finished requests' and those in flight, read from the
    engine's per-request stats; None where the engine keeps none). The rest of the loop is its
    tail, fewer requests than ``concurrency``: a finite job's artefact, which a server under steady
    load never runs. Plain decoding of equal-length requests ends them together (no tail); a
    speculative mode ends them unevenly, and on CPU at 4 requests the tail of a 16-request loop
    (the last requests running alone, 1-3 at a time) took 20-35% of the loop's time on the harder
    prompts (``DFLASH_VLLM_TRACE`` of the bench's adaptive engine)."""

    def __init__(self, llm, prompts: list[str], params: list, concurrency: int, tag: str = "bench"):
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        self._engine = llm.llm_engine
        self._prompts, self._params, self._tag = prompts, params, tag
        self._done: dict[int, Any] = {}
        self._submitted = 0
        self.wall_s = 0.0
        self.slices = 0
        self.full_s: float | None = None
        self.full_tokens: int | None = None
        while self._submitted < min(concurrency, len(prompts)):
            self._submit()

    def _submit(self) -> None:
        i = self._submitted
        self._engine.add_request(f"{self._tag}-{i}", self._prompts[i], self._params[i])
        self._submitted += 1

    @property
    def live(self) -> bool:
        return len(self._done) < len(self._prompts)

    def run(self, seconds: float = float("inf")) -> bool:
        """Step until ``seconds`` have passed (checked after each step) or every prompt has run;
        True while prompts remain."""
        t0 = time.perf_counter()
        while self.live and self._engine.has_unfinished_requests():
            tail = False
            for out in self._engine.step():
                if out.finished:
                    self._done[int(out.request_id.rsplit("-", 1)[1])] = out
                    if self._submitted < len(self._prompts):
                        self._submit()
                    else:
                        tail = True
            if tail and self.full_s is None:
                self.full_s = self.wall_s + time.perf_counter() - t0
                self.full_tokens = self._tokens_so_far()
            if time.perf_counter() - t0 >= seconds:
                break
        self.wall_s += time.perf_counter() - t0
        self.slices += 1
        if self.live and not self._engine.has_unfinished_requests():
            raise RuntimeError(f"closed loop {self._tag!r}: the engine has no requests left, yet "
                               f"{len(self._prompts) - len(self._done)} prompts never finished")
        return self.live

    def _tokens_so_far(self) -> int | None:
        """Output tokens of the finished requests plus those of the requests in flight (vLLM's
        per-request stats, kept when the engine logs stats); None without them."""
        done = sum(len(o.outputs[0].token_ids) for o in self._done.values())
        states = getattr(getattr(self._engine, "output_processor", None), "request_states", None)
        if states is None:
            return None
        running = 0
        for state in states.values():
            if state.stats is None:
                return None
            running += state.stats.num_generation_tokens
        return done + running

    def outputs(self) -> list:
        if self.live:
            raise RuntimeError(f"closed loop not finished: {len(self._done)} of {len(self._prompts)} prompts done")
        return [self._done[i] for i in range(len(self._prompts))]


def _closed_loop(llm, prompts: list[str], params: list, concurrency: int) -> list:
    """Keep ``concurrency`` requests in flight until every prompt has run; outputs in prompt order."""
    loop = ClosedLoop(llm, prompts, params, concurrency)
    loop.run()
    return loop.outputs()


def _loop_result(llm, job: dict[str, Any], loop: ClosedLoop, before: dict[str, Any]) -> dict[str, Any]:
    """A finished closed loop's result: the job's, and the loop at full load (``ClosedLoop.full_s``)."""
    return {**_job_result(llm, job, loop.outputs(), loop.wall_s, before),
            "full_s": loop.full_s, "full_tokens": loop.full_tokens}


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
    """Start the engine once, then run commands as they come, one JSON line each on stdin, each
    result written to ``out`` (atomically); EOF: exit. ``{"job": {...}, "out": PATH}`` runs a job.
    A job in slices (``ClosedLoop``): ``{"op": "open", "job": {...}}`` starts its closed loop,
    ``{"op": "slice", "seconds": s}`` runs it for ``s`` seconds and answers ``{"live": bool}``,
    ``{"op": "close"}`` answers the job's result, as a job run in one go would."""
    from vllm import LLM

    t0 = time.perf_counter()
    llm = LLM(**spec["engine"])
    _write_json(Path(spec["ready"]), {"engine_start_s": time.perf_counter() - t0})
    loop: tuple[dict, ClosedLoop, dict] | None = None
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        op = cmd.get("op", "run")
        if op == "run":
            _write_json(Path(cmd["out"]), _run_job(llm, cmd["job"]))
        elif op == "open":
            if loop is not None:  # a second open would drop the first loop's requests and figures
                raise RuntimeError(f"open: the loop of job {loop[0].get('name')!r} is still open; close it first")
            if _core_pids(llm):
                # a core in its own process steps on its own while it has requests, read or not: the
                # loop would go on decoding during the other engines' turns
                raise RuntimeError("a job in slices needs the engine core in this process: start the engine "
                                   "with VLLM_ENABLE_V1_MULTIPROCESSING=0")
            job = cmd["job"]
            before = spec_counters(llm)
            loop = (job, ClosedLoop(llm, job["prompts"], _job_params(job), int(job["concurrency"]),
                                    tag=job.get("name") or "bench"), before)
            _write_json(Path(cmd["out"]), {"live": loop[1].live})
        elif op == "slice":
            assert loop is not None, "slice before open"
            _write_json(Path(cmd["out"]), {"live": loop[1].run(float(cmd["seconds"]))})
        elif op == "close":
            assert loop is not None, "close before open"
            job, cl, before = loop
            res = {**_loop_result(llm, job, cl, before), "slices": cl.slices}
            loop = None
            _write_json(Path(cmd["out"]), res)
        else:
            raise ValueError(f"unknown op {op!r}")


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
            time.sleep(0.002)  # slices of ~0.5 s: a switch between engines should not take 50 ms
        return json.loads(path.read_text())

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        self._n += 1
        out = self._dir / f"out{self._n}.json"
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({**cmd, "out": str(out)}) + "\n")
        self.proc.stdin.flush()
        result = self._wait(out)
        out.unlink()
        return result

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        return self._call({"job": job})

    def open_loop(self, job: dict[str, Any]) -> bool:
        """Start ``job``'s closed loop (it needs ``concurrency``); True while it has prompts left."""
        return self._call({"op": "open", "job": job})["live"]

    def run_slice(self, seconds: float) -> bool:
        """Run the open loop for ``seconds``; True while it has prompts left."""
        return self._call({"op": "slice", "seconds": seconds})["live"]

    def close_loop(self) -> dict[str, Any]:
        """The finished loop's result, as ``run`` gives a job's (``wall_s`` sums its slices)."""
        return self._call({"op": "close"})

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
