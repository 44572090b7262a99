"""Particle marginal Metropolis–Hastings (PMMH; Andrieu, Doucet & Holenstein 2010).

A global latent ``θ`` with prior ``p(θ)`` indexes a family of programs ``program_fn(θ)``;
the normalising constant ``Z(θ) = sum_x gamma_θ(x)`` of program ``θ`` is the likelihood of
``θ`` (for an HMM, ``p(y | θ)``). PMMH targets the posterior of the global latent::

    p(θ | data) ∝ p(θ) Z(θ)

without computing ``Z(θ)``. One iteration::

    θ' ~ q(· | θ);   Ẑ' = exp(smc(program_fn(θ'), N).log_z)
    accept (θ', Ẑ') with probability min(1, Ẑ' p(θ') q(θ | θ') / (Ẑ p(θ) q(θ' | θ)))

Because ``E[Ẑ(θ)] = Z(θ)``, this is exact MH on the extended target ``p(θ) Ẑ s(Ẑ | θ)``
(``s`` the law of SMC's estimate) whose ``θ``-marginal is ``p(θ | data)``: it holds for any
``N``, provided ``Ẑ`` stays with its ``θ`` and is never re-estimated. More particles lower
``Var(log Ẑ)``, so the chain sticks less after a lucky overestimate (Doucet et al. 2015
suggest ``N`` with ``Var(log Ẑ) ≈ 1`` near the posterior mode).

The proposal ``q`` follows the prior's support:

- continuous: a Gaussian random walk ``u' = u + step_size · ε`` in the unconstrained space
  ``u = T^{-1}(θ)``, ``T = biject_to(prior.support)``; as a density on ``θ`` it gives
  ``q(θ | θ') / q(θ' | θ) = |det J_T(u')| / |det J_T(u)|``.
- discrete with an enumerable finite support (``prior.has_enumerate_support``): ``θ'``
  uniform over the support (each batch element independently), an *independence* proposal:
  ``q`` is constant and cancels from the ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, Bool, Float, PRNGKeyArray
from numpyro.distributions.transforms import biject_to

from ppl.inference.resampling import Resampler, get_resampler
from ppl.inference.sequential import check_positive_int, smc, validate
from ppl.program import StateSpace
from ppl.results import MCMCResult

ProgramFn = Callable[[Any], StateSpace]


class PMMHState(NamedTuple):
    """The chain's state: ``θ`` and the two factors of its (extended) target density."""

    theta: Any  # the global latent, shaped like one draw of the prior
    log_likelihood: Float[Array, ""]  # log Ẑ(θ) of the SMC run that accompanies θ
    log_prior: Float[Array, ""]  # log p(θ), summed over the prior's batch


class PMMHInfo(NamedTuple):
    """What one PMMH iteration did: acceptance, its probability, and the proposal's ``log Ẑ(θ')``."""

    accepted: Bool[Array, ""]
    acceptance_probability: Float[Array, ""]
    proposed_log_likelihood: Float[Array, ""]  # log Ẑ(θ') of the proposal, accepted or not


def _log_prior(prior: dist.Distribution, theta: Array) -> Float[Array, ""]:
    return jnp.sum(prior.log_prob(theta))


def _log_jacobian(transform: Any, u: Array, theta: Array) -> Float[Array, ""]:
    return jnp.sum(transform.log_abs_det_jacobian(u, theta))


def _propose(
    prior: dist.Distribution, key: PRNGKeyArray, theta: Array, step_size: Float[Array, ...]
) -> tuple[Array, Float[Array, ""]]:
    """``θ' ~ q(· | θ)`` and ``log q(θ | θ') - log q(θ' | θ)`` (see the module docstring)."""
    if prior.support.is_discrete:
        values = prior.enumerate_support(expand=True)  # [K, *batch, *event]
        index = jax.random.randint(key, prior.batch_shape, 0, values.shape[0])
        index = index.reshape((1,) + index.shape + (1,) * len(prior.event_shape))
        return jnp.take_along_axis(values, index, axis=0)[0].astype(theta.dtype), jnp.zeros(())
    transform = biject_to(prior.support)
    u = transform.inv(theta)
    u_new = u + step_size * jax.random.normal(key, u.shape, u.dtype)
    theta_new = transform(u_new)
    return theta_new, _log_jacobian(transform, u_new, theta_new) - _log_jacobian(transform, u, theta)


def _as_theta(prior: dist.Distribution, theta: Any) -> Array:
    """``theta`` with the shape and dtype of the prior's draws; ``ValueError`` if it has
    another shape or (when concrete) lies outside the prior's support."""
    draw = jax.eval_shape(prior.sample, jax.random.key(0))
    theta = jnp.asarray(theta)
    if theta.shape != draw.shape:
        raise ValueError(f"initial θ has shape {theta.shape}, but the prior's draws have shape {draw.shape}")
    if not isinstance(theta, jax.core.Tracer) and not bool(jnp.all(prior.support(theta))):
        raise ValueError(f"initial θ = {theta} is outside the support of the prior {type(prior).__name__}")
    return theta.astype(draw.dtype)


def _check_prior(prior: Any) -> None:
    if not isinstance(prior, dist.Distribution):
        raise TypeError(f"prior must be a numpyro distribution, got {type(prior).__name__}")
    name = type(prior).__name__
    if prior.support.is_discrete:
        if not prior.has_enumerate_support:
            raise ValueError(
                f"prior {name} is neither continuous nor enumerable: PMMH proposes a discrete θ "
                "uniformly from a finite support, which needs prior.has_enumerate_support"
            )
        return
    try:
        biject_to(prior.support)
    except NotImplementedError as error:
        raise ValueError(f"prior {name}'s support {prior.support} has no bijection from unconstrained space") from error


def _check_step_size(step_size: Any) -> Float[Array, ...]:
    step_size = jnp.asarray(step_size, jnp.result_type(float))
    if not isinstance(step_size, jax.core.Tracer) and not bool(jnp.all(step_size > 0)):
        raise ValueError(f"step_size must be positive, got {step_size}")
    return step_size


def pmmh_init(
    program_fn: ProgramFn,
    prior: dist.Distribution,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    initial: Any = None,
    **smc_options: Any,
) -> PMMHState:
    """Start the chain at ``initial`` (default: a draw from the prior), with one SMC run there.

    ``smc_options`` go to :func:`ppl.inference.smc` (``resampling``, ``ess_threshold``, ...).
    """
    draw_key, run_key = jax.random.split(key)
    theta = prior.sample(draw_key) if initial is None else _as_theta(prior, initial)
    log_likelihood = smc(program_fn(theta), run_key, n_particles, **smc_options).log_z
    return PMMHState(theta, log_likelihood, _log_prior(prior, theta))


def pmmh_step(
    program_fn: ProgramFn,
    prior: dist.Distribution,
    key: PRNGKeyArray,
    state: PMMHState,
    n_particles: int,
    *,
    step_size: float | Float[Array, ...],
    **smc_options: Any,
) -> tuple[PMMHState, PMMHInfo]:
    """One PMMH iteration; leaves ``p(θ | data) ∝ p(θ) Z(θ)`` (extended with ``Ẑ``) invariant.

    ``step_size`` is the random walk's standard deviation in the unconstrained space (a
    scalar or one per coordinate); the independence proposal of a discrete prior ignores it.
    """
    move_key, run_key, accept_key = jax.random.split(key, 3)
    theta, log_proposal_ratio = _propose(prior, move_key, state.theta, step_size)
    log_likelihood = smc(program_fn(theta), run_key, n_particles, **smc_options).log_z
    log_prior = _log_prior(prior, theta)
    current = state.log_likelihood + state.log_prior
    log_ratio = log_likelihood + log_prior - current + log_proposal_ratio
    # A dead proposal (Ẑ' = 0 or p(θ') = 0, or a NaN from an overflowing transform) is never
    # taken; a dead current state is always left.
    log_ratio = jnp.where(jnp.isfinite(current), log_ratio, jnp.inf)
    dead = ~jnp.isfinite(log_likelihood + log_prior) | jnp.isnan(log_ratio)
    log_ratio = jnp.where(dead, -jnp.inf, log_ratio)
    acceptance_probability = jnp.exp(jnp.minimum(log_ratio, 0.0))
    accepted = jax.random.uniform(accept_key) < acceptance_probability
    proposed = PMMHState(theta, log_likelihood, log_prior)
    new_state = jax.tree.map(lambda new, old: jnp.where(accepted, new, old), proposed, state)
    return new_state, PMMHInfo(accepted, acceptance_probability, log_likelihood)


def pmmh(
    program_fn: ProgramFn,
    prior: dist.Distribution,
    key: PRNGKeyArray,
    n_iterations: int,
    n_particles: int,
    *,
    step_size: float | Float[Array, ...] = 0.5,
    initial: Any = None,
    resampling: str | Resampler = "systematic",
    ess_threshold: float | Float[Array, ""] = 0.5,
) -> MCMCResult:
    """Particle marginal Metropolis–Hastings for a global latent ``θ ~ prior``.

    Target: ``p(θ | data) ∝ p(θ) Z(θ)``, ``Z(θ)`` the normalising constant of
    ``program_fn(θ)``, estimated at each proposal by :func:`ppl.inference.smc` with
    ``n_particles`` (see the module docstring for the proposals).

    Args:
        program_fn: ``θ -> ppl.StateSpace``; called with a traced ``θ``, so build the
            program from arrays (index a stacked array with ``θ``, scale logits by it), never
            branch in Python on its value. A plain function is part of the compiled program
            (pass the same object to reuse it); an ``equinox.Module`` with ``__call__`` or an
            ``equinox.Partial`` carries its arrays as data, so new data of the same shapes
            does not recompile.
        prior: a NumPyro distribution, continuous or with an enumerable finite support.
        key: a JAX PRNG key.
        n_iterations: the chain's length (one SMC run per iteration).
        n_particles: SMC particles per likelihood estimate.
        step_size: the random walk's standard deviation in the unconstrained space
            (continuous priors); tune it for an acceptance rate of roughly 15–30%.
        initial: the first ``θ`` (default: a draw from the prior).
        resampling, ess_threshold: passed to :func:`ppl.inference.smc`.

    Returns:
        An :class:`ppl.MCMCResult`: ``samples`` the chain of ``θ`` (``[n_iterations, ...]``),
        ``log_z`` the ``log Ẑ(θ)`` carried with each state, ``accepted`` whether iteration
        ``k`` moved. No burn-in is discarded. The whole chain is one ``lax.scan`` in one
        compiled function; it can be ``vmap``-ed over keys for independent chains.
    """
    check_positive_int("n_iterations", n_iterations)
    _check_prior(prior)
    step_size = _check_step_size(step_size)
    theta = jax.eval_shape(prior.sample, jax.random.key(0))
    validate(eqx.filter_eval_shape(program_fn, theta), n_particles, ess_threshold)
    if initial is not None:
        initial = _as_theta(prior, initial)
    return _pmmh(
        program_fn,
        prior,
        key,
        n_iterations,
        n_particles,
        step_size,
        initial,
        get_resampler(resampling),
        jnp.asarray(ess_threshold, jnp.float32),
    )


@eqx.filter_jit
def _pmmh(
    program_fn, prior, key, n_iterations, n_particles, step_size, initial, resampling, ess_threshold
) -> MCMCResult:
    options = dict(resampling=resampling, ess_threshold=ess_threshold)
    init_key, chain_key = jax.random.split(key)
    state = pmmh_init(program_fn, prior, init_key, n_particles, initial=initial, **options)

    def one(state, step_key):
        state, info = pmmh_step(program_fn, prior, step_key, state, n_particles, step_size=step_size, **options)
        return state, (state.theta, state.log_likelihood, info.accepted)

    _, (thetas, log_z, accepted) = jax.lax.scan(one, state, jax.random.split(chain_key, n_iterations))
    return MCMCResult(samples=thetas, log_z=log_z, accepted=accepted)
