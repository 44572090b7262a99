"""The regex → byte-DFA compiler on its own: syntax against ``re``, refusals, and work limits.

Every supported construct is checked on a fixed list of texts against ``re.fullmatch``, read
byte by byte through the compiled table (so multi-byte characters are exercised). The
limits are checked with patterns whose automata really do explode.
"""

from __future__ import annotations

import re
import time

import numpy as np
import pytest

from ppl.models.regex_dfa import Limits, compile_regex, utf8_sequences

TEXTS = [
    "",
    "a",
    "ab",
    "abc",
    "aaa",
    "b",
    "{",
    "{2}",
    "a{",
    "-",
    "]",
    "x-",
    "é",
    "aé",
    "\n",
    " ",
    "\t",
    "0",
    "9",
    "٣",
    "_",
    "A",
    "Z",
    "ü",
    "€",
    "𝔸",
    "a.b",
    "2024-01-15",
    "ab ab",
    "\x00",
    "\x7f",
    "日本",
    "é\n",
]

SUPPORTED = [
    "a",
    "abc",
    "a|b|",
    "(?:ab)+",
    "(?P<word>a+)b?",
    "a*?",
    "a{2}",
    "a{1,2}",
    "a{,2}",
    "a{2,}",
    "a{1,2}?",
    "[abc]",
    "[^abc]",
    "[a-c]",
    "[]a]",
    "[a-]",
    "[-a]",
    "[^]a]",
    r"[\d-]",
    r"[\w.]",
    r"[^\s\S]",
    "[é-ü]",
    ".",
    ".*",
    r"\d",
    r"\D",
    r"\w+",
    r"\W",
    r"\s",
    r"\S",
    r"\.",
    r"\{",
    r"\x41|\u00e9|\U0001D538",
    r"\N{EURO SIGN}",
    r"\t|\n",
    r"\0",
    "{",
    "a{",
    "{2",
    "x{,}",
    r"\d{4}-\d{2}-\d{2}",
    r"(\w+ ?)*",
    "()",
    "a|()",
    "(a|b)*c?",
]


def reads(dfa, text: str) -> bool:
    state = dfa.initial
    for byte in text.encode():
        state = dfa.table[state, byte]
        if state < 0:
            return False
    return bool(dfa.accepting[state])


@pytest.mark.parametrize("pattern", SUPPORTED)
def test_matches_like_re_fullmatch(pattern):
    dfa = compile_regex(pattern)
    for text in TEXTS:
        assert reads(dfa, text) == (re.fullmatch(pattern, text) is not None), (pattern, text)


def test_minimal_and_trimmed():
    dfa = compile_regex("(a|b)*abb")  # the classic: 4 states in the minimal DFA
    assert dfa.table.shape == (4, 256)
    dead_ends = ~dfa.accepting & ~(dfa.table >= 0).any(axis=1)
    assert not dead_ends.any()
    assert compile_regex(r"[A-Z][ -~]{65}[.!?]").table.shape[0] == 68  # one state per position, then done


def test_utf8_sequences_cover_exactly_the_range():
    rng = np.random.default_rng(0)
    for lo, hi in [(0, 0xD7FF), (0x7F, 0x800), (0xE000, 0x10FFFF), (0x3B1, 0x3C9), (0xFFF0, 0x10010)]:
        sequences = utf8_sequences(lo, hi)
        assert sum(int(np.prod([b - a + 1 for a, b in seq])) for seq in sequences) == hi - lo + 1
        for point in {lo, hi, *rng.integers(lo, hi + 1, 200).tolist()}:  # each encodes in exactly one sequence
            data = chr(point).encode()
            inside = [len(seq) == len(data) and all(a <= x <= b for x, (a, b) in zip(data, seq)) for seq in sequences]
            assert sum(inside) == 1, hex(point)


@pytest.mark.parametrize(
    "pattern, message",
    [
        ("(?=a)b", "look-around"),
        (r"(a)\1", "backreferences"),
        ("^a", "anchor"),
        ("a$", "anchor"),
        (r"\bword", "anchors"),
        ("(a", "missing )"),
        ("a)", "unbalanced"),
        ("*a", "nothing to repeat"),
        ("a**", "multiple repeat"),
        ("[z-a]", "bad character range"),
        ("[a", "unterminated"),
        ("a{3,2}", "min repeat"),
        ("(?i)a", "inline flags"),
        (r"\q", "escape"),
    ],
)
def test_unsupported_syntax_is_a_clear_error(pattern, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_regex(pattern)


@pytest.mark.parametrize(
    "pattern, limit, construct",
    [
        (r"(a|b)*a(a|b){30}", "20000 DFA states", "'(a|b){30}' at position 7"),  # the exponential classic
        (r"([^\n]{50}){50}", "20000 DFA states", r"'([^\\n]{50}){50}' at position 0 (up to 50 times, around another"),
        (r"x(\w{100}){1000}", "200000 NFA states", r"'(\\w{100}){1000}' at position 1"),
    ],
)
def test_runaway_patterns_are_refused_naming_the_construct(pattern, limit, construct):
    start = time.monotonic()
    with pytest.raises(ValueError, match=re.escape(limit) + ".*" + re.escape(construct)):
        compile_regex(pattern)
    assert time.monotonic() - start < 30  # the acceptance bound is 60 s; measured 1-3 s alone


def test_time_limit():
    # State limits out of reach, so the clock is what stops it however fast the machine is.
    limits = Limits(nfa_states=10**9, dfa_states=10**9, minimal_states=10**9, seconds=0.2)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"more than 0.2 seconds.*'\(a\|b\)\{30\}'"):
        compile_regex(r"(a|b)*a(a|b){30}", limits)
    assert time.monotonic() - start < 10


_SENTENCE_SCRIPT = """
import json, sys, time
from pathlib import Path
from ppl.models import constraints, smollm2_path
from ppl.models.tokenizer import Tokenizer
tokenizer = Tokenizer.from_gguf(smollm2_path())
seconds = {}
for pattern in sys.argv[1:]:
    start = time.perf_counter()
    constraints.regex(pattern, tokenizer).transitions.block_until_ready()
    seconds[pattern] = time.perf_counter() - start
status = Path("/proc/self/status").read_text()
peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 2**20
print(json.dumps({"seconds": seconds, "peak_gib": peak}))
"""


@pytest.mark.slow
def test_sixty_seven_character_sentences_compile_within_10s_and_2gb():
    """The issue's patterns: outlines-core ran >15 min at 14.5 GB on one and aborted on the other.

    A fresh process (so the peak RSS is this compile's, tokenizer included), SmolLM2's real
    vocabulary; measured 3-6 s and 0.4 GiB on the shared 2-core VM, hence the 10 s / 2 GiB bounds.
    """
    import json
    import subprocess
    import sys

    patterns = [r"[A-Z][^\n]{65}[.!?]", r"[A-Z][ -~]{65}[.!?]"]
    done = subprocess.run(
        [sys.executable, "-c", _SENTENCE_SCRIPT, *patterns], capture_output=True, text=True, timeout=300, check=True
    )
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(seconds < 10 for seconds in measured["seconds"].values()), measured
    assert measured["peak_gib"] < 2, measured
