"""Learned twists and proposals: small equinox heads on a frozen LM's features.

A decode of a :class:`ppl.lm.FeatureLM` returns, with the logits, the features they were read
from (the last hidden state ``h``, ``[hidden_size]``). A head maps ``h`` to one value per
next token ``v`` through a low-rank map into the LM's output embedding ``E`` (``[V, d]``,
the tied token embedding)::

    head(h)_v = E_v · (U (D h)) + b_v           D: [rank, d], U: [d, rank], b: [V]

so it costs one ``[V, d]`` product per step, like the LM's own output layer, and can say
"more of the tokens that look like these" in the model's own token geometry.

- :class:`TwistHead` gives ``log psi_t(x_{<t}, v)`` for every ``v``; ``head.twist(lm)`` is
  usable as ``ppl.Generation(twist=...)`` (twisted SMC: tokens from ``q ∝ p_LM · psi``).
- :class:`ProposalHead` gives a logit bias ``b``; ``head.proposal(program)`` is a proposal
  for ``ppl.inference.smc(proposal=...)`` drawing tokens from ``q ∝ p_LM · exp(b)`` (masked
  like the program's own proposal), weighted by ``p / q``.

Neither changes the target. **The LM stays frozen**: a head holds only its own arrays (the
embedding is read from the LM at call time, under ``stop_gradient``, as are the features),
so ``jax.grad`` w.r.t. a head never reaches the LM weights and the backward pass stops at
the head: per step it stores the ``[N, d]`` features and ``[N, V]`` logits and costs about
two more ``[V, d]`` products per particle — no backward pass through the transformer.
``U`` starts at zero: an untrained head is the untwisted program (or the LM as proposal).
"""

from __future__ import annotations

from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ppl.distributions import Categorical
from ppl.generation import Generation, TokenState, _masked_logits
from ppl.lm import FeatureLM


class _LowRankHead(eqx.Module):
    """``h -> E (U (D h)) + b``: the shared map of both heads (see the module docstring)."""

    down: Float[Array, "rank d"]
    up: Float[Array, "d rank"]
    bias: Float[Array, " V"]

    def __init__(self, lm: FeatureLM, rank: int, key: PRNGKeyArray):
        if not hasattr(lm, "decode_with_features"):
            raise TypeError(
                f"a head needs an LM with decode_with_features (ppl.lm.FeatureLM); {type(lm).__name__} has none"
            )
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
        d = lm.hidden_size
        self.down = jax.random.normal(key, (rank, d)) / jnp.sqrt(d)
        self.up = jnp.zeros((d, rank))
        self.bias = jnp.zeros(lm.vocab_size)

    @property
    def vocab_size(self) -> int:
        return self.bias.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.down.shape[1]

    def check_lm(self, lm: Any) -> None:
        """``ValueError`` unless ``lm`` has this head's vocabulary and hidden size."""
        if not hasattr(lm, "decode_with_features"):
            raise TypeError(
                f"a head needs an LM with decode_with_features (ppl.lm.FeatureLM); {type(lm).__name__} has none"
            )
        if (lm.vocab_size, lm.hidden_size) != (self.vocab_size, self.hidden_size):
            raise ValueError(
                f"{type(self).__name__} was built for vocab_size={self.vocab_size}, hidden_size={self.hidden_size}; "
                f"this LM has vocab_size={lm.vocab_size}, hidden_size={lm.hidden_size}"
            )

    def __call__(self, features: Float[Array, "N d"], embedding: Float[Array, "V d"]) -> Float[Array, "N V"]:
        features, embedding = jax.lax.stop_gradient(features), jax.lax.stop_gradient(embedding)
        direction = (features @ self.down.T) @ self.up.T  # [N, d]
        return direction @ embedding.T.astype(direction.dtype) + self.bias


class TwistHead(_LowRankHead):
    """``log psi_t(x_{<t}, v)`` for every next token ``v`` from the decode's features.

    Build it for an LM (``TwistHead(lm, rank, key)``), train it (``ppl.inference.ctl``,
    ``smc_bound``), and steer with ``Generation(..., twist=head.twist(lm))``.
    """

    def twist(self, lm: FeatureLM) -> LearnedTwist:
        """This head as a ``Generation`` twist for ``lm`` (checked: same vocabulary and width)."""
        self.check_lm(lm)
        return LearnedTwist(self, lm.output_embedding)


class LearnedTwist(eqx.Module):
    """A :class:`TwistHead` bound to an LM's output embedding: ``twist(state, features)``."""

    uses_features: ClassVar[bool] = True  # Generation passes the decode's features
    head: TwistHead
    embedding: Float[Array, "V d"]

    def __call__(self, state: TokenState, features: Float[Array, "N d"]) -> Float[Array, "N V"]:
        return self.head(features, self.embedding)


class ProposalHead(_LowRankHead):
    """A learned logit bias on top of ``p_LM``: the proposal ``q ∝ p_LM · exp(bias)``.

    Train it (``ppl.inference.distill``, ``elbo``, ``iwae``) and use it with
    ``smc(program, key, n, proposal=head.proposal(program))``.
    """

    def proposal(self, program: Generation) -> LearnedProposal:
        """This head as a token proposal for ``program`` (checked against its LM)."""
        self.check_lm(program.lm)
        return LearnedProposal(self, program)


class LearnedProposal(eqx.Module):
    """A :class:`ProposalHead` bound to a program: a ``StepProposal`` for its ``"token"`` site.

    Tokens the program's constraint forbids are masked when the program's own proposal is
    ``"locally_optimal"``, so the learned proposal keeps its support."""

    head: ProposalHead
    program: Generation

    def __call__(self, name: str, prior: Any, state: TokenState, t: Any) -> Categorical | None:
        if name != "token":
            return None
        if prior.features is None:
            raise TypeError("a learned proposal needs the decode's features: use an LM with decode_with_features")
        logits = prior.logits + self.head(prior.features, self.program.lm.output_embedding)
        allowed = self.program.allowed(state)
        if allowed is not None and self.program.proposal == "locally_optimal":
            logits = _masked_logits(logits, allowed)
        return Categorical(logits)


def with_twist(program: Generation, head: TwistHead) -> Generation:
    """``program`` steered by ``head`` (its LM's embedding bound): what objectives rebuild
    at every step so that only the head's arrays are differentiated."""
    return eqx.tree_at(lambda p: p.twist, program, head.twist(program.lm), is_leaf=lambda x: x is None)
