#!/usr/bin/env python
"""draft_select: Triton kernel against its PyTorch reference at the Qwen3-8B drafter's shapes
(hidden 4096, vocab 151,936, K = 15; greedy, and temperature 0.8 with top-8), median time and peak
memory, appended to a CSV.

    python kernels/benchmarks/bench_draft_select.py [--csv kernels/benchmarks/results.csv]
    python kernels/benchmarks/bench_draft_select.py --smoke   # CPU, Triton's interpreter, tiny shapes

``--smoke`` checks the script and the kernel against the reference without a GPU (the CI does);
its times mean nothing. This file also holds the helpers the other benchmarks share.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SMOKE = "--smoke" in sys.argv
if SMOKE:  # before triton is imported: its interpreter is chosen at import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

# the kernel files are self-contained: import them straight from kernels/ (no install needed)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from draft_select import draft_select_ref, draft_select_triton  # noqa: E402


def parse_args(doc: str | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc)
    ap.add_argument("--csv", default=str(Path(__file__).with_name("results.csv")))
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes (no timing value)")
    args = ap.parse_args()
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run on an NVIDIA GPU, or pass --smoke to check the script on CPU")
    return args


def device() -> str:
    return "cpu" if SMOKE else "cuda"


def measure(fn, reps: int = 20) -> tuple[float, int]:
    """Median milliseconds of ``fn`` and its peak extra memory in bytes (0 on CPU)."""
    cuda = not SMOKE
    reps = 3 if SMOKE else reps
    fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    return statistics.median(times) * 1e3, peak


def row_meta() -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent, check=False).stdout.strip()
    name = "cpu (TRITON_INTERPRET smoke)" if SMOKE else torch.cuda.get_device_name(0)
    return {"device": name, "torch": torch.__version__, "triton": __import__("triton").__version__, "commit": commit}


def append_csv(csv_path: str, rows: list[dict]) -> None:
    path = Path(csv_path)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        if new:
            w.writeheader()
        w.writerows(rows)


def main() -> None:
    args = parse_args(__doc__)
    dev = device()
    vocab, hidden_size, batches, dt = ((1000, 64, (1, 3), torch.float32) if SMOKE
                                       else (151_936, 4096, (1, 8, 32, 64), torch.bfloat16))
    head = torch.randn(vocab, hidden_size, device=dev, dtype=dt)
    rows = []
    for batch in batches:
        hidden = torch.randn(batch * 15, hidden_size, device=dev, dtype=dt)
        for variant, kw in (("greedy", {}), ("top8_t0.8", {"temperature": 0.8, "top_k": 8})):
            got, want = draft_select_triton(hidden, head, **kw), draft_select_ref(hidden, head, **kw)
            torch.testing.assert_close(got.lse, want.lse, rtol=2e-2, atol=2e-2)
            for name, fn in (("ref", draft_select_ref), ("triton", draft_select_triton)):
                ms, peak = measure(lambda fn=fn, hidden=hidden, kw=kw: fn(hidden, head, **kw))
                rows.append({"kernel": f"draft_select[{variant}]", "impl": name, "batch": batch,
                             "rows": batch * 15, "median_ms": round(ms, 4), "peak_mib": round(peak / 2**20, 1),
                             **row_meta()})
                print(rows[-1])
    append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
