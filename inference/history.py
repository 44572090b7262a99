"""What SMC keeps of the past: the choices of each step with the ancestry, and a short window.

**Choices with the ancestry.** Each step emits the values its particles drew (one
``[N, ...]`` array per site) and its ancestors; nothing per particle is carried along, so a
step costs the same whether or not trajectories are wanted. :func:`trace_back` turns the
emitted history into each final particle's trajectory by following its ancestry backwards
once, at the end: ``O(N · T)`` small values in all, never a copy of a KV cache.

**A window on the last steps.** A move that regenerates the last ``w`` steps of a particle
(:func:`ppl.inference.suffix_mh`) needs, per particle, its state before each of them, their
weight increments and their choices: :class:`Window`, a ring of ``w`` entries gathered with
the particles at resampling. A state is kept *light*: a :class:`ppl.lm.ParticleCache` leaf is
stored as its ``checkpoint()`` (for a KV cache, the rows' lengths) and rolled back from the
current cache, which only grew since. Since a move may rewrite a step up to ``w - 1`` steps
later, the choices of step ``s`` are emitted at step ``s + w - 1``, once final.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ppl.lm import ParticleCache


class Window(NamedTuple):
    """The last ``size`` steps of every particle, in a ring indexed by ``step % size``.

    ``states`` are light copies of each particle's state *before* each step, ``log_increments``
    the log-weight increments the steps added, ``log_densities`` their ``log gamma``
    increments, ``choices`` the values they drew.
    """

    states: Any  # leaves [N, size, ...]
    log_increments: Float[Array, "N size"]
    log_densities: Float[Array, "N size"]
    choices: dict[str, Array]  # site -> [N, size, ...]

    @property
    def size(self) -> int:
        return self.log_increments.shape[1]


def _is_cache(leaf: Any) -> bool:
    return isinstance(leaf, ParticleCache)


def light(particles: Any) -> Any:
    """The particles with every :class:`ppl.lm.ParticleCache` replaced by its checkpoint."""
    return jax.tree.map(lambda leaf: leaf.checkpoint() if _is_cache(leaf) else leaf, particles, is_leaf=_is_cache)


def restore(snapshot: Any, particles: Any) -> Any:
    """The state ``snapshot`` describes (see :func:`light`), each cache rolled back from the
    matching cache of ``particles``: valid when those rows have only grown since."""
    return jax.tree.map(
        lambda leaf, saved: leaf.restore(saved) if _is_cache(leaf) else saved,
        particles,
        snapshot,
        is_leaf=_is_cache,
    )


def empty_window(particles: Any, choices: dict[str, Array], size: int) -> Window:
    def ring(leaf):
        return jnp.zeros((leaf.shape[0], size) + leaf.shape[1:], leaf.dtype)

    n = jax.tree.leaves(choices or light(particles))[0].shape[0]
    return Window(
        jax.tree.map(ring, light(particles)), jnp.zeros((n, size)), jnp.zeros((n, size)), jax.tree.map(ring, choices)
    )


def remember(
    window: Window,
    t: Int[Array, ""],
    before: Any,
    log_increments: Float[Array, " N"],
    log_densities: Float[Array, " N"],
    choices: dict[str, Array],
) -> Window:
    """``window`` with step ``t`` (its pre-step state, increments and choices) in its ring."""
    slot = t % window.size
    put = lambda ring, value: ring.at[:, slot].set(value)  # noqa: E731
    return Window(
        jax.tree.map(put, window.states, light(before)),
        put(window.log_increments, log_increments),
        put(window.log_densities, log_densities),
        jax.tree.map(put, window.choices, choices),
    )


def zero_inactive(choices: dict[str, Array], active: Bool[Array, " N"]) -> dict[str, Array]:
    """Zeros on the rows of finished particles: they drew nothing at this step."""
    return {
        site: jnp.where(active.reshape(active.shape + (1,) * (value.ndim - 1)), value, jnp.zeros_like(value))
        for site, value in choices.items()
    }


def complete(choices: dict[str, Array], like: dict[str, Array]) -> dict[str, Array]:
    """``choices`` with every site of ``like`` (zeros for a site this fragment did not draw)."""
    return {site: jnp.asarray(choices[site], zero.dtype) if site in choices else zero for site, zero in like.items()}


def emitted(choices: dict[str, Array], window: Window | None, t: Int[Array, ""]) -> dict[str, Array]:
    """What step ``t`` emits into the history: its own choices, or with a window those of step
    ``t - size + 1``, which no move can change any more."""
    if window is None:
        return choices
    slot = (t + 1) % window.size
    return jax.tree.map(lambda ring: ring[:, slot], window.choices)


def trace_back(
    init_choices: dict[str, Array],
    history: dict[str, Array],
    ancestors: Int[Array, "T N"],
    n_steps: Int[Array, ""],
    window: Window | None,
) -> dict[str, Array]:
    """Each final particle's trajectory ``[N, T + 1, ...]`` per site.

    ``history[site][u]`` is what step ``u`` emitted (:func:`emitted`); ``ancestors[u, i]``
    the slot particle ``i`` of step ``u`` came from. Column 0 is ``init_choices`` along the
    lineage, column ``s + 1`` step ``s``'s value along it; steps after ``n_steps`` are zeros.
    """
    max_steps, n = ancestors.shape
    lag = 0 if window is None else window.size - 1

    def back(slots, ancestors_u):
        return ancestors_u[slots], slots

    first, slots = jax.lax.scan(
        back, jnp.arange(n, dtype=ancestors.dtype), ancestors, reverse=True
    )  # slots[u] = lineage's slot at u
    steps = jnp.arange(max_steps)
    source = jnp.minimum(steps + lag, max_steps - 1)
    from_history = (steps + lag < n_steps)[:, None]
    in_window = ((steps < n_steps) & ~(steps + lag < n_steps))[:, None]

    def column(site):
        events = history[site].shape[2:]
        along = jax.vmap(lambda u: history[site][u][slots[u]])(source)  # [T, N, ...]
        expand = lambda mask: mask.reshape(mask.shape + (1,) * len(events))  # noqa: E731
        values = jnp.where(expand(from_history), along, jnp.zeros_like(along))
        if window is not None:
            ring = jnp.moveaxis(window.choices[site][:, steps % window.size], 1, 0)  # [T, N, ...]
            values = jnp.where(expand(in_window), ring, values)
        return jnp.concatenate([init_choices[site][first][None], values]).swapaxes(0, 1)

    return {site: column(site) for site in history}
