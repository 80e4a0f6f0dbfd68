"""``dflash-vllm``: command line. Imports are lazy so that ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from dflash_vllm.demo import run_demo

    return run_demo(args.target, args.drafter, args.max_tokens, args.num_speculative_tokens)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dflash-vllm", description="DFlash speculative decoding for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate through the plugin next to plain decoding on a small pair")
    demo.add_argument("--target", help="target model directory (default: the shipped demo pair)")
    demo.add_argument("--drafter", help="DFlash drafter directory (z-lab layout)")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--num-speculative-tokens", type=int, default=None, help="default: block_size - 1")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
