"""Result pytrees returned by inference transformations (public contract)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int


class AllDeadError(ValueError):
    """An answer was asked of a result in which every particle has zero weight."""


class SMCResult(NamedTuple):
    """A properly weighted particle collection, with the history of how it was produced.

    ``log_weights`` are unnormalised and carry the evidence: ``logsumexp(log_weights) ==
    log_z``, and for any test function ``f``, ``E[sum_i exp(log_weights[i]) f(x_i)] =
    Z · E_posterior[f]``. ``exp(log_z)`` is an unbiased estimate of ``Z``.

    Per-step arrays have length ``max_steps``; entry ``t`` describes step ``t``. Entries past
    ``n_steps`` (when every particle finished early) hold the no-op values
    ``ess = n_particles``, ``ancestors = arange``, ``resampled = False``.

    ``choices[site][i]`` is particle ``i``'s trajectory: column 0 its value of ``site`` at
    ``init``, column ``t + 1`` at step ``t`` (zeros where the site was not drawn, e.g. after
    the particle finished). ``ppl.inference.replay(program, result.choices)`` rebuilds the
    particles and their ``log gamma`` from it.
    """

    particles: Any  # the state pytree, each leaf with a leading [n_particles] axis
    log_weights: Float[Array, " N"]
    log_z: Float[Array, ""]
    ess: Float[Array, " T"]  # effective sample size after step t's weighting
    ancestors: Int[Array, "T N"]  # particle i at step t descends from ancestors[t, i] at t-1
    resampled: Bool[Array, " T"]  # whether resampling happened just before step t
    n_steps: Int[Array, ""]  # steps actually run (the loop stops once all particles are done)
    all_dead: Bool[Array, ""]  # every weight is zero: log_z = -inf, particles meaningless
    nan_weights: Bool[Array, ""]  # a NaN potential was met; it was treated as -inf
    log_q_score: Float[Array, " N"]  # sum of log q at non-reparameterised proposal sites (for VI)
    choices: dict[str, Any]  # site -> [N, max_steps + 1, ...]: row i is particle i's trajectory
    log_gamma: Float[Array, " N"]  # log gamma of each particle's trajectory (the unnormalised target)
    acceptance_rate: Float[Array, " T"]  # fraction of particles a move changed after step t (0: none)

    @property
    def normalized_log_weights(self) -> Float[Array, " N"]:
        """Log of the self-normalised weights (they sum to one). Works on batched results."""
        return self.log_weights - jnp.expand_dims(self.log_z, -1)

    @property
    def weights(self) -> Float[Array, " N"]:
        """Self-normalised weights; uniform if every particle is dead."""
        uniform = 1.0 / self.log_weights.shape[-1]
        return jnp.where(jnp.expand_dims(self.all_dead, -1), uniform, jax.nn.softmax(self.log_weights, axis=-1))

    # --- answers: posterior draws, never dead particles --------------------------------------

    def sample(self, key: jax.Array, n: int = 1, tokenizer: Any = None) -> Any:
        """``n`` particles drawn with replacement in proportion to their weights: a list of
        ``n`` decoded texts given a ``tokenizer`` (particles with ``tokens`` and ``length``,
        as :class:`ppl.Generation`'s), else the particle pytree with a leading ``[n]`` axis.
        Raises :class:`AllDeadError` when every particle is dead."""
        self._check_answerable()
        indices = jax.random.choice(key, self.log_weights.shape[0], (n,), p=self.weights)
        return self._pick(indices, tokenizer)

    def best(self, tokenizer: Any = None) -> Any:
        """The particle of highest weight: its decoded text given a ``tokenizer``, else its
        state (leaves without the particle axis). Raises :class:`AllDeadError` when every
        particle is dead. A mode-seeking summary; :meth:`sample` draws from the posterior."""
        self._check_answerable()
        chosen = self._pick(jnp.argmax(self.log_weights)[None], tokenizer)
        return chosen[0] if tokenizer is not None else jax.tree.map(lambda leaf: leaf[0], chosen)

    def _check_answerable(self) -> None:
        if self.log_weights.ndim != 1:
            raise ValueError(
                f"this result holds a batch of runs (log_weights {self.log_weights.shape}); "
                "take one first, e.g. jax.tree.map(lambda x: x[0], result)"
            )
        if bool(self.all_dead):
            raise AllDeadError(
                "every particle has zero weight (result.all_dead): no particle satisfied the "
                "target; relax the constraint, raise the token budget, or use more particles"
            )

    def _pick(self, indices: Int[Array, " n"], tokenizer: Any) -> Any:
        chosen = jax.tree.map(lambda leaf: leaf[indices], self.particles)
        if tokenizer is None:
            return chosen
        tokens, lengths = np.asarray(chosen.tokens), np.asarray(chosen.length)
        return [tokenizer.decode(row[:length].tolist()) for row, length in zip(tokens, lengths)]


class MCMCResult(NamedTuple):
    """A Markov chain: ``samples`` leaves have a leading ``[n_samples]`` axis.

    ``log_z`` is the evidence estimate attached to the chain's current state at each
    iteration (for particle MCMC); ``accepted[k]`` whether iteration ``k`` moved.
    """

    samples: Any
    log_z: Float[Array, " S"]
    accepted: Bool[Array, " S"]

    @property
    def acceptance_rate(self) -> Float[Array, ""]:
        """Fraction of iterations that moved (over every axis of ``accepted``)."""
        return jnp.mean(self.accepted)
