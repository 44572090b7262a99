"""Inference-time scaling at equal budget: particle filtering vs best-of-N, weighted best-of-N,
majority vote, beam search, DVTS and speculative rejection, on arithmetic word problems
(``ppl.models.tasks``) with SmolLM2-135M-Instruct and a process reward as the likelihood.

    python benchmarks/scaling.py --task-seed 101 --budgets 4,8,16,32,64
    python benchmarks/scaling.py --task-seed 7 --budgets 8,32 --n-problems 200 --records r.jsonl
    python benchmarks/scaling.py --summarize r.jsonl --budgets 8,32     # the table of a (partial) run
    python benchmarks/scaling.py --tiny      # two problems, budget 4: a smoke run (a heavy test)

The default size (one problem) is what fits 30 minutes on the 2-core CPU (RESULTS.md gives the
per-problem cost); ``--n-problems`` sets the evaluation size, and ``--records`` appends every
problem's results as it finishes, so a run stopped early still has complete paired comparisons.
``--algorithms`` (default ``importance,particle_filter``) takes any of
``ppl.inference.search.ALGORITHMS``; ``importance`` yields best-of-N, weighted best-of-N and
majority vote (same samples), plus the single-sample accuracy, coverage (pass@N), the exact
verifier's precision and the imperfect verifier's predicted and measured ceiling.

Every algorithm gets the same budget ``N`` (particles; tokens and forward calls are reported
too). Best-of-N, weighted best-of-N and majority vote are selection rules over one sampling
run, so they see the same samples. Accuracy is the exact outcome verifier's verdict on the
algorithm's answer; the ``±`` is a 95% normal-approximation interval (binomial), and the
PF-minus-baseline differences use the paired per-problem differences. The final lines:

    RESULT pf_minus_bon_at_32=<accuracy points>
    RESULT pf_minus_weighted_bon_at_32=<accuracy points>
    RESULT pf_over_bon_budget_ratio=<smallest budget at which BoN reaches PF's accuracy at 8, / 8>

(a budget missing from ``--budgets`` gives ``nan``; BoN never reaching PF's accuracy ``inf``).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict

import jax
import numpy as np

from ppl.inference import search as S
from ppl.models import smollm2, tasks
from ppl.models.process_rewards import NoisyVerifier
from ppl.models.task_programs import TaskPrograms

DEFAULT_ALGORITHMS = ("importance", "particle_filter")
DECISIONS = {"importance": S.SAMPLING}


def build(problems, lm, tokenizer, args) -> TaskPrograms:
    verifier = (
        tasks.step_verdicts
        if args.verifier == "exact"
        else NoisyVerifier(args.false_positive, args.false_negative, seed=args.verifier_seed)
    )
    return TaskPrograms.build(
        problems,
        lm,
        tokenizer,
        verifier=verifier,
        weighting=args.weighting,
        max_new_tokens=args.max_new_tokens,
        aggregate=args.aggregate,
        link=args.link,
        floor=args.floor,
        temperature=args.temperature,
    )


def interval(values) -> tuple[float, float]:
    """Mean and 95% half-width (normal approximation) of per-problem values, in points."""
    values = np.asarray(values, np.float64)
    if len(values) < 2:
        return 100 * float(values.mean()), float("nan")
    return 100 * float(values.mean()), 100 * 1.96 * float(values.std(ddof=1)) / math.sqrt(len(values))


def solve(suite, problems, index, budget, algorithm, args) -> list[dict]:
    """One run; a record per decision rule (and, for the sampling run, the single-sample
    accuracy, coverage and the verifier's precision on whole chains)."""
    problem = problems[index]
    clock = time.perf_counter()
    key = jax.random.key(1000 * index + budget)
    result = S.search(suite.program(index), key, budget, algorithm, beam_width=min(args.beam_width, budget))
    elapsed = time.perf_counter() - clock
    texts = suite.texts(result.smc.particles)
    answers = [tasks.final_answer(text) for text in texts]
    right = [answer == problem.answer for answer in answers]
    spent = dict(tokens=int(result.generated_tokens), calls=int(result.forward_calls), seconds=elapsed)
    records = []
    for decision in DECISIONS.get(algorithm, (algorithm,)):
        answer = S.decide(decision, answers, result.scores, result.smc.log_weights)
        records.append(
            dict(decision=decision, budget=budget, problem=index, correct=float(answer == problem.answer), **spent)
        )
    if algorithm == "importance":
        passed = [all(suite.reward.host.verifier(problem, text)) for text in texts]
        extra = dict(budget=budget, problem=index, **spent)
        records.append(dict(decision="sample", correct=float(np.mean(right)), **extra))
        records.append(dict(decision="pass@N", correct=float(any(right)), **extra))
        if any(passed):
            precision = float(np.mean([r for r, p in zip(right, passed) if p]))
            records.append(dict(decision="verifier_precision", correct=precision, **extra))
        records += ceiling_records(problem, texts, right, args, extra)
    return records


def ceiling_records(problem, texts, right, args, extra) -> list[dict]:
    """The imperfect verifier's ceiling on this problem's samples: selecting among
    infinitely many samples by "the noisy verifier passes every step" is right with
    probability ``sum_x right(x) P(pass | x) / sum_x P(pass | x)`` over the sample law, where
    ``P(pass | x) = prod_steps (1 - FN if the step is right else FP)`` (predicted, from the
    exact verdicts and the rates), and the hashed verifier's actual verdicts give the measured
    precision on the same samples."""
    fp, fn = args.false_positive, args.false_negative
    noisy = NoisyVerifier(fp, fn, seed=args.verifier_seed)
    p_pass = np.array([np.prod([(1 - fn) if v else fp for v in tasks.step_verdicts(problem, t)]) for t in texts])
    records = []
    if p_pass.sum() > 0:
        predicted = float(np.dot(right, p_pass) / p_pass.sum())
        records.append(dict(decision="noisy_ceiling_predicted", correct=predicted, **extra))
    passed = [all(v >= 0.5 for v in noisy(problem, t)) for t in texts]
    if any(passed):
        measured = float(np.mean([r for r, p in zip(right, passed) if p]))
        records.append(dict(decision="noisy_precision_measured", correct=measured, **extra))
    return records


def summarize(records: list[dict], budgets: list[int]) -> None:
    """The table and the RESULT lines from per-problem records."""
    table = defaultdict(list)
    for record in records:
        table[record["decision"], record["budget"]].append(record)
    print(f"{'decision':<26}{'budget':>7}{'n':>5}{'accuracy %':>16}{'median s':>10}{'tokens':>8}{'calls':>7}")
    for (decision, budget), rows in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean, half = interval([r["correct"] for r in rows])
        seconds = np.median([r["seconds"] for r in rows])
        tokens, calls = np.mean([r["tokens"] for r in rows]), np.mean([r["calls"] for r in rows])
        print(
            f"{decision:<26}{budget:>7}{len(rows):>5}{mean:>9.1f} ± {half:4.1f}{seconds:>10.2f}{tokens:>8.0f}{calls:>7.0f}"
        )

    def per_problem(decision, budget):
        return {r["problem"]: r["correct"] for r in table.get((decision, budget), [])}

    def difference(other, budget):
        pf, base = per_problem("particle_filter", budget), per_problem(other, budget)
        common = sorted(set(pf) & set(base))
        if not common:
            return float("nan"), float("nan")
        return interval([pf[i] - base[i] for i in common])

    for other in ("best_of_n", "weighted_best_of_n", "majority_vote"):
        for budget in budgets:
            mean, half = difference(other, budget)
            print(f"# PF - {other} at {budget}: {mean:+.1f} ± {half:.1f} points (paired, 95%)")
    pf_at_8 = per_problem("particle_filter", 8)
    target = np.mean(list(pf_at_8.values())) if pf_at_8 else float("nan")
    reached = [
        b
        for b in budgets
        if per_problem("best_of_n", b) and np.mean(list(per_problem("best_of_n", b).values())) >= target
    ]
    ratio = float("nan") if math.isnan(target) else (min(reached) / 8 if reached else float("inf"))
    print(f"RESULT pf_minus_bon_at_32={difference('best_of_n', 32)[0]:.1f}")
    print(f"RESULT pf_minus_weighted_bon_at_32={difference('weighted_best_of_n', 32)[0]:.1f}")
    print(f"RESULT pf_over_bon_budget_ratio={ratio}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task-seed", type=int, default=101)
    parser.add_argument("--budgets", default="4,8,16,32,64")
    parser.add_argument("--n-problems", type=int, default=1)  # what fits 30 min here: RESULTS.md
    parser.add_argument("--tier", type=int, default=1)
    parser.add_argument("--algorithms", default=",".join(DEFAULT_ALGORITHMS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--verifier", choices=("exact", "noisy"), default="exact")
    parser.add_argument("--false-positive", type=float, default=0.2)
    parser.add_argument("--false-negative", type=float, default=0.1)
    parser.add_argument("--verifier-seed", type=int, default=0)
    parser.add_argument("--aggregate", default="product")
    parser.add_argument("--link", default="log")
    parser.add_argument("--floor", type=float, default=0.05)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--weighting", default="ratio")
    parser.add_argument("--beam-width", type=int, default=4)
    parser.add_argument("--records", help="append one JSON line per problem and decision to this file")
    parser.add_argument("--summarize", help="only print the summary of a --records file")
    parser.add_argument("--tiny", action="store_true", help="two problems, budget 4 (CI smoke run)")
    args = parser.parse_args(argv)
    if args.tiny:
        args.n_problems, args.budgets, args.max_new_tokens = 2, "4", 40
    budgets = [int(b) for b in args.budgets.split(",")]
    if args.summarize:
        with open(args.summarize) as lines:
            summarize([json.loads(line) for line in lines], budgets)
        return 0

    started = time.perf_counter()
    lm, tokenizer = smollm2()
    problems = tasks.arithmetic_problems(args.task_seed, args.n_problems, args.tier)
    suite = build(problems, lm, tokenizer, args)
    print(
        f"# task seed {args.task_seed}, tier {args.tier}, {len(problems)} problems, prompt {suite.prompts.shape[1]} tokens"
    )
    print(
        f"# setup {time.perf_counter() - started:.1f} s; verifier {args.verifier}, aggregate {args.aggregate}, "
        f"link {args.link}, floor {args.floor}, weighting {args.weighting}"
    )
    records = []
    # Problems outermost: whenever the run stops, the records hold complete paired comparisons.
    for index in range(len(problems)):
        for budget in budgets:
            for algorithm in args.algorithms.split(","):
                new = solve(suite, problems, index, budget, algorithm, args)
                records += new
                if args.records:
                    with open(args.records, "a") as out:
                        out.writelines(json.dumps(r) + "\n" for r in new)
        print(f"# problem {index} done, {time.perf_counter() - started:.0f} s so far", flush=True)
    print(f"# total {time.perf_counter() - started:.0f} s")
    summarize(records, budgets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
