"""Anchors and the block attention mask of DFlash training.

Per sequence, ``A`` random anchor positions ``p_a``; each opens a block of ``B`` queries
``[token[p_a], MASK x (B-1)]`` at positions ``p_a .. p_a + B - 1``. All blocks of a sequence train in
one forward pass, with keys ``[context (T positions) ; block queries (A*B)]`` and this visibility:

    query (a, i) sees context j   iff  j < p_a          (what was verified when block a is drafted)
    query (a, i) sees block (b, k) iff  b == a           (bidirectional inside its own block, never another)

Position ``i >= 1`` of block ``a`` predicts ``token[p_a + i]`` with weight ``exp(-(i-1)/gamma)``.
"""

from __future__ import annotations

import math

import torch

DEFAULT_GAMMA = {16: 7.0, 10: 5.0, 8: 4.0}


def loss_gamma(block_size: int) -> float:
    """Decay of the per-position loss weight; the paper's values, interpolated for other sizes."""
    return DEFAULT_GAMMA.get(block_size, max(1.0, 7.0 * (block_size - 1) / 15))


def position_weights(block_size: int, gamma: float | None = None) -> torch.Tensor:
    """``[B]``: 0 for the anchor, ``exp(-(i-1)/gamma)`` for position i >= 1."""
    gamma = loss_gamma(block_size) if gamma is None else gamma
    w = torch.tensor([math.exp(-(i - 1) / gamma) for i in range(block_size)])
    w[0] = 0.0
    return w


def sample_anchors(lengths: torch.Tensor, num_anchors: int, generator: torch.Generator | None = None,
                   low: torch.Tensor | None = None) -> torch.Tensor:
    """``[N, A]`` anchors, uniform over ``[max(1, low), length - 2]`` per sequence (with replacement
    when the range is short). Anchor 0 is excluded: a block needs at least one context token."""
    n = lengths.shape[0]
    lo = torch.ones(n, dtype=torch.long) if low is None else low.clamp(min=1)
    hi = (lengths - 2).clamp(min=lo)
    u = torch.rand(n, num_anchors, generator=generator)
    return (lo[:, None] + (u * (hi - lo + 1)[:, None]).long()).clamp(max=hi[:, None])


def block_attention_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """``anchors [N, A]`` -> visibility ``[N, A*B, context_len + A*B]`` (True = may attend)."""
    n, a = anchors.shape
    device = anchors.device
    q_block = torch.arange(a * block_size, device=device) // block_size  # [A*B] block of each query
    ctx = torch.arange(context_len, device=device)
    sees_ctx = ctx[None, None, :] < anchors.repeat_interleave(block_size, dim=1)[:, :, None]  # [N, A*B, T]
    sees_blk = (q_block[:, None] == q_block[None, :]).expand(n, -1, -1)  # [N, A*B, A*B]
    return torch.cat([sees_ctx, sees_blk], dim=-1)


def block_inputs(tokens: torch.Tensor, anchors: torch.Tensor, block_size: int, mask_token_id: int,
                 lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens [N, T]`` -> block ids ``[N, A*B]``, positions ``[N, A*B]``, labels ``[N, A*B]`` (-100: none)."""
    offs = torch.arange(block_size, device=tokens.device)
    positions = (anchors[:, :, None] + offs).reshape(anchors.shape[0], -1)  # [N, A*B]
    ids = torch.full_like(positions, mask_token_id)
    ids[:, ::block_size] = tokens.gather(1, anchors)
    in_range = positions < lengths[:, None]
    labels = tokens.gather(1, positions.clamp(max=tokens.shape[1] - 1))
    labels = torch.where(in_range, labels, torch.full_like(labels, -100))
    labels[:, ::block_size] = -100  # the anchor is given, not predicted
    return ids, positions, labels
