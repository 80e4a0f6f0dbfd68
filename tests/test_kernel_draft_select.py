"""draft_select / draft_probs: Triton kernels (under TRITON_INTERPRET=1 on CPU) against their PyTorch
references, over odd shapes, both dtypes, temperatures, top-k and ties."""

import pytest
import torch

# TRITON_INTERPRET=1 is set by conftest.py, before anything imports triton
from dflash_vllm.kernels.draft_select import (
    draft_probs_ref,
    draft_probs_triton,
    draft_select_ref,
    draft_select_triton,
)

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _check(hidden, head, temperature=1.0, top_k=0):
    got = draft_select_triton(hidden, head, temperature, top_k)
    want = draft_select_ref(hidden, head, temperature, top_k)
    logits = (hidden.float() @ head.float().T) / temperature
    # fp32 sums in another order may swap two logits equal within rounding: allowed only there
    slack = TOL[hidden.dtype]["atol"] * 4
    for i in (got.token != want.token).nonzero().flatten().tolist():
        gap = (logits[i, got.token[i]] - logits[i, want.token[i]]).abs().item()
        assert gap <= slack, f"row {i}: kernel {got.token[i]} vs ref {want.token[i]}, logit gap {gap}"
    torch.testing.assert_close(got.lse, want.lse, **TOL[hidden.dtype], msg=lambda m: f"lse differs: {m}")
    torch.testing.assert_close(got.prob, want.prob, **TOL[hidden.dtype], msg=lambda m: f"prob differs: {m}")
    if not top_k:
        assert got.top_ids is None and got.top_probs is None
        return
    assert got.top_ids.shape == (hidden.shape[0], top_k)
    for i, j in (got.top_ids != want.top_ids).nonzero().tolist():
        gap = (logits[i, got.top_ids[i, j]] - logits[i, want.top_ids[i, j]]).abs().item()
        assert gap <= slack, f"row {i} rank {j}: kernel {got.top_ids[i, j]} vs ref {want.top_ids[i, j]}, gap {gap}"
    torch.testing.assert_close(got.top_probs, want.top_probs, **TOL[hidden.dtype],
                               msg=lambda m: f"top-k probs differ: {m}")
    assert (got.top_ids[:, 0] == got.token).all(), "the best of the top-k is the argmax"


SHAPES = [(1, 37, 16), (15, 1000, 48), (33, 517, 96), (7, 2049, 40)]  # (N, V, H): odd V and H, one row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v, h", SHAPES)
def test_matches_reference(n, v, h, dtype):
    g = torch.Generator().manual_seed(n * 1000 + v)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    head = torch.randn(v, h, generator=g).to(dtype)
    _check(hidden, head)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v, h, top_k, temperature", [(1, 37, 16, 1, 1.0), (15, 1000, 48, 5, 0.6),
                                                         (33, 517, 96, 8, 1.7), (3, 130, 24, 3, 0.3)])
def test_top_k_and_temperature(n, v, h, top_k, temperature, dtype):
    g = torch.Generator().manual_seed(n + v + top_k)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    head = torch.randn(v, h, generator=g).to(dtype)
    _check(hidden, head, temperature, top_k)


def _tied():
    # integer-valued rows: every dot product is exact, so ids 5, 133 and 300 (three vocab tiles of
    # 128) tie exactly, whatever the summation order; 7 and 131 tie one step below
    g = torch.Generator().manual_seed(0)
    head = torch.randint(-2, 2, (400, 32), generator=g).float()
    for i in (300, 133, 5):
        head[i] = 3.0
    for i in (131, 7):
        head[i] = torch.cat([torch.full((31,), 3.0), torch.zeros(1)])
    return torch.ones(3, 32), head


def test_ties_take_the_lowest_id_across_tiles():
    hidden, head = _tied()
    sel = draft_select_triton(hidden, head)
    assert sel.token.tolist() == [5, 5, 5] == draft_select_ref(hidden, head).token.tolist()
    assert sel.prob[0] < 0.34  # three equal maxima share the mass


def test_top_k_ties_in_id_order():
    hidden, head = _tied()
    sel = draft_select_triton(hidden, head, top_k=5)
    assert sel.top_ids.tolist() == [[5, 133, 300, 7, 131]] * 3 == draft_select_ref(hidden, head, top_k=5).top_ids.tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n, v, h, temperature", [(1, 37, 16, 1.0), (17, 517, 96, 0.7), (4, 2049, 40, 1.3)])
def test_draft_probs(n, v, h, temperature, dtype):
    g = torch.Generator().manual_seed(v)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    head = torch.randn(v, h, generator=g).to(dtype)
    got = draft_probs_triton(hidden, head, temperature)
    torch.testing.assert_close(got, draft_probs_ref(hidden, head, temperature), **TOL[dtype])
    torch.testing.assert_close(got.sum(-1), torch.ones(n), rtol=1e-4, atol=1e-4)


def test_bad_arguments_name_themselves():
    hidden, head = torch.ones(2, 8), torch.ones(10, 8)
    with pytest.raises(ValueError, match="temperature"):
        draft_select_triton(hidden, head, temperature=0.0)
    with pytest.raises(ValueError, match="top_k"):
        draft_select_triton(hidden, head, top_k=11)
    with pytest.raises(ValueError, match="lm_head"):
        draft_select_triton(hidden, torch.ones(10, 9))
