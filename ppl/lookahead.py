"""Look-ahead twists read off a constraint automaton: how far each prefix is from acceptance.

A twist ``psi_t(x_{<t}, v)`` tells SMC, before the sequence ends, how likely a prefix is to
finish well (:class:`ppl.Generation` explains how twists enter and why the target stays
exact whatever they are). Under a hard constraint the prefixes that end badly are those that
still owe many tokens to the automaton: every token the constraint still needs will be
forced sooner or later, and forced tokens are the ones the LM finds unlikely. The automaton
knows that debt exactly — the fewest tokens from each state to acceptance
(``TokenDFA.tokens_to_accept``) — so the twist costs two gathers per step and no LM call:

    log psi_t(x_{<t}, v) = -nats_per_token · min(d(state after v), budget)

With ``require_eos`` the budget masks (``Generation.allowed``) already remove every token
after which acceptance is out of reach; this twist ranks the tokens that remain, so
resampling favours particles that have paid more of their debt, and the proposal leans
towards tokens that make progress.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ppl.generation import TokenState


class AcceptanceTwist(eqx.Module):
    """``twist(state) -> [N, V]``: minus ``nats_per_token`` per token still owed to ``constraint``.

    Args:
        constraint: a constraint with ``tokens_to_accept(state) -> [V]`` distances
            (:class:`ppl.models.constraints.TokenDFA`), the one given to the generation.
        nats_per_token: the guessed log-probability cost of each token the constraint still
            needs (``0``: no twist). Any finite value keeps Z and the posterior exact.
        budget: distances are capped here (the generation's ``max_new_tokens``), so tokens the
            constraint forbids get a finite value; the mask or the constraint factor removes them.
    """

    constraint: eqx.Module
    nats_per_token: Float[Array, ""]
    budget: int = eqx.field(static=True)

    def __init__(self, constraint: eqx.Module, budget: int, nats_per_token: float = 1.0):
        if not hasattr(constraint, "tokens_to_accept"):
            raise TypeError(
                f"AcceptanceTwist needs a constraint with tokens_to_accept (a TokenDFA), got {type(constraint).__name__}"
            )
        if budget < 1:
            raise ValueError(f"budget must be at least 1 token, got {budget}")
        self.constraint, self.budget = constraint, budget
        self.nats_per_token = jnp.asarray(nats_per_token, jnp.float32)

    def __call__(self, state: TokenState) -> Float[Array, "N V"]:
        owed = jax.vmap(self.constraint.tokens_to_accept)(state.constraint_state)
        return -self.nats_per_token * jnp.minimum(owed, self.budget).astype(jnp.float32)
