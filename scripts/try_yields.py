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

``--map`` (an acceptance map of the eval prompts, ``scripts/acceptance_map.py``) compares each
yield with what the map says a block drafted at that request's position accepts, capped at the
drafts the engine sent (after a warm-up loop). Tries yielding less than the map at their positions
would mean the drafter's context after plain steps is short; tries level with it mean they fell on
text the map itself calls hard.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/try_yields.py --forced
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/try_yields.py --map runs/acc_eval.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--forced", action="store_true", help="plain steps on a fixed schedule, not the rule's")
    ap.add_argument("--map", help="acceptance map of the eval prompts (acceptance_map.py --out): yields against it")
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from dflash_vllm.adaptive import AdaptiveController, FewRequests
    from dflash_vllm.bench.engine_job import _closed_loop
    from dflash_vllm.bench.runner import engine_spec, shipped_config
    from dflash_vllm.proposer import DFlashVllmProposer

    cfg = shipped_config([args.concurrency])
    prompts = cfg.prompts
    amap = None
    if args.map:
        amap = json.load(open(args.map))["prompts"]
        if [p["prompt"] for p in amap] != list(prompts[: len(amap)]):
            sys.exit(f"{args.map}: its prompts are not the eval prompts (rebuild it with acceptance_map.py)")
    llm = LLM(**engine_spec(cfg, "plugin")["engine"])

    # kind, then with --map: map index, position of the block's anchor, drafts sent; yield last
    yields: list[tuple] = []
    step = {"kind": None, "sent": {}, "proposer": None}
    cut, observe, learn = AdaptiveController.cut, FewRequests.observe, DFlashVllmProposer._learn_from_last_step

    def tagged_cut(self, conf, caps, draft_seconds=0.0):
        step["kind"] = "try" if self._try_full else "steady"
        return cut(self, conf, caps, draft_seconds)

    def logged_observe(self, req_id, tokens):
        if amap is None:
            yields.append((step["kind"], tokens))
        else:
            req = step["proposer"]._runner.requests.get(req_id)
            sent = step["sent"].get(req_id)
            idx = None if req is None else by_ids.get(tuple(req.prompt_token_ids))
            if idx is not None and sent is not None:
                # the block's anchor: the last token generated before this cycle's 1 + accepted
                yields.append((step["kind"], idx, len(req.output_token_ids) - int(tokens) - 1, sent[1], tokens))
        return observe(self, req_id, tokens)

    AdaptiveController.cut, FewRequests.observe = tagged_cut, logged_observe
    if amap is not None:
        tokenizer = llm.get_tokenizer()
        by_ids = {tuple(tokenizer(p["prompt"]).input_ids): i for i, p in enumerate(amap)}

        def kept_learn(self, req_ids, cad, num_rejected):  # the drafts sent, before learning clears them
            step["sent"], step["proposer"] = dict(self._sent), self
            return learn(self, req_ids, cad, num_rejected)

        DFlashVllmProposer._learn_from_last_step = kept_learn
        warm = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        _closed_loop(llm, prompts[-16:], [warm] * 16, args.concurrency)
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
            if amap is not None:
                parts = []
                for kind in ("try", "steady"):
                    got = [(y, 1 + min(amap[i]["accepted"][j], n)) for k, i, j, n, y in yields
                           if k == kind and 0 <= j < len(amap[i]["accepted"])]
                    if got:
                        actual, mapped = np.array(got, dtype=float).T
                        parts.append(f"{kind}: {len(got)} yields, {actual.mean():.2f} tokens against the map's "
                                     f"{mapped.mean():.2f} (equal in {np.mean(actual == mapped):.0%})")
                print(f"rep {rep}, prompts {lo}-{lo + 15}: " + "; ".join(parts), flush=True)
                continue
            for kind in ("try", "steady"):
                y = np.array([t for k, t in yields if k == kind])
                if len(y):
                    print(f"rep {rep}, prompts {lo}-{lo + 15}, {kind}: {len(y)} request-cycles, "
                          f"{y.mean():.2f} tokens each, none accepted in {np.mean(y == 1):.0%}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
