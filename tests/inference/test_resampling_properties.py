"""Property-based tests of the resamplers and the weight algebra around them, on arbitrary
log-weights: ``-inf`` entries, a single survivor, ``N = 1``, a dynamic range of thousands of
nats. Hypothesis runs under the derandomised ``ppl`` profile (tests/conftest.py), so the
examples, and the PRNG keys derived from them, are the same on every run.

Particle counts are drawn from a few sizes so that each (scheme, N) compiles once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl.inference import effective_sample_size
from ppl.inference.resampling import RESAMPLERS

SIZES = [1, 2, 5, 64]
REPLICATES = 1000  # one shape per (scheme, N): every property shares the compilation
SCHEMES = sorted(RESAMPLERS)


@st.composite
def log_weights(draw, sizes=SIZES) -> np.ndarray:
    """float32 log-weights, at least one finite: moderate values, huge ones (both signs) and -inf."""
    n = draw(st.sampled_from(sizes))
    value = st.one_of(
        st.floats(-5.0, 5.0, width=32),
        st.floats(-3000.0, 3000.0, width=32),
        st.just(-math.inf),
    )
    weights = np.array(draw(st.lists(value, min_size=n, max_size=n)), np.float32)
    if not np.isfinite(weights).any():
        weights[draw(st.integers(0, n - 1))] = draw(st.floats(-3000.0, 3000.0, width=32))
    return weights


def normalised(weights: np.ndarray) -> np.ndarray:
    w = np.exp(weights.astype(np.float64) - weights.max())
    return w / w.sum()


def _counts(resampler):
    def counts(keys, lw):
        n = lw.shape[0]
        ancestors = jax.vmap(lambda key: resampler(key, lw, n))(keys)
        in_range = jnp.all((ancestors >= 0) & (ancestors < n))
        return in_range, jax.vmap(lambda a: jnp.bincount(a, length=n))(ancestors)

    return jax.jit(counts)


_COUNTS = {name: _counts(f) for name, f in RESAMPLERS.items()}


def offspring(scheme: str, weights: np.ndarray, seed: int, replicates: int = REPLICATES) -> np.ndarray:
    """``[replicates, N]`` offspring counts of ``replicates`` independent draws of N ancestors."""
    keys = jax.random.split(jax.random.key(seed), replicates)
    in_range, counts = _COUNTS[scheme](keys, jnp.asarray(weights))
    assert bool(in_range), "ancestor out of range"
    return np.asarray(counts)


@settings(max_examples=20)
@given(st.sampled_from(SCHEMES), log_weights(), st.integers(0, 2**31 - 1))
def test_ancestors_in_range_and_never_of_zero_weight(scheme, weights, seed):
    counts = offspring(scheme, weights, seed)
    assert (counts[:, weights == -np.inf] == 0).all(), "a -inf particle was resampled"
    assert (counts.sum(axis=1) == weights.shape[0]).all()


@settings(max_examples=15)
@given(st.sampled_from(SCHEMES), log_weights(), st.integers(0, 2**31 - 1))
def test_offspring_count_means_are_n_w(scheme, weights, seed):
    """E[count_i] = N w_i (what keeps SMC's evidence unbiased). Over R = 1000 replicates the
    mean's standard error is at most sqrt(N w (1 - w) / R) (the multinomial variance; the other
    schemes are lower); 6 standard errors plus float32 rounding of w (1e-5 N) fails by chance
    with probability ~1e-9 per count."""
    n = weights.shape[0]
    w = normalised(weights)
    mean = offspring(scheme, weights, seed).mean(axis=0)
    tolerance = 6 * np.sqrt(n * w * (1 - w) / REPLICATES) + 1e-5 * n
    np.testing.assert_array_less(np.abs(mean - n * w), tolerance + 1e-12)


def _bounds(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """floor / ceil of N w_i, widened where N w_i is within float32 rounding of an integer."""
    expected = weights.shape[0] * normalised(weights)
    slack = 1e-4 * weights.shape[0]
    return np.floor(expected + slack) - (np.abs(expected - np.round(expected)) < slack), np.ceil(expected - slack) + (
        np.abs(expected - np.round(expected)) < slack
    )


@settings(max_examples=25)
@given(log_weights(), st.integers(0, 2**31 - 1))
def test_systematic_offspring_between_floor_and_ceil(weights, seed):
    """One shared uniform: particle i gets floor(N w_i) or ceil(N w_i) copies, never more or less."""
    low, high = _bounds(weights)
    counts = offspring("systematic", weights, seed)
    assert ((counts >= low) & (counts <= high)).all()


@settings(max_examples=25)
@given(log_weights(), st.integers(0, 2**31 - 1))
def test_stratified_offspring_within_one_of_floor_and_ceil(weights, seed):
    """Independent uniforms per stratum: a particle's interval of width N w_i overlaps at most
    ceil(N w_i) + 1 strata and contains floor(N w_i) - 1 whole ones, so counts lie in
    floor - 1 .. ceil + 1; a particle whose interval covers whole strata only (N w_i an
    integer, e.g. a single survivor) gets exactly that many."""
    low, high = _bounds(weights)
    counts = offspring("stratified", weights, seed)
    assert ((counts >= low - 1) & (counts <= high + 1)).all()
    survivors = np.isfinite(weights)
    if survivors.sum() == 1:
        assert (counts[:, survivors] == weights.shape[0]).all()


@settings(max_examples=25)
@given(log_weights(), st.integers(0, 2**31 - 1))
def test_residual_keeps_floor_n_w_copies(weights, seed):
    low, _ = _bounds(weights)
    counts = offspring("residual", weights, seed)
    assert (counts >= low).all()
    # at most one extra copy per residual draw: N - sum(floor) of them
    assert (counts - low <= weights.shape[0] - low.sum()).all()


@settings(max_examples=30)
@given(log_weights(), st.floats(-1000.0, 1000.0, width=32))
def test_ess_identities(weights, shift):
    """ESS = (sum w)^2 / sum w^2 lies in [1, N], is invariant to a common shift of the
    log-weights, is N for equal weights and 1 for a single survivor."""
    n = weights.shape[0]
    ess = float(effective_sample_size(jnp.asarray(weights)))
    w = normalised(weights)
    assert 1 - 1e-4 <= ess <= n * (1 + 1e-4)
    np.testing.assert_allclose(ess, 1 / np.sum(w**2), rtol=1e-4)
    shifted = float(effective_sample_size(jnp.asarray(weights) + shift))
    np.testing.assert_allclose(shifted, ess, rtol=1e-4)
    np.testing.assert_allclose(float(effective_sample_size(jnp.full((n,), shift))), n, rtol=1e-5)
    if np.isfinite(weights).sum() == 1:
        assert ess == 1.0
    assert float(effective_sample_size(jnp.full((n,), -jnp.inf))) == 0.0


_RESAMPLE: dict = {}


def _resample(n: int):
    """A jitted ``kernel.resample`` of an HMM program's state with ``n`` particles."""
    from ppl.inference import kernel
    from ppl.models.toy import random_hmm

    if not _RESAMPLE:
        _RESAMPLE["program"] = random_hmm(jax.random.key(7), n_states=3, n_obs_symbols=4, n_steps=4).program()
    program = _RESAMPLE["program"]
    if n not in _RESAMPLE:
        _RESAMPLE[n] = jax.jit(lambda key: kernel.init(program, key, n))(jax.random.key(0))
    if "step" not in _RESAMPLE:
        step = lambda key, state: kernel.resample(program, key, state, resampler=RESAMPLERS["systematic"])[0]  # noqa: E731
        _RESAMPLE["step"] = jax.jit(step)
    return _RESAMPLE["step"], _RESAMPLE[n]


@settings(max_examples=15)
@given(log_weights(), st.floats(-100.0, 100.0, width=32), st.integers(0, 2**31 - 1))
def test_resampling_banks_log_mean_exp(weights, prefix, seed):
    """Resampling moves ``logmeanexp(log_weights)`` into ``log_z_prefix`` and zeroes the weights,
    so the running evidence ``log_z_prefix + logmeanexp(log_weights)`` is unchanged, finite
    whenever one weight is; ``logmeanexp`` of equal values is that value. (The banking does not
    depend on the scheme; systematic stands for all.)"""
    n = weights.shape[0]
    resample, state = _resample(n)
    state = state._replace(log_weights=jnp.asarray(weights), log_z_prefix=jnp.asarray(prefix, jnp.float32))
    before = prefix + float(jax.nn.logsumexp(weights.astype(np.float64))) - math.log(n)
    after = resample(jax.random.key(seed), state)
    assert (np.asarray(after.log_weights) == 0).all()
    np.testing.assert_allclose(float(after.log_z_prefix), before, rtol=1e-5, atol=1e-3)
    assert np.isfinite(float(after.log_z_prefix))
    np.testing.assert_allclose(
        float(jax.nn.logsumexp(jnp.full((n,), prefix))) - math.log(n), prefix, rtol=1e-6, atol=1e-4
    )


def test_ess_is_exact_for_large_log_weights():
    """Regression: ESS was computed from uncentred log-weights, so equal weights at log w = 256
    gave 1.99994 instead of 2 (float32 cancellation in 2 lse(w) - lse(2w))."""
    assert float(effective_sample_size(jnp.full((2,), 256.0))) == 2.0
    assert float(effective_sample_size(jnp.array([-3000.0, -3000.0, -jnp.inf]))) == 2.0
