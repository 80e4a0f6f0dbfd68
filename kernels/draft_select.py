"""Fused draft-token selection: per row of the drafter's hidden states, the argmax token of the
shared LM head, its probability, and the log-sum-exp, without materialising the ``[N, V]`` logits.

    logits[n, v] = h[n] . W[v]                       (h: [N, H] drafter output, W: [V, H] LM head)
    lse[n]       = log sum_v exp(logits[n, v])        (online over vocabulary tiles: running max m, sum s)
    token[n]     = argmax_v logits[n, v]               (ties: lowest id, as torch.argmax)
    prob[n]      = exp(logits[n, token[n]] - lse[n])   (the drafter's confidence in its draft)

At temperature ``T`` every logit is divided by ``T`` first (the argmax does not move; ``prob`` and
``lse`` are those of ``softmax(logits / T)``). With ``top_k > 0`` each row also gets its ``top_k``
largest tokens, best first (ties: lowest id), and their probabilities, kept as a running list merged
with every vocabulary tile. ``draft_probs`` writes the full ``softmax(logits / T)`` rows that vLLM's
rejection sampler takes as draft probabilities for sampled drafting, from the ``lse`` of the first
pass, again without a logits tensor.

With V = 151,936 and N = 32 x 15 the logits alone are 290 MB in fp32; the kernel keeps one
``[BLOCK_N, BLOCK_V]`` tile in registers. ``draft_select_ref`` / ``draft_probs_ref`` are the PyTorch
references (and the CPU path, where vLLM runs no Triton); ``draft_select`` dispatches.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


class DraftSelection(NamedTuple):
    token: torch.Tensor  # [N] int64, argmax (lowest id on ties)
    prob: torch.Tensor  # [N] fp32, its probability at the temperature
    lse: torch.Tensor  # [N] fp32, logsumexp(logits / T)
    top_ids: torch.Tensor | None  # [N, top_k] int64, best first; None unless top_k > 0
    top_probs: torch.Tensor | None  # [N, top_k] fp32


def draft_select_ref(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float = 1.0,
                     top_k: int = 0) -> DraftSelection:
    """``hidden [N, H]``, ``lm_head [V, H]`` -> ``DraftSelection`` (see the module docstring)."""
    logits = (hidden.float() @ lm_head.float().T) / temperature
    lse = torch.logsumexp(logits, dim=-1)
    token = logits.argmax(dim=-1)
    prob = torch.exp(logits.gather(1, token[:, None])[:, 0] - lse)
    if not top_k:
        return DraftSelection(token, prob, lse, None, None)
    top_ids = torch.sort(-logits, dim=-1, stable=True).indices[:, :top_k]  # stable: lowest id first on ties
    return DraftSelection(token, prob, lse, top_ids, torch.exp(logits.gather(1, top_ids) - lse[:, None]))


def draft_probs_ref(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``[N, V]`` fp32 ``softmax(hidden @ lm_head.T / T)``."""
    return torch.softmax((hidden.float() @ lm_head.float().T) / temperature, dim=-1)


# The kernels call these helpers by name; ``_jitted`` binds them to their jitted forms at first use.
_tile_logits = _merge_top = None

if triton is not None:

    def _tile_logits_py(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, inv_t, stride_hn, stride_wv,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        """[BLOCK_N, BLOCK_V] fp32 logits / T of one tile; -inf past the vocabulary."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
        for h0 in range(0, H, BLOCK_H):
            ks = h0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            acc += tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), input_precision="ieee")
        return tl.where(col_ok[None, :], acc * inv_t, float("-inf"))

    def _merge_top_py(top_v, top_i, acc, cols, V, TOP_K: tl.constexpr, K_PAD: tl.constexpr):
        """The running best ``TOP_K`` of a row merged with a tile (best first; ties: lowest id, and every id
        in the running list is lower than the tile's)."""
        slot = tl.arange(0, K_PAD)[None, :]
        new_v = tl.full(top_v.shape, float("-inf"), tl.float32)
        new_i = tl.full(top_i.shape, V, tl.int64)
        for j in tl.static_range(TOP_K):
            ov = tl.max(top_v, axis=1)
            oi = tl.min(tl.where(top_v == ov[:, None], top_i, V), axis=1)
            tv = tl.max(acc, axis=1)
            ti = tl.min(tl.where(acc == tv[:, None], cols[None, :], V), axis=1).to(tl.int64)
            old = ov >= tv
            new_v = tl.where(slot == j, tl.where(old, ov, tv)[:, None], new_v)
            new_i = tl.where(slot == j, tl.where(old, oi, ti)[:, None], new_i)
            top_v = tl.where(old[:, None] & (top_i == oi[:, None]), float("-inf"), top_v)
            acc = tl.where(~old[:, None] & (cols[None, :] == ti[:, None]), float("-inf"), acc)
        return new_v, new_i

    def _draft_select_kernel(h_ptr, w_ptr, token_ptr, prob_ptr, lse_ptr, top_v_ptr, top_i_ptr, N, V, H, inv_t,
                             stride_hn, stride_wv,
                             BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                             TOP_K: tl.constexpr, K_PAD: tl.constexpr):
        pid = tl.program_id(0)
        rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # running max
        s = tl.zeros([BLOCK_N], tl.float32)  # running sum of exp(logit - m)
        best = tl.zeros([BLOCK_N], tl.int64)
        top_v = tl.full([BLOCK_N, K_PAD], float("-inf"), tl.float32)
        top_i = tl.full([BLOCK_N, K_PAD], V, tl.int64)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < V
            acc = _tile_logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, inv_t, stride_hn, stride_wv,
                               BLOCK_N, BLOCK_V, BLOCK_H)
            tile_max = tl.max(acc, axis=1)
            # lowest column reaching the tile max (torch.argmax breaks ties the same way)
            is_max = (acc == tile_max[:, None]) & col_ok[None, :]
            tile_arg = tl.min(tl.where(is_max, cols[None, :], V), axis=1).to(tl.int64)
            better = tile_max > m  # strictly: an earlier tile keeps a tie
            best = tl.where(better, tile_arg, best)
            new_m = tl.maximum(m, tile_max)
            s = s * tl.exp(m - new_m) + tl.sum(tl.exp(acc - new_m[:, None]), axis=1)
            m = new_m
            if TOP_K > 0:
                top_v, top_i = _merge_top(top_v, top_i, acc, cols, V, TOP_K, K_PAD)
        lse = m + tl.log(s)
        tl.store(token_ptr + rows, best, mask=row_ok)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(prob_ptr + rows, tl.exp(m - lse), mask=row_ok)
        if TOP_K > 0:
            slot = tl.arange(0, K_PAD)
            out = rows[:, None] * TOP_K + slot[None, :]
            ok = row_ok[:, None] & (slot[None, :] < TOP_K)
            tl.store(top_i_ptr + out, top_i, mask=ok)
            tl.store(top_v_ptr + out, tl.exp(top_v - lse[:, None]), mask=ok)

    def _draft_probs_kernel(h_ptr, w_ptr, lse_ptr, out_ptr, N, V, H, inv_t, stride_hn, stride_wv, stride_on,
                            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_ok, col_ok = rows < N, cols < V
        acc = _tile_logits(h_ptr, w_ptr, rows, row_ok, cols, col_ok, H, inv_t, stride_hn, stride_wv,
                           BLOCK_N, BLOCK_V, BLOCK_H)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :], tl.exp(acc - lse[:, None]),
                 mask=row_ok[:, None] & col_ok[None, :])


@functools.cache
def _jitted(interpret: str | None):
    # JIT at first use, not at import: triton.jit reads TRITON_INTERPRET when it decorates, and this
    # module is often imported (by the proposer) before a test or a user sets it.
    # the kernels call these helpers by their global names: bind them to their jitted forms first
    globals().update(_tile_logits=triton.jit(_tile_logits_py), _merge_top=triton.jit(_merge_top_py))
    return triton.jit(_draft_select_kernel), triton.jit(_draft_probs_kernel)


def _block_sizes(n: int, v: int, h: int) -> tuple[int, int, int]:
    block_n = 16 if n <= 16 else 32
    return block_n, min(128, triton.next_power_of_2(v)), min(64, triton.next_power_of_2(h))


def _check(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float, top_k: int = 0) -> None:
    if hidden.dim() != 2 or lm_head.dim() != 2 or hidden.shape[1] != lm_head.shape[1]:
        raise ValueError(f"draft_select: hidden {tuple(hidden.shape)} and lm_head {tuple(lm_head.shape)} are "
                         "not [N, H] and [V, H]")
    if not temperature > 0:
        raise ValueError(f"draft_select: temperature must be > 0, got {temperature}")
    if not 0 <= top_k <= min(lm_head.shape[0], 64):
        raise ValueError(f"draft_select: top_k must be in 0..min(vocab, 64), got {top_k}")


def draft_select_triton(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float = 1.0,
                        top_k: int = 0) -> DraftSelection:
    _check(hidden, lm_head, temperature, top_k)
    n, h = hidden.shape
    v = lm_head.shape[0]
    hidden, lm_head = hidden.contiguous(), lm_head.contiguous()
    dev = hidden.device
    token = torch.empty(n, dtype=torch.int64, device=dev)
    prob = torch.empty(n, dtype=torch.float32, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    top_i = torch.empty(n, max(top_k, 1), dtype=torch.int64, device=dev)
    top_v = torch.empty(n, max(top_k, 1), dtype=torch.float32, device=dev)
    block_n, block_v, block_h = _block_sizes(n, v, h)
    select, _ = _jitted(os.environ.get("TRITON_INTERPRET"))
    select[(triton.cdiv(n, block_n),)](
        hidden, lm_head, token, prob, lse, top_v, top_i, n, v, h, 1.0 / temperature, hidden.stride(0),
        lm_head.stride(0), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        TOP_K=top_k, K_PAD=triton.next_power_of_2(max(top_k, 1)),
    )
    return DraftSelection(token, prob, lse, top_i if top_k else None, top_v if top_k else None)


def draft_probs_triton(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float = 1.0,
                       lse: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, V]`` fp32 ``softmax(hidden @ lm_head.T / T)``; ``lse`` from ``draft_select_triton`` at the
    same temperature saves its pass."""
    _check(hidden, lm_head, temperature)
    if lse is None:
        lse = draft_select_triton(hidden, lm_head, temperature).lse
    n, h = hidden.shape
    v = lm_head.shape[0]
    hidden, lm_head = hidden.contiguous(), lm_head.contiguous()
    out = torch.empty(n, v, dtype=torch.float32, device=hidden.device)
    block_n, block_v, block_h = _block_sizes(n, v, h)
    _, probs = _jitted(os.environ.get("TRITON_INTERPRET"))
    probs[(triton.cdiv(n, block_n), triton.cdiv(v, block_v))](
        hidden, lm_head, lse.contiguous(), out, n, v, h, 1.0 / temperature, hidden.stride(0), lm_head.stride(0),
        out.stride(0), BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
    )
    return out


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, or anywhere under its interpreter (TRITON_INTERPRET=1)."""
    if triton is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def draft_select(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                 use_triton: bool | None = None) -> DraftSelection:
    """The one dispatch point: the Triton kernel where it can run, else the PyTorch reference."""
    if use_triton is None:
        use_triton = triton_usable(hidden.device)
    fn = draft_select_triton if use_triton else draft_select_ref
    return fn(hidden, lm_head, temperature, top_k)


def draft_probs(hidden: torch.Tensor, lm_head: torch.Tensor, temperature: float = 1.0,
                use_triton: bool | None = None) -> torch.Tensor:
    if use_triton is None:
        use_triton = triton_usable(hidden.device)
    return draft_probs_triton(hidden, lm_head, temperature) if use_triton else draft_probs_ref(hidden, lm_head,
                                                                                              temperature)
