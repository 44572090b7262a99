"""The language model as NumPyro distributions.

- :class:`NextToken` is the next-token distribution ``p_LM(x_t | x_{<t})`` of every row of a
  particle batch. Building it runs the LM's decode step, so the distribution carries the
  updated KV cache (``.cache``) for the program's next state.
- :class:`LanguageModel` is the distribution of a whole continuation of a prompt, with
  ``log_prob`` the teacher-forced sum ``sum_t log p_LM(x_t | c, x_{<t})``, so an LM can sit
  inside an ordinary NumPyro model beside continuous latents.

Both work with any model following :class:`ppl.lm.LM`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpyro.distributions as dist
from jaxtyping import Array, Bool, Float, Int
from numpyro.distributions import constraints

from ppl.lm import LM, Cache


class NextToken(dist.CategoricalLogits):
    """``p_LM(next token | each row's history)``: a categorical over the vocabulary, batch ``[B]``.

    Args:
        lm: the language model.
        cache: its KV cache holding each row's history except the last token.
        last_tokens: ``[B]`` each row's last token, not yet in the cache; building the
            distribution feeds it (one batched decode) and keeps the new cache in ``.cache``.
        active: ``[B]`` rows to advance (default all); the others keep their history.
    """

    def __init__(self, lm: LM, cache: Cache, last_tokens: Int[Array, " B"], active: Bool[Array, " B"] | None = None):
        logits, self.cache = lm.decode(cache, last_tokens, active)
        super().__init__(logits=logits)


def _prompt_cache(lm: LM, prompt: Int[Array, " P"], max_len: int) -> Cache:
    """A batch-1 cache holding all of ``prompt`` but its last token."""
    if prompt.shape[0] == 1:
        return lm.init_cache(1, max_len)
    return lm.prefill(prompt[:-1], max_len)[1]


def check_prompt(prompt: Any, max_new_tokens: int, max_len: int | None = None) -> int:
    """Validate a prompt against a token budget; return the cache length it needs."""
    length = int(jnp.shape(prompt)[0]) if jnp.ndim(prompt) == 1 else -1
    if length < 0:
        raise ValueError(f"prompt must be a 1-D array of token ids, got shape {jnp.shape(prompt)}")
    if length == 0:
        raise ValueError("prompt is empty: give at least one token (e.g. the model's BOS token)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    needed = length - 1 + max_new_tokens
    if max_len is not None and needed > max_len:
        raise ValueError(
            f"prompt of {length} tokens plus max_new_tokens={max_new_tokens} needs a cache of "
            f"{needed} positions, longer than the buffer max_len={max_len}"
        )
    return needed if max_len is None else max_len


class LanguageModel(dist.Distribution):
    """Continuations of ``prompt``: ``x = (x_1..x_T)`` drawn token by token from ``lm``.

    A sequence stops at ``eos_token_id`` (included in ``x``); every position after it holds
    ``eos_token_id`` too and is not scored. Without an EOS in the first ``max_new_tokens``
    the continuation is cut there, so this is the distribution of the first ``T`` tokens of
    the LM's output — it sums to one over ``[T]`` arrays in that canonical form.
    ``log_prob(x) = sum_{t <= first EOS} log p_LM(x_t | prompt, x_{<t})`` (teacher forcing).
    """

    arg_constraints: dict = {}
    pytree_data_fields = ("lm", "prompt")
    pytree_aux_fields = ("max_new_tokens", "eos_token_id", "max_len")

    def __init__(self, lm: LM, prompt: Int[Array, " P"], max_new_tokens: int, eos_token_id: int, *, validate_args=None):
        self.max_len = check_prompt(prompt, max_new_tokens)
        self.lm, self.prompt = lm, jnp.asarray(prompt, jnp.int32)
        self.max_new_tokens, self.eos_token_id = max_new_tokens, eos_token_id
        super().__init__(batch_shape=(), event_shape=(max_new_tokens,), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.lm.vocab_size - 1), 1)

    def _run(self, key: jax.Array | None, forced: Int[Array, " T"] | None):
        """Step through the continuation; sample it (``key``) or score ``forced``."""
        cache = _prompt_cache(self.lm, self.prompt, self.max_len)

        def one(carry, inputs):
            cache, last, ended = carry
            step_key, forced_token = inputs
            logits, cache = self.lm.decode(cache, last[None])
            log_probs = jax.nn.log_softmax(logits[0])
            token = forced_token if forced is not None else jax.random.categorical(step_key, log_probs)
            token = jnp.where(ended, self.eos_token_id, token)
            score = jnp.where(ended, 0.0, log_probs[token])
            return (cache, token, ended | (token == self.eos_token_id)), (token, score)

        keys = jax.random.split(key if key is not None else jax.random.key(0), self.max_new_tokens)
        forced = forced if forced is not None else jnp.zeros(self.max_new_tokens, jnp.int32)
        start = (cache, self.prompt[-1], jnp.zeros((), bool))
        _, (tokens, scores) = jax.lax.scan(one, start, (keys, forced))
        return tokens, jnp.sum(scores)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Int[Array, "... T"]:
        keys = jax.random.split(key, math.prod(sample_shape))
        tokens = jax.vmap(lambda k: self._run(k, None)[0])(keys)
        return tokens.reshape(sample_shape + (self.max_new_tokens,))

    def log_prob(self, value: Int[Array, "... T"]) -> Float[Array, "..."]:
        flat = jnp.reshape(value, (-1, self.max_new_tokens)).astype(jnp.int32)
        # A token after the first EOS must itself be EOS: anything else has probability 0.
        ended_before = jnp.cumsum(flat == self.eos_token_id, axis=1) - (flat == self.eos_token_id) > 0
        canonical = jnp.all(~ended_before | (flat == self.eos_token_id), axis=1)
        scores = jax.vmap(lambda row: self._run(None, row)[1])(flat)
        scores = jnp.where(canonical, scores, -jnp.inf)
        return scores.reshape(jnp.shape(value)[:-1])
