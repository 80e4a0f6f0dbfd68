"""Per-step trace of the adaptive controller's choices, from inside the engine (a diagnostic).

``install(sink)`` wraps the model runner and the proposer so that every engine step yields one
dict: its requests, tokens, new prompts and drafts verified, the step's cycle time (``dt``, start
to next start) and its start (``t``, ``time.time()``), after a plain step whether the next one
stays plain (``stayed_plain``), whether the batch runs in lockstep (``lockstep``) and each of
its requests' tokens left to ``max_tokens`` (``left``, read apart from ``lockstep``), the
mode choice's answer and the rates it saw (``prefer``, ``choice``; ``held``: the retries of drafting
it held so far, the batch in lockstep), the requests the cost model
chose (``chosen``: 0 is its veto), the drafts proposed, the backfill's time, and each cycle the
controller folded into its measured rates (``cycles``: requests, drafted, tokens, seconds,
counted; folded in batches, so a cycle lands up to a batch after the step it timed).

Set ``DFLASH_VLLM_TRACE=PREFIX`` and the plugin installs it in every vLLM process it loads into;
each process that runs the model appends JSON lines to ``PREFIX.<pid>.jsonl``. That is how a
served engine (``vllm serve``, the bench's engines) is traced: the engine core runs in its own
process there. ``scripts/trace_adaptive.py`` reads the files and summarises them per job.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

TRACE_ENV = "DFLASH_VLLM_TRACE"

logger = logging.getLogger("vllm.dflash_vllm")

_installed = False


def _wrap(cls, name: str, before=None, after=None) -> None:
    fn = getattr(cls, name)

    def wrapper(self, *a, **k):
        t = time.perf_counter()
        if before:
            before(self)
        out = fn(self, *a, **k)
        if after:
            try:
                after(self, out, time.perf_counter() - t, *a, **k)
            except Exception:  # a diagnostic never stops the engine: this hook stops recording
                logger.exception("dflash-vllm trace: %s.%s not recorded from now on", cls.__name__, name)
                setattr(cls, name, fn)
        return out

    wrapper.__wrapped__ = fn
    setattr(cls, name, wrapper)


def install(sink: Callable[[dict], None]) -> None:
    """Trace every engine step of this process into ``sink`` (once per process).

    A step is delimited by the model runner's ``execute_model`` calls (the runner holds the
    proposer: in a served engine on CPU it runs in a worker process of its own, apart from the
    engine core): an event is emitted when the next step starts, ``dt`` the time between the two
    starts (the whole step cycle)."""
    global _installed
    if _installed:
        return
    _installed = True
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from dflash_vllm import adaptive
    from dflash_vllm import proposer as P

    cur: dict = {}
    started = [0.0]

    def step_start(self, so, *a, **k):
        now = time.perf_counter()
        if cur:
            sink({**cur, "dt": now - started[0]})
        cur.clear()
        started[0] = now
        cur.update(t=time.time(), reqs=len(so.num_scheduled_tokens), tokens=so.total_num_scheduled_tokens,
                   new=len(so.scheduled_new_reqs),
                   spec=sum(len(v) for v in so.scheduled_spec_decode_tokens.values()))

    def proposed(self, out, dt, *a, **k):
        cur.update(propose_ms=dt * 1e3, plain_after=self.plain,
                   drafts=sum(len(x) for x in out) if isinstance(out, list) else int(out.numel()))

    def counted(self, ok, dt, num_reqs, drafted, tokens, seconds, busy=False):
        cur.setdefault("cycles", []).append((num_reqs, bool(drafted), float(tokens), float(seconds), bool(ok)))

    def asked(self, out, dt, num_reqs, new_text=False, draft_yield=None, lockstep=None):  # what the mode choice saw
        cur["prefer"] = bool(out)
        cur["held"] = self.held  # retries of drafting held in lockstep so far
        known = self._known(self.bucket(num_reqs))
        if "draft" in known and "plain" in known:
            d, pl = known["draft"], known["plain"]
            if draft_yield is not None and self.few(num_reqs):
                d = self.text_rate(d, draft_yield)
            cur["choice"] = {"draft": d[0], "spread": self.spread(d), "plain": pl[0], "new_text": new_text,
                             "yield": draft_yield,
                             "since": self._since.get(self.bucket(num_reqs), 0),
                             "interval": self.explore_interval(*((d, pl) if pl[0] > d[0] else (pl, d)), num_reqs)}

    fn = GPUModelRunner.execute_model

    def execute_model(self, scheduler_output, *a, **k):
        if scheduler_output.total_num_scheduled_tokens:
            step_start(self, scheduler_output)
        return fn(self, scheduler_output, *a, **k)

    execute_model.__wrapped__ = fn
    GPUModelRunner.execute_model = execute_model
    _wrap(P.DFlashVllmProposer, "propose", after=proposed)
    before_streak: list = [None, None]  # (id, steps) of the proposer's plain streak before stay_plain

    def streak_before(self):
        streak = getattr(self, "_streak", None)
        before_streak[:] = [None, None] if streak is None else [id(streak), streak.steps]

    def stayed(self, out, dt, num_reqs, *a, **k):
        ids = self._batch_req_ids(num_reqs)
        # a step of a plain streak: the controller was not asked (PlainStreak)
        streak = getattr(self, "_streak", None)
        in_streak = streak is not None and [id(streak), streak.steps - 1] == before_streak
        cur.update(stayed_plain=out, streak=in_streak,
                   lockstep=None if ids is None else P.in_lockstep(self._runner, ids),
                   left=None if ids is None else tokens_left(self._runner, ids))

    _wrap(P.DFlashVllmProposer, "stay_plain", before=streak_before, after=stayed)
    _wrap(P.DFlashVllmProposer, "_backfill", after=lambda self, out, dt, *a, **k: cur.update(backfill_ms=dt * 1e3))
    _wrap(adaptive.PlainOrDraft, "observe", after=counted)
    _wrap(adaptive.PlainOrDraft, "prefer_draft", after=asked)
    _wrap(adaptive.FewRequests, "resume", after=lambda self, out, dt, *a, **k: cur.update(few=bool(out)))
    _wrap(adaptive.AdaptiveController, "_select", after=lambda self, out, dt, *a, **k: cur.update(chosen=int(out.sum())))


def tokens_left(runner, req_ids: list[str]) -> list[int | None]:
    """Each request's tokens left to its ``max_tokens``, read from the runner's request states (their
    output token lists), apart from the input batch's counters ``in_lockstep`` reads; None for a
    request without a ``max_tokens``."""
    out = []
    for rid in req_ids:
        state = runner.requests.get(rid)
        params = None if state is None else state.sampling_params
        if params is None or params.max_tokens is None:
            out.append(None)
        else:
            out.append(params.max_tokens - len(state.output_token_ids))
    return out


class FileSink:
    """JSON lines to ``PREFIX.<pid>.jsonl``, opened at the first event (only processes that run
    engine steps write one), written in batches and at exit."""

    def __init__(self, prefix: str, batch: int = 256):
        self.prefix = prefix
        self.batch = batch
        self._buf: list[dict] = []
        self._path: Path | None = None
        atexit.register(self.flush)

    def __call__(self, event: dict) -> None:
        self._buf.append(event)
        if len(self._buf) >= self.batch:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        if self._path is None:
            self._path = Path(f"{self.prefix}.{os.getpid()}.jsonl")
            self._path.parent.mkdir(parents=True, exist_ok=True)
        buf, self._buf = self._buf, []
        with open(self._path, "a") as fh:
            fh.writelines(json.dumps(e) + "\n" for e in buf)


def install_from_env() -> bool:
    """``install`` with a ``FileSink`` when ``DFLASH_VLLM_TRACE`` is set; whether it did."""
    prefix = os.environ.get(TRACE_ENV, "").strip()
    if not prefix:
        return False
    install(FileSink(prefix))
    return True


def read_events(prefix: str) -> list[dict]:
    """Every event the processes traced under ``prefix`` wrote, in time order."""
    base = Path(prefix)
    events = []
    for path in sorted(base.parent.glob(base.name + ".*.jsonl")):
        with open(path) as fh:
            events.extend(json.loads(line) for line in fh if line.strip())
    return sorted(events, key=lambda e: e["t"])
