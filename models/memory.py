"""Memory guard: estimate what generating with ``n_particles`` sequences of a ``max_len`` KV
cache needs, and refuse up front when the device cannot hold it.

Without the check, asking for too many particles or tokens fails only after compilation, as an
XLA allocation error deep in a trace. The estimate is arithmetic on the config (nothing is
allocated), so the refusal takes microseconds:

    >>> check_memory(lm, n_particles=1_000_000, max_len=200)        # doctest: +SKIP
    InsufficientMemoryError: generating with 1000000 particles x 200 positions needs ~3.4 TiB ...

What is counted (bytes):

- **weights**: every array leaf of the model (already resident once the model is loaded);
- **KV cache**: ``2 (keys, values) x layers x N x max_len x kv_heads x head_dim x itemsize``,
  twice: resampling gathers the rows into a new buffer while the old one is alive;
- **per-step temporaries**: ``[N, V]`` float32 logits and the few same-sized arrays a proposal
  derives from them (log-probabilities, masked copy, sampling noise), and each layer's
  ``[N, heads, max_len]`` attention scores and ``[N, ffn]`` activations; for a model with
  quantised matrices (:class:`~ppl.models.quant.QuantizedMatrix`), the largest one dequantised
  (each is, for its product).

It is an estimate of the peak, not an exact figure: XLA may fuse some temporaries away or keep
extra buffers; :data:`HEADROOM` leaves a margin for that.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ppl.models.llama import Llama, LlamaConfig
from ppl.models.quant import QuantizedMatrix

HEADROOM = 0.9
"""Refuse when the estimate exceeds this fraction of the available memory."""
_LOGIT_COPIES = 4  # logits, log-probabilities, a masked / twisted copy, Gumbel noise


class InsufficientMemoryError(MemoryError):
    """The requested work needs more memory than the device has available."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes of one generation run, by part."""

    weights: int
    kv_cache: int
    temporaries: int

    @property
    def total(self) -> int:
        """Bytes in all: weights, KV cache and per-step temporaries."""
        return self.weights + self.kv_cache + self.temporaries


def estimate_memory(
    config: LlamaConfig, n_particles: int, max_len: int, dtype: jnp.dtype = jnp.float32, weights: int | None = None
) -> MemoryEstimate:
    """Bytes needed to generate with ``n_particles`` rows of a ``max_len``-position cache.

    ``weights`` defaults to the parameter count of ``config`` at ``dtype``; pass the model's
    actual size when known (see :func:`check_memory`).
    """
    if n_particles < 1 or max_len < 1:
        raise ValueError(f"n_particles and max_len must be positive, got {n_particles} and {max_len}")
    c = config
    itemsize = np.dtype(dtype).itemsize
    if weights is None:
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        per_layer = (
            2 * c.hidden_size
            + c.hidden_size * (q + 2 * kv)
            + q * c.hidden_size
            + 3 * c.hidden_size * c.intermediate_size
        )
        embeddings = c.vocab_size * c.hidden_size * (1 if c.tie_embeddings else 2)
        weights = (c.num_layers * per_layer + embeddings + c.hidden_size) * itemsize
    kv_cache = 2 * 2 * c.num_layers * n_particles * max_len * c.num_kv_heads * c.head_dim * itemsize
    temporaries = (
        4
        * n_particles
        * (_LOGIT_COPIES * c.vocab_size + c.num_heads * max_len + 2 * c.intermediate_size + 4 * c.hidden_size)
    )
    return MemoryEstimate(int(weights), int(kv_cache), int(temporaries))


def available_memory(device: jax.Device | None = None) -> int | None:
    """Bytes the device can still allocate, or ``None`` if it cannot be told.

    An accelerator reports ``bytes_limit - bytes_in_use`` through ``memory_stats()``; for the
    CPU it is the smaller of ``MemAvailable`` (``/proc/meminfo``) and what the cgroup v2 limit
    leaves (``memory.max - memory.current``), as a container may allow less than the host has.
    """
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
        return None
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            candidates.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def check_memory(lm: Llama, n_particles: int, max_len: int, device: jax.Device | None = None) -> MemoryEstimate:
    """Refuse (:class:`InsufficientMemoryError`) a run of ``lm`` that cannot fit; return the
    estimate otherwise (also when the available memory cannot be determined).

    The model is already loaded, so its weights are already counted as in use: only the KV
    cache and the temporaries must fit in what is available.
    """
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(lm) if isinstance(leaf, jax.Array))
    estimate = estimate_memory(lm.config, n_particles, max_len, lm.dtype, weights=weights)
    packed = [
        m
        for m in jax.tree.leaves(lm, is_leaf=lambda x: isinstance(x, QuantizedMatrix))
        if isinstance(m, QuantizedMatrix)
    ]
    dequantised = max((math.prod(m.shape[-2:]) * np.dtype(lm.dtype).itemsize for m in packed), default=0)
    estimate = dataclasses.replace(estimate, temporaries=estimate.temporaries + dequantised)
    available = available_memory(device)
    needed = estimate.kv_cache + estimate.temporaries
    if available is not None and needed > HEADROOM * available:
        raise InsufficientMemoryError(
            f"generating with {n_particles} particles x {max_len} positions needs ~{_size(needed)} "
            f"(KV cache {_size(estimate.kv_cache)}, per-step temporaries {_size(estimate.temporaries)}; "
            f"weights {_size(estimate.weights)} already loaded) but only {_size(available)} is available "
            f"on {(device or jax.devices()[0]).platform}; lower the number of particles or the token "
            f"budget (at most ~{_largest_n(estimate, n_particles, available)} particles fit at this length)"
        )
    return estimate


def _largest_n(estimate: MemoryEstimate, n_particles: int, available: int) -> int:
    per_particle = (estimate.kv_cache + estimate.temporaries) / n_particles
    return max(0, math.floor(HEADROOM * available / per_particle))


def _size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n_bytes) < 1024 or unit == "TiB":
            return f"{n_bytes:.1f} {unit}" if unit != "B" else f"{int(n_bytes)} B"
        n_bytes /= 1024
    raise AssertionError("unreachable")
