"""Sequential Monte Carlo as pure kernel pieces.

``ppl.inference.smc`` is one ``lax.scan`` over the pieces below; each is a pure function of a
key and an :class:`SMCState` (the program and options are arguments, nothing is jitted behind
your back), so a new variant — another resampling trigger, a tempering schedule, a move, a
conditional sweep — is a new loop over the same pieces::

    state = init(program, key, N)                                  # x^i ~ init, log w^i, choices
    for t in range(program.max_steps):
        state, ancestors = resample(program, k1, state, resampler=systematic,
                                    when=should_resample(state, 0.5))
        state = propagate(program, k2, state, t)                   # x^i ~ step(x^i, t), reweight
        state, accepted = rejuvenate(program, k3, state, t, suffix_mh(2))  # optional MCMC move
    result = finalize(state, history)                              # SMCState -> SMCResult

**Weights.** ``state.log_weights`` are the log-weights accumulated since the last resampling
and ``state.log_z_prefix`` the log-evidence banked at resampling events, so at every point
``log_z_prefix + logmeanexp(log_weights)`` is an unbiased estimate of the current ``log Z_t``
(in the sense ``E[exp(.)] = Z_t``) and the particles are properly weighted for ``gamma_t``.
:func:`resample` keeps the estimate unbiased for every scheme, an invariant move
(:func:`rejuvenate`) leaves the weights alone, and :func:`reweight` adds any user increment
(e.g. ``(beta_k - beta_{k-1}) log G`` in a tempering schedule).

**Trajectories are choices.** ``state.choices[site]`` holds the values each particle drew at
the latest step (``[N, ...]``; zeros where a site was not drawn, e.g. by a finished particle).
Every step emits them with its ancestors (:class:`SMCInfo`), and :func:`finalize` follows
the ancestry back once to give each final particle its whole trajectory
(``SMCResult.choices[site]``: ``[N, max_steps + 1, ...]``, column 0 from ``init``, ``t + 1``
from step ``t``) — small integers for an LM (its tokens), never a copy of a KV cache
(:mod:`ppl.inference.history`). :func:`ppl.inference.replay` turns trajectories back into
states and their ``log gamma``; a :class:`Reference` trajectory pins one slot (conditional
SMC).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ppl.inference.history import Window, complete, emitted, empty_window, remember, trace_back, zero_inactive
from ppl.inference.particles import StepProposal, clean, done, no_choices, pinned_column, run_particles
from ppl.inference.resampling import Resampler, multinomial
from ppl.program import StateSpace
from ppl.results import SMCResult


class SMCState(NamedTuple):
    """A particle population between pieces. Leaves with a leading ``[N]`` axis move with
    their particle at resampling, except ``init_choices`` (kept in ``init``'s order)."""

    particles: Any  # state pytree, leaves [N, ...] (a ParticleCache on its own axis)
    log_weights: Float[Array, " N"]  # log weights since the last resampling
    log_z_prefix: Float[Array, ""]  # log evidence banked at resampling events
    log_q_score: Float[Array, " N"]  # sum of log q at non-reparameterised proposal sites
    nan_weights: Bool[Array, ""]  # a NaN increment was met (and treated as -inf)
    ess: Float[Array, ""]  # of ``log_weights``, kept so each step computes it once
    choices: dict[str, Array]  # site -> [N, ...]: the values drawn at the latest step
    init_choices: dict[str, Array]  # site -> [N, ...]: the values init drew, in init's slots
    log_gamma: Float[Array, " N"]  # log gamma_t of each particle's trajectory so far
    n_steps: Int[Array, ""]  # steps propagated so far
    window: Window | None = None  # the last steps, when a move needs them (init(window=k))


class SMCInfo(NamedTuple):
    """What one step of :func:`step` did (stacked over steps into ``SMCResult``)."""

    ess: Float[Array, ""]  # after the step's weighting
    ancestors: Int[Array, " N"]  # particle i descends from ancestors[i] of the previous step
    resampled: Bool[Array, ""]  # resampling happened just before the step
    choices: dict[str, Array]  # what the step emits (ppl.inference.history.emitted)
    acceptance_rate: Float[Array, ""] = jnp.zeros(())  # of the move after the step (0: none)


class Reference(NamedTuple):
    """A trajectory held fixed in slot ``index`` (conditional SMC): its ``choices`` are one
    particle's ``[max_steps + 1, ...]`` per site, as in a row of ``SMCState.choices``.

    With ``index=None`` every row is pinned to its own trajectory (``choices`` then have a
    leading ``[N]`` axis, like ``SMCState.choices``): that is a replay.
    """

    choices: dict[str, Array]
    index: Int[Array, ""] | int | None = 0


class Move(Protocol):
    """An MCMC kernel on the population that leaves the current target ``gamma_t`` invariant
    (see :func:`ppl.inference.suffix_mh`). ``window`` is how many past steps of each particle
    it needs kept in ``SMCState.window`` (0 for none)."""

    window: int

    def __call__(
        self, program: StateSpace, key: PRNGKeyArray, state: SMCState, t: Int[Array, ""], proposal: StepProposal | None
    ) -> tuple[SMCState, Float[Array, " N"]]: ...


def effective_sample_size(log_weights: Float[Array, " N"]) -> Float[Array, ""]:
    """``(sum w)^2 / sum w^2``; zero when every weight is zero."""
    # Shift-invariant; centring on the largest weight keeps the difference below exact in
    # float32 when log-weights are in the hundreds (an LM's summed log-probabilities).
    centred = log_weights - jnp.max(log_weights)
    ess = jnp.exp(2 * jax.nn.logsumexp(centred) - jax.nn.logsumexp(2 * centred))
    return jnp.where(jnp.isfinite(ess), ess, 0.0)


def n_particles_of(state: SMCState) -> int:
    return state.log_weights.shape[0]


# --- the pieces --------------------------------------------------------------------------------


def init(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    proposal: StepProposal | None = None,
    reference: Reference | None = None,
    window: int = 0,
) -> SMCState:
    """Draw ``n_particles`` initial states from ``program.init`` (or ``proposal``) and weight
    them: ``log_weights = log p/q`` of the latent sites plus the potentials ``init`` adds.

    ``reference`` pins its slot (or every row, see :class:`Reference`) to column 0 of its
    trajectory; ``window > 0`` starts the :class:`Window` a move needs.
    """
    run = run_particles(program, key, n_particles, proposal=proposal, pinned=pinned_column(reference, 0, n_particles))
    log_weights, nan_weights = clean(run.log_weight, jnp.ones(n_particles, bool))
    choices = complete(run.choices, no_choices(program, n_particles))
    return SMCState(
        particles=run.value,
        log_weights=log_weights,
        log_z_prefix=jnp.zeros(()),
        log_q_score=run.log_q_score,
        nan_weights=nan_weights,
        ess=effective_sample_size(log_weights),
        choices=choices,
        init_choices=choices,
        log_gamma=clean(run.log_density, jnp.ones(n_particles, bool))[0],
        n_steps=jnp.zeros((), jnp.int32),
        window=empty_window(run.value, choices, window) if window > 0 else None,
    )


def reweight(state: SMCState, log_increments: Float[Array, " N"], active: Bool[Array, " N"] | None = None) -> SMCState:
    """Multiply the weights by ``exp(log_increments)`` (only on ``active`` particles).

    A NaN increment kills its particle (it becomes ``-inf``) and sets ``nan_weights``.
    The ESS is recomputed.
    """
    active = jnp.ones_like(log_increments, bool) if active is None else active
    log_increments, nan_now = clean(log_increments, active)
    log_weights = state.log_weights + log_increments
    return state._replace(
        log_weights=log_weights,
        ess=effective_sample_size(log_weights),
        nan_weights=state.nan_weights | nan_now,
    )


def should_resample(state: SMCState, ess_threshold: float | Float[Array, ""]) -> Bool[Array, ""]:
    """The adaptive trigger: ``ESS < ess_threshold · N`` (always when the threshold is 1,
    never when it is 0), and never when every particle is dead."""
    n = n_particles_of(state)
    alive = state.ess > 0  # zero exactly when every weight is zero
    return alive & ((ess_threshold >= 1.0) | (state.ess < ess_threshold * n))


def conditional_ancestors(
    key: PRNGKeyArray, log_weights: Float[Array, " N"], reference: Reference, ancestor: Int[Array, ""] | None = None
) -> Int[Array, " N"]:
    """Conditional multinomial resampling: every slot but the reference's draws its ancestor
    independently ``∝ w``; the reference keeps ``ancestor`` (its own slot unless ancestor
    sampling drew another). Multinomial is used because its conditional law given the
    reference's ancestor is just this; the other schemes' are not."""
    n = log_weights.shape[0]
    ancestors = multinomial(key, log_weights, n)
    return ancestors.at[reference.index].set(reference.index if ancestor is None else ancestor)


def resample(
    program: StateSpace,
    key: PRNGKeyArray,
    state: SMCState,
    *,
    resampler: Resampler,
    when: bool | Bool[Array, ""] = True,
    reference: Reference | None = None,
    reference_ancestor: Int[Array, ""] | None = None,
) -> tuple[SMCState, Int[Array, " N"]]:
    """Resample if ``when``: draw ancestors, gather every per-particle leaf, bank
    ``logmeanexp(log_weights)`` into ``log_z_prefix`` and reset the weights to zero.

    With a ``reference`` the draw is :func:`conditional_ancestors`. Returns the state and
    the ancestors (``arange(N)`` when nothing happened).
    """
    n = n_particles_of(state)

    def gather(state: SMCState):
        if reference is None:
            ancestors = resampler(key, state.log_weights, n)
        else:
            ancestors = conditional_ancestors(key, state.log_weights, reference, reference_ancestor)
        take = lambda leaf: jnp.take(leaf, ancestors, axis=0)  # noqa: E731
        return ancestors, state._replace(
            particles=program.reindex(state.particles, ancestors),
            log_weights=jnp.zeros_like(state.log_weights),
            log_z_prefix=state.log_z_prefix + jax.nn.logsumexp(state.log_weights) - math.log(n),
            log_q_score=take(state.log_q_score),
            ess=jnp.full((), n, state.ess.dtype),
            choices=jax.tree.map(take, state.choices),
            log_gamma=take(state.log_gamma),
            window=None if state.window is None else jax.tree.map(take, state.window),
        )

    if when is True:
        return gather(state)[::-1]
    # cond, not select: the gather touches every state leaf (a KV cache, for an LM).
    ancestors, state = jax.lax.cond(when, gather, lambda s: (jnp.arange(n, dtype=jnp.int32), s), state)
    return state, ancestors


def propagate(
    program: StateSpace,
    key: PRNGKeyArray,
    state: SMCState,
    t: Int[Array, ""],
    *,
    proposal: StepProposal | None = None,
    reference: Reference | None = None,
) -> SMCState:
    """Advance every unfinished particle by ``step(., t)`` (sampling from ``proposal`` where
    it applies) and multiply in its weight: ``log p/q`` of the latent sites plus the step's
    potentials. Finished particles are neither stepped nor weighted. ``state.choices``
    becomes the step's choices; ``reference`` pins its slot to column ``t + 1`` of the
    reference."""
    n = n_particles_of(state)
    active = ~done(program, state.particles)
    run = run_particles(
        program, key, n, particles=state.particles, t=t, proposal=proposal, pinned=pinned_column(reference, t + 1, n)
    )
    log_increments, _ = clean(run.log_weight, active)
    log_densities, _ = clean(run.log_density, active)
    choices = zero_inactive(complete(run.choices, state.choices), active)
    window = state.window
    if window is not None:
        window = remember(window, t, state.particles, log_increments, log_densities, choices)
    state = state._replace(
        particles=program.select(active, run.value, state.particles),
        log_q_score=state.log_q_score + jnp.where(active, run.log_q_score, 0.0),
        choices=choices,
        log_gamma=state.log_gamma + log_densities,
        n_steps=state.n_steps + jnp.any(active),
        window=window,
    )
    return reweight(state, run.log_weight, active)


def step(
    program: StateSpace,
    key: PRNGKeyArray,
    state: SMCState,
    t: Int[Array, ""],
    *,
    resampler: Resampler,
    ess_threshold: float | Float[Array, ""],
    proposal: StepProposal | None = None,
) -> tuple[SMCState, SMCInfo]:
    """The standard SMC step: :func:`resample` when :func:`should_resample`, then
    :func:`propagate`."""
    resample_key, propagate_key = jax.random.split(key)
    resampled = should_resample(state, ess_threshold)
    state, ancestors = resample(program, resample_key, state, resampler=resampler, when=resampled)
    state = propagate(program, propagate_key, state, t, proposal=proposal)
    return state, SMCInfo(state.ess, ancestors, resampled, emitted(state.choices, state.window, t))


def idle(state: SMCState) -> SMCInfo:
    """The record of a step that did not run (every particle finished or dead)."""
    n = n_particles_of(state)
    nothing = jax.tree.map(jnp.zeros_like, state.choices)
    return SMCInfo(
        jnp.asarray(float(n), state.ess.dtype),
        jnp.arange(n, dtype=jnp.int32),
        jnp.asarray(False),
        nothing,
        jnp.zeros(()),
    )


def rejuvenate(
    program: StateSpace,
    key: PRNGKeyArray,
    state: SMCState,
    t: Int[Array, ""],
    kernel: Move,
    *,
    proposal: StepProposal | None = None,
    when: bool | Bool[Array, ""] = True,
) -> tuple[SMCState, Float[Array, ""]]:
    """Apply the MCMC ``kernel`` to every particle after step ``t`` (if ``when``). The kernel
    leaves ``gamma_t`` invariant, so the weights are untouched and the population stays
    properly weighted. Returns the state and the fraction of particles that moved."""

    def move(state: SMCState):
        moved, accepted = kernel(program, key, state, t, proposal)
        return moved, jnp.mean(accepted.astype(jnp.float32))

    if when is True:
        return move(state)
    return jax.lax.cond(when, move, lambda s: (s, jnp.zeros(())), state)


def finalize(state: SMCState, history: SMCInfo) -> SMCResult:
    """The :class:`ppl.SMCResult` of a finished run: ``state`` after the last step and the
    stacked per-step ``history``. ``log_weights`` carry the evidence (``logsumexp ==
    log_z``); the trajectories are traced back through the ancestry."""
    n = n_particles_of(state)
    log_weights = state.log_z_prefix + state.log_weights - math.log(n)
    log_z = jax.nn.logsumexp(log_weights)
    return SMCResult(
        particles=state.particles,
        log_weights=log_weights,
        log_z=log_z,
        ess=history.ess,
        ancestors=history.ancestors,
        resampled=history.resampled,
        n_steps=state.n_steps,
        all_dead=~jnp.isfinite(log_z),
        nan_weights=state.nan_weights,
        log_q_score=state.log_q_score,
        choices=trace_back(state.init_choices, history.choices, history.ancestors, state.n_steps, state.window),
        log_gamma=state.log_gamma,
        acceptance_rate=history.acceptance_rate,
    )
