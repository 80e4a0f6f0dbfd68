"""Context K/V injection: after the one GEMM that projects the fused target features into every draft
layer's K and V, normalise and rotate K and write K and V into each layer's paged KV cache.

For context token ``c`` at position ``p`` with slot ``s`` (``s < 0``: padding, skipped) and layer ``l``:

    k      = kv[c, l*2*KV : l*2*KV + KV]   viewed as [H, D]     (KV = H * D)
    v      = kv[c, l*2*KV + KV : (l+1)*2*KV]
    k      = k * rsqrt(mean(k**2, -1) + eps) * k_norm_weight[l]  (per head, fp32)
    k      = neox RoPE at p: halves (x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin),
             cos/sin = cos_sin_cache[p, :D/2], cos_sin_cache[p, D/2:]   (vLLM's cache layout)
    k_cache[l][s // B, s % B] = k;  v_cache[l][s // B, s % B] = v

``context_kv_ref`` is the PyTorch reference: a handful of kernels over every layer at once and
[C, L, H, D] temporaries, then one indexed store per layer and cache. ``context_kv_cpu`` is the CPU
path for float32: the same arithmetic in NumPy on the tensors' memory (~40 small torch ops cost
~0.12 ms warm, and twice that between the models' passes, at one request on a 2-core CPU).
``context_kv_triton`` does every layer in one launch, one program per (token, layer), reading the
GEMM output once and writing the caches directly: no temporary beyond the GEMM output.
Caches are given per layer as ``[num_blocks, B, H, D]`` views with any strides, the same for every
layer (K and V may differ): FlashAttention's ``(blocks, heads, B, 2D)`` split into K and V, or the
CPU backend's per-block transposed K. The kernel addresses layer ``l`` as an element offset from
layer 0's storage. ``context_kv`` dispatches.
"""

from __future__ import annotations

import numpy as np
import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = None


def _rope_neox(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = k.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def context_kv_ref(kv: torch.Tensor, k_norm_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                   positions: torch.Tensor, slot_mapping: torch.Tensor,
                   k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
    """``kv [C, L*2*H*D]``, ``k_norm_weight [L, D]``, ``cos_sin_cache [P, D]``, ``positions`` and
    ``slot_mapping [C]``; ``k_caches``/``v_caches``: L views ``[num_blocks, B, H, D]``, written in place.
    Every layer is normalised and rotated at once (the CPU path: per-op overhead dominates there)."""
    num_layers, d = k_norm_weight.shape
    c = min(kv.shape[0], slot_mapping.shape[0])  # kv may carry padding rows past the slots
    h = kv.shape[1] // (2 * num_layers * d)
    kv, positions, slot_mapping = kv[:c].view(c, num_layers, 2, h, d), positions[:c], slot_mapping[:c]
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        kv, positions, slot_mapping = kv[keep], positions[keep], slot_mapping[keep]
    slots = slot_mapping.long()
    block = k_caches[0].shape[1]
    blk, off = slots // block, slots % block
    cs = cos_sin_cache[positions.long()].float()
    cos, sin = cs[:, None, None, : d // 2], cs[:, None, None, d // 2:]
    k = kv[:, :, 0].float()  # [C, L, H, D]
    k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + eps) * k_norm_weight.float()[None, :, None, :]
    k = _rope_neox(k, cos, sin)
    for layer, (k_cache, v_cache) in enumerate(zip(k_caches, v_caches, strict=True)):
        k_cache[blk, off] = k[:, layer].to(k_cache.dtype)
        v_cache[blk, off] = kv[:, layer, 1].to(v_cache.dtype)


def context_kv_cpu(kv: torch.Tensor, k_norm_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                   positions: torch.Tensor, slot_mapping: torch.Tensor,
                   k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
    """``context_kv_ref`` for float32 CPU tensors, in NumPy; other dtypes (NumPy has no bfloat16)
    take the reference."""
    if not (kv.dtype == k_caches[0].dtype == v_caches[0].dtype == torch.float32):
        context_kv_ref(kv, k_norm_weight, eps, cos_sin_cache, positions, slot_mapping, k_caches, v_caches)
        return
    num_layers, d = k_norm_weight.shape
    c = min(kv.shape[0], slot_mapping.shape[0])  # kv may carry padding rows past the slots
    h = kv.shape[1] // (2 * num_layers * d)
    x = kv.numpy()[:c].reshape(c, num_layers, 2, h, d)
    pos, slots = positions.numpy()[:c], slot_mapping.numpy()[:c]
    if (slots < 0).any():
        keep = slots >= 0
        x, pos, slots = x[keep], pos[keep], slots[keep]
    blk, off = np.divmod(slots.astype(np.int64, copy=False), k_caches[0].shape[1])
    cs = cos_sin_cache.float().numpy()[pos]  # [C, D]
    cos, sin = cs[:, None, None, : d // 2], cs[:, None, None, d // 2:]
    k = x[:, :, 0]  # [C, L, H, D]
    k = k * (1.0 / np.sqrt(np.mean(k * k, axis=-1, keepdims=True) + np.float32(eps)))
    k *= k_norm_weight.float().numpy()[None, :, None, :]
    x1, x2 = k[..., : d // 2], k[..., d // 2:]
    k = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    for layer, (k_cache, v_cache) in enumerate(zip(k_caches, v_caches, strict=True)):
        k_cache.numpy()[blk, off] = k[:, layer]
        v_cache.numpy()[blk, off] = x[:, layer, 1]


if triton is not None:

    def _context_kv_kernel(kv_ptr, w_ptr, cs_ptr, pos_ptr, slot_ptr, k_ptr, v_ptr, k_off_ptr, v_off_ptr,
                           eps, stride_kv, stride_cs, k_sb, k_so, k_sh, k_sd, v_sb, v_so, v_sh, v_sd, block_size,
                           H: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
        c = tl.program_id(0)
        layer = tl.program_id(1)
        slot = tl.load(slot_ptr + c).to(tl.int64)
        if slot >= 0:
            pos = tl.load(pos_ptr + c).to(tl.int64)
            heads = tl.arange(0, BLOCK_H)
            half = tl.arange(0, HALF)
            h_ok = heads < H
            m = h_ok[:, None]
            row = kv_ptr + c.to(tl.int64) * stride_kv + layer * (2 * H * D)
            lo = heads[:, None] * D + half[None, :]  # [BLOCK_H, D/2]: first halves of each head
            x1 = tl.load(row + lo, mask=m, other=0.0).to(tl.float32)
            x2 = tl.load(row + lo + HALF, mask=m, other=0.0).to(tl.float32)
            inv = 1.0 / tl.sqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D + eps)
            w1 = tl.load(w_ptr + layer * D + half).to(tl.float32)
            w2 = tl.load(w_ptr + layer * D + HALF + half).to(tl.float32)
            x1 = x1 * inv[:, None] * w1[None, :]
            x2 = x2 * inv[:, None] * w2[None, :]
            cos = tl.load(cs_ptr + pos * stride_cs + half).to(tl.float32)
            sin = tl.load(cs_ptr + pos * stride_cs + HALF + half).to(tl.float32)
            o1 = x1 * cos[None, :] - x2 * sin[None, :]
            o2 = x2 * cos[None, :] + x1 * sin[None, :]
            blk, off = slot // block_size, slot % block_size
            k_dst = k_ptr + tl.load(k_off_ptr + layer) + blk * k_sb + off * k_so + heads[:, None] * k_sh
            tl.store(k_dst + half[None, :] * k_sd, o1.to(k_ptr.dtype.element_ty), mask=m)
            tl.store(k_dst + (HALF + half[None, :]) * k_sd, o2.to(k_ptr.dtype.element_ty), mask=m)
            v1 = tl.load(row + H * D + lo, mask=m, other=0.0)
            v2 = tl.load(row + H * D + lo + HALF, mask=m, other=0.0)
            v_dst = v_ptr + tl.load(v_off_ptr + layer) + blk * v_sb + off * v_so + heads[:, None] * v_sh
            tl.store(v_dst + half[None, :] * v_sd, v1.to(v_ptr.dtype.element_ty), mask=m)
            tl.store(v_dst + (HALF + half[None, :]) * v_sd, v2.to(v_ptr.dtype.element_ty), mask=m)

    _context_kv_kernel = triton.jit(_context_kv_kernel)


def _layer_offsets(caches: list[torch.Tensor]) -> torch.Tensor:
    """Element offsets of each layer's cache from layer 0's first element (int64)."""
    first, size = caches[0], caches[0].element_size()
    for cache in caches[1:]:
        if cache.dtype != first.dtype or cache.stride() != first.stride() or cache.shape != first.shape:
            raise ValueError("context_kv_triton: every layer's cache needs the same shape, strides and dtype")
    diffs = [cache.data_ptr() - first.data_ptr() for cache in caches]
    if any(d % size for d in diffs):
        raise ValueError("context_kv_triton: layer caches are not element-aligned with each other")
    return torch.tensor([d // size for d in diffs], dtype=torch.int64, device=first.device)


def context_kv_triton(kv: torch.Tensor, k_norm_weight: torch.Tensor, eps: float, cos_sin_cache: torch.Tensor,
                      positions: torch.Tensor, slot_mapping: torch.Tensor,
                      k_caches: list[torch.Tensor], v_caches: list[torch.Tensor]) -> None:
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_layers, d = k_norm_weight.shape
    c = kv.shape[0]
    h = kv.shape[1] // (2 * num_layers * d)
    if kv.shape[1] != 2 * num_layers * h * d or kv.stride(1) != 1 or d % 2 or d & (d - 1):
        raise ValueError(f"context_kv_triton: kv {tuple(kv.shape)} is not [C, {num_layers}*2*H*{d}] row-major "
                         "with a power-of-2 head_dim")
    if cos_sin_cache.shape[-1] != d:
        raise ValueError("context_kv_triton: partial rotary (rotary_dim < head_dim) is not supported")
    c = min(c, slot_mapping.shape[0])  # kv may carry padding rows past the slots
    if c == 0:
        return
    k0, v0 = k_caches[0], v_caches[0]
    if k0.dtype != v0.dtype or k0.shape != v0.shape or tuple(k0.shape[2:]) != (h, d):
        raise ValueError(f"context_kv_triton: caches {tuple(k0.shape)} / {tuple(v0.shape)} are not "
                         f"[num_blocks, block, {h}, {d}] views of one dtype")
    _context_kv_kernel[(c, num_layers)](
        kv, k_norm_weight.contiguous(), cos_sin_cache, positions, slot_mapping, k0, v0,
        _layer_offsets(k_caches), _layer_offsets(v_caches), float(eps), kv.stride(0), cos_sin_cache.stride(0),
        *k0.stride(), *v0.stride(), k0.shape[1],
        H=h, D=d, BLOCK_H=triton.next_power_of_2(h), HALF=d // 2,
    )


def context_kv(*args, use_triton: bool | None = None, **kwargs) -> None:
    """The one dispatch point: the Triton kernel on CUDA (or when asked), NumPy on CPU, else the
    reference."""
    device = args[0].device.type
    if use_triton is None:
        use_triton = triton is not None and device == "cuda"
    if use_triton:
        context_kv_triton(*args, **kwargs)
    else:
        (context_kv_cpu if device == "cpu" else context_kv_ref)(*args, **kwargs)
