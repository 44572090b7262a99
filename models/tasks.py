"""Step-checkable reasoning tasks: multi-step arithmetic word problems, generated offline.

A seed draws a fresh problem set, so anyone can evaluate on a split nobody tuned on::

    problems = arithmetic_problems(seed=7, n=200, tier=1)
    problems[0].question   # 'Mia has 12 shells. She finds 7 more. She gives away 5. How many ...'
    problems[0].solution   # '12 + 7 = 19\\n19 - 5 = 14\\nAnswer: 14\\n'
    few_shot_prompt(problems[0])       # three worked examples, then the question

A solution is reasoning lines ``"a op b = c"`` (``op`` in ``+ - *``), then ``"Answer: c"``,
each line ending in ``"\\n"`` -- a format SmolLM2-135M-Instruct follows from a few-shot
prompt, and which :data:`SOLUTION_PATTERN` states as a regex (a generation program can impose
it as a constraint, so the verifiers judge arithmetic, never layout).

Two exact verifiers:

- :func:`outcome_correct`: the text's ``Answer:`` equals the reference answer.
- :func:`step_verdicts`: one verdict per line. A reasoning line is right when its arithmetic
  is right *and* both operands are numbers the problem gives or an earlier right line derived;
  the answer line is right when it repeats the last right line's result. Steps can all be
  right and the answer still wrong (a correct but irrelevant computation): the step verifier
  is a process reward, not an oracle for the outcome.

Difficulty tiers (``tier``): 1 = two operations on numbers up to 20; 2 = three operations up
to 30; 3 = four operations including a multiplication.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SOLUTION_PATTERN = r"([0-9]{1,4} [-+*] [0-9]{1,4} = [0-9]{1,5}\n){1,6}Answer: [0-9]{1,5}\n"
"""The solution format as a regex over the generated text (lines end in a newline)."""

STEP_DELIMITER = "\n"
"""Every step -- a reasoning line or the answer line -- ends with this."""

TIERS = {1: (2, 20, False), 2: (3, 30, False), 3: (4, 30, True)}  # operations, largest number, multiply

_LINE = re.compile(r"^\s*(\d+)\s*([-+*])\s*(\d+)\s*=\s*(\d+)\s*$")
_ANSWER = re.compile(r"^\s*Answer:\s*(-?\d+)\s*$")
_NAMES = (("Mia", "She"), ("Tom", "He"), ("Ana", "She"), ("Raj", "He"), ("Lea", "She"), ("Sam", "He"))
_ITEMS = ("apples", "shells", "stickers", "marbles", "coins", "books", "cards", "pencils")
_ADD = ("{p} finds {n} more.", "{p} buys {n} more.", "{p} gets {n} more from a friend.")
_SUB = ("{p} gives away {n}.", "{p} loses {n}.", "{p} sells {n}.")
_MUL = ("{p} then has {n} times as many.",)


@dataclass(frozen=True)
class Problem:
    """One word problem: the ``question``, the numbers it ``given``, a reference ``solution``
    in the solution format and its ``answer``."""

    question: str
    given: tuple[int, ...]
    solution: str
    answer: int
    tier: int


def arithmetic_problems(seed: int, n: int, tier: int = 1) -> list[Problem]:
    """``n`` problems of difficulty ``tier`` (1, 2 or 3) drawn from ``seed``; the same seed
    gives the same problems. Intermediate results stay non-negative."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {sorted(TIERS)}, got {tier!r}")
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = np.random.default_rng([seed, tier])
    return [_problem(rng, tier) for _ in range(n)]


def _problem(rng: np.random.Generator, tier: int) -> Problem:
    n_ops, top, multiply = TIERS[tier]
    name, pronoun = _NAMES[rng.integers(len(_NAMES))]
    item = _ITEMS[rng.integers(len(_ITEMS))]
    value = int(rng.integers(5, top + 1))
    sentences, lines, given = [f"{name} has {value} {item}."], [], [value]
    mul_at = int(rng.integers(n_ops)) if multiply else -1
    for k in range(n_ops):
        if k == mul_at:
            op, number = "*", int(rng.integers(2, 4))
        elif value >= 3 and rng.random() < 0.5:
            op, number = "-", int(rng.integers(1, value))
        else:
            op, number = "+", int(rng.integers(2, top + 1))
        template = {"+": _ADD, "-": _SUB, "*": _MUL}[op]
        sentences.append(template[rng.integers(len(template))].format(p=pronoun, n=number))
        result = _apply(value, op, number)
        lines.append(f"{value} {op} {number} = {result}")
        given.append(number)
        value = result
    sentences.append(f"How many {item} does {name} have now?")
    solution = "".join(f"{line}\n" for line in lines) + f"Answer: {value}\n"
    return Problem(" ".join(sentences), tuple(given), solution, value, tier)


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def few_shot_prompt(problem: Problem, examples: Sequence[Problem] | None = None) -> str:
    """The completion prompt: worked ``examples`` (by default three fixed problems, one per
    tier, never from an evaluation seed's draw), then ``problem``'s question; the model
    continues with the solution lines."""
    if examples is None:
        examples = _EXAMPLES
    shots = "".join(f"Question: {ex.question}\nSolution:\n{ex.solution}\n" for ex in examples)
    return f"{shots}Question: {problem.question}\nSolution:\n"


# Fixed worked examples from a seed outside the range evaluation scripts draw from.
_EXAMPLES = tuple(arithmetic_problems(-1 % 2**31, 1, tier)[0] for tier in (1, 2, 3))


def steps_of(text: str, finished: bool = True, delimiter: str = STEP_DELIMITER) -> list[str]:
    """The steps of a generated text: its pieces that end in ``delimiter``, plus the
    unterminated last piece when the text is ``finished`` (an unfinished one is still being
    written and is not judged yet)."""
    lines = text.split(delimiter)
    last = lines.pop()
    return lines + ([last] if finished and last.strip() else [])


def step_verdicts(problem: Problem, text: str, finished: bool = True) -> list[bool]:
    """The exact step verifier: one verdict per step of ``text`` (see the module docstring).
    A line in neither form is wrong, as is any line after the answer line."""
    known, last, answered, verdicts = set(problem.given), None, False, []
    for line in steps_of(text, finished):
        step, answer = _LINE.match(line), _ANSWER.match(line)
        if answered:
            verdicts.append(False)
        elif step:
            a, op, b, c = int(step[1]), step[2], int(step[3]), int(step[4])
            right = a in known and b in known and _apply(a, op, b) == c
            if right:
                known.add(c)
                last = c
            verdicts.append(right)
        elif answer:
            answered = True
            verdicts.append(last is not None and int(answer[1]) == last)
        else:
            verdicts.append(False)
    return verdicts


def final_answer(text: str) -> int | None:
    """The integer after the first ``Answer:`` in ``text``, or ``None``."""
    match = re.search(r"Answer:\s*(-?\d+)", text)
    return int(match[1]) if match else None


def outcome_correct(problem: Problem, text: str) -> bool:
    """The exact outcome verifier: ``text``'s answer is the reference answer."""
    return final_answer(text) == problem.answer


__all__ = [
    "SOLUTION_PATTERN",
    "STEP_DELIMITER",
    "TIERS",
    "Problem",
    "arithmetic_problems",
    "few_shot_prompt",
    "final_answer",
    "outcome_correct",
    "step_verdicts",
    "steps_of",
]
