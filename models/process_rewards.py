"""Process rewards as likelihoods: per-step verifiers and judges turned into potentials.

A *verifier* judges every step of a partial solution::

    verifier(problem, text, finished) -> [r_1, ..., r_k]     # one score in [0, 1] per step

(:func:`ppl.models.tasks.step_verdicts` is the exact one; :class:`NoisyVerifier` flips its
verdicts at set rates; any Python function of that form will do). :func:`verifier_reward`
makes it a potential of a chunked :class:`ppl.Generation` whose steps are the solution's
steps, evaluated after each chunk on the prefix ``x_{1:t}``:

1. **Aggregate** the step scores of the prefix into one score ``R_t`` in ``[0, 1]``:
   ``"product"`` ``prod_s r_s``; ``"min"`` ``min_s r_s``; ``"last"`` ``r_t`` (the latest step
   only); ``"model"`` the scorer's judgement of the whole prefix at once (Puri et al. 2025's
   "model aggregation"; for a verifier, ``1`` when every step passes, for an LM judge its
   ``P(yes)`` about the whole text, :func:`judge_reward`).
2. **Link** ``R_t`` to a log potential, with temperature ``tau`` (tempered weights):
   ``"log"``: ``log psi_t = log R_t / tau``, the Bernoulli likelihood of the observation "the
   step is good" (``R = 0`` kills the particle); ``"logit"``: ``log psi_t = logit(R_t) / tau``,
   so that the weights normalised over particles are the *softmax of the logits* that Puri et
   al. resample with, ``w_i ∝ (R_i / (1 - R_i))^(1/tau)``. ``floor`` makes the verifier soft:
   each *step's* score is clipped into ``[floor, 1]`` (``[floor, 1 - floor]`` under the logit
   link, which needs ``R < 1``) before aggregating, so a failed step costs a factor ``floor``
   instead of killing the particle.
3. **Weighting** (:func:`ppl.rewards.incremental`), which fixes ``G_t`` and the target
   ``p_LM(x) · prod_t G_t``: ratio weighting (the default) gives ``G_t = psi_t / psi_{t-1}``,
   so the target is ``p_LM(x) · psi_T`` -- the aggregate of the *finished* solution -- and
   the intermediate ``psi_t`` are twists; product weighting (``weighting="product"``) gives
   ``G_t = psi_t``, target ``p_LM(x) · prod_t psi_t`` -- every prefix is scored again. Puri et
   al.'s particle filter is product weighting of the ``"model"`` score with the logit link,
   resampled every step (the weights at step ``t`` are then exactly ``softmax(logit R_t)``).

The verifier runs on the host, one callback per step for the whole particle batch (every
vmapped seed included); the problem is a traced index into a static problem set, so one
compiled program serves every problem of the set.

**Bad verifiers.** A verifier that raises, returns a score outside ``[0, 1]``, NaN, or a
wrong number of scores is not run into the weights: the particle gets a NaN increment (killed,
counted in ``nan_weights``) and the first failure is kept in ``reward.failures``;
``reward.raise_failures()`` (called by ``ppl.inference.search.search`` after the run) turns it into a
:class:`VerifierError` naming the problem, the text and what went wrong.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ppl.models.tasks import STEP_DELIMITER, step_verdicts, steps_of
from ppl.rewards import Incremental, incremental

Verifier = Callable[[Any, str, bool], Sequence[float]]
"""``verifier(problem, text, finished) -> [score in [0, 1] per step]``."""

AGGREGATES = ("product", "min", "last", "model")
LINKS = ("log", "logit")


class VerifierError(RuntimeError):
    """A verifier raised or returned an invalid score during inference."""


class Failures:
    """The first verifier failure met on the host (``message``), and how many there were."""

    __slots__ = ("message", "count")

    def __init__(self) -> None:
        self.message: str | None = None
        self.count = 0


@dataclass(frozen=True)
class NoisyVerifier:
    """An imperfect verifier: ``verifier``'s verdict on each step, flipped from right to
    wrong with probability ``false_negative`` and from wrong to right with probability
    ``false_positive``.

    The noise is a *fixed* function of (problem, the text up to and including the step,
    ``seed``) -- a hash, not a random draw -- so the same prefix always gets the same verdict:
    the verifier is a proper potential, and reruns agree. Scores are thresholded at 1/2 first.
    """

    false_positive: float
    false_negative: float
    seed: int = 0
    verifier: Verifier = step_verdicts
    delimiter: str = STEP_DELIMITER

    def __post_init__(self) -> None:
        for name in ("false_positive", "false_negative"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {rate}")

    def __call__(self, problem: Any, text: str, finished: bool = True) -> list[float]:
        verdicts, scores = self.verifier(problem, text, finished), []
        steps = steps_of(text, finished, self.delimiter)
        for k, verdict in enumerate(verdicts):
            prefix = self.delimiter.join(steps[: k + 1])
            digest = hashlib.blake2b(f"{self.seed}\x00{problem!r}\x00{prefix}".encode(), digest_size=8).digest()
            uniform = int.from_bytes(digest, "little") / 2**64
            right = verdict >= 0.5
            flip = uniform < (self.false_negative if right else self.false_positive)
            scores.append(float(right != flip))
        return scores


def predicted_ceiling(base_precision: float, false_positive: float, false_negative: float) -> float:
    """The accuracy a selection that trusts only the imperfect verifier saturates at.

    With infinitely many samples, every answer the verifier passes is equally good to the
    search, so the accuracy tends to the precision of "passes": of the samples it passes,
    the fraction that are truly right. If a fraction ``base_precision`` of the samples are
    truly right, that is ``q (1 - FN) / (q (1 - FN) + (1 - q) FP)`` with ``q = base_precision``
    (one verdict per sample; per-step noise compounds, so measure ``q`` on whole chains).
    """
    right = base_precision * (1.0 - false_negative)
    wrong = (1.0 - base_precision) * false_positive
    return right / (right + wrong) if right + wrong > 0 else 0.0


def _aggregate(scores: Sequence[float], aggregate: str, empty: float) -> float:
    if not scores:
        return empty  # nothing judged yet: no failed step
    if aggregate == "product":
        return float(np.prod(scores))
    if aggregate == "min" or aggregate == "model":
        return float(min(scores))  # a verifier passes the whole prefix iff it passes every step
    return float(scores[-1])


def link_log_psi(
    score: Float[Array, "*N"], link: str, temperature: Float[Array, ""] | float, floor: float
) -> Float[Array, "*N"]:
    """``log psi`` of an aggregated score ``R`` in ``[0, 1]`` (module docstring, step 2)."""
    clipped = jnp.clip(score, floor, 1.0 - floor) if floor > 0 else score
    if link == "log":
        value = jnp.log(clipped)
    else:
        value = jnp.log(clipped) - jnp.log1p(-clipped)
    return value / temperature


@dataclass(frozen=True, eq=False)
class HostVerifier:
    """The host side of a :class:`VerifierReward`: decodes each row, runs the verifier on its
    problem, checks and aggregates the scores (one call for the whole batch)."""

    problems: tuple
    verifier: Verifier
    decode: Callable[[list[int]], str]
    aggregate: str
    delimiter: str
    failures: Failures
    low: float = 0.0  # each step score is clipped into [low, high] (the floor)
    high: float = 1.0

    def __call__(self, problem, tokens, lengths, done) -> np.ndarray:
        shape = np.shape(lengths)
        tokens = np.asarray(tokens).reshape(-1, np.shape(tokens)[-1])
        lengths = np.clip(np.asarray(lengths).reshape(-1), 0, tokens.shape[1])
        problem, done = np.asarray(problem).reshape(-1), np.asarray(done).reshape(-1)
        out = np.empty(lengths.shape, np.float32)
        for i, (row, length) in enumerate(zip(tokens, lengths)):
            out[i] = self.score(int(problem[i]), self.decode(row[:length].tolist()), bool(done[i]))
        return out.reshape(shape)

    def score(self, index: int, text: str, finished: bool) -> float:
        """The aggregated score ``R`` of ``text`` on problem ``index`` (NaN on a failure)."""
        try:
            scores = [float(s) for s in self.verifier(self.problems[index], text, finished)]
        except Exception as error:  # noqa: BLE001 -- reported after the run, never swallowed
            return self._fail(f"raised {type(error).__name__}: {error}", index, text)
        expected = len(steps_of(text, finished, self.delimiter))
        if len(scores) != expected:
            return self._fail(f"returned {len(scores)} scores for {expected} steps", index, text)
        if not all(0.0 <= s <= 1.0 for s in scores):  # NaN fails this too
            return self._fail(f"returned scores {scores}, not all in [0, 1]", index, text)
        return _aggregate([min(max(s, self.low), self.high) for s in scores], self.aggregate, self.high)

    def _fail(self, what: str, index: int, text: str) -> float:
        self.failures.count += 1
        if self.failures.message is None:
            name = getattr(self.verifier, "__qualname__", type(self.verifier).__name__)
            self.failures.message = f"verifier {name} {what} on problem {index} for the text {text!r}"
        return math.nan


class VerifierReward(eqx.Module):
    """A host verifier as a log potential; build it with :func:`verifier_reward`."""

    problem: Int[Array, ""]
    temperature: Float[Array, ""]
    host: HostVerifier = eqx.field(static=True)
    link: str = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        result = jax.ShapeDtypeStruct(lengths.shape, jnp.float32)
        problem = jnp.broadcast_to(self.problem, lengths.shape)
        score = jax.pure_callback(self.host, result, problem, tokens, lengths, done, vmap_method="broadcast_all")
        return link_log_psi(score, self.link, self.temperature, 0.0)  # the host applied the floor

    def for_problem(self, index: int | Int[Array, ""]) -> VerifierReward:
        """The same reward on problem ``index`` of the set (same compiled program)."""
        return eqx.tree_at(lambda r: r.problem, self, jnp.asarray(index, jnp.int32))

    def raise_failures(self) -> None:
        """Raise :class:`VerifierError` for the first failure since the last call, and forget it."""
        failures = self.host.failures
        if failures.message is not None:
            message, count = failures.message, failures.count
            failures.message, failures.count = None, 0
            raise VerifierError(f"{message} ({count} failed call{'s' if count > 1 else ''} in this run)")


def verifier_reward(
    problems: Sequence[Hashable],
    verifier: Verifier,
    decode: Callable[[list[int]], str],
    *,
    aggregate: Literal["product", "min", "last", "model"] = "product",
    link: Literal["log", "logit"] = "log",
    temperature: float = 1.0,
    floor: float = 0.0,
    delimiter: str = STEP_DELIMITER,
    problem: int = 0,
) -> VerifierReward:
    """A process reward from ``verifier`` over a fixed set of ``problems`` (module docstring).

    Args:
        problems: the problem set; the reward scores ``problems[problem]``, and
            :meth:`VerifierReward.for_problem` switches problem without recompiling.
        verifier: ``verifier(problem, text, finished) -> [score per step]``.
        decode: token ids -> text (``tokenizer.decode``).
        aggregate, link, temperature, floor: how step scores become ``log psi``.
        delimiter: what ends a step in the text (the chunk delimiter).
    Weight it with ``ppl.rewards.incremental(reward)`` (ratio, target ``p · psi_T``) or
    ``incremental(reward, "product")`` (target ``p · prod_t psi_t``); :func:`weighted` does
    both by name.
    """
    if aggregate not in AGGREGATES:
        raise ValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= floor < 0.5:
        raise ValueError(f"floor must lie in [0, 0.5), got {floor}")
    if link == "logit" and floor == 0.0:
        raise ValueError("the logit link needs floor > 0 (logit(0) and logit(1) are infinite)")
    if not 0 <= problem < len(problems):
        raise ValueError(f"problem index {problem} is outside the set of {len(problems)} problems")
    high = 1.0 - floor if link == "logit" else 1.0
    host = HostVerifier(tuple(problems), verifier, decode, aggregate, delimiter, Failures(), float(floor), high)
    return VerifierReward(jnp.asarray(problem, jnp.int32), jnp.asarray(temperature, jnp.float32), host, link)


def weighted(potential: Any, weighting: Literal["ratio", "product"] = "ratio") -> Incremental:
    """``potential`` with the named weighting (module docstring, step 3)."""
    return incremental(potential, weighting)


class JudgeReward(eqx.Module):
    """An LM judge's ``log P(yes)`` about the whole prefix, through a link; see
    :func:`judge_reward`."""

    judge: Any
    temperature: Float[Array, ""]
    link: str = eqx.field(static=True)
    floor: float = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        return link_log_psi(jnp.exp(self.judge(tokens, lengths, done)), self.link, self.temperature, self.floor)


def judge_reward(
    judge: Any, *, link: Literal["log", "logit"] = "logit", temperature: float = 1.0, floor: float = 1e-4
) -> JudgeReward:
    """LM-as-judge as a process reward with ``"model"`` aggregation: ``judge`` (e.g.
    :func:`ppl.models.scorers.lm_judge` asking "is every line of this working correct?")
    scores the whole prefix after each step, ``R_t = P(yes | x_{1:t})``, linked as in the
    module docstring. It is pure JAX: one judge forward pass per particle per step."""
    if link not in LINKS:
        raise ValueError(f"link must be one of {LINKS}, got {link!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return JudgeReward(judge, jnp.asarray(temperature, jnp.float32), link, float(floor))


__all__ = [
    "AGGREGATES",
    "LINKS",
    "HostVerifier",
    "JudgeReward",
    "NoisyVerifier",
    "Verifier",
    "VerifierError",
    "VerifierReward",
    "judge_reward",
    "link_log_psi",
    "predicted_ceiling",
    "verifier_reward",
    "weighted",
]
