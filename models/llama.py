"""A Llama-family decoder (Llama 2/3, SmolLM, Mistral, Qwen2) in equinox, with a KV cache.

The model implements :class:`ppl.lm.LM`. Architecture per layer (pre-norm residual)::

    h = x + Wo · attention(rope(Wq·n1(x)), rope(Wk·n1(x)), Wv·n1(x))      n1, n2: RMSNorm
    y = h + Wdown · (silu(Wgate·n2(h)) * Wup·n2(h))                          (SwiGLU)

with grouped-query attention (``kv_heads`` divides ``heads``; each key/value head serves
``heads // kv_heads`` query heads) and rotary position embeddings in the HF layout: a head's
dimension ``i`` is rotated together with dimension ``i + head_dim/2``.

Layer weights are *stacked* along a leading layer axis and the layers run inside one
``lax.scan``, so compile time does not grow with depth. Matrices are stored ``[out, in]`` as
in PyTorch (XLA:CPU's small-batch matmuls are fastest with that layout); q/k/v are fused into
one ``[(heads + 2 kv_heads) * head_dim, d]`` matrix and gate/up into one ``[2 * ffn, d]``
matrix so a decode step issues few, large matmuls. Any matrix may instead be a
:class:`~ppl.models.quant.QuantizedMatrix` (GGUF blocks kept packed, dequantised in the step).

The cache (:class:`KVCache`) holds every layer's keys and values for each row (particle) in
``[layers, batch, max_len, kv_heads, head_dim]`` buffers plus each row's length. It is carried
through the layer scan and written in place (a scatter at each row's own position), never
re-emitted per layer, so writing costs O(new tokens), not a copy of the cache. Attention reads
all ``max_len`` slots of a row and masks those past the row's length (static shapes: rows of
different lengths decode together in one step).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ppl.lm import ParticleCache
from ppl.models import quant
from ppl.models.quant import Weight


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family checkpoint (HF ``config.json`` names in brackets).

    ``rope_scaling`` is ``None`` or an HF-style dict with ``rope_type`` ``"linear"``
    (``factor``) or ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``). ``attention_bias`` adds biases to q/k/v (Qwen2;
    Llama's ``attention_bias`` also sets ``output_bias``). ``sliding_window`` (Mistral) limits
    each query to the last ``sliding_window`` positions, itself included. ``qk_norm`` (Qwen3)
    RMS-normalises each query and key head before the rotation.
    """

    vocab_size: int
    hidden_size: int  # d [hidden_size]
    intermediate_size: int  # ffn [intermediate_size]
    num_layers: int  # [num_hidden_layers]
    num_heads: int  # [num_attention_heads]
    num_kv_heads: int  # [num_key_value_heads]
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    tie_embeddings: bool = False  # [tie_word_embeddings]
    attention_bias: bool = False
    output_bias: bool = False
    sliding_window: int | None = None
    qk_norm: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head_dim, got {self.head_dim}")
        if self.rope_scaling is not None:
            # Frozen and hashable: the config is a static field of the model.
            object.__setattr__(self, "rope_scaling", tuple(sorted(dict(self.rope_scaling).items())))

    def rope_inv_freq(self) -> np.ndarray:
        """Rotation frequency of each dimension pair, ``[head_dim/2]`` float32, as HF computes it."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float32) / np.float32(self.head_dim)
        inv_freq = (1.0 / np.float32(self.rope_theta) ** exponents).astype(np.float32)
        scaling = dict(self.rope_scaling or ())
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return inv_freq
        if kind == "linear":
            return (inv_freq / scaling["factor"]).astype(np.float32)
        if kind == "llama3":
            return _llama3_scaled(inv_freq, **{k: v for k, v in scaling.items() if k not in ("rope_type", "type")})
        raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def _llama3_scaled(
    inv_freq: np.ndarray,
    factor: float,
    low_freq_factor: float,
    high_freq_factor: float,
    original_max_position_embeddings: int,
    **_: Any,
) -> np.ndarray:
    """Llama 3.1 frequency scaling: long wavelengths slowed by ``factor``, short ones kept,
    a linear blend (in wavelength ratio) in between."""
    wavelen = 2 * math.pi / inv_freq
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, blended, scaled).astype(np.float32)


class KVCache(ParticleCache):
    """Keys and values of every layer for ``batch`` rows, and how many positions each row holds.

    ``keys[l, b, s]`` / ``values[l, b, s]`` are layer ``l``'s rotated key / value heads of row
    ``b`` at position ``s``; only ``s < lengths[b]`` are meaningful (the rest is stale or zero
    and masked out of attention). Rows may hold different lengths. The particle axis is the
    second (``batch``): as a :class:`ppl.lm.ParticleCache` the cache gathers, freezes and
    rolls back its own rows, and only ``lengths`` ever needs to move for the last two.
    """

    keys: Float[Array, "layers batch max_len kv_heads head_dim"]
    values: Float[Array, "layers batch max_len kv_heads head_dim"]
    lengths: Int[Array, " batch"]

    @property
    def max_len(self) -> int:
        """Positions each row can hold."""
        return self.keys.shape[2]

    @property
    def batch(self) -> int:
        """Number of rows (particles)."""
        return self.keys.shape[1]

    def broadcast(self, batch: int) -> KVCache:
        """Repeat a batch-1 cache to ``batch`` identical rows."""
        if self.batch != 1:
            raise ValueError(f"broadcast expects a batch-1 cache, got batch {self.batch}")
        return KVCache(
            jnp.repeat(self.keys, batch, axis=1),
            jnp.repeat(self.values, batch, axis=1),
            jnp.repeat(self.lengths, batch, axis=0),
        )

    def reindex(self, ancestors: Int[Array, " batch"]) -> KVCache:
        """Row ``i`` of the result is row ``ancestors[i]`` (the gather of SMC resampling)."""

        # Gathered on a 3-D view: a 5-D gather along axis 1 gets a particle-major layout on
        # XLA:CPU, and a ``lax.cond`` around resampling then transposes the whole cache into
        # that layout and back on every step, resampling or not.
        def gather(buffer: Array) -> Array:
            rows = jnp.take(buffer.reshape(buffer.shape[0], buffer.shape[1], -1), ancestors, axis=1)
            return rows.reshape(buffer.shape)

        return KVCache(gather(self.keys), gather(self.values), jnp.take(self.lengths, ancestors, axis=0))

    def select(self, active: Bool[Array, " batch"], previous: KVCache) -> KVCache:
        """This (stepped) cache with the inactive rows' lengths put back: what a step wrote
        past an inactive row's length is masked out and overwritten later, so no buffer moves."""
        return KVCache(self.keys, self.values, jnp.where(active, self.lengths, previous.lengths))

    def where(self, mask: Bool[Array, " batch"], other: KVCache) -> KVCache:
        """``self`` on the rows where ``mask`` holds, ``other`` elsewhere (an MCMC accept)."""
        rows = mask[None, :, None, None, None]
        return KVCache(
            jnp.where(rows, self.keys, other.keys),
            jnp.where(rows, self.values, other.values),
            jnp.where(mask, self.lengths, other.lengths),
        )

    def checkpoint(self) -> Int[Array, " batch"]:
        """The rows' lengths: rolling back to them moves the lengths, copies nothing."""
        return self.lengths

    def restore(self, checkpoint: Int[Array, " batch"]) -> KVCache:
        """The cache rolled back to ``checkpoint`` lengths (positions past them become stale)."""
        return KVCache(self.keys, self.values, checkpoint)

    def truncate(self, length: Int[Array, ""]) -> KVCache:
        """Every row cut back to ``length`` positions (those past it become stale)."""
        return KVCache(self.keys, self.values, jnp.full_like(self.lengths, length))

    def particle_axes(self) -> KVCache:
        """Particles are axis 1 of the buffers, axis 0 of ``lengths``."""
        return KVCache(1, 1, 0)


class LayerStack(eqx.Module):
    """All decoder layers' weights, stacked along a leading ``layers`` axis (L)."""

    attn_norm: Float[Array, "L d"]
    qkv: Weight  # [L, qkv, d]; rows: q heads, then k heads, then v heads
    qkv_bias: Float[Array, "L qkv"] | None
    out: Weight  # [L, d, heads * head_dim]
    out_bias: Float[Array, "L d"] | None
    mlp_norm: Float[Array, "L d"]
    gate_up: Weight  # [L, 2 ffn, d]; rows: gate, then up
    down: Weight  # [L, d, ffn]
    q_norm: Float[Array, "L hd"] | None = None  # per-head query / key RMSNorms (``qk_norm``)
    k_norm: Float[Array, "L hd"] | None = None


class Llama(eqx.Module):
    """Llama-family causal LM; see the module docstring. Build it with a loader
    (:func:`ppl.models.load_gguf`, :func:`ppl.models.load_hf_checkpoint`) or
    :meth:`from_hf_tensors`."""

    config: LlamaConfig = eqx.field(static=True)
    embed: Weight  # [V, d]
    layers: LayerStack
    final_norm: Float[Array, " d"]
    lm_head: Weight | None  # [V, d]; None: tied to ``embed``
    rope_inv_freq: Float[Array, " half_head_dim"]

    @property
    def vocab_size(self) -> int:
        """Number of tokens the model scores."""
        return self.config.vocab_size

    @property
    def dtype(self) -> jnp.dtype:
        """The floating-point type of the computation, the dense weights and the KV cache
        (quantised matrices are dequantised to it)."""
        return self.final_norm.dtype

    # -- the LM protocol ------------------------------------------------------------------

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache: ``batch`` rows of length 0 with room for ``max_len`` positions."""
        c = self.config
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        return KVCache(jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype), jnp.zeros((batch,), jnp.int32))

    def prefill(self, tokens: Int[Array, " T"], max_len: int) -> tuple[Float[Array, " V"], KVCache]:
        """Run the prompt once: next-token logits after it, and a batch-1 cache of ``max_len``."""
        if tokens.shape[0] > max_len:
            raise ValueError(f"prompt of {tokens.shape[0]} tokens does not fit max_len={max_len}")
        hidden, cache = self.extend(self.init_cache(1, max_len), tokens[None, :])
        return self.logits(hidden[0, -1]), cache

    def broadcast(self, cache: KVCache, batch: int) -> KVCache:
        """A batch-1 cache repeated to ``batch`` rows (the prompt, shared by every particle)."""
        return cache.broadcast(batch)

    def decode(
        self, cache: KVCache, tokens: Int[Array, " B"], active: Bool[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B V"], KVCache]:
        """Append one token per row at that row's length; next-token logits for every row.
        A row already at ``max_len`` is not written (its logits are then meaningless). Rows
        with ``active`` false keep their length: what was written past it is overwritten by
        their next real token, so a batch can wait on some rows without copying the cache."""
        logits, _, new = self.decode_with_features(cache, tokens, active)
        return logits, new

    def decode_with_features(
        self, cache: KVCache, tokens: Int[Array, " B"], active: Bool[Array, " B"] | None = None
    ) -> tuple[Float[Array, "B V"], Float[Array, "B d"], KVCache]:
        """:meth:`decode` that also returns each row's features: the last hidden state after
        the final RMSNorm, which the logits are read from (``logits = features · head^T``).
        Same forward pass; under ``jit`` the features cost nothing when unused."""
        hidden, new = self.extend(cache, tokens[:, None])
        if active is not None:
            new = KVCache(new.keys, new.values, jnp.where(active, new.lengths, cache.lengths))
        features = self.features(hidden[:, 0])
        return self.project(features), features, new

    def reindex(self, cache: KVCache, ancestors: Int[Array, " B"]) -> KVCache:
        """Row ``i`` of the result is row ``ancestors[i]`` of ``cache`` (resampling)."""
        return cache.reindex(ancestors)

    def __call__(self, tokens: Int[Array, " T"]) -> Float[Array, "T V"]:
        """Logits at every position of one sequence, computed from scratch (teacher forcing)."""
        hidden, _ = self.extend(self.init_cache(1, tokens.shape[0]), tokens[None, :])
        return self.logits(hidden[0])

    # -- the network ----------------------------------------------------------------------

    @property
    def hidden_size(self) -> int:
        """Width of the residual stream, the size of the features a decode returns."""
        return self.config.hidden_size

    @property
    def output_embedding(self) -> Float[Array, "V d"]:
        """The output projection (the token embedding when tied): ``logits = features · it^T``,
        dense (a quantised one is dequantised)."""
        return quant.dense(self._head, self.dtype)

    @property
    def _head(self) -> Weight:
        return self.embed if self.lm_head is None else self.lm_head

    def logits(self, hidden: Float[Array, "*n d"]) -> Float[Array, "*n V"]:
        """Final RMSNorm and output projection, in float32."""
        return self.project(self.features(hidden))

    def features(self, hidden: Float[Array, "*n d"]) -> Float[Array, "*n d"]:
        """The final RMSNorm of the last layer's output, in float32."""
        return _rms_norm(hidden, self.final_norm, self.config.rms_norm_eps).astype(jnp.float32)

    def project(self, features: Float[Array, "*n d"]) -> Float[Array, "*n V"]:
        """Logits from features (the output projection), in float32."""
        return quant.linear(features.astype(self.dtype), self._head).astype(jnp.float32)

    def extend(self, cache: KVCache, tokens: Int[Array, "B T"]) -> tuple[Float[Array, "B T d"], KVCache]:
        """Append ``T`` tokens to each row of ``cache``; return their final hidden states.

        Row ``b``'s new tokens take positions ``lengths[b] .. lengths[b]+T-1`` and attend to
        everything the row holds up to themselves. Positions past ``max_len`` are dropped.
        """
        c = self.config
        batch, steps = tokens.shape
        positions = cache.lengths[:, None] + jnp.arange(steps, dtype=jnp.int32)  # [B, T]
        angles = positions[..., None].astype(jnp.float32) * self.rope_inv_freq  # [B, T, hd/2]
        rope = (jnp.cos(angles), jnp.sin(angles))
        slot = jnp.arange(cache.max_len, dtype=jnp.int32)
        visible = slot <= positions[..., None]  # [B, T, S]
        if c.sliding_window is not None:
            visible &= slot > positions[..., None] - c.sliding_window
        # One mask row per query head of a group, in the [B, 1, T*groups, S] layout of the scores.
        visible = jnp.repeat(visible, c.num_heads // c.num_kv_heads, axis=1)[:, None]
        write = _cache_writer(positions)

        def layer(carry, xs):
            x, keys, values = carry
            index, w = xs
            x, keys, values = _decoder_layer(c, w, index, x, keys, values, rope, visible, write)
            return (x, keys, values), None

        x = quant.take_rows(self.embed, tokens, self.dtype)
        (x, keys, values), _ = jax.lax.scan(
            layer, (x, cache.keys, cache.values), (jnp.arange(c.num_layers), self.layers)
        )
        return x, KVCache(keys, values, cache.lengths + steps)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def from_hf_tensors(
        cls, config: LlamaConfig, tensor: Callable[[str], np.ndarray], dtype: jnp.dtype = jnp.float32
    ) -> Llama:
        """Build the model from HF-named weights (``model.layers.{i}.self_attn.q_proj.weight``,
        ``[out, in]`` as in PyTorch); ``tensor(name)`` returns one as a float numpy array or,
        for a matrix to keep packed, a host :class:`~ppl.models.quant.QuantizedMatrix`. Dense
        weights are cast to ``dtype``; quantised ones are dequantised to it inside each step.
        Layers are stacked one at a time so peak host memory stays near one model copy."""
        c = config

        def stacked(fn: Callable[[str], np.ndarray]) -> jax.Array:
            return quant.to_device(quant.stack([fn(f"model.layers.{i}.") for i in range(c.num_layers)]), dtype)

        attn = lambda p, kind, part: tensor(f"{p}self_attn.{kind}_proj.{part}")
        layers = LayerStack(
            attn_norm=stacked(lambda p: tensor(p + "input_layernorm.weight")),
            qkv=stacked(lambda p: quant.concatenate([attn(p, k, "weight") for k in "qkv"])),
            qkv_bias=stacked(lambda p: np.concatenate([attn(p, k, "bias") for k in "qkv"]))
            if c.attention_bias
            else None,
            out=stacked(lambda p: attn(p, "o", "weight")),
            out_bias=stacked(lambda p: attn(p, "o", "bias")) if c.output_bias else None,
            mlp_norm=stacked(lambda p: tensor(p + "post_attention_layernorm.weight")),
            gate_up=stacked(lambda p: quant.concatenate([tensor(p + f"mlp.{k}_proj.weight") for k in ("gate", "up")])),
            down=stacked(lambda p: tensor(p + "mlp.down_proj.weight")),
            q_norm=stacked(lambda p: tensor(p + "self_attn.q_norm.weight")) if c.qk_norm else None,
            k_norm=stacked(lambda p: tensor(p + "self_attn.k_norm.weight")) if c.qk_norm else None,
        )
        embed = quant.to_device(tensor("model.embed_tokens.weight"), dtype)
        if embed.shape != (c.vocab_size, c.hidden_size):
            raise ValueError(f"embedding has shape {embed.shape}, config says {(c.vocab_size, c.hidden_size)}")
        return cls(
            config=c,
            embed=embed,
            layers=layers,
            final_norm=jnp.asarray(tensor("model.norm.weight"), dtype),
            lm_head=None if c.tie_embeddings else quant.to_device(tensor("lm_head.weight"), dtype),
            rope_inv_freq=jnp.asarray(c.rope_inv_freq()),
        )


def _rms_norm(x: Float[Array, "*n d"], weight: Float[Array, " d"], eps: float) -> Float[Array, "*n d"]:
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return weight * x32.astype(x.dtype)


def _rotate(x: Float[Array, "B T h hd"], rope: tuple[Array, Array]) -> Float[Array, "B T h hd"]:
    """Rotary embedding, HF layout: dimension i pairs with i + hd/2."""
    cos, sin = (jnp.concatenate([a, a], axis=-1)[:, :, None, :] for a in rope)
    first, second = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _cache_writer(positions: Int[Array, "B T"]):
    """A function writing ``[B, T, kv_heads, head_dim]`` new entries into layer ``index`` of a
    ``[layers, B, S, kv_heads, head_dim]`` buffer at each row's positions, in place."""
    rows = jnp.arange(positions.shape[0])[:, None]

    def write(buffer, index, new):
        return buffer.at[index, rows, positions].set(new.astype(buffer.dtype), mode="drop")

    return write


def _decoder_layer(c: LlamaConfig, w: LayerStack, index, x, keys, values, rope, visible, write):
    """One pre-norm block on ``x [B, T, d]``; writes this layer's new keys/values into the cache."""
    batch, steps, _ = x.shape
    kv, hd = c.num_kv_heads, c.head_dim

    qkv = quant.linear(_rms_norm(x, w.attn_norm, c.rms_norm_eps), w.qkv)
    if w.qkv_bias is not None:
        qkv = qkv + w.qkv_bias
    q, k, v = jnp.split(qkv, [c.num_heads * hd, (c.num_heads + kv) * hd], axis=-1)
    q, k = q.reshape(batch, steps, c.num_heads, hd), k.reshape(batch, steps, kv, hd)
    if w.q_norm is not None:
        q, k = _rms_norm(q, w.q_norm, c.rms_norm_eps), _rms_norm(k, w.k_norm, c.rms_norm_eps)
    q, k = _rotate(q, rope), _rotate(k, rope)
    keys = write(keys, index, k)
    values = write(values, index, v.reshape(batch, steps, kv, hd))
    attended = _attention(q, keys[index], values[index], visible, 1 / math.sqrt(hd))
    attended = quant.linear(attended, w.out)
    if w.out_bias is not None:
        attended = attended + w.out_bias
    h = x + attended

    gate, up = jnp.split(quant.linear(_rms_norm(h, w.mlp_norm, c.rms_norm_eps), w.gate_up), 2, axis=-1)
    return h + quant.linear(jax.nn.silu(gate) * up, w.down), keys, values


def _attention(
    q: Float[Array, "B T heads hd"], keys: Float[Array, "B S kv hd"], values: Float[Array, "B S kv hd"], visible, scale
) -> Float[Array, "B T heads*hd"]:
    """Grouped-query attention of ``q`` over all ``S`` cached slots of one layer, masking the
    slots ``visible`` (``[B, 1, T*groups, S]``) rules out."""
    batch, steps, heads, hd = q.shape
    kv = keys.shape[2]
    groups = heads // kv
    # Queries are laid out [B, kv_heads, T*groups, hd] so that for decode (T=1) no transpose is needed.
    q = q.reshape(batch, steps, kv, groups, hd).transpose(0, 2, 1, 3, 4).reshape(batch, kv, steps * groups, hd)
    scores = jnp.einsum("bkqh,bskh->bkqs", q, keys, preferred_element_type=jnp.float32)
    scores = jnp.where(visible, scores * scale, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    attended = jnp.einsum("bkqs,bskh->bkqh", probs, values)
    return attended.reshape(batch, kv, steps, groups, hd).transpose(0, 2, 1, 3, 4).reshape(batch, steps, -1)
