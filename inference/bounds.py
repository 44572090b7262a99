"""Bidirectional bounds on ``log Z``: how good a twist or proposal is, as a number.

- Lower: any properly weighted sampler's ``E[log Ẑ] <= log Z`` (Jensen); here SMC with
  ``n_particles``, resampling every step.
- Upper: conditional SMC whose reference is an *exact* posterior sample ``x* ~ sigma``:
  ``E_{x*~sigma} E[log Ẑ_CSMC] >= log Z`` (Zhao et al. 2024, after Andrieu, Doucet &
  Holenstein 2010: ``Ẑ_CSMC / Z`` is the density ratio of the CSMC sweep's law to the SMC
  run's, whose expectation of the log is a KL divergence, so ``>= 0``).

The gap ``E[upper] - E[lower]`` is an upper bound on the symmetrised KL divergence between
the sampler's law and the extended target; it shrinks to 0 as the twist approaches the
optimal one (or ``N`` grows). Exact posterior samples exist for enumerable models
(``ppl.models.toy_lm.posterior_choices``) and for infilling (``ppl.models.infilling``).
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ppl.inference.gibbs import conditional_smc
from ppl.inference.kernel import Reference
from ppl.inference.particles import StepProposal
from ppl.inference.sequential import smc, validate
from ppl.inference.trajectories import check_trajectories
from ppl.program import StateSpace


class Bounds(NamedTuple):
    """Per-run estimates (one per posterior sample): average each for the bounds."""

    lower: Float[Array, " S"]  # log Ẑ of SMC runs: E[lower] <= log Z
    upper: Float[Array, " S"]  # log Ẑ of CSMC runs seeded with exact posterior samples: E[upper] >= log Z

    @property
    def gap(self) -> Float[Array, ""]:
        """Mean upper minus mean lower bound (nats): 0 for a perfect twist or proposal."""
        return jnp.mean(self.upper) - jnp.mean(self.lower)


def bidirectional_bounds(
    program: StateSpace,
    key: PRNGKeyArray,
    n_particles: int,
    posterior: dict[str, Array],
    *,
    proposal: StepProposal | None = None,
) -> Bounds:
    """One SMC run and one conditional SMC run per exact posterior trajectory in
    ``posterior`` (``[S, max_steps + 1, ...]`` per site), ``n_particles`` each.

    ``ValueError`` if a run's weights met a NaN (a twist or proposal returning NaN)."""
    validate(program, n_particles)
    n = check_trajectories(program, posterior, leading=1)
    bounds, nan = _bounds(program, key, n_particles, posterior, proposal, n)
    if bool(nan):
        raise ValueError("a NaN weight was met while computing the bounds: the twist or proposal returned NaN")
    return bounds


@eqx.filter_jit
def _bounds(program, key, n_particles, posterior, proposal, n):
    def one(key, reference):
        lower_key, upper_key = jax.random.split(key)
        lower = smc(program, lower_key, n_particles, ess_threshold=1.0, proposal=proposal)
        upper = conditional_smc(program, upper_key, Reference(reference, 0), n_particles, proposal=proposal)
        return lower.log_z, upper.log_z, lower.nan_weights | upper.nan_weights

    lower, upper, nan = jax.lax.map(lambda args: one(*args), (jax.random.split(key, n), posterior), batch_size=n)
    return Bounds(lower, upper), jnp.any(nan)
