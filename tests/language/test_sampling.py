"""``ppl.distributions.sample_logits``: the token sampler every generation program uses.

It must draw exactly from ``softmax(logits)``: checked by a chi-square goodness-of-fit test
(fixed seed, p > 0.001) on vocabularies that exercise one block, several blocks and a ragged
last block, with forbidden tokens that must never appear.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ppl.distributions import Categorical, sample_logits

DRAWS = 200_000


@pytest.mark.parametrize("vocab, block", [(6, 256), (40, 8), (1000, 256)])
def test_draws_follow_the_softmax(vocab, block):
    logits = 2.0 * jax.random.normal(jax.random.key(vocab), (vocab,))
    forbidden = jnp.arange(vocab) % 5 == 1
    logits = jnp.where(forbidden, -jnp.inf, logits)
    draws = jax.jit(sample_logits, static_argnums=2)(jax.random.key(0), jnp.broadcast_to(logits, (DRAWS, vocab)), block)
    counts = np.bincount(np.asarray(draws), minlength=vocab)
    expected = DRAWS * np.asarray(jax.nn.softmax(logits), np.float64)
    assert counts[np.asarray(forbidden)].sum() == 0
    # Pool the categories expected fewer than 5 times, as the chi-square approximation needs.
    small = expected < 5
    observed = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    chi2, p = stats.chisquare(observed[keep], expected[keep] * observed[keep].sum() / expected[keep].sum())
    print(f"vocab {vocab}, block {block}: chi2 {chi2:.1f} on {keep.sum() - 1} dof, p = {p:.3f}")
    assert p > 0.001


def test_rows_batch_and_degenerate_rows():
    logits = jnp.array([[0.0, -jnp.inf, -jnp.inf], [-jnp.inf, -jnp.inf, 5.0], [-jnp.inf] * 3])
    tokens = sample_logits(jax.random.key(1), logits)
    assert tokens.shape == (3,) and tokens.dtype == jnp.int32
    # A one-token row always gives it; a row with no finite logit gives token 0.
    assert tokens.tolist() == [0, 2, 0]


def test_categorical_is_numpyros_categorical_with_the_fast_sampler():
    logits = jnp.log(jnp.array([0.2, 0.5, 0.3]))
    d = Categorical(logits=logits)
    draws = d.sample(jax.random.key(2), (4, 5000))
    assert draws.shape == (4, 5000)
    frequencies = np.bincount(np.asarray(draws).ravel(), minlength=3) / draws.size
    # 20,000 draws: standard error of each frequency <= 0.0036, so 0.015 is > 4 SE.
    np.testing.assert_allclose(frequencies, [0.2, 0.5, 0.3], atol=0.015)
    np.testing.assert_allclose(d.log_prob(jnp.array(1)), jnp.log(0.5), rtol=1e-6)
