"""Generation that finishes: budget-aware masks, the automaton's look-ahead twist, answers.

On the tiny random Llama of ``ppl.models.toy_lm``, whose target is enumerable: the budget
masks are checked token by token against brute-force completion with Python's ``re``, and
Z and the posterior with the look-ahead twist against enumeration.
"""

from __future__ import annotations

import itertools
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl
from ppl.inference import smc
from ppl.models.constraints import TokenDFA, regex
from ppl.models.toy_lm import (
    EOS,
    MAX_NEW,
    PATTERN,
    PROMPT,
    VOCAB,
    enumerate_posterior,
    tiny_generation,
    tiny_llama,
    tiny_tokenizer,
)

TEXT_TOKENS = range(len(VOCAB) - 2)  # BOS and EOS are never text
NO_CAP = r"[ab]+ c"  # a word with no length cap, then " c": 3 tokens and EOS at the shortest


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def log_gamma(lm):
    return enumerate_posterior(lm)


def text(tokens) -> str:
    return b"".join(VOCAB[v] for v in tokens).decode()


def walk(dfa: TokenDFA, tokens) -> int:
    """The automaton's state after ``tokens``, read from its tables with numpy (``-1``: dead)."""
    transitions, token_class = np.asarray(dfa.transitions), np.asarray(dfa.token_class)
    state = dfa.initial
    for token in tokens:
        state = int(transitions[state, token_class[token]]) if state >= 0 else -1
    return state


def accepts(dfa: TokenDFA, tokens) -> bool:
    state = walk(dfa, tokens)
    return state >= 0 and bool(dfa.accepting[state])


@pytest.mark.parametrize("pattern", [PATTERN, NO_CAP])
def test_budget_mask_allows_exactly_the_tokens_that_can_still_finish(pattern):
    """For every live prefix and every token: ``mask_within`` allows it iff some token sequence
    of the remaining length completes an accepted text (brute force over the automaton's own
    table); and the mask is stricter than the plain one somewhere, so the check is not vacuous."""
    dfa = regex(pattern, tiny_tokenizer())
    stricter = 0
    for length in range(MAX_NEW):
        for body in itertools.product(TEXT_TOKENS, repeat=length):
            state = walk(dfa, body)
            if state < 0:
                continue
            text_left = MAX_NEW - 1 - length  # EOS takes the last slot
            within = np.asarray(dfa.mask_within(state, text_left))
            assert within[EOS] == accepts(dfa, body) == bool(re.fullmatch(pattern, text(body)))
            for token in TEXT_TOKENS:
                finishes = any(
                    accepts(dfa, body + (token,) + suffix)
                    for n in range(text_left)
                    for suffix in itertools.product(TEXT_TOKENS, repeat=n)
                )
                assert within[token] == finishes, (body, token)
            stricter += int((np.asarray(dfa.mask(state)) & ~within).sum())
            # However large the budget, a forbidden token stays forbidden (distances of
            # forbidden tokens once fell below a long budget).
            assert not np.any(np.asarray(dfa.mask_within(state, 10**6)) & ~np.asarray(dfa.mask(state)))
    assert stricter > 0


class WithoutBudget(eqx.Module):
    """The same automaton seen through the bare ``TokenConstraint`` protocol (no ``mask_within``):
    the generation can only reserve the last slot for EOS, as before budget masks."""

    dfa: TokenDFA

    @property
    def initial(self) -> int:
        return self.dfa.initial

    def mask(self, state):
        return self.dfa.mask(state)

    def advance(self, state, token):
        return self.dfa.advance(state, token)

    def check_vocab(self, vocab_size: int) -> None:
        self.dfa.check_vocab(vocab_size)


def test_a_word_with_no_length_cap_never_ends_all_dead(lm):
    """``[ab]+ c`` in 4 slots: a particle that writes a second letter can no longer fit " c" and
    EOS. With budget masks the locally optimal proposal never takes that step (every particle
    of 32 survives, 4 seeds); through the bare protocol a third or more die there."""
    dfa = regex(NO_CAP, tiny_tokenizer())
    run = jax.jit(
        jax.vmap(lambda constraint, key: smc(tiny_generation(lm, constraint=constraint), key, 32), in_axes=(None, 0))
    )
    keys = jax.random.split(jax.random.key(2), 4)
    assert np.all(np.isfinite(np.asarray(run(dfa, keys).log_weights)))
    dead = np.mean(np.isneginf(np.asarray(run(WithoutBudget(dfa), keys).log_weights)))
    assert dead > 0.3, dead


def test_lookahead_twist_leaves_z_and_the_posterior_exact(lm, log_gamma):
    """With the automaton's look-ahead twist (and budget masks), over 1000 seeds of SMC with
    N = 8: mean Ẑ/Z within 3 standard errors of 1 (the SE must be below 0.08, so a 25% bias
    could not pass), and the pooled weighted particles (properly weighted, so their pooled
    weights estimate the posterior) have TV to the enumerated posterior below 2× the
    prediction ½ Σ_x sqrt(2 p(x)(1 - p(x)) / (π ESS)) of independent weighted draws of the
    pooled ESS (resampling correlates particles; a wrong target's TV would not shrink: the
    prior's is about 0.6), and below 0.05."""
    dfa = regex(PATTERN, tiny_tokenizer())
    twist = ppl.AcceptanceTwist(dfa, MAX_NEW, nats_per_token=1.5)
    run = jax.jit(jax.vmap(lambda key: smc(tiny_generation(lm, constraint=dfa, twist=twist), key, 8)))
    results = run(jax.random.split(jax.random.key(11), 1000))
    log_z = float(np.logaddexp.reduce(list(log_gamma.values())))
    ratios = np.exp(np.asarray(results.log_z, np.float64) - log_z)
    standard_error = ratios.std(ddof=1) / np.sqrt(len(ratios))
    log_weights = np.asarray(results.log_weights, np.float64).reshape(-1)
    weights = np.exp(log_weights - log_weights.max())
    histogram = dict.fromkeys(log_gamma, 0.0)
    rows = zip(
        np.asarray(results.particles.tokens).reshape(-1, MAX_NEW),
        np.asarray(results.particles.length).reshape(-1),
        weights,
    )
    for row, length, weight in rows:
        if weight > 0:
            histogram[tuple(row[:length])] += weight  # a KeyError would be a particle outside the support
    estimate = np.array(list(histogram.values())) / weights.sum()
    exact = np.exp(np.array(list(log_gamma.values())) - log_z)
    tv = 0.5 * np.abs(estimate - exact).sum()
    ess = weights.sum() ** 2 / np.sum(weights**2)
    predicted = 0.5 * np.sum(np.sqrt(2 * exact * (1 - exact) / (np.pi * ess)))
    print(
        f"look-ahead twist: mean Ẑ/Z = {ratios.mean():.4f} ± {standard_error:.4f} (SE); TV {tv:.4f} (predicted {predicted:.4f}, ESS {ess:.0f})"
    )
    assert standard_error < 0.08
    assert abs(ratios.mean() - 1.0) < 3 * standard_error, (ratios.mean(), standard_error)
    assert tv < 2 * predicted and tv < 0.05, (tv, predicted)


def test_answers_are_live_particles_and_score_under_the_language_model(lm, log_gamma):
    """``sample``/``best`` decode particles of non-zero weight only; ``completions`` puts the
    particles in ``LanguageModel``'s form, whose ``log_prob`` is the enumerated log γ minus
    the reward: one representation, no hand-rebuilding."""
    dfa = regex(PATTERN, tiny_tokenizer())
    program = tiny_generation(lm, constraint=dfa)
    result = smc(program, jax.random.key(4), 32)
    support = {text(body) for body in log_gamma}
    answers = result.sample(jax.random.key(0), 200, tiny_tokenizer())
    assert len(answers) == 200 and set(answers) <= support
    assert result.best(tiny_tokenizer()) in support
    assert result.best().length.shape == ()  # no tokenizer: the particle's state
    log_p = ppl.LanguageModel(lm, jnp.asarray(PROMPT), MAX_NEW, EOS).log_prob(program.completions(result.particles))
    alive = np.isfinite(np.asarray(result.log_weights))
    for row, length, score in zip(
        np.asarray(result.particles.tokens)[alive], np.asarray(result.particles.length)[alive], np.asarray(log_p)[alive]
    ):
        body = tuple(int(v) for v in row[:length])
        assert score == pytest.approx(log_gamma[body] - 0.7 * text(body).count("a"), abs=1e-4)


def test_answers_of_an_all_dead_run_are_an_error(lm):
    only_c = regex("c{4}", tiny_tokenizer())  # 4 tokens then EOS: more than the 4 slots
    assert only_c.min_tokens == 4
    result = smc(
        ppl.Generation(lm, jnp.asarray(PROMPT), MAX_NEW, EOS, constraint=only_c, require_eos=True), jax.random.key(0), 4
    )
    assert bool(result.all_dead)
    with pytest.raises(ppl.AllDeadError, match="relax the constraint, raise the token budget"):
        result.sample(jax.random.key(0), 1, tiny_tokenizer())
    with pytest.raises(ppl.AllDeadError):
        result.best()
