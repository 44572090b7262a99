"""Benchmark scripts that must keep running unchanged: ``benchmarks/gpu.py`` is the script a
machine with an NVIDIA GPU runs as is, so CI runs its ``--tiny`` form on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_gpu_script_runs_tiny_on_the_cpu():
    """``gpu.py --tiny --particles 16``: constrained SMC and plain sampling each print their
    tokens/s, compile time and memory as positive ``RESULT`` figures."""
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--particles", "16"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = dict(
        line.removeprefix("RESULT ").split("=") for line in done.stdout.splitlines() if line.startswith("RESULT ")
    )
    for kind in ("smc", "plain"):
        for figure in ("tokens_per_s", "compile_s", "memory_gib"):
            assert float(results[f"{kind}_n16_{figure}"]) >= 0, results
        assert float(results[f"{kind}_n16_tokens_per_s"]) > 0
    assert "weights bfloat16" in done.stdout
