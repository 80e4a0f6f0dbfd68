"""Training: loss goes down, bad input fails cleanly, export loads everywhere."""

from __future__ import annotations

import json

import pytest
import torch

from dflash_vllm.checkpoint import DFlashConfigError
from dflash_vllm.training.config import TrainConfig


def _sequences(target, n=8, length=40, seed=0):
    """Greedy continuations of random prompts: the target's own distribution."""
    from dflash_vllm.reference import greedy_generate

    g = torch.Generator().manual_seed(seed)
    return [p + greedy_generate(target, p, length) for p in
            (torch.randint(1, 400, (6,), generator=g).tolist() for _ in range(n))]


def test_few_steps_lower_the_loss_and_export_loads(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from dflash_vllm.reference import load_drafter, speculative_generate
    from dflash_vllm.training.export import export_drafter
    from dflash_vllm.training.masks import position_weights, sample_anchors
    from dflash_vllm.training.trainer import _pad, drafter_loss, train_drafter

    target = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target), dtype=torch.float32).eval()
    seqs = _sequences(target)
    cfg = TrainConfig(target=str(tiny_pair.target), out_dir=str(tmp_path / "run"), block_size=8,
                      num_draft_layers=2, epochs=8, batch_size=4, num_anchors=8, lr=3e-3, checkpoint_every=4)
    drafter, stats = train_drafter(cfg, seqs, target, tiny_pair.mask_token_id, log=lambda *_: None)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5, [x["loss"] for x in log]
    assert stats["steps"] == 16 and (tmp_path / "run" / "checkpoint.pt").is_file()

    # the trained drafter scores better than an untrained one on the same batch
    tokens, lengths = _pad(seqs, 0)
    anchors = sample_anchors(lengths, 8, torch.Generator().manual_seed(1))
    w = position_weights(8)
    fresh, _ = train_drafter(TrainConfig(**{**cfg.to_dict(), "epochs": 0, "out_dir": str(tmp_path / "r0")}),
                             seqs, target, tiny_pair.mask_token_id, log=lambda *_: None)
    with torch.no_grad():
        assert drafter_loss(target, drafter, tokens, lengths, anchors, w) < drafter_loss(target, fresh, tokens, lengths, anchors, w)

    out = export_drafter(tmp_path / "exported", drafter.cfg, drafter.state_dict(), "float32")
    loaded = load_drafter(out)
    prompt = seqs[0][:6]
    a = speculative_generate(target, drafter, prompt, 20)
    b = speculative_generate(target, loaded, prompt, 20)
    assert a.tokens == b.tokens and a.acceptance_lengths == b.acceptance_lengths
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DFlashDraftModel"]


def test_resume_continues_from_checkpoint(tiny_pair, tmp_path):
    from transformers import AutoModelForCausalLM

    from dflash_vllm.training.trainer import train_drafter

    target = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target), dtype=torch.float32).eval()
    seqs = _sequences(target, n=4, length=20)
    base = dict(target=str(tiny_pair.target), block_size=8, num_draft_layers=1, batch_size=2,
                num_anchors=4, checkpoint_every=2)
    full, _ = train_drafter(TrainConfig(out_dir=str(tmp_path / "a"), epochs=2, **base), seqs, target,
                            tiny_pair.mask_token_id, log=lambda *_: None)
    train_drafter(TrainConfig(out_dir=str(tmp_path / "b"), epochs=2, **base), seqs, target,
                  tiny_pair.mask_token_id, log=lambda *_: None, stop_after=3)
    # the same run, stopped after 3 of 4 steps and resumed, ends where the uninterrupted one does
    resumed, stats = train_drafter(TrainConfig(out_dir=str(tmp_path / "b"), epochs=2, **base), seqs, target,
                                   tiny_pair.mask_token_id, resume=True, log=lambda *_: None)
    assert stats["steps"] == 4
    for (name, p), q in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def _prompts(tmp_path, lines, name="prompts.jsonl"):
    f = tmp_path / name
    f.write_text("".join(lines))
    return f


def test_bad_training_input_is_a_clear_error_and_writes_nothing(tiny_pair, tmp_path):
    from dflash_vllm.training.pipeline import run_training

    good = _prompts(tmp_path, [json.dumps({"prompt": "def f():"}) + "\n"])
    out = tmp_path / "out"
    no_config = tmp_path / "empty_target"
    no_config.mkdir()
    cases = [
        (dict(target=str(no_config), prompts=str(good)), "has no config.json"),
        (dict(target=str(tiny_pair.target), prompts=str(good), hidden_size=64), "hidden_size=64 differs"),
        (dict(target=str(tiny_pair.target), prompts=str(_prompts(tmp_path, ["\n"], "empty.jsonl"))), "holds no prompts"),
        (dict(target=str(tiny_pair.target), prompts=str(good), block_size=1), "block_size=1"),
        (dict(target=str(tiny_pair.target), prompts=str(tmp_path / "nope.jsonl")), "does not exist"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(DFlashConfigError) as err:
            run_training(TrainConfig.load(None, out_dir=str(out), **kwargs))
        assert needle in str(err.value)
        assert not out.exists(), f"{needle}: left {list(out.rglob('*'))}"


def test_unknown_training_config_key(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epoch": 3}))
    with pytest.raises(DFlashConfigError, match="unknown keys \\['epoch'\\]"):
        TrainConfig.load(f)


def test_mask_token_choice(tiny_pair):
    from dflash_vllm.training.trainer import choose_mask_token_id

    assert choose_mask_token_id(TrainConfig(), 512, 500) == 500
    with pytest.raises(DFlashConfigError, match="reserved special token"):
        choose_mask_token_id(TrainConfig(), 500, 500)
