"""Infilling: a task whose exact posterior samples come for free.

:class:`Infilling` generates exactly ``n_infill`` tokens after a prompt and then observes a
fixed ``ending`` scored by the same LM after them::

    gamma(x) = p_LM(x_{1:K} | prompt) · p_LM(ending | prompt, x_{1:K}) · 1[no EOS in x]

Sampling ``K + E`` tokens from the LM and keeping the draws whose last ``E`` tokens equal
``ending`` gives prefixes that are *exact* draws of ``gamma / Z`` (:func:`infilling_task`):
the reference for the conditional-SMC upper bound (``ppl.inference.bidirectional_bounds``)
and the positives of contrastive twist learning, on a real LM.
"""

from __future__ import annotations

from collections import Counter
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from jaxtyping import Array, Float, Int

from ppl.distributions import prompt_cache, sample_logits
from ppl.generation import Generation, TokenState
from ppl.lm import LM


class Infilling(Generation):
    """``n_infill`` tokens after ``prompt``, then the observed ``ending`` (a factor, scored by
    ``lm`` through the particle's KV cache once its infill is complete; a particle that
    emits EOS first is killed). Keyword arguments (``twist``, ...) go to
    :class:`ppl.Generation`."""

    ending: Int[Array, " E"]

    def __init__(self, lm: LM, prompt: Any, n_infill: int, ending: Any, eos_token_id: int, **kwargs: Any):
        ending = jnp.asarray(ending, jnp.int32)
        if ending.ndim != 1 or ending.shape[0] < 1:
            raise ValueError(f"ending must be a non-empty 1-D array of token ids, got shape {list(ending.shape)}")
        room = int(jnp.shape(prompt)[0]) - 1 + n_infill + ending.shape[0]
        super().__init__(lm, prompt, n_infill, eos_token_id, max_len=room, **kwargs)
        self.ending = ending

    def step(self, state: TokenState, t: Int[Array, ""]) -> TokenState:
        new = super().step(state, t)
        completed = new.finished & ~state.finished
        log_ending = jax.lax.cond(
            jnp.any(completed), lambda s: self.ending_log_prob(s), lambda s: jnp.zeros(s.length.shape), new
        )
        numpyro.factor("ending", jnp.where(completed, jnp.where(new.ended_with_eos, -jnp.inf, log_ending), 0.0))
        return new

    def ending_log_prob(self, state: TokenState) -> Float[Array, " N"]:
        """``log p_LM(ending | prompt, tokens)`` for every row: ``E`` decodes on a copy of the
        cache (which holds all but the last token, ``state.last``)."""
        n = state.length.shape[0]
        feed = jnp.concatenate(
            [state.last[:, None], jnp.broadcast_to(self.ending[:-1], (n, self.ending.shape[0] - 1))], 1
        )

        def score(cache, inputs):
            token, target = inputs
            logits, cache = self.lm.decode(cache, token)
            return cache, jax.nn.log_softmax(logits)[:, target]

        _, log_probs = jax.lax.scan(score, state.cache, (feed.T, self.ending))
        return jnp.sum(log_probs, axis=0)


@partial(jax.jit, static_argnums=(2, 3))
def _sample(lm: LM, prompt: Int[Array, " P"], total: int, n: int, key: jax.Array) -> Int[Array, "n total"]:
    """``n`` ancestral samples of ``total`` tokens from ``lm`` after ``prompt`` (EOS not special)."""
    cache = prompt_cache(lm, prompt, prompt.shape[0] - 1 + total, n)

    def draw(carry, step_key):
        cache, last = carry
        logits, cache = lm.decode(cache, last)
        token = sample_logits(step_key, logits)
        return (cache, token), token

    _, tokens = jax.lax.scan(draw, (cache, jnp.full(n, prompt[-1])), jax.random.split(key, total))
    return tokens.T


class InfillingTask(NamedTuple):
    program: Infilling
    posterior: dict[str, Array]  # exact posterior trajectories, {"token": [S, n_infill + 1]}
    n_draws: int  # LM samples drawn to find them


def infilling_task(
    lm: LM,
    prompt: Any,
    n_infill: int,
    n_ending: int,
    eos_token_id: int,
    key: jax.Array,
    n_draws: int = 512,
    **kwargs: Any,
) -> InfillingTask:
    """Draw ``n_draws`` sequences of ``n_infill + n_ending`` tokens from ``lm`` (batched,
    without EOS); the most frequent ending becomes the observation and the prefixes of the
    draws that end with it are exact posterior samples of :class:`Infilling` (the choice of
    ending depends on the endings only, so given it those prefixes are i.i.d. posterior)."""
    total = n_infill + n_ending
    tokens = np.asarray(_sample(lm, jnp.asarray(prompt, jnp.int32), total, n_draws, key))
    complete = tokens[~np.any(tokens == eos_token_id, axis=1)]
    if len(complete) == 0:
        raise ValueError("every draw emitted EOS before the end; use a longer prompt or fewer tokens")
    ending, _ = Counter(tuple(row[n_infill:]) for row in complete).most_common(1)[0]
    prefixes = np.array([row[:n_infill] for row in complete if tuple(row[n_infill:]) == ending], np.int32)
    trajectories = np.concatenate([np.zeros((len(prefixes), 1), np.int32), prefixes], axis=1)
    program = Infilling(lm, prompt, n_infill, np.array(ending), eos_token_id, **kwargs)
    return InfillingTask(program, {"token": jnp.asarray(trajectories)}, n_draws)
