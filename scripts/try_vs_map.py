#!/usr/bin/env python
"""The few-requests rule's tries against the acceptance map (a diagnostic).

Runs the bench's closed loops (16 prompts, ``--concurrency`` at a time) on the adaptive plugin in
this process, over the eval prompts' two sets (0-15, the harder; 16-31, the easier), and compares
every yield handed to ``FewRequests.observe`` (1 + accepted drafts of one request's drafting
cycle) with what the acceptance map (``scripts/acceptance_map.py``) says a block drafted at that
request's position accepts, capped at the drafts the engine sent. Yields are sorted by the step
they came from: a try (the step that resumes drafting after plain steps) or a steady one. Tries
yielding less than the map at their positions would mean the drafter's context after plain steps
is short; tries level with it mean they fell on text the map itself calls hard.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/try_vs_map.py --map runs/acc_eval.json
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--map", required=True, help="acceptance map of the eval prompts (acceptance_map.py --out)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    from dflash_vllm.adaptive import AdaptiveController, FewRequests
    from dflash_vllm.bench.engine_job import _closed_loop
    from dflash_vllm.bench.runner import engine_spec, shipped_config
    from dflash_vllm.proposer import DFlashVllmProposer

    cfg = shipped_config([args.concurrency])
    prompts = cfg.prompts
    amap = json.load(open(args.map))["prompts"]
    if [p["prompt"] for p in amap] != list(prompts[: len(amap)]):
        raise SystemExit(f"{args.map}: its prompts are not the eval prompts (rebuild it with acceptance_map.py)")
    llm = LLM(**engine_spec(cfg, "plugin")["engine"])
    tokenizer = llm.get_tokenizer()
    by_ids = {tuple(tokenizer(p["prompt"]).input_ids): i for i, p in enumerate(amap)}

    state = {"kind": None, "sent": {}, "proposer": None}
    rows: list[tuple[str, int, int, int, float]] = []  # kind, map index, position, drafts sent, yield
    cut, observe, learn = AdaptiveController.cut, FewRequests.observe, DFlashVllmProposer._learn_from_last_step

    def tagged_cut(self, conf, caps, draft_seconds=0.0):
        state["kind"] = "try" if self._try_full else "steady"
        return cut(self, conf, caps, draft_seconds)

    def kept_learn(self, req_ids, cad, num_rejected):
        state["sent"], state["proposer"] = dict(self._sent), self
        return learn(self, req_ids, cad, num_rejected)

    def logged_observe(self, req_id, tokens):
        req = state["proposer"]._runner.requests.get(req_id)
        sent = state["sent"].get(req_id)
        idx = None if req is None else by_ids.get(tuple(req.prompt_token_ids))
        if idx is not None and sent is not None:
            # the block's anchor: the last token generated before this cycle's 1 + accepted
            rows.append((state["kind"], idx, len(req.output_token_ids) - int(tokens) - 1, sent[1], tokens))
        return observe(self, req_id, tokens)

    AdaptiveController.cut, FewRequests.observe = tagged_cut, logged_observe
    DFlashVllmProposer._learn_from_last_step = kept_learn
    warm = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    _closed_loop(llm, prompts[-16:], [warm] * 16, args.concurrency)
    params = SamplingParams(temperature=0, max_tokens=128, ignore_eos=True)
    for rep in range(args.reps):
        for lo in (0, 16):
            rows.clear()
            _closed_loop(llm, prompts[lo:lo + 16], [params] * 16, args.concurrency)
            parts = []
            for kind in ("try", "steady"):
                got = [(y, 1 + min(amap[i]["accepted"][j], n)) for k, i, j, n, y in rows
                       if k == kind and 0 <= j < len(amap[i]["accepted"])]
                if got:
                    actual, mapped = np.array(got, dtype=float).T
                    parts.append(f"{kind}: {len(got)} yields, {actual.mean():.2f} tokens against the map's "
                                 f"{mapped.mean():.2f} (equal in {np.mean(actual == mapped):.0%})")
            print(f"rep {rep}, prompts {lo}-{lo + 15}: " + "; ".join(parts), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
