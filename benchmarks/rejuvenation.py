"""Diversity from resample-move on SmolLM2: distinct final sequences with and without
rejuvenation, at equal wall time.

Task: the lipogram (no letter 'e') of ``vs_llamppl.py`` — SmolLM2-135M-Instruct, raw prompt
``PROMPT``, at most T = 32 new tokens, locally optimal proposal, systematic resampling at
ESS < N/2. Resampling concentrates the population on a few lineages; a move that leaves the
intermediate target invariant (``suffix_mh(lag)``: regenerate each particle's last ``lag``
tokens and accept by Metropolis–Hastings) spreads them out again without changing the target
or the weights. It costs decode steps, so the fair comparison gives plain SMC the same wall
time, spent on more particles:

- ``plain N=32``: ``smc(program, key, 32)``;
- ``move N=32``: ``smc(program, key, 32, rejuvenate=suffix_mh(LAG), rejuvenate_every=EVERY)``;
- ``plain N=equal``: plain SMC with the number of particles (a multiple of 8) whose wall time
  is closest to the rejuvenated run's, found by timing N = 48, 64, 96, 128 and interpolating.

Diversity of a run: ``distinct``, the number of distinct texts among the final particles with
non-zero weight, and ``distinct@32``, the number of distinct texts among 32 draws from the
final weighted population (what a user who samples from the posterior sees; for N > 32 this
is the fair measure, since more particles trivially hold more texts). Mean over ``--seeds``.
Every run compiles once (timed separately); runs of the three systems alternate.

    python benchmarks/rejuvenation.py [--seeds 5] [--lag 4] [--every 4] [--threads 1]

Prints ``RESULT rejuvenation_distinct32_ratio=`` (move over plain at equal time, distinct@32).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import _cpus  # benchmarks/ is on sys.path when this script runs

_cpus.pin(_cpus.threads_from_argv(sys.argv, 1))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import ppl  # noqa: E402
from ppl.inference import smc, suffix_mh  # noqa: E402
from ppl.models import smollm2  # noqa: E402
from ppl.models.constraints import lipogram  # noqa: E402

PROMPT = "Write a short story about a cat.\n\nOnce upon a time,"
NEW_TOKENS = 32
PARTICLES = 32


def run(program, tokenizer, n, seed, move=None, every=1):
    key = jax.random.key(seed)
    start = time.perf_counter()
    result = jax.block_until_ready(smc(program, key, n, rejuvenate=move, rejuvenate_every=every))
    seconds = time.perf_counter() - start
    lengths = np.asarray(result.particles.length)
    texts = [
        tokenizer.decode(row[:length].tolist()) for row, length in zip(np.asarray(result.particles.tokens), lengths)
    ]
    weights = np.asarray(result.weights, np.float64)
    alive = [text for text, weight in zip(texts, weights) if weight > 0]
    draws = np.random.default_rng(seed).choice(len(texts), size=PARTICLES, p=weights / weights.sum())
    return {
        "seconds": seconds,
        "distinct": len(set(alive)),
        "distinct32": len({texts[i] for i in draws}),
        "log_z": float(result.log_z),
        "acceptance": float(np.mean(np.asarray(result.acceptance_rate)[np.asarray(result.acceptance_rate) > 0]))
        if move
        else float("nan"),
        "with_e": sum("e" in text.lower() for text in alive),
        "example": texts[int(np.argmax(weights))],
    }


def timed_compile(program, tokenizer, n, move=None, every=1):
    start = time.perf_counter()
    run(program, tokenizer, n, 10_000, move, every)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lag", type=int, default=4)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    lm, tokenizer = smollm2()
    prompt = tokenizer.encode(PROMPT)
    program = ppl.Generation(
        lm, prompt, NEW_TOKENS, tokenizer.eos_token_id, constraint=lipogram("e", tokenizer), proposal="locally_optimal"
    )
    move = suffix_mh(args.lag)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, pinned to {args.threads}; jax {jax.__version__}")
    print(f"lipogram, SmolLM2-135M-Instruct, T={NEW_TOKENS}, suffix_mh(lag={args.lag}) every {args.every} steps")

    compile_s = {
        "plain N=32": timed_compile(program, tokenizer, PARTICLES),
        "move N=32": timed_compile(program, tokenizer, PARTICLES, move, args.every),
    }
    probe = {
        "plain": run(program, tokenizer, PARTICLES, 0)["seconds"],
        "move": run(program, tokenizer, PARTICLES, 0, move, args.every)["seconds"],
    }
    sizes, times = [PARTICLES], [probe["plain"]]
    for n in (48, 64, 96, 128):
        timed_compile(program, tokenizer, n)
        sizes.append(n)
        times.append(min(run(program, tokenizer, n, s)["seconds"] for s in (0, 1)))
        if times[-1] > probe["move"]:
            break
    equal = int(round(np.interp(probe["move"], times, sizes) / 8) * 8) if probe["move"] > times[0] else PARTICLES
    equal = max(equal, PARTICLES)
    if equal not in sizes:
        compile_s[f"plain N={equal}"] = timed_compile(program, tokenizer, equal)
    print(
        f"time per run at N = {sizes}: {[round(t, 2) for t in times]} s; rejuvenated N=32: {probe['move']:.2f} s -> equal-time N = {equal}"
    )

    systems = {"plain N=32": (PARTICLES, None), "move N=32": (PARTICLES, move), f"plain N={equal}": (equal, None)}
    results = {name: [] for name in systems}
    for seed in range(args.seeds):
        for name, (n, kernel) in systems.items():
            results[name].append(run(program, tokenizer, n, seed, kernel, args.every))

    print(
        f"{'system':<16} {'s/run':>7} {'distinct':>9} {'distinct@32':>12} {'log Ẑ mean ± sd':>18} {'accept':>7} {'with e':>7}"
    )
    for name, runs in results.items():
        log_z = [r["log_z"] for r in runs]
        print(
            f"{name:<16} {statistics.median(r['seconds'] for r in runs):>7.2f} "
            f"{statistics.mean(r['distinct'] for r in runs):>9.1f} {statistics.mean(r['distinct32'] for r in runs):>12.1f} "
            f"{statistics.mean(log_z):>9.3f} ± {statistics.stdev(log_z):<6.3f} "
            f"{statistics.mean(r['acceptance'] for r in runs):>7.3f} {sum(r['with_e'] for r in runs):>7}"
        )
    for name, runs in results.items():
        print(f"{name} (highest weight, seed 0): {runs[0]['example']!r}")
    print(f"compile s: {', '.join(f'{k} {v:.1f}' for k, v in compile_s.items())}")
    move32 = statistics.mean(r["distinct32"] for r in results["move N=32"])
    plain_equal = statistics.mean(r["distinct32"] for r in results[f"plain N={equal}"])
    print(f"RESULT rejuvenation_distinct32_move={move32:.1f}")
    print(f"RESULT rejuvenation_distinct32_plain_equal_time={plain_equal:.1f}")
    print(f"RESULT rejuvenation_distinct32_ratio={move32 / plain_equal:.2f}")


if __name__ == "__main__":
    main()
