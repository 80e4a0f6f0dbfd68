#!/usr/bin/env python
"""Mean acceptance length of one drafter from three implementations on the same held-out prompts,
greedy: the pure-PyTorch reference, vLLM through this plugin, vLLM's built-in DFlash.

    .venv/bin/python scripts/compare_tau.py [--target T --drafter D --prompts P] [--json OUT]

Defaults to the shipped demo pair and its held-out prompts (128 new tokens each).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dflash_vllm.bench.engine_job import run_engine_jobs  # noqa: E402
from dflash_vllm.demo import engine_args, shipped_pair  # noqa: E402
from dflash_vllm.reference import evaluate  # noqa: E402
from dflash_vllm.training.data import atomic_write_text, read_prompts  # noqa: E402


def main() -> None:
    pair = shipped_pair()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(pair[0]) if pair else None)
    ap.add_argument("--drafter", default=str(pair[1]) if pair else None)
    ap.add_argument("--prompts", default=str(pair[0].parent / "eval_prompts.jsonl") if pair else None)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    prompts = read_prompts(args.prompts)
    k = json.loads((Path(args.drafter) / "config.json").read_text())["block_size"] - 1
    job = {"name": "tau", "prompts": prompts, "sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}}
    out = {"prompts": len(prompts), "max_tokens": args.max_tokens, "num_speculative_tokens": k}
    out["reference"] = evaluate(args.target, args.drafter, prompts, args.max_tokens)
    for mode, env in (("plugin", {}), ("builtin", {"DFLASH_VLLM_DISABLE": "1"})):
        engine = engine_args(Path(args.target), Path(args.drafter), k)
        engine["additional_config"] = {"dflash": {"adaptive": False}}  # full blocks, as the reference
        spec = run_engine_jobs({"engine": engine,
                                "jobs": [job], "env": env})["jobs"][0]["spec"]
        drafts = spec["num_drafts"]
        spec["per_position_acceptance"] = [a / drafts for a in spec["accepted_per_pos"]] if drafts else []
        out[mode] = spec
    ref, ours, theirs = out["reference"]["tau"], out["plugin"]["acceptance_length"], out["builtin"]["acceptance_length"]
    out["plugin_vs_reference_gap"] = abs(ours - ref) / ref
    print(f"tau  reference {ref:.3f}   plugin {ours:.3f}   builtin {theirs:.3f}   "
          f"(plugin vs reference {100 * out['plugin_vs_reference_gap']:.1f}%)")
    for name in ("reference", "plugin", "builtin"):
        print(f"  per-position acceptance {name:9s}",
              " ".join(f"{x:.2f}" for x in out[name]["per_position_acceptance"]))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
