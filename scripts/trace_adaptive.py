"""Per-step trace of the adaptive controller, in one process (a diagnostic, not a benchmark).

Runs the bench's jobs for one mode (warm-up loops, then ``--reps`` closed loops at each
concurrency) on one engine in this process, and records for every engine step: requests, tokens,
new prompts, drafts verified, the step's wall time, whether it ran plain, the drafts proposed, the
backfill time, each cycle the controller counted (mode, tokens, seconds), and the rates the mode
choice saw. Prints a summary per job: plain steps (and which rule chose them: the measured rates
or the cost model's veto), the measured plain and drafting rates, backfills.

    .venv/bin/python scripts/trace_adaptive.py --concurrency 1,4,16,64 --reps 2 --json runs/trace.json

In-process timings include the output processing that a served engine overlaps in another process,
and instances differ by up to ~20% on a 2-core CPU: read the decisions, not the tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine core in this process


def _rate(cycles: list[tuple]) -> float:
    return sum(c[2] for c in cycles) / max(sum(c[3] for c in cycles), 1e-9)


def _summary(jobs: list[dict], events: list[dict]) -> None:
    for job in jobs:
        steps = [e for e in events if e["job"] == job["name"] and e.get("reqs")]
        cycles = [c for e in steps for c in e.get("cycles", []) if c[4]]
        plain = [c for c in cycles if not c[1]]
        draft = [c for c in cycles if c[1]]
        print(f"{job['name']:>11}: {job['tokens_per_s']:7.1f} tok/s, {len(steps)} steps, "
              f"{sum(1 for e in steps if e.get('stayed_plain'))} plain; cycles counted: plain {len(plain)} "
              f"at {_rate(plain):.0f} tok/s, drafting {len(draft)} at {_rate(draft):.0f} tok/s; "
              f"{sum(1 for e in steps if 'backfill_ms' in e)} backfills")
        why = [e for e in steps if e.get("stayed_plain")]
        by_rates = sum(1 for e in why if e.get("prefer") is False)
        by_veto = sum(1 for e in why if e.get("prefer") is not False and e.get("chosen") == 0)
        print(f"{'':>11}  plain steps chosen by the measured rates {by_rates}, by the cost model's veto {by_veto}, "
              f"other {len(why) - by_rates - by_veto}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent / "dflash_vllm" / "demo_pair"
    ap.add_argument("--target", default=str(root / "target"))
    ap.add_argument("--drafter", default=str(root / "drafter"))
    ap.add_argument("--prompts", default=str(root / "eval_prompts.jsonl"))
    ap.add_argument("--mode", default="plugin", choices=["plugin", "plugin-fixed"])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--json", help="write the jobs and the per-step events here")
    args = ap.parse_args()

    from dflash_vllm import adaptive, patches
    from dflash_vllm import proposer as P
    from dflash_vllm.bench import engine_job
    from dflash_vllm.bench.runner import BenchConfig, engine_spec
    from dflash_vllm.training.data import read_prompts

    patches.apply_all()
    from vllm import LLM
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore

    cfg = BenchConfig(target=args.target, drafter=args.drafter, prompts=read_prompts(args.prompts),
                      concurrency=[int(c) for c in args.concurrency.split(",")], reps=args.reps)
    spec = engine_spec(cfg, args.mode)
    events: list[dict] = []
    cur: dict = {}
    job_name = ["init"]

    def wrap(cls, name, before=None, after=None):
        fn = getattr(cls, name)

        def wrapper(self, *a, **k):
            t = time.perf_counter()
            if before:
                before(self)
            out = fn(self, *a, **k)
            if after:
                after(self, out, time.perf_counter() - t, *a)
            return out

        setattr(cls, name, wrapper)

    def step_done(self, out, dt, *a):
        events.append({**cur, "dt": dt, "job": job_name[0]})

    def scheduled(self, so, dt, *a):
        cur.update(reqs=len(so.num_scheduled_tokens), tokens=so.total_num_scheduled_tokens,
                   new=len(so.scheduled_new_reqs),
                   spec=sum(len(v) for v in so.scheduled_spec_decode_tokens.values()))

    def proposed(self, out, dt, *a):
        cur.update(propose_ms=dt * 1e3, plain_after=self.plain,
                   drafts=sum(len(x) for x in out) if isinstance(out, list) else int(out.numel()))

    # the controller folds cycles into its rates in batches (AdaptiveController.defer_every): a
    # cycle lands in the event of the step that folded it, up to a batch after the step it timed
    def counted(self, ok, dt, num_reqs, drafted, tokens, seconds, busy=False):
        cur.setdefault("cycles", []).append((num_reqs, bool(drafted), float(tokens), float(seconds), bool(ok)))

    wrap(EngineCore, "step", before=lambda self: cur.clear(), after=step_done)
    wrap(Scheduler, "schedule", after=scheduled)
    wrap(P.DFlashVllmProposer, "propose", after=proposed)
    wrap(P.DFlashVllmProposer, "stay_plain", after=lambda self, out, dt, *a: cur.update(stayed_plain=out))
    wrap(P.DFlashVllmProposer, "_backfill", after=lambda self, out, dt, *a: cur.update(backfill_ms=dt * 1e3))
    wrap(adaptive.PlainOrDraft, "observe", after=counted)

    def asked(self, out, dt, num_reqs, new_text=False):  # the rates the mode choice saw
        cur["prefer"] = bool(out)
        known = self._known(self.bucket(num_reqs))
        if "draft" in known and "plain" in known:
            d, pl = known["draft"], known["plain"]
            cur["choice"] = {"draft": d[0], "spread": self.spread(d), "plain": pl[0], "new_text": new_text,
                             "since": self._since.get(self.bucket(num_reqs), 0),
                             "interval": self.explore_interval(*((d, pl) if pl[0] > d[0] else (pl, d)))}

    wrap(adaptive.PlainOrDraft, "prefer_draft", after=asked)
    # the requests the cost model chose (0: its veto), after the measured rates said draft
    wrap(adaptive.AdaptiveController, "_select", after=lambda self, out, dt, *a: cur.update(chosen=int(out.sum())))

    llm = LLM(**spec["engine"])
    jobs = []
    for job in spec["jobs"]:
        job_name[0] = job["name"]
        r = engine_job._run_job(llm, job)
        jobs.append({"name": job["name"], "tokens_per_s": r["num_output_tokens"] / r["wall_s"],
                     "num_drafts": r["spec"]["num_drafts"]})
    _summary(jobs, events)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "jobs": jobs, "events": events}))


if __name__ == "__main__":
    main()
