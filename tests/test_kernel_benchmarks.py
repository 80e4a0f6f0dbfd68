"""The kernel benchmark scripts run (``--smoke``: CPU, Triton's interpreter, tiny shapes), check their
kernel against the reference and append their rows to the CSV, so the GPU run is one command that works."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "kernels" / "benchmarks"


@pytest.mark.parametrize("name", ["draft_select", "block_inputs", "context_kv"])
def test_benchmark_script_smoke(name, tmp_path):
    out = tmp_path / "results.csv"
    proc = subprocess.run([sys.executable, str(BENCH / f"bench_{name}.py"), "--smoke", "--csv", str(out)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = list(csv.DictReader(out.open()))
    assert {r["impl"] for r in rows} == {"ref", "triton"}
    assert all(r["kernel"].startswith(name) and float(r["median_ms"]) > 0 for r in rows)
    assert {"device", "torch", "triton", "commit"} <= set(rows[0])
