"""The vLLM drafter's eager CPU path: ``fuse_context`` norms the fused context with vLLM's C++
``rms_norm`` (the module's native path costs ~6x more per call) and gets what the module computes."""

import pytest
import torch
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.layernorm import RMSNorm

import dflash_vllm.models.vllm_drafter as drafter_mod
from dflash_vllm.models.vllm_drafter import DFlashVllmDrafter


class _Stub:
    """The attributes ``fuse_context`` reads, with a plain linear for ``fc``."""

    def __init__(self, n_in: int, hidden: int, dtype: torch.dtype):
        g = torch.Generator().manual_seed(0)
        self.weight = torch.randn(hidden, n_in, generator=g).to(dtype) / n_in**0.5
        with set_current_vllm_config(VllmConfig()):
            self.hidden_norm = RMSNorm(hidden, eps=1e-6).to(dtype)
        self.hidden_norm.weight.data = (1 + 0.2 * torch.randn(hidden, generator=g)).to(dtype)
        self._fused_norm = True

    def fc(self, x):
        return torch.nn.functional.linear(x, self.weight), None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fuse_context_norms_with_the_cpp_op_and_matches_the_module(monkeypatch, dtype):
    calls = []
    real = drafter_mod.ops.rms_norm

    def spy(*args):
        calls.append(args[1].shape)
        return real(*args)

    monkeypatch.setattr(drafter_mod.ops, "rms_norm", spy)
    stub = _Stub(3 * 64, 64, dtype)
    features = torch.randn(13, 3 * 64).to(dtype)
    with torch.inference_mode():
        got = DFlashVllmDrafter.fuse_context(stub, features)
        assert calls == [torch.Size([13, 64])], "the fused op should norm the context"
        stub._fused_norm = False
        want = DFlashVllmDrafter.fuse_context(stub, features)
    assert len(calls) == 1, "with the op off, the module's path"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    x = features.float() @ stub.weight.float().T
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * stub.hidden_norm.weight.float()
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol)


def test_fuse_context_falls_back_to_the_module_when_the_op_fails(monkeypatch):
    def broken(*args):
        raise RuntimeError("no kernel for this dtype")

    monkeypatch.setattr(drafter_mod.ops, "rms_norm", broken)
    stub = _Stub(2 * 32, 32, torch.float32)
    features = torch.randn(5, 2 * 32)
    with torch.inference_mode():
        got = DFlashVllmDrafter.fuse_context(stub, features)
        assert stub._fused_norm is False  # asked once, then the module's path for good
        want = stub.hidden_norm(stub.fc(features)[0])
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("need_conf", [False, True])
def test_greedy_drafts_are_the_argmax_on_tied_logits(dtype, need_conf):
    """The proposer's greedy selection takes ``max(dim=-1).indices`` (a quarter of argmax's time on
    CPU): on logits full of ties, the same tokens as vLLM's ``argmax`` (the first of equal maxima),
    and with ``need_conf`` the softmax probability of each."""
    from types import SimpleNamespace

    from dflash_vllm.proposer import DFlashVllmProposer

    g = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (64, 4096), generator=g).to(dtype)
    logits[5] = 2  # a row of equal logits: token 0
    fake = SimpleNamespace(_enable_probabilistic_draft_probs=False, _use_draft_select=False,
                           model=SimpleNamespace(compute_logits=lambda h: h))
    tokens, prob, probs = DFlashVllmProposer._select(fake, logits, SimpleNamespace(all_greedy=True), need_conf)
    assert torch.equal(tokens, logits.argmax(dim=-1)) and int(tokens[5]) == 0 and probs is None
    if need_conf:
        want = torch.softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
        torch.testing.assert_close(prob, want)
    else:
        assert prob is None


def test_vllms_cpu_rms_norm_takes_the_first_row_of_a_per_layer_weight():
    """Why vLLM's built-in DFlash drafts differently on CPU (README "Known limitations"): it norms
    every draft layer's context K in one ``rms_norm`` call with the layers' k_norm weights stacked
    ``[L, head_dim]``, and vLLM 0.32's CPU op applies row 0 to all of them. The plugin norms each
    layer with its own weight (``context_kv``, tests/test_kernel_context_kv.py)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 2, 64, generator=g)  # [layers, tokens, kv heads, head_dim]
    w = 1 + 0.2 * torch.randn(2, 64, generator=g)
    out = torch.empty_like(x)
    drafter_mod.ops.rms_norm(out, x, w, 1e-6)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, normed * w[0])
    assert not torch.allclose(out[1], normed[1] * w[1], atol=1e-3)
