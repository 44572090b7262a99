"""Inference-time scaling: particle filtering and the search baselines at equal budget.

Every algorithm runs on one chunked, reward-weighted generation program (a
:class:`ppl.Generation` with ``step="chunk"`` whose *first* potential is the process
reward, weighted by :func:`ppl.rewards.incremental`; see :mod:`ppl.models.process_rewards`)
with ``N`` particles -- the budget. Each is one jitted program: a ``lax.scan`` over the
reasoning steps of the public pieces in :mod:`ppl.inference.kernel`, batched over particles
(no Python per particle or token), differing only in how the population is selected before
a step and what is done to it after::

    state = init(program, key, N)
    for t in steps:                         # until every particle finished
        state = resample(state, rule)       # PF: systematic on the weights; beam: top-k; BoN: never
        state = propagate(state, t)         # every particle writes its next step, is reweighted
        state = rule.after(state, t)        # ePF: temper the step's weights; SR: reject the worst

**Targets.** The program's target is ``gamma(x) = p_LM(x) · prod_t G_t(x_{1:t})``
(:mod:`ppl.models.process_rewards` says what ``G_t`` is for each aggregation and weighting).

- ``"importance"`` (the sampling run behind best-of-N, weighted best-of-N and majority
  vote), ``"particle_filter"`` (resample every step) and ``"particle_filter_adaptive"``
  (resample when ``ESS < ess_threshold · N``) are properly weighted for ``gamma``:
  ``exp(log_z)`` is unbiased for ``Z`` and the weighted particles estimate the posterior.
- ``"tempered_particle_filter"`` (ePF) resamples every step but raises each step's
  weights to a power ``beta_t`` in ``(0, 1]``, the largest that keeps the ESS at least
  ``ess_floor · N`` (bisection). It targets the tempered ``p_LM · prod_t G_t^{beta_t}`` with
  ``beta_t`` chosen from the population: a data-dependent target, not ``gamma``, that becomes
  ``gamma`` when no step needs tempering (``temperatures`` are returned).
- **Not targeting a posterior** (their ``log_weights`` and ``log_z`` mean nothing):
  ``"beam_search"`` (keep the ``N / beam_width`` best prefixes by the reward, expand each
  ``beam_width`` times), ``"dvts"`` (diverse verifier tree search: ``N / beam_width``
  independent subtrees, each keeps its best prefix and expands it ``beam_width`` times),
  ``"speculative_rejection"`` (after step ``reject_at`` the worst ``reject_fraction`` of the
  particles by partial reward stop generating; best-of-N among the rest). ePF is labelled
  ``False`` in :data:`TARGETS_POSTERIOR` too: its ``log_z`` estimates its own adaptive target.

The reward that ranks particles (``scores``) is the process reward's aggregate so far, read
from its carry: ``log psi_t`` under ratio weighting, ``sum_s log psi_s`` under product.

**Budget.** ``generated_tokens`` counts tokens the live particles decoded;
``forward_calls`` counts batched LM decode calls (each runs all ``N`` rows, live or not: a
fixed-shape batch pays for finished rows too) plus the one prompt prefill.

**Answers.** :func:`decide` turns a result into one answer by the algorithm's rule: the
best-scored particle (best-of-N, beam, DVTS, speculative rejection), the answer with most
reward (weighted best-of-N: a reward-weighted majority vote), the most frequent answer
(majority vote), or the answer with most posterior weight (the particle filters).

**Particle Gibbs** (:func:`gibbs_search`) spends the budget as sweeps of conditional SMC; its
answer is the majority over the chain's trajectories.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ppl.generation import Generation
from ppl.inference.gibbs import particle_gibbs
from ppl.inference.history import emitted
from ppl.inference.kernel import (
    SMCInfo,
    SMCState,
    effective_sample_size,
    finalize,
    idle,
    init,
    propagate,
    resample,
    should_resample,
)
from ppl.inference.particles import done
from ppl.inference.resampling import get_resampler
from ppl.inference.sequential import check_positive_int
from ppl.inference.trajectories import replay
from ppl.results import SMCResult

SAMPLING = ("best_of_n", "weighted_best_of_n", "majority_vote")
"""Selection rules over one importance-sampling run (the same samples)."""

ALGORITHMS = (
    "importance",
    "particle_filter",
    "particle_filter_adaptive",
    "tempered_particle_filter",
    "beam_search",
    "dvts",
    "speculative_rejection",
)

TARGETS_POSTERIOR = {
    "importance": True,
    "particle_filter": True,
    "particle_filter_adaptive": True,
    "tempered_particle_filter": False,
    "beam_search": False,
    "dvts": False,
    "speculative_rejection": False,
}


class SearchResult(NamedTuple):
    """What a search returns: the :class:`ppl.SMCResult` of the run (properly weighted only
    where :data:`TARGETS_POSTERIOR` says so), each final particle's reward ``scores``, the
    per-step weight ``temperatures`` (ePF; 1 elsewhere) and the budget spent."""

    smc: SMCResult
    scores: Float[Array, " N"]
    temperatures: Float[Array, " T"]
    generated_tokens: Int[Array, ""]
    forward_calls: Int[Array, ""]


class Rule(eqx.Module):
    """An algorithm's options. ``kind`` and the static options fix the compiled program;
    importance sampling and both particle filters are one ``kind``, ``"smc"``, that differ
    only in the traced ``ess_threshold`` (0: never resample, 1: every step), and beam search
    and DVTS are ``"tree"``, told apart by the traced ``diverse``: each pair shares one
    compilation."""

    kind: str = eqx.field(static=True)
    ess_threshold: Float[Array, ""]
    diverse: Bool[Array, ""]  # kind "tree": DVTS's subtrees (else beam search); traced, one compilation
    resampling: str = eqx.field(static=True)
    beam_width: int = eqx.field(static=True)
    ess_floor: float = eqx.field(static=True)
    reject_at: int = eqx.field(static=True)
    reject_fraction: float = eqx.field(static=True)


def reward_scores(particles: Any) -> Float[Array, " N"]:
    """The process reward's aggregate so far (the first potential's carry)."""
    return particles.potential_carry[0].aggregate


def beam_ancestors(scores: Float[Array, " N"], width: int) -> Int[Array, " N"]:
    """The ``N / width`` best-scored slots, each ``width`` times."""
    best = jax.lax.top_k(scores, scores.shape[0] // width)[1]
    return jnp.repeat(best, width).astype(jnp.int32)


def dvts_ancestors(scores: Float[Array, " N"], width: int) -> Int[Array, " N"]:
    """Within each group of ``width`` consecutive slots (a subtree), its best slot ``width``
    times: the subtrees never exchange particles."""
    groups = scores.reshape(-1, width)
    best = jnp.argmax(groups, axis=1) + width * jnp.arange(groups.shape[0])
    return jnp.repeat(best, width).astype(jnp.int32)


def tempered_increments(
    log_increments: Float[Array, " N"], ess_floor: float, iterations: int = 30
) -> tuple[Float[Array, " N"], Float[Array, ""]]:
    """``beta · log_increments`` with the largest ``beta`` in ``[0, 1]`` whose ESS is at least
    ``ess_floor · N`` (bisection; ``beta = 1`` when no tempering is needed). Impossible
    particles (``-inf``) stay impossible at every ``beta``."""
    n = log_increments.shape[0]
    dead = jnp.isneginf(log_increments)

    def at(beta):
        return jnp.where(dead, -jnp.inf, beta * jnp.where(dead, 0.0, log_increments))

    enough = lambda beta: effective_sample_size(at(beta)) >= ess_floor * n  # noqa: E731

    def bisect(_, bounds):
        low, high = bounds
        middle = 0.5 * (low + high)
        return jnp.where(enough(middle), middle, low), jnp.where(enough(middle), high, middle)

    low, _ = jax.lax.fori_loop(0, iterations, bisect, (jnp.zeros(()), jnp.ones(())))
    beta = jnp.where(enough(jnp.ones(())), 1.0, low)
    return at(beta), beta


def _step_tokens(before: Any, after: Any) -> Int[Array, " N"]:
    """Tokens each particle decoded in a step: its text grew by, plus an EOS if it ended."""
    ended = after.finished & after.ended_with_eos & ~before.finished
    return after.length - before.length + ended.astype(jnp.int32)


def _select(program: Generation, state: SMCState, rule: Rule) -> tuple[Bool[Array, ""] | bool, Callable]:
    """Whether to resample before the step, and how to draw the ancestors."""
    kind = rule.kind
    if kind == "smc":
        return should_resample(state, rule.ess_threshold), get_resampler(rule.resampling)
    if kind == "speculative_rejection":
        return False, get_resampler(rule.resampling)
    alive = state.ess > 0
    if kind == "tree":
        scores = reward_scores(state.particles)
        ancestors = jnp.where(
            rule.diverse, dvts_ancestors(scores, rule.beam_width), beam_ancestors(scores, rule.beam_width)
        )
        return alive, lambda key, log_weights, n: ancestors
    return alive, get_resampler(rule.resampling)  # the tempered particle filter


def _after(program: Generation, state: SMCState, t: Int[Array, ""], rule: Rule) -> tuple[SMCState, Float[Array, ""]]:
    """ePF tempering and speculative rejection; a no-op for the others."""
    if rule.kind == "tempered_particle_filter":
        # Resampled every step, so the weights are this step's increments alone.
        log_weights, beta = tempered_increments(state.log_weights, rule.ess_floor)
        return state._replace(log_weights=log_weights, ess=effective_sample_size(log_weights)), beta
    if rule.kind == "speculative_rejection":
        n = state.log_weights.shape[0]
        scores = jnp.where(jnp.isnan(state.log_weights), -jnp.inf, reward_scores(state.particles))
        worst = jnp.zeros(n, bool).at[jnp.argsort(scores)[: int(rule.reject_fraction * n)]].set(True)
        reject = worst & (t == rule.reject_at)
        particles = state.particles._replace(finished=state.particles.finished | reject)
        log_weights = jnp.where(reject, -jnp.inf, state.log_weights)
        return state._replace(particles=particles, log_weights=log_weights, ess=effective_sample_size(log_weights)), (
            jnp.ones(())
        )
    return state, jnp.ones(())


def run_search(program: Generation, key: PRNGKeyArray, n_particles: int, rule: Rule) -> SearchResult:
    """The search loop (module docstring), unjitted: call it under ``jit`` or ``vmap``."""
    init_key, loop_key = jax.random.split(key)
    state = init(program, init_key, n_particles)
    zero = jnp.zeros((), jnp.int32)

    def advance(carry, t):
        def run(carry):
            state, tokens, calls = carry
            resample_key, propagate_key = jax.random.split(jax.random.fold_in(loop_key, t))
            when, resampler = _select(program, state, rule)
            state, ancestors = resample(program, resample_key, state, resampler=resampler, when=when)
            before = state.particles
            state = propagate(program, propagate_key, state, t)
            new = _step_tokens(before, state.particles)
            state, beta = _after(program, state, t, rule)
            info = SMCInfo(state.ess, ancestors, jnp.asarray(when), emitted(state.choices, state.window, t))
            return (state, tokens + jnp.sum(new), calls + jnp.max(new)), (info, beta)

        state = carry[0]
        running = ~jnp.all(done(program, state.particles)) & (state.ess > 0)
        return jax.lax.cond(running, run, lambda c: (c, (idle(c[0]), jnp.ones(()))), carry)

    (state, tokens, calls), (history, temperatures) = jax.lax.scan(
        advance, (state, zero, zero), jnp.arange(program.max_steps)
    )
    result = finalize(state, history)
    return SearchResult(result, reward_scores(state.particles), temperatures, tokens, calls + 1)


_run_search = eqx.filter_jit(run_search)


def rule_for(
    algorithm: str,
    n_particles: int,
    *,
    resampling: str = "systematic",
    beam_width: int = 4,
    ess_threshold: float = 0.5,
    ess_floor: float = 0.5,
    reject_at: int = 0,
    reject_fraction: float = 0.5,
) -> Rule:
    """Check the options of ``algorithm`` (an :data:`ALGORITHMS` name or a :data:`SAMPLING`
    rule, which runs ``"importance"``) for ``n_particles`` and bundle them."""
    algorithm = "importance" if algorithm in SAMPLING else algorithm
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {algorithm!r}; choose one of {ALGORITHMS + SAMPLING}")
    check_positive_int("n_particles (the budget, at least one particle)", n_particles)
    if algorithm in ("beam_search", "dvts"):
        check_positive_int("beam_width", beam_width)
        if n_particles % beam_width:
            raise ValueError(f"{algorithm} needs n_particles ({n_particles}) divisible by beam_width ({beam_width})")
    if not 0.0 <= ess_threshold <= 1.0 or not 0.0 <= ess_floor <= 1.0:
        raise ValueError(f"ess_threshold and ess_floor must lie in [0, 1], got {ess_threshold}, {ess_floor}")
    if not 0.0 <= reject_fraction < 1.0:
        raise ValueError(f"reject_fraction must lie in [0, 1), got {reject_fraction}")
    get_resampler(resampling)
    threshold = {"importance": 0.0, "particle_filter": 1.0}.get(algorithm, ess_threshold)
    kind = "smc" if algorithm in ("importance", "particle_filter", "particle_filter_adaptive") else algorithm
    kind = "tree" if algorithm in ("beam_search", "dvts") else kind
    return Rule(
        kind,
        jnp.asarray(threshold, jnp.float32),
        jnp.asarray(algorithm == "dvts"),
        resampling,
        beam_width,
        ess_floor,
        reject_at,
        reject_fraction,
    )


def check_program(program: Any) -> None:
    """A clear error unless ``program`` is a generation program with a process reward first."""
    if not isinstance(program, Generation):
        raise TypeError(f"search needs a ppl.Generation program, got {type(program).__name__}")
    if not program.potentials or not hasattr(program.potentials[0], "update"):
        raise ValueError("search needs the process reward as the program's first potential (its selection score)")


def search(
    program: Generation, key: PRNGKeyArray, n_particles: int, algorithm: str = "particle_filter", **options: Any
) -> SearchResult:
    """Run ``algorithm`` (module docstring) with a budget of ``n_particles``; ``options`` are
    :func:`rule_for`'s. One compiled program per (program shapes, algorithm, options, N).

    A verifier that failed on the host during the run raises
    :class:`ppl.models.process_rewards.VerifierError` here, after the run.
    """
    check_program(program)
    rule = rule_for(algorithm, n_particles, **options)
    result = _run_search(program, key, n_particles, rule)
    jax.block_until_ready(result.scores)
    for potential in program.potentials:  # a host verifier's failures (ppl.models.process_rewards)
        raise_failures = getattr(getattr(potential, "potential", None), "raise_failures", None)
        if raise_failures is not None:
            raise_failures()
    return result


class GibbsSearchResult(NamedTuple):
    """Particle Gibbs at a budget: the chain's trajectories replayed into particle states
    (``particles``, one row per iteration, e.g. ``particles.tokens`` and ``.length``) and the
    particle sweeps spent (``n_particles`` particles each: the first SMC run and every
    conditional sweep)."""

    particles: Any
    sweeps: int


def gibbs_search(program: Generation, key: PRNGKeyArray, budget: int, n_particles: int = 4) -> GibbsSearchResult:
    """Particle Gibbs (:func:`ppl.inference.particle_gibbs`, conditional SMC without ancestor
    sampling) with ``budget`` particles in all: ``budget // n_particles`` sweeps of
    ``n_particles``, the first an ordinary SMC run. Its trajectories are draws from a Markov
    chain that leaves the posterior invariant (no burn-in is dropped); :func:`decide` with
    ``"particle_gibbs"`` takes the majority answer over them."""
    check_program(program)
    check_positive_int("n_particles", n_particles)
    if budget < 2 * n_particles:
        raise ValueError(f"particle Gibbs needs a budget of at least 2 sweeps of {n_particles} particles, got {budget}")
    sweeps = budget // n_particles
    chain = particle_gibbs(program, key, n_particles, sweeps - 1)
    return GibbsSearchResult(replay(program, chain.samples).particles, sweeps)


def decide(
    algorithm: str,
    answers: Sequence[Hashable | None],
    scores: Float[Array, " N"] | np.ndarray,
    log_weights: Float[Array, " N"] | np.ndarray,
) -> Hashable | None:
    """The answer ``algorithm`` returns given each particle's answer (``None``: no answer),
    reward score and final log weight (module docstring, *Answers*)."""
    scores, log_weights = np.asarray(scores, np.float64), np.asarray(log_weights, np.float64)
    valid = [i for i, answer in enumerate(answers) if answer is not None]
    if not valid:
        return None
    if algorithm in ("best_of_n", "beam_search", "dvts", "speculative_rejection"):
        return answers[max(valid, key=lambda i: (scores[i], -i))]
    totals: dict[Hashable, float] = defaultdict(float)
    if algorithm in ("majority_vote", "particle_gibbs"):
        mass = np.ones(len(answers))
    elif algorithm == "weighted_best_of_n":
        mass = np.exp(np.where(np.isfinite(scores), scores - scores[valid].max(), -np.inf))
    else:
        mass = np.exp(np.where(np.isfinite(log_weights), log_weights - np.max(log_weights), -np.inf))
    for i in valid:
        totals[answers[i]] += float(np.nan_to_num(mass[i]))
    return max(totals, key=lambda answer: totals[answer])


__all__ = [
    "ALGORITHMS",
    "SAMPLING",
    "TARGETS_POSTERIOR",
    "GibbsSearchResult",
    "Rule",
    "SearchResult",
    "beam_ancestors",
    "check_program",
    "decide",
    "dvts_ancestors",
    "gibbs_search",
    "reward_scores",
    "rule_for",
    "run_search",
    "search",
    "tempered_increments",
]
