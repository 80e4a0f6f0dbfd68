#!/usr/bin/env python
"""Price decoding schedules on acceptance maps (``scripts/acceptance_map.py``): closed loops of
``--concurrency`` requests, ``--unit`` prompts per loop, each step plain or drafting (a diagnostic).

A map holds, for every position of a prompt's greedy text, how many of ``K`` drafts the target
accepts when a block is drafted there; decoding is lossless, so every schedule produces the same
text and only its cost differs. Costs are milliseconds of a step cycle, from a served trace of the
demo pair on the 2-core CPU (``scripts/trace_adaptive.py --served``, medians per batch size):

- a plain cycle at ``n`` requests: ``--plain-ms a b`` -> ``a + b n``;
- a drafting cycle (the drafter's pass for ``m`` requests and the next step verifying ``s``
  drafts): ``--draft-ms c0 cn cm cs`` -> ``c0 + cn n + cm m + cs s``;
- a step that admits new prompts: ``--prefill-ms p0 p1`` more -> ``p0 + p1 new``. A closed loop
  admits a request as one ends: plain decoding keeps equal-length requests in lockstep, drafting
  spreads their ends;
- a drafting cycle right after plain steps (the drafter's backfill of their context): ``--resume-ms``
  more.

The defaults are the AMD EPYC machine's of the first records. The Intel Xeon machine of later
records drafts relatively cheaper (least squares over an in-process trace at 4 requests, code
716faac, ``runs/trace_c4.json``): ``--plain-ms 6.04 0.158 --draft-ms 11.03 0.485 0.485 0.069
--resume-ms 1.5`` (backfills took 1.1-2.9 ms). ``--carry`` runs one rule through every loop in turn,
as one engine runs the bench's repetitions (its start yield carried from one prompt set to the next).

For each map file it prints, as speed-ups over plain decoding (more is faster):

- ``draft``: drafting every step, ``K`` drafts for every request;
- ``myopic``: each step, the requests and draft lengths that pay most knowing this step's
  acceptance (an oracle's greedy choice: a bound of sorts, not the best schedule);
- ``few``: ``dflash_vllm.adaptive.FewRequests``, the rule the adaptive controller runs for a batch of
  up to 4 requests, with its defaults or ``--alpha/--hysteresis/--lone-hysteresis/--wait/--grow``.
  It sees the maps as the engine sees text: the drafts accepted in the cycles it drafted. It
  drafts ``K`` for every request (the engine's cut trims them); the cost ratio it compares yields
  with is a drafting cycle's cost at that batch size over a plain one's, as the engine measures it.

    .venv/bin/python scripts/simulate_modes.py runs/acc_tune.json runs/acc_eval.json --concurrency 1 4
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_vllm.adaptive import FewRequests  # noqa: E402


class Costs:
    def __init__(self, plain: list[float], draft: list[float], prefill: list[float], k: int, resume: float = 0.0):
        self.plain, self.draft, self.prefill, self.k, self.resume = plain, draft, prefill, k, resume

    def plain_cycle(self, n: int) -> float:
        return self.plain[0] + self.plain[1] * n

    def draft_cycle(self, n: int, m: int, s: int) -> float:
        c0, cn, cm, cs = self.draft
        return c0 + cn * n + cm * m + cs * s

    def admit(self, new: int) -> float:
        return self.prefill[0] + self.prefill[1] * new if new else 0.0


class Plain:
    def decide(self, batch, pos, maps, costs):
        return None


class Draft:
    def decide(self, batch, pos, maps, costs):
        return {r: costs.k for r in batch}


class Myopic:
    def decide(self, batch, pos, maps, costs):
        n = len(batch)
        best, choice, tokens, sent = n / costs.plain_cycle(n), None, float(n), {}
        for gain, r in sorted(((maps[r][pos[r]], r) for r in batch), reverse=True):
            if gain <= 0:
                break
            sent[r] = gain
            tokens += gain
            rate = tokens / costs.draft_cycle(n, len(sent), sum(sent.values()))
            if rate > best:
                best, choice = rate, dict(sent)
        return choice


class Few:
    """``FewRequests`` asked as the controller asks it: a check before each drafting cycle (after
    the outcome of the last), a resume check after each plain step; a resumed cycle is not checked."""

    def __init__(self, rule: FewRequests, prior: float, try_alpha: float | None = None):
        self.rule, self.prior, self.state, self.extra_ms = rule, prior, "check", 0.0
        self.try_alpha, self.trying = try_alpha, False  # a try's yield weighted try_alpha (None: alpha)

    def decide(self, batch, pos, maps, costs):
        n = len(batch)
        ratio = costs.draft_cycle(n, n, costs.k * n) / costs.plain_cycle(n)
        self.trying = False
        if self.state == "plain":
            if not self.rule.resume(batch, ratio, lambda: self.prior):
                return None
            self.extra_ms += costs.resume  # the drafter catches up on the plain steps' context
            self.trying = True
        elif not self.rule.keep_drafting(batch, ratio, lambda: self.prior):
            self.state = "plain"
            return None
        self.state = "check"
        return {r: costs.k for r in batch}

    def observe(self, rid, tokens):
        if not (self.trying and self.try_alpha is not None):
            self.rule.observe(rid, tokens)
            return
        alpha, self.rule.alpha = self.rule.alpha, self.try_alpha
        try:
            self.rule.observe(rid, tokens)
        finally:
            self.rule.alpha = alpha


def closed_loop(maps: list[list[int]], order: list[int], policy, costs: Costs, concurrency: int) -> float:
    """Milliseconds to decode the prompts in ``order``, ``concurrency`` at a time."""
    queue, active, pos, ms = list(order), {}, {}, 0.0

    def admit() -> float:
        new = 0
        while queue and len(active) < concurrency:
            r = queue.pop(0)
            active[r], pos[r], new = maps[r], 0, new + 1
        return costs.admit(new)

    ms += admit()
    while active:
        batch = list(active)
        chosen = policy.decide(batch, pos, active, costs)
        if getattr(policy, "extra_ms", 0.0):
            ms, policy.extra_ms = ms + policy.extra_ms, 0.0
        if not chosen:
            ms += costs.plain_cycle(len(batch))
            for r in batch:
                pos[r] += 1
        else:
            ms += costs.draft_cycle(len(batch), len(chosen), sum(chosen.values()))
            for r in batch:
                a = min(active[r][pos[r]], chosen[r]) if r in chosen else 0  # left out: one token
                pos[r] += a + 1
                if r in chosen and hasattr(policy, "observe"):
                    policy.observe(r, a + 1)
        for r in batch:
            if pos[r] >= len(active[r]) - 1:  # token 0 came with the prefill
                del active[r]
        ms += admit()
    return ms


def loops(maps, units, make, costs: Costs, concurrency: int, carry: int) -> list[float]:
    """Milliseconds per loop: a fresh policy per loop, or (``carry`` > 0) one policy for all,
    the loops run in turn ``carry`` times over (summed per loop)."""
    if not carry:
        return [closed_loop(maps, u, make(), costs, concurrency) for u in units]
    policy, ms, n = make(), [0.0] * len(units), len(maps)
    every = maps * carry  # each pass's requests are new ones (ids p * n + i)
    for p in range(carry):
        for i, u in enumerate(units):
            if isinstance(policy, Few):
                policy.state = "check"  # a loop starts with a drafting step's check, as the engine's
            ms[i] += closed_loop(every, [p * n + r for r in u], policy, costs, concurrency)
    return ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("maps", nargs="+")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--unit", type=int, default=16, help="prompts per closed loop")
    ap.add_argument("--plain-ms", type=float, nargs=2, default=[3.1, 0.45])
    ap.add_argument("--draft-ms", type=float, nargs=4, default=[5.87, 0.67, 0.58, 0.23])
    ap.add_argument("--prefill-ms", type=float, nargs=2, default=[4.0, 2.5])
    ap.add_argument("--resume-ms", type=float, default=0.0,
                    help="more for a drafting cycle after plain steps (the drafter's backfill of their context)")
    ap.add_argument("--prior", type=float, default=3.0, help="seed of the rule's start yield")
    defaults = FewRequests()
    ap.add_argument("--alpha", type=float, default=defaults.alpha)
    ap.add_argument("--hysteresis", type=float, default=defaults.hysteresis)
    ap.add_argument("--wait", type=int, default=defaults.wait)
    ap.add_argument("--grow", type=float, default=defaults.grow)
    ap.add_argument("--lone-hysteresis", type=float, default=defaults.lone_hysteresis)
    ap.add_argument("--try-alpha", type=float, default=None,
                    help="weight of a try's yield in the request's average (default: the rule's alpha)")
    ap.add_argument("--carry", type=int, default=0, metavar="REPS",
                    help="one rule for every loop, as one engine runs the bench: the loops in turn, "
                         "REPS times over (0: a fresh rule per loop)")
    args = ap.parse_args()
    for name in args.maps:
        data = json.loads(Path(name).read_text())
        maps = [row["accepted"] for row in data["prompts"]]
        costs = Costs(args.plain_ms, args.draft_ms, args.prefill_ms, data["block_size"] - 1, args.resume_ms)
        units = [list(range(i, min(i + args.unit, len(maps)))) for i in range(0, len(maps), args.unit)]
        for c in args.concurrency:
            def few(c=c) -> Few:
                return Few(FewRequests(args.alpha, args.hysteresis, args.wait, args.grow, max_reqs=max(4, c),
                                       lone_hysteresis=args.lone_hysteresis), args.prior, args.try_alpha)

            ms = {name_: loops(maps, units, make, costs, c, args.carry)
                  for name_, make in (("plain", Plain), ("draft", Draft), ("myopic", Myopic), ("few", few))}
            plain = ms.pop("plain")
            print(f"{name}: {len(maps)} prompts, concurrency {c}, {len(units)} loops of {args.unit}: "
                  + ", ".join(f"{k} {sum(plain) / sum(v):.3f}x" for k, v in ms.items())
                  + " plain decoding; few per loop "
                  + " ".join(f"{p / v:.3f}" for p, v in zip(plain, ms["few"], strict=True)))

if __name__ == "__main__":
    main()
