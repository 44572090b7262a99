"""Property-based round trip of the real SmolLM2 tokenizer: ``decode(encode(s)) == s`` for
arbitrary Unicode text (every character UTF-8 can encode), including the chat template's
special tokens written inside the text, and streaming decoding agrees with whole decoding.

The round trip holds for text whose bytes the vocabulary can spell: SmolLM2 has no single-byte
token for 0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xF1, 0xF2, and BPE drops those bytes, as the
reference conversion does (tests/models/test_tokenizer.py checks ids against it). Such text
is checked to lose exactly those bytes.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl.models import Tokenizer, smollm2_path

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
TEXT = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=40),
        st.text("ab 0123456789\n\t\r.", max_size=20),  # digits and whitespace runs: the pre-tokenizer's rules
        st.sampled_from(SPECIAL),
    ),
    max_size=6,
).map("".join)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_path())


@pytest.fixture(scope="module")
def unspellable(tok) -> bytes:
    single = {data for data in tok.vocab_bytes if len(data) == 1}
    return bytes(b for b in range(256) if bytes([b]) not in single)


def test_smollm2_unspellable_bytes(unspellable):
    assert unspellable.hex(" ") == "04 06 13 14 16 1d c0 c1 f1 f2 f5 f6 f7 f8 f9 fa fb fc fd fe ff"


@settings(max_examples=300)
@given(text=TEXT)
def test_decode_encode_round_trip(tok, unspellable, text):
    ids = tok.encode(text, add_special_tokens=False)
    spellable = text.encode().translate(None, unspellable).decode("utf-8", errors="replace")
    assert tok.decode(ids) == spellable
    assert "".join(tok.decode_stream(ids)) == spellable
