"""A categorical hidden Markov model with exact inference: the reference for discrete SMC.

Model (``T`` observations, ``K`` hidden states, ``M`` observation symbols)::

    x_0     ~ Categorical(initial_probs)
    x_{t+1} ~ Categorical(transition[x_t])        (row = from-state)
    y_t     ~ Categorical(emission[x_t])          for t = 0..T-1

``x_0`` is the first latent and emits ``y_0``: ``T`` observations pair with the latents
``x_0..x_{T-1}``. The target of inference is the joint ``p(x, y)`` as a function of ``x``;
its normalising constant is the evidence ``Z = p(y)``, computed exactly by the forward
algorithm. :meth:`CategoricalHMM.program` turns the model into a :class:`ppl.StateSpace`
whose target is the same joint, so any estimate of ``log Z`` can be checked against
:meth:`CategoricalHMM.log_z`.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float, Int, PRNGKeyArray

import ppl


def _concrete(*arrays: jax.Array) -> bool:
    """True when every array has a value (not a tracer), so value checks can run."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _normalised_log(probs: Float[Array, "... K"]) -> Float[Array, "... K"]:
    """Row-wise log-probabilities, renormalised so they agree with ``Categorical(logits=...)``."""
    log_p = jnp.log(probs)
    return log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)


def _check_probability_rows(name: str, probs: jax.Array) -> None:
    if not _concrete(probs):
        return
    if bool(jnp.any(probs < 0)):
        raise ValueError(f"{name} has negative entries")
    if not bool(jnp.allclose(probs.sum(-1), 1.0, atol=1e-3)):
        raise ValueError(f"{name} must sum to 1 along its last axis (got sums {probs.sum(-1)})")


class CategoricalHMM(eqx.Module):
    """A categorical HMM with observed symbols; exact forward/backward computations.

    Fields are arrays (pytree leaves), so new parameters or data of the same shapes do not
    recompile anything jitted over the model. Shapes are checked on construction; values
    (probabilities, symbol ranges) are checked too when the arrays are concrete.
    """

    initial_probs: Float[Array, " K"] = eqx.field(converter=jnp.asarray)
    transition: Float[Array, "K K"] = eqx.field(converter=jnp.asarray)
    emission: Float[Array, "K M"] = eqx.field(converter=jnp.asarray)
    observations: Int[Array, " T"] = eqx.field(converter=jnp.asarray)

    def __check_init__(self) -> None:
        if self.initial_probs.ndim != 1:
            raise ValueError(f"initial_probs must be a vector [K], got shape {self.initial_probs.shape}")
        k = self.initial_probs.shape[0]
        if self.transition.ndim != 2 or self.transition.shape[0] != self.transition.shape[1]:
            raise ValueError(f"transition must be a square matrix [K, K], got shape {self.transition.shape}")
        if self.transition.shape[0] != k:
            raise ValueError(f"transition is {self.transition.shape} but initial_probs has K={k} states")
        if self.emission.ndim != 2 or self.emission.shape[0] != k:
            raise ValueError(f"emission must be [K={k}, M], got shape {self.emission.shape}")
        if self.observations.ndim != 1 or self.observations.shape[0] < 1:
            raise ValueError(f"observations must be a non-empty vector [T], got shape {self.observations.shape}")
        if not jnp.issubdtype(self.observations.dtype, jnp.integer):
            raise ValueError(f"observations must be integer symbols, got dtype {self.observations.dtype}")
        _check_probability_rows("initial_probs", self.initial_probs)
        _check_probability_rows("transition", self.transition)
        _check_probability_rows("emission", self.emission)
        if _concrete(self.observations):
            n_symbols = self.emission.shape[1]
            if bool(jnp.any((self.observations < 0) | (self.observations >= n_symbols))):
                raise ValueError(f"observations contain symbols outside [0, {n_symbols}) (emission has M={n_symbols})")

    @property
    def n_states(self) -> int:
        return self.initial_probs.shape[0]

    @property
    def n_steps(self) -> int:
        return self.observations.shape[0]

    def _log_params(self):
        return (
            _normalised_log(self.initial_probs),
            _normalised_log(self.transition),
            _normalised_log(self.emission),
        )

    def _log_likelihoods(self) -> Float[Array, "T K"]:
        """``log p(y_t | x_t = k)`` for every step and state."""
        return _normalised_log(self.emission)[:, self.observations].T

    def _forward(self) -> Float[Array, "T K"]:
        """Forward messages ``alpha_t(k) = log p(y_{0:t}, x_t = k)``."""
        log_init, log_trans, _ = self._log_params()
        log_lik = self._log_likelihoods()

        def advance(alpha, log_lik_t):
            alpha = jax.nn.logsumexp(alpha[:, None] + log_trans, axis=0) + log_lik_t
            return alpha, alpha

        alpha_0 = log_init + log_lik[0]
        _, alphas = jax.lax.scan(advance, alpha_0, log_lik[1:])
        return jnp.concatenate([alpha_0[None], alphas])

    def _backward(self) -> Float[Array, "T K"]:
        """Backward messages ``beta_t(k) = log p(y_{t+1:T-1} | x_t = k)``."""
        _, log_trans, _ = self._log_params()
        log_lik = self._log_likelihoods()

        def retreat(beta, log_lik_next):
            beta = jax.nn.logsumexp(log_trans + (log_lik_next + beta)[None, :], axis=1)
            return beta, beta

        beta_last = jnp.zeros(self.n_states)
        _, betas = jax.lax.scan(retreat, beta_last, log_lik[1:], reverse=True)
        return jnp.concatenate([betas, beta_last[None]])

    @eqx.filter_jit
    def log_z(self) -> Float[Array, ""]:
        """``log p(y_{0:T-1})`` by the forward algorithm in log space."""
        return jax.nn.logsumexp(self._forward()[-1])

    @eqx.filter_jit
    def filtering_marginals(self) -> Float[Array, "T K"]:
        """``p(x_t | y_{0:t})`` for every ``t``."""
        return jax.nn.softmax(self._forward(), axis=-1)

    @eqx.filter_jit
    def smoothing_marginals(self) -> Float[Array, "T K"]:
        """``p(x_t | y_{0:T-1})`` for every ``t`` (forward-backward)."""
        return jax.nn.softmax(self._forward() + self._backward(), axis=-1)

    @eqx.filter_jit
    def log_joint(self, states: Int[Array, " T"]) -> Float[Array, ""]:
        """``log p(x, y)`` for one latent path ``x = states``: the unnormalised target."""
        log_init, log_trans, _ = self._log_params()
        log_lik = self._log_likelihoods()
        return (
            log_init[states[0]]
            + jnp.sum(log_trans[states[:-1], states[1:]])
            + jnp.sum(jnp.take_along_axis(log_lik, states[:, None], axis=1))
        )

    @eqx.filter_jit
    def sample_posterior(self, key: PRNGKeyArray, n: int) -> Int[Array, "n T"]:
        """``n`` exact, independent draws of ``x ~ p(x | y)`` by forward-filtering backward-sampling.

        Backward step: ``p(x_t | x_{t+1}, y) ∝ alpha_t(x_t) · transition[x_t, x_{t+1}]``.
        """
        alphas = self._forward()
        _, log_trans, _ = self._log_params()
        # Gumbel-max: all the randomness in one draw (one RNG kernel to compile, not T).
        gumbels = jax.random.gumbel(key, (self.n_steps, n, self.n_states))
        x_last = jnp.argmax(alphas[-1] + gumbels[-1], axis=-1)

        def back(x_next, inputs):
            alpha_t, gumbel_t = inputs
            x_t = jnp.argmax(alpha_t + log_trans[:, x_next].T + gumbel_t, axis=-1)
            return x_t, x_t

        _, xs = jax.lax.scan(back, x_last, (alphas[:-1], gumbels[:-1]), reverse=True)
        return jnp.concatenate([xs, x_last[None]]).T

    @eqx.filter_jit
    def sample_prior(self, key: PRNGKeyArray, n_steps: int | None = None) -> tuple[Int[Array, " T"], Int[Array, " T"]]:
        """Simulate ``(states, observations)`` of length ``n_steps`` (default ``T``) from the model."""
        n_steps = self.n_steps if n_steps is None else n_steps
        log_init, log_trans, log_emit = self._log_params()
        k, m = log_emit.shape
        gumbels = jax.random.gumbel(key, (n_steps, k + m))  # Gumbel-max, one draw
        state_noise, obs_noise = gumbels[:, :k], gumbels[:, k:]

        def advance(x, noise):
            x_next = jnp.argmax(log_trans[x] + noise)
            return x_next, x_next

        x_0 = jnp.argmax(log_init + state_noise[0])
        _, rest = jax.lax.scan(advance, x_0, state_noise[1:])
        states = jnp.concatenate([x_0[None], rest]).astype(jnp.int32)
        observations = jnp.argmax(log_emit[states] + obs_noise, axis=-1).astype(jnp.int32)
        return states, observations

    def program(self, optimal_proposal: bool = False) -> HMMProgram:
        """This model as a state-space program whose target is ``p(x, y)`` (so ``log Z = log_z()``)."""
        return HMMProgram(self, optimal_proposal)


class HMMProgram(ppl.StateSpace):
    """The HMM as a :class:`ppl.StateSpace`: ``init`` draws ``x_0`` and observes ``y_0``;
    step ``t`` draws ``x_{t+1} | x_t`` and observes ``y_{t+1}``; ``max_steps = T - 1``.
    The state is ``{"x": x_t, "path": x_{0:T-1}}`` (the path is filled up to ``t``).

    With ``optimal_proposal=True`` the latent sites carry the locally optimal proposal
    ``q(x_{t+1}) ∝ transition[x_t, x_{t+1}] · emission[x_{t+1}, y_{t+1}]`` (and
    ``q(x_0) ∝ initial_probs · emission[:, y_0]``); under :class:`ppl.handlers.propose` the
    incremental weight ``p/q · G`` is then ``log p(y_{t+1} | x_t)``, the same for every
    choice of ``x_{t+1}``. Without the ``propose`` handler the proposal is ignored and the
    program samples from the prior (the bootstrap filter). The target is the same either way.
    """

    hmm: CategoricalHMM
    optimal_proposal: bool = eqx.field(static=True, default=False)
    markov: ClassVar[bool] = True  # step t reads only x_t (the path is bookkeeping)

    @property
    def max_steps(self) -> int:
        return self.hmm.n_steps - 1

    def _draw(self, prior_logits: Float[Array, " K"], y: Int[Array, ""]) -> Int[Array, ""]:
        _, _, log_emit = self.hmm._log_params()
        prior = dist.Categorical(logits=prior_logits)
        infer = {"proposal": dist.Categorical(logits=prior_logits + log_emit[:, y])} if self.optimal_proposal else {}
        x = numpyro.sample("x", prior, infer=infer)
        ppl.observe("y", dist.Categorical(logits=log_emit[x]), y)
        return x

    def init(self) -> dict[str, Int[Array, ""]]:
        log_init, _, _ = self.hmm._log_params()
        x = self._draw(log_init, self.hmm.observations[0])
        return {"x": x, "path": jnp.zeros(self.hmm.n_steps, jnp.int32).at[0].set(x)}

    def step(self, state: dict[str, Int[Array, ""]], t: Int[Array, ""]) -> dict[str, Int[Array, ""]]:
        _, log_trans, _ = self.hmm._log_params()
        x = self._draw(log_trans[state["x"]], self.hmm.observations[t + 1])
        return {"x": x, "path": state["path"].at[t + 1].set(x)}


@eqx.filter_jit
def random_hmm(
    key: PRNGKeyArray,
    n_states: int,
    n_obs_symbols: int,
    n_steps: int,
    *,
    stickiness: float = 1.5,
    logit_scale: float = 1.0,
) -> CategoricalHMM:
    """A random HMM with ``n_steps`` observations simulated from it.

    Rows of ``initial_probs``, ``transition`` and ``emission`` are softmaxes of
    N(0, ``logit_scale²``) logits (logistic-normal: cheap to compile, unlike a Dirichlet's gamma
    sampler); ``stickiness`` is added to the diagonal transition logits so hidden states persist
    and the posterior has structure worth inferring.
    """
    key_params, key_sim = jax.random.split(key)
    k, m = n_states, n_obs_symbols
    logits = logit_scale * jax.random.normal(key_params, (k + k * k + k * m,))  # one draw
    initial_probs = jax.nn.softmax(logits[:k])
    transition = jax.nn.softmax(logits[k : k + k * k].reshape(k, k) + stickiness * jnp.eye(k), axis=-1)
    emission = jax.nn.softmax(logits[k + k * k :].reshape(k, m), axis=-1)
    placeholder = jnp.zeros(n_steps, jnp.int32)
    hmm = CategoricalHMM(initial_probs, transition, emission, placeholder)
    _, observations = hmm.sample_prior(key_sim)
    return eqx.tree_at(lambda model: model.observations, hmm, observations)
