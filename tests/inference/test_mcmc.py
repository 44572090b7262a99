"""Particle-independent MH against the exact HMM posterior."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from ppl.inference import importance, pimh, smc
from ppl.models.toy import random_hmm


@pytest.fixture(scope="module")
def hmm():
    return random_hmm(jax.random.key(2), n_states=2, n_obs_symbols=3, n_steps=4)


def _exact_path_probabilities(hmm):
    paths = np.array(list(itertools.product(range(2), repeat=hmm.n_steps)))
    log_joint = np.asarray(jax.vmap(hmm.log_joint)(jnp.asarray(paths)), np.float64)
    return paths, np.exp(log_joint - float(hmm.log_z()))


def _chi_square_p_value(samples, paths, probabilities):
    """Pearson chi-square over whole paths, pooling cells with expected count < 5."""
    codes = samples @ (2 ** np.arange(samples.shape[1]))
    path_codes = paths @ (2 ** np.arange(paths.shape[1]))
    observed = np.array([(codes == c).sum() for c in path_codes], np.float64)
    expected = probabilities / probabilities.sum() * len(samples)
    small = expected < 5
    if small.any():
        observed = np.append(observed[~small], observed[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
    return stats.chisquare(observed, expected).pvalue


@pytest.mark.parametrize("sampler_name", ["smc", "importance"])
def test_pimh_chains_sample_the_exact_posterior(hmm, sampler_name):
    """4000 independent chains, 20 iterations each, N = 4 particles per proposal (small N
    keeps the acceptance rate well below 1, so the MH correction matters). The chains'
    final states are independent draws; a Pearson chi-square test over all 16 paths against
    the forward-algorithm posterior must give p > 0.001."""
    paths, probabilities = _exact_path_probabilities(hmm)
    base = {"smc": smc, "importance": importance}[sampler_name]
    sampler = functools.partial(base, hmm.program(), n_particles=4)
    chains = jax.jit(jax.vmap(lambda key: pimh(sampler, key, 20)))(jax.random.split(jax.random.key(0), 4000))
    final = np.asarray(chains.samples["path"][:, -1])
    acceptance = float(chains.acceptance_rate)
    assert 0.2 < acceptance < 0.95, acceptance
    p_value = _chi_square_p_value(final, paths, probabilities)
    print(f"PIMH ({sampler_name}): acceptance {acceptance:.3f}, chi-square p = {p_value:.4f}")
    assert p_value > 1e-3, p_value


def test_chi_square_check_rejects_the_wrong_distribution(hmm):
    """The same check has power: draws from the prior instead of the posterior fail it."""
    paths, probabilities = _exact_path_probabilities(hmm)
    prior_draws = jax.vmap(lambda k: hmm.sample_prior(k)[0])(jax.random.split(jax.random.key(1), 4000))
    assert _chi_square_p_value(np.asarray(prior_draws), paths, probabilities) < 1e-3


def test_pimh_rejects_bad_sample_count(hmm):
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        pimh(functools.partial(smc, hmm.program(), n_particles=4), jax.random.key(0), 0)
