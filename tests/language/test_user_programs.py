"""A user's own LM program, written with public pieces only, under every transformation.

``TwoPrompts`` is what a user of LLaMPPL would call prompt intersection, with a continuous
latent on top: a per-particle "style" ``z ~ N(0, 1)`` shifts the next-token logits of the LM
under prompt A along a fixed direction, and the LM under prompt B scores each token — two LM
calls (two KV caches) per step::

    gamma(z, x) = N(z; 0, 1) · prod_t softmax(logits_A(x_{<t}) + z · bias)[x_t] · p_B(x_t | x_{<t})

over sequences that end at EOS or are cut at ``T`` tokens. The caches come from
``ppl.prompt_cache`` and are reindexed, frozen and rolled back by themselves (``KVCache`` is a
``ppl.ParticleCache``): the program overrides nothing. ``Z`` and ``E[z]`` are exact by
enumerating every sequence and integrating ``z`` on a fine grid.
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl
from ppl.inference import particle_gibbs, smc, suffix_mh
from ppl.models import Llama
from ppl.models.toy_lm import EOS, VOCAB, tiny_llama

PROMPT_A = jnp.array([6, 0, 4], jnp.int32)
PROMPT_B = jnp.array([6, 2, 2], jnp.int32)
T = 3
BIAS = jnp.array([1.0, -1.0, 0.5, 0.0, -0.5, 0.0, 0.0, 0.3])  # the style direction over VOCAB


class TwoPrompts(ppl.StateSpace):
    lm: Llama
    bias: jax.Array
    max_steps: int = eqx.field(static=True, default=T)
    batched = True

    def init(self, n):
        z = numpyro.sample("z", dist.Normal(jnp.zeros(n), 1.0))
        max_len = PROMPT_A.shape[0] - 1 + self.max_steps
        return {
            "z": z,
            "cache_a": ppl.prompt_cache(self.lm, PROMPT_A, max_len, n),
            "cache_b": ppl.prompt_cache(self.lm, PROMPT_B, max_len, n),
            "last": jnp.full(n, -1, jnp.int32),
            "finished": jnp.zeros(n, bool),
        }

    def step(self, state, t):
        active = ~state["finished"]
        first = t == 0
        next_a = ppl.NextToken(self.lm, state["cache_a"], jnp.where(first, PROMPT_A[-1], state["last"]), active)
        next_b = ppl.NextToken(self.lm, state["cache_b"], jnp.where(first, PROMPT_B[-1], state["last"]), active)
        token = numpyro.sample("token", dist.Categorical(logits=next_a.logits + state["z"][:, None] * self.bias))
        ppl.observe("prompt_b", next_b, token)
        return {
            **state,
            "cache_a": next_a.cache,
            "cache_b": next_b.cache,
            "last": token.astype(jnp.int32),
            "finished": token == EOS,
        }

    def done(self, state):
        return state["finished"]


@pytest.fixture(scope="module")
def world():
    lm = tiny_llama(0)
    return lm, TwoPrompts(lm, BIAS), exact_answers(lm)


def exact_answers(lm):
    """log Z and E[z | data] by enumeration over sequences and a 4001-point grid over z."""
    words = [v for v in range(len(VOCAB)) if v != EOS]
    by_length = {n: [body + (EOS,) for body in itertools.product(words, repeat=n - 1)] for n in range(1, T + 1)}
    by_length[T] += list(itertools.product(words, repeat=T))
    forward = jax.jit(jax.vmap(lambda tokens: lm(tokens)))
    grid = np.linspace(-8, 8, 4001)
    bias = np.asarray(BIAS, np.float64)
    log_joint_z = np.full(len(grid), -np.inf)  # log sum_x gamma(z, x) / N(z; 0, 1), on the grid
    for sequences in by_length.values():
        x = np.array(sequences)  # [M, n]
        logits_a = np.asarray(forward(jnp.concatenate([jnp.broadcast_to(PROMPT_A, (len(x), 3)), x], 1)), np.float64)[
            :, 2:-1
        ]
        logits_b = np.asarray(forward(jnp.concatenate([jnp.broadcast_to(PROMPT_B, (len(x), 3)), x], 1)), np.float64)[
            :, 2:-1
        ]
        log_b = logits_b - np.logaddexp.reduce(logits_b, axis=-1, keepdims=True)
        picked_b = np.take_along_axis(log_b, x[..., None], -1)[..., 0].sum(-1)  # [M]
        for part in np.array_split(np.arange(len(grid)), 16):
            shifted = logits_a[:, None] + grid[part][None, :, None, None] * bias  # [M, g, n, V]
            log_a = shifted - np.logaddexp.reduce(shifted, axis=-1, keepdims=True)
            picked_a = np.take_along_axis(log_a, np.broadcast_to(x[:, None, :, None], log_a.shape[:3] + (1,)), -1)[
                ..., 0
            ].sum(-1)
            log_joint_z[part] = np.logaddexp(
                log_joint_z[part], np.logaddexp.reduce(picked_a + picked_b[:, None], axis=0)
            )
    log_joint_z += -0.5 * grid**2 - 0.5 * np.log(2 * np.pi)
    log_dz = np.log(grid[1] - grid[0])
    log_z = np.logaddexp.reduce(log_joint_z) + log_dz
    posterior_mean_z = float(np.sum(grid * np.exp(log_joint_z + log_dz - log_z)))
    return log_z, posterior_mean_z


def test_smc_evidence_and_posterior_mean_of_the_continuous_latent(world):
    """SMC, N = 32, 1000 seeds: mean Ẑ/Z within 3 SE of 1, and the properly weighted estimate
    of E[z | data] (mean over seeds of Σ_i (w_i / Z) z_i, unbiased) within 4.5 SE."""
    lm, program, (log_z, mean_z) = world
    results = jax.jit(jax.vmap(lambda key: smc(program, key, 32)))(jax.random.split(jax.random.key(0), 1000))
    ratios = np.exp(np.asarray(results.log_z, np.float64) - log_z)
    standard_error = ratios.std(ddof=1) / np.sqrt(len(ratios))
    weighted_z = np.sum(
        np.exp(np.asarray(results.log_weights, np.float64) - log_z) * np.asarray(results.choices["z"][:, :, 0]), axis=1
    )
    z_error = abs(weighted_z.mean() - mean_z) / (weighted_z.std(ddof=1) / np.sqrt(len(weighted_z)))
    print(
        f"TwoPrompts SMC: mean Ẑ/Z = {ratios.mean():.4f} ± {standard_error:.4f}; E[z] {weighted_z.mean():.4f} vs exact {mean_z:.4f} ({z_error:.2f} SE)"
    )
    assert abs(ratios.mean() - 1) < 3 * standard_error
    assert z_error < 4.5
    np.testing.assert_array_equal(results.choices["z"][:, :, 0], results.particles["z"])


def test_resample_move_keeps_the_evidence_unbiased(world):
    """The same program with suffix_mh(2) after every step (two caches rolled back by their
    lengths): mean Ẑ/Z within 3 SE of 1 over 1000 seeds."""
    lm, program, (log_z, _) = world
    results = jax.jit(jax.vmap(lambda key: smc(program, key, 16, rejuvenate=suffix_mh(2))))(
        jax.random.split(jax.random.key(1), 1000)
    )
    ratios = np.exp(np.asarray(results.log_z, np.float64) - log_z)
    standard_error = ratios.std(ddof=1) / np.sqrt(len(ratios))
    print(
        f"TwoPrompts resample-move: mean Ẑ/Z = {ratios.mean():.4f} ± {standard_error:.4f}, "
        f"acceptance {float(np.mean(results.acceptance_rate[:, 1:])):.3f}"
    )
    assert abs(ratios.mean() - 1) < 3 * standard_error


@pytest.mark.slow
@pytest.mark.heavy  # CI time; particle Gibbs is checked against exact posteriors in test_gibbs
def test_particle_gibbs_samples_the_continuous_latent(world):
    """Particle Gibbs with ancestor sampling (the reference's z is pinned at init, its tokens
    at every step), 500 chains × 15 sweeps, N = 8: the final z's mean within 4.5 SE of the
    exact posterior mean (SE from the final states' spread: they are independent)."""
    lm, program, (_, mean_z) = world
    run = jax.jit(jax.vmap(lambda key: particle_gibbs(program, key, 8, 15, ancestor_sampling=True)))
    result = run(jax.random.split(jax.random.key(2), 500))
    final_z = np.asarray(result.samples["z"][:, -1, 0], np.float64)
    error = abs(final_z.mean() - mean_z) / (final_z.std(ddof=1) / np.sqrt(len(final_z)))
    print(f"TwoPrompts PGAS: E[z] {final_z.mean():.4f} vs exact {mean_z:.4f} ({error:.2f} SE)")
    assert error < 4.5
