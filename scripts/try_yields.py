#!/usr/bin/env python
"""Yields of the few-requests rule's tries against its steady drafting cycles (a diagnostic).

Runs the bench's closed loops (16 prompts, ``--concurrency`` at a time) on the adaptive plugin in
this process, over the eval prompts' two sets (0-15, the harder; 16-31, the easier), and sorts every
yield handed to ``FewRequests.observe`` (tokens per request and drafting cycle: 1 + accepted drafts)
by the drafting step it came from: a try (the step that resumes drafting after plain steps, which
sends every draft) or a steady step (which the cut may trim, and whose requests cut to no draft
are not counted).

``--forced`` declines every 8th drafting step and runs 4 plain steps after it, whatever the text:
the tries then fall on text chosen by no one, so a gap between their yields and steady ones would
be the drafter's context after plain steps (the backfill), not where the rule chose to try.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/try_yields.py --forced
"""

from __future__ import annotations

import argparse
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--forced", action="store_true", help="plain steps on a fixed schedule, not the rule's")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from dflash_vllm.adaptive import AdaptiveController, FewRequests
    from dflash_vllm.bench.engine_job import _closed_loop
    from dflash_vllm.bench.runner import engine_spec, shipped_config

    cfg = shipped_config([args.concurrency])
    prompts = cfg.prompts
    llm = LLM(**engine_spec(cfg, "plugin")["engine"])

    yields: list[tuple[str, float]] = []
    step = {"kind": None}
    cut, observe = AdaptiveController.cut, FewRequests.observe

    def tagged_cut(self, conf, caps, draft_seconds=0.0):
        step["kind"] = "try" if self._try_full else "steady"
        return cut(self, conf, caps, draft_seconds)

    def logged_observe(self, req_id, tokens):
        yields.append((step["kind"], tokens))
        return observe(self, req_id, tokens)

    AdaptiveController.cut, FewRequests.observe = tagged_cut, logged_observe
    if args.forced:
        checks = {"n": 0}

        def keep_drafting(self, req_ids, ratio, prior, caps=None):
            self._admit(req_ids, prior)
            checks["n"] += 1
            if checks["n"] % 8:
                return True
            self.left = 4
            return False

        def resume(self, req_ids, ratio, prior, caps=None):
            self._admit(req_ids, prior)
            self.left -= 1
            return self.left <= 0

        FewRequests.keep_drafting, FewRequests.resume = keep_drafting, resume

    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for rep in range(args.reps):
        for lo in (0, 16):
            yields.clear()
            _closed_loop(llm, prompts[lo:lo + 16], [params] * 16, args.concurrency)
            for kind in ("try", "steady"):
                y = np.array([t for k, t in yields if k == kind])
                if len(y):
                    print(f"rep {rep}, prompts {lo}-{lo + 15}, {kind}: {len(y)} request-cycles, "
                          f"{y.mean():.2f} tokens each, none accepted in {np.mean(y == 1):.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
