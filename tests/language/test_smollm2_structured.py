"""Structured generation with the real embedded SmolLM2 (slow: loads the weights).

A JSON schema goes through outlines-core's converter to a regex, then through
``constraints.regex`` (our byte-level DFA) into SMC; a small context-free grammar goes
through llguidance's host-side masks (``ppl.models.grammar``). Every returned particle with
non-zero weight must parse.
"""

import ast
import json
import re

import jax
import jsonschema
import pytest
from outlines_core.json_schema import build_regex_from_schema

import ppl
from ppl.inference import smc
from ppl.models import constraints, grammar

pytestmark = pytest.mark.slow

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
ARITHMETIC = r"""start: expr
expr: term (("+" | "-" | "*") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/"""


def test_json_schema_holds_in_every_weighted_particle(model, weighted_texts):
    lm, tokenizer = model
    prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Describe Ada Lovelace as JSON with her name and age."}]
    )
    constraint = constraints.regex(build_regex_from_schema(json.dumps(SCHEMA)), tokenizer)
    program = ppl.Generation(
        lm, prompt, 32, tokenizer.eos_token_id, constraint=constraint, proposal="locally_optimal", require_eos=True
    )
    texts = weighted_texts(tokenizer, smc(program, jax.random.key(0), 8))
    assert texts
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)


def test_context_free_grammar_holds_in_every_weighted_particle(model, weighted_texts):
    lm, tokenizer = model
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Write an arithmetic expression with parentheses."}])
    constraint = grammar.grammar(ARITHMETIC, tokenizer)
    program = ppl.Generation(
        lm, prompt, 16, tokenizer.eos_token_id, constraint=constraint, proposal="locally_optimal", require_eos=True
    )
    texts = weighted_texts(tokenizer, smc(program, jax.random.key(0), 8))
    assert texts and constraint.store.calls > 0
    for text in texts:
        assert re.fullmatch(r"[0-9+\-*() ]+", text) and " " not in text, text
        ast.parse(text, mode="eval")  # balanced parentheses: beyond any regular language
