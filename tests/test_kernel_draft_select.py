"""draft_select: Triton kernel (under TRITON_INTERPRET=1 on CPU) against its PyTorch reference."""

import pytest
import torch

# TRITON_INTERPRET=1 is set by conftest.py, before anything imports triton
from dflash_vllm.kernels.draft_select import draft_select_ref, draft_select_triton

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _check(hidden, head):
    tok, prob, lse = draft_select_triton(hidden, head)
    rtok, rprob, rlse = draft_select_ref(hidden, head)
    bad = (tok != rtok).nonzero().flatten().tolist()
    # a bf16 tie-break can legitimately differ only where the two logits are equal within rounding
    logits = hidden.float() @ head.float().T
    for i in bad:
        gap = (logits[i, tok[i]] - logits[i, rtok[i]]).abs().item()
        assert gap <= TOL[hidden.dtype]["atol"] * 4, f"row {i}: kernel {tok[i]} vs ref {rtok[i]}, logit gap {gap}"
    torch.testing.assert_close(lse, rlse, **TOL[hidden.dtype], msg=lambda m: f"lse differs: {m}")
    torch.testing.assert_close(prob, rprob, **TOL[hidden.dtype], msg=lambda m: f"prob differs: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v, h", [(1, 37, 16), (15, 1000, 48), (33, 517, 96), (7, 2049, 40)])
def test_matches_reference(n, v, h, dtype):
    g = torch.Generator().manual_seed(n * 1000 + v)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    head = torch.randn(v, h, generator=g).to(dtype)
    _check(hidden, head)


def test_ties_take_the_lowest_id_across_tiles():
    # integer-valued rows: every dot product is exact, so ids 5, 133 and 300 (three vocab tiles of
    # 128) tie exactly, whatever the summation order
    g = torch.Generator().manual_seed(0)
    head = torch.randint(-2, 3, (400, 32), generator=g).float()
    winner = torch.full((32,), 3.0)
    for i in (300, 133, 5):
        head[i] = winner
    hidden = torch.ones(3, 32)
    tok, prob, _ = draft_select_triton(hidden, head)
    assert tok.tolist() == [5, 5, 5] == draft_select_ref(hidden, head)[0].tolist()
    assert prob[0] < 0.34  # three equal maxima share the mass
