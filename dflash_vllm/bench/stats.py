"""Figures of a benchmark from raw job results: tokens/s, TPOT, tau, per-position acceptance,
acceptance-length histogram, and ratios computed per repetition pair."""

from __future__ import annotations

import statistics


def acceptance_histogram(num_drafts: int, accepted_per_pos: list[int]) -> list[int]:
    """Drafts whose acceptance length is 1, 2, ..., K+1.

    Acceptance is a prefix: position k is accepted only if all before it are, so
    ``accepted_per_pos[k]`` counts drafts with more than k accepted tokens.
    """
    at_least = [num_drafts, *accepted_per_pos]  # at_least[j]: drafts with >= j accepted
    return [at_least[j] - (at_least[j + 1] if j + 1 < len(at_least) else 0) for j in range(len(at_least))]


def pairwise_ratios(numerator: list[float], denominator: list[float]) -> dict:
    """Ratio per repetition pair (rep i of one mode over rep i of the other), then their median:
    drift on a noisy machine hits both members of a pair and cancels."""
    pairs = [a / b for a, b in zip(numerator, denominator, strict=True) if a is not None and b]
    return {"per_rep": pairs, "median": statistics.median(pairs) if pairs else None,
            "min": min(pairs) if pairs else None, "max": max(pairs) if pairs else None}


def job_figures(job: dict, concurrency: int) -> dict:
    spec = job["spec"]
    tokens, wall = job["num_output_tokens"], job["wall_s"]
    drafts = spec["num_drafts"]
    per_pos = [a / drafts for a in spec["accepted_per_pos"]] if drafts else []
    full_tokens, full_s = job.get("full_tokens"), job.get("full_s")
    return {
        "tokens_per_s": tokens / wall if wall else None,
        # the loop at full load, its tail left out (``ClosedLoop.full_s``); None for older results
        "full_tokens_per_s": full_tokens / full_s if full_tokens and full_s else None,
        # time per output token of one request: wall time over the tokens each request produced
        "tpot_ms": 1000 * wall / (tokens / concurrency) if tokens else None,
        "tau": spec["acceptance_length"],
        "per_position_acceptance": per_pos,
        "acceptance_histogram": acceptance_histogram(drafts, spec["accepted_per_pos"]) if drafts else [],
        "accepted_per_pos": spec["accepted_per_pos"],
        "num_drafts": drafts,
        "num_accepted_tokens": spec["num_accepted_tokens"],
        "num_output_tokens": tokens,
        "wall_s": wall,
        "slices": job.get("slices"),  # engines="sliced": the turns its closed loop ran in
    }


def summarize_mode(reps: list[dict]) -> dict:
    """Median over repetitions of one mode at one concurrency."""
    def med(key):
        vals = [r[key] for r in reps if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    drafts = sum(r["num_drafts"] for r in reps)
    accepted = sum(r["num_accepted_tokens"] for r in reps)
    # per-position counts pooled over repetitions (older results carry rates only: counts = rate * drafts)
    per_rep = [r.get("accepted_per_pos") or [round(x * r["num_drafts"]) for x in r["per_position_acceptance"]]
               for r in reps]
    pooled = [sum(col) for col in zip(*per_rep, strict=True)] if per_rep and per_rep[0] else []
    return {"tokens_per_s": med("tokens_per_s"), "full_tokens_per_s": med("full_tokens_per_s"),
            "tpot_ms": med("tpot_ms"),
            "tau": 1 + accepted / drafts if drafts else None,
            "per_position_acceptance": [a / drafts for a in pooled] if drafts else [],
            "acceptance_histogram": acceptance_histogram(drafts, pooled) if drafts else [],
            "reps": reps}
