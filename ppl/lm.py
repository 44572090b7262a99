"""The language-model protocol that ``ppl``'s distributions and inference need.

``ppl`` never imports a concrete model: any JAX language model that provides these methods
plugs into ``ppl.NextToken``, ``ppl.LanguageModel`` and SMC. ``ppl.models.llama`` is the
reference implementation.

Shapes: ``B`` is the batch (particles), ``T`` a prompt length, ``V`` the vocabulary size.
The cache is a :class:`ParticleCache`: it gathers, freezes and rolls back its own rows, so
programs that keep one in their state need no overrides; in ``ppl.models`` it is
``[layers, B, max_len, kv_heads, head_dim]`` plus per-row lengths.
"""

from __future__ import annotations

import abc
from typing import Any, Protocol, runtime_checkable

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, Int

Cache = Any


class ParticleCache(eqx.Module):
    """Per-particle state whose particle axis is not the leading one: a KV cache.

    Inference moves particles by gathering, freezing and rewinding their state. Plain leaves
    of a state have the particle on axis 0 and are handled by ``StateSpace``; a leaf that is
    a ``ParticleCache`` is asked instead, so a program that keeps a cache in its state needs
    no override of ``reindex`` / ``select``:

    - ``reindex(ancestors)``: row ``i`` of the result is row ``ancestors[i]``;
    - ``select(active, previous)``: ``self`` (the stepped cache) on active rows, ``previous``
      on the others, for a step that left the inactive rows holding their sequence (it may
      only have written past their length): no buffer needs to move;
    - ``where(mask, other)``: ``self`` on the rows where ``mask`` holds, ``other`` elsewhere,
      for any two caches (an MCMC move's accept/reject): a real per-row choice;
    - ``checkpoint()`` / ``restore(checkpoint)``: a small per-particle summary (leading axis
      the particle) from which the cache can be rolled back to that point, as long as the
      rows have only grown since. For a KV cache it is the rows' lengths: rolling back moves
      the lengths, nothing is copied.
    """

    @abc.abstractmethod
    def reindex(self, ancestors: Int[Array, " N"]) -> ParticleCache:
        """Row ``i`` of the result is row ``ancestors[i]`` (resampling)."""

    @abc.abstractmethod
    def select(self, active: Bool[Array, " N"], previous: ParticleCache) -> ParticleCache:
        """This stepped cache where ``active``, ``previous`` elsewhere (frozen particles)."""

    @abc.abstractmethod
    def where(self, mask: Bool[Array, " N"], other: ParticleCache) -> ParticleCache:
        """``self`` on the rows where ``mask`` holds, ``other`` elsewhere."""

    @abc.abstractmethod
    def checkpoint(self) -> Any:
        """A small per-particle summary to roll the cache back to later."""

    @abc.abstractmethod
    def restore(self, checkpoint: Any) -> ParticleCache:
        """The cache rolled back to ``checkpoint`` (rows must only have grown since)."""

    def truncate(self, length: Int[Array, ""]) -> ParticleCache:
        """Every row cut back to its first ``length`` positions: how a right-padded prompt's
        cache forgets the padding (:func:`ppl.prompt_cache` with ``length``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be truncated, so it cannot hold padded prompts")

    def particle_axes(self) -> Any:
        """This cache's tree with, in place of each array, the axis that indexes particles
        (default 0): what sharding the particle axis over devices needs
        (:mod:`ppl.inference.scale`)."""
        return jax.tree.map(lambda _: 0, self)


@runtime_checkable
class LM(Protocol):
    """A causal language model with a key/value cache, usable inside ``jit``.

    All methods are pure: they return a new cache instead of mutating one.
    """

    @property
    def vocab_size(self) -> int: ...

    def init_cache(self, batch: int, max_len: int) -> Cache:
        """An empty cache: ``batch`` rows holding nothing, room for ``max_len`` positions."""
        ...

    def prefill(self, tokens: Int[Array, " T"], max_len: int) -> tuple[Float[Array, " V"], Cache]:
        """Run the prompt once; return next-token logits after it and a batch-1 cache with
        room for ``max_len`` positions in total (prompt included)."""
        ...

    def broadcast(self, cache: Cache, batch: int) -> Cache:
        """Copy a batch-1 cache to ``batch`` rows (the prompt is prefilled once, shared)."""
        ...

    def decode(
        self, cache: Cache, tokens: Int[Array, " B"], active: Bool[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B V"], Cache]:
        """Append one token per row at that row's current length; return next-token logits.
        Rows where ``active`` is false must come out holding the same sequence as before."""
        ...

    def reindex(self, cache: Cache, ancestors: Int[Array, " B"]) -> Cache:
        """Row ``i`` of the result is row ``ancestors[i]`` of ``cache`` (SMC resampling)."""
        ...


@runtime_checkable
class FeatureLM(LM, Protocol):
    """An :class:`LM` whose decode can also return the features it read the logits from, in
    the same forward pass: what learned twists and proposals (``ppl.models.heads``) run on.

    ``output_embedding`` is the ``[V, hidden_size]`` output projection (the tied token
    embedding for most small LMs), so ``logits = features · output_embedding^T``.
    """

    @property
    def hidden_size(self) -> int:
        """Width of the features (the last hidden state)."""
        ...

    @property
    def output_embedding(self) -> Float[Array, "V d"]:
        """The ``[V, hidden_size]`` output projection: ``logits = features · output_embedding^T``."""
        ...

    def decode_with_features(
        self, cache: Cache, tokens: Int[Array, " B"], active: Bool[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B V"], Float[Array, "B d"], Cache]:
        """:meth:`LM.decode` that also returns each row's ``[hidden_size]`` features."""
        ...


@runtime_checkable
class Tokenizer(Protocol):
    """What inference needs from a tokenizer: ids, text, and every token's raw bytes."""

    @property
    def vocab_bytes(self) -> list[bytes]:
        """``vocab_bytes[i]`` is the exact byte string token ``i`` stands for."""
        ...

    @property
    def eos_token_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


@runtime_checkable
class TokenConstraint(Protocol):
    """A token-level automaton used as a hard constraint (``ppl.models.constraints``).

    The state is one int32 per particle; all methods are pure JAX on one particle's state.
    """

    @property
    def initial(self) -> int: ...

    def mask(self, state: Int[Array, ""]) -> Array:
        """``[V]`` booleans: the tokens that keep the sequence completable."""
        ...

    def advance(self, state: Int[Array, ""], token: Int[Array, ""]) -> Int[Array, ""]: ...

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ``ValueError`` if built for a vocabulary of another size."""
        ...


def check_vocab_size(built_for: int, model_has: int) -> None:
    """The ``ValueError`` a ``TokenConstraint.check_vocab`` raises when the sizes differ."""
    if model_has != built_for:
        raise ValueError(
            f"this constraint was built for a vocabulary of {built_for} tokens, "
            f"but the model has {model_has}; rebuild it with the model's tokenizer"
        )
