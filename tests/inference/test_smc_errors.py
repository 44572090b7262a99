"""Bad input gets a clear error; impossible and NaN potentials get a defined result."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import ppl
from ppl.inference import smc
from ppl.models.toy import random_hmm


class Walk(ppl.StateSpace):
    """A Gaussian random walk with a user-chosen log-potential per step."""

    log_potential: jax.Array  # [max_steps]
    max_steps: int = eqx.field(static=True)

    def init(self):
        return {"x": jnp.zeros(())}

    def step(self, state, t):
        x = numpyro.sample("x", dist.Normal(state["x"], 1.0))
        numpyro.factor("g", self.log_potential[t])
        return {"x": x}


class ShapeChanging(ppl.StateSpace):
    max_steps: int = eqx.field(static=True, default=3)

    def init(self):
        return {"x": jnp.zeros(2)}

    def step(self, state, t):
        return {"x": jnp.zeros(3)}


@pytest.fixture(scope="module")
def program():
    return random_hmm(jax.random.key(0), 2, 2, 4).program()


@pytest.mark.parametrize("n_particles", [0, -3, 2.5, True, "8"])
def test_bad_particle_counts(program, n_particles):
    with pytest.raises(ValueError, match="n_particles must be a positive integer"):
        smc(program, jax.random.key(0), n_particles)


@pytest.mark.parametrize("threshold", [-0.1, 1.5, float("nan")])
def test_bad_ess_threshold(program, threshold):
    with pytest.raises(ValueError, match=r"ess_threshold must lie in \[0, 1\]"):
        smc(program, jax.random.key(0), 8, ess_threshold=threshold)


def test_unknown_resampling(program):
    with pytest.raises(ValueError, match="unknown resampling scheme 'sistematic'"):
        smc(program, jax.random.key(0), 8, resampling="sistematic")


def test_step_that_changes_shapes_is_named():
    with pytest.raises(ValueError, match=r"changed state leaf \['x'\] from float32\[2\] to float32\[3\]"):
        smc(ShapeChanging(), jax.random.key(0), 4)


def test_not_a_program():
    with pytest.raises(TypeError, match="must be a ppl.StateSpace"):
        smc(lambda: None, jax.random.key(0), 4)


def test_mismatched_hmm_shapes_are_named():
    hmm = random_hmm(jax.random.key(0), 3, 4, 5)
    with pytest.raises(ValueError):
        type(hmm)(hmm.initial_probs, hmm.transition[:2], hmm.emission, hmm.observations)


def _assert_no_nan(result):
    for leaf in jax.tree.leaves(result):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert not np.any(np.isnan(np.asarray(leaf)))


@pytest.mark.parametrize("ess_threshold", [0.0, 0.5, 1.0])
def test_impossible_step_kills_everything_without_nan(ess_threshold):
    """A step whose potentials are all -inf: log_z = -inf, all_dead set, no NaN anywhere,
    and the remaining steps are skipped."""
    potentials = jnp.array([0.0, -jnp.inf, 0.0, 0.0])
    result = smc(Walk(potentials, max_steps=4), jax.random.key(0), 16, ess_threshold=ess_threshold)
    assert bool(result.all_dead) and np.isneginf(float(result.log_z))
    assert int(result.n_steps) == 2
    _assert_no_nan(result)
    np.testing.assert_allclose(result.weights, 1 / 16)


def test_nan_potential_kills_its_particle_and_is_flagged():
    """Documented behaviour: a NaN log-potential is treated as -inf for that particle (it
    can never be resampled) and ``nan_weights`` is set; the others carry on unchanged."""

    class HalfNaN(Walk):
        def step(self, state, t):
            x = numpyro.sample("x", dist.Normal(state["x"], 1.0))
            numpyro.factor("g", jnp.where(x > 0, jnp.nan, 0.0))
            return {"x": x}

    result = smc(HalfNaN(jnp.zeros(1), max_steps=1), jax.random.key(1), 64)
    assert bool(result.nan_weights) and not bool(result.all_dead)
    alive = np.isfinite(np.asarray(result.log_weights))
    assert 0 < alive.sum() < 64
    assert np.all(np.asarray(result.particles["x"])[alive] <= 0)
    _assert_no_nan(result)
    clean = smc(Walk(jnp.zeros(1), max_steps=1), jax.random.key(1), 64)
    assert not bool(clean.nan_weights)


def test_a_step_proposal_returning_none_falls_back_to_the_programs_own():
    """``smc(proposal=...)`` returning ``None`` for a site leaves the proposal the program
    attached with ``infer={"proposal": q}`` in force (the bigram's locally optimal proposal,
    which never draws a forbidden token): no particle dies, exactly as without the callable.
    Before the fix the callable dropped it and sites fell back to the prior: with this key
    84 of 256 particles then die (checked below by returning the prior explicitly)."""
    from ppl.models.toy import abc_bigram

    program = abc_bigram(6).program(optimal_proposal=True)
    with_callable = smc(program, jax.random.key(0), 256, proposal=lambda name, prior, state, t: None)
    without = smc(program, jax.random.key(0), 256)
    assert int(np.sum(~np.isfinite(np.asarray(with_callable.log_weights)))) == 0
    np.testing.assert_allclose(with_callable.log_z, without.log_z, rtol=1e-6)
    from_prior = smc(program, jax.random.key(0), 256, proposal=lambda name, prior, state, t: prior)
    assert int(np.sum(~np.isfinite(np.asarray(from_prior.log_weights)))) > 0
