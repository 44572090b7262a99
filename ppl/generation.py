"""Language-model generation as a batched state-space program.

:class:`Generation` is the program behind constrained and reward-guided generation. For a
prompt ``c`` it targets

    gamma(x) = p_LM(x | c) · 1[x satisfies the constraint] · prod_t G_t(x_{1:t})

over continuations ``x`` of at most ``max_new_tokens`` tokens that end at EOS or at the
limit. Each ``step`` draws one token for every particle with one batched decode
(:class:`ppl.NextToken`); the constraint enters as a 0/-inf potential, the rewards as the
log-increments of their :mod:`ppl.rewards` weighting. Inference (``ppl.inference.smc``)
resamples the KV cache on device through the LM's ``reindex``.

Proposals (the target never changes):

- ``"prior"``: sample from ``p_LM``; a token the constraint forbids kills its particle.
- ``"locally_optimal"``: sample from ``p_LM`` restricted to the allowed tokens and
  renormalised; the weight is the allowed mass ``sum_{v allowed} p_LM(v | x_{<t})`` (the
  ``log p - log q`` that :class:`ppl.propose` adds), exact as in LLaMPPL's token masks.
- a user ``twist`` (twisted SMC, Zhao et al. 2024): ``twist(state) -> [N, V]`` gives
  ``log psi_t(x_{<t}, v)`` for every candidate next token ``v``, a look-ahead guess of how
  well each continuation will score. Tokens are drawn from ``q ∝ p_LM · psi_t`` (times the
  mask, if any), the intermediate targets become ``p · psi_t`` and the weight increment is
  ``log sum_v p_LM(v) psi_t(v) - log psi_{t-1}``; a particle's last twist is divided out
  when it finishes, so the final target is unchanged whatever the twist.

Steps (the resampling points) are single tokens, or, with ``delimiter`` and
``step="chunk"``, chunks that end at a delimiter token (a line, a reasoning step, a word):
every particle generates until its chunk ends while the finished ones wait (a barrier), then
potentials are applied and SMC may resample. A chunk is one ``"chunk"`` sample site (its
tokens, ``[N, max_new_tokens]``, see :class:`Chunk`) drawn inside one ``while_loop`` by the
same two proposals, its weight accumulated token by token, so trajectories record it and
conditional SMC can pin it; user proposals given to ``smc(proposal=...)`` reach token-level
steps only. ``max_chunks`` ends a sequence after that many delimiters, whatever the step.

Trajectories: the site ``"token"`` (``[N]`` per step) or ``"chunk"``; ``init`` draws nothing.

``require_eos=True`` restricts the target to sequences that end with EOS within the limit;
without it a sequence cut at the limit is kept as is, which is the LM's own distribution of
its first ``max_new_tokens`` tokens (and a constraint only asks that the cut text can still
be completed). Under ``require_eos`` the masks are budget-aware (``allowed``): a token after
which the constraint cannot accept, plus EOS, within the tokens left is masked. Those
sequences have zero target mass already, so Z and the posterior do not change, and the
locally optimal proposal never walks into a dead end; ``ppl.AcceptanceTwist`` adds the
automaton's look-ahead as a twist.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jaxtyping import Array, Bool, Float, Int
from numpyro.distributions import constraints

from ppl.distributions import Categorical, NextToken, check_prompt, prompt_cache, sample_logits
from ppl.handlers import sample_with_intermediates
from ppl.lm import LM, Cache, TokenConstraint
from ppl.program import StateSpace
from ppl.rewards import incremental

PROPOSALS = ("prior", "locally_optimal")


class TokenState(NamedTuple):
    """The particle batch of a generation program (``N`` particles, ``T`` new tokens).

    ``tokens[i, :length[i]]`` are particle ``i``'s generated tokens, EOS excluded (the rest
    is ``-1``); ``last`` is the token the KV cache has not seen yet; ``finished`` marks EOS,
    the token limit or ``max_chunks``, and ``ended_with_eos`` the first of these;
    ``n_chunks`` counts delimiters; ``log_twist`` is the twist of the current prefix.
    ``Generation.completions`` turns ``tokens`` into :class:`ppl.LanguageModel`'s form (EOS
    included), the one to score answers with.
    """

    tokens: Int[Array, "N T"]
    length: Int[Array, " N"]
    last: Int[Array, " N"]
    finished: Bool[Array, " N"]
    ended_with_eos: Bool[Array, " N"]
    n_chunks: Int[Array, " N"]
    log_twist: Float[Array, " N"]
    constraint_state: Int[Array, " N"]
    cache: Cache
    potential_carry: tuple


def _masked_logits(logits: Float[Array, "N V"], allowed: Bool[Array, "N V"]) -> Float[Array, "N V"]:
    """The locally optimal proposal's logits; a row with nothing allowed keeps its prior
    (the constraint factor kills it), so no row is an all ``-inf`` categorical."""
    masked = jnp.where(allowed, logits, -jnp.inf)
    return jnp.where(jnp.any(allowed, axis=-1, keepdims=True), masked, logits)


def _call_twist(twist: Callable, state: TokenState, next_token: NextToken) -> Float[Array, "N V"]:
    """``twist(state)``, or ``twist(state, features)`` for a twist that declares
    ``uses_features`` (a learned head, ``ppl.models.heads``): the decode's features, no
    second forward pass. The shape is checked here, while tracing."""
    if getattr(twist, "uses_features", False):
        if next_token.features is None:
            raise TypeError(
                "this twist needs the decode's features: use an LM with decode_with_features (ppl.lm.FeatureLM)"
            )
        log_twist = twist(state, next_token.features)
    else:
        log_twist = twist(state)
    if jnp.shape(log_twist) != next_token.logits.shape:
        raise ValueError(
            f"twist returned shape {list(jnp.shape(log_twist))}; it must give log psi of every next token, "
            f"[particles, vocab] = {list(next_token.logits.shape)}"
        )
    return log_twist


class Generation(StateSpace):
    """Generate up to ``max_new_tokens`` tokens after ``prompt`` under a constraint and
    potentials; see the module docstring for the target, the proposals and chunk steps.

    Args:
        lm: any :class:`ppl.lm.LM`.
        prompt: ``[P]`` token ids (chat template already applied), ``P >= 1``.
        max_new_tokens: the token budget ``T`` (and the most steps).
        eos_token_id: the token that ends a sequence.
        constraint: a token-level automaton (``ppl.models.constraints``), or ``None``.
        potentials: log potentials ``(tokens, lengths, done) -> log psi`` (:mod:`ppl.rewards`),
            added in log space; a bare potential gets ratio weighting (its value on the
            finished sequence is the factor), wrap it in ``ppl.rewards.incremental`` to choose.
        proposal: ``"prior"`` or ``"locally_optimal"`` (needs a mask to matter).
        require_eos: keep only sequences that end with EOS within the budget.
        delimiter: ``[V]`` booleans, the tokens that end a chunk
            (``ppl.models.constraints.delimiter_tokens``).
        step: ``"token"`` or ``"chunk"`` (needs ``delimiter``).
        max_chunks: finish a sequence after this many delimiters.
        twist: ``twist(state) -> [N, V]`` log twist of every next token (token steps only);
            ``twist(state, features)`` if it sets ``uses_features`` (``ppl.models.heads``).
        max_len: the KV-cache buffer (default: exactly what the prompt and budget need).
        prompt_length: the real length of a right-padded ``prompt`` (default: all of it);
            :meth:`for_prompts` builds such programs for a batch of prompts.
    """

    batched: ClassVar[bool] = True
    lm: LM
    prompt: Int[Array, " P"]
    prompt_length: Int[Array, ""] | None
    constraint: TokenConstraint | None
    potentials: tuple
    delimiter: Bool[Array, " V"] | None
    twist: Callable[[TokenState], Float[Array, "N V"]] | None
    max_steps: int = eqx.field(static=True)
    eos_token_id: int = eqx.field(static=True)
    proposal: str = eqx.field(static=True)
    require_eos: bool = eqx.field(static=True)
    chunked: bool = eqx.field(static=True)
    max_chunks: int | None = eqx.field(static=True)
    max_len: int = eqx.field(static=True)

    def __init__(
        self,
        lm: LM,
        prompt: Any,
        max_new_tokens: int,
        eos_token_id: int,
        *,
        constraint: TokenConstraint | None = None,
        potentials: Sequence[Any] = (),
        proposal: str = "prior",
        require_eos: bool = False,
        delimiter: Any = None,
        step: str = "token",
        max_chunks: int | None = None,
        twist: Callable[[TokenState], Float[Array, "N V"]] | None = None,
        max_len: int | None = None,
        prompt_length: int | Int[Array, ""] | None = None,
    ):
        self.max_len = check_prompt(jnp.asarray(prompt), max_new_tokens, max_len)
        padded = jnp.shape(prompt)[0]
        if prompt_length is not None and not isinstance(prompt_length, jax.core.Tracer):
            if not 1 <= int(prompt_length) <= padded:
                raise ValueError(f"prompt_length={int(prompt_length)} must lie in [1, {padded}] (the padded prompt)")
        self.prompt_length = None if prompt_length is None else jnp.asarray(prompt_length, jnp.int32)
        if proposal not in PROPOSALS:
            raise ValueError(f"unknown proposal {proposal!r}; choose one of {PROPOSALS}")
        if step not in ("token", "chunk"):
            raise ValueError(f"step must be 'token' or 'chunk', got {step!r}")
        if delimiter is None and (step == "chunk" or max_chunks is not None):
            raise ValueError("step='chunk' and max_chunks need a delimiter (a [vocab_size] boolean array)")
        if twist is not None and step == "chunk":
            raise ValueError("a twist applies to token steps; use step='token'")
        if delimiter is not None and jnp.shape(delimiter) != (lm.vocab_size,):
            raise ValueError(
                f"delimiter must have shape ({lm.vocab_size},) like the LM's vocabulary, got {jnp.shape(delimiter)}"
            )
        if not 0 <= eos_token_id < lm.vocab_size:
            raise ValueError(f"eos_token_id={eos_token_id} is outside the vocabulary of {lm.vocab_size} tokens")
        if constraint is not None:
            constraint.check_vocab(lm.vocab_size)
        self.lm, self.prompt = lm, jnp.asarray(prompt, jnp.int32)
        self.max_steps, self.eos_token_id = max_new_tokens, eos_token_id
        self.constraint = constraint
        # A bare potential gets ratio weighting: its value on the finished sequence is the factor.
        self.potentials = tuple(p if hasattr(p, "update") else incremental(p) for p in potentials)
        self.proposal, self.require_eos = proposal, require_eos
        self.delimiter = None if delimiter is None else jnp.asarray(delimiter, bool)
        self.chunked, self.max_chunks, self.twist = step == "chunk", max_chunks, twist

    @classmethod
    def for_prompts(
        cls, lm: LM, prompts: Sequence[Any], max_new_tokens: int, eos_token_id: int, **options: Any
    ) -> list[Generation]:
        """One program per prompt, all of one shape: the prompts right-padded to the longest
        (``prompt_length`` keeps each one's own length) and one cache buffer ``max_len``, so
        ``ppl.inference.smc_batch`` runs them as one batch. ``options`` go to every program
        (build a constraint once and pass it here: the programs then share it).

        Program ``i`` gives the same result as ``Generation(lm, prompts[i], ...,
        max_len=programs[i].max_len)`` (the padding is cut off the cache; see
        :func:`ppl.prompt_cache`)."""
        prompts = [jnp.asarray(prompt, jnp.int32) for prompt in prompts]
        if not prompts:
            raise ValueError("prompts is empty: give at least one prompt")
        for index, prompt in enumerate(prompts):
            if prompt.ndim != 1 or prompt.shape[0] == 0:
                raise ValueError(
                    f"prompt {index} of the batch has shape {list(prompt.shape)}: every prompt must be a non-empty "
                    "1-D array of token ids (give at least the model's BOS token)"
                )
        longest = max(prompt.shape[0] for prompt in prompts)
        max_len = options.pop("max_len", None)
        max_len = check_prompt(jnp.zeros(longest, jnp.int32), max_new_tokens, max_len)
        return [
            cls(
                lm,
                jnp.pad(prompt, (0, longest - prompt.shape[0])),
                max_new_tokens,
                eos_token_id,
                max_len=max_len,
                prompt_length=prompt.shape[0],
                **options,
            )
            for prompt in prompts
        ]

    def init(self, n_particles: int) -> TokenState:
        cache = prompt_cache(self.lm, self.prompt, self.max_len, n_particles, self.prompt_length)
        initial = self.constraint.initial if self.constraint is not None else 0
        zeros = jnp.zeros(n_particles, jnp.int32)
        return TokenState(
            tokens=jnp.full((n_particles, self.max_steps), -1, jnp.int32),
            length=zeros,
            last=jnp.full(n_particles, self.prompt[-1 if self.prompt_length is None else self.prompt_length - 1]),
            finished=jnp.zeros(n_particles, bool),
            ended_with_eos=jnp.zeros(n_particles, bool),
            n_chunks=zeros,
            log_twist=jnp.zeros(n_particles),
            constraint_state=jnp.full(n_particles, initial, jnp.int32),
            cache=cache,
            potential_carry=tuple(potential.init(n_particles) for potential in self.potentials),
        )

    def allowed(self, state: TokenState) -> Bool[Array, "N V"] | None:
        """Which next tokens keep each particle inside the support (``None``: all of them).

        With ``require_eos`` the support is sequences that reach EOS within the budget, so a
        text token is allowed only if the constraint can still accept within the text slots
        left (EOS takes the last one): the constraint's ``mask_within`` when it has one
        (:class:`ppl.models.constraints.TokenDFA`), else only the last slot is reserved for EOS.
        Sequences this removes have zero target mass already, so the target is unchanged; the
        locally optimal proposal then never walks into a dead end. Without ``require_eos`` a
        sequence cut at the limit is in the support, and nothing is masked for the budget.
        """
        if not self.require_eos:
            return None if self.constraint is None else jax.vmap(self.constraint.mask)(state.constraint_state)
        text_left = self.max_steps - 1 - state.length
        if hasattr(self.constraint, "mask_within"):
            return jax.vmap(self.constraint.mask_within)(state.constraint_state, text_left)
        only_eos = jnp.arange(self.lm.vocab_size) == self.eos_token_id
        allowed = only_eos | (text_left > 0)[:, None]
        return allowed if self.constraint is None else allowed & jax.vmap(self.constraint.mask)(state.constraint_state)

    def completions(self, particles: TokenState) -> Int[Array, "N T"]:
        """``[N, max_new_tokens]`` sequences in :class:`ppl.LanguageModel`'s form: the tokens,
        then EOS if the particle ended with one, EOS-padded. So
        ``ppl.LanguageModel(lm, prompt, max_new_tokens, eos).log_prob(program.completions(p))``
        scores the particles' text under the LM, EOS included, with nothing rebuilt by hand."""
        positions = jnp.arange(self.max_steps)
        written = positions < particles.length[:, None]
        return jnp.where(written, particles.tokens, self.eos_token_id)

    def append(self, state: TokenState, token: Int[Array, " N"], cache: Cache, active: Bool[Array, " N"]) -> TokenState:
        """``state`` with ``token`` appended on the ``active`` rows (others unchanged)."""
        rows = jnp.arange(token.shape[0])
        is_eos = token == self.eos_token_id
        n_chunks = state.n_chunks + (self.delimiter[token] if self.delimiter is not None else 0)
        finished = is_eos | (state.length + 1 >= self.max_steps)
        if self.max_chunks is not None:
            finished |= n_chunks >= self.max_chunks
        constraint_state = state.constraint_state
        if self.constraint is not None:
            constraint_state = jax.vmap(self.constraint.advance)(constraint_state, token)
        appended = state._replace(
            tokens=jnp.where(is_eos[:, None], state.tokens, state.tokens.at[rows, state.length].set(token)),
            length=state.length + ~is_eos,
            last=token,
            finished=finished,
            ended_with_eos=is_eos,
            n_chunks=n_chunks,
            constraint_state=constraint_state,
            cache=cache,
        )
        return self.select(active, appended, state)

    def step(self, state: TokenState, t: Int[Array, ""]) -> TokenState:
        state = self._chunk_step(state) if self.chunked else self._token_step(state)
        carries, log_potential = [], jnp.zeros(state.length.shape[0])
        for potential, carry in zip(self.potentials, state.potential_carry):
            carry, increment = potential.update(carry, state.tokens, state.length, state.finished)
            carries.append(carry)
            log_potential = log_potential + increment
        if self.potentials:
            numpyro.factor("potentials", log_potential)
        return state._replace(potential_carry=tuple(carries))

    def _token_step(self, state: TokenState) -> TokenState:
        """One token for every particle, drawn at a ``numpyro.sample`` site."""
        active = ~state.finished
        rows = jnp.arange(state.length.shape[0])
        next_token = NextToken(self.lm, state.cache, state.last, active)
        allowed = self.allowed(state)
        proposal_logits = next_token.logits
        if self.twist is not None:
            log_twist = _call_twist(self.twist, state, next_token)
            proposal_logits = proposal_logits + log_twist
        if allowed is not None and self.proposal == "locally_optimal":
            proposal_logits = _masked_logits(proposal_logits, allowed)
        infer = {} if proposal_logits is next_token.logits else {"proposal": Categorical(proposal_logits)}
        token = numpyro.sample("token", next_token, infer=infer)
        if allowed is not None:
            numpyro.factor("constraint", jnp.where(allowed[rows, token], 0.0, -jnp.inf))
        state = self.append(state, token, next_token.cache, active)
        if self.twist is not None:
            # psi_t(x_{1:t}) / psi_{t-1}(x_{<t}); a finished particle keeps no twist.
            new_twist = jnp.where(state.finished, 0.0, log_twist[rows, token])
            numpyro.factor("twist", new_twist - state.log_twist)
            state = state._replace(log_twist=jnp.where(active, new_twist, state.log_twist))
        return state

    def _chunk_step(self, state: TokenState) -> TokenState:
        """Tokens until every particle's chunk has ended, drawn at one ``"chunk"`` site (see
        :class:`Chunk`); ``log p - log q`` and the constraint of the whole chunk enter as one
        factor, so that site plus factor score ``log p_LM(chunk) + log 1[allowed]``."""
        chunk = Chunk(self, state)
        value, drawn = sample_with_intermediates("chunk", chunk)
        if not drawn:  # the value was given (substituted): decode it to get the new state
            drawn = chunk.pin(value, True).sample_with_intermediates(numpyro.prng_key())[1]
        state, log_p, log_q, log_constraint = drawn
        numpyro.factor("chunk_weight", jnp.where(jnp.isneginf(log_constraint), -jnp.inf, log_p - log_q))
        return state

    def done(self, state: TokenState) -> Bool[Array, " N"]:
        return state.finished


class Chunk(dist.Distribution):
    """The proposal ``q`` of a chunk step: for every particle, the tokens it draws until a
    delimiter, EOS or the token budget (its row of ``[N, max_new_tokens]``, ``-1``-padded;
    all ``-1`` for a finished particle), every token from the program's token proposal.

    Drawing a chunk decodes it, so the draw has side products — the new particle state,
    ``log p_LM`` and ``log q`` of the chunk and its constraint factor — returned as
    NumPyro *intermediates* (``sample_with_intermediates``); ``log_prob(value,
    intermediates)`` reads ``log q`` from them, and without them decodes ``value`` again.
    ``pin(value, rows)`` forces the rows' tokens inside the decoding loop (conditional SMC,
    replay), which a generic pinned distribution could not: the cache must follow them.
    """

    arg_constraints: dict = {}
    pytree_data_fields = ("program", "state", "forced", "forced_rows")

    def __init__(self, program: Generation, state: TokenState, forced=None, forced_rows=None):
        self.program, self.state = program, state
        self.forced, self.forced_rows = forced, forced_rows
        super().__init__(batch_shape=state.length.shape, event_shape=(program.max_steps,))

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(-1, self.program.lm.vocab_size - 1), 1)

    def pin(self, value, rows) -> Chunk:
        return Chunk(self.program, self.state, value, rows)

    def sample_with_intermediates(self, key: jax.Array, sample_shape: tuple[int, ...] = ()):
        program, n, budget = self.program, self.state.length.shape[0], self.program.max_steps
        rows = jnp.arange(n)
        forced = None
        if self.forced is not None:
            forced = (jnp.broadcast_to(self.forced, (n, budget)), jnp.broadcast_to(self.forced_rows, (n,)))

        def body(carry):
            state, in_chunk, position, tokens, log_p, log_q, log_constraint, key = carry
            key, sample_key = jax.random.split(key)
            logits, cache = program.lm.decode(state.cache, state.last, in_chunk)
            allowed = program.allowed(state)
            proposal_logits = logits
            if allowed is not None and program.proposal == "locally_optimal":
                proposal_logits = _masked_logits(logits, allowed)
            token = sample_logits(sample_key, proposal_logits)
            if forced is not None:
                token = jnp.where(forced[1], forced[0][:, position], token)
            pick = lambda table: table[rows, token] - jax.nn.logsumexp(table, axis=-1)  # noqa: E731
            log_p += jnp.where(in_chunk, pick(logits), 0.0)
            log_q += jnp.where(in_chunk, pick(proposal_logits), 0.0)
            if allowed is not None:
                log_constraint += jnp.where(in_chunk & ~allowed[rows, token], -jnp.inf, 0.0)
            state = program.append(state, token, cache, in_chunk)
            tokens = tokens.at[:, position].set(jnp.where(in_chunk, token, -1))
            in_chunk &= ~(program.delimiter[token] | state.finished)
            return state, in_chunk, position + 1, tokens, log_p, log_q, log_constraint, key

        zeros = jnp.zeros(n)
        start = (self.state, ~self.state.finished, 0, jnp.full((n, budget), -1, jnp.int32), zeros, zeros, zeros, key)
        state, _, _, tokens, log_p, log_q, log_constraint, _ = jax.lax.while_loop(lambda c: jnp.any(c[1]), body, start)
        return tokens, [state, log_p, log_q, log_constraint]

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()):
        return self.sample_with_intermediates(key, sample_shape)[0]

    def log_prob(self, value, intermediates=None):
        """``log q(value)``: from the draw's intermediates, or by decoding ``value`` again."""
        if not intermediates:
            intermediates = self.pin(value, True).sample_with_intermediates(jax.random.key(0))[1]
        return intermediates[2]
