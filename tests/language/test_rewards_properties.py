"""Property-based tests of :func:`ppl.rewards.incremental`: for any sequence of potential
values, including ``-inf`` and NaN, the per-step increments sum to the stated target
(module docstring of ``ppl.rewards``): ``log psi_T`` (ratio), ``sum_t log psi_t`` (product),
``min_t log psi_t`` (process reward, min), with ``-inf`` absorbing and a NaN reported once.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ppl.rewards import incremental, process_reward

VALUE = st.one_of(st.floats(-50.0, 50.0, width=32), st.sampled_from([-math.inf, math.nan, 0.0]))
RULES = ["ratio", "product", "min"]


def weighting(rule: str):
    """An ``Incremental`` whose potential returns row ``t = lengths[0]`` of a value table."""

    def potential(table):
        return lambda tokens, lengths, done: table[lengths[0]]

    if rule == "min":
        return lambda table: incremental(process_reward(potential(table), "min"))
    return lambda table: incremental(potential(table), rule)


@jax.jit
def _run_all(table):
    """Increments ``[rule, T, N]`` of each rule on the value table ``[T, N]``."""
    n = table.shape[1]
    out = []
    for rule in RULES:
        weights = weighting(rule)(table)

        def step(carry, t):
            carry, increment = weights.update(
                carry, jnp.zeros((n, 1), jnp.int32), jnp.full((n,), t), jnp.zeros(n, bool)
            )
            return carry, increment

        _, increments = jax.lax.scan(step, weights.init(n), jnp.arange(table.shape[0]))
        out.append(increments)
    return jnp.stack(out)


def expected_total(values: np.ndarray, rule: str) -> float:
    """The target's log-factor for one particle's value sequence, in float64."""
    for v in values:
        if math.isnan(v):
            return math.nan  # reported as a NaN increment at that step
        if v == -math.inf:
            return -math.inf
    if rule == "ratio":
        return float(values[-1])
    if rule == "product":
        return float(np.sum(values, dtype=np.float64))
    return float(np.min(values))


@settings(max_examples=100)
@given(st.integers(1, 6).flatmap(lambda t: st.lists(st.lists(VALUE, min_size=4, max_size=4), min_size=t, max_size=t)))
def test_increments_telescope_to_the_target(rows):
    table = np.array(rows, np.float32)  # [T, N=4]
    padded = np.full((6, 4), 0.0, np.float32)  # one compiled shape; only the first T steps are read
    padded[: len(rows)] = table
    increments = np.asarray(_run_all(jnp.asarray(padded)))[:, : len(rows)].astype(np.float64)
    for rule_index, rule in enumerate(RULES):
        for i in range(4):
            column = increments[rule_index, :, i]
            expected = expected_total(table[:, i], rule)
            if math.isnan(expected):
                # exactly one NaN increment (the step it appears), zeros after it
                first = int(np.argmax(np.isnan(table[:, i])))
                assert np.isnan(column[first]) and not np.isnan(np.delete(column, first)).any()
                assert (column[first + 1 :] == 0).all()
            elif expected == -math.inf:
                first = int(np.argmax(table[:, i] == -np.inf))
                assert column[first] == -np.inf and (column[first + 1 :] == 0).all()
                assert column.sum() == -np.inf
            else:
                total = column.sum()
                scale = np.abs(table[:, i]).sum() + 1
                assert abs(total - expected) <= 1e-5 * scale, (rule, table[:, i], column)
