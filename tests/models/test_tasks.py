"""Arithmetic word problems and their exact verifiers, on real strings."""

import re

import pytest

from ppl.models import tasks
from ppl.models.tasks import Problem, arithmetic_problems, outcome_correct, step_verdicts


def test_same_seed_same_problems_other_seed_others():
    assert arithmetic_problems(3, 20, 2) == arithmetic_problems(3, 20, 2)
    assert arithmetic_problems(3, 20, 2) != arithmetic_problems(4, 20, 2)


@pytest.mark.parametrize("tier", [1, 2, 3])
def test_reference_solutions_pass_both_verifiers_and_match_the_format(tier):
    n_ops = tasks.TIERS[tier][0]
    for problem in arithmetic_problems(11, 50, tier):
        assert re.fullmatch(tasks.SOLUTION_PATTERN, problem.solution)
        assert step_verdicts(problem, problem.solution) == [True] * (n_ops + 1)
        assert outcome_correct(problem, problem.solution)
        assert problem.question.endswith("have now?")
        assert all(str(number) in problem.question for number in problem.given[:1])
    assert any("*" in p.solution for p in arithmetic_problems(11, 50, tier)) == (tier == 3)


PROBLEM = Problem("Lea has 19 stickers. She buys 5 more. She loses 21. How many?", (19, 5, 21), "", 3, 1)


@pytest.mark.parametrize(
    "text, verdicts",
    [
        ("19 + 5 = 24\n24 - 21 = 3\nAnswer: 3\n", [True, True, True]),
        ("19 + 5 = 25\n25 - 21 = 4\nAnswer: 4\n", [False, False, False]),  # 25 was never derived
        ("19 - 5 = 14\n14 + 21 = 35\nAnswer: 35\n", [True, True, True]),  # right arithmetic, wrong plan
        ("19 + 7 = 26\n", [False]),  # 7 is neither given nor derived
        ("19 + 5 = 24\nAnswer: 19\n", [True, False]),  # the answer must repeat the last result
        ("19 + 5 = 24\nAnswer: 24\n24 - 21 = 3\n", [True, True, False]),  # nothing after the answer
        ("The answer is 3\n", [False]),
        ("19 * 5 = 95\n", [True]),
    ],
)
def test_step_verifier_on_real_strings(text, verdicts):
    assert step_verdicts(PROBLEM, text) == verdicts


def test_unfinished_last_line_is_not_judged_yet():
    assert step_verdicts(PROBLEM, "19 + 5 = 24\n24 - 2", finished=False) == [True]
    assert step_verdicts(PROBLEM, "19 + 5 = 24\n24 - 2", finished=True) == [True, False]


def test_outcome_verifier_reads_the_first_answer():
    assert outcome_correct(PROBLEM, "19 + 5 = 24\n24 - 21 = 3\nAnswer: 3\n")
    assert not outcome_correct(PROBLEM, "Answer: 35\nAnswer: 3\n")
    assert not outcome_correct(PROBLEM, "19 + 5 = 24\n")
    assert tasks.final_answer("x\nAnswer:  -4\n") == -4


def test_few_shot_prompt_ends_where_the_solution_starts():
    problem = arithmetic_problems(0, 1, 1)[0]
    prompt = tasks.few_shot_prompt(problem)
    assert prompt.endswith(f"Question: {problem.question}\nSolution:\n")
    assert prompt.count("Answer: ") == 3


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="tier"):
        arithmetic_problems(0, 3, 4)
    with pytest.raises(ValueError, match="n must"):
        arithmetic_problems(0, -1)
