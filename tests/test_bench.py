import json

import pytest

from dflash_vllm.bench.stats import acceptance_histogram, pairwise_ratios


def test_pairwise_ratios_cancel_drift():
    # The machine slows down 2x between rep 0 and rep 1; both modes see it.
    plugin, baseline = [200.0, 100.0, 150.0], [100.0, 50.0, 75.0]
    r = pairwise_ratios(plugin, baseline)
    assert r["per_rep"] == [2.0, 2.0, 2.0] and r["median"] == 2.0
    # a ratio of medians would not be taken pair by pair: different numbers, same median here
    r2 = pairwise_ratios([10.0, 30.0, 20.0], [10.0, 10.0, 40.0])
    assert r2["per_rep"] == [1.0, 3.0, 0.5] and r2["median"] == 1.0


def test_run_plan_restart_gives_each_repetition_fresh_engines_in_rotating_order():
    from dflash_vllm.bench.runner import run_plan

    plan = run_plan(["a", "b", "c"], [1, 4], 3, "restart")
    assert plan[:3] == [("a", ["c1_r0", "c4_r0"]), ("b", ["c1_r0", "c4_r0"]), ("c", ["c1_r0", "c4_r0"])]
    assert [m for m, _ in plan[3:6]] == ["b", "c", "a"] and [m for m, _ in plan[6:]] == ["c", "a", "b"]
    assert all(jobs == ["c1_r1", "c4_r1"] for _, jobs in plan[3:6])
    # every mode starts first, second and last once: no mode always runs on a later-started engine
    assert sorted(m for m, _ in plan[::3]) == ["a", "b", "c"]


def test_run_plan_interleaved_takes_turns_per_job_within_each_repetition():
    from dflash_vllm.bench.runner import _rep, run_plan

    plan = run_plan(["a", "b", "c"], [1, 4], 3, "interleaved")
    assert plan[:6] == [("a", ["c1_r0"]), ("b", ["c1_r0"]), ("c", ["c1_r0"]),
                        ("b", ["c4_r0"]), ("c", ["c4_r0"]), ("a", ["c4_r0"])]
    # one entry per (repetition, job, mode), repetitions in order (their engines stop between them)
    assert len(plan) == 3 * 2 * 3 and [_rep(n[0]) for _, n in plan] == sorted(_rep(n[0]) for _, n in plan)
    # the mode that starts a repetition's engines first rotates: each mode once
    assert sorted(plan[r * 6][0] for r in range(3)) == ["a", "b", "c"]


def test_run_plan_shared_interleaves_modes_per_job():
    from dflash_vllm.bench.runner import run_plan

    plan = run_plan(["a", "b"], [1, 4], 2, "shared")
    assert plan == [("a", ["c1_r0"]), ("b", ["c1_r0"]), ("b", ["c1_r1"]), ("a", ["c1_r1"]),
                    ("a", ["c4_r0"]), ("b", ["c4_r0"]), ("b", ["c4_r1"]), ("a", ["c4_r1"])]
    with pytest.raises(ValueError, match="engines='both'"):
        run_plan(["a"], [1], 1, "both")


def test_run_plan_sliced_opens_every_modes_loop_per_job():
    from dflash_vllm.bench.runner import resolve_engines, run_plan

    plan = run_plan(["a", "b"], [1, 4], 2, "sliced")
    assert plan == [("a", ["c1_r0"]), ("b", ["c1_r0"]), ("a", ["c4_r0"]), ("b", ["c4_r0"]),
                    ("a", ["c1_r1"]), ("b", ["c1_r1"]), ("a", ["c4_r1"]), ("b", ["c4_r1"])]
    assert resolve_engines("restart") == "restart"
    assert resolve_engines("auto") in ("sliced", "restart")
    with pytest.raises(ValueError, match="engines='slices'"):
        resolve_engines("slices")


class _FakeEngine:
    """Decodes one token per request per step; a request is done after ``tokens`` steps (``lengths``:
    per request, by prompt). Keeps vLLM's per-request stats of the requests in flight
    (``output_processor.request_states``; ``stats=False``: as an engine that logs none)."""

    def __init__(self, tokens: int, drop: str | None = None, lengths: dict[str, int] | None = None,
                 stats: bool = True):
        from types import SimpleNamespace

        self.tokens, self.drop, self.lengths, self.stats = tokens, drop, lengths or {}, stats
        self.running: dict[str, int] = {}
        self.length: dict[str, int] = {}
        self.max_in_flight = 0
        self.steps = 0
        self.output_processor = SimpleNamespace(request_states={})

    def add_request(self, rid, prompt, params):
        from types import SimpleNamespace

        self.running[rid] = 0
        self.length[rid] = self.lengths.get(prompt, self.tokens)
        stats = SimpleNamespace(num_generation_tokens=0) if self.stats else None
        self.output_processor.request_states[rid] = SimpleNamespace(stats=stats)
        self.max_in_flight = max(self.max_in_flight, len(self.running))

    def has_unfinished_requests(self):
        return bool(self.running)

    def step(self):
        from types import SimpleNamespace

        self.steps += 1
        outs = []
        for rid in list(self.running):
            self.running[rid] += 1
            if self.stats:
                self.output_processor.request_states[rid].stats.num_generation_tokens += 1
            if rid == self.drop:  # lost by the engine: never reported finished
                del self.running[rid]
            elif self.running[rid] == self.length[rid]:
                del self.running[rid]
                del self.output_processor.request_states[rid]
                outs.append(SimpleNamespace(request_id=rid, finished=True, prompt=rid,
                                            outputs=[SimpleNamespace(token_ids=[0] * self.length[rid])]))
        return outs


def test_closed_loop_in_slices_keeps_c_in_flight_and_resumes_where_it_stopped():
    from types import SimpleNamespace

    from dflash_vllm.bench.engine_job import ClosedLoop

    engine = _FakeEngine(tokens=3)
    loop = ClosedLoop(SimpleNamespace(llm_engine=engine), [f"p{i}" for i in range(7)], [None] * 7, 2, tag="j")
    assert engine.max_in_flight == 2 and loop.live
    turns = 0
    while loop.run(0.0):  # a zero-second slice still makes one step
        turns += 1
        assert engine.steps == turns and len(engine.running) <= 2
    # 7 prompts, 2 at a time, 3 steps each: 4 waves of 3 steps; each slice was one step
    assert engine.steps == 12 and loop.slices == 12 and engine.max_in_flight == 2
    assert [o.request_id for o in loop.outputs()] == [f"j-{i}" for i in range(7)]
    assert loop.wall_s > 0 and not loop.run(1.0)  # a finished loop stays finished

    unfinished = ClosedLoop(SimpleNamespace(llm_engine=_FakeEngine(tokens=2)), ["a", "b"], [None] * 2, 2)
    unfinished.run(0.0)
    with pytest.raises(RuntimeError, match="0 of 2 prompts done"):
        unfinished.outputs()
    lost = ClosedLoop(SimpleNamespace(llm_engine=_FakeEngine(tokens=2, drop="bench-1")), ["a", "b"], [None] * 2, 2)
    with pytest.raises(RuntimeError, match="1 prompts never finished"):
        lost.run()


def test_closed_loop_times_its_full_load_apart_from_its_tail():
    """Full load ends at the first finished request no prompt replaces; its tokens count the requests
    in flight too. Requests of equal length end together: no tail, full load is the whole loop."""
    from types import SimpleNamespace

    from dflash_vllm.bench.engine_job import ClosedLoop

    # 2 slots, prompts of 2, 6, 3 and 5 tokens: p0 ends at step 2 (p2 replaces it), p2 at step 5 (p3
    # replaces it), p1 at step 6 with nothing left: full load is steps 1-6, 2 + 6 + 3 + 1 (p3's first)
    # tokens; p3 then runs alone for 4 steps of tail
    engine = _FakeEngine(tokens=0, lengths={"p0": 2, "p1": 6, "p2": 3, "p3": 5})
    loop = ClosedLoop(SimpleNamespace(llm_engine=engine), ["p0", "p1", "p2", "p3"], [None] * 4, 2)
    steps_at_full = None
    while loop.run(0.0):
        if loop.full_s is not None and steps_at_full is None:
            steps_at_full = engine.steps
    assert steps_at_full == 6 and engine.steps == 10
    assert loop.full_tokens == 12 and 0 < loop.full_s <= loop.wall_s
    assert sum(len(o.outputs[0].token_ids) for o in loop.outputs()) == 16

    even = ClosedLoop(SimpleNamespace(llm_engine=_FakeEngine(tokens=3)), ["a", "b", "c", "d"], [None] * 4, 2)
    while even.run(0.0):
        assert even.full_s is None  # no tail: full load lasts to the loop's last step
    assert even.full_tokens == 12 and 0 < even.full_s <= even.wall_s

    stats_off = _FakeEngine(tokens=0, lengths={"a": 1, "b": 3}, stats=False)
    blind = ClosedLoop(SimpleNamespace(llm_engine=stats_off), ["a", "b"], [None] * 2, 2)
    blind.run()
    assert blind.full_s is not None and blind.full_tokens is None


def test_job_figures_rate_the_full_load_and_keep_older_results_readable():
    from dflash_vllm.bench.stats import job_figures, pairwise_ratios, summarize_mode

    spec = {"num_drafts": 0, "accepted_per_pos": [], "acceptance_length": None, "num_accepted_tokens": 0}
    job = {"spec": spec, "num_output_tokens": 100, "wall_s": 2.0, "full_tokens": 60, "full_s": 1.0}
    fig = job_figures(job, 4)
    assert fig["tokens_per_s"] == 50.0 and fig["full_tokens_per_s"] == 60.0
    old = job_figures({k: v for k, v in job.items() if not k.startswith("full")}, 4)
    assert old["full_tokens_per_s"] is None
    assert summarize_mode([fig, old])["full_tokens_per_s"] == 60.0
    assert pairwise_ratios([60.0, None], [30.0, 50.0])["per_rep"] == [2.0]


def test_acceptance_histogram_from_prefix_counts():
    # 10 drafts, K=3: 6 accepted position 1, 3 of those position 2, 1 all three
    assert acceptance_histogram(10, [6, 3, 1]) == [4, 3, 2, 1]
    assert sum(acceptance_histogram(10, [6, 3, 1])) == 10


@pytest.mark.engine
def test_bench_smoke_writes_json_and_png(tiny_pair, tmp_path):
    from PIL import Image

    from dflash_vllm.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["def f(x):", "import os\n", "x = 1"]))
    out_json, out_png = tmp_path / "b.json", tmp_path / "b.png"
    rc = main(["bench", "--target", str(tiny_pair.target), "--drafter", str(tiny_pair.drafter),
               "--prompts", str(prompts), "--concurrency", "1,2", "--max-tokens", "16", "--reps", "2",
               "--no-compile", "--kv-cache-mib", "128", "--json", str(out_json), "--plot", str(out_png),
               "--engines", "restart"])
    assert rc == 0
    res = json.loads(out_json.read_text())
    assert set(res["modes"]) == {"baseline", "builtin", "plugin-fixed", "plugin"} and not res["errors"]
    for mode in res["modes"].values():
        for c in ("1", "2"):
            fig = mode["by_concurrency"][c]
            assert fig["tokens_per_s"] > 0 and fig["tpot_ms"] > 0 and len(fig["reps"]) == 2
    assert res["modes"]["plugin-fixed"]["by_concurrency"]["2"]["tau"] >= 1.0
    assert len(res["modes"]["plugin-fixed"]["by_concurrency"]["1"]["per_position_acceptance"]) == 7
    assert set(res["ratios"]) >= {"plugin/baseline", "plugin/builtin", "plugin/plugin-fixed"}
    assert len(res["ratios"]["plugin/baseline"]["2"]["per_rep"]) == 2
    assert {"cpu", "vllm", "torch", "commit"} <= set(res["machine"])
    # engines restarted per repetition (the default): each mode's engine runs all of one repetition's
    # jobs, then the next mode's; every mode once per repetition, the mode going first rotating
    order = res["order"]
    assert len(order) == 4 * 2 * 2
    sessions = [order[i:i + 2] for i in range(0, len(order), 2)]
    assert all(a[1] == b[1] and (a[0], b[0]) in {("c1_r0", "c2_r0"), ("c1_r1", "c2_r1")} for a, b in sessions)
    assert [len({s[0][1] for s in sessions[i:i + 4]}) for i in (0, 4)] == [4, 4]
    assert sessions[0][0][1] != sessions[4][0][1]
    assert all(m["engine_starts"] == 2 and m["engine_start_s"] > 0 for m in res["modes"].values())
    with Image.open(out_png) as img:
        assert img.size[0] > 400


@pytest.mark.engine
def test_bench_sliced_runs_every_modes_loop_in_turns_on_one_engine_per_mode(tiny_pair, tmp_path):
    from dflash_vllm.bench.runner import BenchConfig, run_bench

    cfg = BenchConfig(target=str(tiny_pair.target), drafter=str(tiny_pair.drafter),
                      prompts=["def f(x):", "import os\n", "x = 1", "class A:"], modes=["baseline", "plugin"],
                      concurrency=[1, 2], reps=2, max_tokens=24, compile=False, kv_cache_bytes=128 << 20,
                      engines="sliced", slice_s=0.05)
    res = run_bench(cfg)
    assert not res["errors"] and res["config"]["engines"] == "sliced"
    # one engine per mode for the whole run; per job both modes' loops, closed in mode order
    assert all(m["engine_starts"] == 1 for m in res["modes"].values())
    assert res["order"] == [[f"c{c}_r{r}", m] for r in range(2) for c in (1, 2) for m in ("baseline", "plugin")]
    for c in ("1", "2"):
        reps = {m: res["modes"][m]["by_concurrency"][c]["reps"] for m in res["modes"]}
        for base, ours in zip(reps["baseline"], reps["plugin"], strict=True):
            assert base["num_output_tokens"] == ours["num_output_tokens"] == 16 * 24  # min_requests 16
            assert base["slices"] >= 1 and ours["slices"] >= 1 and base["wall_s"] > 0
        assert len(res["ratios"]["plugin/baseline"][c]["per_rep"]) == 2
    assert max(r["slices"] for r in res["modes"]["plugin"]["by_concurrency"]["1"]["reps"]) > 1  # 0.05 s turns


@pytest.mark.engine
def test_engine_server_loop_in_slices_gives_the_same_tokens_as_in_one_go(tiny_pair, tmp_path):
    from dflash_vllm.bench.engine_job import EngineJobError, EngineServer
    from dflash_vllm.bench.runner import BenchConfig, engine_spec

    cfg = BenchConfig(target=str(tiny_pair.target), drafter=str(tiny_pair.drafter), prompts=["x"], compile=False,
                      kv_cache_bytes=128 << 20)
    spec = engine_spec(cfg, "plugin-fixed")
    job = {"name": "j", "prompts": ["def f(x):", "import os\n", "x = 1", "class A:", "for i in"],
           "sampling": {"temperature": 0, "max_tokens": 32, "ignore_eos": True}, "concurrency": 2}
    server = EngineServer({k: v for k, v in spec.items() if k != "jobs"}, log_path=tmp_path / "e.log")
    try:
        whole = server.run(job)
        assert server.open_loop(job)
        turns = 0
        while server.run_slice(0.01):
            turns += 1
        sliced = server.close_loop()
        assert server.open_loop(job)
        with pytest.raises(EngineJobError, match="still open"):  # never a silent swap of loops
            server.open_loop(job)
    finally:
        server.close()
    assert turns > 3 and sliced["slices"] == turns + 1
    # same greedy tokens, and the drafting counters count the loop's own steps only
    assert sliced["token_ids"] == whole["token_ids"] and sliced["num_output_tokens"] == 5 * 32
    assert sliced["spec"]["num_drafts"] == whole["spec"]["num_drafts"] > 0 and sliced["wall_s"] > 0


@pytest.mark.engine
def test_bench_reports_a_mode_that_cannot_start(tiny_pair, tmp_path):
    from dflash_vllm.bench.runner import BenchConfig, run_bench

    cfg = BenchConfig(target=str(tiny_pair.target), drafter=str(tmp_path / "missing"), prompts=["x = 1"],
                      modes=["baseline", "plugin"], concurrency=[1], reps=1, max_tokens=4, compile=False)
    res = run_bench(cfg)
    assert "baseline" in res["modes"] and res["modes"]["baseline"]["by_concurrency"]["1"]["tokens_per_s"] > 0
    assert "plugin" not in res["modes"]
    assert "missing" in res["errors"]["plugin"] and "config.json" in res["errors"]["plugin"]


def test_summary_pools_repetitions():
    from dflash_vllm.bench.stats import summarize_mode

    reps = [{"tokens_per_s": 10.0, "tpot_ms": 1.0, "num_drafts": 10, "num_accepted_tokens": 9,
             "accepted_per_pos": [6, 3], "per_position_acceptance": [0.6, 0.3]},
            {"tokens_per_s": 30.0, "tpot_ms": 3.0, "num_drafts": 30, "num_accepted_tokens": 10,
             "accepted_per_pos": [10, 0], "per_position_acceptance": [1 / 3, 0.0]}]
    s = summarize_mode(reps)
    assert s["tau"] == 1 + 19 / 40 and s["tokens_per_s"] == 20.0
    assert s["per_position_acceptance"] == [16 / 40, 3 / 40]
    assert s["acceptance_histogram"] == [24, 13, 3]


def test_baseline_sync_is_plain_decoding_on_the_synchronous_scheduler(tmp_path):
    from dflash_vllm.bench.runner import BenchConfig, engine_spec

    (tmp_path / "config.json").write_text('{"block_size": 8}')
    cfg = BenchConfig(target="t", drafter=str(tmp_path), prompts=["p"], concurrency=[1])
    sync, base, plugin = (engine_spec(cfg, m)["engine"] for m in ("baseline-sync", "baseline", "plugin"))
    assert sync["async_scheduling"] is False and "speculative_config" not in sync
    assert "async_scheduling" not in base and "async_scheduling" not in plugin
    assert plugin["speculative_config"]["num_speculative_tokens"] == 7


def test_malloc_modes_are_their_modes_with_glibcs_thresholds_in_the_engine_environment(tmp_path):
    from dflash_vllm.bench.runner import GLIBC_MALLOC_ENV, BenchConfig, engine_spec

    (tmp_path / "config.json").write_text('{"block_size": 8}')
    cfg = BenchConfig(target="t", drafter=str(tmp_path), prompts=["p"], concurrency=[1])
    for mode in ("baseline", "plugin"):
        plain, tuned = engine_spec(cfg, mode), engine_spec(cfg, mode + "-malloc")
        assert tuned["engine"] == plain["engine"] and tuned["jobs"] == plain["jobs"]
        assert tuned["env"] == {**plain["env"], **GLIBC_MALLOC_ENV}
        assert not set(GLIBC_MALLOC_ENV) & set(plain["env"])
    assert "speculative_config" not in engine_spec(cfg, "baseline-malloc")["engine"]
    assert int(GLIBC_MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]) <= 32 << 20  # glibc's ceiling on 64-bit


def test_soak_error_detail_names_the_transport_error_under_the_clients():
    from dflash_vllm.bench.soak import _cause_chain

    try:
        try:
            raise ConnectionResetError("Server disconnected without sending a response.")
        except ConnectionResetError as inner:
            raise RuntimeError("Connection error.") from inner
    except RuntimeError as err:
        detail = _cause_chain(err)
    assert detail == ("RuntimeError: Connection error. <- "
                      "ConnectionResetError: Server disconnected without sending a response.")


def test_soak_counts_5xx_and_broken_connections_as_server_failures():
    from dflash_vllm.bench.soak import SoakOutcome

    failed = {s: SoakOutcome(0, s).failed for s in ("ok", "cancelled", "http_400", "http_429", "http_500",
                                                   "http_503", "error")}
    assert failed == {"ok": False, "cancelled": False, "http_400": False, "http_429": False, "http_500": True,
                      "http_503": True, "error": True}


def test_trace_file_sink_writes_per_process_lines_read_back_in_time_order(tmp_path, monkeypatch):
    """``DFLASH_VLLM_TRACE``'s sink: nothing is written until there is an event, then
    ``PREFIX.<pid>.jsonl`` in batches and on flush; ``read_events`` merges every process's file
    in time order."""
    from dflash_vllm.bench import trace

    prefix = str(tmp_path / "sub" / "trace")
    sink = trace.FileSink(prefix, batch=2)
    sink.flush()
    assert not (tmp_path / "sub").exists()
    sink({"t": 3.0, "reqs": 1})
    assert not (tmp_path / "sub").exists(), "written in batches"
    sink({"t": 1.0, "reqs": 2})
    other = tmp_path / "sub" / "trace.999999.jsonl"  # another process's file
    other.write_text(json.dumps({"t": 2.0, "reqs": 3}) + "\n")
    sink({"t": 4.0, "reqs": 4})
    sink.flush()
    assert [e["reqs"] for e in trace.read_events(prefix)] == [2, 3, 1, 4]
    monkeypatch.delenv(trace.TRACE_ENV, raising=False)
    assert not trace.install_from_env()


def test_shipped_config_is_the_demo_pair_and_its_eval_prompts(monkeypatch):
    """The diagnostics' default configuration: the shipped pair and its 32 eval prompts; an install
    without the pair gets an error that names the fix."""
    from dflash_vllm.bench import runner
    from dflash_vllm.demo import shipped_pair

    target, drafter = shipped_pair()
    cfg = runner.shipped_config([4])
    assert (cfg.target, cfg.drafter, cfg.concurrency) == (str(target), str(drafter), [4])
    assert len(cfg.prompts) == 32 and all(isinstance(p, str) and p for p in cfg.prompts)
    monkeypatch.setattr("dflash_vllm.demo.shipped_pair", lambda: None)
    with pytest.raises(FileNotFoundError, match="build_demo_pair"):
        runner.shipped_config([1])
