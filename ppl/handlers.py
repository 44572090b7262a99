"""Effect handlers that inference needs, built on NumPyro's ``Messenger``.

A program is ordinary NumPyro code, so ``seed``, ``trace``, ``substitute``, ``condition``
and ``block`` keep working on it. Three handlers are added:

- :class:`propose` samples chosen latent sites from a proposal ``q`` instead of their prior
  ``p``, and marks the site so that :func:`log_weight` adds ``log p(x) - log q(x)``.
- :class:`temper` raises every potential (observed site or ``factor``) to a power ``beta``.
- :class:`pin` forces latent sites to given values on some rows of a particle batch (the
  reference particle of conditional SMC, or every row when a trajectory is replayed); the
  other rows sample as usual.

:func:`log_weight` turns a trace into the importance weight of one run of the program:
    log w = sum over potentials of scale * log G(x)  +  sum over proposed sites of log p(x) - log q(x)
Sites sampled from their own prior contribute nothing (the bootstrap choice).
:func:`log_density` is the unnormalised target itself, ``log gamma`` of the run:
    log gamma = sum over potentials of scale * log G(x)  +  sum over latent sites of log p(x)
:func:`choices` reads the values of the latent sites (what a trajectory records).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpyro
from jaxtyping import Array, Bool
from numpyro import handlers as numpyro_handlers
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

    A site is proposed from ``proposal(name, prior)`` when that returns a distribution; when it
    returns ``None`` (or no ``proposal`` is given, or a mapping lacks the name) the site falls
    back to the proposal the program attached with
    ``numpyro.sample(name, prior, infer={"proposal": q})``, and to its prior if there is none
    (return ``prior`` itself to override an attached proposal with the prior). ``q`` must have
    the same support as ``prior`` wherever the prior has mass. The replaced prior is kept in
    the site's ``infer`` dict so that :func:`log_weight` can add ``log p - log q``.
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
        q = None if self.proposal is None else self.proposal(msg["name"], prior)
        if q is None:
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


class Pinned(Distribution):
    """``base`` with the draws of some rows replaced by fixed values; densities are ``base``'s.

    ``rows`` (a bool, or one per batch row) broadcasts against the leading axes of a draw and
    ``value`` against the whole draw. A distribution whose draw has side products that must
    follow the forced value (a chunk of tokens decoded through a KV cache) defines
    ``pin(value, rows)`` itself, and :class:`pin` uses that instead.
    """

    def __init__(self, base: Distribution, value: Array, rows: Bool[Array, ...]):
        self.base, self.value, self.rows = base, value, jnp.asarray(rows, bool)
        super().__init__(batch_shape=base.batch_shape, event_shape=base.event_shape)

    @property
    def support(self):
        return self.base.support

    @property
    def has_rsample(self) -> bool:
        return self.base.has_rsample

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> Array:
        drawn = self.base.sample(key, sample_shape)
        return jnp.where(_expand_rows(self.rows, jnp.ndim(drawn)), jnp.asarray(self.value, drawn.dtype), drawn)

    def log_prob(self, value: Array) -> Array:
        return self.base.log_prob(value)


def _expand_rows(rows: Array, ndim: int) -> Array:
    return rows.reshape(rows.shape + (1,) * (ndim - rows.ndim))


class pin(Messenger):
    """Force latent sites named in ``values`` to those values on the ``rows`` that are true.

    ``values[name]`` broadcasts against the site's value: one particle's value (the reference
    of conditional SMC, on one row) or one per row (replaying a batch of trajectories).
    ``rows`` is a bool (a single-particle program: is this the pinned particle?) or one bool
    per row of a batched program. The other rows are drawn as usual, and every row is weighted
    as usual: a pinned row gets the weight its value would have had if it had been drawn.
    Place it outside :class:`propose`, so it wraps the distribution actually sampled from.
    """

    def __init__(self, fn: Callable | None = None, values: Mapping[str, Any] | None = None, rows: Any = True):
        self.values, self.rows = dict(values or {}), rows
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] != "sample" or msg["is_observed"] or msg["value"] is not None:
            return
        if msg["name"] not in self.values:
            return
        fn, value = msg["fn"], self.values[msg["name"]]
        msg["fn"] = fn.pin(value, self.rows) if hasattr(fn, "pin") else Pinned(fn, value, self.rows)


def sample_with_intermediates(name: str, fn: Distribution, **kwargs: Any) -> tuple[Any, list]:
    """``numpyro.sample`` that also returns the draw's intermediates (NumPyro's name for side
    products of sampling, e.g. the state a decoded chunk of tokens leaves behind): an empty
    list when no draw happened (the value was given by ``substitute`` / ``condition``)."""
    with numpyro_handlers.trace() as trace:  # innermost, so it sees the message every handler made
        value = numpyro.sample(name, fn, **kwargs)
    return value, trace[name]["intermediates"]


def _site_log_prob(site: dict, fn: Distribution, batch_ndims: int) -> jnp.ndarray:
    # NumPyro's convention: a distribution scores its own draw with the draw's intermediates.
    if site["intermediates"] and fn is site["fn"]:
        log_prob = fn.log_prob(site["value"], site["intermediates"])
    else:
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


def _target_fn(site: dict) -> Distribution:
    """The distribution a latent site stands for: its prior, even when a proposal drew it."""
    return site["infer"].get(_TARGET, site["fn"])


def log_density(trace: Mapping[str, dict], batch_shape: tuple[int, ...] = ()) -> jnp.ndarray:
    """``log gamma`` of one run: every potential plus the prior log-density of every latent site.

    This is what replaying a trajectory scores; with :func:`log_weight` it satisfies
    ``log_density = log_weight + log q(latent sites)``.
    """
    batch_ndims = len(batch_shape)
    total = jnp.zeros(batch_shape)
    for site in trace.values():
        if site["type"] == "sample":
            total = total + _site_log_prob(site, site["fn"] if site["is_observed"] else _target_fn(site), batch_ndims)
    return total


def choices(trace: Mapping[str, dict]) -> dict[str, Any]:
    """The values of the latent (not observed) sample sites of a run, by site name."""
    return {name: site["value"] for name, site in trace.items() if site["type"] == "sample" and not site["is_observed"]}
