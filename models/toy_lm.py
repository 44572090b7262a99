"""A tiny transformer LM whose constrained generation posterior is enumerable.

A random-weight Llama (the real decoder, KV cache and all) over an 8-token vocabulary, a
regex constraint compiled by the same outlines-core path as for SmolLM2, and a soft reward
of ``REWARD_PER_A`` nats per letter "a": with at most ``max_new_tokens - 1`` tokens before EOS
there are few enough sequences to compute ``Z`` and the posterior exactly, by teacher-forced
forward passes (``Llama.__call__``) and Python's ``re`` — independently of the cache, the
constraint automaton and every inference path that is being checked against them.

    lm = tiny_llama(0)
    program = tiny_generation(lm, proposal="locally_optimal")
    exact = enumerate_posterior(lm)          # {token tuple: log gamma}
"""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

import ppl
from ppl.models.constraints import regex
from ppl.models.llama import Llama, LlamaConfig

VOCAB = (b"a", b"b", b"c", b"ab", b" ", b"ba", b"", b"")  # 6: BOS, 7: EOS
BOS, EOS = 6, 7
PATTERN = r"(ab|b)+ ?c?"
PROMPT = (BOS, 0, 4)
MAX_NEW = 4
REWARD_PER_A = 0.7  # log potential per "a" in the text (an exp(r/β) reward)


def tiny_tokenizer() -> SimpleNamespace:
    """What the constraint compiler needs of a tokenizer (the vocabulary's bytes and EOS), and
    ``decode`` for answers (``SMCResult.sample``)."""
    return SimpleNamespace(
        vocab_bytes=list(VOCAB),
        eos_token_id=EOS,
        vocab_size=len(VOCAB),
        decode=lambda ids: b"".join(VOCAB[i] for i in ids).decode(),
    )


def tiny_llama(seed: int, hidden_size: int = 32, vocab_size: int = len(VOCAB)) -> Llama:
    """A 2-layer Llama (GQA, tied embeddings) with random O(1) weights over ``VOCAB`` (other
    sizes build mismatched models, for error tests)."""
    d, ffn = hidden_size, hidden_size * 3 // 2
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d,
        intermediate_size=ffn,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=d // 4,
        tie_embeddings=True,
    )
    rng = np.random.default_rng(seed)
    shapes = {
        "q_proj": (d, d),
        "k_proj": (d // 2, d),
        "v_proj": (d // 2, d),
        "o_proj": (d, d),
        "gate_proj": (ffn, d),
        "up_proj": (ffn, d),
        "down_proj": (d, ffn),
    }

    def tensor(name: str) -> np.ndarray:
        if name.endswith("norm.weight"):
            return 1.0 + 0.1 * rng.standard_normal(d)
        if name == "model.embed_tokens.weight":
            return 0.25 * rng.standard_normal((vocab_size, d))  # logits of O(1): a flat prior
        kind = name.split(".")[-2]
        return rng.standard_normal(shapes[kind]) / np.sqrt(shapes[kind][1])

    return Llama.from_hf_tensors(config, tensor)


class LetterReward(eqx.Module):
    """Ratio-weighted potential ``log psi(x_{1:t}) = REWARD_PER_A · (number of "a" letters)``."""

    letters: Float[Array, " V"] = eqx.field(
        default_factory=lambda: jnp.array([v.count(b"a") for v in VOCAB], jnp.float32)
    )

    def init(self, n: int) -> Float[Array, " N"]:
        return jnp.zeros(n)

    def update(self, previous, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]):
        valid = jnp.arange(tokens.shape[1]) < lengths[:, None]
        log_psi = REWARD_PER_A * jnp.sum(jnp.where(valid, self.letters[jnp.maximum(tokens, 0)], 0.0), axis=1)
        return log_psi, log_psi - previous


def tiny_generation(lm: Llama, proposal: str = "locally_optimal", prompt: Any = PROMPT, **kwargs) -> ppl.Generation:
    """``gamma(x) = p_LM(x | prompt) · 1[x matches PATTERN, ends with EOS] · exp(0.7 · #a)``
    over at most ``MAX_NEW`` tokens; extra keyword arguments go to :class:`ppl.Generation`.

    ``prompt`` may be a traced array (one of several prompts chosen by a latent); pass a
    prebuilt ``constraint=`` to skip compiling the regex on every call."""
    if "constraint" not in kwargs:
        kwargs["constraint"] = regex(PATTERN, tiny_tokenizer())
    options = dict(potentials=[LetterReward()], proposal=proposal, require_eos=True)
    return ppl.Generation(lm, jnp.asarray(prompt, jnp.int32), MAX_NEW, EOS, **{**options, **kwargs})


@eqx.filter_jit
def _teacher_forced_log_probs(lm: Llama, sequences: Int[Array, "B L"]) -> Float[Array, "B L V"]:
    return jax.nn.log_softmax(jax.vmap(lm)(sequences))


def _scored_bodies(lm: Llama, prompt: Any) -> list[tuple[tuple[int, ...], np.ndarray]]:
    """Every body in the support with ``log p_LM`` of each of its tokens and of the EOS after
    it; the sequences of one length are scored in one batched forward pass (one compilation
    per length, not one eager pass per sequence)."""
    scored = []
    prompt = tuple(int(v) for v in np.asarray(prompt))
    for length in range(MAX_NEW):
        bodies = [body for body in itertools.product(range(6), repeat=length) if re.fullmatch(PATTERN, _text(body))]
        if not bodies:
            continue
        sequences = jnp.array([prompt + body + (EOS,) for body in bodies], jnp.int32)
        log_probs = _teacher_forced_log_probs(lm, sequences)[:, len(prompt) - 1 : -1]
        targets = sequences[:, len(prompt) :]
        per_token = np.asarray(jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0], np.float64)
        scored += list(zip(bodies, per_token))
    return scored


def enumerate_posterior(lm: Llama, prompt: Any = PROMPT) -> dict[tuple[int, ...], float]:
    """``log gamma`` of every continuation ``x_1..x_L, EOS`` (``L < MAX_NEW``) in the support of
    :func:`tiny_generation`'s target (for the same ``prompt``), keyed by its tokens before EOS."""
    return {body: float(lp.sum()) + REWARD_PER_A * _text(body).count("a") for body, lp in _scored_bodies(lm, prompt)}


def optimal_log_twist(lm: Llama, prompt: Any = PROMPT) -> dict[tuple[int, ...], float]:
    """The optimal twist of :func:`tiny_generation`, by enumeration: for every unfinished
    prefix ``x_{1:t}`` of a sequence in the support, ``log psi*_t = log Z(x_{1:t}) - log
    gamma_t(x_{1:t})``, where ``Z(x_{1:t})`` sums ``gamma`` over the sequences that start with
    it and ``gamma_t`` is ``p_LM`` times the reward of the prefix. With it the twisted
    intermediate targets are the posterior's marginals (what contrastive twist learning
    converges to)."""
    z, gamma_t = {}, {}
    for body, lp in _scored_bodies(lm, prompt):
        log_gamma = float(lp.sum()) + REWARD_PER_A * _text(body).count("a")
        for t in range(1, len(body) + 1):
            prefix = body[:t]
            z[prefix] = np.logaddexp(z.get(prefix, -np.inf), log_gamma)
            gamma_t[prefix] = float(lp[:t].sum()) + REWARD_PER_A * _text(prefix).count("a")
    return {prefix: z[prefix] - gamma_t[prefix] for prefix in z}


class TableTwist(eqx.Module):
    """A twist given as a table over every prefix of at most ``MAX_NEW`` tokens (e.g.
    :func:`optimal_log_twist`): ``twist(state)[i, v]`` is the value of particle ``i``'s
    tokens followed by ``v``; EOS (which finishes the sequence) gets 0, a prefix missing from
    the table ``missing`` (a large negative number, not ``-inf``: no ``inf - inf``)."""

    table: Float[Array, " P"]

    def __init__(self, log_twist: dict[tuple[int, ...], float], missing: float = -30.0):
        table = np.full(_OFFSETS[-1], missing, np.float32)
        for prefix, value in log_twist.items():
            table[_prefix_index(prefix)] = value
        for prefix in itertools.chain.from_iterable(
            itertools.product(range(len(VOCAB)), repeat=n) for n in range(MAX_NEW)
        ):
            table[_prefix_index(prefix + (EOS,))] = 0.0
        self.table = jnp.asarray(table)

    def __call__(self, state: ppl.TokenState) -> Float[Array, "N V"]:
        positions = jnp.arange(state.tokens.shape[1])
        powers = jnp.where(
            positions < state.length[:, None], len(VOCAB) ** jnp.maximum(state.length[:, None] - 1 - positions, 0), 0
        )
        head = jnp.sum(jnp.maximum(state.tokens, 0) * powers, axis=1)  # the prefix in base V
        offsets = jnp.asarray(_OFFSETS)[jnp.minimum(state.length + 1, MAX_NEW)]
        index = offsets[:, None] + head[:, None] * len(VOCAB) + jnp.arange(len(VOCAB))
        return self.table[jnp.minimum(index, self.table.shape[0] - 1)]


_OFFSETS = np.cumsum([0] + [len(VOCAB) ** n for n in range(MAX_NEW + 1)])  # first index of each prefix length


def _prefix_index(prefix: tuple[int, ...]) -> int:
    return int(_OFFSETS[len(prefix)] + sum(v * len(VOCAB) ** (len(prefix) - 1 - i) for i, v in enumerate(prefix)))


def posterior_choices(exact: dict[tuple[int, ...], float], key: jax.Array, n: int) -> dict[str, Array]:
    """``n`` exact posterior draws from ``exact`` (:func:`enumerate_posterior`) as trajectories
    of :func:`tiny_generation` (``{"token": [n, MAX_NEW + 1]}``: column 0 is ``init``'s,
    then the tokens, EOS, zeros once finished), for conditional SMC and ``ppl.inference.ctl``."""
    bodies = list(exact)
    rows = np.zeros((len(bodies), MAX_NEW + 1), np.int32)
    for i, body in enumerate(bodies):
        rows[i, 1 : len(body) + 2] = body + (EOS,)
    index = jax.random.categorical(key, jnp.array(list(exact.values())), shape=(n,))
    return {"token": jnp.asarray(rows)[index]}


def _text(body: tuple[int, ...]) -> str:
    return b"".join(VOCAB[v] for v in body).decode()
