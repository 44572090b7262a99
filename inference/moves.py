"""MCMC moves for resample-move SMC (Gilks & Berzuini 2001): kernels that leave the current
intermediate target ``gamma_t`` invariant, applied to every particle after a step.

Because such a move keeps ``gamma_t`` invariant, a properly weighted population stays
properly weighted with its weights unchanged: rejuvenation restores diversity that
resampling took away without touching ``log_z``. Use one with
``smc(..., rejuvenate=suffix_mh(lag), rejuvenate_every=k)`` or call it on an ``SMCState``
through :func:`ppl.inference.kernel.rejuvenate`.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Int, PRNGKeyArray

from ppl.inference.history import restore
from ppl.inference.kernel import SMCState, n_particles_of, propagate
from ppl.inference.particles import StepProposal
from ppl.inference.sequential import check_positive_int
from ppl.program import StateSpace


class SuffixMH(eqx.Module):
    """Regenerate the last ``lag`` steps of every particle and accept by Metropolis–Hastings.

    Particle ``x_{0:t}`` proposes ``x'_{0:t} = (x_{0:t-lag}, x'_{t-lag+1:t})``, the suffix
    drawn by the program's own step proposal ``q`` from the particle's state at ``t - lag``,
    and accepts with probability::

        min(1, gamma_t(x') q(x_suffix | prefix) / (gamma_t(x) q(x'_suffix | prefix)))
          = min(1, exp(sum of the suffix's log-weight increments under x'
                       - the same sum under x))

    an independence proposal for the suffix given the prefix, so ``gamma_t`` is invariant.
    The state at ``t - lag`` comes from ``SMCState.window`` (light copies of the last steps'
    states; for an LM the KV cache is rolled back by moving its lengths, nothing is copied)
    and the suffix is re-drawn in ``lag`` steps. Accepting or rejecting a particle that keeps
    a KV cache is a per-row choice of two caches (one pass over the cache, like a resampling
    gather). A particle finished before ``t - lag + 1`` is left as it is; moves start once
    ``lag`` steps have been taken. ``log_q_score`` is left as the sampler drew it.
    """

    lag: int = eqx.field(static=True)

    @property
    def window(self) -> int:
        """How many of the last steps the move regenerates (its ``lag``)."""
        return self.lag

    def __call__(
        self,
        program: StateSpace,
        key: PRNGKeyArray,
        state: SMCState,
        t: Int[Array, ""],
        proposal: StepProposal | None = None,
    ) -> tuple[SMCState, Bool[Array, " N"]]:
        window = state.window
        if window is None or window.size < self.lag:
            size = 0 if window is None else window.size
            raise ValueError(
                f"suffix_mh(lag={self.lag}) needs the last {self.lag} steps of each particle but the SMC state "
                f"keeps {size}: start it with ppl.inference.kernel.init(..., window={self.lag})"
            )
        if not isinstance(t, jax.core.Tracer) and int(t) + 1 < self.lag:
            raise ValueError(f"suffix_mh(lag={self.lag}) at step t={int(t)}: only {int(t) + 1} steps have been taken")
        n = n_particles_of(state)
        first = t - self.lag + 1
        slots = (first + jnp.arange(self.lag)) % window.size

        def move(state: SMCState) -> tuple[SMCState, Bool[Array, " N"]]:
            run_key, accept_key = jax.random.split(key)
            before = jax.tree.map(lambda ring: ring[:, first % window.size], window.states)
            start = state._replace(
                particles=restore(before, state.particles),
                log_weights=jnp.zeros(n),
                log_gamma=state.log_gamma - jnp.sum(window.log_densities[:, slots], axis=1),
            )

            def regenerate(current: SMCState, offset):
                return propagate(
                    program, jax.random.fold_in(run_key, offset), current, first + offset, proposal=proposal
                ), None

            proposed, _ = jax.lax.scan(regenerate, start, jnp.arange(self.lag))
            log_ratio = proposed.log_weights - jnp.sum(window.log_increments[:, slots], axis=1)
            # NaN (both suffixes impossible) compares false: rejected.
            accepted = jnp.log(jax.random.uniform(accept_key, (n,))) < log_ratio
            choose = lambda new, old: jnp.where(accepted.reshape((n,) + (1,) * (new.ndim - 1)), new, old)  # noqa: E731
            return state._replace(
                particles=program.where(accepted, proposed.particles, state.particles),
                choices=jax.tree.map(choose, proposed.choices, state.choices),
                log_gamma=choose(proposed.log_gamma, state.log_gamma),
                window=jax.tree.map(choose, proposed.window, window),
            ), accepted

        return jax.lax.cond(first >= 0, move, lambda s: (s, jnp.zeros(n, bool)), state)


def suffix_mh(lag: int) -> SuffixMH:
    """The :class:`SuffixMH` move regenerating the last ``lag >= 1`` steps."""
    check_positive_int("suffix_mh lag", lag)
    return SuffixMH(lag)
