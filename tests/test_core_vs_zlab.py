"""models/core.py computes what z-lab's reference DFlashDraftModel computes, on the same checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dflash_vllm.models.core import DFlashDrafter, DrafterConfig


@pytest.fixture(scope="module")
def drafters(tiny_pair):
    from dflash.model import DFlashDraftModel

    zlab = DFlashDraftModel.from_pretrained(str(tiny_pair.drafter), dtype=torch.float32).eval()
    cfg = DrafterConfig.from_hf_dict(json.loads((tiny_pair.drafter / "config.json").read_text()))
    ours = DFlashDrafter(cfg).eval()
    ours.load_state_dict(load_file(str(tiny_pair.drafter / "model.safetensors")))
    return zlab, ours, cfg


@pytest.mark.parametrize("ctx_len, block", [(1, 8), (13, 8), (40, 4)])
def test_block_forward_matches_zlab(drafters, ctx_len, block):
    zlab, ours, cfg = drafters
    torch.manual_seed(ctx_len)
    n_feat = len(cfg.target_layer_ids) * cfg.hidden_size
    features = torch.randn(1, ctx_len, n_feat)
    noise = torch.randn(1, block, cfg.hidden_size)
    start = ctx_len + 3  # block positions need not follow the context directly
    ctx_pos = torch.arange(ctx_len)[None]
    blk_pos = torch.arange(start, start + block)[None]
    with torch.no_grad():
        want = zlab(position_ids=torch.cat([ctx_pos, blk_pos], 1), noise_embedding=noise, target_hidden=features)
        got = ours(noise, blk_pos, ours.fuse_context(features), ctx_pos)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
