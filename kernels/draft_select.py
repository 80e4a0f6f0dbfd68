"""Fused draft-token selection: per row of the drafter's hidden states, the argmax token of the
shared LM head, its probability, and the log-sum-exp, without materialising the ``[N, V]`` logits.

    logits[n, v] = h[n] . W[v]                       (h: [N, H] drafter output, W: [V, H] LM head)
    lse[n]       = log sum_v exp(logits[n, v])        (online over vocabulary tiles: running max m, sum s)
    token[n]     = argmax_v logits[n, v]               (ties: lowest id, as torch.argmax)
    prob[n]      = exp(logits[n, token[n]] - lse[n])   (the drafter's confidence in its draft)

With V = 151,936 and N = 32 x 15 the logits alone are 290 MB in fp32; the kernel keeps one
``[BLOCK_N, BLOCK_V]`` tile in registers. ``draft_select_ref`` is the PyTorch reference (and the CPU
path, where vLLM runs no Triton); ``draft_select`` dispatches.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


def draft_select_ref(hidden: torch.Tensor, lm_head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``hidden [N, H]``, ``lm_head [V, H]`` -> token ``[N]`` int64, prob ``[N]`` fp32, lse ``[N]`` fp32."""
    logits = hidden.float() @ lm_head.float().T
    lse = torch.logsumexp(logits, dim=-1)
    token = logits.argmax(dim=-1)
    prob = torch.exp(logits.gather(1, token[:, None])[:, 0] - lse)
    return token, prob, lse


if triton is not None:

    def _draft_select_kernel(h_ptr, w_ptr, token_ptr, prob_ptr, lse_ptr, N, V, H,
                             stride_hn, stride_wv,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max
        s = tl.zeros([BLOCK_N], tl.float32)  # running sum of exp(logit - m)
        best = tl.zeros([BLOCK_N], tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
            for h0 in range(0, H, BLOCK_H):
                ks = h0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
            acc = tl.where(col_ok[None, :], acc, float("-inf"))
            tile_max = tl.max(acc, axis=1)
            # lowest column reaching the tile max (torch.argmax breaks ties the same way)
            is_max = (acc == tile_max[:, None]) & col_ok[None, :]
            tile_arg = tl.min(tl.where(is_max, cols[None, :], V), axis=1).to(tl.int64)
            better = tile_max > m  # strictly: an earlier tile keeps a tie
            best = tl.where(better, tile_arg, best)
            new_m = tl.maximum(m, tile_max)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(acc - new_m[:, None]), axis=1)
            m = new_m
        lse = m + tl.log(s)
        tl.store(token_ptr + rows, best, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(prob_ptr + rows, tl.exp(m - lse), mask=row_ok)


@functools.cache
def _jitted(interpret: str | None):
    # JIT at first use, not at import: triton.jit reads TRITON_INTERPRET when it decorates, and this
    # module is often imported (by the proposer) before a test or a user sets it.
    return triton.jit(_draft_select_kernel)


def _block_sizes(n: int, v: int, h: int) -> tuple[int, int, int]:
    block_n = 16 if n <= 16 else 32
    return block_n, min(128, triton.next_power_of_2(v)), min(64, triton.next_power_of_2(h))


def draft_select_triton(hidden: torch.Tensor, lm_head: torch.Tensor):
    n, h = hidden.shape
    v = lm_head.shape[0]
    hidden, lm_head = hidden.contiguous(), lm_head.contiguous()
    token = torch.empty(n, dtype=torch.int64, device=hidden.device)
    prob = torch.empty(n, dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    block_n, block_v, block_h = _block_sizes(n, v, h)
    _jitted(os.environ.get("TRITON_INTERPRET"))[(triton.cdiv(n, block_n),)](
        hidden, lm_head, token, prob, lse, n, v, h, hidden.stride(0), lm_head.stride(0),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
    )
    return token, prob, lse


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or anywhere under its interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def draft_select(hidden: torch.Tensor, lm_head: torch.Tensor, use_triton: bool | None = None):
    """The one dispatch point: the Triton kernel where it can run, else the PyTorch reference."""
    if use_triton is None:
        use_triton = triton_usable(hidden.device)
    return draft_select_triton(hidden, lm_head) if use_triton else draft_select_ref(hidden, lm_head)
