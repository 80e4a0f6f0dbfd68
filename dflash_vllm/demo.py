"""``dflash-vllm demo``: offline generation through the plugin on a small local pair, side by side
with plain decoding: prints the texts, the mean acceptance length and the speed ratio."""

from __future__ import annotations

import tempfile
from pathlib import Path

from dflash_vllm.bench.engine_job import run_engine_jobs

DEMO_PROMPTS = [
    "import json\n\n\ndef load_config(path):\n",
    "class LRUCache:\n    def __init__(self, capacity):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "    def __repr__(self):\n        return",
    "for key, value in sorted(mapping.items()):\n",
    "def wrap(text, width=70):\n",
    "try:\n    import threading\nexcept ImportError:\n",
    "@functools.lru_cache(maxsize=None)\ndef",
]


def shipped_pair() -> tuple[Path, Path] | None:
    """The demo pair shipped as package data, if this install has it."""
    root = Path(__file__).parent / "demo_pair"
    if (root / "target" / "config.json").is_file() and (root / "drafter" / "config.json").is_file():
        return root / "target", root / "drafter"
    return None


def engine_args(target: Path, drafter: Path | None, num_speculative_tokens: int) -> dict:
    args = {
        "model": str(target), "dtype": "float32", "max_model_len": 1024,
        "kv_cache_memory_bytes": 512 * 2**20, "disable_log_stats": False, "seed": 0,
        "compilation_config": {"mode": 0},  # eager: a 2-core CPU starts in ~30 s instead of ~60 s
    }
    if drafter is not None:
        args["speculative_config"] = {"method": "dflash", "model": str(drafter),
                                      "num_speculative_tokens": num_speculative_tokens}
    return args


def run_demo(target: str | None, drafter: str | None, max_tokens: int, num_speculative_tokens: int | None,
             concurrency: int = 1) -> int:
    """Both engines run the same prompts, ``concurrency`` requests in flight (1: one user's stream, where
    speculative decoding pays most; on a CPU every verified token costs compute, so larger batches
    gain less, and the adaptive draft length may stop drafting)."""
    import json

    tmp = None
    if target and drafter:
        target_dir, drafter_dir, label = Path(target), Path(drafter), "your pair"
    elif shipped_pair():
        (target_dir, drafter_dir), label = shipped_pair(), "the shipped demo pair (trained)"
    else:
        from dflash_vllm.testing import make_tiny_pair

        tmp = tempfile.TemporaryDirectory(prefix="dflash-demo-")
        pair = make_tiny_pair(tmp.name)
        target_dir, drafter_dir = pair.target, pair.drafter
        label = "a tiny RANDOM pair (no trained demo pair in this install: expect acceptance near 1)"
    block_size = json.loads((drafter_dir / "config.json").read_text()).get("block_size", 16)
    k = num_speculative_tokens or block_size - 1
    print(f"dflash-vllm demo on {label}\n  target  {target_dir}\n  drafter {drafter_dir}  (K={k})\n"
          f"  {len(DEMO_PROMPTS)} prompts, {concurrency} request(s) in flight, greedy, max_tokens {max_tokens}")
    job = {"name": "demo", "prompts": DEMO_PROMPTS, "sampling": {"temperature": 0.0, "max_tokens": max_tokens},
           "concurrency": concurrency}
    warm = {**job, "name": "warmup", "prompts": DEMO_PROMPTS[:2], "sampling": {"temperature": 0.0, "max_tokens": 8}}
    results = {}
    for mode, d in (("plain decoding", None), ("dflash-vllm", drafter_dir)):
        print(f"  starting {mode} engine ...", flush=True)
        results[mode] = run_engine_jobs({"engine": engine_args(target_dir, d, k), "jobs": [warm, job]})["jobs"][1]
    plain, ours = results["plain decoding"], results["dflash-vllm"]
    for prompt, text in zip(DEMO_PROMPTS[:3], ours["texts"], strict=False):
        print("-" * 72 + f"\n{prompt}\033[1m{text}\033[0m")
    print("-" * 72)
    same = plain["token_ids"] == ours["token_ids"]
    tps = {m: r["num_output_tokens"] / r["wall_s"] for m, r in results.items()}
    tau = ours["spec"]["acceptance_length"]
    print(f"greedy output identical to plain decoding: {same}")
    if tau is None:
        print("no drafts were sent: adaptive draft length found none worth verifying on this pair")
    else:
        print(f"mean acceptance length (tau): {tau:.2f}  (drafts {ours['spec']['num_drafts']}, accepted "
              f"{ours['spec']['num_accepted_tokens']} of {ours['spec']['num_draft_tokens']} draft tokens; "
              "adaptive draft length on)")
    print(f"output tokens/s: plain {tps['plain decoding']:.1f}, dflash-vllm {tps['dflash-vllm']:.1f}  "
          f"-> speed ratio {tps['dflash-vllm'] / tps['plain decoding']:.2f}x")
    if tmp is not None:
        tmp.cleanup()
    return 0 if same else 1
