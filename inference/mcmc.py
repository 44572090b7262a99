"""Particle MCMC: Markov chains whose proposals are whole SMC runs.

Particle-independent Metropolis–Hastings (PIMH; Andrieu, Doucet & Holenstein 2010) targets
the program's posterior ``gamma / Z``. Each iteration::

    run the sampler: a properly weighted collection {(x_i, w_i)} with evidence estimate Ẑ'
    pick x' with probability w_i / sum_j w_j
    accept (x', Ẑ') with probability min(1, Ẑ' / Ẑ)

Any properly weighted sampler works (``smc``, ``importance``, twisted or rejuvenated SMC):
only ``log_weights`` and ``log_z`` of its result are used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ppl.results import MCMCResult, SMCResult

Sampler = Callable[[PRNGKeyArray], SMCResult]


class PIMHState(NamedTuple):
    """The chain's state: one particle drawn from a run, and that run's ``log Ẑ``."""

    sample: Any  # one particle's state
    log_z: Float[Array, ""]  # the evidence estimate of the run that produced it


class PIMHInfo(NamedTuple):
    """What one PIMH iteration did: whether the proposed run's particle was accepted, with
    probability ``min(1, Ẑ'/Ẑ)``, and the proposed run's ``log Ẑ'``."""

    accepted: Bool[Array, ""]
    acceptance_probability: Float[Array, ""]
    proposed_log_z: Float[Array, ""]


def _draw(sampler: Sampler, key: PRNGKeyArray) -> PIMHState:
    run_key, pick_key = jax.random.split(key)
    result = sampler(run_key)
    index = jax.random.categorical(pick_key, result.log_weights)
    return PIMHState(jax.tree.map(lambda leaf: leaf[index], result.particles), result.log_z)


def pimh_init(sampler: Sampler, key: PRNGKeyArray) -> PIMHState:
    """Start the chain from one sampler run."""
    return _draw(sampler, key)


def pimh_step(sampler: Sampler, key: PRNGKeyArray, state: PIMHState) -> tuple[PIMHState, PIMHInfo]:
    """One PIMH iteration; leaves the posterior (extended with Ẑ) invariant."""
    draw_key, accept_key = jax.random.split(key)
    proposed = _draw(sampler, draw_key)
    # A dead proposal (Ẑ' = 0) is never taken; a dead current state is always left.
    log_ratio = jnp.where(jnp.isneginf(state.log_z), jnp.inf, proposed.log_z - state.log_z)
    log_ratio = jnp.where(jnp.isneginf(proposed.log_z), -jnp.inf, log_ratio)
    acceptance_probability = jnp.exp(jnp.minimum(log_ratio, 0.0))
    accepted = jax.random.uniform(accept_key) < acceptance_probability
    new_state = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), proposed, state)
    return new_state, PIMHInfo(accepted, acceptance_probability, proposed.log_z)


def pimh(sampler: Sampler, key: PRNGKeyArray, n_samples: int) -> MCMCResult:
    """Run ``n_samples`` PIMH iterations in one ``lax.scan``.

    ``sampler`` is ``key -> SMCResult``, e.g.
    ``functools.partial(ppl.inference.smc, program, n_particles=32)``.
    The first state comes from one sampler run (no burn-in is discarded).
    """
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    init_key, chain_key = jax.random.split(key)
    state = pimh_init(sampler, init_key)

    def one(state, step_key):
        state, info = pimh_step(sampler, step_key, state)
        return state, (state, info.accepted)

    _, (states, accepted) = jax.lax.scan(one, state, jax.random.split(chain_key, n_samples))
    return MCMCResult(samples=states.sample, log_z=states.log_z, accepted=accepted)
