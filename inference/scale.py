"""Scale-out: many prompts in one call, particles over a device mesh, many hosts.

Everything here is JAX's own machinery: a batch of programs is a ``vmap`` of SMC, a mesh is
a :class:`jax.sharding.Mesh`, many hosts join through :func:`jax.distributed.initialize`.

**A batch of programs** (:func:`smc_batch`): programs of one shape (e.g.
:meth:`ppl.Generation.for_prompts`, prompts right-padded to one length) are stacked — a leaf
that every program shares, such as the LM's weights or a constraint built once, is kept
once — and SMC runs on each with its own key, particles, ``log_z``, ESS and resampling
decisions. Result ``b`` equals ``smc(programs[b], keys[b], N)``.

**A mesh** (``mesh=``): the particle axis is split over the mesh axis ``particle_axis`` and
the prompt axis over ``prompt_axis``; the programs' shared leaves (the LM weights) are
replicated, the KV cache is split with its particles (a cache names its particle axis,
:meth:`ppl.lm.ParticleCache.particle_axes`). Two resampling modes, both unbiased:

- ``islands=False`` — *exact global resampling*: the log-weights are replicated (``N``
  floats), ancestors are drawn over all ``N`` particles as on one device, and the chosen
  particles' rows (their cache) are gathered across devices. The result is the one-device
  result for the same key (random draws use JAX's partitionable Threefry, so they do not
  depend on the layout).
- ``islands=True`` — *island resampling* (Vergé, Dubarry, Del Moral & Moulines 2015): each
  device runs SMC on its own ``N / D`` particles with key ``fold_in(key, d)``, resampling
  only within itself, so no cache row ever leaves its device; the islands are independent
  and each island's ``Ẑ_d`` is unbiased, so their mean is: the combined weights are
  ``w_i^d · Ẑ_d / (D · sum_j w_j^d)``, i.e. the island's own log-weights minus ``log D``,
  and ``log_z = logmeanexp_d log Ẑ_d``. Per-step ``ess`` is then the sum of the islands'
  ESS and ``resampled`` whether any island resampled; ``ancestors`` are global indices.

**Many hosts**: call ``jax.distributed.initialize`` in every process, build the mesh over
``jax.devices()`` (all processes' devices), and call the same function in every process;
inputs are placed as global arrays by :func:`place_on_mesh`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float, PRNGKeyArray

from ppl.inference.kernel import SMCState, effective_sample_size
from ppl.inference.particles import StepProposal
from ppl.inference.resampling import Resampler, get_resampler
from ppl.inference.sequential import _smc, validate
from ppl.lm import ParticleCache
from ppl.program import StateSpace
from ppl.results import SMCResult

# --- a batch of programs ---------------------------------------------------------------------


def stack_programs(programs: Sequence[StateSpace]) -> tuple[StateSpace, tuple[bool, ...]]:
    """One program whose array leaves have a leading batch axis where the programs differ,
    and which of its leaves (in ``jax.tree.leaves`` order) have it. A leaf that is the same
    object in every program (the LM's weights, a shared constraint) is kept once."""
    programs = list(programs)
    if not programs:
        raise ValueError("programs is empty: give at least one program")
    for index, program in enumerate(programs):
        if not isinstance(program, StateSpace):
            raise TypeError(f"program {index} must be a ppl.StateSpace, got {type(program).__name__}")
    flat = [jax.tree_util.tree_flatten_with_path(program) for program in programs]
    treedef = flat[0][1]
    for index, (_, other) in enumerate(flat[1:], 1):
        if other != treedef:
            raise ValueError(
                f"program {index} differs from program 0 in its structure or static fields; a batch needs "
                "programs of one kind and one shape (for prompts of different lengths use ppl.Generation.for_prompts)"
            )
    leaves, batched = [], []
    for column in zip(*(leaves for leaves, _ in flat)):
        path, first = column[0][0], column[0][1]
        values = [leaf for _, leaf in column]
        if all(value is first for value in values):
            leaves.append(first)
            batched.append(False)
            continue
        if not all(eqx.is_array(value) for value in values):
            raise ValueError(f"programs differ in the non-array field {jax.tree_util.keystr(path)}; it must be shared")
        shapes = {(tuple(jnp.shape(value)), jnp.result_type(value)) for value in values}
        if len(shapes) > 1:
            raise ValueError(
                f"programs differ in the shape of {jax.tree_util.keystr(path)}: {sorted(map(str, shapes))}; "
                "a batch needs one shape (pad prompts with ppl.Generation.for_prompts)"
            )
        leaves.append(jnp.stack(values))
        batched.append(True)
    return jax.tree.unflatten(treedef, leaves), tuple(batched)


def _batch_axes(program: StateSpace, batched: tuple[bool, ...], on: Any = 0, off: Any = None) -> Any:
    """``program``'s tree with ``on`` at its batched leaves, ``off`` at the shared arrays and
    ``None`` at the other leaves (it then matches ``eqx.partition(program, eqx.is_array)[0]``)."""
    leaves, treedef = jax.tree.flatten(program)
    marks = [on if flag else off if eqx.is_array(leaf) else None for leaf, flag in zip(leaves, batched)]
    return jax.tree.unflatten(treedef, marks)


# --- layouts over a mesh ---------------------------------------------------------------------


def _is_cache(leaf: Any) -> bool:
    return isinstance(leaf, ParticleCache)


def _particle_axes(tree: Any) -> Any:
    """``tree`` with each array replaced by the axis that indexes particles (0, or what a
    :class:`ppl.lm.ParticleCache` says)."""
    return jax.tree.map(lambda leaf: leaf.particle_axes() if _is_cache(leaf) else 0, tree, is_leaf=_is_cache)


def _spec(ndim: int, axis: int, name: str | None, lead: tuple = ()) -> P:
    """A spec splitting dimension ``axis`` over mesh axis ``name`` after ``lead`` dimensions."""
    parts = [None] * ndim
    parts[axis] = name
    return P(*lead, *parts)


def check_devices(devices: Any) -> None:
    """``ValueError`` if ``devices`` are not all of one kind (platform and model): one
    compiled program cannot run on a mix."""
    kinds = sorted({f"{device.platform}:{device.device_kind}" for device in devices})
    if len(kinds) > 1:
        raise ValueError(f"the mesh mixes devices of different kinds ({', '.join(kinds)}); use devices of one kind")


def check_mesh(mesh: Mesh, axes: Sequence[tuple[str | None, int, str]]) -> None:
    """Clear errors for a mesh that cannot hold the run: devices of different kinds, an axis
    name the mesh lacks or used twice, or an axis whose size does not divide what it splits
    (``axes``: ``(mesh axis name or None, how many, what)``)."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    check_devices(mesh.devices.flat)
    names = [name for name, _, _ in axes if name is not None]
    if len(set(names)) < len(names):
        raise ValueError(f"prompt_axis and particle_axis must be different mesh axes, got {names}")
    for name, size, what in axes:
        if name is None:
            continue
        if name not in mesh.shape:
            raise ValueError(f"mesh has no axis {name!r} (its axes: {tuple(mesh.axis_names)})")
        if size % mesh.shape[name]:
            raise ValueError(
                f"mesh axis {name!r} has {mesh.shape[name]} devices, which does not divide the {size} {what} "
                f"it splits; use a multiple of {mesh.shape[name]}"
            )


def place_on_mesh(tree: Any, mesh: Mesh, split: Sequence[bool] | None = None, axis: str | None = None) -> Any:
    """Every array of ``tree`` as a global array on ``mesh``: replicated, or, for the leaves
    flagged in ``split`` (``jax.tree.leaves`` order), split along their first dimension over
    mesh axis ``axis``. Works across processes: each process gives the same full values and
    keeps only its own devices' pieces (what ``jit`` needs of multi-host inputs)."""
    leaves, treedef = jax.tree.flatten(tree)
    split = [False] * len(leaves) if split is None else split

    def put(leaf, flag):
        if not eqx.is_array(leaf):
            return leaf
        value = np.asarray(leaf)
        sharding = NamedSharding(mesh, P(axis) if flag else P())
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.unflatten(treedef, [put(leaf, flag) for leaf, flag in zip(leaves, split)])


class _GlobalPlace(eqx.Module):
    """The layout of exact global resampling, pinned on the SMC state after every step:
    per-particle leaves split over ``particle_axis``, the log-weights replicated (so the
    ESS, ``log_z`` and ancestors are computed on all ``N`` of them, as on one device)."""

    mesh: Mesh = eqx.field(static=True)
    particle_axis: str | None = eqx.field(static=True)

    def __call__(self, state: SMCState, info: Any) -> tuple[SMCState, Any]:
        def split(leaf, axis):
            return jax.lax.with_sharding_constraint(
                leaf, NamedSharding(self.mesh, _spec(leaf.ndim, axis, self.particle_axis))
            )

        per_particle = (state.particles, state.log_q_score, state.choices, state.log_gamma)
        particles, log_q_score, choices, log_gamma = jax.tree.map(split, per_particle, _particle_axes(per_particle))
        log_weights = jax.lax.with_sharding_constraint(state.log_weights, NamedSharding(self.mesh, P()))
        ess = effective_sample_size(log_weights)
        state = state._replace(
            particles=particles,
            log_q_score=log_q_score,
            choices=choices,
            log_gamma=log_gamma,
            log_weights=log_weights,
            ess=ess,
        )
        return state, info._replace(ess=ess)


# --- island resampling -----------------------------------------------------------------------


def _combine_islands(result: SMCResult, axis: str, n_islands: int, island: Array) -> SMCResult:
    """Island ``island``'s result as its part of the combined population (inside
    ``shard_map``): weights divided by the number of islands, ``log_z`` the log-mean of the
    islands' ``Ẑ``, global ancestor indices, per-step records summed over islands."""
    n_local = result.log_weights.shape[0]
    log_z = jax.nn.logsumexp(jax.lax.all_gather(result.log_z, axis)) - math.log(n_islands)
    return result._replace(
        log_weights=result.log_weights - math.log(n_islands),
        log_z=log_z,
        ess=jax.lax.psum(result.ess, axis),
        ancestors=result.ancestors + island * n_local,
        resampled=jax.lax.psum(result.resampled.astype(jnp.int32), axis) > 0,
        n_steps=jax.lax.pmax(result.n_steps, axis),
        all_dead=~jnp.isfinite(log_z),
        nan_weights=jax.lax.psum(result.nan_weights.astype(jnp.int32), axis) > 0,
        acceptance_rate=jax.lax.pmean(result.acceptance_rate, axis),
    )


def _result_specs(result: SMCResult, particle_axis: str | None, lead: tuple) -> SMCResult:
    """Out specs of an island run: per-particle leaves split over ``particle_axis`` (on
    their particle axis), ancestors on their second, the rest replicated."""
    split = lambda tree: jax.tree.map(  # noqa: E731
        lambda leaf, axis: _spec(leaf.ndim - len(lead), axis, particle_axis, lead), tree, _particle_axes(tree)
    )
    whole = lambda leaf: P(*lead)  # noqa: E731
    return SMCResult(
        particles=split(result.particles),
        log_weights=split(result.log_weights),
        log_z=whole(result.log_z),
        ess=whole(result.ess),
        ancestors=_spec(2, 1, particle_axis, lead),
        resampled=whole(result.resampled),
        n_steps=whole(result.n_steps),
        all_dead=whole(result.all_dead),
        nan_weights=whole(result.nan_weights),
        log_q_score=split(result.log_q_score),
        choices=split(result.choices),
        log_gamma=split(result.log_gamma),
        acceptance_rate=whole(result.acceptance_rate),
    )


# --- the runs --------------------------------------------------------------------------------


@eqx.filter_jit
def _run(program, batched, key_data, key_impl, n_particles, resampler, ess_threshold, proposal, layout):
    """SMC on one program (``batched is None``) or a stacked batch of them, laid out by
    ``layout = (mesh, prompt_axis, particle_axis, islands)`` (``mesh`` may be ``None``)."""
    mesh, prompt_axis, particle_axis, islands = layout
    keys = jax.random.wrap_key_data(key_data, impl=key_impl)
    place = None if mesh is None or islands else _GlobalPlace(mesh, particle_axis)

    def one(program, key, n):
        return _smc(program, key, n, resampler, ess_threshold, proposal, None, 1, place)

    def over_prompts(fn, program, keys, n, spmd_axis_name=None):
        if batched is None:
            return fn(program, keys, n)
        axes = _batch_axes(program, batched)
        return jax.vmap(lambda p, k: fn(p, k, n), in_axes=(axes, 0), spmd_axis_name=spmd_axis_name)(program, keys)

    if not islands:
        return over_prompts(one, program, keys, n_particles, prompt_axis)

    n_islands = mesh.shape[particle_axis]
    lead = () if batched is None else (prompt_axis,)

    arrays, static = eqx.partition(program, eqx.is_array)

    def island_run(arrays, keys):
        program = eqx.combine(arrays, static)
        island = jax.lax.axis_index(particle_axis)

        def run(program, key, n):
            result = one(program, jax.random.fold_in(key, island), n)
            return _combine_islands(result, particle_axis, n_islands, island)

        return over_prompts(run, program, keys, n_particles // n_islands)

    shapes = jax.eval_shape(lambda p, k: over_prompts(one, p, k, n_particles), program, keys)
    program_specs = P() if batched is None else _batch_axes(program, batched, P(prompt_axis), P())
    return jax.shard_map(
        island_run,
        mesh=mesh,
        in_specs=(program_specs, P(*lead)),
        out_specs=_result_specs(shapes, particle_axis, lead),
        check_vma=False,  # SMC's lax.conds mix per-island and replicated values
    )(arrays, keys)


def _layout(mesh, prompt_axis, particle_axis, islands, n_particles, n_prompts):
    if mesh is None:
        if islands:
            raise ValueError("islands=True needs a mesh: the islands are the devices along particle_axis")
        return (None, None, None, False)
    if particle_axis is None and (islands or prompt_axis is None):
        raise ValueError(
            "a mesh needs particle_axis, the mesh axis the particles are split over "
            "(or, for global resampling, prompt_axis alone: each prompt's particles on one device)"
        )
    check_mesh(mesh, [(particle_axis, n_particles, "particles"), (prompt_axis, n_prompts or 1, "prompts")])
    return (mesh, prompt_axis, particle_axis, bool(islands))


def _keys(key: PRNGKeyArray) -> tuple[Array, str]:
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError("key must be a typed JAX key (jax.random.key(seed)), not a raw uint32 array")
    return jax.random.key_data(key), str(jax.random.key_impl(key))


def smc_batch(
    programs: Sequence[StateSpace],
    keys: PRNGKeyArray,
    n_particles: int,
    *,
    resampling: str | Resampler = "systematic",
    ess_threshold: float | Float[Array, ""] = 0.5,
    proposal: StepProposal | None = None,
    mesh: Mesh | None = None,
    prompt_axis: str | None = None,
    particle_axis: str | None = None,
    islands: bool = False,
) -> SMCResult:
    """:func:`ppl.inference.smc` on every program of a batch at once: a result with a leading
    ``[B]`` axis whose entry ``b`` equals ``smc(programs[b], keys[b], n_particles)``.

    Args:
        programs: programs of one kind and shape (prompts of different lengths:
            :meth:`ppl.Generation.for_prompts`); leaves they share are kept once.
        keys: ``[B]`` keys, one per program (or one key, split into ``B``).
        n_particles: particles per program.
        resampling, ess_threshold, proposal: as for :func:`ppl.inference.smc`.
        mesh: a :class:`jax.sharding.Mesh` to run on (default: one device).
        prompt_axis: the mesh axis the programs are split over (must divide ``B``), or
            ``None`` to give every device all of them.
        particle_axis: the mesh axis each program's particles are split over (must divide
            ``n_particles``), or ``None`` to keep each program's particles on one device
            (then ``prompt_axis`` spreads the programs).
        islands: ``False``: exact global resampling, the one-device result; ``True``: island
            resampling, no cache row crosses devices (see the module docstring).
    """
    for program in programs:
        validate(program, n_particles, ess_threshold)
    stacked, batched = stack_programs(programs)
    n_prompts = len(programs)
    if jnp.shape(keys) == ():
        keys = jax.random.split(keys, n_prompts)
    if jnp.shape(keys) != (n_prompts,):
        raise ValueError(f"keys must be one key or [{n_prompts}] keys (one per program), got shape {jnp.shape(keys)}")
    layout = _layout(mesh, prompt_axis, particle_axis, islands, n_particles, n_prompts)
    key_data, impl = _keys(keys)
    if mesh is not None:
        stacked = place_on_mesh(stacked, mesh, batched if prompt_axis else None, prompt_axis)
        key_data = place_on_mesh(key_data, mesh, [prompt_axis is not None], prompt_axis)
    return _run(
        stacked,
        batched,
        key_data,
        impl,
        n_particles,
        get_resampler(resampling),
        jnp.asarray(ess_threshold, jnp.float32),
        proposal,
        layout,
    )


def smc_sharded(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    *,
    mesh: Mesh,
    particle_axis: str = "particles",
    islands: bool = False,
    resampling: str | Resampler = "systematic",
    ess_threshold: float | Float[Array, ""] = 0.5,
    proposal: StepProposal | None = None,
) -> SMCResult:
    """:func:`ppl.inference.smc` with the particles split over ``mesh``'s ``particle_axis``
    (which must divide ``n_particles``): exact global resampling (``islands=False``, the
    one-device result for the same key) or island resampling (``islands=True``); see the
    module docstring."""
    validate(program, n_particles, ess_threshold)
    layout = _layout(mesh, None, particle_axis, islands, n_particles, None)
    key_data, impl = _keys(key)
    if jnp.shape(key) != ():
        raise ValueError(f"key must be a single key, got shape {jnp.shape(key)} (for many programs: smc_batch)")
    return _run(
        place_on_mesh(program, mesh),
        None,
        place_on_mesh(key_data, mesh),
        impl,
        n_particles,
        get_resampler(resampling),
        jnp.asarray(ess_threshold, jnp.float32),
        proposal,
        layout,
    )
