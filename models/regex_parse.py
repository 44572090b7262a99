"""Parse the regular subset of Python's ``re`` syntax into a small tree over Unicode code points.

The tree has four node types: ``Chars`` (a set of code points, as sorted disjoint ranges),
``Concat``, ``Alt`` and ``Repeat``. Everything that is not a regular language over characters
(look-around, backreferences, anchors other than the implicit full match, inline flags) is
refused with a ``ValueError`` naming the construct and its position, so that the automaton
built from the tree matches exactly what ``re.fullmatch(pattern, text)`` matches.

Classes follow ``re`` on ``str`` patterns: ``\\d``, ``\\w`` and ``\\s`` are Unicode-aware
(computed from ``re`` itself, so they agree with the running Python), ``.`` is any character
but ``\\n``. Surrogates (U+D800–U+DFFF) are never in a set: UTF-8 text cannot hold them.

    >>> parse(r"[A-Z]\\d{2}")                                            # doctest: +SKIP
    Concat(items=(Chars(ranges=((65, 90),)), Repeat(item=Chars(...), low=2, high=2, span=(5, 11))))
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import cache

MAX_CODE_POINT = 0x10FFFF
SURROGATES = (0xD800, 0xDFFF)

Ranges = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Chars:
    """One character from a set of code points: sorted, disjoint, non-adjacent inclusive ranges."""

    ranges: Ranges


@dataclass(frozen=True)
class Concat:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Alt:
    items: tuple[Node, ...]


@dataclass(frozen=True)
class Repeat:
    """``item`` repeated ``low..high`` times (``high=None``: unbounded); ``span`` locates it in the pattern."""

    item: Node
    low: int
    high: int | None
    span: tuple[int, int]


Node = Chars | Concat | Alt | Repeat


# --- code-point sets ---------------------------------------------------------------------------


def normalize(ranges: list[tuple[int, int]]) -> Ranges:
    """Sort, merge overlapping or adjacent ranges, and remove the surrogates."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    out = []
    for lo, hi in merged:
        for a, b in ((lo, min(hi, SURROGATES[0] - 1)), (max(lo, SURROGATES[1] + 1), hi)):
            if a <= b:
                out.append((a, b))
    return tuple(out)


def complement(ranges: Ranges) -> Ranges:
    gaps, start = [], 0
    for lo, hi in ranges:
        if lo > start:
            gaps.append((start, lo - 1))
        start = hi + 1
    if start <= MAX_CODE_POINT:
        gaps.append((start, MAX_CODE_POINT))
    return normalize(gaps)


@cache
def _all_characters() -> str:
    return "".join(map(chr, range(SURROGATES[0]))) + "".join(map(chr, range(SURROGATES[1] + 1, MAX_CODE_POINT + 1)))


@cache
def unicode_class(letter: str) -> Ranges:
    """The code points ``re`` matches with ``\\d``, ``\\w`` or ``\\s``: runs of matches over all characters."""

    def code_point(index: int) -> int:  # ``_all_characters`` skips the surrogates
        return index if index < SURROGATES[0] else index + SURROGATES[1] - SURROGATES[0] + 1

    spans = [match.span() for match in re.finditer(rf"\{letter}+", _all_characters())]
    return normalize([(code_point(lo), code_point(hi - 1)) for lo, hi in spans])


ANY_BUT_NEWLINE = normalize([(0, 9), (11, MAX_CODE_POINT)])
_SIMPLE_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11}  # \b only inside a class
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}


# --- parser ------------------------------------------------------------------------------------


class _Parser:
    def __init__(self, pattern: str):
        self.pattern, self.pos = pattern, 0

    def error(self, message: str, at: int | None = None) -> ValueError:
        at = self.pos if at is None else at
        return ValueError(f"regex {self.pattern!r}: {message} at position {at}")

    def peek(self, ahead: int = 0) -> str:
        index = self.pos + ahead
        return self.pattern[index] if index < len(self.pattern) else ""

    def take(self) -> str:
        if self.pos >= len(self.pattern):
            raise self.error("unexpected end of pattern")
        self.pos += 1
        return self.pattern[self.pos - 1]

    def alternation(self) -> Node:
        items = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            items.append(self.concatenation())
        return items[0] if len(items) == 1 else Alt(tuple(items))

    def concatenation(self) -> Node:
        items: list[Node] = []
        while self.peek() not in ("", "|", ")"):
            start = self.pos
            item = self.atom()
            bounds = self.quantifier()
            if bounds is not None:
                if self.peek() in ("*", "+", "?") or self.counted_bounds() is not None:
                    raise self.error("multiple repeat (possessive quantifiers are not supported)")
                item = Repeat(item, bounds[0], bounds[1], (start, self.pos))
            items.append(item)
        return items[0] if len(items) == 1 else Concat(tuple(items))

    def counted_bounds(self) -> tuple[re.Match, int] | None:
        """``{m}``, ``{m,}``, ``{,n}`` or ``{m,n}`` at the cursor; ``re`` reads any other ``{`` literally."""
        match = re.compile(r"\{(\d*)(,?)(\d*)\}").match(self.pattern, self.pos)
        if match is None or (not match[1] and not match[2]):
            return None
        return match, match.end()

    def quantifier(self) -> tuple[int, int | None] | None:
        char = self.peek()
        if char in ("*", "+", "?"):
            self.pos += 1
            bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[char]
        elif (counted := self.counted_bounds()) is not None:
            match, self.pos = counted
            low = int(match[1] or 0)
            high = low if not match[2] else (int(match[3]) if match[3] else None)
            if high is not None and high < low:
                raise self.error(f"min repeat greater than max repeat in {match[0]!r}", match.start())
            bounds = (low, high)
        else:
            return None
        if self.peek() == "?":  # lazy: the same language under a full match
            self.pos += 1
        return bounds

    def atom(self) -> Node:
        start, char = self.pos, self.take()
        if char == "(":
            return self.group(start)
        if char == "[":
            return Chars(self.char_class())
        if char == ".":
            return Chars(ANY_BUT_NEWLINE)
        if char == "\\":
            return Chars(normalize(list(self.escape(in_class=False))))
        if char in ("^", "$"):
            raise self.error(f"anchor {char!r} is not supported (the whole text must match anyway)", start)
        self.pos = start
        if char in ("*", "+", "?") or self.counted_bounds() is not None:
            raise self.error("nothing to repeat", start)
        self.pos = start + 1
        return Chars(normalize([(ord(char), ord(char))]))

    def group(self, start: int) -> Node:
        if self.peek() == "?":
            if self.pattern.startswith("?:", self.pos):
                self.pos += 2
            elif (name := re.compile(r"\?P<\w+>").match(self.pattern, self.pos)) is not None:
                self.pos = name.end()
            else:
                raise self.error("look-around, backreferences, comments and inline flags are not supported", start)
        inner = Concat(()) if self.peek() == ")" else self.alternation()
        if self.peek() != ")":
            raise self.error("missing ), unterminated subpattern", start)
        self.pos += 1
        return inner

    def char_class(self) -> Ranges:
        start = self.pos - 1
        negate = self.peek() == "^"
        self.pos += negate
        ranges: list[tuple[int, int]] = []
        first = True
        while self.peek() != "]" or first:
            if not self.peek():
                raise self.error("unterminated character set", start)
            first = False
            item = self.class_item()
            if self.peek() == "-" and self.peek(1) not in ("]", ""):
                self.pos += 1
                end = self.class_item()
                if len(item) != 1 or len(end) != 1 or item[0][0] != item[0][1] or end[0][0] != end[0][1]:
                    raise self.error("bad character range", start)
                if end[0][0] < item[0][0]:
                    raise self.error("bad character range (reversed)", start)
                item = ((item[0][0], end[0][0]),)
            ranges.extend(item)
        self.pos += 1
        ranges = normalize(ranges)
        return complement(ranges) if negate else ranges

    def class_item(self) -> Ranges:
        char = self.take()
        if char == "\\":
            return self.escape(in_class=True)
        return ((ord(char), ord(char)),)  # a surrogate here is dropped by ``normalize`` later

    def escape(self, in_class: bool) -> Ranges:
        start, char = self.pos - 1, self.take()
        if char.lower() in ("d", "w", "s"):
            ranges = unicode_class(char.lower())
            return complement(ranges) if char.isupper() else ranges
        if char in _SIMPLE_ESCAPES and (char != "b" or in_class):
            code = _SIMPLE_ESCAPES[char]
        elif char in _HEX_DIGITS:
            digits = self.pattern[self.pos : self.pos + _HEX_DIGITS[char]]
            if len(digits) != _HEX_DIGITS[char] or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"incomplete escape \\{char}{digits}", start)
            self.pos += len(digits)
            code = int(digits, 16)
            if code > MAX_CODE_POINT:
                raise self.error(f"bad escape \\{char}{digits}", start)
        elif char == "0":
            digits = re.compile(r"[0-7]{0,2}").match(self.pattern, self.pos)[0]
            self.pos += len(digits)
            code = int("0" + digits, 8)
        elif char == "N" and self.peek() == "{":
            name = re.compile(r"\{([^}]*)\}").match(self.pattern, self.pos)
            if name is None:
                raise self.error("missing } in \\N{...}", start)
            try:
                code = ord(unicodedata.lookup(name[1]))
            except KeyError:
                raise self.error(f"undefined character name {name[1]!r}", start) from None
            self.pos = name.end()
        elif char.isdigit():
            raise self.error("backreferences are not supported", start)
        elif char.isascii() and char.isalpha():
            what = "anchors are" if char in "bBAZ" else "this escape is"
            raise self.error(f"\\{char}: {what} not supported", start)
        else:
            code = ord(char)
        return ((code, code),)  # a surrogate is dropped by ``normalize`` later: UTF-8 text never holds one


def parse(pattern: str) -> Node:
    """The tree of ``pattern``; ``ValueError`` naming the position for syntax ``re`` would refuse
    or this compiler does not support."""
    parser = _Parser(pattern)
    tree = parser.alternation()
    if parser.pos != len(pattern):
        raise parser.error("unbalanced parenthesis")
    return tree
