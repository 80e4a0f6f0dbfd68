import pytest
import torch

from dflash_vllm.reference import greedy_generate, load_drafter, speculative_generate, summarize


@pytest.fixture(scope="module")
def models(tiny_pair):
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(str(tiny_pair.target), dtype=torch.float32).eval()
    return target, load_drafter(tiny_pair.drafter)


@pytest.mark.parametrize("prompt, max_new", [([5, 17, 99], 21), ([1] * 40, 9), ([42], 1)])
def test_speculative_equals_greedy(models, prompt, max_new):
    target, drafter = models
    stats = speculative_generate(target, drafter, prompt, max_new)
    assert stats.tokens == greedy_generate(target, prompt, max_new)
    assert sum(stats.acceptance_lengths) >= len(stats.tokens) - 1
    summary = summarize([stats])
    assert summary["num_tokens"] == max_new


def test_matches_zlab_dflash_generate(models, tiny_pair):
    """z-lab's own loop (dflash.model.dflash_generate) on the same checkpoint: same tokens, same acceptance."""
    import dflash.model as zm
    from dflash.model import DFlashDraftModel, dflash_generate

    target, drafter = models
    zlab = DFlashDraftModel.from_pretrained(str(tiny_pair.drafter), dtype=torch.float32).eval()
    zm._cuda_time = lambda: __import__("time").perf_counter()  # its stats path syncs CUDA
    prompt = [5, 17, 99, 3, 250]
    out = dflash_generate(zlab, target, torch.tensor([prompt]), 30, None, return_stats=True)
    ours = speculative_generate(target, drafter, prompt, 30)
    assert out.output_ids[0, len(prompt):].tolist() == ours.tokens
    assert out.acceptance_lengths == ours.acceptance_lengths


def test_shorter_blocks_match_zlab_dflash_generate_with_that_block_size(models, tiny_pair, monkeypatch):
    """A block of 1 + N tokens (N drafts, fewer than the drafter was built for): z-lab's loop with
    ``block_size=N+1`` on the same checkpoint gives the same tokens and acceptance lengths."""
    import dflash.model as zm
    from dflash.model import DFlashDraftModel, dflash_generate

    target, drafter = models
    zlab = DFlashDraftModel.from_pretrained(str(tiny_pair.drafter), dtype=torch.float32).eval()
    monkeypatch.setattr(zm, "_cuda_time", __import__("time").perf_counter)  # its stats path syncs CUDA
    prompt = [5, 17, 99, 3, 250]
    for n in (1, 3):
        out = dflash_generate(zlab, target, torch.tensor([prompt]), 30, None, block_size=n + 1, return_stats=True)
        ours = speculative_generate(target, drafter, prompt, 30, num_drafts=n)
        assert out.output_ids[0, len(prompt):].tolist() == ours.tokens == greedy_generate(target, prompt, 30)
        assert out.acceptance_lengths == ours.acceptance_lengths
        assert len(ours.accepted_per_pos) == n


def test_eval_drafter_cli_takes_a_shorter_block_and_rejects_a_longer_one(tiny_pair, tmp_path, capsys):
    import json

    from dflash_vllm.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("hello there", "one two three")))
    args = ["eval-drafter", "--target", str(tiny_pair.target), "--drafter", str(tiny_pair.drafter),
            "--prompts", str(prompts), "--max-new-tokens", "12"]
    assert main(args + ["--num-drafts", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["per_position_acceptance"]) == 2 and len(out["acceptance_length_histogram"]) == 3
    with pytest.raises(SystemExit, match="--num-drafts 8: choose 1 to 7"):
        main(args + ["--num-drafts", "8"])
