"""``ppl scale``: bad input is a clear message before any model is loaded; a real run with
SmolLM2 (heavy: compiles the chunked program) prints the answer, the particles' steps and
weights; ``benchmarks/scaling.py --tiny`` ends with its RESULT lines (heavy)."""

import subprocess
import sys
from pathlib import Path

import pytest

from ppl import cli


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--budget", "0"], "--budget must be at least 1 particle, got 0"),
        (["--problems", "0"], "--problems >= 1"),
        (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    ],
)
def test_bad_input_is_a_clear_message(flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["scale", *flags])


@pytest.mark.slow
@pytest.mark.heavy
def test_scale_prints_answer_steps_and_weights(capsys):
    assert cli.main(["scale", "--task-seed", "3", "--budget", "2", "--max-new-tokens", "40", "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert "problem 0:" in out and "answer:" in out and "(reference" in out
    assert "particle" in out and "weight" in out and ("    + " in out or "    - " in out)


@pytest.mark.slow
@pytest.mark.heavy
def test_scale_names_a_prompt_longer_than_the_buffer():
    with pytest.raises(SystemExit, match="longer than the buffer max_len=64"):
        cli.main(["scale", "--max-len", "64"])


@pytest.mark.slow
@pytest.mark.heavy
def test_tiny_scaling_benchmark_prints_its_results():
    script = Path(__file__).parents[2] / "benchmarks" / "scaling.py"
    out = subprocess.run([sys.executable, str(script), "--tiny"], capture_output=True, text=True, check=True).stdout
    lines = out.strip().splitlines()
    assert lines[-3].startswith("RESULT pf_minus_bon_at_32=") and lines[-1].startswith(
        "RESULT pf_over_bon_budget_ratio="
    )
