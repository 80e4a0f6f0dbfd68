"""Engines side by side in one process, one request at a time, interleaved (a diagnostic).

Each engine named on the command line is built in this process (``name=mode[:ablation+...]``);
every prompt then runs on each engine in turn, the order rotating, for ``--rounds`` rounds. Time
per prompt is summed per engine, so the machine's drift (on the 2-core CPU this was built on, a
single-threaded matmul varies by +-15% from one 2-second window to the next, and a whole engine
run by up to ~20%) falls on every engine alike: the ratios resolve a few percent where one
``dflash-vllm bench`` run cannot. Concurrency 1 only, and in-process: output processing runs in
the engine's thread, as it does not in a served engine.

    .venv/bin/python scripts/ab_interleaved.py fixed=plugin-fixed adaptive=plugin cut1=plugin:cut1

``VLLM_ENABLE_V1_MULTIPROCESSING=1`` puts each engine core in its own processes, as served (no
ablations then, and no plain-step count).

Ablations of the adaptive controller (diagnostics only): ``cut1`` the cut also for a lone drafting
request (``cut_from_reqs=1``), ``nocut`` no cut at all, ``noveto`` no per-request choice at a few
requests (only PlainOrDraft picks plain steps), ``noplain`` never a plain step by the measured rates.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine cores in this process

import numpy as np  # noqa: E402


def ablate(proposer, ablations: list[str]) -> None:
    if not ablations:
        return
    ctl = getattr(proposer, "adaptive", None)
    if ctl is None:
        raise SystemExit(f"ablations {ablations} need the adaptive plugin (mode 'plugin')")
    for name in ablations:
        if name == "cut1":
            ctl.cut_from_reqs = 1
        elif name == "nocut":
            ctl.cut_from_reqs = 1 << 30
        elif name == "noveto":
            def few_all(ids, caps, bt, select=ctl._select, ctl=ctl):
                return (np.asarray(caps) > 0) if ctl.modes.few(len(ids)) else select(ids, caps, bt)

            ctl._select = few_all
        elif name == "noplain":
            ctl.modes.prefer_draft = lambda num_reqs, new_text=False: True
        else:
            raise SystemExit(f"unknown ablation {name!r}: cut1, nocut, noveto, noplain")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent / "dflash_vllm" / "demo_pair"
    ap.add_argument("engines", nargs="+", help="name=mode[:ablation+...], mode one of the bench's")
    ap.add_argument("--target", default=str(root / "target"))
    ap.add_argument("--drafter", default=str(root / "drafter"))
    ap.add_argument("--prompts", default=str(root / "eval_prompts.jsonl"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()

    from dflash_vllm import patches

    patches.apply_all()
    from vllm import LLM, SamplingParams

    from dflash_vllm.bench.runner import BenchConfig, engine_spec
    from dflash_vllm.training.data import read_prompts

    prompts = read_prompts(args.prompts)
    cfg = BenchConfig(target=args.target, drafter=args.drafter, prompts=prompts, concurrency=[1])
    engines = {}
    for arg in args.engines:
        name, _, spec = arg.partition("=")
        mode, _, abl = spec.partition(":")
        llm = LLM(**engine_spec(cfg, mode)["engine"])
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # None: engine core in its own process
        runner = core.model_executor.driver_worker.worker.model_runner if core is not None else None
        proposer = getattr(runner, "drafter", None)
        ablate(proposer, [a for a in abl.split("+") if a])
        engines[name] = (llm, proposer)
    warm = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, seed=0)
    sampling = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    for llm, _ in engines.values():
        for p in prompts[-4:]:
            llm.generate([p], warm, use_tqdm=False)
    names, n = list(engines), len(prompts)
    secs = {m: [0.0] * n for m in names}
    outs: dict[str, list] = {m: [None] * n for m in names}
    for r in range(args.rounds):
        for i, p in enumerate(prompts):
            j = (i + r) % len(names)
            for m in names[j:] + names[:j]:
                t = time.perf_counter()
                out = engines[m][0].generate([p], sampling, use_tqdm=False)
                secs[m][i] += time.perf_counter() - t
                outs[m][i] = list(out[0].outputs[0].token_ids)
    base, half = names[0], n // 2
    tokens = args.rounds * n * args.max_tokens
    for m in names:
        speed = sum(secs[base]) / sum(secs[m])
        first = sum(secs[base][:half]) / sum(secs[m][:half])
        second = sum(secs[base][half:]) / sum(secs[m][half:])
        per_prompt = statistics.median(secs[base][i] / secs[m][i] for i in range(n))
        same = sum(outs[m][i] == outs[base][i] for i in range(n))
        prop = engines[m][1]
        print(f"{m:>10}: {tokens / sum(secs[m]):6.1f} tok/s, {speed:.3f}x {base} (prompts 1-{half} "
              f"{first:.3f}x, {half + 1}-{n} {second:.3f}x, median per prompt {per_prompt:.3f}x), "
              f"plain steps {getattr(prop, 'plain_steps', 0)}, outputs equal to {base}'s {same}/{n}")


if __name__ == "__main__":
    main()
