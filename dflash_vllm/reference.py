"""Pure-PyTorch DFlash speculative generation: an HF target + the ``models/core.py`` drafter.

Batch 1, greedy, no KV cache: each round recomputes the target over the verified sequence plus the
block, which is slow but leaves nothing to get wrong. It gives the acceptance figures that judge a
drafter without vLLM, and vLLM's figures are checked against it.

One round, with ``seq`` the verified tokens and ``nxt`` the target's next token:

    block  = [nxt, MASK x K] at positions len(seq) ..
    drafts = argmax lm_head(drafter(block | context = features of seq))[1..K]
    post   = argmax target(seq + block)[len(seq) .. len(seq) + K]
    acc    = number of leading i with drafts[i] == post[i]     # accepted drafts, 0..K
    seq   += block[: acc + 1];  nxt = post[acc];  acceptance length = acc + 1
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dflash_vllm.checkpoint import feature_index
from dflash_vllm.models.core import DFlashDrafter, DrafterConfig


@dataclass
class GenerationStats:
    tokens: list[int]
    acceptance_lengths: list[int] = field(default_factory=list)
    accepted_per_pos: list[int] = field(default_factory=list)  # drafts accepted at position 1..K
    drafted_per_pos: list[int] = field(default_factory=list)


def load_drafter(path: str | Path, dtype=torch.float32) -> DFlashDrafter:
    from safetensors.torch import load_file

    path = Path(path)
    cfg = DrafterConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    model = DFlashDrafter(cfg)
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()})
    return model.to(dtype).eval()


def target_features(target, input_ids: torch.Tensor, layer_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and concatenated features ``[N, T, n*H]`` of ``layer_ids`` (outputs of those layers)."""
    out = target(input_ids=input_ids, output_hidden_states=True, use_cache=False)
    feats = torch.cat([out.hidden_states[feature_index(i)] for i in layer_ids], dim=-1)
    return out.logits, feats


@torch.inference_mode()
def speculative_generate(target, drafter: DFlashDrafter, prompt_ids: list[int], max_new_tokens: int,
                         num_drafts: int | None = None, eos_token_id: int | None = None) -> GenerationStats:
    cfg = drafter.cfg
    k = num_drafts or cfg.block_size - 1
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    seq = list(prompt_ids)
    logits, feats = target_features(target, torch.tensor([seq]), cfg.target_layer_ids)
    nxt = int(logits[0, -1].argmax())
    stats = GenerationStats(tokens=[], accepted_per_pos=[0] * k, drafted_per_pos=[0] * k)
    while len(stats.tokens) < max_new_tokens:
        stats.tokens.append(nxt)
        if nxt == eos_token_id or len(stats.tokens) >= max_new_tokens:
            break
        start = len(seq)
        block = torch.tensor([[nxt] + [cfg.mask_token_id] * k])
        hidden = drafter(embed(block), torch.arange(start, start + k + 1)[None],
                         drafter.fuse_context(feats), torch.arange(start)[None])
        drafts = head(hidden[:, 1:]).argmax(-1)[0].tolist()
        logits, feats = target_features(target, torch.tensor([seq + [nxt] + drafts]), cfg.target_layer_ids)
        post = logits[0, start:].argmax(-1).tolist()  # target's choice after each block position
        acc = 0
        while acc < k and drafts[acc] == post[acc]:
            acc += 1
        room = max_new_tokens - len(stats.tokens)
        emitted = drafts[: min(acc, room)]
        if eos_token_id in emitted:
            emitted = emitted[: emitted.index(eos_token_id) + 1]
        for i in range(k):
            stats.drafted_per_pos[i] += 1
            stats.accepted_per_pos[i] += int(i < acc)
        stats.acceptance_lengths.append(acc + 1)
        seq += [nxt] + emitted
        stats.tokens += emitted
        if eos_token_id in emitted or len(stats.tokens) >= max_new_tokens:
            break
        nxt = post[acc]
        feats = feats[:, : len(seq)]
    return stats


@torch.inference_mode()
def greedy_generate(target, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None = None) -> list[int]:
    """Plain greedy decoding (the output speculative generation must reproduce)."""
    seq, out = list(prompt_ids), []
    for _ in range(max_new_tokens):
        nxt = int(target(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos_token_id:
            break
    return out


def summarize(all_stats: list[GenerationStats]) -> dict:
    lengths = [x for s in all_stats for x in s.acceptance_lengths]
    k = len(all_stats[0].accepted_per_pos) if all_stats else 0
    accepted = [sum(s.accepted_per_pos[i] for s in all_stats) for i in range(k)]
    drafted = [sum(s.drafted_per_pos[i] for s in all_stats) for i in range(k)]
    hist = [lengths.count(i) for i in range(1, k + 2)]
    return {
        "tau": sum(lengths) / len(lengths) if lengths else None,
        "num_rounds": len(lengths),
        "num_tokens": sum(len(s.tokens) for s in all_stats),
        "per_position_acceptance": [a / d if d else 0.0 for a, d in zip(accepted, drafted, strict=True)],
        "acceptance_length_histogram": hist,
    }


def evaluate(target_dir: str | Path, drafter_dir: str | Path, prompts: list[str], max_new_tokens: int = 128,
             num_drafts: int | None = None) -> dict:
    """Mean acceptance length (tau) and per-position acceptance at temperature 0 on ``prompts``."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target_dir))
    target = AutoModelForCausalLM.from_pretrained(str(target_dir), dtype=torch.float32).eval()
    drafter = load_drafter(drafter_dir)
    stats = [
        speculative_generate(target, drafter, tok(p)["input_ids"], max_new_tokens, num_drafts, tok.eos_token_id)
        for p in tqdm(prompts, desc="eval-drafter", unit="prompt")
    ]
    return summarize(stats)
