"""A linear-Gaussian state-space model with exact inference: the reference for continuous SMC.

Model (``T`` observations, state dimension ``D``, observation dimension ``O``)::

    x_0     ~ N(initial_mean, initial_cov)
    x_{t+1} ~ N(transition_matrix @ x_t, transition_cov)
    y_t     ~ N(emission_matrix @ x_t, emission_cov)        for t = 0..T-1

``x_0`` is the first latent and emits ``y_0`` (``T`` observations ↔ latents ``x_0..x_{T-1}``),
the same convention as :class:`ppl.models.toy_hmm.CategoricalHMM`. The Kalman filter gives the
evidence ``Z = p(y_{0:T-1})`` exactly; the Rauch–Tung–Striebel smoother gives the posterior
marginals. :meth:`LinearGaussianSSM.program` is the same joint as a :class:`ppl.StateSpace`.

Numerics: every inverse is a Cholesky solve, and covariance updates use the Joseph form and
are re-symmetrised, so the recursions stay positive definite in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Float, PRNGKeyArray

import ppl

_LOG_2PI = 1.8378770664093453


def _symmetrise(matrix: Float[Array, "D D"]) -> Float[Array, "D D"]:
    return 0.5 * (matrix + matrix.T)


def _condition(
    mean: Float[Array, " D"],
    cov: Float[Array, "D D"],
    emission_matrix: Float[Array, "O D"],
    emission_cov: Float[Array, "O O"],
    y: Float[Array, " O"],
) -> tuple[Float[Array, " D"], Float[Array, "D D"], Float[Array, ""]]:
    """Bayes update of ``x ~ N(mean, cov)`` on ``y ~ N(H x, R)``: posterior and ``log p(y)``."""
    h, r = emission_matrix, emission_cov
    innovation_cov = _symmetrise(h @ cov @ h.T + r)
    chol = jnp.linalg.cholesky(innovation_cov)
    innovation = y - h @ mean
    whitened = jsl.solve_triangular(chol, innovation, lower=True)
    log_lik = -0.5 * (whitened @ whitened) - jnp.sum(jnp.log(jnp.diag(chol))) - 0.5 * y.shape[0] * _LOG_2PI
    # Kalman gain K = cov H^T S^{-1}, via a solve against S (symmetric): K^T = S^{-1} H cov.
    gain = jsl.cho_solve((chol, True), h @ cov).T
    residual = jnp.eye(mean.shape[0], dtype=cov.dtype) - gain @ h
    post_cov = _symmetrise(residual @ cov @ residual.T + gain @ r @ gain.T)  # Joseph form
    return mean + gain @ innovation, post_cov, log_lik


def _gaussian_log_pdf(residuals: Float[Array, "B n"], cov: Float[Array, "n n"]) -> Float[Array, ""]:
    """``Σ_b log N(residuals[b]; 0, cov)`` by one Cholesky factorisation (``B`` may be 0)."""
    chol = jnp.linalg.cholesky(cov)
    whitened = jsl.solve_triangular(chol, residuals.T, lower=True)
    n_rows, dim = residuals.shape
    log_det = 2 * jnp.sum(jnp.log(jnp.diag(chol)))
    return -0.5 * (jnp.sum(whitened**2) + n_rows * (log_det + dim * _LOG_2PI))


class KalmanFilterResult(NamedTuple):
    log_z: Float[Array, ""]  # log p(y_{0:T-1})
    filtering_means: Float[Array, "T D"]  # E[x_t | y_{0:t}]
    filtering_covs: Float[Array, "T D D"]  # Cov[x_t | y_{0:t}]
    predicted_means: Float[Array, "T D"]  # E[x_t | y_{0:t-1}]
    predicted_covs: Float[Array, "T D D"]  # Cov[x_t | y_{0:t-1}]
    log_likelihoods: Float[Array, " T"]  # log p(y_t | y_{0:t-1}); sums to log_z


class LinearGaussianSSM(eqx.Module):
    """A linear-Gaussian SSM with exact Kalman filtering and RTS smoothing.

    Fields are arrays (pytree leaves); shapes are checked on construction.
    """

    initial_mean: Float[Array, " D"] = eqx.field(converter=jnp.asarray)
    initial_cov: Float[Array, "D D"] = eqx.field(converter=jnp.asarray)
    transition_matrix: Float[Array, "D D"] = eqx.field(converter=jnp.asarray)
    transition_cov: Float[Array, "D D"] = eqx.field(converter=jnp.asarray)
    emission_matrix: Float[Array, "O D"] = eqx.field(converter=jnp.asarray)
    emission_cov: Float[Array, "O O"] = eqx.field(converter=jnp.asarray)
    observations: Float[Array, "T O"] = eqx.field(converter=jnp.asarray)

    def __check_init__(self) -> None:
        if self.initial_mean.ndim != 1:
            raise ValueError(f"initial_mean must be a vector [D], got shape {self.initial_mean.shape}")
        d = self.initial_mean.shape[0]
        if self.observations.ndim != 2 or self.observations.shape[0] < 1:
            raise ValueError(f"observations must be [T, O] with T >= 1, got shape {self.observations.shape}")
        o = self.observations.shape[1]
        expected = {
            "initial_cov": (d, d),
            "transition_matrix": (d, d),
            "transition_cov": (d, d),
            "emission_matrix": (o, d),
            "emission_cov": (o, o),
        }
        for name, shape in expected.items():
            actual = getattr(self, name).shape
            if actual != shape:
                raise ValueError(
                    f"{name} must have shape {shape} (state dim D={d}, observation dim O={o}), got {actual}"
                )

    @property
    def n_steps(self) -> int:
        return self.observations.shape[0]

    @property
    def state_dim(self) -> int:
        return self.initial_mean.shape[0]

    @eqx.filter_jit
    def kalman_filter(self) -> KalmanFilterResult:
        """Run the Kalman filter over all observations (one ``lax.scan``)."""
        f, q = self.transition_matrix, self.transition_cov

        def advance(carry, y):
            mean, cov = carry  # predictive N(x_t | y_{0:t-1})
            filt_mean, filt_cov, log_lik = _condition(mean, cov, self.emission_matrix, self.emission_cov, y)
            next_carry = (f @ filt_mean, _symmetrise(f @ filt_cov @ f.T + q))
            return next_carry, (filt_mean, filt_cov, mean, cov, log_lik)

        init = (self.initial_mean, _symmetrise(self.initial_cov))
        _, (means, covs, pred_means, pred_covs, log_liks) = jax.lax.scan(advance, init, self.observations)
        return KalmanFilterResult(jnp.sum(log_liks), means, covs, pred_means, pred_covs, log_liks)

    def log_z(self) -> Float[Array, ""]:
        """``log p(y_{0:T-1})``, the Kalman-filter marginal likelihood."""
        return self.kalman_filter().log_z

    def filtering_means(self) -> Float[Array, "T D"]:
        return self.kalman_filter().filtering_means

    def filtering_covs(self) -> Float[Array, "T D D"]:
        return self.kalman_filter().filtering_covs

    @eqx.filter_jit
    def smoothing_marginals(self) -> tuple[Float[Array, "T D"], Float[Array, "T D D"]]:
        """``(E[x_t | y], Cov[x_t | y])`` for every ``t`` by the Rauch–Tung–Striebel smoother."""
        kf = self.kalman_filter()
        f = self.transition_matrix

        def retreat(carry, inputs):
            smooth_mean, smooth_cov = carry  # at t+1
            filt_mean, filt_cov, pred_mean_next, pred_cov_next = inputs
            # Smoother gain G = filt_cov F^T pred_cov^{-1}, as a Cholesky solve.
            gain = jsl.cho_solve((jnp.linalg.cholesky(pred_cov_next), True), f @ filt_cov).T
            mean = filt_mean + gain @ (smooth_mean - pred_mean_next)
            cov = _symmetrise(filt_cov + gain @ (smooth_cov - pred_cov_next) @ gain.T)
            return (mean, cov), (mean, cov)

        last = (kf.filtering_means[-1], kf.filtering_covs[-1])
        inputs = (kf.filtering_means[:-1], kf.filtering_covs[:-1], kf.predicted_means[1:], kf.predicted_covs[1:])
        _, (means, covs) = jax.lax.scan(retreat, last, inputs, reverse=True)
        return jnp.concatenate([means, last[0][None]]), jnp.concatenate([covs, last[1][None]])

    @eqx.filter_jit
    def log_joint(self, states: Float[Array, "T D"]) -> Float[Array, ""]:
        """``log p(x, y)`` for one latent path ``x = states``: the unnormalised target."""
        f, h = self.transition_matrix, self.emission_matrix
        return (
            _gaussian_log_pdf(states[:1] - self.initial_mean, self.initial_cov)
            + _gaussian_log_pdf(states[1:] - states[:-1] @ f.T, self.transition_cov)
            + _gaussian_log_pdf(self.observations - states @ h.T, self.emission_cov)
        )

    @eqx.filter_jit
    def sample_prior(
        self, key: PRNGKeyArray, n_steps: int | None = None
    ) -> tuple[Float[Array, "T D"], Float[Array, "T O"]]:
        """Simulate ``(states, observations)`` of length ``n_steps`` (default ``T``)."""
        n_steps = self.n_steps if n_steps is None else n_steps
        d, o = self.state_dim, self.emission_cov.shape[0]
        # All the randomness in one float32 draw, so a key simulates the same data under x64.
        noise = jax.random.normal(key, (n_steps, d + o), jnp.float32).astype(float)
        chol_q = jnp.linalg.cholesky(self.transition_cov)

        def advance(x, state_noise):
            x_next = self.transition_matrix @ x + chol_q @ state_noise
            return x_next, x_next

        x_0 = self.initial_mean + jnp.linalg.cholesky(self.initial_cov) @ noise[0, :d]
        _, rest = jax.lax.scan(advance, x_0, noise[1:, :d])
        states = jnp.concatenate([x_0[None], rest])
        observations = states @ self.emission_matrix.T + noise[:, d:] @ jnp.linalg.cholesky(self.emission_cov).T
        return states, observations

    def program(self, optimal_proposal: bool = False) -> LGSSMProgram:
        """This model as a state-space program whose target is ``p(x, y)`` (so ``log Z = log_z()``)."""
        return LGSSMProgram(self, optimal_proposal)


class LGSSMProgram(ppl.StateSpace):
    """The LGSSM as a :class:`ppl.StateSpace`: ``init`` draws ``x_0`` and observes ``y_0``; step
    ``t`` draws ``x_{t+1} | x_t`` and observes ``y_{t+1}``; ``max_steps = T - 1``.

    With ``optimal_proposal=True`` each latent site carries ``q = p(x_{t+1} | x_t, y_{t+1})``
    (one Kalman update of the transition), used under :class:`ppl.handlers.propose`; the
    incremental weight is then ``log p(y_{t+1} | x_t)``, independent of the draw.
    """

    ssm: LinearGaussianSSM
    optimal_proposal: bool = eqx.field(static=True, default=False)

    @property
    def max_steps(self) -> int:
        return self.ssm.n_steps - 1

    def _draw(self, prior_mean: Float[Array, " D"], prior_cov: Float[Array, "D D"], y: Float[Array, " O"]):
        ssm = self.ssm
        prior = dist.MultivariateNormal(prior_mean, prior_cov)
        infer = {}
        if self.optimal_proposal:
            q_mean, q_cov, _ = _condition(prior_mean, prior_cov, ssm.emission_matrix, ssm.emission_cov, y)
            infer = {"proposal": dist.MultivariateNormal(q_mean, q_cov)}
        x = numpyro.sample("x", prior, infer=infer)
        ppl.observe("y", dist.MultivariateNormal(ssm.emission_matrix @ x, ssm.emission_cov), y)
        return x

    def init(self) -> dict[str, Float[Array, " D"]]:
        return {"x": self._draw(self.ssm.initial_mean, self.ssm.initial_cov, self.ssm.observations[0])}

    def step(self, state: dict[str, Float[Array, " D"]], t) -> dict[str, Float[Array, " D"]]:
        ssm = self.ssm
        y = ssm.observations[t + 1]
        return {"x": self._draw(ssm.transition_matrix @ state["x"], ssm.transition_cov, y)}


def _random_spd(normals: Float[Array, "n n"], scale: float) -> Float[Array, "n n"]:
    """A well-conditioned random covariance from a Gaussian matrix: ``scale² · (A Aᵀ / n + I) / 2``."""
    n = normals.shape[0]
    return scale**2 * 0.5 * (normals @ normals.T / n + jnp.eye(n))


@eqx.filter_jit
def random_lgssm(
    key: PRNGKeyArray,
    state_dim: int,
    obs_dim: int,
    n_steps: int,
    *,
    max_spectral_radius: float = 0.9,
    transition_scale: float = 0.5,
    emission_scale: float = 0.5,
) -> LinearGaussianSSM:
    """A random, stable LGSSM with ``n_steps`` observations simulated from it.

    The transition matrix is a Gaussian matrix divided by its Frobenius norm and scaled by
    ``max_spectral_radius`` (< 1): its spectral norm, hence its spectral radius, is at most
    that, so the latent process is stable. Covariances are random and well conditioned.
    """
    d, o = state_dim, obs_dim
    key_params, key_sim = jax.random.split(key)
    sizes = [d * d, d, d * d, d * d, o * d, o * o]
    draw = jax.random.normal(key_params, (sum(sizes),), jnp.float32).astype(float)  # same model under x64
    pieces = jnp.split(draw, np.cumsum(sizes)[:-1])
    g, mean, a0, aq, h, ar = pieces
    ssm = LinearGaussianSSM(
        initial_mean=mean,
        initial_cov=_random_spd(a0.reshape(d, d), 1.0),
        transition_matrix=max_spectral_radius * g.reshape(d, d) / jnp.linalg.norm(g),
        transition_cov=_random_spd(aq.reshape(d, d), transition_scale),
        emission_matrix=h.reshape(o, d) / jnp.sqrt(d),
        emission_cov=_random_spd(ar.reshape(o, o), emission_scale),
        observations=jnp.zeros((n_steps, o)),
    )
    _, observations = ssm.sample_prior(key_sim)
    return eqx.tree_at(lambda m: m.observations, ssm, observations)
