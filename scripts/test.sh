#!/usr/bin/env bash
# Set up (scripts/setup.sh), then run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check dflash_vllm kernels tests scripts
exec .venv/bin/python -m pytest -q -ra "$@"
