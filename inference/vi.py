"""Variational objectives written over the same programs and samplers as SMC, and ``fit``.

A guide is a proposal (``guide(name, prior, state, t) -> q``, typically an ``equinox.Module``
holding its parameters, such as ``ppl.models.heads.ProposalHead.proposal(program)``).
Running the program with the guide as proposal gives importance weights
``w = gamma(x) / q(x)``, and every objective here is the expectation of a sampler's
``log Ẑ``. Because the sampler is properly weighted, Jensen's inequality gives
``E[log Ẑ] <= log Z``:

- ``elbo``:  ``E_q[log gamma(x) - log q(x)]``                  (1 particle)
- ``iwae``:  ``E[log (1/K) sum_k w_k]``, ``K`` particles        (Burda et al. 2016)
- ``ppl.inference.smc_bound``: ``E[log Ẑ_SMC]`` (FIVO), and the twist/proposal learning
  rules of :mod:`ppl.inference.objectives`.

These bounds tighten with ``K`` (``elbo <= iwae(K) <= iwae(K+1) <= log Z``).

Gradients. An objective returns a *surrogate*: a scalar whose value is the estimate and
whose ``jax.grad`` is an unbiased estimate of the bound's gradient. Reparameterised sites
differentiate through their samples; discrete sites (tokens) add the score-function term
``(log Ẑ - baseline) · grad log q``. The baseline is leave-one-out: over the ``K`` particles
of one estimate (VIMCO, Mnih & Rezende 2016: particle ``k``'s signal is ``log Ẑ`` minus the
estimate with ``w_k`` replaced by the geometric mean of the others), or over the
``n_samples`` independent estimates when ``K = 1``. Neither baseline depends on the sample
it multiplies, so the estimator stays unbiased.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, PRNGKeyArray
from tqdm.auto import tqdm

from ppl.inference.particles import StepProposal
from ppl.inference.sequential import check_positive_int, importance
from ppl.program import StateSpace, check_program

Objective = Callable[[Any, PRNGKeyArray], Float[Array, ""]]


def check_latent(program: StateSpace) -> None:
    """``ValueError`` if ``program`` samples nothing: a variational objective has nothing
    to learn a proposal or twist for (its ``log Ẑ`` is exact)."""
    shapes = check_program(program, 1)
    if not shapes.init and not shapes.step:
        raise ValueError(
            f"{type(program).__name__} has no latent sample sites (only potentials): a variational "
            "objective needs at least one numpyro.sample site without obs= to propose"
        )


def score_term(log_q: Float[Array, ...]) -> Float[Array, ...]:
    """Value 0, gradient ``grad log q``: multiplied by a stopped learning signal it adds the
    score-function term to a surrogate."""
    return log_q - jax.lax.stop_gradient(log_q)


def _finite(signal: Array) -> Array:
    # A dead estimate (log Ẑ = -inf) carries no usable signal; drop it instead of propagating inf.
    return jnp.where(jnp.isfinite(signal), signal, 0.0)


def score_surrogate(log_z: Float[Array, " S"], log_q_score: Float[Array, " S"]) -> Float[Array, ""]:
    """Mean of ``S`` independent ``log_z`` whose gradient adds the score-function term with a
    leave-one-out baseline over the samples: ``mean(grad log_z + (log_z - baseline) grad log_q)``."""
    n_samples = log_z.shape[0]
    baseline = (jnp.sum(log_z) - log_z) / (n_samples - 1) if n_samples > 1 else jnp.zeros_like(log_z)
    signal = _finite(jax.lax.stop_gradient(log_z - baseline))
    return jnp.mean(log_z + signal * score_term(log_q_score))


def vimco_surrogate(log_weights: Float[Array, "S K"], log_q_score: Float[Array, "S K"]) -> Float[Array, ""]:
    """Mean of ``log Ẑ = logmeanexp_k log w_k`` over ``S`` estimates; each particle's score
    term gets the VIMCO leave-one-out signal ``log Ẑ - log Ẑ_{-k}``."""
    k = log_weights.shape[-1]
    log_z = jax.nn.logsumexp(log_weights, axis=-1) - math.log(k)
    stopped = jax.lax.stop_gradient(log_weights)
    finite = jnp.where(jnp.isfinite(stopped), stopped, 0.0)
    others_mean = (jnp.sum(finite, -1, keepdims=True) - finite) / (k - 1)  # [S, K]
    replaced = jnp.where(jnp.eye(k, dtype=bool), others_mean[..., None], stopped[..., None, :])  # [S, K(left out), K]
    log_z_without = jax.nn.logsumexp(replaced, axis=-1) - math.log(k)
    signal = _finite(jax.lax.stop_gradient(log_z)[..., None] - log_z_without)
    return jnp.mean(log_z + jnp.sum(signal * score_term(log_q_score), axis=-1))


def iwae(
    program: StateSpace,
    guide: StepProposal,
    key: PRNGKeyArray,
    n_particles: int,
    n_samples: int = 8,
) -> Float[Array, ""]:
    """Importance-weighted bound ``E[log mean_k w_k]`` estimated from ``n_samples`` draws of
    ``n_particles`` each; a surrogate (see the module docstring) with VIMCO baselines when
    ``n_particles > 1`` and leave-one-out over the draws otherwise."""
    check_latent(program)
    check_positive_int("n_samples", n_samples)
    keys = jax.random.split(key, n_samples)
    results = jax.vmap(lambda k: importance(program, k, n_particles, proposal=guide))(keys)
    if n_particles == 1:
        return score_surrogate(results.log_z, jnp.sum(results.log_q_score, axis=-1))
    return vimco_surrogate(results.log_weights + math.log(n_particles), results.log_q_score)


def elbo(program: StateSpace, guide: StepProposal, key: PRNGKeyArray, n_samples: int = 8) -> Float[Array, ""]:
    """The evidence lower bound ``E_q[log gamma(x) - log q(x)]`` (``iwae`` with one particle)."""
    return iwae(program, guide, key, 1, n_samples)


def fit(
    objective: Objective,
    params: Any,
    key: PRNGKeyArray,
    steps: int,
    optimizer: optax.GradientTransformation,
    *,
    progress: bool = False,
) -> tuple[Any, Float[Array, " steps"]]:
    """Maximise ``objective(params, key)`` over the floating-point arrays of ``params`` (a
    guide, a head, any pytree): one jitted optimiser step per iteration, ``steps`` times.

    Only ``params`` is differentiated: an LM the objective closes over stays frozen.
    Returns the trained params and the objective's value at every step. A step whose value
    or gradient is not finite raises ``FloatingPointError`` naming the step (a twist or
    proposal that returns NaN, or every particle dead). Example::

        objective = lambda head, k: ppl.inference.smc_bound(with_twist(program, head), k, 8)
        head, trace = fit(objective, head, key, 200, optax.adam(1e-2), progress=True)
    """
    check_positive_int("steps", steps)
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    if not jax.tree.leaves(arrays):
        raise ValueError("params has no floating-point arrays to train")

    @eqx.filter_jit
    def update(arrays, opt_state, step_key):
        value, grads = jax.value_and_grad(lambda a: -objective(eqx.combine(a, static), step_key))(arrays)
        finite = jnp.isfinite(value) & jnp.all(jnp.stack([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
        updates, opt_state = optimizer.update(grads, opt_state, arrays)
        return optax.apply_updates(arrays, updates), opt_state, -value, finite

    opt_state = optimizer.init(arrays)
    values = []
    for i, step_key in enumerate(tqdm(jax.random.split(key, steps), desc="fit", disable=not progress)):
        new_arrays, opt_state, value, finite = update(arrays, opt_state, step_key)
        if not bool(finite):
            raise FloatingPointError(
                f"objective value {float(value)} or its gradient is not finite at step {i}: a twist or proposal "
                "returned NaN/inf, or every particle died"
            )
        arrays = new_arrays
        values.append(value)
    return eqx.combine(arrays, static), jnp.asarray(np.asarray(jax.device_get(values)))
