"""Search algorithms at equal budget: exactness of the ones that target a posterior (on the
tiny Llama with an enumerable step verifier), the selection rules, budgets, bad input."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl
from ppl.inference import search as S
from ppl.models.constraints import delimiter_tokens
from ppl.models.process_rewards import VerifierError, verifier_reward
from ppl.models.toy_lm import EOS, MAX_NEW, PROMPT, tiny_llama, tiny_tokenizer

TOKENIZER = tiny_tokenizer()


def toy_verifier(problem, text, finished=True):
    """Steps are space-separated words; a word with a "c" is a bad step (score 0.2), a word
    with an "a" a good one (0.9), anything else 0.6."""
    steps = text.split(" ")
    last = steps.pop()
    steps += [last] if finished and last.strip() else []
    return [0.2 if "c" in step else 0.9 if "a" in step else 0.6 for step in steps]


def toy_program(lm, weighting, **reward_options):
    reward = verifier_reward(("toy",), toy_verifier, TOKENIZER.decode, delimiter=" ", **reward_options)
    return ppl.Generation(
        lm,
        jnp.asarray(PROMPT),
        MAX_NEW,
        EOS,
        potentials=[ppl.rewards.incremental(reward, weighting)],
        delimiter=delimiter_tokens(" ", TOKENIZER),
        step="chunk",
    )


def exact_log_z(lm, program) -> float:
    """``log Z`` by enumerating every sequence (bodies of < MAX_NEW tokens then EOS, or MAX_NEW
    tokens cut at the limit) and the chunk boundaries the program would take."""
    reward, weighting = program.potentials[0].potential, program.potentials[0].aggregate
    sequences, points = [], []  # points: (sequence index, prefix length, done)
    for length in range(MAX_NEW + 1):
        for body in itertools.product(range(EOS), repeat=length):  # every token but EOS, BOS too
            ends_with_eos = length < MAX_NEW
            index = len(sequences)
            sequences.append((body, ends_with_eos))
            cuts = [k + 1 for k, v in enumerate(body) if v == 4 and k + 1 < length]
            cuts += [k + 1 for k, v in enumerate(body) if v == 4 and k + 1 == length and ends_with_eos]
            points += [(index, cut, False) for cut in cuts] + [(index, length, True)]
    width = len(PROMPT) + MAX_NEW
    rows = np.full((len(sequences), width), EOS, np.int32)
    for i, (body, _) in enumerate(sequences):
        rows[i, : len(PROMPT) + len(body)] = PROMPT + body
    log_probs = np.asarray(jax.nn.log_softmax(jax.vmap(lm)(jnp.asarray(rows))), np.float64)
    log_p = np.zeros(len(sequences))
    for i, (body, ends_with_eos) in enumerate(sequences):
        targets = list(body) + ([EOS] if ends_with_eos else [])
        log_p[i] = sum(log_probs[i, len(PROMPT) - 1 + k, v] for k, v in enumerate(targets))
    tokens = np.full((len(points), MAX_NEW), -1, np.int32)
    for j, (i, cut, _) in enumerate(points):
        tokens[j, :cut] = sequences[i][0][:cut]
    lengths = np.array([cut for _, cut, _ in points], np.int32)
    finished = np.array([d for _, _, d in points])
    log_psi = np.asarray(reward(jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(finished)), np.float64)
    log_gamma = log_p.copy()
    final = {}
    for j, (i, _, is_last) in enumerate(points):
        if weighting == "product":
            log_gamma[i] += log_psi[j]
        elif is_last:
            final[i] = log_psi[j]
    for i, value in final.items():
        log_gamma[i] += value
    return float(np.logaddexp.reduce(log_gamma))


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(0)


# Unbiasedness: E[exp(log_z)] = Z. 1000 independent runs, vmapped into one compiled program
# (importance sampling and both particle filters share it: they differ in a traced threshold);
# the mean of Z_hat / Z must lie within 3 standard errors of 1 (a false alarm has probability
# ~0.3% per check under a normal approximation; the seeds are fixed, so the outcome is too).
@pytest.mark.slow
@pytest.mark.parametrize(
    "weighting, options",
    [
        ("product", dict(aggregate="product")),
        # the same check for Puri et al.'s weighting (logit link, "model" score); CI time: heavy
        pytest.param("ratio", dict(aggregate="model", link="logit", floor=0.05), marks=pytest.mark.heavy),
    ],
)
def test_posterior_algorithms_are_unbiased_for_z(lm, weighting, options):
    program = toy_program(lm, weighting, **options)
    log_z = exact_log_z(lm, program)
    keys = jax.random.split(jax.random.key(11), 1000)
    run = jax.jit(jax.vmap(lambda key, rule: S.run_search(program, key, 4, rule).smc.log_z, in_axes=(0, None)))
    for algorithm in ("importance", "particle_filter", "particle_filter_adaptive"):
        ratios = np.exp(np.asarray(run(keys, S.rule_for(algorithm, 4)), np.float64) - log_z)
        standard_error = ratios.std() / np.sqrt(len(ratios))
        assert abs(ratios.mean() - 1.0) < 3 * standard_error, (algorithm, ratios.mean(), standard_error)


@pytest.mark.slow
@pytest.mark.heavy  # CI time (~45 s); the unbiasedness test above runs the posterior algorithms in CI
def test_every_algorithm_runs_and_counts_its_budget(lm):
    program = toy_program(lm, "product", aggregate="product")
    for algorithm in S.ALGORITHMS:
        result = S.search(program, jax.random.key(0), 8, algorithm, beam_width=2, reject_at=0)
        particles = result.smc.particles
        tokens, calls = int(result.generated_tokens), int(result.forward_calls)
        # the chunk barrier: a step decodes as long as its longest chunk, so calls can exceed
        # MAX_NEW; each call (but the prefill) decodes at most one token per particle
        assert 1 <= calls <= MAX_NEW * MAX_NEW + 1 and tokens <= 8 * (calls - 1)
        if algorithm in ("importance", "speculative_rejection"):  # nothing discarded: tokens = texts + EOS
            assert tokens == int(np.sum(particles.length) + np.sum(particles.ended_with_eos))
        if algorithm == "tempered_particle_filter":
            assert np.all((np.asarray(result.temperatures) > 0) & (np.asarray(result.temperatures) <= 1))
        if algorithm == "speculative_rejection":  # the worst half stopped after the first step
            assert np.sum(np.isneginf(np.asarray(result.smc.log_weights))) >= 4


def test_beam_and_dvts_select_by_score():
    scores = jnp.array([0.0, 3.0, 1.0, 2.0, -1.0, 5.0, 4.0, -jnp.inf])
    assert S.beam_ancestors(scores, 4).tolist() == [5, 5, 5, 5, 6, 6, 6, 6]
    assert S.dvts_ancestors(scores, 4).tolist() == [1, 1, 1, 1, 5, 5, 5, 5]
    assert S.dvts_ancestors(scores, 2).tolist() == [1, 1, 3, 3, 5, 5, 6, 6]


def test_tempering_keeps_the_ess_above_the_floor():
    increments = jnp.array([0.0, -5.0, -10.0, -20.0, -jnp.inf, -1.0])
    tempered, beta = S.tempered_increments(increments, 0.5)
    assert 0 < beta < 1
    assert ppl.inference.effective_sample_size(tempered) >= 0.5 * 6 - 1e-3
    assert np.isneginf(tempered[4])
    untouched, one = S.tempered_increments(jnp.zeros(6), 0.5)
    assert one == 1.0 and np.all(untouched == 0)


def test_decision_rules():
    answers = [3, 5, 5, None, 7]
    scores = np.array([2.0, 0.0, 0.5, 9.0, 1.0])
    log_weights = np.array([0.0, -1.0, -1.0, 5.0, np.log(3.0)])
    assert S.decide("best_of_n", answers, scores, log_weights) == 3  # the None particle has no answer
    assert S.decide("majority_vote", answers, scores, log_weights) == 5
    assert S.decide("weighted_best_of_n", answers, scores, log_weights) == 3  # e^2 > e^0 + e^0.5
    assert S.decide("particle_filter", answers, scores, log_weights) == 7  # 3 > 1, 2 e^-1
    assert S.decide("beam_search", [None, None], scores[:2], log_weights[:2]) is None


def raising(problem, text, finished=True):
    raise KeyError("no such step")


def nan_scores(problem, text, finished=True):
    return [float("nan")] * len(toy_verifier(problem, text, finished))


def one_score(problem, text, finished=True):
    return [1.0]


@pytest.mark.parametrize(
    "verifier, message",
    [
        (raising, "raising raised KeyError: 'no such step'"),
        (nan_scores, r"nan_scores returned scores \[nan, nan\], not all in \[0, 1\]"),
        (one_score, "one_score returned 1 scores for 2 steps"),
    ],
)
def test_verifier_failures_are_recorded_and_raised_with_the_text(verifier, message):
    reward = verifier_reward(("toy",), verifier, TOKENIZER.decode, delimiter=" ")
    assert np.isnan(reward.host.score(0, "ab b", True))
    assert reward.host.score(0, "ab b", True) != reward.host.score(0, "ab b", True)  # NaN twice more, counted
    with pytest.raises(VerifierError, match=f"{message} on problem 0 for the text 'ab b' \\(3 failed calls"):
        reward.raise_failures()
    reward.raise_failures()  # the record was cleared


def test_a_raising_verifier_stops_the_search_with_a_clear_error(lm):
    reward = verifier_reward(("toy",), raising, TOKENIZER.decode, delimiter=" ")
    program = ppl.Generation(lm, jnp.asarray(PROMPT), 2, EOS, potentials=[ppl.rewards.incremental(reward)])
    with pytest.raises(VerifierError, match="raising raised KeyError.*problem 0"):
        S.search(program, jax.random.key(0), 2, "particle_filter")


@pytest.mark.slow
@pytest.mark.heavy  # CI time; particle Gibbs itself is checked in test_gibbs
def test_particle_gibbs_spends_its_budget_in_sweeps_and_returns_texts(lm):
    program = toy_program(lm, "product", aggregate="product")
    result = S.gibbs_search(program, jax.random.key(3), 12, n_particles=4)
    particles = result.particles
    assert result.sweeps == 3 and particles.length.shape == (2,)  # the first SMC run, then 2 sweeps
    assert np.all(np.asarray(particles.finished)) and np.all(np.asarray(particles.length) <= MAX_NEW)
    lengths = np.asarray(particles.length)
    texts = [TOKENIZER.decode(row[:n].tolist()) for row, n in zip(np.asarray(particles.tokens), lengths)]
    assert S.decide("particle_gibbs", texts, np.zeros(2), np.zeros(2)) in texts
    with pytest.raises(ValueError, match="at least 2 sweeps"):
        S.gibbs_search(program, jax.random.key(3), 4, n_particles=4)


def test_bad_budgets_and_options_are_clear_errors(lm):
    program = toy_program(lm, "product")
    with pytest.raises(ValueError, match="at least one particle"):
        S.search(program, jax.random.key(0), 0, "best_of_n")
    with pytest.raises(ValueError, match="divisible by beam_width"):
        S.search(program, jax.random.key(0), 6, "beam_search", beam_width=4)
    with pytest.raises(ValueError, match="unknown algorithm"):
        S.search(program, jax.random.key(0), 4, "mcts")
    with pytest.raises(ValueError, match="first potential"):
        S.search(ppl.Generation(lm, jnp.asarray(PROMPT), MAX_NEW, EOS), jax.random.key(0), 4)
