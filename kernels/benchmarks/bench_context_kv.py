#!/usr/bin/env python
"""context_kv: the one-launch Triton kernel (k_norm + RoPE + paged write, every layer) against its
PyTorch reference for a Qwen3-8B drafter's step (5 layers, 8 KV heads x 128, bf16, kv block 16;
the context of batch 1, 8, 32, 64 requests that each verified 1 + K = 16 tokens), median time and
peak memory, caches in FlashAttention's layout (the GEMM output is an input here: both paths share it), appended to a CSV.

    python kernels/benchmarks/bench_context_kv.py [--csv kernels/benchmarks/results.csv] [--smoke]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kernels/: no install needed
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_draft_select import SMOKE, append_csv, device, measure, parse_args, row_meta  # noqa: E402,I001
from context_kv import context_kv_ref, context_kv_triton  # noqa: E402

LAYERS, HEADS, HEAD_DIM, KV_BLOCK, NUM_BLOCKS = (2, 2, 32, 16, 64) if SMOKE else (5, 8, 128, 16, 8192)


def step_inputs(batch: int, q: int = 16):
    dev, dt = device(), torch.float32 if SMOKE else torch.bfloat16
    c = batch * q
    kv = torch.randn(c, LAYERS * 2 * HEADS * HEAD_DIM, device=dev, dtype=dt)
    weight = torch.ones(LAYERS, HEAD_DIM, device=dev, dtype=dt)
    inv = 1.0 / (1_000_000 ** (torch.arange(0, HEAD_DIM, 2, device=dev).float() / HEAD_DIM))
    max_pos = 1024 if SMOKE else 40_960
    freqs = torch.arange(max_pos, device=dev).float()[:, None] * inv[None]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dt)
    positions = torch.randint(0, max_pos, (c,), device=dev)
    slots = torch.randperm(NUM_BLOCKS * KV_BLOCK, device=dev)[:c]
    # vLLM 0.32's FlashAttention cache per layer, (blocks, heads, block, 2 * head_dim), and the K/V views
    # its do_kv_cache_update writes through (dflash_vllm/models/cache_views.py)
    caches = [torch.zeros(NUM_BLOCKS, HEADS, KV_BLOCK, 2 * HEAD_DIM, device=dev, dtype=dt) for _ in range(LAYERS)]
    ks, vs = zip(*(t.transpose(1, 2).split(HEAD_DIM, dim=-1) for t in caches), strict=True)
    return (kv, weight, 1e-6, cos_sin, positions, slots, list(ks), list(vs)), caches


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    for batch in (1, 3) if SMOKE else (1, 8, 32, 64):
        inputs, caches = step_inputs(batch)
        context_kv_ref(*inputs)
        want = [t.clone() for t in caches]
        for t in caches:
            t.zero_()
        context_kv_triton(*inputs)
        for got, ref in zip(caches, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=2e-2, atol=2e-2)
        for name, fn in (("ref", context_kv_ref), ("triton", context_kv_triton)):
            ms, peak = measure(lambda fn=fn, inputs=inputs: fn(*inputs))
            rows.append({"kernel": "context_kv", "impl": name, "batch": batch, "rows": batch * 16,
                         "median_ms": round(ms, 4), "peak_mib": round(peak / 2**20, 3), **row_meta()})
            print(rows[-1])
    append_csv(args.csv, rows)


if __name__ == "__main__":
    main()
