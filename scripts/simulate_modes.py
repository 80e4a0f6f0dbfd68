#!/usr/bin/env python
"""Price decoding schedules of one request on acceptance maps (``scripts/acceptance_map.py``), in
units of a plain step, a drafting cycle costing ``--ratio`` of them (a diagnostic).

For each map it prints, as speed-ups over drafting every step (fewer units is faster):

- ``best``: the best schedule in hindsight (dynamic programming over positions: each one either
  decodes one token plainly, or drafts and advances by the drafts accepted there plus one). What
  any rule choosing between plain and drafting steps can reach at most.
- ``lone``: ``dflash_vllm.adaptive.LoneRequest``, the rule the adaptive controller runs for a batch
  of one request, with its defaults or ``--alpha/--hysteresis/--wait/--grow``. It sees the maps only
  as the engine sees text: the drafts accepted in the cycles it drafted.

    .venv/bin/python scripts/simulate_modes.py runs/acc_tune.json runs/acc_eval.json --ratio 1.7 2 2.3

The ratio on a running engine is a drafting cycle's seconds over a plain one's; at one request on
the 2-core CPU with the demo pair, about 2 (the controller's measured rates: ``describe()``).
Switching modes costs nothing here; in the engine it costs a little (a backfill of context).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_vllm.adaptive import LoneRequest  # noqa: E402


def drafting_every_step(acc: list[int]) -> int:
    j, steps = 0, 0
    while j < len(acc) - 1:
        j += acc[j] + 1
        steps += 1
    return steps


def best_units(acc: list[int], ratio: float) -> float:
    """Fewest units to decode tokens 1.. of the map (token 0 comes from the prefill)."""
    n = len(acc)
    units = [0.0] * n
    for j in range(n - 2, -1, -1):
        units[j] = min(1.0 + units[j + 1], ratio + units[min(n - 1, j + acc[j] + 1)])
    return units[0]


def lone_units(acc: list[int], ratio: float, rule: LoneRequest, prior: float, req_id: str) -> float:
    """Units the rule spends, decided as in the engine: a check before each drafting cycle (after
    the outcome of the last), a resume check after each plain step; a resumed cycle is not checked."""
    j, units, state, n = 0, 0.0, "check", len(acc)
    while j < n - 1:
        if state == "check":
            state = "draft" if rule.keep_drafting(req_id, ratio, prior) else "plain"
        if state == "draft":
            a = acc[j]
            j += a + 1
            units += ratio
            rule.observe(req_id, 1 + a)
            state = "check"
        else:
            j += 1
            units += 1.0
            if rule.resume(req_id, prior):
                state = "draft"
    return units


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("maps", nargs="+")
    ap.add_argument("--ratio", type=float, nargs="+", default=[1.7, 2.0, 2.3])
    ap.add_argument("--prior", type=float, default=4.0, help="pooled tokens per drafting cycle")
    defaults = LoneRequest()
    ap.add_argument("--alpha", type=float, default=defaults.alpha)
    ap.add_argument("--hysteresis", type=float, default=defaults.hysteresis)
    ap.add_argument("--wait", type=int, default=defaults.wait)
    ap.add_argument("--grow", type=float, default=defaults.grow)
    args = ap.parse_args()
    maps = {m: [row["accepted"] for row in json.loads(Path(m).read_text())["prompts"]] for m in args.maps}
    for ratio in args.ratio:
        for name, rows in maps.items():
            every = sum(drafting_every_step(a) for a in rows) * ratio
            best = sum(best_units(a, ratio) for a in rows)
            lone = 0.0
            for i, a in enumerate(rows):
                rule = LoneRequest(args.alpha, args.hysteresis, args.wait, args.grow)
                lone += lone_units(a, ratio, rule, args.prior, f"p{i}")
            print(f"ratio {ratio:.2f} {name} ({len(rows)} prompts): best {every / best:.3f}x, "
                  f"lone {every / lone:.3f}x drafting every step")


if __name__ == "__main__":
    main()
