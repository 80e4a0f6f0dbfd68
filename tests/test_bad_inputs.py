"""Bad deployments fail when the engine is configured, with a message naming field, value and fix.

``EngineArgs.create_engine_config`` loads vLLM's plugins (ours among them) and builds the
``VllmConfig`` whose validation runs ours; no engine process starts.
"""

from __future__ import annotations

import json
import shutil

import pytest

from .conftest import engine_kwargs


def _edit_drafter(tiny_pair, tmp_path, **changes):
    out = tmp_path / "drafter"
    shutil.copytree(tiny_pair.drafter, out)
    cfg = json.loads((out / "config.json").read_text())
    for key, value in changes.items():
        if key.startswith("dflash_config."):
            field = key.split(".", 1)[1]
            if value is None:
                cfg["dflash_config"].pop(field)
            else:
                cfg["dflash_config"][field] = value
        else:
            cfg[key] = value
    (out / "config.json").write_text(json.dumps(cfg))
    return out


def _configure(target, drafter, **kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(**engine_kwargs(target, drafter, **kwargs)).create_engine_config()


def test_good_pair_configures(tiny_pair):
    config = _configure(tiny_pair.target, tiny_pair.drafter)
    assert config.speculative_config.method == "dflash"


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"hidden_size": 64, "head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1},
         "drafter hidden_size=64 differs from the target's hidden_size=128"),
        ({"vocab_size": 1024}, "drafter vocab_size=1024 differs from the target's vocab_size=512"),
        ({"dflash_config.target_layer_ids": [1, 7]}, "names layers [7] outside the target's decoder layers 0..5"),
        ({"dflash_config.mask_token_id": None}, "dflash_config.mask_token_id is missing"),
    ],
)
def test_bad_drafter(tiny_pair, tmp_path, changes, needle):
    drafter = _edit_drafter(tiny_pair, tmp_path, **changes)
    with pytest.raises(Exception) as err:
        _configure(tiny_pair.target, drafter)
    assert needle in str(err.value)


def test_too_many_speculative_tokens(tiny_pair):
    with pytest.raises(Exception) as err:
        _configure(tiny_pair.target, tiny_pair.drafter, num_speculative_tokens=8)
    assert "num_speculative_tokens=8 is larger than block_size - 1 = 7" in str(err.value)
    assert "set num_speculative_tokens to at most 7" in str(err.value)


def test_unknown_plugin_option(tiny_pair):
    with pytest.raises(Exception) as err:
        _configure(tiny_pair.target, tiny_pair.drafter, additional_config={"dflash": {"adaptiv": True}})
    assert "additional_config.dflash: unknown key 'adaptiv'" in str(err.value)


def test_target_without_aux_hidden_states(tiny_pair, tmp_path):
    """GPT-2's vLLM model does not implement SupportsEagle3: no aux hidden states to read."""
    from transformers import GPT2Config

    target = tmp_path / "gpt2"
    target.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_pair.target / name, target / name)
    GPT2Config(vocab_size=512, n_embd=128, n_layer=6, n_head=4, n_positions=512, bos_token_id=0, eos_token_id=0,
               architectures=["GPT2LMHeadModel"]).save_pretrained(target)
    with pytest.raises(Exception) as err:
        _configure(target, tiny_pair.drafter)
    assert "cannot expose auxiliary hidden states" in str(err.value)
    assert "GPT2LMHeadModel" in str(err.value)
