"""Token-level DFA constraints on SmolLM2's real vocabulary (49152 tokens).

The reference throughout is plain numpy reading the compiled table: regex constraints are
checked against Python's ``re`` on random walks and on real tokenizations; vocabulary rules
are checked exhaustively, token by token; the JAX methods are checked against numpy.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl.models import constraints
from ppl.models.constraints import TokenDFA
from ppl.models.tokenizer import Tokenizer

# name: (pattern, texts that match it, texts that don't)
PATTERNS = {
    "date": (
        r"\d{4}-\d{2}-\d{2}",
        ["2024-01-15", "1999-12-31", "٢٠٢٤-٠١-١٥"],  # \d is Unicode-aware, as in `re`
        ["2024-1-15", "2024-01-15 ", "24-01-15", "2024/01/15"],
    ),
    "phone": (
        r"\(\d{3}\) \d{3}-\d{4}",
        ["(555) 123-4567", "(212) 000-9999"],
        ["555-123-4567", "(555) 1234567", "(555)  123-4567"],
    ),
    "json": (
        r'\{"name": "[a-z]{1,10}", "age": \d{1,2}\}',
        ['{"name": "ada", "age": 36}', '{"name": "abcdefghij", "age": 7}'],
        [
            '{"name": "Ada", "age": 36}',
            '{"name": "ada", "age": 365}',
            '{"name": "", "age": 3}',
            '{"name": "abcdefghijk", "age": 1}',
        ],
    ),
    # A repeated group holding a space: outlines-core 0.2.14 (the route before) rejected "fig, fig".
    "fruits": (
        r"(apple|fig|grape)(, (apple|fig|grape)){0,2}",
        ["fig", "fig, fig", "apple, grape, fig"],
        ["fig, fig, fig, fig", "fig,fig", "fig, "],
    ),
}


@pytest.fixture(scope="module")
def tok(smollm2_file) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_file)


@pytest.fixture(scope="module")
def regexes(tok) -> dict[str, TokenDFA]:
    return {name: constraints.regex(pattern, tok) for name, (pattern, _, _) in PATTERNS.items()}


class Reference:
    """A TokenDFA read with numpy: the semantics the JAX methods must reproduce."""

    def __init__(self, dfa: TokenDFA):
        self.transitions = np.asarray(dfa.transitions)
        self.token_class = np.asarray(dfa.token_class)
        self.accepting = np.asarray(dfa.accepting)
        self.eos = dfa.eos_token_id

    def mask(self, state: int) -> np.ndarray:
        if state < 0:
            return np.zeros(len(self.token_class), bool)
        allowed = self.transitions[state][self.token_class] >= 0
        allowed[self.eos] = self.accepting[state]
        return allowed

    def advance(self, state: int, token: int) -> int:
        if state < 0:
            return -1
        if token == self.eos:
            return state if self.accepting[state] else -1
        return int(self.transitions[state, self.token_class[token]])


def fullmatch(pattern: str, text: str) -> bool:
    return re.fullmatch(pattern, text) is not None


def random_walks(dfa: TokenDFA, n: int, seed: int, p_stop: float = 0.3) -> list[list[int]]:
    """``n`` token sequences: uniform among allowed tokens, stopping (when EOS is allowed) w.p. ``p_stop``."""
    rng, ref = np.random.default_rng(seed), Reference(dfa)
    walks = []
    for _ in range(n):
        state, ids = dfa.initial, []
        while True:
            allowed = ref.mask(state)
            assert allowed.any(), "trimmed DFAs never strand a particle"
            if allowed[ref.eos] and (allowed.sum() == 1 or rng.random() < p_stop):
                break
            allowed[ref.eos] = False
            token = int(rng.choice(np.flatnonzero(allowed)))
            ids.append(token)
            state = ref.advance(state, token)
        walks.append(ids)
    return walks


_advance = jax.jit(lambda dfa, state, token: dfa.advance(state, token))


def run(dfa: TokenDFA, ids: list[int]) -> int:
    """The state after ``ids``, advanced with the jitted JAX method."""
    state = jnp.int32(dfa.initial)
    for token in ids:
        state = _advance(dfa, state, token)
    return int(state)


def accepts(dfa: TokenDFA, ids: list[int]) -> bool:
    return bool(dfa.is_accepting(run(dfa, ids)))


# --- regex -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_regex_random_walks_match(name, regexes, tok):
    pattern = PATTERNS[name][0]
    walks = random_walks(regexes[name], n=200, seed=0)
    for ids in walks:
        text = tok.decode(ids)
        assert fullmatch(pattern, text), (text, ids)
    assert len({tuple(ids) for ids in walks}) > 150  # the walks explore, they don't repeat one path


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_regex_accepts_tokenized_matches_and_rejects_others(name, regexes, tok):
    pattern, matching, other = PATTERNS[name]
    dfa = regexes[name]
    for text in matching:
        assert re.fullmatch(pattern, text)
        ids = tok.encode(text, add_special_tokens=False)
        assert accepts(dfa, ids), text
        assert run(dfa, [*ids, tok.eos_token_id]) == run(dfa, ids)  # EOS keeps an accepting state
    for text in other:
        assert not re.fullmatch(pattern, text)
        assert not accepts(dfa, tok.encode(text, add_special_tokens=False)), text
    assert run(dfa, [tok.eos_token_id]) == -1  # EOS before the text is complete is forbidden


def test_regex_table_is_small_and_never_strands(regexes, tok):
    for dfa in regexes.values():
        n_states, n_classes = dfa.transitions.shape
        assert dfa.vocab_size == tok.vocab_size and n_classes < 200
        transitions = np.asarray(dfa.transitions)
        assert ((transitions >= 0).any(axis=1) | np.asarray(dfa.accepting)).all()
        assert np.unique(transitions, axis=1).shape[1] == n_classes  # classes are distinct columns


def test_regex_matching_nothing_is_an_error(tok):
    with pytest.raises(ValueError, match="accepts no token sequence"):
        constraints.regex(r"[^\s\S]", tok)
    # An impossible branch is just a branch that never matches (outlines-core refused the pattern).
    dfa = constraints.regex(r"a[^\s\S]|b", tok)
    assert accepts(dfa, tok.encode("b")) and not accepts(dfa, tok.encode("a"))


def test_special_tokens_never_allowed_eos_only_when_accepting(regexes, tok):
    dfa = regexes["date"]
    others = sorted(tok.special_ids - {tok.eos_token_id})
    assert others
    final = run(dfa, tok.encode("2024-01-15"))
    for state in (dfa.initial, final):
        mask = np.asarray(dfa.mask(state))
        assert not mask[others].any()
        assert mask[tok.eos_token_id] == (state == final)


# --- JAX semantics -----------------------------------------------------------------------------


def test_mask_and_advance_jit_vmap_match_numpy(regexes, tok):
    dfa, ref = regexes["json"], Reference(regexes["json"])
    n_states = dfa.transitions.shape[0]
    states = np.arange(-1, n_states, dtype=np.int32)  # every state, and the dead one
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, tok.vocab_size, size=states.shape).astype(np.int32)
    tokens[::7] = tok.eos_token_id
    tokens[1::7] = sorted(tok.special_ids)[0]
    # Half the tokens are allowed ones, or nearly every advance would just be -1.
    for i in range(0, len(states), 2):
        allowed = np.flatnonzero(ref.mask(states[i]))
        if len(allowed):
            tokens[i] = rng.choice(allowed)

    # The DFA is an argument, not a closed-over constant: it is a pytree like any other state.
    masks = jax.jit(jax.vmap(TokenDFA.mask, in_axes=(None, 0)))(dfa, states)
    nexts = jax.jit(jax.vmap(TokenDFA.advance, in_axes=(None, 0, 0)))(dfa, states, tokens)
    np.testing.assert_array_equal(np.asarray(masks), np.stack([ref.mask(s) for s in states]))
    np.testing.assert_array_equal(np.asarray(nexts), [ref.advance(s, t) for s, t in zip(states, tokens)])
    assert (np.asarray(nexts) >= 0).sum() > len(states) // 3
    np.testing.assert_array_equal(np.asarray(jax.vmap(dfa.is_dead)(states)), states < 0)
    np.testing.assert_array_equal(
        np.asarray(jax.vmap(dfa.is_accepting)(states)), [s >= 0 and ref.accepting[s] for s in states]
    )


def test_check_vocab(regexes):
    dfa = regexes["date"]
    dfa.check_vocab(49152)
    with pytest.raises(ValueError, match=r"49152 tokens, but the model has 50000"):
        dfa.check_vocab(50000)


# --- vocabulary rules --------------------------------------------------------------------------


def test_lipogram_exhaustive(tok):
    dfa = constraints.lipogram("e", tok)
    assert dfa.transitions.shape[0] == 1
    expected = np.array([bool(data) and b"e" not in data.lower() for data in tok.vocab_bytes])
    expected[tok.eos_token_id] = True
    np.testing.assert_array_equal(np.asarray(dfa.mask(0)), expected)

    assert accepts(dfa, tok.encode("A lipogram avoids that symbol; its authors must find a way around it."))
    assert run(dfa, tok.encode("The letter E is forbidden here.")) == -1
    assert run(dfa, tok.encode("No capital E allowed")) == -1


def test_lipogram_refuses_non_ascii(tok):
    with pytest.raises(ValueError, match="ASCII letters"):
        constraints.lipogram("é", tok)


def _word_transitions(data: bytes, k: int) -> np.ndarray:
    """Oracle: the next run length after ``data`` from each run length 0..k (-1 if a word exceeds k)."""
    runs = [len(run) for run in re.findall(rb"[A-Za-z]+", data)]
    if data and len(data) == sum(runs) == (runs[0] if runs else 0):  # all letters: the run goes on
        nxt = np.arange(k + 1) + len(data)
        return np.where(nxt <= k, nxt, -1)
    lead = len(re.match(rb"[A-Za-z]*", data)[0])
    trail = len(re.search(rb"[A-Za-z]*\Z", data)[0])
    ok = (np.arange(k + 1) + lead <= k) & (max(runs, default=0) <= k)
    return np.where(ok, trail, -1)


def test_max_word_length_exhaustive(tok):
    k = 5
    dfa = constraints.max_word_length(k, tok)
    assert dfa.transitions.shape[0] == k + 1 and bool(np.asarray(dfa.accepting).all())
    full = np.asarray(dfa.transitions)[:, np.asarray(dfa.token_class)]
    never = np.array([not data for data in tok.vocab_bytes])
    never[tok.eos_token_id] = True
    expected = np.stack(
        [np.full(k + 1, -1) if skip else _word_transitions(data, k) for data, skip in zip(tok.vocab_bytes, never)],
        axis=1,
    )
    # The builder numbers states its own way; name them as run lengths by reading letters.
    state_of = np.array([run(dfa, tok.encode("a" * n, add_special_tokens=False)) for n in range(k + 1)])
    assert sorted(state_of) == list(range(k + 1))
    np.testing.assert_array_equal(full[state_of], np.where(expected >= 0, state_of[expected], -1))

    assert accepts(dfa, tok.encode("The cat sat on a mat, didn't it? Yes: 12345678 times."))
    assert not accepts(dfa, tok.encode("An extraordinary sentence"))
    assert not accepts(dfa, tok.encode("Short words then Internationalization"))


def test_token_length_and_vocabulary_predicate(tok):
    dfa = constraints.token_length(2, tok)
    mask = np.asarray(dfa.mask(0))
    for token, data in enumerate(tok.vocab_bytes):
        if data and token != tok.eos_token_id:
            try:
                assert mask[token] == (len(data.decode("utf-8")) <= 2), data
            except UnicodeDecodeError:
                pass  # part of a character: length counts the characters it starts

    digits = constraints.vocabulary_predicate(bytes.isdigit, tok)
    expected = np.array([data.isdigit() for data in tok.vocab_bytes])
    expected[tok.eos_token_id] = True
    np.testing.assert_array_equal(np.asarray(digits.mask(0)), expected)


# --- intersection ------------------------------------------------------------------------------


def test_intersect_random_walks(tok):
    pattern = r"[a-z]{1,8}( [a-z]{1,8}){0,3}"
    a, b = constraints.regex(pattern, tok), constraints.lipogram("e", tok)
    both = constraints.intersect(a, b)
    ref, ref_a, ref_b = Reference(both), Reference(a), Reference(b)
    for ids in random_walks(both, n=200, seed=2):
        text = tok.decode(ids)
        assert re.fullmatch(pattern, text) and "e" not in text, text
        state, state_a, state_b = both.initial, a.initial, b.initial
        for token in [*ids, tok.eos_token_id]:
            np.testing.assert_array_equal(ref.mask(state), ref_a.mask(state_a) & ref_b.mask(state_b))
            state, state_a, state_b = (
                ref.advance(state, token),
                ref_a.advance(state_a, token),
                ref_b.advance(state_b, token),
            )
        assert state >= 0

    ids = tok.encode("big cat", add_special_tokens=False)
    assert accepts(both, ids) and not accepts(both, tok.encode("the cat", add_special_tokens=False))


def test_intersect_empty_is_an_error(tok):
    with pytest.raises(ValueError, match="accepts no token sequence"):
        constraints.intersect(constraints.regex("hello", tok), constraints.lipogram("e", tok))
