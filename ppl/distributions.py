"""The language model as NumPyro distributions.

- :class:`NextToken` is the next-token distribution ``p_LM(x_t | x_{<t})`` of every row of a
  particle batch. Building it runs the LM's decode step, so the distribution carries the
  updated KV cache (``.cache``) for the program's next state.
- :class:`LanguageModel` is the distribution of a whole continuation of a prompt, with
  ``log_prob`` the teacher-forced sum ``sum_t log p_LM(x_t | c, x_{<t})``, so an LM can sit
  inside an ordinary NumPyro model beside continuous latents.

Both work with any model following :class:`ppl.lm.LM`. Tokens are drawn by
:func:`sample_logits` (exact inverse CDF, one uniform per row), which
:class:`Categorical` — NumPyro's ``CategoricalLogits`` otherwise — and ``NextToken`` use.
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


def sample_logits(key: jax.Array, logits: Float[Array, "*B V"], block: int = 256) -> Int[Array, "*B"]:
    """One exact draw from ``softmax(logits)`` per row, by inverse CDF in two levels.

    ``jax.random.categorical`` adds Gumbel noise to every logit: for a batch of 64 rows over a
    49k vocabulary that is 3M random numbers a step, about a quarter of a CPU decode step.
    Here each row takes one uniform: it picks a block of ``block`` tokens by the blocks'
    cumulative mass, then a token inside it by the block's own cumulative mass. Two short
    float32 prefix sums keep the rounding error near float32's epsilon relative to the mass
    summed, far below what any sample size can detect; a zero-probability token (logit
    ``-inf``) is never drawn. A row with no finite logit returns token 0.
    """
    vocab = logits.shape[-1]
    batch = logits.shape[:-1]
    n_blocks = -(-vocab // block)
    padded = jnp.pad(logits, [(0, 0)] * len(batch) + [(0, n_blocks * block - vocab)], constant_values=-jnp.inf)
    top = jnp.max(padded, axis=-1, keepdims=True)
    mass = jnp.exp(padded - jnp.where(jnp.isfinite(top), top, 0.0)).reshape(batch + (n_blocks, block))

    def invert(masses: Float[Array, "*B K"], target: Float[Array, "*B"]) -> tuple[Int[Array, "*B"], Float[Array, "*B"]]:
        """The first index whose cumulative mass exceeds ``target`` (rounding can push the
        target past the total: the last index with mass then takes it), and the target's
        remainder inside that index's mass."""
        cumulative = jnp.cumsum(masses, axis=-1)
        index = jnp.sum(cumulative <= target[..., None], axis=-1)
        last_positive = masses.shape[-1] - 1 - jnp.argmax(jnp.flip(masses > 0, axis=-1), axis=-1)
        index = jnp.minimum(index, last_positive)
        below = jnp.take_along_axis(cumulative - masses, index[..., None], axis=-1)[..., 0]
        return index, target - below

    block_mass = jnp.sum(mass, axis=-1)
    target = jax.random.uniform(key, batch) * jnp.sum(block_mass, axis=-1)
    chosen, target = invert(block_mass, target)
    inside = jnp.take_along_axis(mass, chosen[..., None, None], axis=-2)[..., 0, :]
    offset, _ = invert(inside, target)
    return jnp.where(jnp.isfinite(top[..., 0]), chosen * block + offset, 0).astype(jnp.int32)


class Categorical(dist.CategoricalLogits):
    """NumPyro's ``CategoricalLogits`` drawing with :func:`sample_logits` (the same
    distribution, one uniform per row instead of Gumbel noise on every category)."""

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Int[Array, ...]:
        logits = jnp.broadcast_to(self.logits, sample_shape + self.logits.shape)
        return sample_logits(key, logits)


class NextToken(Categorical):
    """``p_LM(next token | each row's history)``: a categorical over the vocabulary, batch ``[B]``.

    Args:
        lm: the language model.
        cache: its KV cache holding each row's history except the last token.
        last_tokens: ``[B]`` each row's last token, not yet in the cache; building the
            distribution feeds it (one batched decode) and keeps the new cache in ``.cache``.
        active: ``[B]`` rows to advance (default all); the others keep their history.

    With a :class:`ppl.lm.FeatureLM` the same decode also keeps each row's features (the last
    hidden state, ``[B, hidden_size]``) in ``.features``, for learned twists and proposals
    (``ppl.models.heads``); otherwise ``.features`` is ``None``.
    """

    def __init__(self, lm: LM, cache: Cache, last_tokens: Int[Array, " B"], active: Bool[Array, " B"] | None = None):
        if hasattr(lm, "decode_with_features"):
            logits, self.features, self.cache = lm.decode_with_features(cache, last_tokens, active)
        else:
            (logits, self.cache), self.features = lm.decode(cache, last_tokens, active), None
        super().__init__(logits=logits)


def prompt_cache(
    lm: LM,
    prompt: Int[Array, " P"],
    max_len: int,
    n_particles: int | None = None,
    length: Int[Array, ""] | None = None,
) -> Cache:
    """A cache holding all of ``prompt`` but its last token, prefilled once.

    The last token is what the first :class:`NextToken` feeds (``last_tokens``), so a
    program's ``init`` is typically ``cache = prompt_cache(lm, prompt, max_len, n)`` with
    ``last = prompt[-1]`` for every particle. With ``n_particles`` the batch-1 cache is
    broadcast to that many rows (the prompt is computed once and shared).

    ``length`` (may be traced) is the real length of a right-padded ``prompt``: the padding
    is prefilled too (attention is causal, so it changes nothing before it) and then cut off
    (:meth:`ppl.lm.ParticleCache.truncate`), so the cache holds ``prompt[:length - 1]`` and
    the next token goes to position ``length - 1``, as for the unpadded prompt. This is what
    lets prompts of different lengths share one shape (a batch of prompts).
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    cache = lm.init_cache(1, max_len) if prompt.shape[0] == 1 else lm.prefill(prompt[:-1], max_len)[1]
    if length is not None:
        cache = cache.truncate(jnp.asarray(length, jnp.int32) - 1)
    return cache if n_particles is None else lm.broadcast(cache, n_particles)


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
    ``log_prob(x) = sum_{t <= first EOS} log p_LM^tau(x_t | prompt, x_{<t})`` (teacher
    forcing), where ``p_LM^tau = softmax(logits / temperature)`` is the tempered next-token
    distribution (``temperature = 1``: the LM itself; ``-> 0``: greedy decoding).

    ``temperature`` is a pytree data field, like the prompt and the weights: it may be a
    traced scalar, so a NumPyro model can put a prior on it and NUTS can differentiate
    ``log_prob`` with respect to it.
    """

    arg_constraints: dict = {}
    pytree_data_fields = ("lm", "prompt", "temperature")
    pytree_aux_fields = ("max_new_tokens", "eos_token_id", "max_len")

    def __init__(
        self,
        lm: LM,
        prompt: Int[Array, " P"],
        max_new_tokens: int,
        eos_token_id: int,
        *,
        temperature: float | Float[Array, ""] = 1.0,
        validate_args=None,
    ):
        self.max_len = check_prompt(prompt, max_new_tokens)
        if jnp.ndim(temperature) != 0:
            raise ValueError(f"temperature must be a scalar, got shape {jnp.shape(temperature)}")
        # A traced temperature (under NUTS, jit or grad) is checked by whoever chose its value.
        if not isinstance(temperature, jax.core.Tracer) and not float(temperature) > 0:
            raise ValueError(f"temperature must be positive, got {float(temperature)}")
        self.lm, self.prompt = lm, jnp.asarray(prompt, jnp.int32)
        self.temperature = jnp.asarray(temperature, jnp.result_type(float))
        self.max_new_tokens, self.eos_token_id = max_new_tokens, eos_token_id
        super().__init__(batch_shape=(), event_shape=(max_new_tokens,), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.lm.vocab_size - 1), 1)

    def _run(self, key: jax.Array | None, forced: Int[Array, " T"] | None):
        """Step through the continuation; sample it (``key``) or score ``forced``."""
        cache = prompt_cache(self.lm, self.prompt, self.max_len)

        def one(carry, inputs):
            cache, last, ended = carry
            step_key, forced_token = inputs
            logits, cache = self.lm.decode(cache, last[None])
            log_probs = jax.nn.log_softmax(logits[0] / self.temperature)
            token = sample_logits(step_key, log_probs) if forced is None else forced_token
            token = jnp.where(ended, self.eos_token_id, token)
            score = jnp.where(ended, 0.0, log_probs[token])
            return (cache, token, ended | (token == self.eos_token_id)), (token, score)

        keys = jax.random.split(key if key is not None else jax.random.key(0), self.max_new_tokens)
        # A separate name: ``one`` reads ``forced`` when the scan traces it, after this line.
        teacher = jnp.zeros(self.max_new_tokens, jnp.int32) if forced is None else forced
        start = (cache, self.prompt[-1], jnp.zeros((), bool))
        _, (tokens, scores) = jax.lax.scan(one, start, (keys, teacher))
        return tokens, jnp.sum(scores)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Int[Array, "... T"]:
        keys = jax.random.split(key, math.prod(sample_shape))
        tokens = jax.vmap(lambda k: self._run(k, None)[0])(keys)
        return tokens.reshape(sample_shape + (self.max_new_tokens,))

    def log_prob(self, value: Int[Array, "... T"]) -> Float[Array, ...]:
        flat = jnp.reshape(value, (-1, self.max_new_tokens)).astype(jnp.int32)
        # A token after the first EOS must itself be EOS: anything else has probability 0.
        ended_before = jnp.cumsum(flat == self.eos_token_id, axis=1) - (flat == self.eos_token_id) > 0
        canonical = jnp.all(~ended_before | (flat == self.eos_token_id), axis=1)
        scores = jax.vmap(lambda row: self._run(None, row)[1])(flat)
        scores = jnp.where(canonical, scores, -jnp.inf)
        return scores.reshape(jnp.shape(value)[:-1])
