"""Rounds of the soak workload (tests/test_soak.py's: 192 requests, 64 clients) against ONE server,
counting failed requests per round: for failures too rare to show in one round.

    .venv/bin/python scripts/soak_rounds.py --rounds 10               # plain vLLM, no plugin
    .venv/bin/python scripts/soak_rounds.py --rounds 10 --keep-alive  # clients reuse idle connections
    .venv/bin/python scripts/soak_rounds.py --rounds 10 --plugin      # the plugin, demo drafter
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import Counter
from pathlib import Path

from dflash_vllm.bench.soak import SOAK_CONCURRENCY, SOAK_REQUESTS, SOAK_SERVER, make_workload, run_workload
from dflash_vllm.demo import shipped_pair
from dflash_vllm.serving import vllm_server
from dflash_vllm.training.data import read_prompts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--keep-alive", action="store_true", help="reuse idle connections (the openai default)")
    ap.add_argument("--plugin", action="store_true", help="serve with the demo drafter through the plugin")
    args = ap.parse_args()
    pair = shipped_pair()
    if pair is None:
        sys.exit("dflash_vllm/demo_pair/ is missing: run scripts/build_demo_pair.py")
    target, drafter = pair
    plan = make_workload(read_prompts(target.parent / "eval_prompts.jsonl"), SOAK_REQUESTS, seed=0)
    log = Path(tempfile.mkdtemp(prefix="soak_rounds_")) / "server.log"
    failed = total = 0
    with vllm_server(target, drafter if args.plugin else None, log_path=log, **SOAK_SERVER) as (base, pid):
        for i in range(args.rounds):
            res = run_workload(base, str(target), plan, SOAK_CONCURRENCY, server_pid=pid, keep_alive=args.keep_alive)
            bad = [o for o in res.outcomes if o.failed]
            failed, total = failed + len(bad), total + len(res.outcomes)
            statuses = dict(Counter(o.status for o in res.outcomes))
            print(f"round {i}: {statuses} in {res.wall_s:.1f} s", flush=True)
            for o in bad:
                print(f"  request {o.index} after {o.latency_s:.2f} s: {o.detail}", flush=True)
    print(f"{'plugin' if args.plugin else 'plain'}, keep-alive {'on' if args.keep_alive else 'off'}: "
          f"{failed} of {total} requests failed over {args.rounds} rounds (server log: {log})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
