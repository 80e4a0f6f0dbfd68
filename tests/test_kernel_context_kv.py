"""context_kv: the Triton kernel (under TRITON_INTERPRET=1 on CPU) against its PyTorch reference,
writing into paged caches laid out as vLLM's FlashAttention backend lays them out."""

import pytest
import torch

# TRITON_INTERPRET=1 is set by conftest.py, before anything imports triton
from dflash_vllm.kernels.context_kv import context_kv_ref, context_kv_triton

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("c, layers, h, d", [(1, 1, 1, 64), (7, 2, 3, 64), (33, 5, 8, 128), (12, 3, 2, 32)])
def test_matches_reference(c, layers, h, d, dtype):
    kv, w, cs, pos, slots, block, nb = _case(c, layers, h, d, dtype, seed=c * 10 + layers)
    ref_all, ref_k, ref_v = _caches(layers, nb, block, h, d, dtype)
    out_all, out_k, out_v = _caches(layers, nb, block, h, d, dtype)
    context_kv_ref(kv, w, 1e-6, cs, pos, slots, ref_k, ref_v)
    context_kv_triton(kv, w, 1e-6, cs, pos, slots, out_k, out_v)
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
