import pytest
import torch

from dflash_vllm.checkpoint import (
    DFlashConfigError,
    build_target_layer_ids,
    feature_index,
    parse_draft_spec,
    validate_pair,
)
from dflash_vllm.proposer import feature_columns


def test_build_target_layer_ids_matches_zlab():
    from dflash.model import build_target_layer_ids as zlab

    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B, published drafter
    for layers in (4, 6, 28, 36, 64):
        for n in (1, 2, 3, 5):
            assert build_target_layer_ids(layers, n) == zlab(layers, n)


def test_feature_index_is_hf_hidden_states_offset():
    from dflash.model import extract_context_feature

    hidden_states = [torch.full((1, 1, 2), float(i)) for i in range(7)]  # embeddings + 6 layers
    ids = [1, 4]
    ours = torch.cat([hidden_states[feature_index(i)] for i in ids], dim=-1)
    assert torch.equal(ours, extract_context_feature(hidden_states, ids))
    assert ours.flatten().tolist() == [2.0, 2.0, 5.0, 5.0]  # outputs of layers 1 and 4


def _config(**overrides):
    cfg = {"hidden_size": 64, "vocab_size": 128, "num_hidden_layers": 2, "block_size": 8,
           "dflash_config": {"mask_token_id": 100, "target_layer_ids": [1, 3]}}
    cfg.update(overrides)
    return cfg


def test_parse_reads_dflash_config_first():
    spec = parse_draft_spec(_config(mask_token_id=5))
    assert spec.mask_token_id == 100 and spec.target_layer_ids == (1, 3) and spec.max_drafts == 7


@pytest.mark.parametrize(
    "config, kwargs, needle",
    [
        (_config(dflash_config={"target_layer_ids": [1]}), {}, "mask_token_id is missing"),
        (_config(block_size=1), {}, "block_size=1"),
        (_config(), {"target_hidden_size": 32}, "hidden_size=64 differs"),
        (_config(), {"target_vocab_size": 256}, "vocab_size=128 differs"),
        (_config(), {"target_num_layers": 3}, "target_layer_ids=[1, 3] names layers [3]"),
        (_config(), {"num_speculative_tokens": 8}, "num_speculative_tokens=8 is larger than block_size - 1 = 7"),
        (_config(dflash_config={"mask_token_id": 500, "target_layer_ids": [1]}, vocab_size=None), {},
         "mask_token_id=500 is outside"),
    ],
)
def test_bad_pairs_name_the_field(config, kwargs, needle):
    target = {"target_hidden_size": 64, "target_vocab_size": 128, "target_num_layers": 6, **kwargs}
    with pytest.raises(DFlashConfigError) as err:
        validate_pair(parse_draft_spec(config), **target)
    assert needle in str(err.value)


def test_feature_columns_reorders_to_target_layer_ids():
    assert feature_columns((1, 3), 4) is None  # vLLM's sorted order already
    # vLLM records layers sorted and deduplicated: (2, 4) -> [f2 | f4]; drafter wants [f4, f2, f4].
    cols = feature_columns((3, 1, 3), 2)
    recorded = torch.tensor([[20.0, 21.0, 40.0, 41.0]])
    assert recorded.index_select(-1, cols).tolist() == [[40.0, 41.0, 20.0, 21.0, 40.0, 41.0]]
