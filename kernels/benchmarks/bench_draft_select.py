#!/usr/bin/env python
"""draft_select: Triton kernel against its PyTorch reference at the Qwen3-8B drafter's shapes
(hidden 4096, vocab 151,936, K = 15), median time and peak memory, appended to a CSV.

    python kernels/benchmarks/bench_draft_select.py [--csv kernels/benchmarks/results.csv]
"""

from __future__ import annotations

import argparse
import csv
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

# the kernel files are self-contained: import them straight from kernels/ (no install needed)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from draft_select import draft_select_ref, draft_select_triton  # noqa: E402


def measure(fn, reps: int = 20) -> tuple[float, int]:
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, torch.cuda.max_memory_allocated() - base


def row_meta() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
            "triton": __import__("triton").__version__, "commit": commit}


def append_csv(csv_path: str, rows: list[dict]) -> None:
    path = Path(csv_path)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=str(Path(__file__).with_name("results.csv")))
    args = ap.parse_args()
    assert torch.cuda.is_available(), "run on an NVIDIA GPU"
    head = torch.randn(151_936, 4096, device="cuda", dtype=torch.bfloat16)
    rows = []
    for batch in (1, 8, 32, 64):
        hidden = torch.randn(batch * 15, 4096, device="cuda", dtype=torch.bfloat16)
        for variant, kw in (("greedy", {}), ("top8_t0.8", {"temperature": 0.8, "top_k": 8})):
            for name, fn in (("ref", draft_select_ref), ("triton", draft_select_triton)):
                ms, peak = measure(lambda fn=fn, hidden=hidden, kw=kw: fn(hidden, head, **kw))
                rows.append({"kernel": f"draft_select[{variant}]", "impl": name, "batch": batch,
                             "rows": batch * 15, "median_ms": round(ms, 4), "peak_mib": round(peak / 2**20, 1),
                             **row_meta()})
                print(rows[-1])
    append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
