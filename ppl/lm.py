"""The language-model protocol that ``ppl``'s distributions and inference need.

``ppl`` never imports a concrete model: any JAX language model that provides these methods
plugs into ``ppl.NextToken``, ``ppl.LanguageModel`` and SMC. ``ppl.models.llama`` is the
reference implementation.

Shapes: ``B`` is the batch (particles), ``T`` a prompt length, ``V`` the vocabulary size.
The cache is an opaque pytree whose per-sequence axis can be gathered by ``reindex``; in
``ppl.models`` it is ``[layers, B, max_len, kv_heads, head_dim]`` plus per-row lengths.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from jaxtyping import Array, Bool, Float, Int

Cache = Any


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
