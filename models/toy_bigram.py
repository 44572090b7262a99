"""A tiny bigram language model under a DFA constraint and a soft potential, with exact ``Z``.

It is the smallest model with the structure of constrained LM generation: a next-token
distribution, an end-of-sequence token, a hard (regular-language) constraint and a reward.

The LM over a vocabulary of ``V`` tokens (``eos_id`` ends a sequence)::

    x_1     ~ Categorical(start_probs)
    x_{t+1} ~ Categorical(bigram_probs[x_t])         (row = previous token)

A sequence ``x = x_1..x_L`` stops at its first EOS, or is truncated at ``L = max_tokens``
(truncation is the forced stop of a generation budget). The target over sequences is::

    gamma(x) = p_LM(x)                                    prefix probability of x_1..x_L
             · Π_{t: x_t ≠ EOS} 1[DFA does not reject x_1..x_t]
             · exp(Σ_{t=1..L} token_scores[x_t])         the EOS token is scored too
             · 1[x_L = EOS ⇒ DFA state after x_1..x_{L-1} is accepting]

Conventions: the DFA starts in state 0 and reads every non-EOS token
(``dfa_transitions[s, v]`` is the next state, ``-1`` rejects; the EOS column is ignored);
EOS itself is not fed to the DFA, it *tests* acceptance of the state it sees. A sequence
truncated at ``max_tokens`` without EOS is allowed whether or not its DFA state accepts
(it only must not have been rejected). ``Z = Σ_x gamma(x)`` is computed by dynamic
programming over (last token × DFA state) in :meth:`ConstrainedBigram.log_z` and, as a test
oracle, by brute-force enumeration in :meth:`ConstrainedBigram.enumerate_sequences`.

Token buffers are ``[max_tokens]`` int arrays padded with ``PAD = -1`` after the sequence's
last token (EOS included in the sequence and in its length).
"""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import ppl

PAD = -1
_MAX_ENUMERATION = 2_000_000


def _concrete(*arrays: jax.Array) -> bool:
    """True when every array has a value (not a tracer), so value checks can run."""
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _normalised_log(probs: Float[Array, "... V"]) -> Float[Array, "... V"]:
    log_p = jnp.log(probs)
    return log_p - jax.nn.logsumexp(log_p, axis=-1, keepdims=True)


class ConstrainedBigram(eqx.Module):
    """Bigram LM × DFA constraint × token-score potential; see the module docstring for the target.

    ``eos_id`` and ``max_tokens`` are static (they fix shapes and control flow); everything
    else is an array leaf. ``vocab`` optionally names the tokens for :meth:`decode`.
    """

    start_probs: Float[Array, " V"] = eqx.field(converter=jnp.asarray)
    bigram_probs: Float[Array, "V V"] = eqx.field(converter=jnp.asarray)
    dfa_transitions: Int[Array, "S V"] = eqx.field(converter=jnp.asarray)
    dfa_accepting: Bool[Array, " S"] = eqx.field(converter=jnp.asarray)
    token_scores: Float[Array, " V"] = eqx.field(converter=jnp.asarray)
    eos_id: int = eqx.field(static=True)
    max_tokens: int = eqx.field(static=True)
    vocab: tuple[str, ...] | None = eqx.field(static=True, default=None)

    def __check_init__(self) -> None:
        if self.start_probs.ndim != 1:
            raise ValueError(f"start_probs must be a vector [V], got shape {self.start_probs.shape}")
        v = self.start_probs.shape[0]
        if self.bigram_probs.shape != (v, v):
            raise ValueError(f"bigram_probs must be [V, V] = {(v, v)}, got {self.bigram_probs.shape}")
        if self.token_scores.shape != (v,):
            raise ValueError(f"token_scores must be [V] = {(v,)}, got {self.token_scores.shape}")
        if self.dfa_transitions.ndim != 2 or self.dfa_transitions.shape[1] != v:
            raise ValueError(f"dfa_transitions must be [S, V={v}], got {self.dfa_transitions.shape}")
        if not jnp.issubdtype(self.dfa_transitions.dtype, jnp.integer):
            raise ValueError(f"dfa_transitions must be integer states, got dtype {self.dfa_transitions.dtype}")
        s = self.dfa_transitions.shape[0]
        if self.dfa_accepting.shape != (s,) or self.dfa_accepting.dtype != jnp.bool_:
            got = f"{self.dfa_accepting.dtype}{list(self.dfa_accepting.shape)}"
            raise ValueError(f"dfa_accepting must be a bool vector [S={s}], got {got}")
        if not 0 <= self.eos_id < v:
            raise ValueError(f"eos_id={self.eos_id} is outside the vocabulary [0, {v})")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.vocab is not None and len(self.vocab) != v:
            raise ValueError(f"vocab names {len(self.vocab)} tokens but V={v}")
        if _concrete(self.dfa_transitions) and bool(jnp.any((self.dfa_transitions < -1) | (self.dfa_transitions >= s))):
            raise ValueError(f"dfa_transitions entries must be -1 (reject) or a state in [0, {s})")
        for name in ("start_probs", "bigram_probs"):
            probs = getattr(self, name)
            if _concrete(probs) and (bool(jnp.any(probs < 0)) or not bool(jnp.allclose(probs.sum(-1), 1.0, atol=1e-3))):
                raise ValueError(f"{name} must be non-negative and sum to 1 along its last axis")

    @property
    def vocab_size(self) -> int:
        return self.start_probs.shape[0]

    @property
    def n_dfa_states(self) -> int:
        return self.dfa_transitions.shape[0]

    # ----------------------------------------------------------------- exact computations

    def _local_log_potentials(self, dfa_state: Int[Array, ""]) -> tuple[Float[Array, " V"], Int[Array, " V"]]:
        """Hard log-potential of each candidate next token from ``dfa_state``, and the next states."""
        next_states = self.dfa_transitions[dfa_state]
        is_eos = jnp.arange(self.vocab_size) == self.eos_id
        accept = jnp.where(self.dfa_accepting[dfa_state], 0.0, -jnp.inf)
        hard = jnp.where(is_eos, accept, jnp.where(next_states < 0, -jnp.inf, 0.0))
        return hard, next_states

    @eqx.filter_jit
    def log_z(self) -> Float[Array, ""]:
        """``log Σ_x gamma(x)`` by dynamic programming, one ``lax.scan`` over token positions.

        ``alpha[v, s]`` is the log mass of unfinished prefixes whose last token is ``v`` and
        DFA state is ``s``; EOS moves mass out of ``alpha`` into ``log_ended``.
        """
        v, s = self.vocab_size, self.n_dfa_states
        log_bigram = _normalised_log(self.bigram_probs)
        is_eos = jnp.arange(v) == self.eos_id
        # log 1[dfa(s, v) = s'] as [S, V, S]; a rejecting transition has no successor.
        moves = jnp.where(self.dfa_transitions[:, :, None] == jnp.arange(s), 0.0, -jnp.inf)
        log_accept = jnp.where(self.dfa_accepting, 0.0, -jnp.inf)

        def emit(incoming: Float[Array, "S V"]):
            """Mass of (DFA state, next token) -> new live prefixes and newly ended sequences."""
            scored = incoming + self.token_scores
            alpha = jax.nn.logsumexp(scored[:, :, None] + moves, axis=0)  # [V, S]
            alpha = jnp.where(is_eos[:, None], -jnp.inf, alpha)
            ended = jax.nn.logsumexp(scored[:, self.eos_id] + log_accept)
            return alpha, ended

        first = jnp.full((s, v), -jnp.inf).at[0].set(_normalised_log(self.start_probs))
        alpha, log_ended = emit(first)

        def advance(carry, _):
            alpha, log_ended = carry
            incoming = jax.nn.logsumexp(alpha[:, :, None] + log_bigram[:, None, :], axis=0)  # [S, V]
            alpha, ended = emit(incoming)
            return (alpha, jnp.logaddexp(log_ended, ended)), None

        (alpha, log_ended), _ = jax.lax.scan(advance, (alpha, log_ended), None, length=self.max_tokens - 1)
        return jnp.logaddexp(log_ended, jax.nn.logsumexp(alpha))  # ended + truncated at max_tokens

    @eqx.filter_jit
    def sequence_lengths(self, tokens: Int[Array, "... T"]) -> Int[Array, ...]:
        """Length of each padded sequence: up to and including the first EOS, before the first PAD."""
        positions = jnp.arange(self.max_tokens)
        end = jnp.where(tokens == self.eos_id, positions + 1, jnp.where(tokens == PAD, positions, self.max_tokens))
        return jnp.min(end, axis=-1)

    @eqx.filter_jit
    def log_joint(self, tokens: Int[Array, " T"]) -> Float[Array, ""]:
        """``log gamma(x)`` for one PAD-padded token buffer (``-inf`` outside the support)."""
        length = self.sequence_lengths(tokens)
        log_start, log_bigram = _normalised_log(self.start_probs), _normalised_log(self.bigram_probs)

        def read(carry, inputs):
            dfa_state, prev = carry
            t, token = inputs
            hard, next_states = self._local_log_potentials(dfa_state)
            lm = jnp.where(t == 0, log_start[token], log_bigram[prev, token])
            active = t < length
            log_w = jnp.where(active, lm + self.token_scores[token] + hard[token], 0.0)
            next_state = jnp.where(active & (token != self.eos_id), next_states[token], dfa_state)
            return (jnp.maximum(next_state, 0), token), log_w  # a reject already weighs -inf

        safe_tokens = jnp.maximum(tokens, 0)
        _, log_ws = jax.lax.scan(read, (jnp.int32(0), jnp.int32(0)), (jnp.arange(self.max_tokens), safe_tokens))
        return jnp.where(length > 0, jnp.sum(log_ws), -jnp.inf)

    def sequence_codes(self, tokens: Int[Array, "... T"]) -> Int[Array, ...]:
        """A unique int per PAD-padded sequence (base ``V+1`` digits), to histogram particles
        against :meth:`enumerate_posterior`. Entries after a sequence's end must be PAD."""
        base = self.vocab_size + 1
        if base**self.max_tokens >= 2**31:
            raise ValueError(f"(V+1)^T = {base}^{self.max_tokens} does not fit int32 codes")
        weights = jnp.asarray(base ** np.arange(self.max_tokens), jnp.int32)
        return jnp.sum((jnp.asarray(tokens) + 1) * weights, axis=-1)

    def enumerate_sequences(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every sequence of the support's superset, with its unnormalised ``log gamma`` (float64).

        Brute force in NumPy, independent of :meth:`log_z`: all sequences ``w EOS`` with
        ``w`` free of EOS and ``len(w) < max_tokens``, plus all EOS-free sequences of length
        ``max_tokens``. Returns ``(tokens [M, T] PAD-padded, lengths [M], log_gamma [M])``;
        ``log_gamma`` is ``-inf`` where a constraint excludes the sequence.
        """
        v, t_max, eos = self.vocab_size, self.max_tokens, self.eos_id
        words = [w for w in range(v) if w != eos]
        count = sum(len(words) ** n for n in range(t_max)) + len(words) ** t_max
        if count > _MAX_ENUMERATION:
            raise ValueError(f"enumeration would list {count} sequences (> {_MAX_ENUMERATION})")
        rows = [list(p) + [eos] for n in range(t_max) for p in itertools.product(words, repeat=n)]
        rows += [list(p) for p in itertools.product(words, repeat=t_max)]
        lengths = np.array([len(r) for r in rows])
        tokens = np.full((count, t_max), PAD, np.int64)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = row
        return tokens, lengths, self._log_gamma_numpy(tokens, lengths)

    def _log_gamma_numpy(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The target's definition evaluated literally, position by position, in float64."""
        start = np.asarray(self.start_probs, np.float64)
        bigram = np.asarray(self.bigram_probs, np.float64)
        start, bigram = start / start.sum(), bigram / bigram.sum(-1, keepdims=True)
        scores = np.asarray(self.token_scores, np.float64)
        dfa, accepting = np.asarray(self.dfa_transitions), np.asarray(self.dfa_accepting)
        n = tokens.shape[0]
        prob, log_score = np.ones(n), np.zeros(n)
        dfa_state = np.zeros(n, np.int64)
        for t in range(self.max_tokens):
            active = t < lengths
            token = np.where(active, tokens[:, t], 0)
            lm = start[token] if t == 0 else bigram[np.where(active, tokens[:, t - 1], 0), token]
            is_eos = active & (token == self.eos_id)
            next_state = dfa[dfa_state, token]
            allowed = np.where(is_eos, accepting[dfa_state], next_state >= 0)
            prob *= np.where(active, lm * allowed, 1.0)
            log_score += np.where(active, scores[token], 0.0)
            dfa_state = np.where(active & ~is_eos, np.maximum(next_state, 0), dfa_state)
        with np.errstate(divide="ignore"):
            return np.log(prob) + log_score

    def enumerate_posterior(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The exact posterior ``gamma / Z`` over its support, by enumeration.

        Returns ``(tokens [M, T] PAD-padded, lengths [M], log_probs [M])`` for the ``M``
        sequences with positive mass; ``exp(log_probs)`` sums to 1.
        """
        tokens, lengths, log_gamma = self.enumerate_sequences()
        keep = np.isfinite(log_gamma)
        log_gamma = log_gamma[keep]
        top = log_gamma.max()
        log_z = top + np.log(np.sum(np.exp(log_gamma - top)))
        return tokens[keep], lengths[keep], log_gamma - log_z

    def decode(self, tokens: Int[Array, " T"]) -> str:
        """Host-side: the named tokens of one padded sequence, space-separated."""
        names = self.vocab or tuple(str(i) for i in range(self.vocab_size))
        length = int(self.sequence_lengths(jnp.asarray(tokens)))
        return " ".join(names[int(tok)] for tok in np.asarray(tokens)[:length])

    def program(self, optimal_proposal: bool = False) -> BigramProgram:
        """This model as a state-space program whose target is ``gamma`` (so ``log Z = log_z()``)."""
        return BigramProgram(self, optimal_proposal)


class BigramProgram(ppl.StateSpace):
    """Token-by-token generation of :class:`ConstrainedBigram` as a :class:`ppl.StateSpace`.

    ``init`` is the empty sequence (nothing sampled); step ``t`` samples token ``x_{t+1}``
    (site ``"token"``) from the start row or the previous token's bigram row, then adds two
    potentials: ``"constraint"`` (``0`` or ``-inf``: DFA reject, or EOS in a non-accepting
    state) and ``"score"`` (``token_scores[x_{t+1}]``). EOS or a rejection finishes the
    particle; ``done`` is ``finished or length == max_tokens``; ``max_steps = max_tokens``.

    With ``optimal_proposal=True`` the token site carries the locally optimal proposal
    ``q(v) ∝ p_LM(v | prev) · exp(score[v]) · 1[v allowed]`` (the prior when nothing is allowed).
    """

    model: ConstrainedBigram
    optimal_proposal: bool = eqx.field(static=True, default=False)

    @property
    def max_steps(self) -> int:
        return self.model.max_tokens

    def init(self) -> dict[str, jax.Array]:
        return {
            "tokens": jnp.full((self.model.max_tokens,), PAD, jnp.int32),
            "length": jnp.int32(0),
            "last_token": jnp.int32(PAD),
            "dfa_state": jnp.int32(0),
            "finished": jnp.bool_(False),
        }

    def step(self, state: dict[str, jax.Array], t: Int[Array, ""]) -> dict[str, jax.Array]:
        m = self.model
        prior_logits = jnp.where(
            state["length"] == 0,
            _normalised_log(m.start_probs),
            _normalised_log(m.bigram_probs)[jnp.maximum(state["last_token"], 0)],
        )
        hard, next_states = m._local_log_potentials(state["dfa_state"])
        infer = {}
        if self.optimal_proposal:
            local = prior_logits + m.token_scores + hard
            # If every token is excluded, propose from the prior; the constraint then weighs -inf.
            infer = {"proposal": dist.Categorical(logits=jnp.where(jnp.any(jnp.isfinite(local)), local, prior_logits))}
        token = numpyro.sample("token", dist.Categorical(logits=prior_logits), infer=infer).astype(jnp.int32)
        numpyro.factor("constraint", hard[token])
        numpyro.factor("score", m.token_scores[token])
        is_eos = token == m.eos_id
        rejected = ~is_eos & (next_states[token] < 0)
        return {
            "tokens": state["tokens"].at[state["length"]].set(token, mode="drop"),
            "length": state["length"] + 1,
            "last_token": token,
            "dfa_state": jnp.where(is_eos, state["dfa_state"], next_states[token]).astype(jnp.int32),
            "finished": is_eos | rejected,
        }

    def done(self, state: dict[str, jax.Array]) -> Bool[Array, ""]:
        return state["finished"] | (state["length"] >= self.model.max_tokens)


@eqx.filter_jit
def random_bigram(
    key: PRNGKeyArray,
    vocab_size: int,
    n_dfa_states: int,
    max_tokens: int,
    *,
    reject_prob: float = 0.25,
    score_scale: float = 0.5,
    logit_scale: float = 1.0,
) -> ConstrainedBigram:
    """A random instance with ``eos_id = vocab_size - 1`` and ``Z > 0`` guaranteed.

    LM rows are softmaxes of N(0, ``logit_scale²``) logits; each DFA transition rejects with probability
    ``reject_prob`` and otherwise jumps to a uniform state, except that every state keeps one
    non-EOS token that does not reject (so length-``max_tokens`` sequences survive) and at
    least one state accepts. Token scores are N(0, ``score_scale²``).
    """
    eos_id = vocab_size - 1
    v, s = vocab_size, n_dfa_states
    key_normal, key_uniform = jax.random.split(key)
    normals = jax.random.normal(key_normal, (v + v * v + v,))  # LM logits and scores, one draw
    start_probs = jax.nn.softmax(logit_scale * normals[:v])
    bigram_probs = jax.nn.softmax(logit_scale * normals[v : v + v * v].reshape(v, v), axis=-1)
    token_scores = score_scale * normals[v + v * v :]
    uniforms = jax.random.uniform(key_uniform, (2 * s * v + 2 * s + 1,))  # DFA choices, one draw
    targets = jnp.floor(uniforms[: s * v] * s).astype(jnp.int32).reshape(s, v)
    rejects = (uniforms[s * v : 2 * s * v] < reject_prob).reshape(s, v)
    kept_token = jnp.floor(uniforms[2 * s * v : 2 * s * v + s] * (v - 1)).astype(jnp.int32)  # non-EOS
    rejects = rejects & (jnp.arange(v) != kept_token[:, None])
    dfa_transitions = jnp.where(rejects, -1, jnp.minimum(targets, s - 1)).at[:, eos_id].set(-1)
    accepting = uniforms[2 * s * v + s : 2 * s * v + 2 * s] < 0.5
    accepting = accepting.at[jnp.floor(uniforms[-1] * s).astype(jnp.int32)].set(True)
    return ConstrainedBigram(start_probs, bigram_probs, dfa_transitions, accepting, token_scores, eos_id, max_tokens)


def abc_bigram(max_tokens: int = 6) -> ConstrainedBigram:
    """A hand-made instance over {a, b, c, EOS}: "no two b's in a row, and at least one c".

    The LM likes ``b b`` and rarely says ``c``, the score rewards ``b`` and penalises ``c``,
    so the constraint and the potential pull against the prior and against each other.
    DFA states: 0 = no c yet, last ≠ b; 1 = no c yet, last = b; 2 = seen c, last ≠ b;
    3 = seen c, last = b; accepting = {2, 3}.
    """
    a, b, c, eos = 0, 1, 2, 3
    dfa = np.full((4, 4), -1, np.int32)
    dfa[0, [a, b, c]] = [0, 1, 2]
    dfa[1, [a, c]] = [0, 2]
    dfa[2, [a, b, c]] = [2, 3, 2]
    dfa[3, [a, c]] = [2, 2]
    return ConstrainedBigram(
        start_probs=np.array([0.5, 0.3, 0.1, 0.1], np.float32),
        bigram_probs=np.array(
            [
                [0.3, 0.3, 0.2, 0.2],  # after a
                [0.2, 0.4, 0.2, 0.2],  # after b: likes another b (forbidden)
                [0.4, 0.2, 0.1, 0.3],  # after c
                [0.25, 0.25, 0.25, 0.25],  # after EOS: never used
            ],
            np.float32,
        ),
        dfa_transitions=dfa,
        dfa_accepting=np.array([False, False, True, True]),
        token_scores=np.array([0.0, 0.5, -0.5, 0.0], np.float32),
        eos_id=eos,
        max_tokens=max_tokens,
        vocab=("a", "b", "c", "<eos>"),
    )
