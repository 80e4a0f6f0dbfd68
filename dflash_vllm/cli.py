"""``dflash-vllm``: command line. Imports are lazy so that ``--help`` answers at once."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from dflash_vllm.demo import run_demo

    return run_demo(args.target, args.drafter, args.max_tokens, args.num_speculative_tokens, args.concurrency)


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

    from dflash_vllm.checkpoint import parse_draft_spec, read_config
    from dflash_vllm.reference import evaluate
    from dflash_vllm.training.data import read_prompts

    spec = parse_draft_spec(read_config(args.drafter))
    if args.num_drafts is not None and not 1 <= args.num_drafts <= spec.max_drafts:
        raise SystemExit(f"--num-drafts {args.num_drafts}: choose 1 to {spec.max_drafts} (the drafter's "
                         f"block_size {spec.block_size} minus the anchor token)")
    prompts = read_prompts(args.prompts, limit=args.limit)
    print(json.dumps(evaluate(args.target, args.drafter, prompts, args.max_new_tokens, num_drafts=args.num_drafts),
                     indent=2))
    return 0


def _bench(args) -> int:
    from pathlib import Path

    from dflash_vllm.bench.report import print_table, write_json, write_plot
    from dflash_vllm.bench.runner import ALL_MODES, BenchConfig, resolve_engines, run_bench
    from dflash_vllm.demo import shipped_pair
    from dflash_vllm.training.data import read_prompts

    pair = shipped_pair()
    target = args.target or (str(pair[0]) if pair else None)
    drafter = args.drafter or (str(pair[1]) if pair else None)
    if not target or not drafter:
        print("dflash-vllm bench: no --target/--drafter given and no demo pair shipped in this install", file=sys.stderr)
        return 2
    prompts_file = args.prompts or (str(Path(pair[0]).parent / "eval_prompts.jsonl") if pair else None)
    if not prompts_file:
        print("dflash-vllm bench: pass --prompts FILE.jsonl", file=sys.stderr)
        return 2
    from transformers import AutoTokenizer

    prompts = read_prompts(prompts_file, AutoTokenizer.from_pretrained(target))
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ALL_MODES]
    if bad:
        print(f"dflash-vllm bench: unknown modes {bad}; choose from {list(ALL_MODES)}", file=sys.stderr)
        return 2
    cfg = BenchConfig(target=target, drafter=drafter, prompts=prompts, modes=modes,
                      concurrency=[int(c) for c in args.concurrency.split(",")], reps=args.reps, waves=args.waves,
                      temperature=args.temperature, max_tokens=args.max_tokens,
                      num_speculative_tokens=args.num_speculative_tokens, compile=not args.no_compile,
                      kv_cache_bytes=args.kv_cache_mib << 20, engines=args.engines, slice_s=args.slice_s)
    from rich.progress import Progress

    starts = len(modes) * (1 if resolve_engines(cfg.engines) in ("shared", "sliced") else cfg.reps)
    with Progress() as progress:  # one unit per engine start and per run
        task = progress.add_task("bench", total=starts + len(modes) * len(cfg.concurrency) * cfg.reps)
        done = []

        def step(what):
            if done:
                progress.advance(task)
            done.append(what)
            progress.update(task, description=f"bench: {what}")

        results = run_bench(cfg, log_dir=args.log_dir, progress=step)
        progress.advance(task)
    print_table(results)
    if args.json:
        write_json(results, args.json)
        print(f"wrote {args.json}")
    if args.plot and results["modes"]:
        write_plot(results, args.plot)
        print(f"wrote {args.plot}")
    return 1 if results["errors"] else 0


def build_parser() -> argparse.ArgumentParser:
    from dflash_vllm.bench.runner import ENGINES

    parser = argparse.ArgumentParser(prog="dflash-vllm", description="DFlash speculative decoding for vLLM")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="generate through the plugin next to plain decoding on a small pair")
    demo.add_argument("--target", help="target model directory (default: the shipped demo pair)")
    demo.add_argument("--drafter", help="DFlash drafter directory (z-lab layout)")
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--num-speculative-tokens", type=int, default=None, help="default: block_size - 1")
    demo.add_argument("--concurrency", type=int, default=1,
                      help="requests in flight (default 1: one user's stream; the bench sweeps 1 to 64)")
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

    bench = sub.add_parser("bench", help="side-by-side benchmark: plain decoding, vLLM's built-in DFlash, plugin")
    bench.add_argument("--target", help="default: the shipped demo pair")
    bench.add_argument("--drafter")
    bench.add_argument("--prompts", help="jsonl of {\"prompt\"} or {\"messages\"} (default: demo held-out prompts)")
    bench.add_argument("--modes", default="baseline,builtin,plugin-fixed,plugin",
                       help="plugin-fixed: adaptive draft length off; plugin: the default (adaptive); on request, "
                            "baseline-sync: plain decoding on vLLM's synchronous scheduler (the one adaptive runs on; "
                            "on CPU the same engine as baseline); baseline-malloc, plugin-malloc: baseline and plugin "
                            "with glibc malloc's mmap and trim thresholds raised in the engine's environment")
    bench.add_argument("--concurrency", default="1,4,16,64")
    bench.add_argument("--reps", type=int, default=5)
    bench.add_argument("--waves", type=int, default=4,
                       help="requests per concurrency slot per repetition (closed loop: c in flight)")
    bench.add_argument("--temperature", type=float, default=0.0)
    bench.add_argument("--max-tokens", type=int, default=128)
    bench.add_argument("--num-speculative-tokens", type=int, default=None, help="default: block_size - 1")
    bench.add_argument("--no-compile", action="store_true", help="eager engines (faster start, for smoke runs)")
    bench.add_argument("--engines", choices=ENGINES, default="auto",
                       help="auto (default): sliced on CPU, restart on GPU. sliced: every mode's engine up for the "
                            "whole run; per concurrency and repetition all modes' closed loops run at once, the "
                            "engines taking turns of --slice-s seconds, so every mode is timed through the same "
                            "seconds of the machine's drift (CPU only: vLLM's GPU start-up expects the device to "
                            "itself). restart: each repetition starts every mode's engine afresh, one engine up at "
                            "a time, order rotating. interleaved: fresh engines per repetition, all up at once, the "
                            "modes taking turns per concurrency. shared: one engine per mode for the whole run, the "
                            "modes taking turns per repetition (faster where an engine start costs minutes)")
    bench.add_argument("--slice-s", type=float, default=0.5,
                       help="with --engines sliced: seconds each engine runs before the next one's turn")
    bench.add_argument("--kv-cache-mib", type=int, default=1024,
                       help="KV cache of each engine (with --engines sliced, interleaved or shared all modes' "
                            "engines are up at once)")
    bench.add_argument("--json", help="write every raw figure and machine info here")
    bench.add_argument("--plot", help="write tokens/s and per-position acceptance plots here (PNG)")
    bench.add_argument("--log-dir", help="keep each engine's log here")
    bench.set_defaults(func=_bench)

    ev = sub.add_parser("eval-drafter", help="tau and per-position acceptance with the pure-PyTorch reference")
    ev.add_argument("--target", required=True)
    ev.add_argument("--drafter", required=True)
    ev.add_argument("--prompts", required=True)
    ev.add_argument("--limit", type=int, default=32)
    ev.add_argument("--max-new-tokens", type=int, default=128)
    ev.add_argument("--num-drafts", type=int, default=None,
                    help="drafts per block (default: the drafter's block_size - 1); fewer run the drafter on a "
                         "shorter block, [last token, MASK x N]")
    ev.set_defaults(func=_eval_drafter)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
