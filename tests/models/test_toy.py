"""The toy models' exact answers against brute force, and their programs against the models.

Oracles are independent of the code under test: enumeration over every latent path or
sequence (NumPy, float64), and the dense joint Gaussian of all observations (SciPy, float64).
The library runs in float32, so comparisons use the stated float32 tolerances.
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro import handlers
from scipy.special import logsumexp
from scipy.stats import multivariate_normal

import ppl
from ppl.models.toy import (
    PAD,
    CategoricalHMM,
    ConstrainedBigram,
    LinearGaussianSSM,
    abc_bigram,
    random_bigram,
    random_hmm,
    random_lgssm,
)

LOG_TOL = dict(rtol=1e-5, atol=2e-5)  # float32 log-densities of magnitude ~1-100
PROB_TOL = dict(atol=2e-6)  # float32 probabilities
MOMENT_TOL = dict(rtol=1e-4, atol=2e-5)  # float32 Gaussian means / covariances


def f64(x):
    return np.asarray(x, np.float64)


# ----------------------------------------------------------------------------- HMM


def hmm_enumeration(hmm: CategoricalHMM):
    """All K^T paths and log p(x) and log p(y_t | x_t) per step, in float64."""
    pi, trans, emit = f64(hmm.initial_probs), f64(hmm.transition), f64(hmm.emission)
    y = np.asarray(hmm.observations)
    paths = np.array(list(itertools.product(range(hmm.n_states), repeat=hmm.n_steps)))
    log_prior = np.log(pi[paths[:, 0]]) + np.log(trans[paths[:, :-1], paths[:, 1:]]).sum(1)
    log_lik = np.log(emit[paths, y])  # [paths, T]
    return paths, log_prior, log_lik


@pytest.mark.parametrize("seed, n_steps", [(0, 6), (2, 1)])  # T = 1: no transitions at all
def test_hmm_exact_quantities_match_enumeration(seed, n_steps):
    hmm = random_hmm(jax.random.key(seed), 3, 4, n_steps)
    paths, log_prior, log_lik = hmm_enumeration(hmm)
    log_joint = log_prior + log_lik.sum(1)
    np.testing.assert_allclose(hmm.log_z(), logsumexp(log_joint), **LOG_TOL)
    np.testing.assert_allclose(jax.vmap(hmm.log_joint)(paths), log_joint, **LOG_TOL)

    def marginals(log_w):  # [T, K] histogram of paths weighted by exp(log_w), normalised
        w = np.exp(log_w - logsumexp(log_w))
        return np.stack([np.bincount(paths[:, t], w, hmm.n_states) for t in range(hmm.n_steps)])

    np.testing.assert_allclose(hmm.smoothing_marginals(), marginals(log_joint), **PROB_TOL)
    # Filtering at t conditions on y_{0:t} only; later transitions sum to one over paths.
    filtering = [marginals(log_prior + log_lik[:, : t + 1].sum(1))[t] for t in range(hmm.n_steps)]
    np.testing.assert_allclose(hmm.filtering_marginals(), np.stack(filtering), **PROB_TOL)


def test_hmm_ffbs_samples_follow_the_posterior():
    """Single-site and consecutive-pair frequencies of 20k FFBS paths vs exact probabilities.

    Bound: 5 binomial standard errors per cell (plus 1e-3 for cells near 0 or 1); with 63
    cells the chance of a false failure is < 1e-4.
    """
    hmm = random_hmm(jax.random.key(3), 3, 4, 6)
    n = 20_000
    samples = np.asarray(hmm.sample_posterior(jax.random.key(4), n))
    assert samples.shape == (n, 6)
    paths, log_prior, log_lik = hmm_enumeration(hmm)
    w = np.exp(log_prior + log_lik.sum(1) - logsumexp(log_prior + log_lik.sum(1)))
    k = hmm.n_states
    for t in range(hmm.n_steps - 1):
        exact = np.bincount(paths[:, t] * k + paths[:, t + 1], w, k * k)
        freq = np.bincount(samples[:, t] * k + samples[:, t + 1], minlength=k * k) / n
        assert np.all(np.abs(freq - exact) <= 5 * np.sqrt(exact * (1 - exact) / n) + 1e-3), t
    freq = np.stack([np.bincount(samples[:, t], minlength=k) / n for t in range(hmm.n_steps)])
    exact = np.asarray(hmm.smoothing_marginals())
    assert np.all(np.abs(freq - exact) <= 5 * np.sqrt(exact * (1 - exact) / n) + 1e-3)


def test_hmm_rejects_bad_inputs():
    pi, trans, emit = jnp.full(3, 1 / 3), jnp.full((3, 3), 1 / 3), jnp.full((3, 2), 0.5)
    obs = jnp.array([0, 1, 1])
    CategoricalHMM(pi, trans, emit, obs)  # valid
    with pytest.raises(ValueError, match="square"):
        CategoricalHMM(pi, jnp.full((3, 2), 0.5), emit, obs)
    with pytest.raises(ValueError, match="K=3"):
        CategoricalHMM(pi, jnp.full((2, 2), 0.5), emit, obs)
    with pytest.raises(ValueError, match="emission"):
        CategoricalHMM(pi, trans, jnp.full((2, 2), 0.5), obs)
    with pytest.raises(ValueError, match="outside"):
        CategoricalHMM(pi, trans, emit, jnp.array([0, 2, 1]))
    with pytest.raises(ValueError, match="outside"):
        CategoricalHMM(pi, trans, emit, jnp.array([0, -1, 1]))
    with pytest.raises(ValueError, match="integer"):
        CategoricalHMM(pi, trans, emit, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="sum to 1"):
        CategoricalHMM(pi, 2 * trans, emit, obs)


def test_hmm_new_data_does_not_recompile(compile_counter):
    hmm = random_hmm(jax.random.key(5), 3, 4, 6)
    log_z = eqx.filter_jit(lambda m: m.log_z())
    other = eqx.tree_at(lambda m: m.observations, hmm, (hmm.observations + 1) % 4)
    first = log_z(hmm)
    compile_counter.count = 0
    second = log_z(other)
    assert compile_counter.count == 0
    assert float(first) != float(second)


# ----------------------------------------------------------------------------- LGSSM


def dense_gaussian(ssm: LinearGaussianSSM):
    """Mean and covariance of the stacked latents x (T*D) and observations y (T*O), float64."""
    fields = ("initial_mean", "initial_cov", "transition_matrix", "transition_cov", "emission_matrix", "emission_cov")
    mu0, p0, f, q, h, r = (f64(getattr(ssm, name)) for name in fields)
    t_max, d = ssm.n_steps, mu0.shape[0]
    marginal_covs, means = [p0], [mu0]
    for _ in range(1, t_max):
        marginal_covs.append(f @ marginal_covs[-1] @ f.T + q)
        means.append(f @ means[-1])
    cov_x = np.zeros((t_max * d, t_max * d))
    for s in range(t_max):
        for t in range(s, t_max):  # Cov(x_t, x_s) = F^(t-s) Cov(x_s)
            block = np.linalg.matrix_power(f, t - s) @ marginal_covs[s]
            cov_x[t * d : (t + 1) * d, s * d : (s + 1) * d] = block
            cov_x[s * d : (s + 1) * d, t * d : (t + 1) * d] = block.T
    stack_h = np.kron(np.eye(t_max), h)
    mean_x = np.concatenate(means)
    cov_y = stack_h @ cov_x @ stack_h.T + np.kron(np.eye(t_max), r)
    return mean_x, cov_x, stack_h, cov_y


@pytest.mark.parametrize("seed, state_dim, obs_dim, n_steps", [(0, 2, 3, 6), (1, 1, 1, 1)])  # and scalars, T = 1
def test_lgssm_matches_dense_gaussian(seed, state_dim, obs_dim, n_steps):
    ssm = random_lgssm(jax.random.key(seed), state_dim, obs_dim, n_steps)
    mean_x, cov_x, stack_h, cov_y = dense_gaussian(ssm)
    y = f64(ssm.observations).ravel()
    mean_y = stack_h @ mean_x
    np.testing.assert_allclose(ssm.log_z(), multivariate_normal(mean_y, cov_y).logpdf(y), **LOG_TOL)

    def state_block(t):  # x_t's rows in the stacked latent vector
        return slice(t * state_dim, (t + 1) * state_dim)

    # Filtering at t: condition the dense joint on y_{0:t}; smoothing: on all of y.
    kf = jax.tree.map(np.asarray, ssm.kalman_filter())
    for t in range(n_steps):
        xs, ys = state_block(t), slice(0, (t + 1) * obs_dim)
        cross = cov_x[xs] @ stack_h[ys].T
        gain = np.linalg.solve(cov_y[ys, ys], cross.T).T
        np.testing.assert_allclose(kf.filtering_means[t], mean_x[xs] + gain @ (y[ys] - mean_y[ys]), **MOMENT_TOL)
        np.testing.assert_allclose(kf.filtering_covs[t], cov_x[xs, xs] - gain @ cross.T, **MOMENT_TOL)
    cross = cov_x @ stack_h.T
    post_mean = mean_x + cross @ np.linalg.solve(cov_y, y - mean_y)
    post_cov = cov_x - cross @ np.linalg.solve(cov_y, cross.T)
    smooth_means, smooth_covs = map(np.asarray, ssm.smoothing_marginals())
    np.testing.assert_allclose(smooth_means, post_mean.reshape(n_steps, state_dim), **MOMENT_TOL)
    for t in range(n_steps):
        np.testing.assert_allclose(smooth_covs[t], post_cov[state_block(t), state_block(t)], **MOMENT_TOL)

    # log p(x, y) = log N(x; dense prior) + log N(y - Hx; 0, I⊗R)
    states, _ = ssm.sample_prior(jax.random.key(seed + 10))
    x = f64(states).ravel()
    noise_cov = np.kron(np.eye(n_steps), f64(ssm.emission_cov))
    expected = multivariate_normal(mean_x, cov_x).logpdf(x)
    expected += multivariate_normal(np.zeros_like(y), noise_cov).logpdf(y - stack_h @ x)
    np.testing.assert_allclose(ssm.log_joint(states), expected, **LOG_TOL)


def test_random_lgssm_is_stable():
    for seed in range(4):
        ssm = random_lgssm(jax.random.key(seed), 2, 3, 6, max_spectral_radius=0.95)
        assert np.max(np.abs(np.linalg.eigvals(f64(ssm.transition_matrix)))) < 0.95 + 1e-6
        for cov in (ssm.initial_cov, ssm.transition_cov, ssm.emission_cov):
            assert np.min(np.linalg.eigvalsh(f64(cov))) > 0
        assert np.all(np.isfinite(f64(ssm.observations)))


def test_lgssm_rejects_bad_shapes():
    eye2, eye3 = jnp.eye(2), jnp.eye(3)
    good = dict(
        initial_mean=jnp.zeros(2), initial_cov=eye2, transition_matrix=eye2, transition_cov=eye2,
        emission_matrix=jnp.ones((3, 2)), emission_cov=eye3, observations=jnp.zeros((4, 3)),
    )  # fmt: skip
    LinearGaussianSSM(**good)
    for name, bad in [
        ("transition_matrix", jnp.eye(3)),
        ("initial_cov", jnp.ones((2, 3))),
        ("emission_matrix", jnp.ones((2, 3))),
        ("emission_cov", eye2),
        ("observations", jnp.zeros(4)),
    ]:
        with pytest.raises(ValueError, match=name):
            LinearGaussianSSM(**{**good, name: bad})


# ----------------------------------------------------------------------------- bigram

BIGRAMS = {
    "abc": lambda: abc_bigram(),
    "abc_T1": lambda: abc_bigram(max_tokens=1),
    "random_V5_strict": lambda: random_bigram(jax.random.key(0), 5, 3, 5, reject_prob=0.5),
}


@pytest.mark.parametrize("name", BIGRAMS)
def test_bigram_log_z_and_log_joint_match_enumeration(name):
    model = BIGRAMS[name]()
    tokens, lengths, log_gamma = model.enumerate_sequences()
    assert np.isfinite(log_gamma).any()
    np.testing.assert_allclose(model.log_z(), logsumexp(log_gamma), **LOG_TOL)
    log_joint = np.asarray(jax.vmap(model.log_joint)(jnp.asarray(tokens)))
    np.testing.assert_array_equal(np.isfinite(log_joint), np.isfinite(log_gamma))
    finite = np.isfinite(log_gamma)
    np.testing.assert_allclose(log_joint[finite], log_gamma[finite], **LOG_TOL)
    np.testing.assert_array_equal(model.sequence_lengths(jnp.asarray(tokens)), lengths)
    codes = np.asarray(model.sequence_codes(jnp.asarray(tokens)))
    assert len(np.unique(codes)) == len(codes)
    _, _, log_probs = model.enumerate_posterior()
    np.testing.assert_allclose(logsumexp(log_probs), 0.0, atol=1e-12)


def test_bigram_enumeration_covers_every_sequence():
    """Without constraint or scores, gamma = p_LM over the stopped-or-truncated sequences,
    a probability distribution: the enumeration must sum to exactly 1 (and so must the DP)."""
    model = abc_bigram(max_tokens=5)
    free = eqx.tree_at(
        lambda m: (m.dfa_transitions, m.dfa_accepting, m.token_scores),
        model,
        (jnp.zeros((1, 4), jnp.int32), jnp.ones(1, bool), jnp.zeros(4)),
    )
    _, _, log_gamma = free.enumerate_sequences()
    np.testing.assert_allclose(logsumexp(log_gamma), 0.0, atol=1e-12)
    np.testing.assert_allclose(free.log_z(), 0.0, atol=2e-6)


def test_abc_posterior_follows_the_conventions():
    model = abc_bigram()
    tokens, lengths, log_probs = model.enumerate_posterior()
    texts = {model.decode(t): p for t, p in zip(tokens, np.exp(log_probs), strict=True)}
    for text in texts:
        assert "b b" not in text  # the DFA rejects two b's in a row
        if text.endswith("<eos>"):
            assert "c" in text  # EOS requires an accepting DFA state
    assert "a a a a a a" in texts  # truncated at max_tokens: allowed without a c
    assert "b <eos>" not in texts and "<eos>" not in texts
    assert len(texts) > 100 and max(texts.values()) < 0.1  # a spread-out posterior
    assert np.all(tokens[np.arange(tokens.shape[1]) >= lengths[:, None]] == PAD)


def test_bigram_rejects_bad_inputs():
    good = abc_bigram()
    fields = dict(
        start_probs=good.start_probs, bigram_probs=good.bigram_probs, dfa_transitions=good.dfa_transitions,
        dfa_accepting=good.dfa_accepting, token_scores=good.token_scores, eos_id=3, max_tokens=4,
    )  # fmt: skip
    ConstrainedBigram(**fields)
    for name, bad, match in [
        ("bigram_probs", jnp.full((4, 3), 1 / 3), "bigram_probs"),
        ("dfa_transitions", good.dfa_transitions.at[0, 0].set(7), "dfa_transitions"),
        ("dfa_transitions", jnp.zeros((4, 5), jnp.int32), "dfa_transitions"),
        ("dfa_accepting", jnp.ones(3, bool), "dfa_accepting"),
        ("token_scores", jnp.zeros(5), "token_scores"),
        ("start_probs", jnp.full(4, 0.5), "sum to 1"),
        ("eos_id", 4, "eos_id"),
        ("max_tokens", 0, "max_tokens"),
    ]:
        with pytest.raises(ValueError, match=match):
            ConstrainedBigram(**{**fields, name: bad})


# ----------------------------------------------------------------------------- programs


def _run_site(fn, key, *args):
    """Run one init/step under ``ppl.propose``: (value, log weight, log q of the sampled sites)."""
    with handlers.trace() as trace, ppl.propose(), handlers.seed(rng_seed=key):
        value = fn(*args)
    log_w, _ = ppl.log_weight(trace)
    latent = [s for s in trace.values() if s["type"] == "sample" and not s["is_observed"]]
    log_q = sum((jnp.sum(s["fn"].log_prob(s["value"])) for s in latent), jnp.zeros(()))
    return value, log_w, log_q


def rollout(program, key):
    """One particle through init and every step (frozen once done): states, total log w and log q."""
    init_key, step_key = jax.random.split(key)
    state, log_w, log_q = _run_site(program.init, init_key)

    def advance(carry, t):
        state, log_w, log_q = carry
        new, inc_w, inc_q = _run_site(program.step, jax.random.fold_in(step_key, t), state, t)
        done = program.done(state)
        state = jax.tree.map(lambda a, b: jnp.where(done, b, a), new, state)
        carry = (state, log_w + jnp.where(done, 0.0, inc_w), log_q + jnp.where(done, 0.0, inc_q))
        return carry, state

    (final, log_w, log_q), states = jax.lax.scan(advance, (state, log_w, log_q), jnp.arange(program.max_steps))
    path = jax.tree.map(lambda first, rest: jnp.concatenate([first[None], rest]), state, states)
    return path, final, log_w, log_q


MODELS = {
    "hmm": lambda: random_hmm(jax.random.key(6), 3, 4, 6),
    "lgssm": lambda: random_lgssm(jax.random.key(7), 2, 3, 6),
    "bigram": lambda: abc_bigram(),
}


@pytest.mark.parametrize("optimal_proposal", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_program_weights_are_target_over_proposal(name, optimal_proposal):
    """64 runs each: total log weight + log q(path) == the model's log_joint(path) (float32,
    rtol 1e-5, atol 1e-4), i.e. the program's target is the model's joint whatever proposal
    draws the path; -inf weights exactly where the target is 0; state shapes are fixed."""
    model = MODELS[name]()
    program = model.program(optimal_proposal)
    ppl.program.check_program(program)
    keys = jax.random.split(jax.random.key(8), 64)
    paths, final, log_w, log_q = jax.jit(jax.vmap(lambda k: rollout(program, k)))(keys)
    if name == "bigram":
        log_joint = jax.vmap(model.log_joint)(final["tokens"])
        assert bool(jnp.all(jax.vmap(program.done)(final)))  # max_steps suffices to finish
        np.testing.assert_array_equal(final["length"], model.sequence_lengths(final["tokens"]))
    else:
        log_joint = jax.vmap(model.log_joint)(paths["x"])
    finite = np.isfinite(np.asarray(log_joint))
    np.testing.assert_array_equal(np.isfinite(np.asarray(log_w)), finite)
    assert finite.sum() >= 16
    np.testing.assert_allclose((log_w + log_q)[finite], log_joint[finite], rtol=1e-5, atol=1e-4)
    if name == "hmm" and optimal_proposal:
        # The locally optimal proposal leaves weight p(y_0) · Π_t p(y_{t+1} | x_t) (NumPy).
        pi, trans, emit = f64(model.initial_probs), f64(model.transition), f64(model.emission)
        y, x = np.asarray(model.observations), np.asarray(paths["x"])
        predictive = np.einsum("ntk,kt->nt", trans[x[:, :-1]], emit[:, y[1:]])  # p(y_{t+1} | x_t)
        np.testing.assert_allclose(log_w, np.log(pi @ emit[:, y[0]]) + np.log(predictive).sum(1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["hmm", "bigram"])
def test_smc_estimates_the_exact_log_z(name):
    """Integration check with ``ppl.inference.smc`` (optimal proposal for the HMM, bootstrap
    for the bigram), 2000 particles: |log Ẑ - log Z| < 0.1, over 5 standard deviations of
    log Ẑ measured over seeds for these instances."""
    from ppl.inference import smc

    model = MODELS[name]()
    result = smc(model.program(optimal_proposal=name != "bigram"), jax.random.key(10), 2000)
    assert abs(float(result.log_z) - float(model.log_z())) < 0.1
