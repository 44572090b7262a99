"""Constrained generation with the real embedded SmolLM2 (slow: loads the weights)."""

import re

import jax
import numpy as np
import pytest

import ppl
from ppl.inference import smc
from ppl.models import constraints, smollm2

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return smollm2()


def _texts(tokenizer, result):
    weights = np.asarray(result.weights)
    rows = zip(np.asarray(result.particles.tokens), np.asarray(result.particles.length), weights)
    return [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n, w in rows if w > 0]


@pytest.mark.parametrize("proposal", ["locally_optimal", "prior"])
def test_lipogram_holds_in_every_weighted_particle(model, proposal):
    lm, tokenizer = model
    prompt = tokenizer.encode("Write a short story about a cat.\n\nOnce upon a time,")
    program = ppl.Generation(
        lm, prompt, 12, tokenizer.eos_token_id, constraint=constraints.lipogram("e", tokenizer), proposal=proposal
    )
    result = smc(program, jax.random.key(0), 16)
    texts = _texts(tokenizer, result)
    assert texts and all("e" not in text.lower() for text in texts), texts


def test_regex_holds_in_every_weighted_particle(model):
    lm, tokenizer = model
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "When was the Eiffel Tower finished? Answer with a date."}]
    )
    pattern = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    program = ppl.Generation(
        lm,
        prompt,
        12,
        tokenizer.eos_token_id,
        constraint=constraints.regex(pattern, tokenizer),
        proposal="locally_optimal",
        require_eos=True,
    )
    result = smc(program, jax.random.key(0), 8)
    texts = _texts(tokenizer, result)
    assert texts and all(re.fullmatch(pattern, text) for text in texts), texts
