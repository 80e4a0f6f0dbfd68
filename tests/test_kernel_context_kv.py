"""context_kv: the Triton kernel (under TRITON_INTERPRET=1 on CPU) and the NumPy CPU path against
the PyTorch reference, writing into paged caches laid out as vLLM's FlashAttention and CPU backends
lay them out."""

import pytest
import torch

# TRITON_INTERPRET=1 is set by conftest.py, before anything imports triton
from dflash_vllm.kernels.context_kv import context_kv, context_kv_cpu, context_kv_ref, context_kv_triton

IMPLS = {"triton": context_kv_triton, "cpu": context_kv_cpu}

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _case(c, layers, h, d, dtype, block=16, num_blocks=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(c, layers * 2 * h * d, generator=g).to(dtype)
    weight = (1 + 0.1 * torch.randn(layers, d, generator=g)).to(dtype)
    positions = torch.randint(0, 200, (c,), generator=g)
    slots = torch.randperm(num_blocks * block, generator=g)[:c]
    slots[::5] = -1  # padding rows are skipped
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    freqs = torch.arange(256).float()[:, None] * inv[None]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)
    return kv, weight, cos_sin, positions, slots, block, num_blocks


def _caches(layers, num_blocks, block, h, d, dtype):
    # one [2, num_blocks, block, H, D] tensor per layer, allocated separately (as vLLM does)
    per_layer = [torch.zeros(2, num_blocks, block, h, d, dtype=dtype) for _ in range(layers)]
    return per_layer, [t[0] for t in per_layer], [t[1] for t in per_layer]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c, layers, h, d", [(1, 1, 1, 64), (7, 2, 3, 64), (33, 5, 8, 128), (12, 3, 2, 32)])
def test_matches_reference(c, layers, h, d, dtype, impl):
    kv, w, cs, pos, slots, block, nb = _case(c, layers, h, d, dtype, seed=c * 10 + layers)
    ref_all, ref_k, ref_v = _caches(layers, nb, block, h, d, dtype)
    out_all, out_k, out_v = _caches(layers, nb, block, h, d, dtype)
    context_kv_ref(kv, w, 1e-6, cs, pos, slots, ref_k, ref_v)
    IMPLS[impl](kv, w, 1e-6, cs, pos, slots, out_k, out_v)
    for layer, (got, want) in enumerate(zip(out_all, ref_all, strict=True)):
        diff = (got.float() - want.float()).abs()
        where = (diff > 0.05).nonzero()[:3].tolist()
        torch.testing.assert_close(got, want, **TOL[dtype],
                                   msg=lambda m, layer=layer, where=where: f"layer {layer}, first at {where}: {m}")
    written = int((slots >= 0).sum())
    assert int((out_all[0][1] != 0).any(-1).any(-1).sum()) == written, "exactly the non-padding slots are written"


def test_reference_matches_the_drafter_layers():
    """The reference is the math of the drafter's own context path (k_norm, then vLLM's RoPE)."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.layernorm import RMSNorm
    from vllm.model_executor.layers.rotary_embedding import get_rope

    h, d, c = 2, 64, 9
    kv, w, _, pos, _, block, nb = _case(c, 1, h, d, torch.float32)
    with set_current_vllm_config(VllmConfig()):  # vLLM's custom ops read it when built
        norm = RMSNorm(d, eps=1e-6)
        rope = get_rope(d, max_position=256, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                        is_neox_style=True)
    norm.weight.data.copy_(w[0])
    k = norm.forward_native(kv[:, : h * d].reshape(c, h, d)).reshape(c, h * d)
    k, _ = rope.forward_native(pos, k, None)
    slots = torch.arange(c)
    _, ks, vs = _caches(1, nb, block, h, d, torch.float32)
    context_kv_ref(kv, w, 1e-6, rope.cos_sin_cache, pos, slots, ks, vs)
    torch.testing.assert_close(ks[0].reshape(-1, h * d)[:c], k, rtol=1e-5, atol=1e-5)


def _cpu_attention_layer(num_blocks, block, h, d, dtype):
    """A draft layer's stand-in with vLLM's real CPU backend write (``do_kv_cache_update``)."""
    from types import SimpleNamespace

    from vllm.v1.attention.backend import AttentionType
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    impl = object.__new__(CPUAttentionBackendImpl)  # only its cache write is used
    impl.attn_type, impl.kv_cache_dtype = AttentionType.DECODER, "auto"
    return SimpleNamespace(impl=impl, kv_cache=torch.zeros(num_blocks, h, block, 2 * d, dtype=dtype),
                           head_size=d, num_kv_heads=h, isa=_get_attn_isa(dtype, block, d),
                           _k_scale_float=1.0, _v_scale_float=1.0)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [16, 32])
def test_kernel_writes_vllms_cpu_cache_layout(dtype, block, impl):
    """Through the probed views, the kernel (and the CPU path the proposer runs on CPU) leaves every
    layer's CPU cache exactly as vLLM's own write of the reference K/V does (the CPU backend stores
    each K tile transposed)."""
    from dflash_vllm.models.cache_views import context_cache_views

    c, layers, h, d, nb = 21, 2, 2, 64, 6
    kv, w, cs, pos, slots, _, _ = _case(c, layers, h, d, dtype, block=block, num_blocks=nb, seed=block)
    slots = torch.where(slots >= 0, slots + block, slots)  # keep block 0: vLLM's null block, the probe's
    ours = [_cpu_attention_layer(nb + 1, block, h, d, dtype) for _ in range(layers)]
    theirs = [_cpu_attention_layer(nb + 1, block, h, d, dtype) for _ in range(layers)]
    views = context_cache_views(ours)
    if ours[0].isa not in ("vec", "vec16"):
        # "amx" (bf16 at a block size divisible by 32, on CPUs with AMX tiles) packs K and V in a
        # layout no strided view covers: refused, and the drafter keeps the backend's own write
        assert views is None, f"views built for the {ours[0].isa} layout"
        pytest.skip(f"vLLM's CPU cache layout for isa {ours[0].isa!r} is refused (checked); this CPU picks it")
    assert views is not None, f"no views for the CPU layout (isa {ours[0].isa})"
    assert all(torch.count_nonzero(a.kv_cache) == 0 for a in ours), "the probe restores block 0"
    IMPLS[impl](kv, w, 1e-6, cs, pos, slots, *views)
    # the reference K/V, written by vLLM's CPU backend itself
    keep = slots >= 0
    ref_k = [torch.zeros(nb + 1, block, h, d, dtype=dtype) for _ in range(layers)]
    ref_v = [torch.zeros(nb + 1, block, h, d, dtype=dtype) for _ in range(layers)]
    context_kv_ref(kv, w, 1e-6, cs, pos, slots, ref_k, ref_v)
    s = slots[keep]
    for layer, attn in enumerate(theirs):
        attn.impl.do_kv_cache_update(attn, ref_k[layer][s // block, s % block], ref_v[layer][s // block, s % block],
                                     attn.kv_cache, s)
        torch.testing.assert_close(ours[layer].kv_cache, attn.kv_cache, **TOL[dtype],
                                   msg=lambda m, layer=layer: f"layer {layer}: {m}")


def test_views_refused_for_an_unknown_layout():
    from types import SimpleNamespace

    from dflash_vllm.models.cache_views import context_cache_views

    odd = SimpleNamespace(impl=object(), kv_cache=torch.zeros(4, 2, 16, 128), head_size=64, num_kv_heads=2)
    assert context_cache_views([odd]) is None


def test_flash_attention_layout():
    """vLLM 0.32's FlashAttention cache, ``(blocks, heads, block, 2 * head_dim)``, through the views its
    ``do_kv_cache_update`` takes: K and V interleaved per row, heads outermost."""
    c, layers, h, d, block, nb = 17, 3, 4, 32, 16, 5
    kv, w, cs, pos, slots, _, _ = _case(c, layers, h, d, torch.float32, block=block, num_blocks=nb, seed=7)
    caches = [torch.zeros(nb, h, block, 2 * d) for _ in range(layers)]
    ks, vs = zip(*(t.transpose(1, 2).split(d, dim=-1) for t in caches), strict=True)
    _, ref_k, ref_v = _caches(layers, nb, block, h, d, torch.float32)
    context_kv_triton(kv, w, 1e-6, cs, pos, slots, list(ks), list(vs))
    context_kv_ref(kv, w, 1e-6, cs, pos, slots, ref_k, ref_v)
    for layer in range(layers):
        torch.testing.assert_close(ks[layer], ref_k[layer], **TOL[torch.float32])
        torch.testing.assert_close(vs[layer], ref_v[layer], **TOL[torch.float32])


def test_dispatch_takes_the_cpu_path_for_cpu_tensors(monkeypatch):
    import importlib

    mod = importlib.import_module("dflash_vllm.kernels.context_kv")  # the package re-exports a function of that name

    called = []
    monkeypatch.setattr(mod, "context_kv_cpu", lambda *a, **k: called.append("cpu"))
    kv, w, cs, pos, slots, block, nb = _case(3, 1, 1, 64, torch.float32)
    _, ks, vs = _caches(1, nb, block, 1, 64, torch.float32)
    context_kv(kv, w, 1e-6, cs, pos, slots, ks, vs, use_triton=False)
    assert called == ["cpu"]
