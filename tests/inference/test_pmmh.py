"""Particle marginal Metropolis–Hastings against exact posteriors of a global latent θ, and a
language model's temperature as a latent of an ordinary NumPyro model under NUTS.

- continuous θ: the stickiness of an HMM's transitions; ``p(θ | y) ∝ p(θ) p(y | θ)`` on a
  fine grid, ``p(y | θ)`` by the forward algorithm.
- discrete θ: which of three prompts the tiny Llama continues; ``Z(θ)`` (the constrained,
  reward-weighted mass of that prompt's continuations) by enumeration.

Chain-based checks use the *final* states of many independent chains: those are independent
draws, so the Monte Carlo error of a mean is ``sd / sqrt(n_chains)`` exactly, with no
autocorrelation estimate to trust.
"""

import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jaxtyping import Array, Float, Int
from numpyro.diagnostics import effective_sample_size
from numpyro.infer import MCMC, NUTS
from scipy import stats

import ppl
from ppl.inference.pmmh import pmmh
from ppl.models.constraints import TokenDFA, regex
from ppl.models.llama import Llama
from ppl.models.toy import CategoricalHMM
from ppl.models.toy_lm import (
    EOS,
    MAX_NEW,
    PATTERN,
    PROMPT,
    enumerate_posterior,
    tiny_generation,
    tiny_llama,
    tiny_tokenizer,
)

STICKINESS = 2.0  # θ0: the stickiness the HMM data are simulated at
STICKINESS_PRIOR = dist.Gamma(2.0, 1.0)  # mean 2, sd 1.41; positive, so PMMH walks in log θ


class StickyHMM(eqx.Module):
    """``θ -> `` the HMM with transitions ``softmax(base_logits + θ I)`` as a program (the
    locally optimal proposal: low-variance Ẑ). Its arrays are data, so new observations of
    the same shape reuse the compiled chain."""

    initial_probs: Float[Array, " K"]
    base_logits: Float[Array, "K K"]
    emission: Float[Array, "K M"]
    observations: Int[Array, " T"]

    def model(self, theta: Float[Array, ""]) -> CategoricalHMM:
        n_states = self.base_logits.shape[0]
        transition = jax.nn.softmax(self.base_logits + theta * jnp.eye(n_states), axis=-1)
        return CategoricalHMM(self.initial_probs, transition, self.emission, self.observations)

    def __call__(self, theta: Float[Array, ""]) -> ppl.StateSpace:
        return self.model(theta).program(optimal_proposal=True)


def sticky_hmm(seed: int, n_steps: int, n_states: int = 3, n_symbols: int = 4) -> StickyHMM:
    """Random base logits and sharp emissions, observations simulated at ``STICKINESS``."""
    base_key, emission_key, data_key = jax.random.split(jax.random.key(seed), 3)
    unobserved = StickyHMM(
        jnp.ones(n_states) / n_states,
        0.5 * jax.random.normal(base_key, (n_states, n_states)),
        jax.nn.softmax(3.0 * jax.random.normal(emission_key, (n_states, n_symbols)), axis=-1),
        jnp.zeros(n_steps, jnp.int32),
    )
    _, observations = unobserved.model(jnp.float32(STICKINESS)).sample_prior(data_key)
    return eqx.tree_at(lambda hmm: hmm.observations, unobserved, observations)


def grid_moments(grid: np.ndarray, log_density: np.ndarray) -> tuple[float, float, float, float]:
    """Mean, sd and fourth central moment of a density known on a fine uniform grid, and the
    mass in the outer 1% of the grid at either end (must be negligible for the grid to do)."""
    weights = np.exp(log_density - log_density.max())
    weights /= weights.sum()
    mean = float(np.sum(weights * grid))
    centred = grid - mean
    edge = len(grid) // 100
    return (
        mean,
        float(np.sqrt(np.sum(weights * centred**2))),
        float(np.sum(weights * centred**4)),
        float(weights[:edge].sum() + weights[-edge:].sum()),
    )


def test_pmmh_recovers_the_posterior_of_an_hmm_stickiness():
    """400 chains × 100 iterations, N = 8 particles (Var log Ẑ ≈ 0.5), step 0.5 in log θ;
    80 observations from a 3-state HMM at θ0 = 2. The chains' final states are 400 independent
    posterior draws, so their mean has standard error σ/√400 and their sd
    sqrt((μ4 - σ⁴) / (4 · 400 σ²)) (delta method), with σ, μ4 from the grid. Both must lie
    within 4 SE of the grid's (a false alarm < 1e-4 each). Dropping the log-Jacobian of the
    log-walk would target p(θ)Z(θ)/θ, whose mean is printed: ≈ 5 SE away. The grid itself
    must put θ0 within 3 posterior sd of its mean and shrink the prior sd by at least half."""
    sticky = sticky_hmm(seed=3, n_steps=80)
    grid = np.linspace(1e-3, 10.0, 2000)
    log_likelihood = np.asarray(
        jax.vmap(lambda theta: sticky.model(theta).log_z())(jnp.asarray(grid, jnp.float32)), np.float64
    )
    log_posterior = log_likelihood + np.asarray(STICKINESS_PRIOR.log_prob(grid), np.float64)
    mean, sd, fourth, edge_mass = grid_moments(grid, log_posterior)
    mean_without_jacobian = grid_moments(grid, log_posterior - np.log(grid))[0]
    assert edge_mass < 1e-6, edge_mass
    assert abs(mean - STICKINESS) < 3 * sd and sd < 0.5 * float(STICKINESS_PRIOR.variance) ** 0.5, (mean, sd)

    n_chains = 400
    start = time.perf_counter()
    run = jax.jit(jax.vmap(lambda key: pmmh(sticky, STICKINESS_PRIOR, key, 100, 8, step_size=0.5)))
    chains = run(jax.random.split(jax.random.key(0), n_chains))
    final = np.asarray(chains.samples[:, -1], np.float64)
    seconds = time.perf_counter() - start
    mean_error = abs(final.mean() - mean) / (sd / np.sqrt(n_chains))
    sd_error = abs(final.std() - sd) / np.sqrt((fourth - sd**4) / (4 * n_chains * sd**2))
    acceptance = float(chains.acceptance_rate)
    print(
        f"HMM stickiness: grid {mean:.3f} ± {sd:.3f} (θ0 = {STICKINESS}); PMMH {final.mean():.3f} ± {final.std():.3f} "
        f"(mean off by {mean_error:.2f} SE, sd by {sd_error:.2f} SE; without the Jacobian the mean would be "
        f"{mean_without_jacobian:.3f}, {abs(mean - mean_without_jacobian) / (sd / np.sqrt(n_chains)):.1f} SE away); "
        f"acceptance {acceptance:.3f}; {seconds:.1f} s with compilation"
    )
    assert 0.1 < acceptance < 0.9, acceptance
    assert mean_error < 4 and sd_error < 4, (mean_error, sd_error)


PROMPTS = ((6, 0, 4), PROMPT[:1] + (5, 4), PROMPT[:1] + (3, 4))  # θ = 0 is the default PROMPT
PROMPT_PRIOR = np.array([0.5, 0.3, 0.2])


class PromptChoice(eqx.Module):
    """``θ -> `` the tiny Llama's constrained generation after prompt ``θ`` (one row of a
    ``[3, P]`` array, so a traced ``θ`` indexes it); the regex automaton is built once."""

    lm: Llama
    prompts: Int[Array, "3 P"]
    constraint: TokenDFA

    def __call__(self, theta: Int[Array, ""]) -> ppl.Generation:
        return tiny_generation(self.lm, prompt=self.prompts[theta], constraint=self.constraint)


def chi_square_p(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson chi-square of ``counts`` against ``probabilities`` (normalised here), cells
    with expected count < 5 pooled."""
    expected = probabilities / probabilities.sum() * counts.sum()
    small = expected < 5
    if small.any():
        counts, expected = (
            np.append(counts[~small], counts[small].sum()),
            np.append(expected[~small], expected[small].sum()),
        )
    return float(stats.chisquare(counts, expected).pvalue)


@pytest.mark.slow
@pytest.mark.heavy  # CI time; PMMH is checked against the exact HMM posterior in CI
def test_pmmh_over_prompts_samples_prior_times_evidence():
    """Stationarity of the PMMH kernel with the independence proposal: 1200 chains × 30
    iterations, N = 8 particles, all started at θ = 0 (the prompt whose Ẑ is noisiest,
    Var log Ẑ ≈ 1.8). The final states must follow p(θ) Z(θ) / Σ, with Z(θ) enumerated:
    chi-square p > 0.001. The same counts must reject the prior alone and the evidence alone
    (p < 0.001), so the check sees both factors of the target."""
    lm = tiny_llama(0)
    log_z = np.array(
        [np.logaddexp.reduce(np.array(list(enumerate_posterior(lm, prompt).values()))) for prompt in PROMPTS]
    )
    exact = PROMPT_PRIOR * np.exp(log_z - log_z.max())
    exact /= exact.sum()
    program_fn = PromptChoice(lm, jnp.array(PROMPTS, jnp.int32), regex(PATTERN, tiny_tokenizer()))
    prior = dist.Categorical(probs=jnp.asarray(PROMPT_PRIOR))

    n_chains = 1200
    start = time.perf_counter()
    run = jax.jit(jax.vmap(lambda key: pmmh(program_fn, prior, key, 30, 8, initial=0)))
    chains = run(jax.random.split(jax.random.key(1), n_chains))
    counts = np.bincount(np.asarray(chains.samples[:, -1]), minlength=3)
    seconds = time.perf_counter() - start
    p_value = chi_square_p(counts, exact)
    p_prior, p_evidence = chi_square_p(counts, PROMPT_PRIOR), chi_square_p(counts, np.exp(log_z))
    acceptance = float(chains.acceptance_rate)
    print(
        f"prompt choice: log Z(θ) = {np.round(log_z, 3)}, exact posterior {np.round(exact, 3)}, PMMH "
        f"{np.round(counts / n_chains, 3)}; chi-square p = {p_value:.4f} (prior alone p = {p_prior:.1e}, evidence "
        f"alone p = {p_evidence:.1e}); acceptance {acceptance:.3f}; {seconds:.1f} s with compilation"
    )
    assert p_value > 1e-3
    assert p_prior < 1e-3 and p_evidence < 1e-3


TEMPERATURE = 0.6  # τ0: the temperature the observed texts are sampled at
TEMPERATURE_PRIOR = dist.LogNormal(0.0, 0.5)


def test_language_model_temperature_tempers_sampling_and_scoring():
    """``LanguageModel(temperature=0.6)`` over two tokens: 4000 samples against exp(log_prob)
    of every canonical two-token continuation (which must sum to 1 within float32 rounding):
    chi-square p > 0.001. The same samples must reject the untempered (τ = 1) probabilities
    (p < 0.001), so sampling and scoring both apply the temperature."""
    lm = tiny_llama(0)
    prompt = jnp.array(PROMPT, jnp.int32)
    pairs = jnp.array([(a, b) for a in range(8) for b in range(8) if a != EOS or b == EOS], jnp.int32)
    tempered = ppl.LanguageModel(lm, prompt, 2, EOS, temperature=TEMPERATURE)
    probabilities = np.exp(np.asarray(tempered.log_prob(pairs), np.float64))
    untempered = np.exp(np.asarray(ppl.LanguageModel(lm, prompt, 2, EOS).log_prob(pairs), np.float64))
    assert abs(probabilities.sum() - 1) < 1e-4 and abs(untempered.sum() - 1) < 1e-4
    samples = np.asarray(tempered.sample(jax.random.key(4), (4000,)))
    index = {tuple(pair): i for i, pair in enumerate(np.asarray(pairs).tolist())}
    counts = np.bincount([index[tuple(row)] for row in samples.tolist()], minlength=len(index))
    p_value, p_untempered = chi_square_p(counts, probabilities), chi_square_p(counts, untempered)
    print(f"LanguageModel τ = {TEMPERATURE}: chi-square p = {p_value:.4f}; against τ = 1: p = {p_untempered:.1e}")
    assert p_value > 1e-3 and p_untempered < 1e-3


@pytest.mark.slow
@pytest.mark.heavy  # CI time; PMMH is checked against the exact HMM posterior in CI
def test_nuts_recovers_the_language_model_temperature():
    """A NumPyro model ``τ ~ LogNormal(0, 0.5)``, 50 observed four-token continuations
    ``~ LanguageModel(tiny Llama, temperature=τ)`` sampled at τ0 = 0.6; NUTS (300 warmup +
    300 draws) against the grid posterior of the same log-likelihood. NUTS's mean must lie
    within 4 Monte Carlo SE (grid sd / √ESS) of the grid's, and its sd within 4 SE
    (≈ sd / √(2 ESS), Gaussian approximation) — a false alarm < 1e-4 each; the grid's and
    NUTS's means must lie within 3 posterior sd of τ0 (the texts identify the temperature)."""
    lm = tiny_llama(0)
    prompt = jnp.array(PROMPT, jnp.int32)
    texts = ppl.LanguageModel(lm, prompt, MAX_NEW, EOS, temperature=TEMPERATURE).sample(jax.random.key(0), (50,))

    def model(texts):
        temperature = numpyro.sample("temperature", TEMPERATURE_PRIOR)
        with numpyro.plate("observations", texts.shape[0]):
            numpyro.sample("texts", ppl.LanguageModel(lm, prompt, MAX_NEW, EOS, temperature=temperature), obs=texts)

    grid = np.linspace(0.05, 3.0, 1000)
    log_likelihood = jax.jit(
        jax.vmap(lambda tau: ppl.LanguageModel(lm, prompt, MAX_NEW, EOS, temperature=tau).log_prob(texts).sum())
    )
    log_posterior = np.asarray(log_likelihood(jnp.asarray(grid, jnp.float32)), np.float64) + np.asarray(
        TEMPERATURE_PRIOR.log_prob(grid)
    )
    mean, sd, _, edge_mass = grid_moments(grid, log_posterior)
    assert edge_mass < 1e-6, edge_mass
    assert abs(mean - TEMPERATURE) < 3 * sd, (mean, sd)

    start = time.perf_counter()
    mcmc = MCMC(NUTS(model), num_warmup=300, num_samples=300, progress_bar=False)
    mcmc.run(jax.random.key(1), texts)
    draws = np.asarray(mcmc.get_samples()["temperature"], np.float64)
    seconds = time.perf_counter() - start
    ess = float(effective_sample_size(draws[None]))
    mean_error = abs(draws.mean() - mean) / (sd / np.sqrt(ess))
    sd_error = abs(draws.std() - sd) / (sd / np.sqrt(2 * ess))
    print(
        f"temperature: grid {mean:.3f} ± {sd:.3f} (τ0 = {TEMPERATURE}); NUTS {draws.mean():.3f} ± {draws.std():.3f}, "
        f"ESS {ess:.0f} (mean off by {mean_error:.2f} SE, sd by {sd_error:.2f} SE); {seconds:.1f} s"
    )
    assert mean_error < 4 and sd_error < 4, (mean_error, sd_error)
    assert abs(draws.mean() - TEMPERATURE) < 3 * draws.std()


def test_bad_input_is_a_clear_error():
    sticky = sticky_hmm(seed=0, n_steps=5)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n_iterations must be a positive integer"):
        pmmh(sticky, STICKINESS_PRIOR, key, 0, 4)
    with pytest.raises(ValueError, match="n_particles must be a positive integer"):
        pmmh(sticky, STICKINESS_PRIOR, key, 10, 0)
    for step_size in (0.0, -0.5):
        with pytest.raises(ValueError, match="step_size must be positive"):
            pmmh(sticky, STICKINESS_PRIOR, key, 10, 4, step_size=step_size)
    with pytest.raises(ValueError, match="neither continuous nor enumerable"):
        pmmh(sticky, dist.Poisson(2.0), key, 10, 4)
    with pytest.raises(ValueError, match="outside the support"):
        pmmh(sticky, STICKINESS_PRIOR, key, 10, 4, initial=-1.0)
    with pytest.raises(ValueError, match="outside the support"):
        pmmh(sticky, dist.Categorical(probs=jnp.ones(3) / 3), key, 10, 4, initial=3)
    with pytest.raises(ValueError, match="temperature must be positive"):
        ppl.LanguageModel(tiny_llama(0), jnp.array(PROMPT), MAX_NEW, EOS, temperature=0.0)


def test_second_call_with_new_data_does_not_recompile(compile_counter):
    """Another θ-dependent program of the same shapes (new observations), a new key: zero
    new compilations, and a different chain."""
    data, new_data = sticky_hmm(seed=0, n_steps=10), sticky_hmm(seed=1, n_steps=10)
    first = pmmh(data, STICKINESS_PRIOR, jax.random.key(0), 20, 4)
    first.samples.block_until_ready()
    assert compile_counter.count >= 1
    compile_counter.count = 0
    start = time.perf_counter()
    second = pmmh(new_data, STICKINESS_PRIOR, jax.random.key(1), 20, 4)
    second.samples.block_until_ready()
    print(f"second call: {compile_counter.count} compilations, {time.perf_counter() - start:.2f} s")
    assert compile_counter.count == 0
    assert not np.array_equal(np.asarray(first.samples), np.asarray(second.samples))
