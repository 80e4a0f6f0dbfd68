"""``dflash-vllm``: command line. Imports are lazy so that ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from dflash_vllm.demo import run_demo

    return run_demo(args.target, args.drafter, args.max_tokens, args.num_speculative_tokens)


def _train(args) -> int:
    from dflash_vllm.training.config import TrainConfig
    from dflash_vllm.training.pipeline import run_training

    overrides = {k: getattr(args, k) for k in ("target", "prompts", "out_dir", "block_size", "num_draft_layers",
                                               "epochs", "batch_size", "lr", "mask_token_id", "max_prompts",
                                               "eval_prompts", "response_max_tokens", "num_anchors")}
    run_training(TrainConfig.load(args.config, **overrides), resume=args.resume)
    return 0


def _eval_drafter(args) -> int:
    import json

    from dflash_vllm.reference import evaluate
    from dflash_vllm.training.data import read_prompts

    prompts = read_prompts(args.prompts, limit=args.limit)
    print(json.dumps(evaluate(args.target, args.drafter, prompts, args.max_new_tokens), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-vllm", description="DFlash speculative decoding for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate through the plugin next to plain decoding on a small pair")
    demo.add_argument("--target", help="target model directory (default: the shipped demo pair)")
    demo.add_argument("--drafter", help="DFlash drafter directory (z-lab layout)")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--num-speculative-tokens", type=int, default=None, help="default: block_size - 1")
    demo.set_defaults(func=_demo)

    train = sub.add_parser("train", help="train a DFlash drafter for a Hugging Face target")
    train.add_argument("--config", help="JSON/YAML file of TrainConfig fields (configs/train_*.json)")
    train.add_argument("--target")
    train.add_argument("--prompts", help="jsonl, one {\"prompt\": ...} or {\"messages\": [...]} per line")
    train.add_argument("--out-dir")
    train.add_argument("--block-size", type=int)
    train.add_argument("--num-draft-layers", type=int)
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--mask-token-id", type=int)
    train.add_argument("--max-prompts", type=int)
    train.add_argument("--eval-prompts", type=int, help="hold out the last N prompts for evaluation")
    train.add_argument("--response-max-tokens", type=int)
    train.add_argument("--num-anchors", type=int)
    train.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoint.pt")
    train.set_defaults(func=_train)

    ev = sub.add_parser("eval-drafter", help="tau and per-position acceptance with the pure-PyTorch reference")
    ev.add_argument("--target", required=True)
    ev.add_argument("--drafter", required=True)
    ev.add_argument("--prompts", required=True)
    ev.add_argument("--limit", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.set_defaults(func=_eval_drafter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
