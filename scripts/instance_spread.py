"""How far one engine instance runs from another of the same mode (a diagnostic for CPU benches).

Starts ``--instances`` plain-decoding engines of the target, one at a time, each in a fresh
process, the variants taking turns; each runs ``--reps`` closed loops at ``--concurrency``
(``--waves`` x concurrency requests of 128 tokens, T=0, after a short warm-up). It prints every
instance's tokens/s per loop and, per variant, the spread between instances against the spread
within one.

A variant is ``name`` or ``name:ENV=VALUE,ENV=VALUE`` (environment of that instance's process);
``pin`` in the name also pins the front end and the engine core (every thread not already bound
to the worker's cores) to the other cores once the engine is up.

    .venv/bin/python scripts/instance_spread.py --instances 4 plain thp:THP_MEM_ALLOC_ENABLE=1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tree(pid: int) -> list[int]:
    try:
        kids = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        kids = []
    return [pid] + [p for k in kids for p in _tree(k)]


def _pin_others() -> None:
    """Bind every thread of this process tree that may run on any core to the cores that vLLM's
    worker (its OpenMP threads bound to a subset) does not use."""
    every = set(range(os.cpu_count() or 1))
    masks = {pid: os.sched_getaffinity(pid) for pid in _tree(os.getpid())}
    bound = set().union(*(m for m in masks.values() if m != every))
    if not bound or bound == every:
        raise SystemExit(f"pin: no worker bound to a subset of the cores (affinities {masks})")
    for pid, mask in masks.items():
        if mask != every:
            continue
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                os.sched_setaffinity(int(task.name), every - bound)
            except OSError:  # a thread that ended meanwhile
                pass


def child(args: argparse.Namespace) -> None:
    from vllm import LLM, SamplingParams

    from dflash_vllm.bench.engine_job import _closed_loop
    from dflash_vllm.bench.runner import BenchConfig, engine_spec
    from dflash_vllm.training.data import read_prompts

    prompts = read_prompts(args.prompts, limit=32)
    cfg = BenchConfig(target=args.target, drafter="", prompts=prompts, concurrency=[args.concurrency])
    llm = LLM(**engine_spec(cfg, "baseline")["engine"])  # the bench's plain-decoding engine
    if "pin" in args.variant:
        _pin_others()
    c = args.concurrency
    warm = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    _closed_loop(llm, (prompts * 4)[: 2 * c], [warm] * (2 * c), c)
    sp = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True, seed=0)
    rates = []
    for r in range(args.reps):
        n = args.waves * c
        batch = [prompts[(r * n + i) % len(prompts)] for i in range(n)]
        t = time.perf_counter()
        outs = _closed_loop(llm, batch, [sp] * n, c)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t))
    print("RESULT " + json.dumps(rates), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variants", nargs="*", default=["plain"])
    p.add_argument("--instances", type=int, default=4, help="engine instances per variant")
    p.add_argument("--reps", type=int, default=4, help="closed loops per instance")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--waves", type=int, default=4)
    p.add_argument("--target", default=str(ROOT / "dflash_vllm" / "demo_pair" / "target"))
    p.add_argument("--prompts", default=str(ROOT / "dflash_vllm" / "demo_pair" / "eval_prompts.jsonl"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    variants = []  # (name, environment), all checked before the first engine starts
    for spec in args.variants:
        name, _, env_spec = spec.partition(":")
        env = dict(os.environ)
        for item in filter(None, env_spec.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise SystemExit(f"variant {spec!r}: {item!r} is not ENV=VALUE")
            env[key] = value
        variants.append((name, env))
    found: dict[str, list[list[float]]] = {}
    for i in range(args.instances):
        for name, env in variants:
            cmd = [sys.executable, __file__, "--child", "--variant", name, "--reps", str(args.reps),
                   "--concurrency", str(args.concurrency), "--waves", str(args.waves),
                   "--target", args.target, "--prompts", args.prompts]
            proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
            got = [line[7:] for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode or not got:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
                raise SystemExit(f"variant {name}, instance {i}: the engine process failed (rc {proc.returncode})")
            rates = json.loads(got[0])
            found.setdefault(name, []).append(rates)
            print(f"{name:>10} instance {i}: " + " ".join(f"{r:7.1f}" for r in rates)
                  + f"  mean {statistics.fmean(rates):7.1f} tokens/s", flush=True)
    for name, runs in found.items():
        means = [statistics.fmean(r) for r in runs]
        within = statistics.fmean(statistics.pstdev(r) / statistics.fmean(r) for r in runs)
        between = statistics.pstdev(means) / statistics.fmean(means)
        print(f"{name:>10}: mean {statistics.fmean(means):7.1f} tokens/s; instances {min(means):.1f}-{max(means):.1f}"
              f" (sd {100 * between:.1f}%); within one instance sd {100 * within:.1f}%")


if __name__ == "__main__":
    main()
