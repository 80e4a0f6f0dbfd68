"""Milliseconds per engine step of the engine's parts, for one bench mode on a fresh engine (a
diagnostic, not a benchmark): the runner's phases, the scheduler, the rejection sampler, the
drafter's ``propose`` and, for the plugin, its own phases and the adaptive controller's calls.

Runs 4 warm-up prompts, then ``--prompts-n`` prompts x ``--max-tokens`` at ``--concurrency``
requests at a time (the bench's closed loop; a warm-up loop at that concurrency too, if above 1),
timing each wrapped method with ``perf_counter``. Steps are the scheduler's ``schedule`` calls. Alternate modes over several runs: one engine instance differs
from the next by up to ~20% on a 2-core CPU.

    VLLM_ENABLE_V1_MULTIPROCESSING=0 DFLASH_VLLM_DISABLE=1 .venv/bin/python scripts/profile_parts.py builtin
    VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python scripts/profile_parts.py plugin-fixed --json fixed.json
    VLLM_ENABLE_V1_MULTIPROCESSING=0 DFLASH_VLLM_FORCE_PLAIN=1 .venv/bin/python scripts/profile_parts.py plugin \
        --concurrency 16 --prompts-n 64   # what a plain step costs in a speculative engine

With ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` (as served) the engine core runs in another process:
only tokens/s is measured then. ``DFLASH_VLLM_DISABLE`` must match the mode (1 for ``builtin``).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

SECONDS: dict[str, float] = defaultdict(float)
CALLS: dict[str, int] = defaultdict(int)


def wrap(cls, name: str, label: str) -> None:
    fn = getattr(cls, name, None)
    if fn is None:
        return

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SECONDS[label] += time.perf_counter() - t
            CALLS[label] += 1

    setattr(cls, name, timed)


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) each thread of this process has run, by ``name/tid`` (Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
            name = (task / "comm").read_text().strip()
        except OSError:  # the thread ended
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        out[f"{name}/{task.name}"] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["baseline", "builtin", "plugin-fixed", "plugin"])
    ap.add_argument("--prompts-n", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--threads", action="store_true",
                    help="also the CPU seconds each thread of this process ran in the timed loop (in one "
                         "process: VLLM_ENABLE_V1_MULTIPROCESSING=0)")
    ap.add_argument("--cprofile", metavar="FILE",
                    help="also profile the timed loop with cProfile and dump its stats here (pstats; the "
                         "profiler inflates Python-heavy parts: compare modes, not absolute times)")
    args = ap.parse_args()
    if (os.environ.get("DFLASH_VLLM_DISABLE") == "1") != (args.mode == "builtin"):
        sys.exit("set DFLASH_VLLM_DISABLE=1 for mode builtin, and only for it")

    from vllm import LLM, SamplingParams
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.sample.rejection_sampler import RejectionSampler
    from vllm.v1.spec_decode.dflash import DFlashProposer
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from dflash_vllm.adaptive import AdaptiveController
    from dflash_vllm.bench.engine_job import _closed_loop
    from dflash_vllm.bench.runner import engine_spec, shipped_config
    from dflash_vllm.context_backlog import ContextBacklog
    from dflash_vllm.proposer import DFlashVllmProposer

    cfg = shipped_config([args.concurrency])
    prompts = cfg.prompts
    llm = LLM(**engine_spec(cfg, args.mode)["engine"])

    for name in ("execute_model", "sample_tokens", "propose_draft_token_ids", "_prepare_inputs",
                 "_update_states", "_bookkeeping_sync", "_model_forward", "_build_attention_metadata", "_preprocess",
                 "_sample"):
        wrap(GPUModelRunner, name, "runner." + name)
    wrap(Scheduler, "schedule", "sched.schedule")
    wrap(EngineCore, "step", "core.step")
    wrap(EngineCore, "post_step", "core.post_step")
    wrap(ContextBacklog, "record", "plugin.backlog.record")
    wrap(Scheduler, "update_from_output", "sched.update")
    wrap(RejectionSampler, "forward", "rejection")
    wrap(DFlashProposer, "propose", "drafter.propose")
    wrap(DFlashVllmProposer, "propose", "drafter.propose")
    for name in ("_learn_from_last_step", "_flush_outcomes", "_request_caps", "_batch_req_ids",
                 "_block_forward", "_select", "_features", "_backfill", "stay_plain"):
        wrap(DFlashVllmProposer, name, "plugin." + name)
    # the drafting step's parts, the plugin's and the built-in's alike
    from vllm.model_executor.models.qwen3_dflash import DFlashQwen3ForCausalLM
    from vllm.v1.spec_decode.llm_base_proposer import SpecDecodeBaseProposer

    import dflash_vllm.proposer as plugin_proposer
    from dflash_vllm.models.vllm_drafter import DFlashVllmDrafter

    for name in ("block_inputs", "context_slots"):
        wrap(plugin_proposer, name, "plugin." + name)
    for name in ("fuse_context", "write_context_kv", "compute_logits"):
        wrap(DFlashVllmDrafter, name, "plugin.model." + name)
    for name in ("set_inputs_first_pass", "build_model_inputs_first_pass"):
        wrap(DFlashProposer, name, "builtin." + name)
    for name in ("precompute_and_store_context_kv", "combine_hidden_states", "compute_logits"):
        wrap(DFlashQwen3ForCausalLM, name, "builtin.model." + name)
    # the block pass itself (the compiled module's call, outside what dynamo traces)
    from vllm.model_executor.models.qwen3_dflash import DFlashQwen3Model

    wrap(DFlashQwen3Model, "__call__", "builtin.model.block_pass")
    wrap(DFlashVllmDrafter, "__call__", "plugin.model.block_pass")
    for name in ("build_per_group_and_layer_attn_metadata", "_sample_draft_tokens"):
        wrap(SpecDecodeBaseProposer, name, "base." + name)
    for name in ("begin_step", "close_cycle", "select", "cut", "end_step", "open_cycle", "observe_outcomes",
                 "plain_step", "wants_draft"):
        wrap(AdaptiveController, name, "controller." + name)

    warm = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    _closed_loop(llm, prompts[-4:], [warm] * 4, 1)
    if args.concurrency > 1:
        warm_prompts = prompts[-4 * args.concurrency:]  # all of them when the set is smaller
        _closed_loop(llm, warm_prompts, [warm] * len(warm_prompts), args.concurrency)
    SECONDS.clear()
    CALLS.clear()
    # the eval set repeated up to --prompts-n (it holds 32 prompts: more requests than that need repeats)
    work = (prompts * -(-args.prompts_n // len(prompts)))[: args.prompts_n]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True, seed=0)
    gc_times, gc_start = defaultdict(float), {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start["t"] = time.perf_counter()
        elif "t" in gc_start:
            gc_times[info["generation"]] += time.perf_counter() - gc_start.pop("t")
            CALLS[f"gc.gen{info['generation']}"] += 1

    gc.callbacks.append(on_gc)
    prof = None
    if args.cprofile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    cpu0 = thread_cpu()
    t = time.perf_counter()
    outs = _closed_loop(llm, work, [params] * len(work), args.concurrency)
    wall = time.perf_counter() - t
    if prof is not None:
        prof.disable()
        prof.dump_stats(args.cprofile)
    cpu = {k: v - cpu0.get(k, 0.0) for k, v in thread_cpu().items()}
    gc.callbacks.remove(on_gc)
    for gen, secs in gc_times.items():
        SECONDS[f"gc.gen{gen}"] = secs  # Python's garbage collections in the loop, in any thread
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    steps = CALLS["sched.schedule"]
    res = {"mode": args.mode, "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall, "steps": steps,
           "ms_per_step": {k: 1e3 * SECONDS[k] / steps for k in sorted(SECONDS)} if steps else {},
           "calls": dict(CALLS)}
    print(f"{args.mode}: {tokens} tokens in {wall:.2f} s, {tokens / wall:.1f} tokens/s, {steps or 'uncounted'} steps")
    for k, v in res["ms_per_step"].items():
        print(f"  {k:<34} {v:7.3f} ms/step ({CALLS[k]} calls)")
    if args.threads:
        res["thread_cpu_s"] = {k: v for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v > 0}
        print(f"  threads' CPU seconds in the {wall:.2f} s loop ({len(cpu)} threads, the busy ones):")
        for k, v in res["thread_cpu_s"].items():
            print(f"    {k:<32} {v:7.2f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
