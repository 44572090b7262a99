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
        every k steps: x^i ~ K_t(x^i, .)                  # optional move, invariant for gamma_t
    log_z = log_z_prefix + logmeanexp(logw)

``log_z`` is unbiased for ``Z`` (in the sense ``E[exp log_z] = Z``) for every resampler and
threshold: threshold 0 never resamples (importance sampling), 1 resamples every step. A move
that leaves the current target invariant changes no weight, so it keeps that property.
The loop is one ``lax.scan`` over the public pieces of :mod:`ppl.inference.kernel`, whose
remaining iterations are skipped once every particle is done.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ppl.inference.history import emitted
from ppl.inference.kernel import Move, finalize, idle, init, rejuvenate, step
from ppl.inference.particles import StepProposal, done
from ppl.inference.resampling import Resampler, get_resampler
from ppl.program import StateSpace
from ppl.results import SMCResult


def _is_int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def check_positive_int(name: str, value: Any) -> None:
    if not _is_int_at_least(value, 1):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def validate(program: StateSpace, n_particles: int, ess_threshold: Any = 0.0) -> None:
    """Clear errors for arguments every SMC-based transformation takes."""
    if not isinstance(program, StateSpace):
        raise TypeError(f"program must be a ppl.StateSpace, got {type(program).__name__}")
    check_positive_int("n_particles", n_particles)
    max_steps = getattr(program, "max_steps", None)
    if not _is_int_at_least(max_steps, 0):
        raise ValueError(
            f"{type(program).__name__}.max_steps must be a static non-negative int "
            f"(declare it with eqx.field(static=True)), got {max_steps!r}"
        )
    if not isinstance(ess_threshold, jax.core.Tracer):
        value = float(ess_threshold)
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"ess_threshold must lie in [0, 1], got {value}")


def _validate_move(program: StateSpace, kernel: Move | None, every: int) -> None:
    if kernel is None:
        return
    check_positive_int("rejuvenate_every", every)
    window = getattr(kernel, "window", None)
    if not _is_int_at_least(window, 0):
        raise TypeError(
            f"rejuvenate must be a move kernel with an int `window` attribute (e.g. "
            f"ppl.inference.suffix_mh(lag)), got {type(kernel).__name__}"
        )
    if window > program.max_steps:
        raise ValueError(
            f"{type(kernel).__name__} needs the last {window} steps but "
            f"{type(program).__name__} has only max_steps={program.max_steps}"
        )


def check_move_shapes(program: StateSpace, kernel: Move, state: Any, proposal: StepProposal | None) -> None:
    """``ValueError`` naming the leaf if ``kernel`` changes the population's shapes."""
    moved, _ = jax.eval_shape(
        lambda s: kernel(program, jax.random.key(0), s, jnp.zeros((), jnp.int32), proposal), state
    )
    before, before_tree = jax.tree_util.tree_flatten_with_path(state)
    after, after_tree = jax.tree_util.tree_flatten_with_path(moved)
    if before_tree != after_tree:
        raise ValueError(f"move kernel {type(kernel).__name__} changed the structure of the SMC state")
    for (path, old), (_, new) in zip(before, after):
        if old.shape != new.shape or old.dtype != new.dtype:
            raise ValueError(
                f"move kernel {type(kernel).__name__} changed state leaf {jax.tree_util.keystr(path)} "
                f"from {old.dtype}{list(old.shape)} to {new.dtype}{list(new.shape)}; a move must keep shapes"
            )


def _advance(program, loop_key, resampler, ess_threshold, proposal, kernel, every, place=None):
    """One scan iteration of SMC at step ``t``: a step, then the move when it is due; then
    ``place`` (if given) pins the state's layout over devices (:mod:`ppl.inference.scale`)."""

    def advance(state, t):
        running = (t < program.max_steps) & ~jnp.all(done(program, state.particles)) & (state.ess > 0)

        def run(state):
            step_key, move_key = jax.random.split(jax.random.fold_in(loop_key, t))
            state, info = step(
                program, step_key, state, t, resampler=resampler, ess_threshold=ess_threshold, proposal=proposal
            )
            if kernel is not None:
                # A move starts once it has the steps it regenerates.
                when = (t + 1 >= kernel.window) & ((t + 1) % every == 0)
                state, acceptance = rejuvenate(program, move_key, state, t, kernel, proposal=proposal, when=when)
                # What the step emits must be read after the move, which may rewrite it.
                info = info._replace(choices=emitted(state.choices, state.window, t), acceptance_rate=acceptance)
            return (state, info) if place is None else place(state, info)

        # scan + cond rather than while_loop: reverse-mode differentiable (for VI), and once
        # every particle is done (or dead) the remaining iterations cost nothing.
        return jax.lax.cond(running, run, lambda s: (s, idle(s)), state)

    return advance


def _start(program, key, n_particles, proposal, kernel):
    init_key, loop_key = jax.random.split(key)
    state = init(program, init_key, n_particles, proposal=proposal, window=0 if kernel is None else kernel.window)
    if kernel is not None:
        check_move_shapes(program, kernel, state, proposal)
    return state, loop_key


@eqx.filter_jit
def _smc(program, key, n_particles, resampler, ess_threshold, proposal, kernel, every, place=None) -> SMCResult:
    state, loop_key = _start(program, key, n_particles, proposal, kernel)
    if place is not None:
        state, _ = place(state, idle(state))
    advance = _advance(program, loop_key, resampler, ess_threshold, proposal, kernel, every, place)
    state, history = jax.lax.scan(advance, state, jnp.arange(program.max_steps))
    return finalize(state, history)


@eqx.filter_jit
def _segment(program, loop_key, state, first, length, resampler, ess_threshold, proposal, kernel, every):
    advance = _advance(program, loop_key, resampler, ess_threshold, proposal, kernel, every)
    state, history = jax.lax.scan(advance, state, first + jnp.arange(length))
    last = jnp.minimum(length, program.max_steps - first) - 1
    return state, history, history.ess[last], jnp.sum(done(program, state.particles))


def _smc_in_segments(program, key, n_particles, resampler, ess_threshold, proposal, kernel, every, progress, length):
    """:func:`_smc` as a host loop over compiled segments of ``length`` steps, reporting
    after each. Same keys per step, same result; every segment is the same compiled function
    (no host callback inside), so it stays eligible for the persistent compilation cache."""
    state, loop_key = _start_jit(program, key, n_particles, proposal, kernel)
    histories = []
    for first in range(0, program.max_steps, length):
        state, history, ess, n_finished = _segment(
            program, loop_key, state, jnp.int32(first), length, resampler, ess_threshold, proposal, kernel, every
        )
        histories.append(history)
        progress(min(first + length, program.max_steps), ess, n_finished)
    history = jax.tree.map(lambda *parts: jnp.concatenate(parts)[: program.max_steps], *histories)
    return _finalize_jit(state, history)


_start_jit = eqx.filter_jit(_start)
_finalize_jit = eqx.filter_jit(finalize)


def smc(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    resampling: str | Resampler = "systematic",
    ess_threshold: float | Float[Array, ""] = 0.5,
    proposal: StepProposal | None = None,
    rejuvenate: Move | None = None,
    rejuvenate_every: int = 1,
    progress: Callable[[int, Any, Any], None] | None = None,
    progress_every: int = 4,
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
            sample each latent site from; ``None`` falls back to the ``infer={"proposal": q}``
            the program attached, else the prior. Weights include ``log p - log q``; the
            target is unchanged.
        rejuvenate: an MCMC move that leaves the current target invariant (resample-move,
            Gilks & Berzuini 2001), e.g. :func:`ppl.inference.suffix_mh`; applied after every
            ``rejuvenate_every``-th step once the kernel's ``window`` of steps has been taken.
            It changes particles, never weights.
        progress: an optional host function ``progress(steps, ess, n_finished)``, e.g. to
            drive a progress bar: the run is then a host loop over one compiled segment of
            ``progress_every`` steps, and ``progress`` is called after each with the steps
            taken, the ESS after the last of them and the number of finished particles. The
            result is the same as without it (same key, same draws); no host callback is
            compiled in, so warm starts from the persistent compilation cache
            (:func:`ppl.enable_compilation_cache`) still work. Not for use under a user's
            ``jit``.
        progress_every: steps per segment when ``progress`` is given.

    Particles whose ``program.done`` holds are frozen. A NaN potential kills its particle
    (treated as ``-inf``) and sets ``nan_weights``; if every particle dies, ``log_z = -inf``
    and ``all_dead`` is set — no NaN is ever returned. ``result.choices`` holds every
    particle's trajectory (see :mod:`ppl.inference.kernel`).
    The whole run is one compiled function per (program type, shapes, ``n_particles``,
    ``resampling``, move); it can also be called inside a user's ``jit`` or ``vmap``.
    """
    validate(program, n_particles, ess_threshold)
    _validate_move(program, rejuvenate, rejuvenate_every)
    arguments = (
        program,
        key,
        n_particles,
        get_resampler(resampling),
        jnp.asarray(ess_threshold, jnp.float32),
        proposal,
        rejuvenate,
        rejuvenate_every,
    )
    if progress is None:
        return _smc(*arguments)
    check_positive_int("progress_every", progress_every)
    return _smc_in_segments(*arguments, progress, progress_every)


def importance(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    proposal: StepProposal | None = None,
) -> SMCResult:
    """Importance sampling: :func:`smc` that never resamples (same target, same weights)."""
    return smc(program, key, n_particles, ess_threshold=0.0, proposal=proposal)
