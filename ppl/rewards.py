"""Rewards as likelihoods: potentials over a batch of generated sequences, and how a
generation program turns them into importance-weight increments.

**Potentials.** A potential scores the particle batch of an LM generation program::

    potential(tokens: Int[N, T], lengths: Int[N], done: Bool[N]) -> Float[N]   # log psi

``tokens[i, :lengths[i]]`` are particle ``i``'s tokens generated so far (after the prompt;
entries past the length are padding and must be ignored) and ``done[i]`` says the sequence has
finished (EOS or the length limit). The result is ``log psi`` per particle: a log score that
may be ``-inf`` (the particle is impossible under the target). Potentials are pure JAX and
compose by adding log values (:func:`sum_potentials`). A scorer that cannot be JAX enters
through :func:`host_potential`, which makes one host call per step for the whole batch.

**Rewards as likelihoods.** A *score* has the same signature but returns a raw reward ``r``;
the wrappers give it a likelihood meaning:

- :func:`exp_reward`: ``psi = exp(r / beta)`` (the KL-regularised RL optimum ``p · exp(r/beta)``);
- :func:`bernoulli_reward`: ``psi = P(o = 1 | r)``, the probability of a binary "good" outcome,
  ``sigmoid(r)`` for a logit or ``r`` itself for a probability;
- :func:`process_reward`: per-step ``psi_t`` of a process reward model, aggregated over steps
  by product, last or min.

**Weighting: how a potential enters the importance weights.** The generation program
evaluates a potential after every step ``t = 0, 1, ..., T`` on the prefix ``x_{1:t}`` and adds a
log-weight increment. :func:`incremental` computes it; there are two ways:

- *ratio (telescoping) weighting*: the increment is ``log psi_t - log psi_{t-1}`` (with
  ``log psi_{-1} = 0``). The increments sum to ``log psi_T``: the final weight is the
  potential of the finished sequence, and the intermediate values only act as twists
  (look-ahead guidance for resampling). Target: ``p(x) · psi(x_{1:T})``.
- *product weighting*: the increment is ``log psi_t`` itself. Target:
  ``p(x) · prod_t psi(x_{1:t})``: every prefix is a factor of the target.

Both are the telescoping of an aggregate ``A_t`` of the values seen so far (increment
``A_t - A_{t-1}``, ``A_{-1} = 0``, so the increments sum to ``A_T``): ``A_t = log psi_t`` for
ratio weighting, ``A_t = sum_{s<=t} log psi_s`` for product weighting, and
``A_t = min_{s<=t} log psi_s`` for a process reward aggregated by ``min``
(target ``p · min_t psi_t``).

**Impossible particles.** Once ``A_t = -inf`` the particle's weight is ``-inf`` and stays so:
later increments are ``0`` (never ``-inf - (-inf) = NaN``) and the aggregate stays ``-inf``
whatever the potential says afterwards. Under ratio weighting this makes the target
``p · psi_T · 1[psi_t > 0 for all t]``, which is ``p · psi_T`` exactly when a zero twist means
"no completion of this prefix has positive potential" -- true of hard constraints checked
on prefixes, and the condition any twist must meet anyway. A NaN potential gives a NaN
increment at the step it appears (the SMC loop counts it in ``nan_weights`` and kills the
particle); from the next step on the particle is treated as ``-inf``.

**Finished particles.** A particle is weighted at the step where it finishes (``done`` is then
true, so a potential can require a complete sequence) and frozen afterwards: the SMC loop
neither steps it nor adds its increments, and the :class:`IncrementalCarry` inside its state
freezes with it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

Potential = Callable[[Int[Array, "N T"], Int[Array, " N"], Bool[Array, " N"]], Float[Array, " N"]]
"""``(tokens, lengths, done) -> log psi``; a *score* has the same type and returns a reward."""

HostScorer = Callable[..., np.ndarray]
"""``fn(tokens_or_texts, lengths, done) -> np.ndarray[N]`` run on the host."""

BatchDecode = Callable[[list[list[int]]], list[str]]
"""Token-id rows (each cut to its particle's length) to one text per row."""


# --- host scorers ------------------------------------------------------------------------


class HostCounts:
    """Mutable host-side counters of a :class:`HostPotential`: ``calls`` (host calls made, one
    per evaluation of the whole batch) and ``nan_scores`` (scores that were NaN)."""

    __slots__ = ("calls", "nan_scores")

    def __init__(self) -> None:
        self.calls = 0
        self.nan_scores = 0


class HostPotential(eqx.Module):
    """A Python scorer run on the host as a JAX potential; build it with :func:`host_potential`.

    Calling it inside ``jit``, ``lax.scan`` or ``vmap`` makes exactly one host call per
    evaluation for all particles: under ``vmap`` (e.g. a per-particle program that SMC
    vectorises) the callback receives every batched axis at once and flattens them into one
    batch for ``fn``. JAX may skip a call whose result is unused (it treats the scorer as pure).
    """

    fn: HostScorer = eqx.field(static=True)
    batch_decode: BatchDecode | None = eqx.field(static=True)
    counts: HostCounts = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        result = jax.ShapeDtypeStruct(lengths.shape, jnp.float32)
        # broadcast_all: under vmap every argument arrives with the same leading batch axes,
        # which `_host` folds into the particle axis, so one host call serves the whole batch.
        return jax.pure_callback(self._host, result, tokens, lengths, done, vmap_method="broadcast_all")

    def _host(self, tokens: jax.Array, lengths: jax.Array, done: jax.Array) -> np.ndarray:
        batch_shape = np.shape(lengths)
        tokens = np.asarray(tokens).reshape(-1, np.shape(tokens)[-1])
        lengths = np.clip(np.asarray(lengths).reshape(-1), 0, tokens.shape[1])
        done = np.asarray(done).reshape(-1)
        if self.batch_decode is None:
            scores = self.fn(tokens, lengths, done)
        else:
            rows = [row[:length].tolist() for row, length in zip(tokens, lengths)]
            scores = self.fn(self.batch_decode(rows), lengths, done)
        scores = np.asarray(scores, np.float32)
        if scores.shape != lengths.shape:
            raise ValueError(
                f"host scorer {_name(self.fn)} returned shape {scores.shape} for a batch of {lengths.size}"
            )
        is_nan = np.isnan(scores)
        self.counts.calls += 1
        self.counts.nan_scores += int(is_nan.sum())
        return np.where(is_nan, -np.inf, scores).reshape(batch_shape)


def host_potential(fn: HostScorer, *, batch_decode: BatchDecode | None = None) -> HostPotential:
    """Wrap a host (Python) scorer as a JAX potential, one host call per batch.

    ``fn(tokens, lengths, done)`` receives numpy arrays for the whole batch -- ``tokens[N, T]``
    (entries past ``lengths`` are padding), ``lengths[N]``, ``done[N]`` -- and returns ``N``
    floats. With ``batch_decode`` (token-id rows, each cut to its length, -> one string per
    row) ``fn`` receives that list of texts in place of ``tokens``.

    The result is float32. A NaN score becomes ``-inf`` (the particle is killed) and is counted
    in ``potential.counts.nan_scores`` -- raising from inside a callback would only surface as
    an opaque runtime error. ``potential.counts.calls`` counts host calls. Whether the value is
    a log potential or a raw reward is up to ``fn``: wrap a reward with :func:`exp_reward` or
    :func:`bernoulli_reward`.
    """
    return HostPotential(fn, batch_decode, HostCounts())


def _name(fn: Callable) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


# --- rewards as likelihoods --------------------------------------------------------------


class ExpReward(eqx.Module):
    """``log psi = r / beta``: the reward tilts the LM as ``p · exp(r / beta)``."""

    score: Potential
    beta: float | Float[Array, ""]

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        return self.score(tokens, lengths, done) / self.beta


def exp_reward(score: Potential, beta: float | Float[Array, ""]) -> ExpReward:
    """The potential ``psi = exp(r / beta)`` of a reward ``r = score(...)``.

    ``beta > 0`` is a temperature: small ``beta`` concentrates the target on high reward,
    ``beta -> inf`` recovers the LM. It is stored as an array, so programs that differ only in
    ``beta`` share one compiled function.
    """
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"exp_reward needs beta > 0, got {beta}")
    return ExpReward(score, jnp.asarray(beta, jnp.float32))


class BernoulliReward(eqx.Module):
    """``log psi = log P(o = 1 | r)``; see :func:`bernoulli_reward`."""

    score: Potential
    kind: Literal["logit", "prob"] = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        r = self.score(tokens, lengths, done)
        if self.kind == "logit":
            return jax.nn.log_sigmoid(r)
        return jnp.log(jnp.clip(r, 0.0, 1.0))  # log 0 = -inf: probability zero kills


def bernoulli_reward(score: Potential, kind: Literal["logit", "prob"] = "logit") -> BernoulliReward:
    """The likelihood of observing a "good" outcome ``o = 1`` given a reward ``r = score(...)``.

    ``kind="logit"``: ``P(o = 1 | r) = sigmoid(r)`` (a classifier's logit; computed stably as
    ``log_sigmoid``). ``kind="prob"``: ``r`` is the probability itself, clipped to ``[0, 1]``
    (``r <= 0`` gives ``-inf``). The target is the posterior ``p(x | o = 1)``.
    """
    if kind not in ("logit", "prob"):
        raise ValueError(f"bernoulli_reward kind must be 'logit' or 'prob', got {kind!r}")
    return BernoulliReward(score, kind)


Aggregate = Literal["product", "last", "min"]


class ProcessReward(eqx.Module):
    """A per-step potential ``log psi_t`` with the rule that aggregates it over steps.

    Called directly it returns the current step's ``log psi_t``; the aggregate takes effect
    through :func:`incremental`, which carries what it needs between steps.
    """

    score: Potential
    aggregate: Aggregate = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        return self.score(tokens, lengths, done)


def process_reward(score: Potential, aggregate: Aggregate = "product") -> ProcessReward:
    """A process reward: ``score`` gives ``log psi_t`` for the latest step of each prefix
    (compose a raw PRM output with :func:`bernoulli_reward` or :func:`exp_reward` first).

    ``aggregate`` fixes the target:

    - ``"product"``: ``p · prod_t psi_t`` (every step must be good; product weighting);
    - ``"last"``: ``p · psi_T`` (only the final judgement counts; ratio weighting);
    - ``"min"``: ``p · min_t psi_t`` (a chain is as good as its worst step; the running min,
      telescoped).
    """
    if aggregate not in ("product", "last", "min"):
        raise ValueError(f"process_reward aggregate must be 'product', 'last' or 'min', got {aggregate!r}")
    return ProcessReward(score, aggregate)


class SumPotentials(eqx.Module):
    """``log psi = sum_k log psi_k``: the product of the potentials."""

    potentials: tuple[Potential, ...]

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        return sum(potential(tokens, lengths, done) for potential in self.potentials)


def sum_potentials(*potentials: Potential) -> SumPotentials:
    """Compose potentials by adding their log values (multiplying the factors).

    A :class:`ProcessReward` is refused: its aggregate needs its own carry, so give it its own
    :func:`incremental` and add the increments instead.
    """
    if not potentials:
        raise ValueError("sum_potentials needs at least one potential")
    for potential in potentials:
        if isinstance(potential, ProcessReward):
            raise TypeError(
                "sum_potentials cannot aggregate a process_reward over steps; weight it with its own "
                "incremental(...) and add the increments"
            )
    return SumPotentials(tuple(potentials))


# --- incremental weighting ---------------------------------------------------------------


class IncrementalCarry(eqx.Module):
    """What :class:`Incremental` keeps between steps, one entry per particle (so SMC's
    resampling gathers it with the rest of the particle state).

    ``aggregate`` is ``A_{t-1}`` (0 before the first update; ``-inf`` once the particle is
    impossible) and ``started`` whether any update happened (the min has no value before).
    """

    aggregate: Float[Array, " N"]
    started: Bool[Array, " N"]


class Incremental(eqx.Module):
    """Turns a potential into per-step log-weight increments; see :func:`incremental`.

    The increments summed over steps equal the final aggregate ``A_T``: ``log psi_T``
    (``"last"``), ``sum_t log psi_t`` (``"product"``) or ``min_t log psi_t`` (``"min"``).
    """

    potential: Potential
    aggregate: Aggregate = eqx.field(static=True)

    def init(self, n: int) -> IncrementalCarry:
        """The carry for ``n`` particles before their first step."""
        return IncrementalCarry(jnp.zeros((n,), jnp.float32), jnp.zeros((n,), bool))

    def update(
        self,
        carry: IncrementalCarry,
        tokens: Int[Array, "N T"],
        lengths: Int[Array, " N"],
        done: Bool[Array, " N"],
    ) -> tuple[IncrementalCarry, Float[Array, " N"]]:
        """Evaluate the potential on the current prefixes; return the new carry and the
        log-weight increment ``A_t - A_{t-1}`` per particle (0 for an impossible particle)."""
        log_psi = self.potential(tokens, lengths, done).astype(jnp.float32)
        previous = carry.aggregate
        if self.aggregate == "last":
            aggregate = log_psi
        elif self.aggregate == "product":
            aggregate = previous + log_psi
        else:
            aggregate = jnp.where(carry.started, jnp.minimum(previous, log_psi), log_psi)
        # `not > -inf` also catches a NaN carried from the previous step: that NaN was already
        # reported as an increment, and the particle is dead from then on.
        dead = ~(previous > -jnp.inf)
        increment = jnp.where(dead, 0.0, aggregate - previous)
        aggregate = jnp.where(dead, -jnp.inf, aggregate)
        return IncrementalCarry(aggregate, jnp.ones_like(carry.started)), increment


def incremental(potential: Potential, weighting: Literal["ratio", "product"] | None = None) -> Incremental:
    """Weight a generation program by ``potential`` step by step (module docstring: semantics).

    ``weighting="ratio"`` (the default for a plain potential) telescopes: the target is
    ``p · psi(x_{1:T})`` and intermediate values are twists. ``weighting="product"`` adds
    ``log psi_t`` every step: the target is ``p · prod_t psi(x_{1:t})``. A
    :class:`ProcessReward` brings its own rule (``"last"``: ratio, ``"product"``: product,
    ``"min"``: the telescoped running min); ``weighting`` may then be omitted, and is an
    error if it contradicts the aggregate.
    """
    if weighting not in (None, "ratio", "product"):
        raise ValueError(f"weighting must be 'ratio' or 'product', got {weighting!r}")
    if isinstance(potential, ProcessReward):
        implied = {"last": "ratio", "product": "product", "min": "ratio"}[potential.aggregate]
        if weighting not in (None, implied):
            raise ValueError(
                f"a process_reward with aggregate={potential.aggregate!r} is weighted by {implied!r}, not {weighting!r}"
            )
        return Incremental(potential, potential.aggregate)
    return Incremental(potential, "product" if weighting == "product" else "last")


__all__ = [
    "BernoulliReward",
    "ExpReward",
    "HostCounts",
    "HostPotential",
    "Incremental",
    "IncrementalCarry",
    "Potential",
    "ProcessReward",
    "SumPotentials",
    "bernoulli_reward",
    "exp_reward",
    "host_potential",
    "incremental",
    "process_reward",
    "sum_potentials",
]
