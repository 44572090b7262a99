"""Conditional SMC and particle Gibbs (Andrieu, Doucet & Holenstein 2010), with ancestor
sampling (PGAS; Lindsten, Jordan & Schön 2014).

Particle Gibbs is a Markov chain on trajectories whose stationary law is the program's
posterior ``gamma / Z``. One iteration, from the current trajectory ``x*``::

    conditional SMC: run SMC with N particles, but slot r is x* at every step:
        x^r_0 = x*_0;  the others ~ init
        for t = 0 .. max_steps-1:
            [ancestor sampling]  a ~ w^i · gamma(x^i_{<t}, x*_{t:}) / gamma(x^i_{<t})
            ancestors of the other slots ~ Multinomial(w);  slot r takes a (else r itself)
            x^r_t = x*_t;  the others ~ step
    x* <- particle k with probability w_k

Without ancestor sampling the reference's past never changes, so early steps mix slowly
(path degeneracy); with it the reference can switch to another particle's past at every
step, and the chain mixes well even with few particles.

Ancestor weights need ``gamma`` of the reference's future after each particle's past
(:func:`ppl.inference.trajectories.lookahead`): one step of it for a ``markov`` program, the
whole remaining reference otherwise. For :class:`ppl.Generation` the latter means decoding
the reference's remaining tokens after every particle's prefix at every step: the particles'
KV cache is copied once per step and ``N · (T - t)`` tokens are decoded (``O(N T^2)`` per
sweep instead of SMC's ``O(N T)``). The reference's own cache never needs rebuilding: the
ancestor's rows are gathered into its slot by resampling, like any other particle's, and its
pinned token is decoded on top.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ppl.inference.history import emitted
from ppl.inference.kernel import Reference, SMCInfo, finalize, idle, init, propagate, resample
from ppl.inference.particles import StepProposal, done
from ppl.inference.resampling import multinomial
from ppl.inference.sequential import check_positive_int, smc, validate
from ppl.inference.trajectories import activity, check_trajectories, lookahead
from ppl.program import StateSpace, check_program
from ppl.results import MCMCResult, SMCResult


class PGState(NamedTuple):
    """The chain's state: the current reference trajectory (``[max_steps + 1, ...]`` per
    site) and the evidence estimate of the conditional SMC run that drew it."""

    choices: dict[str, Array]
    log_z: Float[Array, ""]


class PGInfo(NamedTuple):
    """What one particle-Gibbs sweep did: whether the kept trajectory changed, and the
    conditional SMC sweep's ``log Ẑ``."""

    changed: Bool[Array, ""]  # the new trajectory differs from the old
    log_z: Float[Array, ""]  # of the conditional SMC sweep


def conditional_smc(
    program: StateSpace,
    key: PRNGKeyArray,
    reference: Reference,
    n_particles: int,
    *,
    ancestor_sampling: bool = False,
    proposal: StepProposal | None = None,
) -> SMCResult:
    """SMC with slot ``reference.index`` held to ``reference.choices`` (see module docstring).

    Resamples before every step (conditional multinomial). The result's particles and
    weights are those of the sweep; its ``log_z`` is *not* an unbiased estimate of ``Z``
    (the reference is not a draw of the sweep), but drawing one particle ``∝`` its weight
    is one particle Gibbs update.
    """
    horizon = 1 if program.markov else program.max_steps
    reference_active = activity(program, jax.tree.map(lambda path: path[None], reference.choices))[0]
    init_key, loop_key = jax.random.split(key)
    state = init(program, init_key, n_particles, proposal=proposal, reference=reference)

    def advance(state, t):
        running = ~jnp.all(done(program, state.particles))

        def run(state):
            ancestor_key, resample_key, propagate_key = jax.random.split(jax.random.fold_in(loop_key, t), 3)
            ancestor = None
            if ancestor_sampling:
                look_key, draw_key = jax.random.split(ancestor_key)
                ahead = lookahead(program, look_key, state.particles, reference.choices, reference_active, t, horizon)
                ancestor = jax.random.categorical(draw_key, state.log_weights + ahead)
            state, ancestors = resample(
                program, resample_key, state, resampler=multinomial, reference=reference, reference_ancestor=ancestor
            )
            state = propagate(program, propagate_key, state, t, proposal=proposal, reference=reference)
            return state, SMCInfo(state.ess, ancestors, jnp.asarray(True), emitted(state.choices, None, t))

        return jax.lax.cond(running, run, lambda s: (s, idle(s)), state)

    state, history = jax.lax.scan(advance, state, jnp.arange(program.max_steps))
    return finalize(state, history)


def _pick(result: SMCResult, key: PRNGKeyArray) -> PGState:
    index = jax.random.categorical(key, result.log_weights)
    return PGState(jax.tree.map(lambda path: path[index], result.choices), result.log_z)


def particle_gibbs_init(
    program: StateSpace, key: PRNGKeyArray, n_particles: int, *, proposal: StepProposal | None = None
) -> PGState:
    """A first trajectory: one particle of an ordinary SMC run, drawn ``∝`` its weight."""
    run_key, pick_key = jax.random.split(key)
    return _pick(smc(program, run_key, n_particles, ess_threshold=1.0, proposal=proposal), pick_key)


def particle_gibbs_step(
    program: StateSpace,
    key: PRNGKeyArray,
    state: PGState,
    n_particles: int,
    *,
    ancestor_sampling: bool = False,
    proposal: StepProposal | None = None,
) -> tuple[PGState, PGInfo]:
    """One particle Gibbs iteration; leaves the posterior ``gamma / Z`` invariant."""
    sweep_key, pick_key = jax.random.split(key)
    result = conditional_smc(
        program,
        sweep_key,
        Reference(state.choices, 0),
        n_particles,
        ancestor_sampling=ancestor_sampling,
        proposal=proposal,
    )
    new = _pick(result, pick_key)
    changed = jnp.any(
        jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(new.choices), jax.tree.leaves(state.choices))])
    )
    return new, PGInfo(changed, result.log_z)


def check_reference(program: StateSpace, choices: dict[str, Array]) -> dict[str, Array]:
    """``choices`` as one trajectory of ``program`` (cast to the sites' dtypes); ``ValueError``
    unless it has every recorded site, each ``[max_steps + 1, ...]`` with the site's shape."""
    check_trajectories(program, choices, leading=0)
    shapes = check_program(program, 1)
    expected = {**shapes.step, **shapes.init}
    if set(choices) != set(expected):
        raise ValueError(
            f"reference trajectory has sites {sorted(choices)}; {type(program).__name__} samples {sorted(expected)}"
        )
    for site, shape in expected.items():
        event = shape.shape[1:] if program.batched else shape.shape
        got = jnp.shape(choices[site])[1:]
        if tuple(got) != tuple(event):
            raise ValueError(
                f"reference trajectory of site {site!r} has per-step shape {list(got)}, expected {list(event)}"
            )
    return {site: jnp.asarray(choices[site], expected[site].dtype) for site in expected}


def particle_gibbs(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    n_iterations: int,
    *,
    ancestor_sampling: bool = False,
    proposal: StepProposal | None = None,
    initial: dict[str, Array] | None = None,
) -> MCMCResult:
    """Particle Gibbs (with ancestor sampling if asked): ``n_iterations`` sweeps of
    conditional SMC with ``n_particles`` in one ``lax.scan``.

    Returns an :class:`ppl.MCMCResult` whose ``samples[site]`` is ``[n_iterations,
    max_steps + 1, ...]`` (index 0 is ``init``'s value of the site, ``t + 1`` step ``t``'s),
    ``log_z`` the log-evidence of each sweep and ``accepted`` whether the trajectory changed.
    The chain starts from ``initial`` (one trajectory) or from a particle of one SMC run; no
    burn-in is discarded.
    """
    validate(program, n_particles)
    check_positive_int("n_iterations", n_iterations)
    if initial is not None:
        initial = check_reference(program, initial)
    return _particle_gibbs(program, key, n_particles, n_iterations, ancestor_sampling, proposal, initial)


@eqx.filter_jit
def _particle_gibbs(program, key, n_particles, n_iterations, ancestor_sampling, proposal, initial) -> MCMCResult:
    init_key, chain_key = jax.random.split(key)
    if initial is None:
        state = particle_gibbs_init(program, init_key, n_particles, proposal=proposal)
    else:
        state = PGState(initial, jnp.asarray(jnp.nan))

    def one(state, step_key):
        state, info = particle_gibbs_step(
            program, step_key, state, n_particles, ancestor_sampling=ancestor_sampling, proposal=proposal
        )
        return state, (state.choices, info.log_z, info.changed)

    _, (samples, log_z, changed) = jax.lax.scan(one, state, jax.random.split(chain_key, n_iterations))
    return MCMCResult(samples=samples, log_z=log_z, accepted=changed)
