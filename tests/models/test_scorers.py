"""Tests of ``ppl.models.scorers`` with the real SmolLM2 tokenizer (and weights, for the judge)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from ppl.models import Llama, Tokenizer
from ppl.models.scorers import count_syllables, haiku, lm_judge, sentiment
from ppl.rewards import exp_reward

BASHO = "An old silent pond\nA frog jumps into the pond\nSplash! Silence again"
FIVE_EIGHT_FIVE = "An old silent pond\nA small frog jumps into the pond\nSplash! Silence again"


@pytest.fixture(scope="module")
def tok(smollm2_file) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_file)


def batch(tok: Tokenizer, texts: list[str], pad: int = 4) -> tuple[jax.Array, jax.Array]:
    """Token ids of ``texts`` right-padded with garbage ids (which must be ignored), and lengths."""
    rows = [tok.encode(text) for text in texts]
    width = max(map(len, rows)) + pad
    tokens = np.full((len(rows), width), 17, np.int32)  # 17: an arbitrary real token as filler
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
    return jnp.asarray(tokens), jnp.asarray([len(row) for row in rows], jnp.int32)


def test_count_syllables():
    assert [count_syllables(w) for w in ["the", "haiku", "syllable", "beautiful", "fire"]] == [1, 2, 3, 3, 2]
    assert count_syllables("Don't stop, well-known river!") == 1 + 1 + 1 + 1 + 2
    assert count_syllables("zorblax") == 2  # not in the CMU dictionary: Pyphen's zor-blax
    assert [count_syllables(line) for line in BASHO.split("\n")] == [5, 7, 5]


def test_sentiment_is_vader_on_decoded_text_in_one_call(tok):
    texts = ["I love this wonderful, beautiful day!", "This is terrible and I hate it.", ""]
    tokens, lengths = batch(tok, texts)
    score = sentiment(tok)
    got = np.asarray(jax.jit(score)(tokens, lengths, jnp.zeros(3, bool)))
    expected = [SentimentIntensityAnalyzer().polarity_scores(text)["compound"] for text in texts]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert got[0] > 0.5 and got[1] < -0.5 and got[2] == 0.0
    assert score.counts.calls == 1
    tilt = exp_reward(score, beta=0.1)(tokens, lengths, jnp.zeros(3, bool))
    np.testing.assert_allclose(tilt, np.asarray(expected) / 0.1, rtol=1e-5)


def test_sentiment_skips_special_tokens(tok):
    tokens, lengths = batch(tok, ["I love it!<|im_end|>"])
    got = sentiment(tok)(tokens, lengths, jnp.ones(1, bool))
    np.testing.assert_allclose(got, [SentimentIntensityAnalyzer().polarity_scores("I love it!")["compound"]])


def all_prefixes(tok: Tokenizer, text: str) -> tuple[jax.Array, jax.Array]:
    """One particle per token prefix of ``text`` (lengths 0..L) in one batch of width L."""
    ids = tok.encode(text)
    tokens = jnp.tile(jnp.asarray(ids, jnp.int32), (len(ids) + 1, 1))
    return tokens, jnp.arange(len(ids) + 1, dtype=jnp.int32)


def test_haiku_accepts_every_prefix_of_a_5_7_5_haiku(tok):
    tokens, lengths = all_prefixes(tok, BASHO)
    constraint = haiku(tok)
    unfinished = np.asarray(jax.jit(constraint)(tokens, lengths, jnp.zeros(len(lengths), bool)))
    np.testing.assert_array_equal(unfinished, np.zeros(len(lengths)))
    assert constraint.counts.calls == 1
    finished = np.asarray(constraint(tokens, lengths, jnp.ones(len(lengths), bool)))
    assert finished[-1] == 0.0 and (finished[:-1] == -np.inf).all()  # only the whole poem is complete


def test_haiku_rejects_5_8_5_once_the_long_line_ends(tok):
    tokens, lengths = all_prefixes(tok, FIVE_EIGHT_FIVE)
    log_psi = np.asarray(haiku(tok)(tokens, lengths, jnp.zeros(len(lengths), bool)))
    texts = [tok.decode(np.asarray(tokens[0, :n]).tolist()) for n in np.asarray(lengths)]
    # Rejected exactly from the first prefix whose second line has ended (or grown a 9th syllable).
    first_bad = next(n for n, text in enumerate(texts) if text.count("\n") == 2)
    assert (log_psi[:first_bad] == 0.0).all() and (log_psi[first_bad:] == -np.inf).all()
    assert haiku(tok)(tokens[-1:], lengths[-1:], jnp.ones(1, bool))[0] == -np.inf


@pytest.mark.parametrize(
    "text, done, ok",
    [
        ("\n" + BASHO + "\n", True, True),  # blank lines are not lines
        (BASHO + "\nMore", False, False),  # a fourth line
        ("An old silent pond and so", False, False),  # "and" overruns line one before it ends
        ("An old silent pond\nA frog", True, False),  # done while incomplete
    ],
)
def test_haiku_edge_cases(tok, text, done, ok):
    tokens, lengths = batch(tok, [text])
    assert (haiku(tok)(tokens, lengths, jnp.full(1, done))[0] == 0.0) == ok


def test_lm_judge_rejects_bad_templates(tok):
    with pytest.raises(ValueError, match="exactly once"):
        lm_judge(None, tok, "no placeholder")
    with pytest.raises(ValueError, match="continue after"):
        lm_judge(None, tok, "Text: {text}")
    with pytest.raises(ValueError, match="single token"):
        lm_judge(None, tok, "{text} ok?", yes=" Yes indeed")


@pytest.mark.slow
def test_lm_judge_padded_batch_equals_single_forwards(smollm2: Llama, tok):
    template = "Here is a review: {text}\nIs the review positive? Answer:"
    judge = lm_judge(smollm2, tok, template)
    texts = ["I loved every minute of this film.", "Dull.", ""]
    tokens, lengths = batch(tok, texts, pad=5)
    got = np.asarray(eqx.filter_jit(judge)(tokens, lengths, jnp.zeros(3, bool)))
    prefix, suffix = template.split("{text}")
    for value, text in zip(got, texts):
        ids = [
            *tok.encode(prefix, add_special_tokens=False),
            *tok.encode(text),
            *tok.encode(suffix, add_special_tokens=False),
        ]
        logits = smollm2(jnp.asarray(ids, jnp.int32))[-1]
        yes, no = logits[tok.encode(" Yes")[0]], logits[tok.encode(" No")[0]]
        np.testing.assert_allclose(value, jax.nn.log_sigmoid(yes - no), atol=1e-4)
    assert np.all(got < 0) and len(set(got.tolist())) == 3
