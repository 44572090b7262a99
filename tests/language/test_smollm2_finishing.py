"""Generation that finishes, on the real SmolLM2 (slow: loads the weights)."""

import re

import jax
import numpy as np
import pytest

import ppl
from ppl import cli
from ppl.inference import smc
from ppl.models import constraints

pytestmark = pytest.mark.slow


def test_words_with_no_length_cap_do_not_end_all_dead_in_48_tokens(model):
    """Eight words of ``[A-Za-z']+`` (no cap on a word's length) and a period, EOS within 48
    tokens: before budget masks, particles kept extending a word and all died at the last
    slot. Now every particle finishes, and every one matches."""
    lm, tokenizer = model
    pattern = r"[A-Za-z']+( [A-Za-z']+){7}\."
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Write one sentence of exactly eight words about the sea."}]
    )
    program = ppl.Generation(
        lm,
        prompt,
        48,
        tokenizer.eos_token_id,
        constraint=constraints.regex(pattern, tokenizer),
        proposal="locally_optimal",
        require_eos=True,
    )
    result = smc(program, jax.random.key(0), 8)
    assert not bool(result.all_dead) and np.all(np.isfinite(np.asarray(result.log_weights)))
    assert all(re.fullmatch(pattern, text) for text in result.sample(jax.random.key(1), 8, tokenizer))


def test_steer_says_in_one_line_why_there_is_no_answer(capsys):
    """A budget too short for the constraint: refused before compiling, naming the fix; a run
    in which every particle dies (prior proposal, digits the LM will not write): the same one
    line on stderr and exit status 1, no particles printed."""
    assert cli.main(["steer", "Hi", "--regex", "[0-9]{40}", "--max-tokens", "8"]) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "raise --max-tokens to at least" in message, message
    assert (
        cli.main(
            [
                "steer",
                "Write a poem.",
                "--regex",
                "[0-9]{5}",
                "--max-tokens",
                "8",
                "--particles",
                "2",
                "--proposal",
                "prior",
            ]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "all 2 particles violated the constraints" in captured.err.strip().splitlines()[-1]
    assert "#1  weight" not in captured.out
