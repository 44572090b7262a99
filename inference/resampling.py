"""Resampling schemes: draw ``n`` ancestor indices with ``E[count_i] = n · w_i``.

Each scheme is a pure, static-shape function ``(key, log_weights[N], n) -> indices[n]``
(int32, also under ``jax_enable_x64``) usable inside ``jit``/``vmap``. All four are unbiased, which is what keeps SMC's ``log_z``
unbiased; they differ in variance (systematic ≲ stratified ≲ residual ≲ multinomial, for
typical weights). The weights need not be normalised, but at least one must be finite.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

Resampler = Callable[[PRNGKeyArray, Float[Array, " N"], int], Int[Array, " n"]]


def _inverse_cdf(log_weights: Float[Array, " N"], uniforms: Float[Array, " n"]) -> Int[Array, " n"]:
    """Indices ``i`` with ``cdf[i-1] <= u < cdf[i]`` for sorted or unsorted ``u`` in [0, 1]."""
    probabilities = jax.nn.softmax(log_weights)
    cdf = jnp.cumsum(probabilities)
    # Rounding can leave cdf[-1] below a uniform (and (n-1+U)/n can round up to 1): such a u
    # belongs to the last particle of positive weight, never to a zero-weight one after it.
    last_alive = log_weights.shape[0] - 1 - jnp.argmax(probabilities[::-1] > 0)
    return jnp.minimum(jnp.searchsorted(cdf, uniforms, side="right"), last_alive).astype(jnp.int32)


def multinomial(key: PRNGKeyArray, log_weights: Float[Array, " N"], n: int) -> Int[Array, " n"]:
    """``n`` independent draws from the categorical distribution of the weights."""
    return jax.random.categorical(key, log_weights, shape=(n,)).astype(jnp.int32)


def stratified(key: PRNGKeyArray, log_weights: Float[Array, " N"], n: int) -> Int[Array, " n"]:
    """One independent uniform in each of the strata ``[k/n, (k+1)/n)``."""
    uniforms = (jnp.arange(n) + jax.random.uniform(key, (n,))) / n
    return _inverse_cdf(log_weights, uniforms)


def systematic(key: PRNGKeyArray, log_weights: Float[Array, " N"], n: int) -> Int[Array, " n"]:
    """A single uniform shifted into each stratum ``[k/n, (k+1)/n)``."""
    uniforms = (jnp.arange(n) + jax.random.uniform(key, ())) / n
    return _inverse_cdf(log_weights, uniforms)


def residual(key: PRNGKeyArray, log_weights: Float[Array, " N"], n: int) -> Int[Array, " n"]:
    """``floor(n w_i)`` copies of each particle, the remainder drawn multinomially from the
    residual weights ``n w_i - floor(n w_i)``."""
    expected = n * jax.nn.softmax(log_weights)
    copies = jnp.floor(expected).astype(jnp.int32)
    n_deterministic = jnp.sum(copies)
    deterministic = jnp.repeat(jnp.arange(log_weights.shape[0]), copies, total_repeat_length=n)
    residual_log_weights = jnp.log(jnp.maximum(expected - copies, 0.0))
    # If the copies already fill all n slots the residual draws are never used; keep the
    # categorical well defined anyway.
    residual_log_weights = jnp.where(n_deterministic < n, residual_log_weights, jnp.zeros_like(residual_log_weights))
    random_draws = jax.random.categorical(key, residual_log_weights, shape=(n,))
    return jnp.where(jnp.arange(n) < n_deterministic, deterministic, random_draws).astype(jnp.int32)


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(resampling: str | Resampler) -> Resampler:
    """Look a scheme up by name (a callable is returned as is)."""
    if callable(resampling):
        return resampling
    if resampling not in RESAMPLERS:
        raise ValueError(f"unknown resampling scheme {resampling!r}; choose one of {sorted(RESAMPLERS)}")
    return RESAMPLERS[resampling]
