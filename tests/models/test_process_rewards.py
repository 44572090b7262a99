"""Process rewards from verifiers: aggregation, links, the noisy verifier, bad verifiers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl.models import tasks
from ppl.models.process_rewards import (
    NoisyVerifier,
    judge_reward,
    link_log_psi,
    predicted_ceiling,
    verifier_reward,
)
from ppl.models.task_programs import TaskPrograms, padded_prompts
from ppl.models.tokenizer import Tokenizer

PROBLEM = tasks.Problem("Lea has 19. She buys 5. She loses 21. How many?", (19, 5, 21), "", 3, 1)
GOOD_BAD_GOOD = "19 + 5 = 24\n24 - 21 = 4\n19 - 5 = 14\n"  # verdicts: right, wrong, right


@pytest.mark.parametrize("aggregate, expected", [("product", 0.1), ("min", 0.1), ("last", 1.0), ("model", 0.1)])
def test_aggregates_of_step_scores(aggregate, expected):
    floored = lambda problem, text, finished=True: [  # noqa: E731
        1.0 if v else 0.1 for v in tasks.step_verdicts(problem, text, finished)
    ]
    reward = verifier_reward((PROBLEM,), floored, str, aggregate=aggregate)
    assert reward.host.score(0, GOOD_BAD_GOOD, True) == pytest.approx(expected)
    assert reward.host.score(0, "", False) == 1.0  # nothing judged yet


def test_links_and_temperature():
    scores = jnp.array([0.0, 0.25, 0.5, 1.0])
    log = np.asarray(link_log_psi(scores, "log", 1.0, 0.0))
    assert np.isneginf(log[0]) and np.allclose(log[1:], np.log([0.25, 0.5, 1.0]))
    floor = 0.1
    logit = np.asarray(link_log_psi(scores, "logit", 2.0, floor))
    clipped = np.clip([0.0, 0.25, 0.5, 1.0], floor, 1 - floor)
    assert np.allclose(logit, np.log(clipped / (1 - clipped)) / 2.0, atol=1e-6)
    # softmax of the logits = weights proportional to the odds, the Puri et al. weighting
    odds = clipped / (1 - clipped)
    assert np.allclose(np.exp(logit * 2.0) / np.exp(logit * 2.0).sum(), odds / odds.sum(), atol=1e-6)


def test_noisy_verifier_is_a_fixed_function_with_the_set_rates():
    problems = tasks.arithmetic_problems(5, 300, 1)
    noisy = NoisyVerifier(false_positive=0.3, false_negative=0.1, seed=4)
    flips = {True: [], False: []}
    for problem in problems:
        for text in (problem.solution, problem.solution.replace(" = ", " = 1", 1)):
            exact = tasks.step_verdicts(problem, text)
            noisy_verdicts = noisy(problem, text)
            assert noisy_verdicts == noisy(problem, text)  # reruns agree
            for truth, verdict in zip(exact, noisy_verdicts):
                flips[truth].append(bool(truth) != bool(verdict))
    # ~2000 right and ~700 wrong steps: 4 binomial standard errors around the set rates
    for truth, rate in ((True, 0.1), (False, 0.3)):
        n = len(flips[truth])
        assert abs(np.mean(flips[truth]) - rate) < 4 * np.sqrt(rate * (1 - rate) / n), (truth, n)
    other_seed = NoisyVerifier(0.3, 0.1, seed=5)
    assert any(other_seed(p, p.solution) != noisy(p, p.solution) for p in problems[:50])


def test_predicted_ceiling():
    assert predicted_ceiling(0.5, 0.0, 0.3) == 1.0  # no false positives: every pass is right
    assert predicted_ceiling(0.2, 0.2, 0.1) == pytest.approx(0.2 * 0.9 / (0.2 * 0.9 + 0.8 * 0.2))


def test_bad_reward_options_are_clear_errors():
    with pytest.raises(ValueError, match="aggregate"):
        verifier_reward((PROBLEM,), tasks.step_verdicts, str, aggregate="mean")
    with pytest.raises(ValueError, match="floor > 0"):
        verifier_reward((PROBLEM,), tasks.step_verdicts, str, link="logit")
    with pytest.raises(ValueError, match="outside the set"):
        verifier_reward((PROBLEM,), tasks.step_verdicts, str, problem=1)
    with pytest.raises(ValueError, match="false_positive"):
        NoisyVerifier(1.5, 0.0)


@pytest.fixture(scope="module")
def tokenizer(smollm2_file):
    return Tokenizer.from_gguf(smollm2_file)


def test_prompts_share_one_length_and_a_short_buffer_is_a_clear_error(tokenizer):
    problems = tasks.arithmetic_problems(1, 5, 2)
    prompts = padded_prompts(problems, tokenizer)
    assert prompts.shape[0] == 5 and len({len(row) for row in prompts}) == 1
    assert tokenizer.decode(prompts[0].tolist()).endswith(tasks.few_shot_prompt(problems[0]))
    with pytest.raises(ValueError, match="longer than the buffer max_len=100"):
        TaskPrograms.build(problems, None, tokenizer, max_len=100)


def test_the_floor_softens_each_failed_step():
    exact = tasks.step_verdicts
    log_reward = verifier_reward((PROBLEM,), exact, str, aggregate="product", floor=0.05)
    assert log_reward.host.score(0, GOOD_BAD_GOOD, True) == pytest.approx(0.05)  # 1 · 0.05 · 1
    two_bad = "19 + 5 = 25\n25 - 21 = 4\n"
    assert log_reward.host.score(0, two_bad, True) == pytest.approx(0.05**2)  # every failure counts
    logit_reward = verifier_reward((PROBLEM,), exact, str, aggregate="last", link="logit", floor=0.05)
    assert logit_reward.host.score(0, PROBLEM_SOLUTION, True) == pytest.approx(0.95)  # logit stays finite


PROBLEM_SOLUTION = "19 + 5 = 24\n24 - 21 = 3\nAnswer: 3\n"


def test_judge_reward_links_the_judges_probability_of_yes():
    from ppl.models.scorers import LMJudge
    from ppl.models.toy_lm import tiny_llama

    judge = LMJudge(tiny_llama(0), jnp.array([6, 0], jnp.int32), jnp.array([4], jnp.int32), 0, 1)
    tokens, lengths, done = jnp.array([[3, 1, -1], [2, 2, 2]]), jnp.array([2, 3]), jnp.array([False, True])
    logit, log = judge_reward(judge, link="logit", temperature=2.0), judge_reward(judge, link="log")
    # one compiled call: eager dispatch of a transformer's ops is what would cost time here
    values = jax.jit(lambda: [f(tokens, lengths, done) for f in (judge, logit, log)])()
    p_yes = np.exp(np.asarray(values[0], np.float64))
    assert np.allclose(values[1], np.log(p_yes / (1 - p_yes)) / 2.0, atol=1e-4)
    assert np.allclose(values[2], np.log(p_yes), atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        judge_reward(judge, temperature=0.0)
