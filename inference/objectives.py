"""Learning twists and proposals: the SMC bound (FIVO), contrastive twist learning (CTL) and
posterior distillation, each a surrogate for :func:`ppl.inference.fit`.

Every function takes the program *with the learned part inside it* (a twist:
``ppl.models.heads.with_twist(program, head)``) or a learned proposal, so a training
objective is a lambda over the head::

    objective = lambda head, key: ctl(with_twist(program, head), positives, key, 16)
    head, trace = fit(objective, head, key, 300, optax.adam(3e-3))

Each returns a scalar whose *value* is a lower-bound estimate ``mean log Ẑ`` of its own
sampler (so ``fit``'s trace is a bound you can plot) and whose *gradient* is the learning
rule:

- :func:`smc_bound` (FIVO; Maddison et al., Le et al., Naesseth et al. 2018): gradient of
  ``E[log Ẑ_SMC]``, unbiased: the weights' pathwise gradient plus the score of every draw of
  the run — all particles' tokens and the multinomial ancestor draws — with a leave-one-out
  baseline over ``n_samples`` runs (the FIVO papers drop the resampling score; it is kept
  here so the gradient has no bias).
- :func:`ctl` (contrastive twist learning, Zhao et al. 2024): for every step ``t``,
  ``E_sigma[grad log psi_t(x_{1:t})] - E_{pi_t}[grad log psi_t(x_{1:t})]``, the gradient of
  ``KL(sigma_t || pi_t)`` with ``pi_t ∝ p · psi_t`` the twisted intermediate target. Positive
  samples come from the posterior ``sigma`` (exact draws where available, else
  :func:`posterior_draws` of an SMC run), negatives from the twisted SMC run itself,
  weighted by its self-normalised weights. At the optimal twist ``pi_t = sigma_t``.
- :func:`distill` (BRAIn-style posterior distillation into a proposal): ``sum_i w̄_i grad
  log q(x_i)``, the self-normalised estimate of ``-grad KL(sigma || q)`` (mass-covering).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ppl.inference.kernel import Reference, init, propagate, resample, should_resample
from ppl.inference.particles import StepProposal, done
from ppl.inference.resampling import multinomial
from ppl.inference.sequential import check_positive_int, importance, validate
from ppl.inference.trajectories import check_trajectories
from ppl.inference.vi import check_latent, score_surrogate, score_term
from ppl.program import StateSpace
from ppl.results import SMCResult


def _smc_with_score(program, key, n_particles, proposal, ess_threshold, on_step=None):
    """Multinomial SMC from the kernel pieces; returns its ``log Ẑ``, the summed ``log``
    probability of every random draw (tokens of all particles, ancestor indices) and the sum
    of ``on_step(state)`` after every step that runs (0 without it)."""
    init_key, loop_key = jax.random.split(key)
    state = init(program, init_key, n_particles, proposal=proposal)
    score = jnp.sum(state.log_q_score)

    def advance(carry, t):
        def run(carry):
            state, score, total = carry
            resample_key, propagate_key = jax.random.split(jax.random.fold_in(loop_key, t))
            when = should_resample(state, ess_threshold)
            log_probs = jax.nn.log_softmax(state.log_weights)
            state, ancestors = resample(program, resample_key, state, resampler=multinomial, when=when)
            score += jnp.where(when, jnp.sum(log_probs[ancestors]), 0.0)
            log_q_before = state.log_q_score
            state = propagate(program, propagate_key, state, t, proposal=proposal)
            score += jnp.sum(state.log_q_score - log_q_before)
            if on_step is not None:
                total += on_step(state)
            return state, score, total

        running = ~jnp.all(done(program, carry[0].particles)) & (carry[0].ess > 0)
        return jax.lax.cond(running, run, lambda c: c, carry), None

    (state, score, total), _ = jax.lax.scan(advance, (state, score, jnp.zeros(())), jnp.arange(program.max_steps))
    log_z = state.log_z_prefix + jax.nn.logsumexp(state.log_weights) - math.log(n_particles)
    return log_z, score, total


def smc_bound(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    n_samples: int = 4,
    *,
    proposal: StepProposal | None = None,
    ess_threshold: float = 1.0,
) -> Float[Array, ""]:
    """The SMC bound ``E[log Ẑ] <= log Z`` (FIVO) from ``n_samples`` runs of multinomial SMC
    with ``n_particles``; a surrogate whose gradient is unbiased (see the module docstring).
    The learned part is a twist inside ``program`` and/or ``proposal``."""
    validate(program, n_particles, ess_threshold)
    check_latent(program)
    check_positive_int("n_samples", n_samples)
    keys = jax.random.split(key, n_samples)
    log_z, score, _ = jax.vmap(lambda k: _smc_with_score(program, k, n_particles, proposal, ess_threshold))(keys)
    return score_surrogate(log_z, score)


def _log_twist(state) -> Float[Array, " N"]:
    twist = getattr(state.particles, "log_twist", None)
    if twist is None:
        raise TypeError("ctl needs a twisted program whose state carries log_twist (ppl.Generation with a twist)")
    return twist


def twist_path(program: StateSpace, choices: dict[str, Array]) -> Float[Array, " N"]:
    """``sum_t log psi_t(x_{1:t})`` along each trajectory in ``choices`` (``[N, max_steps + 1]``
    per site), replayed through the twisted ``program``; the final step's twist (divided out
    when a sequence finishes) is not included."""
    n = check_trajectories(program, choices, leading=1)
    every_row = Reference(choices, index=None)
    init_key, loop_key = jax.random.split(jax.random.key(0))
    state = init(program, init_key, n, reference=every_row)

    def advance(carry, t):
        state, total = carry
        state = propagate(program, jax.random.fold_in(loop_key, t), state, t, reference=every_row)
        return (state, total + _log_twist(state)), None  # 0 once finished

    (_, total), _ = jax.lax.scan(advance, (state, jnp.zeros(n)), jnp.arange(program.max_steps))
    return total


def ctl(
    program: StateSpace,
    positives: dict[str, Array],
    key: PRNGKeyArray,
    n_particles: int,
) -> Float[Array, ""]:
    """Contrastive twist learning: a surrogate whose gradient w.r.t. the twist inside
    ``program`` is ``sum_t E_sigma[grad log psi_t] - E_{pi_t}[grad log psi_t]`` and whose
    value is the twisted SMC run's ``log Ẑ`` (a lower-bound estimate).

    ``positives``: posterior trajectories ``[S, max_steps + 1]`` per site (exact draws, or
    :func:`posterior_draws`); negatives: one twisted SMC run of ``n_particles``, resampling
    every step, each step's particles weighted by their normalised weights."""
    validate(program, n_particles)
    check_latent(program)

    def negative(state):  # a finished particle's log_twist is 0: its twist was divided out
        weights = jax.lax.stop_gradient(jax.nn.softmax(state.log_weights))
        return jnp.sum(weights * _log_twist(state))

    log_z, _, negatives = _smc_with_score(program, key, n_particles, None, 1.0, on_step=negative)
    contrast = jnp.mean(twist_path(program, positives)) - negatives
    return jax.lax.stop_gradient(log_z) + score_term(contrast)


def distill(program: StateSpace, proposal: StepProposal, key: PRNGKeyArray, n_particles: int) -> Float[Array, ""]:
    """Posterior distillation into ``proposal``: a surrogate whose gradient is
    ``sum_i w̄_i grad log q(x_i)`` over ``n_particles`` importance samples drawn from the
    proposal itself, and whose value is their ``log Ẑ`` (a lower-bound estimate)."""
    check_latent(program)
    result = importance(program, key, n_particles, proposal=proposal)
    weights = jax.lax.stop_gradient(jax.nn.softmax(result.log_weights))
    return jax.lax.stop_gradient(result.log_z) + jnp.sum(weights * score_term(result.log_q_score))


def posterior_draws(result: SMCResult, key: PRNGKeyArray, n: int) -> dict[str, Array]:
    """``n`` trajectories drawn from a properly weighted ``result`` ``∝`` their weights
    (positives for :func:`ctl` when no exact posterior sample exists)."""
    index = jax.random.categorical(key, result.log_weights, shape=(n,))
    return jax.tree.map(lambda path: path[index], result.choices)
