"""Trajectories as choices: replay a recorded trajectory through its program, and score it.

A trajectory is the values a particle's latent sites took at ``init`` and at every step
(``SMCResult.choices``, one row per particle: ``[max_steps + 1, ...]`` per site). Replaying it
runs the program with every site pinned to its recorded value (:class:`ppl.handlers.pin`),
so the program's own code rebuilds the state — for an LM, the KV cache by decoding the
recorded tokens — and its ``log gamma``::

    log gamma(x) = sum_t [ log p(x_t | x_{<t}) + log G_t(x_{0:t}) ]

This is what conditional SMC needs to hold a reference in place, what ancestor sampling
needs to weigh a reference's future after another particle's past (:func:`lookahead`), and
what a user needs to score a text under a program.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ppl.inference.kernel import Reference, SMCState, init, propagate
from ppl.inference.particles import StepProposal, done, run_particles
from ppl.program import StateSpace


def check_trajectories(program: StateSpace, choices: dict[str, Array], leading: int) -> int:
    """The number of trajectories; ``ValueError`` when a site's trajectory has the wrong length."""
    if not isinstance(choices, dict) or not choices:
        raise TypeError("choices must be a non-empty dict of site name -> trajectory array")
    columns = program.max_steps + 1
    counts = set()
    for site, trajectory in choices.items():
        shape = jnp.shape(trajectory)
        if len(shape) < leading + 1 or shape[leading] != columns:
            where = "[N, max_steps + 1, ...]" if leading else "[max_steps + 1, ...]"
            raise ValueError(
                f"trajectory of site {site!r} has shape {list(shape)}; {type(program).__name__} needs "
                f"{where} with max_steps + 1 = {columns} (column 0 is init's value, t + 1 step t's)"
            )
        if leading:
            counts.add(shape[0])
    if len(counts) > 1:
        raise ValueError(f"trajectories disagree on the number of particles: {sorted(counts)}")
    return counts.pop() if counts else 1


def _replay(program, choices, key, proposal, window):
    n = check_trajectories(program, choices, leading=1)
    key = jax.random.key(0) if key is None else key
    init_key, loop_key = jax.random.split(key)
    every_row = Reference(choices, index=None)
    state = init(program, init_key, n, proposal=proposal, reference=every_row, window=window)

    def advance(state, t):
        active = ~done(program, state.particles)
        forward = lambda s: propagate(
            program, jax.random.fold_in(loop_key, t), s, t, proposal=proposal, reference=every_row
        )  # noqa: E731
        return jax.lax.cond(jnp.any(active), forward, lambda s: s, state), active

    state, active = jax.lax.scan(advance, state, jnp.arange(program.max_steps))
    return state, active.T


def replay(
    program: StateSpace,
    choices: dict[str, Array],
    *,
    key: PRNGKeyArray | None = None,
    proposal: StepProposal | None = None,
    window: int = 0,
) -> SMCState:
    """Run ``program`` with every row pinned to its trajectory ``choices[site][i]``.

    Returns the population those trajectories define: ``particles`` (the rebuilt states),
    ``log_gamma`` (each trajectory's ``log gamma``), and ``log_weights``, the weight each
    trajectory would have had if ``proposal`` (or the program's own) had drawn it without
    resampling. Sites missing from ``choices`` are drawn from ``key``. ``window`` fills the
    window a move needs, so a move can start from replayed particles.
    """
    return _replay(program, choices, key, proposal, window)[0]


def activity(program: StateSpace, choices: dict[str, Array]) -> Bool[Array, "N T"]:
    """``activity[i, t]``: trajectory ``i`` has not finished before step ``t`` (so step ``t``
    is one of its steps rather than a no-op)."""
    return _replay(program, choices, None, None, 0)[1]


def score(program: StateSpace, choices: dict[str, Array]) -> Float[Array, " N"]:
    """``log gamma`` of each trajectory in ``choices`` (``[N, max_steps + 1, ...]`` per site)."""
    return replay(program, choices).log_gamma


def lookahead(
    program: StateSpace,
    key: PRNGKeyArray,
    particles: Any,
    reference: dict[str, Array],
    reference_active: Bool[Array, " T"],
    t: Int[Array, ""],
    horizon: int,
) -> Float[Array, " N"]:
    """``log gamma(x^i_{<t}, x*_{t:t+horizon}) - log gamma(x^i_{<t})`` for every particle.

    Continues each particle's state with the reference's choices of steps ``t`` to
    ``t + horizon - 1`` (its trajectory columns ``t + 1 ...``) and sums their ``log gamma``
    increments: the ancestor-sampling weight of PGAS (Lindsten, Jordan & Schön 2014) once
    added to the particles' log-weights. With the whole remaining trajectory as horizon it is
    exact for any program; for a ``markov`` program one step is exact. A particle that
    finishes at another step than the reference (``reference_active``, from :func:`activity`)
    cannot carry its future: ``-inf``. ``particles`` is not changed (a copy is stepped: for
    an LM, the KV cache is copied once).
    """
    n = jax.eval_shape(lambda p: done(program, p), particles).shape[0]

    def advance(carry, offset):
        s = t + offset

        def forward(carry):
            particles, total = carry
            active = ~done(program, particles)
            values = {site: jnp.broadcast_to(path[s + 1], (n,) + path.shape[1:]) for site, path in reference.items()}
            run = run_particles(
                program, jax.random.fold_in(key, s), n, particles=particles, t=s, pinned=(values, jnp.ones(n, bool))
            )
            total = total + jnp.where(active, run.log_density, 0.0)
            total = jnp.where(active == reference_active[s], total, -jnp.inf)
            return program.select(active, run.value, particles), total

        return jax.lax.cond(s < program.max_steps, forward, lambda c: c, carry), None

    (_, total), _ = jax.lax.scan(advance, (particles, jnp.zeros(n)), jnp.arange(horizon))
    return total
