"""``ppl scale``: inference-time scaling on arithmetic word problems from a shell.

    ppl scale --task-seed 5 --problem 0 --algorithm particle_filter --budget 8
    ppl scale --task-seed 5 --problems 10 --algorithm best_of_n --budget 16

Draws problems from ``--task-seed`` (:mod:`ppl.models.tasks`), has SmolLM2-135M-Instruct
solve them line by line with ``--budget`` particles under the chosen algorithm
(:mod:`ppl.inference.search`), the step verifier as the process reward, and prints each
problem's answer, whether it is right, and every particle's steps (``+`` a step the verifier
passes, ``-`` one it fails) with its weight and reward.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

ALGORITHM_CHOICES = (
    "particle_filter",
    "particle_filter_adaptive",
    "tempered_particle_filter",
    "best_of_n",
    "weighted_best_of_n",
    "majority_vote",
    "beam_search",
    "dvts",
    "speculative_rejection",
)


def add_parser(commands: Any) -> None:
    """Register ``scale`` on the ``ppl`` command's subparsers."""
    scale = commands.add_parser(
        "scale",
        help="solve arithmetic word problems with a search algorithm and a step verifier",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scale.add_argument("--task-seed", type=int, default=0, help="the seed that draws the problem set")
    scale.add_argument("--tier", type=int, default=1, choices=(1, 2, 3), help="difficulty (default 1)")
    scale.add_argument("--problem", type=int, default=0, help="index of the first problem (default 0)")
    scale.add_argument("--problems", type=int, default=1, help="how many problems from --problem on (default 1)")
    scale.add_argument("--algorithm", choices=ALGORITHM_CHOICES, default="particle_filter")
    scale.add_argument("--budget", type=int, default=8, help="particles (default 8)")
    scale.add_argument("--beam-width", type=int, default=4)
    scale.add_argument("--verifier", choices=("exact", "noisy"), default="exact")
    scale.add_argument("--false-positive", type=float, default=0.2, help="noisy verifier: P(pass | wrong step)")
    scale.add_argument("--false-negative", type=float, default=0.1, help="noisy verifier: P(fail | right step)")
    scale.add_argument("--floor", type=float, default=0.05, help="a failed step's likelihood (0: kill)")
    scale.add_argument("--max-new-tokens", type=int, default=64)
    scale.add_argument("--max-len", type=int, help="KV-cache buffer (default: what the prompt needs)")
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--show", type=int, default=4, help="particles to print per problem (default 4)")


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = width * done // max(total, 1)
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def check(args: argparse.Namespace) -> None:
    """Clear errors for arguments that would otherwise fail deep inside a run."""
    if args.budget < 1:
        raise SystemExit(f"--budget must be at least 1 particle, got {args.budget}")
    if args.problems < 1 or args.problem < 0:
        raise SystemExit("--problem must be >= 0 and --problems >= 1")
    if args.max_new_tokens < 1:
        raise SystemExit("--max-new-tokens must be at least 1")


def run(args: argparse.Namespace) -> int:
    """Run ``ppl scale``; returns the exit status."""
    check(args)
    import jax
    import numpy as np

    from ppl.inference import search as S
    from ppl.models import smollm2, tasks
    from ppl.models.process_rewards import NoisyVerifier, VerifierError
    from ppl.models.task_programs import TaskPrograms

    problems = tasks.arithmetic_problems(args.task_seed, args.problem + args.problems, args.tier)[args.problem :]
    verifier = (
        tasks.step_verdicts
        if args.verifier == "exact"
        else NoisyVerifier(args.false_positive, args.false_negative, seed=args.task_seed)
    )
    started = time.perf_counter()
    lm, tokenizer = smollm2()
    try:
        suite = TaskPrograms.build(
            problems,
            lm,
            tokenizer,
            verifier=verifier,
            max_new_tokens=args.max_new_tokens,
            max_len=args.max_len,
            floor=args.floor,
        )
        S.rule_for(args.algorithm, args.budget, beam_width=args.beam_width)
    except ValueError as error:
        raise SystemExit(f"ppl scale: {error}") from error
    n_right = 0
    for k, problem in enumerate(problems):
        print(f"{_bar(k, len(problems))} compiling and running ...", file=sys.stderr, flush=True)
        try:
            result = S.search(
                suite.program(k), jax.random.key(args.seed + k), args.budget, args.algorithm, beam_width=args.beam_width
            )
        except VerifierError as error:
            raise SystemExit(f"ppl scale: {error}") from error
        texts = suite.texts(result.smc.particles)
        answers = [tasks.final_answer(text) for text in texts]
        answer = S.decide(args.algorithm, answers, result.scores, result.smc.log_weights)
        n_right += answer == problem.answer
        print(f"\nproblem {args.problem + k}: {problem.question}")
        print(f"answer: {answer}  (reference {problem.answer}, {'right' if answer == problem.answer else 'wrong'})")
        print(
            f"budget: {args.budget} particles, {int(result.generated_tokens)} tokens generated, "
            f"{int(result.forward_calls)} forward calls"
        )
        weights = np.asarray(result.smc.weights)
        for i in np.argsort(-weights)[: args.show]:
            verdicts = verifier(problem, texts[i])
            steps = tasks.steps_of(texts[i])
            print(f"  particle {i}: weight {weights[i]:.3f}, reward {float(result.scores[i]):.2f}")
            for step, verdict in zip(steps, verdicts):
                print(f"    {'+' if verdict >= 0.5 else '-'} {step}")
    print(f"{_bar(len(problems), len(problems))} {n_right}/{len(problems)} right", file=sys.stderr)
    print(f"total {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0
