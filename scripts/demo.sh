#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the demo: offline generation through dflash-vllm next to plain
# decoding, printing texts, mean acceptance length and the speed ratio. Arguments go to the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/dflash-vllm demo "$@"
