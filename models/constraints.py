"""Hard token-level constraints as compressed DFA tables that live on device.

A constraint is a deterministic automaton read one *token* at a time. It is compiled once, on
the host, into three arrays, so that inside ``jit``/``vmap`` masking and advancing a particle
are two gathers:

- ``token_class[v]`` — tokens that behave identically in every state share a class. A
  vocabulary has ~50k tokens but a constraint usually tells apart only a handful of kinds
  (digits / everything else; tokens with an ``e`` / without), so the table is ``[S, C]`` with
  ``C`` in the tens or hundreds rather than ``[S, V]``;
- ``transitions[s, c]`` — the next state after a token of class ``c`` in state ``s``, ``-1``
  when the token is forbidden (the dead state);
- ``accepting[s]`` — whether the text read so far is complete, i.e. whether EOS may come next.

**EOS is not read, it tests**: EOS is allowed exactly in accepting states and leaves the state
unchanged. Other special tokens (``b""`` in ``vocab_bytes``: ``<|im_start|>``, ...) are never
allowed, so a constraint can't be escaped through markup.

Every builder *trims* the automaton: it keeps only the states reachable from the start that
can still reach an accepting state. So a particle that samples from ``mask(state)`` never gets
stuck — some token (possibly EOS) is always allowed — and a constraint that accepts nothing is
an error at build time, not a silent zero at run time.

    >>> date = regex(r"\\d{4}-\\d{2}-\\d{2}", tokenizer)               # doctest: +SKIP
    >>> both = intersect(date, vocabulary_predicate(lambda b: b != b"0", tokenizer))  # doctest: +SKIP
    >>> logits = jnp.where(jax.vmap(both.mask)(states), logits, -jnp.inf)  # doctest: +SKIP
    >>> states = jax.vmap(both.advance)(states, tokens)                  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from functools import lru_cache
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from ppl.lm import Tokenizer, check_vocab_size
from ppl.models.regex_dfa import Limits, compile_regex, first_of_each, group_rows

DEAD = -1
"""The state of a particle that produced a forbidden token; it stays dead."""

UNREACHABLE = 2**30
"""The distance to acceptance of a forbidden token or a dead state: more than any budget."""


class TokenDFA(eqx.Module):
    """A token-level DFA; see the module docstring for the table layout and EOS rule.

    Methods take one scalar ``int32`` state (``vmap`` them over particles) and are pure JAX.
    ``initial`` and ``eos_token_id`` are static: they are Python ints fixed at build time.
    """

    token_class: Int[Array, " V"]
    transitions: Int[Array, "S C"]
    accepting: Bool[Array, " S"]
    initial: int = eqx.field(static=True)
    eos_token_id: int = eqx.field(static=True)
    steps_to_accept: Int[Array, " S"] = None  # type: ignore[assignment]  # computed from the table

    def __post_init__(self) -> None:
        if self.steps_to_accept is None:
            self.steps_to_accept = _steps_to_accept(jnp.asarray(self.transitions), jnp.asarray(self.accepting))

    def __check_init__(self) -> None:
        n_states = self.transitions.shape[0]
        if self.transitions.ndim != 2 or self.accepting.shape != (n_states,) or self.token_class.ndim != 1:
            raise ValueError(
                f"inconsistent DFA table: token_class {self.token_class.shape}, "
                f"transitions {self.transitions.shape}, accepting {self.accepting.shape}"
            )
        if not (0 <= self.initial < n_states and 0 <= self.eos_token_id < self.vocab_size):
            raise ValueError(
                f"initial state {self.initial} or EOS id {self.eos_token_id} out of range "
                f"for {n_states} states and {self.vocab_size} tokens"
            )

    @property
    def vocab_size(self) -> int:
        """Number of tokens the automaton reads."""
        return self.token_class.shape[0]

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` unless this constraint was built for a vocabulary of ``vocab_size``."""
        check_vocab_size(self.vocab_size, vocab_size)

    def mask(self, state: Int[ArrayLike, ""]) -> Bool[Array, " V"]:
        """Which tokens may come next in ``state`` (all ``False`` when ``state`` is dead)."""
        state = jnp.asarray(state, jnp.int32)
        row = jnp.maximum(state, 0)  # a dead state reads row 0, then is masked out below
        allowed = self.transitions[row][self.token_class] >= 0
        allowed = allowed.at[self.eos_token_id].set(self.accepting[row])
        return allowed & (state >= 0)

    def advance(self, state: Int[ArrayLike, ""], token: Int[ArrayLike, ""]) -> Int[Array, ""]:
        """The state after ``token``: EOS keeps an accepting state, a forbidden token gives ``-1``."""
        state, token = jnp.asarray(state, jnp.int32), jnp.asarray(token, jnp.int32)
        row = jnp.maximum(state, 0)
        read = self.transitions[row, self.token_class[token]]
        ended = jnp.where(self.accepting[row], state, DEAD)
        return jnp.where(state >= 0, jnp.where(token == self.eos_token_id, ended, read), DEAD)

    def is_accepting(self, state: Int[ArrayLike, ""]) -> Bool[Array, ""]:
        """Whether the text read so far satisfies the constraint (EOS is allowed)."""
        state = jnp.asarray(state, jnp.int32)
        return (state >= 0) & self.accepting[jnp.maximum(state, 0)]

    def is_dead(self, state: Int[ArrayLike, ""]) -> Bool[Array, ""]:
        """Whether ``state`` is the dead state (no continuation can satisfy the constraint)."""
        return jnp.asarray(state) < 0

    # --- the token budget: how far each state is from acceptance ---------------------------

    @property
    def min_tokens(self) -> int:
        """The fewest tokens (EOS excluded) of any accepted text: with ``require_eos`` a
        generation needs ``max_new_tokens >= min_tokens + 1``."""
        return int(self.steps_to_accept[self.initial])

    def tokens_to_accept(self, state: Int[ArrayLike, ""]) -> Int[Array, " V"]:
        """For every next token, the fewest further tokens (EOS excluded) from the state it
        leads to until the text is accepted; EOS counts ``0`` in an accepting state. A token
        the state forbids (or any token, in the dead state) gets ``UNREACHABLE``, more than
        any budget."""
        state = jnp.asarray(state, jnp.int32)
        row = jnp.maximum(state, 0)
        unreachable = UNREACHABLE
        following = self.transitions[row]  # [C]: one gather per class, then one over tokens
        per_class = jnp.where(following >= 0, self.steps_to_accept[jnp.maximum(following, 0)], unreachable)
        distance = per_class[self.token_class]
        distance = distance.at[self.eos_token_id].set(jnp.where(self.accepting[row], 0, unreachable))
        return jnp.where(state >= 0, distance, unreachable)

    def mask_within(self, state: Int[ArrayLike, ""], n_tokens: Int[ArrayLike, ""]) -> Bool[Array, " V"]:
        """:meth:`mask` restricted to what can still finish: a text token is allowed when the
        text can be accepted within ``n_tokens`` text tokens counting this one; EOS, when the
        state accepts (whatever ``n_tokens``, even ``0``)."""
        distance = self.tokens_to_accept(state)
        allowed = distance <= jnp.asarray(n_tokens) - 1
        return allowed.at[self.eos_token_id].set(self.is_accepting(state))


# --- compression: the one place a host table becomes a TokenDFA --------------------------------


@jax.jit  # one compilation per table shape, however many constraints are built
def _steps_to_accept(table: Int[Array, "S C"], accepting: Bool[Array, " S"]) -> Int[Array, " S"]:
    """The fewest tokens from each state to an accepting state (``UNREACHABLE`` where none): Bellman-Ford
    rounds over the ``[S, C]`` table until nothing shrinks, one gather each, as many rounds
    as the longest distance. Pure JAX, so a table built under ``jit`` works too."""

    def relax(carry):
        distance, _ = carry
        via = jnp.where(table >= 0, jnp.minimum(distance[jnp.maximum(table, 0)] + 1, UNREACHABLE), UNREACHABLE)
        shorter = jnp.minimum(distance, via.min(axis=1, initial=UNREACHABLE))
        return shorter, jnp.any(shorter != distance)

    start = jnp.where(accepting, 0, UNREACHABLE).astype(jnp.int32)
    return jax.lax.while_loop(lambda carry: carry[1], relax, (start, jnp.asarray(True)))[0]


def _live_states(table: np.ndarray, accepting: np.ndarray, initial: int, what: str) -> np.ndarray:
    """States reachable from ``initial`` that can reach an accepting state, in BFS order from it."""
    live = accepting.copy()
    while True:  # co-reachability as a fixpoint; at most S rounds of one [S, C] gather each
        grown = accepting | ((table >= 0) & live[table]).any(axis=1)
        if (grown == live).all():
            break
        live = grown
    if not live[initial]:
        raise ValueError(f"{what} accepts no token sequence of this vocabulary")
    order, seen = [initial], {initial}
    for state in order:  # ``order`` grows while it is walked: a breadth-first search
        for nxt in dict.fromkeys(table[state].tolist()):
            if nxt >= 0 and live[nxt] and nxt not in seen:
                seen.add(nxt)
                order.append(nxt)
    return np.asarray(order)


def _compress(
    table: np.ndarray,
    token_class: np.ndarray,
    accepting: np.ndarray,
    initial: int,
    eos_token_id: int,
    never: np.ndarray,
    what: str,
) -> TokenDFA:
    """Trim, renumber and class-compress a DFA given over preliminary token classes.

    ``table[s, c]`` is the next state for class ``c`` (``-1`` dead), ``token_class[v]`` the
    preliminary class of token ``v``; tokens in ``never`` (EOS, special tokens) are forced to a
    class that is dead everywhere, whatever the table says.
    """
    n_states = table.shape[0]
    table = np.concatenate([table, np.full((n_states, 1), DEAD)], axis=1)
    token_class = np.where(never, table.shape[1] - 1, token_class)
    used, token_class = np.unique(token_class, return_inverse=True)
    table = table[:, used]

    order = _live_states(table, accepting, initial, what)
    renumber = np.full(n_states + 1, DEAD)  # the extra last entry maps a -1 target to -1
    renumber[order] = np.arange(len(order))
    table = renumber[table[order]]

    # Identical columns are tokens no state tells apart: one class each.
    columns, inverse = np.unique(table, axis=1, return_inverse=True)
    return TokenDFA(
        token_class=jnp.asarray(inverse.reshape(-1)[token_class], jnp.int32),
        transitions=jnp.asarray(columns, jnp.int32),
        accepting=jnp.asarray(accepting[order]),
        initial=0,
        eos_token_id=eos_token_id,
    )


def _never(tokenizer: Tokenizer) -> np.ndarray:
    """EOS (handled by the accepting rule) and special tokens (``b""``: never text)."""
    never = np.array([not data for data in tokenizer.vocab_bytes])
    never[tokenizer.eos_token_id] = True
    return never


# --- builders ----------------------------------------------------------------------------------


def regex(pattern: str, tokenizer: Tokenizer, limits: Limits = Limits()) -> TokenDFA:
    """Token sequences whose text fully matches ``pattern``, as ``re.fullmatch`` reads it.

    The regular subset of Python's ``re`` syntax: literals and escapes, classes (negated,
    ranges, Unicode-aware ``\\d \\w \\s`` as in ``re``), ``.`` (not ``\\n``), groups,
    alternation, ``* + ? {m} {m,n} {m,} {,n}`` (lazy forms too); the whole text must match.
    The pattern becomes a minimal byte-level DFA (``regex_dfa``) that each token is walked
    through. Raises ``ValueError`` for unsupported syntax (look-around, backreferences,
    anchors, flags), when the pattern matches no text this vocabulary can spell, or — naming
    the costly construct — when compiling would pass ``limits`` (time, automaton size).
    """
    dfa = compile_regex(pattern, limits)
    return _from_byte_table(dfa.table, dfa.initial, dfa.accepting, tokenizer, f"regex {pattern!r}")


def from_char_dfa(
    step: Callable[[int, int], int], initial: int, accepting: Collection[int], n_states: int, tokenizer: Tokenizer
) -> TokenDFA:
    """Lift a byte-level DFA to tokens: a token leads wherever its bytes, read one by one, lead.

    ``step(state, byte)`` gives the next state in ``0..n_states-1`` or ``-1`` to reject; it is
    called once per (state, byte), so it may be slow Python. ``accepting`` lists the states in
    which the text may end.
    """
    byte_table = np.array([[step(state, byte) for byte in range(256)] for state in range(n_states)])
    if ((byte_table < DEAD) | (byte_table >= n_states)).any():
        raise ValueError(f"step returned a state outside -1..{n_states - 1}")
    is_accepting = np.zeros(n_states, bool)
    is_accepting[list(accepting)] = True
    return _from_byte_table(byte_table, initial, is_accepting, tokenizer, "the byte-level DFA")


_STATES_PER_CHUNK = 128  # bounds the walk's working memory to a few [128, trie nodes] int32 arrays


class _Trie(NamedTuple):
    """The vocabulary's distinct prefixes (~2x fewer than its bytes), numbered by depth, then bytes.

    Node 0 is the empty prefix; nodes of depth ``d`` are ``depth_start[d]:depth_start[d+1]``;
    ``token_node[v]`` is the node spelling token ``v``.
    """

    parent: np.ndarray
    byte: np.ndarray
    depth_start: np.ndarray
    token_node: np.ndarray


@lru_cache(maxsize=4)
def _trie(spellings: tuple[bytes, ...]) -> _Trie:
    # Built depth by depth in numpy: a prefix of depth d is (its parent prefix, its last byte),
    # so numbering the distinct (parent, byte) pairs of each depth in sorted order numbers the
    # prefixes lexicographically within the depth. No per-prefix Python: a 262k vocabulary
    # (Gemma 3) has ~2M prefixes.
    lengths = np.fromiter(map(len, spellings), np.int64, len(spellings))
    data = np.frombuffer(b"".join(spellings), np.uint8)
    starts = np.cumsum(lengths) - lengths
    token_node = np.zeros(len(spellings), np.int64)  # each token's node so far (its prefix)
    parent, byte, depth_start = [np.zeros(1, np.int64)], [np.zeros(1, np.uint8)], [0, 1]
    for depth in range(1, int(lengths.max(initial=0)) + 1):
        longer = np.flatnonzero(lengths >= depth)
        pairs, node = np.unique(token_node[longer] * 256 + data[starts[longer] + depth - 1], return_inverse=True)
        token_node[longer] = depth_start[-1] + node
        parent.append(pairs // 256)
        byte.append((pairs % 256).astype(np.uint8))
        depth_start.append(depth_start[-1] + len(pairs))
    return _Trie(np.concatenate(parent), np.concatenate(byte), np.asarray(depth_start), token_node)


def _walk(byte_table: np.ndarray, states: np.ndarray, trie: _Trie) -> np.ndarray:
    """``[len(states), V]``: where each token's bytes lead from each state (``-1`` dead).

    Every prefix of the vocabulary is read once per state, depth by depth; the walk stops
    at the first depth where no prefix is alive.
    """
    at = np.full((len(states), len(trie.parent)), DEAD, np.int32)
    at[:, 0] = states
    for lo, hi in zip(trie.depth_start[1:-1], trie.depth_start[2:]):
        before = at[:, trie.parent[lo:hi]]
        if not (before >= 0).any():
            break
        at[:, lo:hi] = np.where(before >= 0, byte_table[np.maximum(before, 0), trie.byte[None, lo:hi]], DEAD)
    return at[:, trie.token_node]


def _from_byte_table(
    byte_table: np.ndarray, initial: int, accepting: np.ndarray, tokenizer: Tokenizer, what: str
) -> TokenDFA:
    """Lift a ``[S, 256]`` byte DFA to tokens: a token leads wherever its bytes, read one by one, lead.

    States are walked a chunk at a time and tokens split into classes as the chunks tell them
    apart; each chunk keeps one column per class it knew, so memory stays ``O(chunk · V + S · C)``
    rather than ``O(S · V)``.
    """
    byte_table = byte_table.astype(np.int32)
    trie = _trie(tuple(tokenizer.vocab_bytes))
    token_class = np.zeros(tokenizer.vocab_size, np.int64)
    pieces = []
    states = np.arange(byte_table.shape[0])
    for chunk in np.array_split(states, -(-len(states) // _STATES_PER_CHUNK)):
        walked = _walk(byte_table, chunk, trie)
        token_class = group_rows(np.vstack([token_class[None], walked]).T)
        pieces.append((walked[:, first_of_each(token_class)], token_class))
    # Classes only split, so a token of a final class reads, in each chunk, its class's column there.
    representative = first_of_each(token_class)
    table = np.concatenate([columns[:, classes[representative]] for columns, classes in pieces])
    return _compress(table, token_class, accepting, initial, tokenizer.eos_token_id, _never(tokenizer), what)


def vocabulary_predicate(allowed: Callable[[bytes], bool], tokenizer: Tokenizer) -> TokenDFA:
    """Only tokens whose bytes satisfy ``allowed`` (one state; EOS is always allowed).

    ``allowed`` sees each non-special token's bytes, which may be part of a UTF-8 character.
    """
    table = np.array([[0 if data and allowed(data) else DEAD for data in tokenizer.vocab_bytes]])
    return _compress(
        table,
        np.arange(tokenizer.vocab_size),
        np.ones(1, bool),
        0,
        tokenizer.eos_token_id,
        _never(tokenizer),
        "the vocabulary predicate",
    )


def lipogram(letters: str, tokenizer: Tokenizer) -> TokenDFA:
    """Text that never uses any of ``letters`` (ASCII letters, either case), e.g. ``lipogram("e", tok)``.

    One state suffices because an ASCII byte never occurs inside a multi-byte UTF-8 character,
    so a letter is either wholly inside one token or absent. A non-ASCII letter could be split
    across tokens, which a vocabulary predicate cannot see, so it is refused.
    """
    if not letters or not all(char.isascii() and char.isalpha() for char in letters):
        raise ValueError(f"lipogram needs ASCII letters, got {letters!r}")
    banned = {char.encode() for char in letters.lower() + letters.upper()}
    return vocabulary_predicate(lambda data: not any(char in data for char in banned), tokenizer)


def _is_ascii_letter(byte: int) -> bool:
    return ord("a") <= (byte | 0x20) <= ord("z")  # ASCII upper and lower case differ in bit 5


def max_word_length(k: int, tokenizer: Tokenizer) -> TokenDFA:
    """Every word has at most ``k`` letters, where a word is a maximal run of ASCII letters.

    Every other byte ends a word: digits, apostrophes and hyphens (so "don't" is "don" + "t"),
    and non-ASCII bytes (so "naïve" is "na" + "ve"). That keeps the rule exact at the byte
    level and easy to state; write another ``from_char_dfa`` for a different notion of word.
    The state is the length of the word being written, ``0..k``; all states accept.
    """
    if k < 1:
        raise ValueError(f"max_word_length needs k >= 1, got {k}")

    def step(run: int, byte: int) -> int:
        if not _is_ascii_letter(byte):
            return 0
        return run + 1 if run < k else DEAD

    return from_char_dfa(step, 0, range(k + 1), k + 1, tokenizer)


def token_length(max_chars: int, tokenizer: Tokenizer) -> TokenDFA:
    """Only tokens that start at most ``max_chars`` characters.

    A token's length counts the UTF-8 characters it starts (bytes that are not continuation
    bytes ``0b10xxxxxx``), so the lengths of a sequence's tokens add up to its text's length.
    """
    return vocabulary_predicate(lambda data: sum((byte & 0xC0) != 0x80 for byte in data) <= max_chars, tokenizer)


def intersect(a: TokenDFA, b: TokenDFA) -> TokenDFA:
    """Token sequences both ``a`` and ``b`` accept: the product DFA, reachable pairs only.

    A token's product class is the pair of its classes, so the product is built over the
    pairs that occur (at most ``C_a · C_b``, usually far fewer), never over the vocabulary.
    """
    if (a.vocab_size, a.eos_token_id) != (b.vocab_size, b.eos_token_id):
        raise ValueError(
            f"cannot intersect constraints over different vocabularies: {a.vocab_size} tokens "
            f"(EOS {a.eos_token_id}) and {b.vocab_size} tokens (EOS {b.eos_token_id})"
        )
    pairs, token_class = np.unique(
        np.stack([np.asarray(a.token_class), np.asarray(b.token_class)], axis=1), axis=0, return_inverse=True
    )
    table_a, table_b = np.asarray(a.transitions)[:, pairs[:, 0]], np.asarray(b.transitions)[:, pairs[:, 1]]
    accepting_a, accepting_b = np.asarray(a.accepting), np.asarray(b.accepting)

    order = [(a.initial, b.initial)]
    number = {order[0]: 0}
    rows: list[np.ndarray] = []
    for state_a, state_b in order:  # ``order`` grows while it is walked: a breadth-first search
        row = np.full(len(pairs), DEAD)
        for c, nxt in enumerate(zip(table_a[state_a].tolist(), table_b[state_b].tolist())):
            if nxt[0] >= 0 and nxt[1] >= 0:
                if nxt not in number:
                    number[nxt] = len(order)
                    order.append(nxt)
                row[c] = number[nxt]
        rows.append(row)
    accepting = np.array([accepting_a[s] and accepting_b[t] for s, t in order])
    # The classes already keep EOS and special tokens dead, so nothing is forced here.
    return _compress(
        np.stack(rows),
        token_class.reshape(-1),
        accepting,
        0,
        a.eos_token_id,
        np.zeros(a.vocab_size, bool),
        "the intersection",
    )


def delimiter_tokens(delimiter: str, tokenizer: Tokenizer) -> np.ndarray:
    """``[V]`` booleans: the tokens whose text contains ``delimiter`` (EOS excluded).

    ``ppl.Generation(delimiter=...)`` ends a chunk at such a token. A delimiter that the
    tokenizer can also spell across two tokens (``"\\n\\n"`` as ``"\\n"``, ``"\\n"``) is only
    seen when one token holds it whole.
    """
    if not delimiter:
        raise ValueError("delimiter must be a non-empty string")
    needle = delimiter.encode()
    marks = np.array([needle in data for data in tokenizer.vocab_bytes], bool)
    marks[tokenizer.eos_token_id] = False
    if not marks.any():
        raise ValueError(f"no token of this vocabulary contains the delimiter {delimiter!r}")
    return marks
