"""Tests of ``ppl.rewards``: likelihood wrappers, incremental weighting and the host adapter.

(This folder is ``tests/language`` rather than ``tests/ppl``: without ``__init__.py`` files a
``tests/ppl`` folder would shadow the ``ppl`` package when bare ``pytest`` puts ``tests/`` on
``sys.path``.)
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl.rewards import (
    HostPotential,
    bernoulli_reward,
    exp_reward,
    host_potential,
    incremental,
    process_reward,
    sum_potentials,
)

N, T = 3, 5
TOKENS = jnp.array([[3, 1, 4, 1, 5], [9, 2, 6, 5, 3], [5, 8, 9, 7, 9]], jnp.int32)


def prefix_sum(tokens, lengths, done):
    """A prefix-dependent log potential: 0.1 · (sum of the tokens so far) - 2 (done adds 1)."""
    mask = jnp.arange(tokens.shape[1]) < lengths[:, None]
    return 0.1 * jnp.sum(jnp.where(mask, tokens, 0), axis=1) - 2.0 + done


def table_potential(table: np.ndarray):
    """``log psi_t = table[i, t]`` for particle ``i`` after ``t + 1`` tokens."""
    table = jnp.asarray(table, jnp.float32)
    return lambda tokens, lengths, done: table[jnp.arange(table.shape[0]), lengths - 1]


def scan_steps(weighting, steps: int = T, tokens=TOKENS):
    """Drive ``weighting`` over steps 0..steps-1 (prefix lengths 1..steps, done at the last)
    in one ``lax.scan``; return the increments ``[steps, N]`` and the final carry."""
    n = tokens.shape[0]

    def step(carry, t):
        lengths = jnp.full((n,), t + 1, jnp.int32)
        done = jnp.full((n,), t == steps - 1)
        return weighting.update(carry, tokens, lengths, done)

    carry, increments = jax.lax.scan(step, weighting.init(n), jnp.arange(steps))
    return increments, carry


def run_steps(weighting, steps: int = T, tokens=TOKENS):
    increments, carry = scan_steps(weighting, steps, tokens)
    return np.asarray(increments), carry


def log_psi_at(potential, t, steps=T):
    lengths = jnp.full((N,), t + 1, jnp.int32)
    return np.asarray(potential(TOKENS, lengths, jnp.full((N,), t == steps - 1)))


# --- incremental weighting -------------------------------------------------------------------


def test_ratio_weighting_telescopes_to_final_potential():
    increments, carry = run_steps(incremental(prefix_sum, "ratio"))
    final = log_psi_at(prefix_sum, T - 1)
    np.testing.assert_allclose(increments.sum(axis=0), final, rtol=1e-6)
    np.testing.assert_allclose(increments[0], log_psi_at(prefix_sum, 0), rtol=1e-6)
    np.testing.assert_allclose(carry.aggregate, final, rtol=1e-6)


def test_product_weighting_sums_every_prefix():
    increments, _ = run_steps(incremental(prefix_sum, "product"))
    for t in range(T):
        np.testing.assert_allclose(increments[t], log_psi_at(prefix_sum, t), rtol=1e-6)
    expected = sum(log_psi_at(prefix_sum, t) for t in range(T))
    np.testing.assert_allclose(increments.sum(axis=0), expected, rtol=1e-6)


def test_default_weighting_is_ratio():
    assert incremental(prefix_sum).aggregate == "last"


STEP_VALUES = np.array([[-1.0, -3.0, -2.0, -0.5], [0.0, -0.25, -4.0, -1.0], [-2.0, -1.0, -1.0, -1.5]])


@pytest.mark.parametrize(
    "aggregate, expected",
    [
        ("last", STEP_VALUES[:, -1]),
        ("product", STEP_VALUES.sum(axis=1)),
        ("min", STEP_VALUES.min(axis=1)),
    ],
)
def test_process_reward_aggregates(aggregate, expected):
    steps = STEP_VALUES.shape[1]
    increments, carry = run_steps(incremental(process_reward(table_potential(STEP_VALUES), aggregate)), steps)
    np.testing.assert_allclose(increments.sum(axis=0), expected, rtol=1e-6)
    np.testing.assert_allclose(carry.aggregate, expected, rtol=1e-6)


def test_min_increments_are_drops_of_the_running_min():
    increments, _ = run_steps(
        incremental(process_reward(table_potential(STEP_VALUES[:1]), "min")), 4, tokens=TOKENS[:1]
    )
    np.testing.assert_allclose(increments[:, 0], [-1.0, -2.0, 0.0, 0.0])


DEAD_VALUES = np.array([[-1.0, -np.inf, 0.0, -np.inf, 2.0], [0.5, 0.5, -np.inf, 3.0, 1.0]])


@pytest.mark.parametrize("aggregate", ["last", "product", "min"])
def test_minus_infinity_is_absorbing_and_never_nan(aggregate):
    weighting = incremental(process_reward(table_potential(DEAD_VALUES), aggregate))
    increments, carry = run_steps(weighting, 5, tokens=TOKENS[:2])
    assert not np.isnan(increments).any()
    np.testing.assert_array_equal(increments[:, 0], [-1.0, -np.inf, 0.0, 0.0, 0.0])
    assert increments[2, 1] == -np.inf and (increments[3:, 1] == 0).all()
    np.testing.assert_array_equal(increments.sum(axis=0), [-np.inf, -np.inf])
    np.testing.assert_array_equal(carry.aggregate, [-np.inf, -np.inf])


def test_nan_potential_is_reported_once_then_dead():
    values = np.array([[0.0, np.nan, 1.0, 2.0]])
    increments, carry = run_steps(incremental(table_potential(values)), 4, tokens=TOKENS[:1])
    assert np.isnan(increments[1, 0])  # the SMC loop sees it, flags nan_weights and kills
    np.testing.assert_array_equal(increments[[0, 2, 3], 0], [0.0, 0.0, 0.0])
    assert carry.aggregate[0] == -np.inf


def test_incremental_refuses_a_weighting_that_contradicts_the_aggregate():
    with pytest.raises(ValueError, match="aggregate='min'"):
        incremental(process_reward(prefix_sum, "min"), "product")
    assert incremental(process_reward(prefix_sum, "product"), "product").aggregate == "product"
    with pytest.raises(ValueError, match="weighting"):
        incremental(prefix_sum, "twisted")


# --- likelihood wrappers ---------------------------------------------------------------------


def constant(values):
    values = jnp.asarray(values, jnp.float32)
    return lambda tokens, lengths, done: values


LENGTHS = jnp.array([1, 2, 3])
DONE = jnp.zeros((3,), bool)


def test_exp_reward_divides_by_beta():
    np.testing.assert_allclose(exp_reward(constant([1.0, -0.5, 0.0]), 0.25)(TOKENS, LENGTHS, DONE), [4.0, -2.0, 0.0])
    with pytest.raises(ValueError, match="beta > 0"):
        exp_reward(prefix_sum, 0.0)


def test_exp_reward_traced_beta_does_not_recompile(compile_counter):
    tilt = jax.jit(lambda beta: exp_reward(prefix_sum, beta)(TOKENS, LENGTHS, DONE))
    tilt(1.0)
    compile_counter.count = 0
    np.testing.assert_allclose(tilt(0.5), 2 * np.asarray(tilt(1.0)), rtol=1e-6)
    assert compile_counter.count == 0


def test_bernoulli_logit_is_log_sigmoid():
    r = np.array([-30.0, 0.0, 2.0])
    got = bernoulli_reward(constant(r), "logit")(TOKENS, LENGTHS, DONE)
    np.testing.assert_allclose(got, -np.log1p(np.exp(-r)), rtol=1e-6)


def test_bernoulli_prob_clips_and_zero_is_minus_infinity():
    got = bernoulli_reward(constant([0.25, 0.0, 1.5]), "prob")(TOKENS, LENGTHS, DONE)
    np.testing.assert_allclose(got, [np.log(0.25), -np.inf, 0.0])
    with pytest.raises(ValueError, match="kind"):
        bernoulli_reward(prefix_sum, "odds")


def test_sum_potentials_adds_log_values():
    total = sum_potentials(constant([1.0, 2.0, -np.inf]), constant([0.5, -1.0, 0.0]), prefix_sum)
    expected = np.array([1.5, 1.0, -np.inf]) + np.asarray(prefix_sum(TOKENS, LENGTHS, DONE))
    np.testing.assert_allclose(total(TOKENS, LENGTHS, DONE), expected, rtol=1e-6)
    with pytest.raises(TypeError, match="process_reward"):
        sum_potentials(prefix_sum, process_reward(prefix_sum, "min"))


# --- the host adapter ------------------------------------------------------------------------


class Recorder:
    """A host scorer that records what each call received: ``len(tokens) - lengths`` per row."""

    def __init__(self):
        self.batches = []

    def __call__(self, tokens, lengths, done):
        assert isinstance(tokens, np.ndarray) and isinstance(lengths, np.ndarray)
        self.batches.append((tokens.shape, lengths.copy(), done.copy()))
        return (tokens.shape[1] - lengths).astype(np.float64)


def test_host_potential_one_call_per_batch_under_jit():
    recorder = Recorder()
    potential = host_potential(recorder)
    out = jax.jit(potential)(TOKENS, LENGTHS, DONE)
    np.testing.assert_array_equal(out, [4.0, 3.0, 2.0])
    assert out.dtype == jnp.float32
    assert potential.counts.calls == 1 and [shape for shape, _, _ in recorder.batches] == [(N, T)]


def test_host_potential_one_call_per_step_inside_scan():
    recorder = Recorder()
    weighting = incremental(host_potential(recorder))
    increments, _ = jax.jit(lambda: scan_steps(weighting))()
    assert weighting.potential.counts.calls == T
    assert [lengths.tolist() for _, lengths, _ in recorder.batches] == [[t + 1] * N for t in range(T)]
    np.testing.assert_allclose(np.asarray(increments).sum(axis=0), [0.0] * N)  # final psi = T - T


def test_host_potential_vmapped_per_particle_is_still_one_call():
    """A per-particle program (SMC vmaps it) calls the potential on a batch of one."""
    recorder = Recorder()
    potential = host_potential(recorder)

    def one(tokens, length, done):
        return potential(tokens[None], length[None], done[None])[0]

    out = jax.jit(jax.vmap(one))(TOKENS, LENGTHS, DONE)
    np.testing.assert_array_equal(out, [4.0, 3.0, 2.0])
    assert potential.counts.calls == 1
    assert recorder.batches[0][0] == (N, T) and recorder.batches[0][1].tolist() == [1, 2, 3]


def test_host_potential_as_a_module_field_under_filter_jit():
    class Program(eqx.Module):
        reward: HostPotential

        def __call__(self, tokens, lengths, done):
            return self.reward(tokens, lengths, done)

    program = Program(host_potential(Recorder()))
    np.testing.assert_array_equal(eqx.filter_jit(program)(TOKENS, LENGTHS, DONE), [4.0, 3.0, 2.0])


def test_host_nan_becomes_minus_infinity_and_is_counted():
    potential = host_potential(lambda tokens, lengths, done: np.array([0.5, np.nan, np.nan]))
    out = jax.jit(potential)(TOKENS, LENGTHS, DONE)
    np.testing.assert_array_equal(out, [0.5, -np.inf, -np.inf])
    assert potential.counts.nan_scores == 2


def test_host_batch_decode_receives_rows_cut_to_length():
    seen = []

    def decode(rows):
        seen.append(rows)
        return ["".join(map(str, row)) for row in rows]

    potential = host_potential(
        lambda texts, lengths, done: np.array([len(text) for text in texts]), batch_decode=decode
    )
    np.testing.assert_array_equal(jax.jit(potential)(TOKENS, LENGTHS, DONE), [1.0, 2.0, 3.0])
    assert seen == [[[3], [9, 2], [5, 8, 9]]]


def test_host_wrong_shape_names_the_scorer():
    def short_scorer(tokens, lengths, done):
        return np.zeros(2)

    with pytest.raises(Exception, match="short_scorer"):
        jax.block_until_ready(jax.jit(host_potential(short_scorer))(TOKENS, LENGTHS, DONE))
