"""Features from the same decode, and the heads' clear errors (tiny random Llama)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest

import ppl
from ppl.inference import bidirectional_bounds, elbo, fit, smc, smc_bound
from ppl.models import ProposalHead, TwistHead, with_twist
from ppl.models.toy_lm import PROMPT, enumerate_posterior, posterior_choices, tiny_generation, tiny_llama


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(0)


def test_decode_returns_the_features_the_logits_are_read_from(lm):
    """One decode gives the logits of ``decode`` and features with ``logits = f · E^T``."""

    @jax.jit
    def both(lm, tokens):
        cache = ppl.prompt_cache(lm, jnp.array(PROMPT), 8, 3)
        return lm.decode(cache, tokens), lm.decode_with_features(cache, tokens)

    (logits, cache_a), (logits_f, features, cache_b) = both(lm, jnp.array([0, 1, 3]))
    assert isinstance(lm, ppl.FeatureLM) and features.shape == (3, lm.hidden_size)
    np.testing.assert_array_equal(logits, logits_f)
    np.testing.assert_allclose(features @ lm.output_embedding.T, logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache_a.keys, cache_b.keys)


@pytest.mark.slow
def test_untrained_heads_change_nothing_and_gradients_skip_the_lm(lm):
    """``U = 0``: the twist is 0 everywhere; the gradient of a head objective has exactly the
    head's leaves (the LM is closed over, not differentiated)."""
    head = TwistHead(lm, 4, jax.random.key(0))
    features = jax.random.normal(jax.random.key(1), (5, lm.hidden_size))
    assert jnp.all(head(features, lm.output_embedding) == 0)
    program = tiny_generation(lm)
    grads = jax.grad(lambda h: smc_bound(with_twist(program, h), jax.random.key(2), 2, 2))(head)
    assert jax.tree.structure(grads) == jax.tree.structure(head)
    assert float(jnp.abs(grads.up).sum()) > 0  # a learning signal reaches the head


def test_a_head_for_another_lm_is_a_clear_error(lm):
    head = TwistHead(lm, 4, jax.random.key(0))
    with pytest.raises(ValueError, match="hidden_size=32.*hidden_size=16"):
        head.twist(tiny_llama(0, hidden_size=16))
    with pytest.raises(ValueError, match="vocab_size=8.*vocab_size=9"):
        ProposalHead(lm, 4, jax.random.key(0)).proposal(tiny_generation(tiny_llama(0, vocab_size=9), constraint=None))
    with pytest.raises(ValueError, match="rank"):
        TwistHead(lm, 0, jax.random.key(0))


def test_a_twist_of_the_wrong_shape_is_a_clear_error(lm):
    program = tiny_generation(lm, twist=lambda state: jnp.zeros((state.length.shape[0], 7)))
    with pytest.raises(ValueError, match=r"twist returned shape \[4, 7\].*\[4, 8\]"):
        smc(program, jax.random.key(0), 4)


@pytest.mark.slow
def test_a_nan_twist_is_a_clear_error(lm):
    """A head whose output is NaN: ``fit`` stops at step 0 and the bounds refuse to report."""
    program = tiny_generation(lm)
    head = TwistHead(lm, 4, jax.random.key(0))
    head = eqx.tree_at(lambda h: h.bias, head, jnp.full(8, jnp.nan))
    objective = lambda h, key: smc_bound(with_twist(program, h), key, 2, 2)  # noqa: E731
    with pytest.raises(FloatingPointError, match="not finite at step 0"):
        fit(objective, head, jax.random.key(0), 3, optax.adam(1e-2))
    posterior = posterior_choices(enumerate_posterior(lm), jax.random.key(1), 2)
    with pytest.raises(ValueError, match="NaN"):
        bidirectional_bounds(with_twist(program, head), jax.random.key(0), 2, posterior)


class OnlyPotentials(ppl.StateSpace):
    """A program with no latent site: its Z is exact and there is nothing to propose."""

    max_steps: int = eqx.field(static=True, default=2)

    def init(self):
        return jnp.zeros(())

    def step(self, state, t):
        numpyro.factor("score", -1.0)
        return state + 1


def test_an_objective_on_a_program_without_latent_sites_is_a_clear_error():
    guide = lambda name, prior, state, t: None  # noqa: E731
    with pytest.raises(ValueError, match="no latent sample sites"):
        elbo(OnlyPotentials(), guide, jax.random.key(0))
    with pytest.raises(ValueError, match="no latent sample sites"):
        smc_bound(OnlyPotentials(), jax.random.key(0), 2)
