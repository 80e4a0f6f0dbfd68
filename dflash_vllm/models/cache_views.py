"""K and V views of a draft layer's paged KV cache, for kernels that write the cache themselves.

The fused ``context_kv`` kernel writes K and V straight into the cache through
``[num_blocks, block_size, num_kv_heads, head_dim]`` views with arbitrary strides. How an attention
backend lays out its cache is its own business, so views are only built for backends whose layout
is known (vLLM 0.32):

* FlashAttention / Triton attention: ``(num_blocks, heads, block, 2 * head_dim)``; K and V are the
  two halves of the last dim (``kv_cache.transpose(1, 2).split(head_dim, -1)``, as their
  ``do_kv_cache_update`` does).
* CPU attention (``vec``/``vec16`` ISA): ``(num_blocks, heads, block, 2 * head_dim)`` read as
  ``(num_blocks, heads, 2 * block, head_dim)``; the V rows are plain, but each (block, head) K tile
  is stored transposed (``head_dim`` rows of ``block`` tokens).

Every layout is then checked once by a probe: random K/V written through the backend's own
``do_kv_cache_update`` into block 0 (vLLM's null block, never part of a request) must read back
through the views exactly; block 0 is restored afterwards. A layout that fails the probe (another
ISA, a quantized cache) gets no views, and the caller keeps the backend's own write.
"""

from __future__ import annotations

import torch
from vllm.logger import init_logger

logger = init_logger("vllm.dflash_vllm.cache_views")

_FLASH_LIKE = ("FlashAttentionImpl", "TritonAttentionImpl")
_CPU = ("CPUAttentionBackendImpl",)


def _layer_views(attn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(k, v)`` views ``[num_blocks, block, heads, head_dim]`` of ``attn.kv_cache``, or None."""
    cache, impl = attn.kv_cache, type(attn.impl).__name__
    if not isinstance(cache, torch.Tensor) or cache.dim() != 4:
        return None
    num_blocks, heads, block, width = cache.shape
    d = attn.head_size
    if width != 2 * d or heads != attn.num_kv_heads:
        return None
    if impl in _FLASH_LIKE:
        k, v = cache.transpose(1, 2).split(d, dim=-1)
        return k, v
    if impl in _CPU and getattr(attn, "isa", None) in ("vec", "vec16") and cache.is_contiguous():
        s0, s1 = cache.stride(0), cache.stride(1)
        k = cache.as_strided((num_blocks, block, heads, d), (s0, 1, s1, block), cache.storage_offset())
        v = cache.view(num_blocks, heads, 2 * block, d)[:, :, block:].permute(0, 2, 1, 3)
        return k, v
    return None


def _probe(attn, k_view: torch.Tensor, v_view: torch.Tensor) -> bool:
    """Does the backend's own write of block 0 read back through the views?"""
    cache = attn.kv_cache
    block, heads, d = k_view.shape[1:]
    saved = cache[0].clone()
    g = torch.Generator(device="cpu").manual_seed(0)
    k = torch.randn(block, heads, d, generator=g).to(device=cache.device, dtype=cache.dtype)
    v = torch.randn(block, heads, d, generator=g).to(device=cache.device, dtype=cache.dtype)
    slots = torch.arange(block, dtype=torch.int64, device=cache.device)
    try:
        attn.impl.do_kv_cache_update(attn, k, v, cache, slots)
        return bool(torch.equal(k_view[0], k) and torch.equal(v_view[0], v))
    except Exception as err:  # noqa: BLE001 - any failure means: keep the backend's own write
        logger.info("dflash-vllm: cache probe failed (%s)", err)
        return False
    finally:
        cache[0].copy_(saved)


def context_cache_views(attns: list) -> tuple[list[torch.Tensor], list[torch.Tensor]] | None:
    """Per-layer K and V views of the draft layers' caches, probed; None where the layout is not
    one the kernel can write."""
    views = [_layer_views(a) for a in attns]
    if any(v is None for v in views):
        return None
    shapes = {(tuple(k.shape), k.stride(), v.stride(), k.dtype) for k, v in views}
    if len(shapes) != 1 or not _probe(attns[0], *views[0]):
        return None
    return [k for k, _ in views], [v for _, v in views]
