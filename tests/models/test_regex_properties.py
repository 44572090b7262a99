"""Property-based checks of ``constraints.regex`` against Python's ``re`` (hypothesis).

Random patterns over a small alphabet (literals, classes, negated classes, ``.``, ``\\w``,
alternation, groups, every quantifier form) are compiled for a synthetic vocabulary of
multi-character tokens, single characters, and the two bytes of ``é`` as tokens of their
own, so any string is encodable and a token may end inside a character. Three properties:

- ``re`` agreement: random strings, cut into random tokenizations, are accepted exactly when
  ``re.fullmatch`` matches, and random walks of the token DFA only spell matching strings;
- no dead ends: every token a mask allows leads to a state from which some token (or EOS)
  is allowed, so a sampler can never be stranded;
- advance agrees with the byte-level DFA: each token state stands for one byte state, and a
  token leads where its bytes lead.

The profile is derandomized and bounded (``EXAMPLES`` each), so CI runs the same cases every time.
"""

from __future__ import annotations

import random
import re
from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl.models import constraints
from ppl.models.regex_dfa import compile_regex

ALPHABET = "abcé"
VOCAB = [
    b"",
    b"a",
    b"b",
    b"c",
    "é".encode(),
    b"\xc3",
    b"\xa9",
    b"ab",
    b"ba",
    b"abc",
    b"cc",
    "aé".encode(),
    "éa".encode(),
    b"bb",
]
EOS = 0
TOKENIZER = SimpleNamespace(vocab_bytes=VOCAB, eos_token_id=EOS, vocab_size=len(VOCAB))
EXAMPLES = 100
PROFILE = settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None)

_LEAVES = ["a", "b", "c", "é", ".", "[ab]", "[^a]", "[a-c]", "[^\\sé]", "\\w", "\\W", "(?:)", "[éc]"]
_QUANTIFIERS = ["*", "+", "?", "{2}", "{0,2}", "{1,}", "{,3}", "*?", "{1,2}?"]


def _extend(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    pairs = st.tuples(inner, inner)
    return st.one_of(
        pairs.map("".join),
        pairs.map(lambda p: f"(?:{p[0]}|{p[1]})"),
        st.tuples(inner, st.sampled_from(_QUANTIFIERS)).map(lambda p: f"({p[0]}){p[1]}"),
    )


PATTERNS = st.recursive(st.sampled_from(_LEAVES), _extend, max_leaves=8)
TEXTS = st.lists(st.text(alphabet=ALPHABET, max_size=8), min_size=1, max_size=25)


def _tokenize(text: str, rng: random.Random) -> list[int]:
    """A random segmentation of ``text``'s bytes into tokens (single bytes always exist)."""
    data, ids = text.encode(), []
    while data:
        fits = [i for i, token in enumerate(VOCAB) if token and data.startswith(token)]
        ids.append(rng.choice(fits))
        data = data[len(VOCAB[ids[-1]]) :]
    return ids


def _tables(dfa) -> tuple[np.ndarray, np.ndarray]:
    """``[S, V]`` next states (EOS column dead) and accepting flags, in numpy."""
    table = np.asarray(dfa.transitions)[:, np.asarray(dfa.token_class)]
    return table, np.asarray(dfa.accepting)


def _compile(pattern: str):
    """The token DFA, or ``None`` when nothing spellable matches (``re`` must agree: checked by the caller)."""
    try:
        return constraints.regex(pattern, TOKENIZER)
    except ValueError as error:
        assert "accepts no token sequence" in str(error), error
        return None


@PROFILE
@given(PATTERNS, TEXTS, st.integers(0, 2**32 - 1))
def test_regex_agrees_with_re_fullmatch(pattern, texts, seed):
    dfa, rng = _compile(pattern), random.Random(seed)
    if dfa is None:
        assert not any(re.fullmatch(pattern, text) for text in texts)
        return
    table, accepting = _tables(dfa)
    for text in texts:
        state = dfa.initial
        for token in _tokenize(text, rng):
            state = table[state, token] if state >= 0 else -1
        assert (state >= 0 and accepting[state]) == (re.fullmatch(pattern, text) is not None), (pattern, text)
    for _ in range(10):  # walks of the token DFA spell only matching text
        state, spelled = dfa.initial, b""
        while not (accepting[state] and rng.random() < 0.3):
            allowed = np.flatnonzero(table[state] >= 0)
            if not len(allowed):
                break
            token = rng.choice(allowed.tolist())
            spelled, state = spelled + VOCAB[token], table[state, token]
        assert accepting[state] and re.fullmatch(pattern, spelled.decode()), (pattern, spelled)


@PROFILE
@given(PATTERNS)
def test_masks_never_allow_a_dead_end_and_advance_matches_the_byte_dfa(pattern):
    dfa = _compile(pattern)
    if dfa is None:
        return
    table, accepting = _tables(dfa)
    live = (table >= 0).any(axis=1) | accepting
    assert live.all() and live[table[table >= 0]].all(), pattern
    assert not (table[:, EOS] >= 0).any()  # EOS is never read; it is allowed exactly where accepting

    byte_dfa = compile_regex(pattern)

    def read(state: int, data: bytes) -> int:
        for byte in data:
            state = byte_dfa.table[state, byte] if state >= 0 else -1
        return state

    byte_state = {dfa.initial: byte_dfa.initial}  # each token state stands for one byte state
    order = [dfa.initial]
    for state in order:  # ``order`` grows while it is walked: a breadth-first search
        for token in range(1, len(VOCAB)):
            nxt, after = int(table[state, token]), read(byte_state[state], VOCAB[token])
            if nxt >= 0:
                if nxt not in byte_state:
                    byte_state[nxt] = after
                    order.append(nxt)
                assert after >= 0 and byte_state[nxt] == after, (pattern, state, token)
                assert accepting[nxt] == byte_dfa.accepting[after]
    assert len(byte_state) == len(accepting)  # every token state was reached
