import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dflash_vllm.training.masks import block_attention_mask, block_inputs, position_weights, sample_anchors


def explicit_mask(anchors: list[int], context_len: int, block: int) -> torch.Tensor:
    """Per query, per key, from the definition."""
    a = len(anchors)
    mask = torch.zeros(a * block, context_len + a * block, dtype=torch.bool)
    for qa, p in enumerate(anchors):
        for qi in range(block):
            q = qa * block + qi
            for j in range(context_len):
                mask[q, j] = j < p  # context strictly before the anchor
            for kb in range(a):
                for ki in range(block):
                    mask[q, context_len + kb * block + ki] = kb == qa  # own block only, both directions
    return mask


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_mask_matches_explicit_construction(data):
    length = data.draw(st.integers(3, 40))
    block = data.draw(st.sampled_from([2, 4, 8]))
    n_anchors = data.draw(st.integers(1, 6))
    # include anchors at both ends of the valid range
    anchors = data.draw(st.lists(st.sampled_from([1, length - 2, *range(1, length - 1)]),
                                 min_size=n_anchors, max_size=n_anchors))
    got = block_attention_mask(torch.tensor([anchors]), length, block)[0]
    assert torch.equal(got, explicit_mask(anchors, length, block))


def test_anchor_range_and_labels():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([5, 30])
    anchors = sample_anchors(lengths, 64, gen)
    assert anchors.min() >= 1 and (anchors <= (lengths - 2)[:, None]).all()
    assert set(anchors[0].tolist()) == {1, 2, 3}  # short sequence: every valid anchor drawn
    tokens = torch.arange(100, 130).repeat(2, 1)
    ids, pos, labels = block_inputs(tokens, torch.tensor([[3], [27]]), 4, mask_token_id=7, lengths=lengths)
    assert ids.tolist() == [[103, 7, 7, 7], [127, 7, 7, 7]]
    assert pos.tolist() == [[3, 4, 5, 6], [27, 28, 29, 30]]
    # labels: next tokens inside the sequence, -100 for the anchor and past the end (length 5 / 30)
    assert labels.tolist() == [[-100, 104, -100, -100], [-100, 128, 129, -100]]


def test_position_weights():
    w = position_weights(16)
    assert w[0] == 0 and w[1] == 1 and abs(w[8].item() - torch.exp(torch.tensor(-1.0)).item()) < 1e-6
