"""Constraints whose masks are computed lazily on the host by llguidance: context-free grammars,
and regular languages too large for a dense on-device table.

A ``TokenDFA`` precomputes every state's mask; a context-free grammar has unboundedly many
parser states, so here the state of a particle is an *id* into a host-side store of
llguidance matchers, and ``mask`` / ``advance`` are ``jax.pure_callback``s: one host call per
step for the whole particle batch (``vmap_method="broadcast_all"``, as ``ppl.rewards``' host
potentials). The store is append-only and memoised — advancing state ``s`` by token ``v``
always gives the same id, and each id's mask is computed once — so resampled duplicates
share work and the callbacks are pure, as JAX assumes.

The same rules as ``TokenDFA``: EOS is allowed exactly in accepting states and keeps the
state; special tokens are never allowed; a forbidden token gives the dead state ``-1``.
llguidance's masks only allow tokens after which the grammar can still be completed, so a
particle is never stranded.

    >>> arithmetic = grammar(r'''start: expr
    ... expr: term (("+" | "-") term)*
    ... term: NUMBER | "(" expr ")"
    ... NUMBER: /[0-9]{1,3}/''', tokenizer)                                 # doctest: +SKIP
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from ppl.lm import Tokenizer, check_vocab_size

DEAD = -1


class _Encoder:
    """What llguidance's ``TokenizerWrapper`` reads from a tokenizer (special tokens get an
    ``0xFF``-prefixed spelling, llguidance's convention, so no text can produce them)."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.tokens = [data or b"\xff<special_%d>" % token for token, data in enumerate(tokenizer.vocab_bytes)]
        self.special_token_ids = [token for token, data in enumerate(tokenizer.vocab_bytes) if not data]

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


class MatcherStore:
    """Host side: matcher ``i`` is the parser after the tokens that led to state ``i``.

    ``calls`` counts host calls (one per batched ``mask`` or ``advance``); ``len(store)`` is
    the number of distinct parser states created.
    """

    def __init__(self, root: LLMatcher, vocab_size: int, eos_token_id: int):
        self.matchers = [root]
        self.children: dict[tuple[int, int], int] = {}
        self.masks: dict[int, np.ndarray] = {}
        self.vocab_size, self.eos_token_id = vocab_size, eos_token_id
        self.calls = 0

    def __len__(self) -> int:
        return len(self.matchers)

    def mask(self, state: int) -> np.ndarray:
        if state < 0:
            return np.zeros(self.vocab_size, bool)
        if state not in self.masks:
            matcher = self.matchers[state]
            bits = np.unpackbits(np.frombuffer(matcher.compute_bitmask(), np.uint8), bitorder="little")
            allowed = bits[: self.vocab_size].astype(bool)
            allowed[self.eos_token_id] = matcher.is_accepting()
            self.masks[state] = allowed
        return self.masks[state]

    def advance(self, state: int, token: int) -> int:
        if state < 0:
            return DEAD
        if token == self.eos_token_id:
            return state if self.matchers[state].is_accepting() else DEAD
        if (state, token) not in self.children:
            child = self.matchers[state].deep_copy()
            if child.consume_token(token) and not child.is_error():
                self.matchers.append(child)
                self.children[state, token] = len(self.matchers) - 1
            else:
                self.children[state, token] = DEAD
        return self.children[state, token]

    def batch_masks(self, states: np.ndarray) -> np.ndarray:
        self.calls += 1
        flat = np.asarray(states).reshape(-1)
        return np.stack([self.mask(int(s)) for s in flat]).reshape(*np.shape(states), self.vocab_size)

    def batch_advance(self, states: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        self.calls += 1
        flat = zip(np.asarray(states).reshape(-1).tolist(), np.asarray(tokens).reshape(-1).tolist())
        return np.array([self.advance(s, t) for s, t in flat], np.int32).reshape(np.shape(states))


class HostConstraint(eqx.Module):
    """A token constraint (``ppl.lm.TokenConstraint``) backed by a :class:`MatcherStore`.

    Methods take one scalar ``int32`` state; ``vmap`` them over particles and each becomes
    one host call for the whole batch.
    """

    store: MatcherStore = eqx.field(static=True)
    initial: int = eqx.field(static=True)
    vocab_size: int = eqx.field(static=True)
    eos_token_id: int = eqx.field(static=True)

    def check_vocab(self, vocab_size: int) -> None:
        """``ValueError`` if the model's vocabulary is not the one this constraint was built for."""
        check_vocab_size(self.vocab_size, vocab_size)

    def mask(self, state: Int[ArrayLike, ""]) -> Bool[Array, " V"]:
        """Allowed next tokens of each state, computed on the host by llguidance (batched callback)."""
        state = jnp.asarray(state, jnp.int32)
        result = jax.ShapeDtypeStruct((*state.shape, self.vocab_size), jnp.bool_)
        return jax.pure_callback(self.store.batch_masks, result, state, vmap_method="broadcast_all")

    def advance(self, state: Int[ArrayLike, ""], token: Int[ArrayLike, ""]) -> Int[Array, ""]:
        """The state after ``token`` (an id into the host store of matchers; negative is dead)."""
        state, token = jnp.asarray(state, jnp.int32), jnp.asarray(token, jnp.int32)
        result = jax.ShapeDtypeStruct(jnp.broadcast_shapes(state.shape, token.shape), jnp.int32)
        return jax.pure_callback(self.store.batch_advance, result, state, token, vmap_method="broadcast_all")

    def is_accepting(self, state: Int[ArrayLike, ""]) -> Bool[Array, ""]:
        """Whether the text so far is complete: EOS is allowed."""
        return self.mask(state)[..., self.eos_token_id]

    def is_dead(self, state: Int[ArrayLike, ""]) -> Bool[Array, ""]:
        """Whether no continuation can satisfy the grammar any more."""
        return jnp.asarray(state) < 0


def _constraint(grammar_text: str, tokenizer: Tokenizer, what: str) -> HostConstraint:
    ll_tokenizer = LLTokenizer(TokenizerWrapper(_Encoder(tokenizer)), n_vocab=len(tokenizer.vocab_bytes))
    root = LLMatcher(ll_tokenizer, grammar_text, log_level=0)
    if root.is_error():
        raise ValueError(f"{what} cannot be compiled by llguidance: {root.get_error()}")
    store = MatcherStore(root, len(tokenizer.vocab_bytes), tokenizer.eos_token_id)
    if not store.mask(0).any():
        raise ValueError(f"{what} accepts no token sequence of this vocabulary")
    return HostConstraint(store, 0, len(tokenizer.vocab_bytes), tokenizer.eos_token_id)


def grammar(lark: str, tokenizer: Tokenizer) -> HostConstraint:
    """Token sequences whose text is in the language of the Lark grammar ``lark`` (llguidance's
    dialect: rules, ``/regex/`` terminals, ``start`` as the start symbol)."""
    return _constraint(LLMatcher.grammar_from_lark(lark), tokenizer, "the grammar")


def lazy_regex(pattern: str, tokenizer: Tokenizer) -> HostConstraint:
    """``constraints.regex`` with masks computed on the host: for patterns whose DFA is too large
    for a table (llguidance's regex dialect, which is Rust's ``regex``, not Python's ``re``)."""
    return _constraint(LLMatcher.grammar_from_regex(pattern), tokenizer, f"regex {pattern!r}")
