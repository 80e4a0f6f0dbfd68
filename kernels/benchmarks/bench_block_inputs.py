#!/usr/bin/env python
"""block_inputs: the one-launch Triton kernel against its PyTorch reference for a Qwen3-8B
drafter's step (K = 15, kv block 16, context 2,048 tokens per request, batch 1, 8, 32, 64, every
request with drafts verified last step), median time and peak memory, appended to a CSV.

    python kernels/benchmarks/bench_block_inputs.py [--csv kernels/benchmarks/results.csv] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kernels/: no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_draft_select import SMOKE, append_csv, device, measure, parse_args, row_meta  # noqa: E402,I001
from block_inputs import block_inputs_ref, block_inputs_triton  # noqa: E402


def step_inputs(batch: int, k: int = 15, context: int = 2048, kv_block: int = 16):
    dev = device()
    q = 1 + k  # last step verified 1 + K tokens per request
    qsl = torch.arange(batch + 1, device=dev, dtype=torch.int32) * q
    seq_lens = torch.full((batch,), context, device=dev, dtype=torch.int32)
    positions = (seq_lens[:, None] - q + torch.arange(q, device=dev)).reshape(-1).to(torch.int64)
    rejected = torch.randint(0, q, (batch,), device=dev, dtype=torch.int32)
    next_ids = torch.randint(0, 151_936, (batch,), device=dev, dtype=torch.int32)
    blocks = (context + q) // kv_block + 1
    table = torch.randperm(batch * blocks, device=dev, dtype=torch.int32).view(batch, blocks)
    return qsl, rejected, positions, next_ids, table, seq_lens, kv_block, 151_935, k


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    for batch in (1, 3) if SMOKE else (1, 8, 32, 64):
        inputs = step_inputs(batch, context=64) if SMOKE else step_inputs(batch)
        ref, tri = block_inputs_ref(*inputs), block_inputs_triton(*inputs)
        for f in ("input_ids", "positions", "slot_mapping", "context_slot_mapping", "sample_indices"):
            assert torch.equal(getattr(ref, f), getattr(tri, f)), f
        for name, fn in (("ref", block_inputs_ref), ("triton", block_inputs_triton)):
            ms, peak = measure(lambda fn=fn, inputs=inputs: fn(*inputs))
            rows.append({"kernel": "block_inputs", "impl": name, "batch": batch, "rows": batch * 16,
                         "median_ms": round(ms, 4), "peak_mib": round(peak / 2**20, 3), **row_meta()})
            print(rows[-1])
    append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
