#!/usr/bin/env bash
# The benchmark behind the README's table: demo pair, T=0, concurrency 1,4,16,64; modes baseline,
# builtin, plugin-fixed (adaptive off) and plugin (adaptive, the default).
# Arguments go to `dflash-vllm bench` (e.g. --target/--drafter/--prompts for a GPU server).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
mkdir -p docs/benchmarks
exec .venv/bin/dflash-vllm bench --json docs/benchmarks/bench_cpu.json --plot docs/benchmarks/bench_cpu.png \
    --log-dir runs/bench-logs "$@"
