"""Gemma 3 text decoders (``google/gemma-3-*``), a member of the :class:`~ppl.models.Llama` family.

A Gemma 3 layer is a Llama layer with four changes, each a few lines here on top of
``ppl.models.llama``'s pieces (projections, rotation, grouped-query attention, the cache)::

    h = x + n_post_attn(Wo · attention(rope(n_q(Wq·n1(x))), rope(n_k(Wk·n1(x))), Wv·n1(x)))
    y = h + n_post_mlp(Wdown · (gelu_tanh(Wgate·n2(h)) * Wup·n2(h)))            (GeGLU)

- **four norms per layer** and per-head query/key norms, each RMSNorm scaling by
  ``1 + weight`` (the checkpoint stores the offset from 1; it is added once when loading, so
  the network runs the plain RMSNorm of ``ppl.models.llama``);
- **local and global attention**: most layers see only the last ``sliding_window`` positions
  and rotate with a short-range rope base (10 000); every ``n``-th layer (6th in Gemma 3)
  attends to everything with the long-range base (1 000 000, possibly rope-scaled);
- attention scores scaled by ``query_pre_attn_scalar ** -0.5`` rather than ``head_dim ** -0.5``;
- token embeddings multiplied by ``sqrt(hidden_size)`` on the way in (not on the tied way out).

The KV cache and the LM protocol are the Llama ones: local layers keep every position in the
cache and mask the old ones, so rows, rollbacks and resampling work unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ppl.models import quant
from ppl.models.llama import (
    KVCache,
    LayerStack,
    Llama,
    LlamaConfig,
    _attention,
    _cache_writer,
    _rms_norm,
    _rotate,
)


@dataclasses.dataclass(frozen=True)
class Gemma3Config(LlamaConfig):
    """A :class:`LlamaConfig` plus Gemma 3's own constants (HF ``Gemma3TextConfig`` names in brackets).

    ``global_layers[i]`` says layer ``i`` attends globally [``layer_types[i] == "full_attention"``];
    the others see the last ``sliding_window`` positions and use ``rope_local_theta``
    [``rope_parameters["sliding_attention"]["rope_theta"]``]. ``rope_theta`` and
    ``rope_scaling`` are the global layers'.
    """

    query_pre_attn_scalar: float = 256.0
    global_layers: tuple[bool, ...] = ()
    rope_local_theta: float = 10000.0

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "qk_norm", True)  # every Gemma 3 layer normalises its query and key heads
        object.__setattr__(self, "global_layers", tuple(bool(g) for g in self.global_layers))
        if len(self.global_layers) != self.num_layers:
            raise ValueError(f"global_layers has {len(self.global_layers)} entries for {self.num_layers} layers")
        if self.sliding_window is None or self.sliding_window < 1:
            raise ValueError(f"Gemma 3 needs a positive sliding_window, got {self.sliding_window}")
        if not 0 < self.query_pre_attn_scalar < math.inf:
            raise ValueError(f"query_pre_attn_scalar={self.query_pre_attn_scalar} is not a positive number")

    def local_rope_inv_freq(self) -> np.ndarray:
        """Rotation frequencies of the sliding-window layers (``rope_local_theta``, unscaled)."""
        return dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_scaling=None).rope_inv_freq()


def every_nth_global(num_layers: int, n: int = 6) -> tuple[bool, ...]:
    """Gemma 3's layer pattern: layers ``n-1, 2n-1, ...`` global, the rest sliding-window."""
    return tuple((i + 1) % n == 0 for i in range(num_layers))


class GemmaLayerStack(eqx.Module):
    """Gemma 3 layer weights, stacked: the Llama ones (with q/k norms; ``mlp_norm`` is the
    pre-feed-forward norm) and the two output norms. Every norm holds ``1 + weight``."""

    llama: LayerStack
    post_attn_norm: Float[Array, "L d"]
    post_mlp_norm: Float[Array, "L d"]


class Gemma3(Llama):
    """Gemma 3 causal LM (the :class:`Llama` protocol and cache); see the module docstring.
    Load one with :func:`ppl.models.load` or build it with :meth:`from_hf_tensors`."""

    config: Gemma3Config = eqx.field(static=True)
    layers: GemmaLayerStack
    local_rope_inv_freq: Float[Array, " half_head_dim"]

    def extend(self, cache: KVCache, tokens: Int[Array, "B T"]) -> tuple[Float[Array, "B T d"], KVCache]:
        """Append ``T`` tokens to each row of ``cache``; return their final hidden states
        (as :meth:`Llama.extend`, with each layer's own window and rope base)."""
        c = self.config
        steps = tokens.shape[1]
        positions = cache.lengths[:, None] + jnp.arange(steps, dtype=jnp.int32)  # [B, T]

        def rotation(inv_freq: Array) -> tuple[Array, Array]:
            angles = positions[..., None].astype(jnp.float32) * inv_freq
            return jnp.cos(angles), jnp.sin(angles)

        slot = jnp.arange(cache.max_len, dtype=jnp.int32)
        causal = slot <= positions[..., None]  # [B, T, S]
        local = causal & (slot > positions[..., None] - c.sliding_window)
        # One mask row per query head of a group, in the [B, 1, T*groups, S] layout of the scores.
        as_scores = lambda mask: jnp.repeat(mask, c.num_heads // c.num_kv_heads, axis=1)[:, None]
        global_view = (rotation(self.rope_inv_freq), as_scores(causal))
        local_view = (rotation(self.local_rope_inv_freq), as_scores(local))
        write = _cache_writer(positions)

        def layer(carry, xs):
            x, keys, values = carry
            index, is_global, w = xs
            rope, visible = jax.tree.map(lambda g, s: jnp.where(is_global, g, s), global_view, local_view)
            x, keys, values = _gemma_layer(c, w, index, x, keys, values, rope, visible, write)
            return (x, keys, values), None

        x = jnp.take(self.embed, tokens, axis=0) * jnp.asarray(math.sqrt(c.hidden_size), self.dtype)
        (x, keys, values), _ = jax.lax.scan(
            layer,
            (x, cache.keys, cache.values),
            (jnp.arange(c.num_layers), jnp.asarray(c.global_layers), self.layers),
        )
        return x, KVCache(keys, values, cache.lengths + steps)

    @classmethod
    def from_hf_tensors(
        cls, config: Gemma3Config, tensor: Callable[[str], np.ndarray], dtype: jnp.dtype = jnp.float32
    ) -> Gemma3:
        """Build the model from HF ``Gemma3ForCausalLM`` tensor names (norm weights as HF stores
        them, offsets from 1)."""

        def llama_named(name: str) -> np.ndarray:
            # Llama's post_attention_layernorm is the norm before the MLP: Gemma's pre_feedforward.
            name = name.replace("post_attention_layernorm", "pre_feedforward_layernorm")
            array = tensor(name)
            return 1 + array if name.endswith("norm.weight") else array

        llama = Llama.from_hf_tensors(config, llama_named, dtype)

        def stacked_norm(name: str) -> jax.Array:
            return jnp.asarray(
                np.stack([1 + tensor(f"model.layers.{i}.{name}") for i in range(config.num_layers)]), dtype
            )

        layers = GemmaLayerStack(
            llama=llama.layers,
            post_attn_norm=stacked_norm("post_attention_layernorm.weight"),
            post_mlp_norm=stacked_norm("post_feedforward_layernorm.weight"),
        )
        return cls(
            config=config,
            embed=llama.embed,
            layers=layers,
            final_norm=llama.final_norm,
            lm_head=llama.lm_head,
            rope_inv_freq=llama.rope_inv_freq,
            local_rope_inv_freq=jnp.asarray(config.local_rope_inv_freq()),
        )


def _gemma_layer(c: Gemma3Config, w: GemmaLayerStack, index, x, keys, values, rope, visible, write):
    """One Gemma 3 block on ``x [B, T, d]``; writes this layer's new keys/values into the cache."""
    batch, steps, _ = x.shape
    kv, hd, eps, base = c.num_kv_heads, c.head_dim, c.rms_norm_eps, w.llama
    q, k, v = jnp.split(
        quant.linear(_rms_norm(x, base.attn_norm, eps), base.qkv), [c.num_heads * hd, (c.num_heads + kv) * hd], axis=-1
    )
    q = _rotate(_rms_norm(q.reshape(batch, steps, c.num_heads, hd), base.q_norm, eps), rope)
    k = _rotate(_rms_norm(k.reshape(batch, steps, kv, hd), base.k_norm, eps), rope)
    keys = write(keys, index, k)
    values = write(values, index, v.reshape(batch, steps, kv, hd))
    attended = _attention(q, keys[index], values[index], visible, c.query_pre_attn_scalar**-0.5)
    h = x + _rms_norm(quant.linear(attended, base.out), w.post_attn_norm, eps)

    gate, up = jnp.split(quant.linear(_rms_norm(h, base.mlp_norm, eps), base.gate_up), 2, axis=-1)
    return (
        h + _rms_norm(quant.linear(jax.nn.gelu(gate, approximate=True) * up, base.down), w.post_mlp_norm, eps),
        keys,
        values,
    )
