"""Engines side by side in one process, their work interleaved (a diagnostic).

Each engine named on the command line is built in this process (``name=mode[:ablation+...]``).
The work is cut into units of ``--waves`` x ``--concurrency`` prompts, each unit submitted at once
to an engine whose ``max_num_seqs`` is that concurrency (it admits a queued prompt as one
finishes: a closed loop, as ``dflash-vllm bench`` runs). Every unit runs on each engine in turn,
the order rotating, for ``--rounds`` rounds, and time per unit is summed per engine. The
machine's drift (on the 2-core CPU this was built on, a single-threaded matmul varies by +-15%
from one 2-second window to the next) then falls on every engine alike, and the ratios resolve a
few percent where one ``dflash-vllm bench`` run cannot. Name a mode twice for the A/A spread.

A unit ends with its slowest request. Plain decoding advances every request one token a step,
so a wave of equal-length requests ends together; speculation advances them unevenly, and the
last requests of a unit (those the drafter predicts worst) run at a small batch. The bench's
repetitions end the same way. ``--waves 1`` makes that tail as large as it gets. ``--spread S``
gives the requests uneven lengths (``max_tokens`` x [1 - S, 1 + S]): they then end apart and
join one by one, out of the lockstep in which adaptive mode holds its retries of drafting.

In-process by default: output processing then runs in the engine's thread, as it does not in a
served engine. ``VLLM_ENABLE_V1_MULTIPROCESSING=1`` puts each engine core in its own processes,
as served (no ablations then, and no controller figures); only then can mode ``builtin`` (vLLM's
own DFlash) run beside the plugin's engines.

    .venv/bin/python scripts/ab_interleaved.py fixed=plugin-fixed adaptive=plugin cut1=plugin:cut1
    .venv/bin/python scripts/ab_interleaved.py --concurrency 16 base=baseline adaptive=plugin base2=baseline

Ablations of the adaptive controller (diagnostics only): ``cut1`` the cut also for a lone drafting
request (``cut_from_reqs=1``), ``nocut`` no cut at all, ``noveto`` no per-request choice at a few
requests (only PlainOrDraft picks plain steps), ``noplain`` never a plain step by the measured
rates, ``forceplain`` every step plain (as ``DFLASH_VLLM_FORCE_PLAIN=1``), ``notext`` the mode
choice on the measured rates alone at a few requests too (not on this text's expected yield),
``nohigh`` no retry of drafting at 8 or more requests once both modes are measured, ``nohold`` a
retry of drafting starts when due even while the batch runs in lockstep, ``nofew`` (or
``nolone``) 1-4 requests' mode chosen by the pooled choice (not by ``FewRequests``), ``onlyone``
``FewRequests`` at 1 request only (as c2b892b's rule), ``lone08`` its one-request hysteresis at 0.8
(before 0.7), ``trycut`` its tries of drafting cut by the cost model like any drafting step (before
they sent every draft), ``quickcheck`` a mode judged on its first 8-15 cycles re-checked every <= 32
steps however clearly it lost (before the ``clear_z`` rule), ``nojoin`` a streak of plain steps ends at
every step that also prefills (before streaks held through requests joining), ``hystNN`` its hysteresis at 2-4 requests at NN/100 (0.7 ships; 1.0 before).

``--parts`` (in one process) also times each engine's parts per engine step, through the same
interleaved work: the runner's phases (the target's forward pass among them), the scheduler, and
the plugin's ``propose`` and ``stay_plain``. Engines then compare part by part under the same
drift, which whole-run times of one engine after another cannot. ``--parts-by-admit`` splits each
part by whether its engine step admits a request (a step that also prefills) or only decodes.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine cores in this process

import numpy as np  # noqa: E402

ABLATIONS = ("cut1", "nocut", "noveto", "noplain", "forceplain", "notext", "nohigh", "nohold", "nofew", "nolone",
             "onlyone", "lone08", "trycut", "quickcheck", "nojoin")


def _hyst(name: str) -> bool:
    """``hystNN``: the few-requests rule's hysteresis at 2-4 requests at NN/100."""
    return name.startswith("hyst") and name[4:].isdigit()


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
        elif name == "forceplain":  # as DFLASH_VLLM_FORCE_PLAIN=1: every step plain (what plain steps cost)
            proposer._force_plain = proposer.plain = True
        elif name == "notext":  # the mode choice on measured rates alone, also at a few requests
            ctl.modes.text_rate = lambda v, tokens_per_cycle: v
        elif name == "nohigh":  # no retry of drafting at 8 or more requests once both modes are measured
            def calm(num_reqs, new_text=False, draft_yield=None, lockstep=None, prefer=ctl.modes.prefer_draft,
                     modes=ctl.modes):
                if num_reqs >= 8 and len(modes._known(modes.bucket(num_reqs))) == 2:
                    modes.retrying = modes.settled = False
                    return False
                return prefer(num_reqs, new_text, draft_yield, lockstep)

            ctl.modes.prefer_draft = calm
        elif name == "nohold":  # a retry of drafting starts when due, the batch in lockstep or not
            def unheld(num_reqs, new_text=False, draft_yield=None, lockstep=None, prefer=ctl.modes.prefer_draft):
                return prefer(num_reqs, new_text, draft_yield)

            ctl.modes.prefer_draft = unheld
        elif name in ("nofew", "nolone"):  # 1-4 requests decided by the pooled choice (before c2b892b)
            ctl.few = None
        elif name == "onlyone":  # the few-request rule at 1 request only (as c2b892b)
            ctl.few.max_reqs = 1
        elif _hyst(name):
            ctl.few.hysteresis = int(name[4:]) / 100
        elif name == "lone08":
            ctl.few.lone_hysteresis = 0.8
        elif name == "trycut":
            ctl.full_tries = False
        elif name == "nojoin":  # a streak ends at every step that also prefills
            proposer._joining = lambda num_reqs, cad: False
        elif name == "quickcheck":  # no early judgement is clear: quick re-checks until 16 cycles are in
            ctl.modes.clear_z = math.inf
        elif name == "noplain":
            ctl.modes.prefer_draft = lambda num_reqs, *args, **kwargs: True
        else:
            raise SystemExit(f"unknown ablation {name!r}: {', '.join(ABLATIONS)}")


RUNNER_PARTS = ("execute_model", "_model_forward", "_prepare_inputs", "_preprocess", "_update_states",
                "_build_attention_metadata", "_bookkeeping_sync", "_sample", "sample_tokens",
                "propose_draft_token_ids")


class PartTimes:
    """Seconds and calls per (engine, part): methods wrapped on their classes, each runner,
    scheduler and engine core numbered in the order it was built (one of each per engine, built in
    the order the engines are); a proposer counts for its runner's engine. A call's time is taken
    before its bookkeeping, so a wrapped call inside another adds only its clock reads to the outer
    one."""

    def __init__(self, by_admit: bool = False):
        self.order: dict[str, dict[int, int]] = defaultdict(dict)  # kind -> id(instance) -> engine
        self.seconds: dict[tuple[int, str], float] = defaultdict(float)
        self.calls: dict[tuple[int, str], int] = defaultdict(int)
        # by_admit: each part after the scheduler's split by whether the engine step admits a request
        # (".admit") or not (".decode"), from what the last schedule() returned
        self.by_admit = by_admit
        self._step = ""

    def track(self, cls, kind: str) -> None:
        init = cls.__init__

        @functools.wraps(init)
        def __init__(obj, *args, **kwargs):
            built = self.order[kind]
            built[id(obj)] = len(built)
            return init(obj, *args, **kwargs)

        cls.__init__ = __init__

    def _index(self, kind: str, obj) -> int:
        return self.order[kind].get(id(obj), -1)

    def wrap(self, cls, name: str, label: str, index: Callable) -> None:
        fn = getattr(cls, name)

        @functools.wraps(fn)  # keeps the plugin's patch markers (``_dflash_vllm``)
        def timed(obj, *args, **kwargs):
            t = time.perf_counter()
            out = None
            try:
                out = fn(obj, *args, **kwargs)
                return out
            finally:
                dt = time.perf_counter() - t
                key = (index(obj), label + self._step if label != "sched.schedule" else label)
                self.seconds[key] += dt
                self.calls[key] += 1
                if self.by_admit and label == "sched.schedule" and out is not None:
                    self._step = ".admit" if out.scheduled_new_reqs else ".decode"

        setattr(cls, name, timed)

    def install(self) -> None:
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.engine.core import EngineCore
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        from dflash_vllm.proposer import DFlashVllmProposer

        for cls, kind in ((GPUModelRunner, "runner"), (Scheduler, "sched"), (EngineCore, "core")):
            self.track(cls, kind)
        runner, sched = functools.partial(self._index, "runner"), functools.partial(self._index, "sched")
        for name in RUNNER_PARTS:
            self.wrap(GPUModelRunner, name, "runner." + name, runner)
        self.wrap(Scheduler, "schedule", "sched.schedule", sched)
        self.wrap(Scheduler, "update_from_output", "sched.update_from_output", sched)
        self.wrap(EngineCore, "step", "core.step", functools.partial(self._index, "core"))
        for name in ("propose", "stay_plain"):  # a proposer counts for its runner's engine
            self.wrap(DFlashVllmProposer, name, "plugin." + name, lambda obj: runner(obj._runner))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def report(self, names: list[str]) -> str:
        steps = [self.calls[(i, "sched.schedule")] for i in range(len(names))]
        labels = sorted({label for _, label in self.seconds})
        if self.by_admit:  # ms per call and calls: the two kinds of step differ in number
            lines = ["ms per call (calls), split by whether the engine step admits a request:",
                     f"{'part':<40}" + "".join(f"{n:>20}" for n in names)]
            for label in labels:
                lines.append(f"{label:<40}" + "".join(
                    f"{1e3 * self.seconds[(i, label)] / self.calls[(i, label)]:12.3f} ({self.calls[(i, label)]:5d})"
                    if self.calls[(i, label)] else f"{'-':>20}" for i in range(len(names))))
            return "\n".join(lines)
        lines = [f"ms per engine step ({', '.join(f'{n} {s} steps' for n, s in zip(names, steps, strict=True))}):",
                 f"{'part':<36}" + "".join(f"{n:>12}" for n in names)]
        for label in labels:
            lines.append(f"{label:<36}" + "".join(
                f"{1e3 * self.seconds[(i, label)] / steps[i]:12.3f}" if steps[i] and self.calls[(i, label)] else
                f"{'-':>12}" for i in range(len(names))))
        return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    root = Path(__file__).resolve().parent.parent / "dflash_vllm" / "demo_pair"
    ap.add_argument("engines", nargs="+", help="name=mode[:ablation+...], mode one of the bench's")
    ap.add_argument("--target", default=str(root / "target"))
    ap.add_argument("--drafter", default=str(root / "drafter"))
    ap.add_argument("--prompts", default=str(root / "eval_prompts.jsonl"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=1, help="requests at once (max_num_seqs)")
    ap.add_argument("--waves", type=int, default=None,
                    help="prompts per unit, in concurrencies (default 1 at concurrency 1, 4 up to 16, else 2)")
    ap.add_argument("--units", type=int, default=None,
                    help="units per round (default: one per prompt at concurrency 1, else 4)")
    ap.add_argument("--spread", type=float, default=0.0,
                    help="requests of uneven lengths: each prompt's max_tokens drawn uniformly from "
                         "max_tokens x [1 - S, 1 + S] (seeded, the same in every engine), so a closed loop's "
                         "requests end apart and join one by one, as served traffic does (default 0: all "
                         "max_tokens, the bench's lockstep)")
    ap.add_argument("--parts", action="store_true",
                    help="also each engine's parts per engine step over the timed rounds (in one process)")
    ap.add_argument("--parts-by-admit", action="store_true",
                    help="with --parts: each part per call, split by whether the engine step admits a request")
    args = ap.parse_args()

    from dflash_vllm import patches

    patches.apply_all()
    parts = None
    if args.parts:
        if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1":
            raise SystemExit("--parts needs the engine cores in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        parts = PartTimes(by_admit=args.parts_by_admit)
        parts.install()
    from vllm import LLM, SamplingParams

    from dflash_vllm.bench.runner import EXTRA_MODES, MODES, BenchConfig, engine_spec
    from dflash_vllm.training.data import read_prompts

    prompts = read_prompts(args.prompts)
    cfg = BenchConfig(target=args.target, drafter=args.drafter, prompts=prompts, concurrency=[args.concurrency])
    served = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "1"
    specs = []
    for arg in args.engines:  # every engine checked before the first is built (minutes each)
        name, _, spec = arg.partition("=")
        mode, _, abl = spec.partition(":")
        ablations = [a for a in abl.split("+") if a]
        if not name or mode not in MODES + EXTRA_MODES:
            raise SystemExit(f"engine {arg!r}: expected name=mode[:ablation+...], mode one of "
                             f"{', '.join(MODES + EXTRA_MODES)}")
        if unknown := [a for a in ablations if a not in ABLATIONS and not _hyst(a)]:
            raise SystemExit(f"engine {arg!r}: unknown ablations {unknown}; known: {', '.join(ABLATIONS)}")
        if ablations and (served or mode != "plugin"):
            raise SystemExit(f"engine {arg!r}: ablations need mode 'plugin' with its engine core in this process "
                             "(VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        if mode == "builtin" and not served:
            raise SystemExit("mode builtin needs VLLM_ENABLE_V1_MULTIPROCESSING=1 (this process runs the plugin)")
        specs.append((name, mode, ablations))
    engines = {}
    for name, mode, ablations in specs:
        spec = engine_spec(cfg, mode)
        # the bench's environment per mode: a served engine core's processes, spawned now, read it
        # (builtin: they leave vLLM unpatched)
        saved = {k: os.environ.get(k) for k in spec["env"]}
        os.environ.update(spec["env"])
        try:
            llm = LLM(**spec["engine"])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        core = getattr(llm.llm_engine.engine_core, "engine_core", None)  # None: engine core in its own process
        runner = core.model_executor.driver_worker.worker.model_runner if core is not None else None
        proposer = getattr(runner, "drafter", None)
        ablate(proposer, ablations)
        engines[name] = (llm, proposer)
    c = args.concurrency
    w = args.waves or (1 if c == 1 else 4 if c <= 16 else 2)
    n = args.units or (len(prompts) if c == 1 else 4)
    units = [[prompts[(u * c * w + j) % len(prompts)] for j in range(c * w)] for u in range(n)]
    warm = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True, seed=0)
    if not 0.0 <= args.spread < 1.0:
        raise SystemExit(f"--spread {args.spread}: expected 0 <= S < 1")
    rng = np.random.default_rng(0)
    lengths = [[max(1, round(args.max_tokens * (1 + args.spread * (2 * rng.random() - 1)))) for _ in unit]
               for unit in units]
    sampling = [[SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True, seed=0) for m in unit_lengths]
                for unit_lengths in lengths]
    for llm, _ in engines.values():
        for p in prompts[-4:]:
            llm.generate([p], warm, use_tqdm=False)
        if c > 1:
            llm.generate(units[-1], warm, use_tqdm=False)
    names = list(engines)
    if parts is not None:
        parts.reset()  # the timed rounds only
    secs = {m: [0.0] * n for m in names}
    outs: dict[str, list] = {m: [None] * n for m in names}
    for r in range(args.rounds):
        for i, unit in enumerate(units):
            j = (i + r) % len(names)
            for m in names[j:] + names[:j]:
                t = time.perf_counter()
                out = engines[m][0].generate(unit, sampling[i], use_tqdm=False)
                secs[m][i] += time.perf_counter() - t
                outs[m][i] = [list(o.outputs[0].token_ids) for o in out]
    base, half = names[0], n // 2
    tokens = args.rounds * sum(map(sum, lengths))
    print(f"concurrency {c}, {n} units of {c * w} prompt(s) x {args.max_tokens} tokens"
          + (f" (spread +-{args.spread:.0%}: {min(map(min, lengths))}-{max(map(max, lengths))})" if args.spread else "")
          + f", {args.rounds} rounds")
    for m in names:
        speed = sum(secs[base]) / sum(secs[m])
        halves = (f"units 1-{half} {sum(secs[base][:half]) / sum(secs[m][:half]):.3f}x, {half + 1}-{n} "
                  f"{sum(secs[base][half:]) / sum(secs[m][half:]):.3f}x, " if half else "")
        per_unit = statistics.median(secs[base][i] / secs[m][i] for i in range(n))
        same = sum(outs[m][i] == outs[base][i] for i in range(n))
        prop = engines[m][1]
        print(f"{m:>10}: {tokens / sum(secs[m]):6.1f} tok/s, {speed:.3f}x {base} ({halves}"
              f"median per unit {per_unit:.3f}x), "
              f"plain steps {getattr(prop, 'plain_steps', 0)}, outputs equal to {base}'s {same}/{n}")
        print(f"{'':>12}per unit: " + " ".join(f"{secs[base][i] / secs[m][i]:.3f}x" for i in range(n)))
        ctl = getattr(prop, "adaptive", None)
        if ctl is not None:
            print(f"{'':>12}drafting steps {ctl._drafting_steps}, retries held in lockstep {ctl.modes.held}; "
                  f"{ctl.describe()}")
    if parts is not None:
        print(parts.report(names))


if __name__ == "__main__":
    main()
