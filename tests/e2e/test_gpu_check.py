"""benchmarks/gpu_check.py on a CPU: runs what it can (bf16 structured vs dense, a bf16 step) and says
what it skipped, so the script a GPU lease runs once is known to work before the lease."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_and_names_what_it_skipped(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["paths"]["ok"] and report["paths"]["paths"] == "structured vs dense"
    assert report["steps"] and report["steps"][0]["median_step_s"] > 0
    skipped = " ".join(report["skipped"])
    assert "FlexAttention" in skipped and "CUDA vLLM (no CUDA)" in skipped
