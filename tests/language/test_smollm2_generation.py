"""Constrained generation with the real embedded SmolLM2 (slow: loads the weights)."""

import re

import jax
import pytest

import ppl
from ppl.inference import smc
from ppl.models import constraints

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("proposal", ["locally_optimal", "prior"])
def test_lipogram_holds_in_every_weighted_particle(model, proposal, weighted_texts):
    lm, tokenizer = model
    prompt = tokenizer.encode("Write a short story about a cat.\n\nOnce upon a time,")
    program = ppl.Generation(
        lm, prompt, 12, tokenizer.eos_token_id, constraint=constraints.lipogram("e", tokenizer), proposal=proposal
    )
    result = smc(program, jax.random.key(0), 16)
    texts = weighted_texts(tokenizer, result)
    assert texts and all("e" not in text.lower() for text in texts), texts


def test_regex_holds_in_every_weighted_particle(model, weighted_texts):
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
    texts = weighted_texts(tokenizer, result)
    assert texts and all(re.fullmatch(pattern, text) for text in texts), texts
