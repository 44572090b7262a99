"""Running a program fragment (``init`` or one ``step``) for a whole particle population.

A batched program (``StateSpace.batched``) describes all particles at once and runs as one
call; any other program describes one particle and runs under ``vmap`` with a shared key and
the particle's index (see ``ppl.program._seed``). Either way the result is a
:class:`ppl.program.WeightedRun` with a leading particle axis: new states, importance
weights, ``log gamma`` increments and the latent choices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ppl.program import StateSpace, WeightedRun, check_program, run_weighted

# proposal(site name, prior, particle state, t) -> distribution to sample from, or None.
# During ``init`` it is called with state=None and t=None.
StepProposal = Callable[[str, Any, Any, Any], Any]


def _bind(proposal: StepProposal | None, state: Any, t: Any):
    if proposal is None:
        return None
    return lambda name, prior: proposal(name, prior, state, t)


def run_particles(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    particles: Any = None,
    t: Int[Array, ""] | None = None,
    proposal: StepProposal | None = None,
    pinned: tuple[dict[str, Array], Bool[Array, " N"]] | None = None,
) -> WeightedRun:
    """Run ``init`` (``particles is None``) or ``step(., t)`` once for every particle.

    One batched call for a batched program, a ``vmap`` of single-particle runs otherwise.
    ``pinned = (values, rows)``: ``values[site]`` has one entry per particle (``[N, ...]``),
    forced on the particles where ``rows`` is true.
    """
    if program.batched:
        fn, args = (program.init, (n_particles,)) if particles is None else (program.step, (particles, t))
        return run_weighted(
            fn, key, *args, proposal=_bind(proposal, particles, t), batch_shape=(n_particles,), pinned=pinned
        )
    # One shared key and a particle index: see ``ppl.program._seed`` for why not split keys.
    indices = jnp.arange(n_particles, dtype=jnp.uint32)
    values, rows = pinned if pinned is not None else ({}, jnp.zeros(n_particles, bool))

    def one(index, particle, value, row):
        fn, args = (program.init, ()) if particles is None else (program.step, (particle, t))
        return run_weighted(fn, key, *args, proposal=_bind(proposal, particle, t), particle=index, pinned=(value, row))

    return jax.vmap(one)(indices, particles, values, rows)


def done(program: StateSpace, particles: Any) -> Bool[Array, " N"]:
    """Which particles have finished (``program.done`` for every particle)."""
    return program.done(particles) if program.batched else jax.vmap(program.done)(particles)


def pinned_column(reference: Any, column: int | Int[Array, ""], n: int):
    """A :class:`ppl.inference.kernel.Reference`'s values at trajectory column ``column``,
    one per row, and the rows they are forced on: the reference's slot, or every row when
    ``reference.index`` is ``None`` (a replay)."""
    if reference is None:
        return None
    if reference.index is None:
        return {site: trajectory[:, column] for site, trajectory in reference.choices.items()}, jnp.ones(n, bool)
    values = {
        site: jnp.broadcast_to(trajectory[column], (n,) + trajectory.shape[1:])
        for site, trajectory in reference.choices.items()
    }
    return values, jnp.arange(n) == reference.index


def clean(log_increments: Float[Array, " N"], active: Bool[Array, " N"]):
    """Zero increments of inactive particles and turn NaN into -inf (a killed particle)."""
    is_nan = jnp.isnan(log_increments) & active
    log_increments = jnp.where(is_nan, -jnp.inf, log_increments)
    return jnp.where(active, log_increments, 0.0), jnp.any(is_nan)


def no_choices(program: StateSpace, n_particles: int) -> dict[str, Array]:
    """Zeros for every site of ``init`` or ``step``, one ``[N, ...]`` array each."""
    shapes = check_program(program, n_particles)
    zeros = {}
    for site, shape in {**shapes.step, **shapes.init}.items():
        event = shape.shape[1:] if program.batched else shape.shape
        zeros[site] = jnp.zeros((n_particles,) + tuple(event), shape.dtype)
    return zeros
