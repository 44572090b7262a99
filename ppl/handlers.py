"""Effect handlers that inference needs, built on NumPyro's ``Messenger``.

A program is ordinary NumPyro code, so ``seed``, ``trace``, ``substitute``, ``condition``
and ``block`` keep working on it. Two handlers are added:

- :class:`propose` samples chosen latent sites from a proposal ``q`` instead of their prior
  ``p``, and marks the site so that :func:`log_weight` adds ``log p(x) - log q(x)``.
- :class:`temper` raises every potential (observed site or ``factor``) to a power ``beta``.

:func:`log_weight` turns a trace into the importance weight of one run of the program:
    log w = sum over potentials of scale * log G(x)  +  sum over proposed sites of log p(x) - log q(x)
Sites sampled from their own prior contribute nothing (the bootstrap choice).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpyro
from numpyro.distributions import Distribution
from numpyro.handlers import Messenger

# A proposal maps (site name, prior distribution) to the distribution to sample from, or None
# to sample that site from its prior.
Proposal = Callable[[str, Distribution], Distribution | None]

_TARGET = "ppl_target_fn"  # key in a site's ``infer`` dict: the prior a proposal replaced


def observe(name: str, likelihood: Distribution, value: Any) -> Any:
    """Condition on ``value`` under ``likelihood``: a potential ``G = likelihood(value)``.

    The same as ``numpyro.sample(name, likelihood, obs=value)``; named for what it means in
    a program whose potentials are rewards, verifiers and constraints.
    """
    return numpyro.sample(name, likelihood, obs=value)


class propose(Messenger):
    """Sample latent sites from a proposal and record the prior they stand in for.

    A site is proposed if ``proposal(name, prior)`` returns a distribution, or, when no such
    function is given, if the program attached one with
    ``numpyro.sample(name, prior, infer={"proposal": q})``. ``q`` must have the same support
    as ``prior`` wherever the prior has mass. The replaced prior is kept in the site's
    ``infer`` dict so that :func:`log_weight` can add ``log p - log q``.
    """

    def __init__(self, fn: Callable | None = None, proposal: Proposal | Mapping | None = None):
        if isinstance(proposal, Mapping):
            table = dict(proposal)
            proposal = lambda name, prior: table[name](prior) if name in table else None  # noqa: E731
        self.proposal = proposal
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        prior = msg["fn"]
        if self.proposal is not None:
            q = self.proposal(msg["name"], prior)
        else:
            q = msg["infer"].get("proposal")
        if q is None:
            return
        msg["infer"] = {**msg["infer"], _TARGET: prior}
        msg["fn"] = q


class temper(Messenger):
    """Raise every potential to the power ``beta``: ``G -> G**beta``.

    Latent sites are untouched, so ``beta = 0`` leaves the prior and ``beta = 1`` the full
    target; intermediate values give the tempered path of annealed SMC.
    """

    def __init__(self, fn: Callable | None = None, beta: float | jnp.ndarray = 1.0):
        self.beta = beta
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["scale"] = self.beta if msg["scale"] is None else msg["scale"] * self.beta


def _site_log_prob(site: dict, fn: Distribution, batch_ndims: int) -> jnp.ndarray:
    log_prob = fn.log_prob(site["value"])
    log_prob = jnp.sum(log_prob, axis=tuple(range(batch_ndims, jnp.ndim(log_prob))))
    return log_prob if site["scale"] is None else site["scale"] * log_prob


def log_weight(trace: Mapping[str, dict], batch_shape: tuple[int, ...] = ()) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The importance weight of one run, and the score term for gradient estimators.

    Returns ``(log_w, log_q)``: ``log_w`` as in the module docstring, and ``log_q`` the summed
    log-density of proposed sites whose samples are not reparameterised (their gradient must
    come from the score function ``grad log q``). With a non-empty ``batch_shape`` (a program
    written for a whole particle batch) the leading axes of every site's log-density are
    particles and are kept: both results have shape ``batch_shape``.
    """
    batch_ndims = len(batch_shape)
    log_w = jnp.zeros(batch_shape)
    log_q_score = jnp.zeros(batch_shape)
    for site in trace.values():
        if site["type"] != "sample":
            continue
        if site["is_observed"]:
            log_w = log_w + _site_log_prob(site, site["fn"], batch_ndims)
        elif _TARGET in site["infer"]:
            q = site["fn"]
            log_q = _site_log_prob({**site, "scale": None}, q, batch_ndims)
            log_w = log_w + _site_log_prob(site, site["infer"][_TARGET], batch_ndims) - log_q
            if not q.has_rsample:
                log_q_score = log_q_score + log_q
    return log_w, log_q_score
