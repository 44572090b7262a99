"""Regex → minimal byte-level DFA, with hard limits on the work it may do.

The pipeline is the textbook one, over bytes so that a token (a byte string that may end
inside a UTF-8 character) can be read by the same automaton as text:

1. ``regex_parse.parse`` gives a tree over code points;
2. each character set becomes a small minimal DFA over its UTF-8 encodings (cached, so ``\\w``
   is built once however often it occurs) and the tree becomes a Thompson NFA of those pieces;
3. subset construction over *byte classes* (bytes no transition tells apart share a column)
   gives a DFA, trimmed and minimised by partition refinement in numpy.

A counted repetition is unrolled, and a repetition inside a repetition can make the DFA grow
exponentially (``(a|b)*a(a|b){30}``), so the NFA size, the number of DFA states and the time
are bounded; past a bound, ``ValueError`` names the costliest repetition in the pattern.

    >>> dfa = compile_regex(r"[A-Z][^\\n]{65}[.!?]")                        # doctest: +SKIP
    >>> dfa.table.shape                                                    # doctest: +SKIP
    (n_states, 256)
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import NamedTuple

import numpy as np

from ppl.models.regex_parse import Alt, Chars, Concat, Node, Ranges, Repeat, parse

DEAD = -1


class ByteDFA(NamedTuple):
    """``table[s, b]``: the state after byte ``b`` in state ``s`` (``-1`` rejects); every state is live."""

    table: np.ndarray
    accepting: np.ndarray
    initial: int


class Limits(NamedTuple):
    """Bounds on compilation work; exceeding one is a ``ValueError`` naming the costly construct."""

    nfa_states: int = 200_000
    dfa_states: int = 20_000  # during subset construction, before minimisation
    minimal_states: int = 3_000  # each costs one walk of the vocabulary trie (~8 ms for 49k tokens)
    seconds: float = 30.0


class _TooCostly(Exception):
    """Internal: a limit was hit; ``compile_regex`` turns it into a ``ValueError`` with context."""


# --- UTF-8 -------------------------------------------------------------------------------------

_LENGTH_BOUNDS = ((0, 0x7F), (0x80, 0x7FF), (0x800, 0xFFFF), (0x10000, 0x10FFFF))


def utf8_sequences(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    """Byte-range sequences whose concatenations are exactly the UTF-8 encodings of ``lo..hi``.

    Split the range until every code point in a piece has the same length and the pieces'
    encodings vary independently byte by byte (Russ Cox's construction).
    """
    out = []
    for a, b in _LENGTH_BOUNDS:
        if max(lo, a) <= min(hi, b):
            out.extend(_same_length(max(lo, a), min(hi, b)))
    return out


def _same_length(lo: int, hi: int) -> list[tuple[tuple[int, int], ...]]:
    n = len(chr(lo).encode("utf-8", "surrogatepass"))
    for i in range(1, n):
        mask = (1 << (6 * i)) - 1  # the low ``i`` continuation bytes
        if lo & ~mask != hi & ~mask:
            if lo & mask:
                return _same_length(lo, lo | mask) + _same_length((lo | mask) + 1, hi)
            if hi & mask != mask:
                return _same_length(lo, (hi & ~mask) - 1) + _same_length(hi & ~mask, hi)
    first, last = chr(lo).encode("utf-8", "surrogatepass"), chr(hi).encode("utf-8", "surrogatepass")
    return [tuple(zip(first, last))]


# --- NFA ---------------------------------------------------------------------------------------


class _NFA:
    """States with epsilon edges and byte-range edges ``(lo, hi, target)``; grows by fragments."""

    def __init__(self, limit: int):
        self.eps: list[list[int]] = []
        self.moves: list[list[tuple[int, int, int]]] = []
        self.limit = limit

    def state(self) -> int:
        if len(self.eps) >= self.limit:
            raise _TooCostly("NFA states")
        self.eps.append([])
        self.moves.append([])
        return len(self.eps) - 1

    def build(self, node: Node) -> tuple[int, int]:
        """A fragment ``(start, end)`` for ``node``; ``end`` has no outgoing edges yet."""
        if isinstance(node, Chars):
            return self.chars(node.ranges)
        start = self.state()
        end = start
        if isinstance(node, Concat):
            for item in node.items:
                first, last = self.build(item)
                self.eps[end].append(first)
                end = last
        elif isinstance(node, Alt):
            end = self.state()
            for item in node.items:
                first, last = self.build(item)
                self.eps[start].append(first)
                self.eps[last].append(end)
        else:
            end = self.repeat(node, start)
        return start, end

    def repeat(self, node: Repeat, start: int) -> int:
        end = start
        for _ in range(node.low):
            first, last = self.build(node.item)
            self.eps[end].append(first)
            end = last
        if node.high is None:  # a loop: back from the copy's end to its start
            first, last = self.build(node.item)
            self.eps[end].append(first)
            self.eps[last].append(first)
            exit_ = self.state()
            self.eps[end].append(exit_)
            self.eps[last].append(exit_)
            return exit_
        exit_ = self.state()
        for _ in range(node.high - node.low):  # each optional copy may be skipped to the exit
            first, last = self.build(node.item)
            self.eps[end].append(first)
            self.eps[end].append(exit_)
            end = last
        self.eps[end].append(exit_)
        return exit_

    def chars(self, ranges: Ranges) -> tuple[int, int]:
        """Embed the cached minimal DFA of this character set: one final state, no edges out."""
        piece = _charset_dfa(ranges)
        if piece.final == DEAD:  # an empty set: a fragment whose end nothing reaches
            return self.state(), self.state()
        offset = len(self.eps)
        for _ in range(len(piece.moves)):
            self.state()
        for state, moves in enumerate(piece.moves):
            self.moves[offset + state] = [(lo, hi, offset + target) for lo, hi, target in moves]
        return offset + piece.start, offset + piece.final


class _Piece(NamedTuple):
    moves: list[list[tuple[int, int, int]]]
    start: int
    final: int  # ``-1`` for an empty set: nothing reaches it


@lru_cache(maxsize=256)
def _charset_dfa(ranges: Ranges) -> _Piece:
    """The minimal byte DFA of one character from ``ranges``, as range edges."""
    if not ranges:
        return _Piece([], 0, DEAD)
    nfa = _NFA(limit=10**7)
    start, final = nfa.state(), nfa.state()
    prefixes: dict[tuple, int] = {}  # a trie of byte-range prefixes keeps the NFA small
    for lo, hi in ranges:
        for sequence in utf8_sequences(lo, hi):
            state = start
            for depth, byte_range in enumerate(sequence[:-1]):
                key = sequence[: depth + 1]
                if key not in prefixes:
                    prefixes[key] = nfa.state()
                    nfa.moves[state].append((*byte_range, prefixes[key]))
                state = prefixes[key]
            nfa.moves[state].append((*sequence[-1], final))
    dfa = _minimize(*_determinize(nfa, start, final, Limits(), float("inf")))
    moves = []
    for row in dfa.table:
        edges, lo = [], 0
        for byte in range(1, 257):  # runs of equal targets become ranges
            if byte == 256 or row[byte] != row[lo]:
                if row[lo] >= 0:
                    edges.append((lo, byte - 1, int(row[lo])))
                lo = byte
        moves.append(edges)
    (final_state,) = np.flatnonzero(dfa.accepting)
    return _Piece(moves, dfa.initial, int(final_state))


# --- determinise and minimise ------------------------------------------------------------------


def _determinize(
    nfa: _NFA, start: int, final: int, limits: Limits, deadline: float
) -> tuple[np.ndarray, np.ndarray, int]:
    """Subset construction; returns a ``[S, 256]`` byte table, accepting flags and the initial state."""
    bounds = sorted(
        {
            0,
            256,
            *(lo for moves in nfa.moves for lo, _, _ in moves),
            *(hi + 1 for moves in nfa.moves for _, hi, _ in moves),
        }
    )
    byte_class = np.searchsorted(bounds, np.arange(256), side="right") - 1
    class_moves = [[(int(byte_class[lo]), int(byte_class[hi]), t) for lo, hi, t in moves] for moves in nfa.moves]

    closures: dict[int, frozenset[int]] = {}

    def closure(state: int) -> frozenset[int]:
        if state not in closures:
            seen, stack = {state}, [state]
            while stack:
                for nxt in nfa.eps[stack.pop()]:
                    if nxt not in seen:
                        seen.add(nxt)
                        stack.append(nxt)
            closures[state] = frozenset(s for s in seen if class_moves[s] or s == final)
        return closures[state]

    initial = closure(start)
    number = {initial: 0}
    order = [initial]
    rows: list[list[int]] = []
    by_targets: dict[frozenset[int], int] = {}
    n_classes = len(bounds) - 1
    for count, subset in enumerate(order):  # ``order`` grows while it is walked: a breadth-first search
        if count % 256 == 0 and time.monotonic() > deadline:
            raise _TooCostly("seconds")
        buckets: list[set[int]] = [set() for _ in range(n_classes)]
        for state in subset:
            for lo, hi, target in class_moves[state]:
                for c in range(lo, hi + 1):
                    buckets[c].add(target)
        row = []
        for targets in buckets:
            key = frozenset(targets)
            if key not in by_targets:
                nxt = frozenset().union(*map(closure, key)) if key else frozenset()
                if nxt and nxt not in number:
                    if len(order) >= limits.dfa_states:
                        raise _TooCostly("DFA states")
                    number[nxt] = len(order)
                    order.append(nxt)
                by_targets[key] = number[nxt] if nxt else DEAD
            row.append(by_targets[key])
        rows.append(row)
    table = np.asarray(rows, np.int32).reshape(len(rows), n_classes)[:, byte_class]
    accepting = np.array([final in subset for subset in order])
    return table, accepting, 0


def first_of_each(group: np.ndarray) -> np.ndarray:
    """The lowest index in each group ``0..G-1`` of a dense labelling."""
    first = np.empty(group.max() + 1, np.int64)
    first[group[::-1]] = np.arange(len(group))[::-1]
    return first


def group_rows(matrix: np.ndarray) -> np.ndarray:
    """Dense labels of ``matrix``'s distinct rows: ``np.unique(matrix, axis=0, return_inverse=True)[1]``.

    Rows are grouped by a random linear hash (a sort of integers rather than of byte strings,
    ~10-20x faster), then checked exactly; a collision, however unlikely, takes the exact route.
    """
    weights = np.random.default_rng(0).integers(1, 2**63, size=matrix.shape[1], dtype=np.uint64) | np.uint64(1)
    hashed = ((matrix.astype(np.uint64) + np.uint64(1)) * weights).sum(axis=1, dtype=np.uint64)
    group = np.unique(hashed, return_inverse=True)[1].reshape(-1)
    if (matrix == matrix[first_of_each(group)[group]]).all():
        return group
    return np.unique(matrix, axis=0, return_inverse=True)[1].reshape(-1)


def _minimize(table: np.ndarray, accepting: np.ndarray, initial: int) -> ByteDFA:
    """Trim states that cannot reach acceptance, then merge equivalent states (Moore refinement)."""
    live = accepting.copy()
    while True:
        grown = live | ((table >= 0) & np.append(live, False)[table]).any(axis=1)
        if (grown == live).all():
            break
        live = grown
    if not live[initial]:
        return ByteDFA(np.full((1, 256), DEAD, np.int32), np.zeros(1, bool), 0)  # the empty language
    table = np.where(np.append(live, False)[table], table, DEAD)  # index -1 reads the appended False

    # Moore's partition refinement: split blocks by their successors' blocks until stable.
    distinct = np.unique(table, axis=1)  # bytes no state tells apart refine nothing twice
    block = np.unique(accepting.astype(np.int64) | ~live * 2, return_inverse=True)[1].reshape(-1)  # dead: own block
    while True:
        refined = group_rows(np.column_stack([block, np.append(block, DEAD)[distinct]]))
        if refined.max() == block.max():
            break
        block = refined
    n_blocks = block.max() + 1
    # Renumber blocks in BFS order of first appearance from the initial state, keeping only reachable ones.
    first = first_of_each(block)
    merged = np.append(block, DEAD)[table[first]]
    order, seen = [int(block[initial])], {int(block[initial])}
    for b in order:
        for nxt in dict.fromkeys(merged[b].tolist()):
            if nxt >= 0 and nxt not in seen:
                seen.add(nxt)
                order.append(nxt)
    renumber = np.full(n_blocks + 1, DEAD, np.int64)
    renumber[order] = np.arange(len(order))
    return ByteDFA(renumber[merged[order]].astype(np.int32), accepting[first[order]], 0)


# --- blame ---------------------------------------------------------------------------------------


def _size(node: Node) -> int:
    """NFA states ``node`` unrolls to, roughly (a character set counts as one)."""
    if isinstance(node, Chars):
        return 1
    if isinstance(node, (Concat, Alt)):
        return 1 + sum(map(_size, node.items))
    copies = (node.high if node.high is not None else node.low + 1) or 1
    return 1 + copies * _size(node.item)


def _repeats(node: Node, depth: int = 0):
    """``(repeat, how many repetitions enclose it)`` for every repetition in the tree."""
    if isinstance(node, Repeat):
        yield node, depth
        yield from _repeats(node.item, depth + 1)
    elif isinstance(node, (Concat, Alt)):
        for item in node.items:
            yield from _repeats(item, depth)


def _blame(pattern: str, tree: Node) -> str:
    """The construct most likely to blow up: nested repetitions first, then the largest unrolling."""

    def cost(entry: tuple[Repeat, int]) -> tuple[int, int]:
        repeat, depth = entry
        nested = depth > 0 or any(True for _ in _repeats(repeat.item))
        return (nested and (repeat.high or 0) > 1, _size(repeat))

    entries = list(_repeats(tree))
    if not entries:
        return "the pattern as a whole (a large alternation)"
    repeat, depth = max(entries, key=cost)
    text = pattern[repeat.span[0] : repeat.span[1]]
    where = (
        "inside another repetition"
        if depth
        else ("around another repetition" if any(True for _ in _repeats(repeat.item)) else "")
    )
    bound = "unbounded" if repeat.high is None else f"up to {repeat.high} times"
    return f"the repetition {text!r} at position {repeat.span[0]} ({bound}{', ' + where if where else ''})"


def compile_regex(pattern: str, limits: Limits = Limits()) -> ByteDFA:
    """The minimal byte-level DFA of the UTF-8 texts ``t`` with ``re.fullmatch(pattern, t)``.

    Raises ``ValueError`` for unsupported syntax (see ``regex_parse``) or, naming the costly
    construct, when compilation would pass ``limits``. The result may be the empty language
    (no accepting state); callers decide whether that is an error.
    """
    tree = parse(pattern)
    deadline = time.monotonic() + limits.seconds
    try:
        nfa = _NFA(limits.nfa_states)
        start, final = nfa.build(tree)
        dfa = _minimize(*_determinize(nfa, start, final, limits, deadline))
        if len(dfa.table) > limits.minimal_states:
            raise _TooCostly("minimal DFA states")
    except _TooCostly as exceeded:
        limit = {
            "NFA states": limits.nfa_states,
            "DFA states": limits.dfa_states,
            "minimal DFA states": limits.minimal_states,
            "seconds": limits.seconds,
        }[exceeded.args[0]]
        raise ValueError(
            f"regex {pattern!r} is too costly to compile: it needs more than {limit} "
            f"{exceeded.args[0]}; the costly construct is {_blame(pattern, tree)}. "
            f"Bound the repetition more tightly, split the constraint, or compute masks "
            f"lazily on the host (ppl.models.grammar.lazy_regex)."
        ) from None
    return dfa
