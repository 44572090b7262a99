"""Sequential Monte Carlo as a program transformation.

``smc(program, key, n_particles)`` targets the program's posterior ``gamma / Z``
(see :mod:`ppl.program`) with the algorithm below, written once for every scheme::

    x^i ~ init (or its proposal);  logw^i = log weight of init          for i = 1..N
    for t = 0 .. max_steps-1, until every particle is done:
        if ESS(w) < ess_threshold · N:                    # adaptive resampling
            log_z_prefix += logmeanexp(logw)
            a^i ~ resample(w);  x^i = x^{a^i};  logw^i = 0
        x^i, inc^i = step(x^i, t) (or its proposal) for particles not yet done
        logw^i += inc^i
    log_z = log_z_prefix + logmeanexp(logw)

``log_z`` is unbiased for ``Z`` (in the sense ``E[exp log_z] = Z``) for every resampler and
threshold: threshold 0 never resamples (importance sampling), 1 resamples every step.
Blackjax-style ``init``/``step`` are exposed for users who want to own the loop;
``smc`` runs them in one ``lax.scan`` whose remaining iterations are skipped once every
particle is done.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ppl.program import StateSpace, check_step_shapes, run_weighted
from ppl.results import SMCResult
from ppl.inference.resampling import Resampler, get_resampler

# proposal(site name, prior, particle state, t) -> distribution to sample from, or None.
# During ``init`` it is called with state=None and t=None.
StepProposal = Callable[[str, Any, Any, Any], Any]


class SMCState(NamedTuple):
    particles: Any  # state pytree, leaves [N, ...]
    log_weights: Float[Array, " N"]  # log weights since the last resampling
    log_z_prefix: Float[Array, ""]  # log evidence banked at resampling events
    log_q_score: Float[Array, " N"]
    nan_weights: Bool[Array, ""]
    ess: Float[Array, ""]  # of ``log_weights``, kept so each step computes it once


class SMCInfo(NamedTuple):
    ess: Float[Array, ""]
    ancestors: Int[Array, " N"]
    resampled: Bool[Array, ""]


def effective_sample_size(log_weights: Float[Array, " N"]) -> Float[Array, ""]:
    """``(sum w)^2 / sum w^2``; zero when every weight is zero."""
    ess = jnp.exp(2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights))
    return jnp.where(jnp.isfinite(ess), ess, 0.0)


def _bind(proposal: StepProposal | None, state: Any, t: Any):
    if proposal is None:
        return None
    return lambda name, prior: proposal(name, prior, state, t)


def _clean(log_increments: Float[Array, " N"], active: Bool[Array, " N"]):
    """Zero increments of inactive particles and turn NaN into -inf (a killed particle)."""
    is_nan = jnp.isnan(log_increments) & active
    log_increments = jnp.where(is_nan, -jnp.inf, log_increments)
    return jnp.where(active, log_increments, 0.0), jnp.any(is_nan)


def _run_particles(program: StateSpace, key, n: int, proposal, particles=None, t=None):
    """Run ``init`` (``particles is None``) or ``step(., t)`` for all ``n`` particles: one
    batched call for a batched program, a ``vmap`` of single-particle runs otherwise."""
    if program.batched:
        fn, args = (program.init, (n,)) if particles is None else (program.step, (particles, t))
        return run_weighted(fn, key, *args, proposal=_bind(proposal, particles, t), batch_shape=(n,))
    # One shared key and a particle index: see ``ppl.program._seed`` for why not split keys.
    indices = jnp.arange(n, dtype=jnp.uint32)
    if particles is None:
        return jax.vmap(lambda i: run_weighted(program.init, key, proposal=_bind(proposal, None, None), particle=i))(indices)

    def one(index, particle):
        return run_weighted(program.step, key, particle, t, proposal=_bind(proposal, particle, t), particle=index)

    return jax.vmap(one)(indices, particles)


def _done(program: StateSpace, particles: Any) -> Bool[Array, " N"]:
    return program.done(particles) if program.batched else jax.vmap(program.done)(particles)


def init(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    proposal: StepProposal | None = None,
) -> SMCState:
    """Draw ``n_particles`` initial states from ``program.init`` and weight them."""
    particles, log_weights, log_q_score = _run_particles(program, key, n_particles, proposal)
    log_weights, nan_weights = _clean(log_weights, jnp.ones(n_particles, bool))
    return SMCState(
        particles, log_weights, jnp.zeros(()), log_q_score, nan_weights, effective_sample_size(log_weights)
    )


def step(
    program: StateSpace,
    key: PRNGKeyArray,
    state: SMCState,
    t: Int[Array, ""],
    *,
    resampler: Resampler,
    ess_threshold: Float[Array, ""],
    proposal: StepProposal | None = None,
) -> tuple[SMCState, SMCInfo]:
    """Resample if the ESS is low, then advance every unfinished particle by ``step(., t)``."""
    n = state.log_weights.shape[0]
    resample_key, step_key = jax.random.split(key)
    alive = state.ess > 0  # zero exactly when every weight is zero
    resampled = alive & ((ess_threshold >= 1.0) | (state.ess < ess_threshold * n))

    def resample(state: SMCState):
        ancestors = resampler(resample_key, state.log_weights, n)
        return ancestors, SMCState(
            particles=program.reindex(state.particles, ancestors),
            log_weights=jnp.zeros_like(state.log_weights),
            log_z_prefix=state.log_z_prefix + jax.nn.logsumexp(state.log_weights) - math.log(n),
            log_q_score=state.log_q_score[ancestors],
            nan_weights=state.nan_weights,
            ess=jnp.full((), n, jnp.float32),
        )

    # cond, not select: the gather touches every state leaf (a KV cache, for an LM).
    ancestors, state = jax.lax.cond(resampled, resample, lambda s: (jnp.arange(n), s), state)

    active = ~_done(program, state.particles)
    stepped, increments, log_q = _run_particles(program, step_key, n, proposal, state.particles, t)
    increments, nan_now = _clean(increments, active)
    log_weights = state.log_weights + increments
    ess = effective_sample_size(log_weights)
    state = SMCState(
        particles=program.select(active, stepped, state.particles),
        log_weights=log_weights,
        log_z_prefix=state.log_z_prefix,
        log_q_score=state.log_q_score + jnp.where(active, log_q, 0.0),
        nan_weights=state.nan_weights | nan_now,
        ess=ess,
    )
    return state, SMCInfo(ess, ancestors, resampled)


def _validate(n_particles: int, ess_threshold: Any, program: StateSpace) -> None:
    if not isinstance(program, StateSpace):
        raise TypeError(f"program must be a ppl.StateSpace, got {type(program).__name__}")
    if isinstance(n_particles, bool) or not isinstance(n_particles, int) or n_particles < 1:
        raise ValueError(f"n_particles must be a positive integer, got {n_particles!r}")
    max_steps = getattr(program, "max_steps", None)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 0:
        raise ValueError(
            f"{type(program).__name__}.max_steps must be a static non-negative int "
            f"(declare it with eqx.field(static=True)), got {max_steps!r}"
        )
    if not isinstance(ess_threshold, jax.core.Tracer):
        value = float(ess_threshold)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"ess_threshold must lie in [0, 1], got {value}")


@eqx.filter_jit
def _smc(program, key, n_particles, resampler, ess_threshold, proposal, progress) -> SMCResult:
    check_step_shapes(program, n_particles)
    init_key, loop_key = jax.random.split(key)
    state = init(program, init_key, n_particles, proposal)
    idle = SMCInfo(jnp.asarray(float(n_particles)), jnp.arange(n_particles), jnp.asarray(False))

    def advance(carry, t):
        n_steps, state = carry
        running = ~jnp.all(_done(program, state.particles)) & (state.ess > 0)

        def run(state):
            state, info = step(
                program,
                jax.random.fold_in(loop_key, t),
                state,
                t,
                resampler=resampler,
                ess_threshold=ess_threshold,
                proposal=proposal,
            )
            if progress is not None:
                jax.debug.callback(progress, t, info.ess, jnp.sum(_done(program, state.particles)))
            return state, info

        # scan + cond rather than while_loop: reverse-mode differentiable (for VI), and once
        # every particle is done (or dead) the remaining iterations cost nothing.
        state, info = jax.lax.cond(running, run, lambda s: (s, idle), state)
        return (n_steps + running, state), info

    (n_steps, state), history = jax.lax.scan(
        advance, (jnp.zeros((), jnp.int32), state), jnp.arange(program.max_steps)
    )
    n = state.log_weights.shape[0]
    log_weights = state.log_z_prefix + state.log_weights - math.log(n)
    log_z = jax.nn.logsumexp(log_weights)
    return SMCResult(
        particles=state.particles,
        log_weights=log_weights,
        log_z=log_z,
        ess=history.ess,
        ancestors=history.ancestors,
        resampled=history.resampled,
        n_steps=n_steps,
        all_dead=~jnp.isfinite(log_z),
        nan_weights=state.nan_weights,
        log_q_score=state.log_q_score,
    )


def smc(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    resampling: str | Resampler = "systematic",
    ess_threshold: float | Float[Array, ""] = 0.5,
    proposal: StepProposal | None = None,
    progress: Callable[[Any, Any, Any], None] | None = None,
) -> SMCResult:
    """Sequential Monte Carlo on ``program``; returns a properly weighted :class:`SMCResult`.

    Target: the program's posterior ``gamma(x) / Z``. The returned ``log_weights`` satisfy
    ``logsumexp(log_weights) == log_z`` with ``E[exp(log_z)] = Z``.

    Args:
        program: the state-space program.
        key: a JAX PRNG key; the same key gives the same result, jitted or not.
        n_particles: number of particles ``N >= 1`` (static: one compilation per value).
        resampling: ``"systematic"`` (default), ``"stratified"``, ``"residual"``,
            ``"multinomial"``, or a callable ``(key, log_weights, n) -> indices``.
        ess_threshold: resample before a step when ``ESS < ess_threshold · N``; ``0`` never
            (importance sampling), ``1`` every step. A traced value does not recompile.
        proposal: ``proposal(name, prior, state, t) -> q | None`` chooses the distribution to
            sample each latent site from (``None``: its prior, or the ``infer={"proposal": q}``
            the program attached). Weights include ``log p - log q``; the target is unchanged.
        progress: an optional host function ``progress(t, ess, n_finished)`` called after
            every step that runs (through ``jax.debug.callback``), e.g. to drive a progress
            bar; it is part of the compiled function, so pass the same object to reuse it.

    Particles whose ``program.done`` holds are frozen. A NaN potential kills its particle
    (treated as ``-inf``) and sets ``nan_weights``; if every particle dies, ``log_z = -inf``
    and ``all_dead`` is set — no NaN is ever returned.
    The whole run is one compiled function per (program type, shapes, ``n_particles``,
    ``resampling``); it can also be called inside a user's ``jit`` or ``vmap``.
    """
    _validate(n_particles, ess_threshold, program)
    return _smc(
        program, key, n_particles, get_resampler(resampling), jnp.asarray(ess_threshold, jnp.float32), proposal, progress
    )


def importance(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    proposal: StepProposal | None = None,
) -> SMCResult:
    """Importance sampling: :func:`smc` that never resamples (same target, same weights)."""
    return smc(program, key, n_particles, ess_threshold=0.0, proposal=proposal)
