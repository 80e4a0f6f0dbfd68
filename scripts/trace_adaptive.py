"""Per-step trace of the adaptive controller (a diagnostic, not a benchmark).

Runs the bench's jobs for one mode (warm-up loops, then ``--reps`` closed loops at each
concurrency) on one engine, in this process by default, and records for every engine step: requests, tokens,
new prompts, drafts verified, the step's wall time, whether it ran plain, the drafts proposed, the
backfill time, each cycle the controller counted (mode, tokens, seconds), and the rates the mode
choice saw. Prints a summary per job: plain steps (and which rule chose them: the few-requests rule,
the measured rates, the cost model's veto, or none asked: a streak), the measured plain and
drafting rates, backfills.

    .venv/bin/python scripts/trace_adaptive.py --concurrency 1,4,16,64 --reps 2 --json runs/trace.json

In-process timings include the output processing that a served engine overlaps in another process,
and instances differ by up to ~20% on a 2-core CPU: read the decisions, not the tokens/s.
``--served`` runs the engine core in its own processes, as the bench and ``vllm serve`` do, and
traces it there (``DFLASH_VLLM_TRACE``, ``dflash_vllm/bench/trace.py``); the steps are then
assigned to jobs by their time.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from dflash_vllm.bench import trace


def _rate(cycles: list[tuple]) -> float:
    return sum(c[2] for c in cycles) / max(sum(c[3] for c in cycles), 1e-9)


def _summary(jobs: list[dict], events: list[dict]) -> None:
    for job in jobs:
        steps = [e for e in events if e["job"] == job["name"] and e.get("reqs")]
        # cycles of this job's batch sizes (a cycle is folded in up to a batch after its step, so the
        # first steps of a job may fold in the previous job's last cycles)
        cycles = [c for e in steps for c in e.get("cycles", []) if c[4] and c[0] <= job["concurrency"]]
        plain = [c for c in cycles if not c[1]]
        draft = [c for c in cycles if c[1]]
        print(f"{job['name']:>11}: {job['tokens_per_s']:7.1f} tok/s, {len(steps)} steps, "
              f"{sum(1 for e in steps if e.get('stayed_plain'))} plain; cycles counted: plain {len(plain)} "
              f"at {_rate(plain):.0f} tok/s, drafting {len(draft)} at {_rate(draft):.0f} tok/s; "
              f"{sum(1 for e in steps if 'backfill_ms' in e)} backfills")
        why = [e for e in steps if e.get("stayed_plain")]
        by_streak = sum(1 for e in why if e.get("streak"))
        why = [e for e in why if not e.get("streak")]
        by_few = sum(1 for e in why if e.get("few") is False)
        by_rates = sum(1 for e in why if e.get("prefer") is False)
        by_veto = sum(1 for e in why if e.get("prefer") is not False and e.get("chosen") == 0)
        print(f"{'':>11}  plain steps chosen by the few-requests rule {by_few}, by the measured rates {by_rates}, "
              f"by the cost model's veto {by_veto}, in a streak (not asked) {by_streak}, "
              f"other {len(why) - by_few - by_rates - by_veto}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent / "dflash_vllm" / "demo_pair"
    ap.add_argument("--target", default=str(root / "target"))
    ap.add_argument("--drafter", default=str(root / "drafter"))
    ap.add_argument("--prompts", default=str(root / "eval_prompts.jsonl"))
    ap.add_argument("--mode", default="plugin", choices=["plugin", "plugin-fixed"])
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--served", action="store_true",
                    help="engine core in its own processes, as served (traced through DFLASH_VLLM_TRACE)")
    ap.add_argument("--json", help="write the jobs and the per-step events here")
    args = ap.parse_args()
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if args.served else "0"
    tmp = tempfile.TemporaryDirectory()
    if args.served:
        os.environ[trace.TRACE_ENV] = str(Path(tmp.name) / "trace")

    from dflash_vllm import patches
    from dflash_vllm.bench import engine_job
    from dflash_vllm.bench.runner import BenchConfig, engine_spec
    from dflash_vllm.training.data import read_prompts

    patches.apply_all()
    from vllm import LLM

    cfg = BenchConfig(target=args.target, drafter=args.drafter, prompts=read_prompts(args.prompts),
                      concurrency=[int(c) for c in args.concurrency.split(",")], reps=args.reps)
    spec = engine_spec(cfg, args.mode)
    events: list[dict] = []
    if not args.served:
        trace.install(events.append)
    llm = LLM(**spec["engine"])
    jobs = []
    for job in spec["jobs"]:
        t0 = time.time()
        r = engine_job._run_job(llm, job)
        jobs.append({"name": job["name"], "concurrency": job["concurrency"], "start": t0, "end": time.time(),
                     "tokens_per_s": r["num_output_tokens"] / r["wall_s"], "num_drafts": r["spec"]["num_drafts"]})
    if args.served:
        llm.llm_engine.engine_core.shutdown()  # the engine core's process writes its last events at exit
        events = trace.read_events(os.environ[trace.TRACE_ENV])
        if not events:
            raise SystemExit("no trace events came back from the engine core's process")
    for e in events:  # each step to the job running when it ended
        e["job"] = next((j["name"] for j in jobs if e["t"] <= j["end"]), "after")
    _summary(jobs, events)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": vars(args), "jobs": jobs, "events": events}))


if __name__ == "__main__":
    main()
