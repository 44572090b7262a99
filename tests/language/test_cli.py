"""``ppl steer`` with the real SmolLM2 (slow: loads the weights): the report, ``--json``, and
``--seed`` reproducibility (same seed, same answers and weights; another seed, other answers)."""

import json
import re

import pytest

from ppl import cli

pytestmark = pytest.mark.slow

COMMAND = ["steer", "Describe the sea to a child in one sentence.", "--max-word-length", "5"]
SMALL = ["--particles", "4", "--max-tokens", "8", "--no-cache"]


def _run(capsys, *flags: str) -> str:
    assert cli.main([*COMMAND, *SMALL, *flags]) == 0
    return capsys.readouterr().out


def test_report_lists_answers_with_weights_and_endings(capsys):
    out = _run(capsys)
    assert "#1  weight" in out and ("ended with EOS" in out or "cut at --max-tokens" in out)
    assert "log Z" in out and "ESS" in out and cli.EXPLANATION in out


def test_same_seed_same_output(capsys):
    first, again, other = (json.loads(_run(capsys, "--json", "--seed", seed)) for seed in ("3", "3", "4"))
    assert first["answers"] and first["answers"] == again["answers"] and first["log_z"] == again["log_z"]
    assert other["answers"] != first["answers"]
    for answer in first["answers"]:  # a word is a run of ASCII letters, as the constraint reads it
        assert all(len(word) <= 5 for word in re.findall("[A-Za-z]+", answer["text"])), answer
