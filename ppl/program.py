"""State-space programs: the one kind of model every inference transformation accepts.

A program defines an unnormalised target over trajectories ``x_{0:T}``::

    gamma(x) = p(x_0) G_0(x_0) · prod_t p(x_t | x_{t-1}) G_t(x_{0:t})

where ``p`` are the latent (``numpyro.sample``) sites of ``init`` / ``step`` and ``G`` are
their potentials (``numpyro.factor``, :func:`ppl.observe`). ``Z = sum_x gamma(x)`` is the
normalising constant inference estimates. For a language model a latent site is the next
token (or chunk) and potentials are constraints and rewards.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray
from numpyro import handlers
from numpyro.handlers import Messenger

from ppl.handlers import Proposal, choices, log_density, log_weight, pin, propose
from ppl.lm import ParticleCache

State = Any  # a pytree of arrays: one particle's state


class StateSpace(eqx.Module):
    """A state-space program: ``init`` then up to ``max_steps`` calls of ``step``.

    Subclass it as an ``equinox.Module``; data (observations, LM weights) are fields, so a
    second call with new data and the same shapes does not recompile. ``init`` and ``step``
    are written with NumPyro primitives and describe ONE particle; inference ``vmap``s them.

    - ``init(self) -> state``: the initial state (e.g. a prefilled prompt); may sample/factor.
    - ``step(self, state, t) -> state``: step ``t = 0, 1, ...`` (a traced integer); must return
      a state with the same structure, shapes and dtypes.
    - ``done(self, state) -> bool``: finished particles are frozen: never stepped again and
      never re-weighted. The default never finishes.

    **Batched programs** (``batched = True``) describe the whole particle batch at once:
    ``init(self, n_particles)`` returns a state whose leading axis is the particle, every site
    has batch shape ``[N]``, and ``done`` returns ``[N]``. This is how a language model runs
    one batched decode for all particles instead of a ``vmap`` of single-row decodes. A state
    leaf whose particle axis is not the first (a KV cache) is a :class:`ppl.lm.ParticleCache`
    and gathers, freezes and rolls back its own rows, so no override is needed.

    **Trajectories.** The values of a particle's latent sites at ``init`` and at every step
    are its *choices*; inference records them (``SMCResult.choices``), and a program replays
    a trajectory when its sites are pinned to recorded values (:class:`ppl.handlers.pin`).

    ``markov = True`` declares that a step's density and potentials depend on the choices
    before it only through the state it receives, and that later steps depend on earlier
    choices only through the states in between (an HMM, a state-space model). Ancestor
    sampling then needs one step of look-ahead instead of the whole remaining trajectory.
    """

    # Subclasses declare ``max_steps: int = eqx.field(static=True)``, the most ``step`` calls.
    batched: ClassVar[bool] = False
    markov: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self) -> State:  # batched programs: ``init(self, n_particles)``
        """The initial state (a batched program returns ``n_particles`` of them); may
        contain sample and factor sites, like a step."""

    @abc.abstractmethod
    def step(self, state: State, t: jax.Array) -> State:
        """One step ``t`` of the state-space model: draw the choices with ``numpyro.sample``,
        score them with ``numpyro.factor`` / ``ppl.observe``, return the next state."""

    def done(self, state: State) -> Bool[Array, "*N"]:
        """Whether a particle has finished (it then stops changing and stops being weighted);
        never, unless a subclass says otherwise."""
        return jnp.zeros((), bool)

    def reindex(self, particles: State, ancestors: Int[Array, " N"]) -> State:
        """Particle ``i`` of the result is particle ``ancestors[i]`` (axis 0 of every leaf;
        a :class:`ppl.lm.ParticleCache` gathers its own particle axis)."""

        def gather(leaf):
            return leaf.reindex(ancestors) if _is_cache(leaf) else leaf[ancestors]

        return jax.tree.map(gather, particles, is_leaf=_is_cache)

    def select(self, active: Bool[Array, " N"], stepped: State, previous: State) -> State:
        """``stepped`` for active particles, ``previous`` for finished ones (axis 0; a
        :class:`ppl.lm.ParticleCache` chooses its own rows)."""

        def choose(new, old):
            if _is_cache(new):
                return new.select(active, old)
            return jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)

        return jax.tree.map(choose, stepped, previous, is_leaf=_is_cache)

    def where(self, mask: Bool[Array, " N"], on_true: State, on_false: State) -> State:
        """Particle ``i`` from ``on_true`` where ``mask[i]``, else from ``on_false``: the
        accept/reject of an MCMC move (caches make a real per-row choice)."""

        def choose(new, old):
            if _is_cache(new):
                return new.where(mask, old)
            return jnp.where(mask.reshape(mask.shape + (1,) * (new.ndim - 1)), new, old)

        return jax.tree.map(choose, on_true, on_false, is_leaf=_is_cache)


def _is_cache(leaf: Any) -> bool:
    return isinstance(leaf, ParticleCache)


class _seed(Messenger):
    """NumPyro's ``seed`` with keys that stay cheap under ``vmap`` over particles.

    Random site ``j`` of particle ``i`` gets ``stream(fold_in(key, j), i)``: with ``key``
    shared by the particles and ``i`` the vmapped index, the ``fold_in`` hash is computed once
    for all of them, and :func:`_particle_stream` turns it into particle ``i``'s key without
    another hash. (Splitting one key per particle and again per site cost several hashes per
    particle and site: a third of a bootstrap filter's time.)
    """

    def __init__(self, key: PRNGKeyArray, particle: Int[Array, ""] | None = None):
        self.key, self.particle, self.site_count = key, particle, 0
        super().__init__(None)

    def process_message(self, msg: dict) -> None:
        if msg["type"] not in ("sample", "prng_key", "plate", "control_flow"):
            return
        if msg["kwargs"].get("rng_key") is not None or msg["value"] is not None:
            return
        site_key = jax.random.fold_in(self.key, self.site_count)
        self.site_count += 1
        if self.particle is not None:
            site_key = _particle_stream(site_key, self.particle)
        msg["kwargs"]["rng_key"] = site_key


def _particle_stream(key: PRNGKeyArray, particle: Int[Array, ""]) -> PRNGKeyArray:
    """Particle ``particle``'s key: ``key`` with the index XORed into its last word.

    Counter-based generators (Threefry, Philox: Salmon et al. 2011) are built to take the key
    as a stream identifier, so keys that differ in one word give independent streams; a
    collision with another site's key needs the hashed site keys to agree in every other word
    (probability 2^-32 per pair for Threefry, and then the indices must match too).
    """
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    data = jax.random.key_data(key) if typed else key
    data = data.at[..., -1].set(data[..., -1] ^ particle.astype(data.dtype))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)) if typed else data


class WeightedRun(NamedTuple):
    """One run of a program fragment (``init`` or ``step``) under inference's handlers."""

    value: Any  # what the fragment returned: the new state
    log_weight: Float[Array, "*batch"]  # importance weight (see ppl.handlers.log_weight)
    log_q_score: Float[Array, "*batch"]  # log q of non-reparameterised proposed sites
    log_density: Float[Array, "*batch"]  # log gamma increment (see ppl.handlers.log_density)
    choices: dict[str, Any]  # latent site values


def run_weighted(
    fn: Callable[..., Any],
    key: PRNGKeyArray,
    *args: Any,
    proposal: Proposal | None = None,
    batch_shape: tuple[int, ...] = (),
    particle: Int[Array, ""] | None = None,
    pinned: tuple[dict[str, Any], Any] | None = None,
) -> WeightedRun:
    """Run ``fn(*args)`` once under inference's handlers; see :class:`WeightedRun`.

    Latent sites are drawn from their priors, or from ``proposal`` where it applies (see
    :class:`ppl.handlers.propose`); the weight is that of :func:`ppl.handlers.log_weight`,
    one per particle when ``fn`` is batched (``batch_shape = (N,)``). ``particle`` (an
    index) gives each particle of a ``vmap`` its own random stream from one shared ``key``.
    ``pinned = (values, rows)`` forces sites to recorded values (:class:`ppl.handlers.pin`).
    """
    values, rows = pinned if pinned is not None else ({}, False)
    with handlers.trace() as trace, pin(values=values, rows=rows), propose(proposal=proposal), _seed(key, particle):
        value = fn(*args)
    log_w, log_q_score = log_weight(trace, batch_shape)
    return WeightedRun(value, log_w, log_q_score, log_density(trace, batch_shape), choices(trace))


class ChoiceShapes(NamedTuple):
    """Shapes and dtypes of the latent sites of ``init`` and of ``step`` (abstract values;
    batched programs include the leading particle axis)."""

    init: dict[str, jax.ShapeDtypeStruct]
    step: dict[str, jax.ShapeDtypeStruct]


def check_program(program: StateSpace, n_particles: int = 1) -> ChoiceShapes:
    """Check that ``step`` keeps the state's structure, shapes and dtypes (``ValueError``
    naming the leaf if not) and that a site sampled by both ``init`` and ``step`` has one
    shape; return the shapes of the choices a trajectory records.

    Runs on abstract values only (``jax.eval_shape``): nothing is computed.
    """
    key = jax.random.key(0)
    init_args = (n_particles,) if program.batched else ()
    name = type(program).__name__
    init_run = jax.eval_shape(lambda: run_weighted(program.init, key, *init_args))
    step_run = jax.eval_shape(lambda s: run_weighted(program.step, key, s, jnp.zeros((), jnp.int32)), init_run.value)
    init_leaves, init_tree = jax.tree_util.tree_flatten_with_path(init_run.value)
    step_leaves, step_tree = jax.tree_util.tree_flatten_with_path(step_run.value)
    if init_tree != step_tree:
        raise ValueError(
            f"{name}.step returned a state with a different structure than init: {init_tree} vs {step_tree}"
        )
    for (path, before), (_, after) in zip(init_leaves, step_leaves):
        if before.shape != after.shape or before.dtype != after.dtype:
            raise ValueError(
                f"{name}.step changed state leaf {jax.tree_util.keystr(path)} from "
                f"{before.dtype}{list(before.shape)} to {after.dtype}{list(after.shape)}; "
                "states must keep fixed shapes"
            )
    for site in set(init_run.choices) & set(step_run.choices):
        before, after = init_run.choices[site], step_run.choices[site]
        if before.shape != after.shape or before.dtype != after.dtype:
            raise ValueError(
                f"{name}: site {site!r} is {before.dtype}{list(before.shape)} in init but "
                f"{after.dtype}{list(after.shape)} in step; a site keeps one shape along a trajectory"
            )
    return ChoiceShapes(dict(init_run.choices), dict(step_run.choices))
