"""SMC's public kernel pieces: ``smc`` rebuilt from them, a new variant written with them,
and the trajectories every run records."""

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl
from ppl.inference import kernel, smc
from ppl.inference.resampling import systematic
from ppl.models.toy import abc_bigram, random_hmm
from ppl.models.toy_lm import EOS, MAX_NEW, PROMPT, tiny_llama


@pytest.fixture(scope="module")
def hmm():
    return random_hmm(jax.random.key(7), n_states=3, n_obs_symbols=4, n_steps=8)


def smc_from_pieces(program, key, n_particles, ess_threshold=0.5):
    """``ppl.inference.smc`` written by a user from public names only."""
    init_key, loop_key = jax.random.split(key)
    state = kernel.init(program, init_key, n_particles)

    def advance(state, t):
        running = ~jnp.all(kernel.done(program, state.particles)) & (state.ess > 0)

        def run(state):
            step_key, _ = jax.random.split(jax.random.fold_in(loop_key, t))
            resample_key, propagate_key = jax.random.split(step_key)
            resampled = kernel.should_resample(state, ess_threshold)
            state, ancestors = kernel.resample(program, resample_key, state, resampler=systematic, when=resampled)
            state = kernel.propagate(program, propagate_key, state, t)
            return state, kernel.SMCInfo(state.ess, ancestors, resampled, state.choices)

        return jax.lax.cond(running, run, lambda s: (s, kernel.idle(s)), state)

    state, history = jax.lax.scan(advance, state, jnp.arange(program.max_steps))
    return kernel.finalize(state, history)


@pytest.mark.parametrize("model", ["hmm", "bigram"])
def test_smc_rebuilt_from_public_pieces_is_identical(hmm, model):
    """Same key, same particles, weights, ancestry and trajectories, bit for bit."""
    program = hmm.program() if model == "hmm" else abc_bigram(5).program()
    key = jax.random.key(3)
    reference = smc(program, key, 32)
    rebuilt = jax.jit(lambda key: smc_from_pieces(program, key, 32))(key)
    for name in ("log_weights", "log_z", "ess", "ancestors", "resampled", "n_steps"):
        np.testing.assert_array_equal(getattr(reference, name), getattr(rebuilt, name), err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, reference.particles, rebuilt.particles)
    jax.tree.map(np.testing.assert_array_equal, reference.choices, rebuilt.choices)


def test_a_new_variant_from_pieces_resampling_at_fixed_times_is_unbiased(hmm):
    """A variant ``smc`` does not offer: resample before every third step, whatever the ESS.
    Mean Ẑ/Z within 3 standard errors of 1 over 2000 seeds (the same tolerance as ``smc``'s
    own unbiasedness tests), which a wrong banking of the evidence would miss."""
    program = hmm.program()

    def fixed_times(key):
        init_key, loop_key = jax.random.split(key)
        state = kernel.init(program, init_key, 16)

        def advance(state, t):
            resample_key, propagate_key = jax.random.split(jax.random.fold_in(loop_key, t))
            state, _ = kernel.resample(program, resample_key, state, resampler=systematic, when=t % 3 == 0)
            return kernel.propagate(program, propagate_key, state, t), None

        state, _ = jax.lax.scan(advance, state, jnp.arange(program.max_steps))
        return state.log_z_prefix + jax.nn.logsumexp(state.log_weights) - math.log(16)

    log_z = np.asarray(jax.jit(jax.vmap(fixed_times))(jax.random.split(jax.random.key(0), 2000)), np.float64)
    ratios = np.exp(log_z - float(hmm.log_z()))
    standard_error = ratios.std(ddof=1) / np.sqrt(len(ratios))
    print(f"fixed-time resampling: mean Ẑ/Z = {ratios.mean():.4f} ± {standard_error:.4f}")
    assert abs(ratios.mean() - 1) < 3 * standard_error


def test_progress_runs_in_segments_with_the_same_result(hmm):
    """With ``progress`` the run is a host loop over compiled segments (what keeps a progress
    bar compatible with the persistent compilation cache): bit-identical result for the same
    key, one report per segment, the last one after every step. 7 steps in segments of 3
    checks the partial last segment."""
    program = hmm.program()
    reports = []
    plain = smc(program, jax.random.key(5), 32, ess_threshold=0.7)
    segmented = smc(
        program,
        jax.random.key(5),
        32,
        ess_threshold=0.7,
        progress_every=3,
        progress=lambda steps, ess, finished: reports.append((steps, float(ess), int(finished))),
    )
    assert [steps for steps, _, _ in reports] == [3, 6, program.max_steps]
    assert reports[-1][1] == pytest.approx(float(plain.ess[-1]))
    jax.tree.map(np.testing.assert_array_equal, plain, segmented)
    with pytest.raises(ValueError, match="progress_every"):
        smc(program, jax.random.key(5), 32, progress=print, progress_every=0)


def test_trajectories_are_the_choices_along_each_lineage(hmm):
    """``choices["x"][i]`` is particle i's latent path: column 0 from init, column t+1 from
    step t, equal to the path the HMM program keeps in its own state (resampling included)."""
    result = smc(hmm.program(), jax.random.key(1), 64, ess_threshold=1.0)
    assert result.choices["x"].shape == (64, hmm.n_steps)
    assert bool(result.resampled.all())
    np.testing.assert_array_equal(result.choices["x"], result.particles["path"])


def test_trajectories_of_a_batched_lm_program_are_its_tokens():
    """Generation records one token per step; finished particles record zeros after EOS."""
    program = ppl.Generation(tiny_llama(0), jnp.array(PROMPT), MAX_NEW, EOS)
    result = smc(program, jax.random.key(2), 16)
    tokens, length = np.asarray(result.particles.tokens), np.asarray(result.particles.length)
    trajectory = np.asarray(result.choices["token"])
    assert trajectory.shape == (16, MAX_NEW + 1)
    for i, (row, n) in enumerate(zip(trajectory, length)):
        np.testing.assert_array_equal(row[1 : n + 1], tokens[i, :n])
        if result.particles.ended_with_eos[i]:
            assert row[n + 1] == EOS
            assert np.all(row[n + 2 :] == 0)


class Drift(ppl.StateSpace):
    """x_0 ~ N(0, 1); x_{t+1} ~ N(x_t, 1) observed as y_t ~ N(x_{t+1}, 1). Batched on purpose."""

    ys: jax.Array
    max_steps: int = eqx.field(static=True)
    batched = True

    def init(self, n):
        return {"x": numpyro.sample("x", dist.Normal(jnp.zeros(n), 1.0))}

    def step(self, state, t):
        x = numpyro.sample("x", dist.Normal(state["x"], 1.0))
        ppl.observe("y", dist.Normal(x, 1.0), self.ys[t])
        return {"x": x}


def test_a_tempering_variant_from_pieces_is_unbiased():
    """A user's annealing schedule from the pieces: step 0 proposes from the prior (its
    potential tempered to 0 by ``ppl.temper``), then the likelihood enters in two halves
    through ``reweight`` with a resampling in between. Mean Ẑ/Z within 3 SE of 1 over 2000
    seeds against the exact Gaussian evidence."""
    y = 1.5
    program = Drift(jnp.array([y]), 1)
    # x_0 ~ N(0, 1), x_1 ~ N(x_0, 1), y ~ N(x_1, 1): Z = N(y; 0, 3).
    exact = float(dist.Normal(0.0, math.sqrt(3.0)).log_prob(y))

    def tempered(key):
        init_key, step_key, resample_key = jax.random.split(key, 3)
        state = kernel.init(program, init_key, 64)
        with ppl.temper(beta=0.0):
            state = kernel.propagate(program, step_key, state, jnp.int32(0))
        log_likelihood = lambda state: dist.Normal(state.choices["x"], 1.0).log_prob(y)  # noqa: E731
        state = kernel.reweight(state, 0.5 * log_likelihood(state))
        state, _ = kernel.resample(program, resample_key, state, resampler=systematic)
        state = kernel.reweight(state, 0.5 * log_likelihood(state))
        return state.log_z_prefix + jax.nn.logsumexp(state.log_weights) - math.log(64)

    log_z = np.asarray(jax.jit(jax.vmap(tempered))(jax.random.split(jax.random.key(5), 2000)), np.float64)
    ratios = np.exp(log_z - exact)
    standard_error = ratios.std(ddof=1) / np.sqrt(len(ratios))
    print(f"tempering from pieces: mean Ẑ/Z = {ratios.mean():.4f} ± {standard_error:.4f}")
    assert abs(ratios.mean() - 1) < 3 * standard_error, (ratios.mean(), standard_error)
