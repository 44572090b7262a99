"""A learned twist on SmolLM2 infilling: 8 twisted particles against 64 untwisted ones, and
the bidirectional bound gap.

Task (``ppl.models.infilling``): SmolLM2-135M-Instruct fp32, raw prompt ``PROMPT``, infill
``K`` tokens, then observe an ending of ``E`` tokens. ``--draws`` sequences of ``K + E``
tokens are sampled from the LM; the most frequent ending is observed, and the prefixes of the
draws that end with it are exact posterior samples. They are split in two: the first half
are CTL's positives, the second half seed the conditional-SMC upper bounds (a twist trained
on a sample must not be judged by it).

Training: :class:`ppl.models.TwistHead` (rank ``--rank``) by contrastive twist learning
(``ppl.inference.ctl``, 8 particles per step, Adam ``--lr``), ``--steps`` steps; the LM is
frozen. Evaluation, over ``--seeds`` runs each (resampling every step):

- ``E[log Ẑ]`` of twisted SMC at N = 8 and of plain SMC at N = 8 and N = 64 (lower bounds);
- ``E[log Ẑ_CSMC]`` at N = 8 with and without the twist, each run seeded with one held-out
  exact posterior sample (upper bounds).

    python benchmarks/twists.py [--steps 60] [--seeds 16] [--threads 2]

Prints ``RESULT twist_n8_vs_plain_n64=`` (twisted N=8 lower bound minus plain N=64 lower
bound; >= 0: the 8 twisted particles are at least as tight) and ``RESULT bound_gap_n8=``
(upper minus lower at N = 8 with the learned twist), plus training time and peak memory.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import _cpus  # benchmarks/ is on sys.path when this script runs

_cpus.pin(_cpus.threads_from_argv(sys.argv, 2))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from ppl.inference import bidirectional_bounds, ctl, fit, smc  # noqa: E402
from ppl.models import TwistHead, smollm2, with_twist  # noqa: E402
from ppl.models.infilling import infilling_task  # noqa: E402

PROMPT = "Once upon a time, there was a little"


def mean_se(values) -> tuple[float, float]:
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--infill", type=int, default=6, help="K: tokens to infill")
    parser.add_argument("--ending", type=int, default=2, help="E: observed ending tokens")
    parser.add_argument("--draws", type=int, default=1024, help="LM samples to find exact posterior samples")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    lm, tokenizer = smollm2()
    prompt = jnp.array(tokenizer.encode(PROMPT), jnp.int32)
    start = time.perf_counter()
    task = infilling_task(lm, prompt, args.infill, args.ending, tokenizer.eos_token_id, jax.random.key(0), args.draws)
    exact = np.asarray(task.posterior["token"])
    half = len(exact) // 2
    if half < 2:
        sys.exit(f"only {len(exact)} exact posterior samples; raise --draws")
    positives, held_out = {"token": jnp.asarray(exact[:half])}, {"token": jnp.asarray(exact[half:])}
    ending_text = tokenizer.decode([int(v) for v in task.program.ending])
    print(
        f"ending {ending_text!r}: {len(exact)} exact posterior samples of {args.draws} draws "
        f"({time.perf_counter() - start:.1f} s)",
        flush=True,
    )

    program = task.program
    head = TwistHead(lm, args.rank, jax.random.key(1))
    objective = lambda h, key: ctl(with_twist(program, h), positives, key, 8)  # noqa: E731
    start = time.perf_counter()
    head, trace = fit(objective, head, jax.random.key(2), args.steps, optax.adam(args.lr), progress=True)
    train_s = time.perf_counter() - start
    print(
        f"training: {args.steps} CTL steps in {train_s:.1f} s (compile included); "
        f"log Ẑ trace first 5 {np.round(trace[:5], 2)}, last 5 {np.round(trace[-5:], 2)}",
        flush=True,
    )
    twisted = with_twist(program, head)

    def lower(prog, n):
        run = jax.jit(lambda key: smc(prog, key, n, ess_threshold=1.0).log_z)
        return [float(run(key)) for key in jax.random.split(jax.random.key(3), args.seeds)]

    start = time.perf_counter()
    twisted_8, plain_8, plain_64 = lower(twisted, 8), lower(program, 8), lower(program, 64)
    references = {"token": jnp.asarray(np.resize(exact[half:], (args.seeds, exact.shape[1])))}
    upper_twisted = bidirectional_bounds(twisted, jax.random.key(4), 8, references).upper
    upper_plain = bidirectional_bounds(program, jax.random.key(4), 8, references).upper
    eval_s = time.perf_counter() - start

    rows = {
        "twisted SMC N=8 (lower)": twisted_8,
        "plain SMC N=8 (lower)": plain_8,
        "plain SMC N=64 (lower)": plain_64,
        "twisted CSMC N=8 (upper)": upper_twisted,
        "plain CSMC N=8 (upper)": upper_plain,
    }
    for name, values in rows.items():
        mean, se = mean_se(values)
        print(f"{name:28s} E[log Ẑ] = {mean:8.3f} ± {se:.3f}")
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"evaluation {eval_s:.1f} s; peak RSS {peak_gib:.2f} GiB; {len(held_out['token'])} held-out exact samples "
        f"cycled over {args.seeds} seeds"
    )
    print(f"RESULT twist_n8_vs_plain_n64={np.mean(twisted_8) - np.mean(plain_64):.3f}")
    print(f"RESULT bound_gap_n8={np.mean(upper_twisted) - np.mean(twisted_8):.3f}")
    print(f"RESULT bound_gap_n8_untwisted={np.mean(upper_plain) - np.mean(plain_8):.3f}")
    print(f"RESULT twist_train_seconds={train_s:.1f}")


if __name__ == "__main__":
    main()
