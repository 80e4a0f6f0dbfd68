#!/usr/bin/env python
"""Acceptance map: for every position of each prompt's greedy continuation, how many drafts a block
drafted there would have accepted, with the drafter's confidence in each (a diagnostic).

Speculation decodes a text in steps whose starts depend on what was accepted before, so one run
shows the drafter at a few positions only. This map shows it at all of them: position ``j`` holds
the drafts of the block ``[token j, MASK x K]`` drafted on the context of tokens before ``j``,
counted as vLLM's greedy verification counts them (leading drafts equal to the continuation). Any
sequence of plain and drafting steps can then be priced on it without running an engine
(``scripts/simulate_modes.py``).

    .venv/bin/python scripts/acceptance_map.py --out runs/acc_eval.json          # the eval prompts
    .venv/bin/python scripts/acceptance_map.py --held-out 64 --out runs/acc_tune.json
        # 64 other windows of the demo pair's held-out files (for tuning, apart from the eval set)

Pure PyTorch (``dflash_vllm.reference``), CPU, the demo pair by default.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dflash_vllm.reference import load_drafter, target_features  # noqa: E402
from dflash_vllm.training.data import atomic_write_text, read_prompts  # noqa: E402

PAIR = ROOT / "dflash_vllm" / "demo_pair"


def held_out_prompts(n: int, seed: int) -> list[str]:
    """``n`` 48-token windows of the demo pair's held-out stdlib files (``build_demo_pair.py``),
    drawn with another seed than its eval prompts."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import build_demo_pair as bdp

    bdp.WORK = PAIR  # its tokenizer
    _, held = bdp.stdlib_files()
    return bdp.window_prompts(held, n, 48, seed)


@torch.inference_mode()
def greedy(target, ids: list[int], n: int) -> list[int]:
    out = target.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
    return out[0, len(ids):].tolist()


@torch.inference_mode()
def prompt_map(target, drafter, ids: list[int], cont: list[int]) -> dict:
    """Accepted drafts and confidences of a block at each position of ``cont`` (after ``ids``)."""
    cfg = drafter.cfg
    k = cfg.block_size - 1
    embed, head = target.get_input_embeddings(), target.get_output_embeddings()
    seq = ids + cont
    logits, feats = target_features(target, torch.tensor([seq]), cfg.target_layer_ids)
    context = drafter.fuse_context(feats)
    # the target's probability of its own greedy choice for each continuation token (the
    # distribution that chose token j: known at the step after it, plain or drafting)
    target_conf = torch.softmax(logits[0, len(ids) - 1 : len(seq) - 1].float(), dim=-1).max(-1).values
    accepted, conf = [], []
    for j in range(len(cont)):
        s = len(ids) + j
        block = torch.tensor([[seq[s]] + [cfg.mask_token_id] * k])
        hidden = drafter(embed(block), torch.arange(s, s + k + 1)[None], context[:, :s], torch.arange(s)[None])
        probs = torch.softmax(head(hidden[0, 1:]).float(), dim=-1)
        p, drafts = probs.max(-1)
        truth = seq[s + 1 : s + 1 + k]
        a = 0
        while a < len(truth) and drafts[a].item() == truth[a]:
            a += 1
        accepted.append(a)
        conf.append([round(x, 4) for x in p.tolist()])
    return {"accepted": accepted, "conf": conf, "target_conf": [round(x, 4) for x in target_conf.tolist()]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=str(PAIR / "target"))
    ap.add_argument("--drafter", default=str(PAIR / "drafter"))
    ap.add_argument("--prompts", default=str(PAIR / "eval_prompts.jsonl"))
    ap.add_argument("--held-out", type=int, default=0, metavar="N",
                    help="instead of --prompts: N windows of the demo pair's held-out files")
    ap.add_argument("--seed", type=int, default=7, help="for --held-out")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = held_out_prompts(args.held_out, args.seed) if args.held_out else read_prompts(args.prompts)
    tok = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    drafter = load_drafter(args.drafter)
    rows = []
    for p in tqdm(prompts, desc="acceptance map", unit="prompt"):
        ids = tok(p)["input_ids"]
        cont = greedy(target, ids, args.max_tokens)
        rows.append({"prompt": p, **prompt_map(target, drafter, ids, cont)})
    atomic_write_text(Path(args.out), json.dumps({"target": args.target, "drafter": args.drafter,
                                            "block_size": drafter.cfg.block_size, "prompts": rows}) + "\n")
    acc = [a for r in rows for a in r["accepted"]]
    print(f"{len(rows)} prompts, {len(acc)} positions: mean accepted drafts per block {sum(acc) / len(acc):.2f}")


if __name__ == "__main__":
    main()
