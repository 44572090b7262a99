"""Variational objectives written over the same programs and samplers as SMC.

A guide is a proposal (``guide(name, prior, state, t) -> q``, typically an ``equinox.Module``
holding its parameters). Running the program with the guide as proposal gives importance
weights ``w = gamma(x) / q(x)``, and every objective here is the expectation of a sampler's
``log Ẑ``. Because the sampler is properly weighted, Jensen's inequality gives
``E[log Ẑ] <= log Z``:

- ``elbo``:  ``E_q[log gamma(x) - log q(x)]``                  (1 particle)
- ``iwae``:  ``E[log (1/K) sum_k w_k]``, ``K`` particles        (Burda et al. 2016)

These bounds tighten with ``K`` (``elbo <= iwae(K) <= iwae(K+1) <= log Z``).

Gradients: reparameterised sites differentiate through their samples; discrete sites (tokens)
use the score function ``log Ẑ · grad log q`` with a leave-one-out baseline over the
``n_samples`` independent estimates as control variate (as in VIMCO's spirit, per sample).
"""

from __future__ import annotations

from typing import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, PRNGKeyArray

from ppl.program import StateSpace
from ppl.inference.particles import StepProposal
from ppl.inference.sequential import importance

Objective = Callable[[StepProposal, PRNGKeyArray], Float[Array, ""]]


def _score_surrogate(log_z: Float[Array, " S"], log_q_score: Float[Array, " S"]) -> Float[Array, ""]:
    """Mean of ``log_z`` whose gradient adds the score-function term.

    Value: ``mean(log_z)``. Gradient: ``mean(grad log_z + (log_z - baseline) grad log_q)``.
    """
    n_samples = log_z.shape[0]
    if n_samples > 1:
        baseline = (jnp.sum(log_z) - log_z) / (n_samples - 1)
    else:
        baseline = jnp.zeros_like(log_z)
    learning_signal = jax.lax.stop_gradient(log_z - baseline)
    # A dead estimate (log_z = -inf) carries no usable signal; drop it instead of propagating inf.
    learning_signal = jnp.where(jnp.isfinite(learning_signal), learning_signal, 0.0)
    score = log_q_score - jax.lax.stop_gradient(log_q_score)  # value 0, gradient grad log q
    return jnp.mean(log_z + learning_signal * score)


def iwae(
    program: StateSpace,
    guide: StepProposal,
    key: PRNGKeyArray,
    n_particles: int,
    n_samples: int = 8,
) -> Float[Array, ""]:
    """Importance-weighted bound ``E[log mean_k w_k]`` estimated from ``n_samples`` draws.

    Returns a scalar whose value is the estimate and whose gradient (w.r.t. the guide's
    arrays) is an unbiased estimate of the bound's gradient.
    """
    keys = jax.random.split(key, n_samples)
    results = jax.vmap(lambda k: importance(program, k, n_particles, proposal=guide))(keys)
    return _score_surrogate(results.log_z, jnp.sum(results.log_q_score, axis=-1))


def elbo(program: StateSpace, guide: StepProposal, key: PRNGKeyArray, n_samples: int = 8) -> Float[Array, ""]:
    """The evidence lower bound ``E_q[log gamma(x) - log q(x)]`` (``iwae`` with one particle)."""
    return iwae(program, guide, key, 1, n_samples)


def fit(
    objective: Objective,
    guide: eqx.Module,
    optimizer: optax.GradientTransformation,
    key: PRNGKeyArray,
    n_steps: int,
) -> tuple[eqx.Module, Float[Array, " n_steps"]]:
    """Maximise ``objective(guide, key)`` over the guide's floating-point arrays.

    One ``lax.scan`` over optimiser steps; returns the trained guide and the objective's
    estimate at every step. Example::

        objective = lambda g, k: ppl.inference.elbo(program, g, k, n_samples=16)
        guide, trace = fit(objective, guide, optax.adam(1e-2), key, 500)
    """
    params, static = eqx.partition(guide, eqx.is_inexact_array)

    def loss(params, step_key):
        return -objective(eqx.combine(params, static), step_key)

    def update(carry, step_key):
        params, opt_state = carry
        value, grads = jax.value_and_grad(loss)(params, step_key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), -value

    (params, _), trace = jax.lax.scan(
        update, (params, optimizer.init(params)), jax.random.split(key, n_steps)
    )
    return eqx.combine(params, static), trace
