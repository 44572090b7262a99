"""Overhead of ``ppl.inference.smc`` over a hand-written particle filter on the same model.

Model: a random linear-Gaussian state-space model (``ppl.models.toy.random_lgssm``, state and
observation dimension 2), T = 1000 observations, N = 10,000 particles, bootstrap proposal,
systematic resampling. Two resampling rules are measured:

- adaptive: resample before a step when ESS < 0.5 N (``ess_threshold=0.5``, the default);
- every step (``ess_threshold=1``).

The reference is the particle filter a careful person would write by hand for exactly this
model and rule: one ``lax.scan`` over steps, the whole population as plain ``[N, D]`` arrays (no
``vmap``), one ``normal`` draw per step for all particles, the observation log-density by one
triangular solve against the Cholesky factor of R, and the resampling gather inside a
``lax.cond`` on the ESS test (the same structure as ``ppl``'s ``smc``).

Both are ``jax.jit``-compiled functions of ``(key, ess_threshold)`` that return ``log Ẑ``
(so one compilation serves both rules), timed after a warm-up with ``block_until_ready``;
the two implementations alternate within each repeat so they see the same machine load, and
the best of ``--repeats`` counts ("vs hand": best over best). The "paired" column is the
median over repeats of the ratio between runs made seconds apart, which is steadier than
best/best when other jobs share the cores. Both estimates are printed next to the exact
Kalman-filter ``log Z``. A third row times ``smc`` returning its whole ``SMCResult`` (ESS, ancestry and
resampling history, which a user calling ``smc`` gets) rather than ``log_z`` alone.

    python benchmarks/smc_overhead.py [--steps 1000] [--particles 10000] [--repeats 5] [--single-core]

``--single-core`` measures work rather than elapsed time, for machines whose cores other jobs
share: the process is pinned to one core, XLA runs single-threaded, and each run is timed by
the process CPU time (``time.process_time``), which does not count time spent waiting for the
CPU. On a loaded 2-core machine wall-clock ratios swing by 2x between runs; single-core CPU
times repeat within a few percent.

The last line is ``RESULT smc_overhead_ratio=<ppl seconds / hand-written seconds>`` for the
adaptive rule (the target is <= 1.2).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import _cpus  # benchmarks/ is on sys.path when this script runs

if "--single-core" in sys.argv[1:]:
    _cpus.pin(1)

import jax  # noqa: E402  (after the optional single-core configuration)
import jax.numpy as jnp  # noqa: E402
import jax.scipy.linalg as jsl  # noqa: E402

from ppl.inference import smc  # noqa: E402
from ppl.models.toy import LinearGaussianSSM, random_lgssm  # noqa: E402

STATE_DIM = OBS_DIM = 2
_LOG_2PI = math.log(2 * math.pi)


def systematic_resample(key: jax.Array, log_weights: jax.Array) -> jax.Array:
    """Ancestor indices by systematic resampling: one uniform shifted into each of N strata."""
    n = log_weights.shape[0]
    cdf = jnp.cumsum(jax.nn.softmax(log_weights))
    positions = (jnp.arange(n) + jax.random.uniform(key, ())) / n
    # Rounding can leave cdf[-1] slightly below 1: clip so no position falls off the end.
    return jnp.minimum(jnp.searchsorted(cdf, positions, side="right"), n - 1)


def handwritten_filter(ssm: LinearGaussianSSM, key: jax.Array, n_particles: int, ess_threshold: jax.Array) -> jax.Array:
    """Bootstrap particle filter for ``ssm``, written directly on ``[N, D]`` arrays; returns log Ẑ.

    Same rule as ``smc``: before each step, if ESS < ess_threshold · N (always, for a
    threshold of 1), bank ``logmeanexp(log_weights)`` into the evidence and resample
    systematically; then propagate every particle through the transition and weight it by
    the observation density.
    """
    n = n_particles
    transition_chol = jnp.linalg.cholesky(ssm.transition_cov)
    emission_chol = jnp.linalg.cholesky(ssm.emission_cov)
    # log N(y; H x, R) = -|L^{-1}(y - H x)|^2 / 2 - log|L| - O/2 log 2π, with R = L L^T.
    log_normaliser = -jnp.sum(jnp.log(jnp.diag(emission_chol))) - 0.5 * OBS_DIM * _LOG_2PI

    def observation_log_density(particles, y):
        residuals = y - particles @ ssm.emission_matrix.T  # [N, O]
        whitened = jsl.solve_triangular(emission_chol, residuals.T, lower=True)  # one solve, N columns
        return -0.5 * jnp.sum(whitened**2, axis=0) + log_normaliser

    init_key, loop_key = jax.random.split(key)
    noise = jax.random.normal(init_key, (n, STATE_DIM))
    particles = ssm.initial_mean + noise @ jnp.linalg.cholesky(ssm.initial_cov).T
    log_weights = observation_log_density(particles, ssm.observations[0])

    def advance(carry, inputs):
        particles, log_weights, log_z_prefix = carry
        step_key, y = inputs
        resample_key, noise_key = jax.random.split(step_key)
        ess = jnp.exp(2 * jax.nn.logsumexp(log_weights) - jax.nn.logsumexp(2 * log_weights))
        should_resample = (ess_threshold >= 1.0) | (ess < ess_threshold * n)

        def resample(operands):
            particles, log_weights, log_z_prefix = operands
            ancestors = systematic_resample(resample_key, log_weights)
            banked = log_z_prefix + jax.nn.logsumexp(log_weights) - math.log(n)
            return particles[ancestors], jnp.zeros_like(log_weights), banked

        # cond, not select: the gather is skipped on steps that do not resample.
        particles, log_weights, log_z_prefix = jax.lax.cond(
            should_resample, resample, lambda operands: operands, (particles, log_weights, log_z_prefix)
        )
        noise = jax.random.normal(noise_key, (n, STATE_DIM))
        particles = particles @ ssm.transition_matrix.T + noise @ transition_chol.T
        log_weights = log_weights + observation_log_density(particles, y)
        return (particles, log_weights, log_z_prefix), None

    step_keys = jax.random.split(loop_key, ssm.n_steps - 1)
    (_, log_weights, log_z_prefix), _ = jax.lax.scan(
        advance, (particles, log_weights, jnp.zeros(())), (step_keys, ssm.observations[1:])
    )
    return log_z_prefix + jax.nn.logsumexp(log_weights) - math.log(n)


def seconds(fn: Callable, *args, clock: Callable[[], float] = time.perf_counter) -> tuple[float, jax.Array]:
    start = clock()
    out = jax.block_until_ready(fn(*args))
    return clock() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="observations T (the filter runs T - 1 steps)")
    parser.add_argument("--particles", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single-core",
        action="store_true",
        help="one core, single-threaded XLA, CPU time instead of wall time (see above)",
    )
    args = parser.parse_args()
    clock = time.process_time if args.single_core else time.perf_counter
    n = args.particles

    model_key, run_key = jax.random.split(jax.random.key(args.seed))
    ssm = random_lgssm(model_key, STATE_DIM, OBS_DIM, args.steps)
    exact_log_z = float(ssm.log_z())

    # The model is an argument, not a closed-over constant, in all three: same compilation setup.
    implementations = {
        "ppl smc (log_z)": jax.jit(lambda model, key, th: smc(model.program(), key, n, ess_threshold=th).log_z),
        "hand-written": jax.jit(lambda model, key, th: handwritten_filter(model, key, n, th)),
        "ppl smc (full SMCResult)": jax.jit(lambda model, key, th: smc(model.program(), key, n, ess_threshold=th)),
    }
    rules = {"adaptive ESS<0.5N": 0.5, "every step": 1.0}

    compile_s = {}
    for name, fn in implementations.items():
        start = time.perf_counter()
        jax.block_until_ready(fn(ssm, run_key, jnp.float32(0.5)))  # compile + warm-up
        compile_s[name] = time.perf_counter() - start

    times = {(name, rule): [] for name in implementations for rule in rules}
    estimates = {}
    for repeat in range(args.repeats):
        for rule, threshold in rules.items():
            for name, fn in implementations.items():  # interleaved: same machine load for each
                elapsed, out = seconds(
                    fn, ssm, jax.random.fold_in(run_key, repeat), jnp.float32(threshold), clock=clock
                )
                times[name, rule].append(elapsed)
                estimates.setdefault((name, rule), float(out if name != "ppl smc (full SMCResult)" else out.log_z))

    timing = "single core, process CPU time" if args.single_core else f"{len(os.sched_getaffinity(0))} cores, wall time"
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} ({jax.default_backend()}); "
        f"timing: {timing}"
    )
    print(
        f"LGSSM D=O={STATE_DIM}, T={args.steps} ({args.steps - 1} SMC steps), N={n}, bootstrap, systematic; "
        f"best of {args.repeats}; exact log Z (Kalman) = {exact_log_z:.3f}"
    )
    header = (
        f"{'implementation':<26} {'rule':<18} {'best ms':>9} {'median ms':>9} {'us/step':>8} {'vs hand':>7} "
        f"{'paired':>7} {'log Ẑ':>11} {'log Ẑ - log Z':>13} {'compile s':>9}"
    )
    print(header)
    print("-" * len(header))
    for rule in rules:
        reference = min(times["hand-written", rule])
        for name in implementations:
            best, median = min(times[name, rule]), statistics.median(times[name, rule])
            estimate = estimates[name, rule]
            # Median over repeats of (this / hand-written) within the same repeat: the two ran
            # seconds apart, so this ratio is less sensitive to other jobs' load than best/best.
            paired = statistics.median(a / b for a, b in zip(times[name, rule], times["hand-written", rule]))
            print(
                f"{name:<26} {rule:<18} {1000 * best:>9.1f} {1000 * median:>9.1f} "
                f"{1e6 * best / (args.steps - 1):>8.1f} {best / reference:>7.3f} {paired:>7.3f} {estimate:>11.3f} "
                f"{estimate - exact_log_z:>13.3f} {compile_s[name]:>9.2f}"
            )
    ratio = min(times["ppl smc (log_z)", "adaptive ESS<0.5N"]) / min(times["hand-written", "adaptive ESS<0.5N"])
    every_step = min(times["ppl smc (log_z)", "every step"]) / min(times["hand-written", "every step"])
    print(f"RESULT smc_overhead_ratio_every_step={every_step:.3f}")
    print(f"RESULT smc_overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
