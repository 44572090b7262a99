"""GGUF block-quantised matrices kept packed on device and dequantised inside the jitted step.

A :class:`QuantizedMatrix` holds ``W [..., out, in]`` as blocks of ``block`` consecutive input
columns, each block with one ``scale``, optionally one ``offset``, and ``block`` integer codes::

    W[..., o, b * block + j] = scale[..., o, b] * code[..., o, b, j] + offset[..., o, b]

4-bit codes are packed two to a byte: byte ``j`` of a block holds code ``j`` in its low nibble
and code ``j + block/2`` in its high one (GGML's Q4_0 order). 8-bit codes are int8. The GGUF
types kept packed all map exactly onto this form (``d``, ``m``, ``dmin``: the file's float16
block constants; ``sc``, ``mn``: a K-quant's integer sub-block scales and mins)::

    type   block  codes         scale        offset
    Q8_0   32     int8 q        d            -
    Q4_0   32     4-bit q       d            -8 d
    Q4_1   32     4-bit q       d            m
    Q4_K   32     4-bit q       d * sc       -(dmin * mn)
    Q6_K   16     int8 q - 32   d * sc       -

Every product ``scale * code`` is exact in float32 (at most 11 + 7 + 6 = 24 significant bits),
so dequantising rounds at most once, in the one addition, exactly as ``gguf.quants`` does: the
values are bit for bit the float32 ones of the fp32 path. Weights take 0.56 (Q4_0/Q4_1) to 1.25
(Q6_K) bytes per value instead of 4.

The matrix product dequantises the weight to the activations' dtype and runs the dense dot of
the dequantised path, so its results are the same bit for bit. XLA:CPU materialises the
dequantised matrix rather than fusing it into the dot: the saving is memory and load time, not
decode speed (``benchmarks/RESULTS.md``, issue 13, has the measurements).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import equinox as eqx
import gguf
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

_Q = gguf.GGMLQuantizationType


class QuantizedMatrix(eqx.Module):
    """A block-quantised ``[..., out, in]`` matrix (see the module docstring for the encoding).

    Leading axes (a stack of layers) are allowed; :func:`jax.lax.scan` slices them like any
    pytree. ``codes`` is ``uint8 [..., out, blocks, block/2]`` for 4-bit codes and ``int8
    [..., out, blocks, block]`` for 8-bit; ``scale`` and ``offset`` are ``[..., out, blocks]``
    float16 or float32 (whichever holds them exactly).
    """

    codes: Int[Array, "*lead out blocks width"]
    scale: Float[Array, "*lead out blocks"]
    offset: Float[Array, "*lead out blocks"] | None
    bits: int = eqx.field(static=True)

    @property
    def block(self) -> int:
        """Input columns per block."""
        return self.codes.shape[-1] * (2 if self.bits == 4 else 1)

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical shape ``(..., out, in)``."""
        return (*self.codes.shape[:-2], self.codes.shape[-2] * self.block)

    @property
    def nbytes(self) -> int:
        """Bytes held (codes, scales and offsets)."""
        return sum(a.nbytes for a in (self.codes, self.scale, self.offset) if a is not None)

    def dequantize(self, dtype: Any = jnp.float32) -> Float[Array, "*lead out in"]:
        """The dense matrix (float32 arithmetic, then cast to ``dtype``)."""
        xp = np if isinstance(self.codes, np.ndarray) else jnp
        codes = self.codes
        if self.bits == 4:
            codes = xp.concatenate([codes & 15, codes >> 4], axis=-1)
        values = _scaled(codes, self.scale, self.offset, xp)
        return values.reshape(self.shape).astype(dtype)

    def nonfinite(self) -> int:
        """How many scales and offsets are NaN or infinite (the codes are integers)."""
        return sum(int(np.size(a) - np.isfinite(a).sum()) for a in (self.scale, self.offset) if a is not None)


def _scaled(codes, scale, offset, xp=jnp):
    values = codes.astype(xp.float32) * scale[..., None].astype(xp.float32)
    if offset is not None:
        values = values + offset[..., None].astype(xp.float32)
    return values


Weight = Float[Array, "*lead out in"] | QuantizedMatrix
"""A dense matrix or a :class:`QuantizedMatrix`."""


def linear(x: Float[Array, "*n in"], weight: Weight) -> Float[Array, "*n out"]:
    """``x · weight^T`` for a dense ``[out, in]`` matrix or a 2-D :class:`QuantizedMatrix`,
    which is dequantised to ``x.dtype`` first (the same dense matrix and the same dot as the
    dequantised path, so the same result bit for bit)."""
    return jnp.einsum("...i,oi->...o", x, dense(weight, x.dtype))


def take_rows(weight: Weight, ids: Int[Array, "*n"], dtype: Any) -> Float[Array, "*n in"]:
    """Rows ``ids`` of ``weight`` (an embedding lookup), dense in ``dtype``."""
    if not isinstance(weight, QuantizedMatrix):
        return jnp.take(weight, ids, axis=0).astype(dtype)
    rows = jax.tree.map(lambda a: jnp.take(a, ids, axis=0), weight)
    return rows.dequantize(dtype)


def dense(weight: Weight, dtype: Any) -> Float[Array, "*lead out in"]:
    """``weight`` as a dense array of ``dtype`` (a no-op for a dense one of that dtype)."""
    return weight.dequantize(dtype) if isinstance(weight, QuantizedMatrix) else weight.astype(dtype)


def nonfinite(weight: np.ndarray | QuantizedMatrix) -> int:
    """How many stored values of ``weight`` are NaN or infinite."""
    if isinstance(weight, QuantizedMatrix):
        return weight.nonfinite()
    return int(np.size(weight) - np.isfinite(weight).sum())


# -- building from GGUF bytes (host side, numpy) ---------------------------------------------

PACKED_TYPES = frozenset({_Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q4_K, _Q.Q6_K})
"""GGUF types :func:`from_gguf_blocks` keeps packed."""


def from_gguf_blocks(raw: np.ndarray, kind: gguf.GGMLQuantizationType) -> QuantizedMatrix:
    """A host (numpy) :class:`QuantizedMatrix` from a GGUF tensor's raw bytes ``[..., bytes_per_row]``."""
    block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
    blocks = raw.reshape(*raw.shape[:-1], raw.shape[-1] // block_bytes, block_bytes)
    f16 = lambda b: np.ascontiguousarray(b).view(np.float16)[..., 0]  # noqa: E731  (2 bytes → one float16)
    if kind == _Q.Q8_0:
        return QuantizedMatrix(blocks[..., 2:].view(np.int8), f16(blocks[..., :2]), None, 8)
    if kind == _Q.Q4_0:
        d = f16(blocks[..., :2])
        return QuantizedMatrix(blocks[..., 2:], d, -8 * d.astype(np.float32), 4)
    if kind == _Q.Q4_1:
        return QuantizedMatrix(blocks[..., 4:], f16(blocks[..., :2]), f16(blocks[..., 2:4]), 4)
    if kind == _Q.Q4_K:  # d, dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks, 128 bytes of nibbles
        d, dmin = f16(blocks[..., :2]).astype(np.float32), f16(blocks[..., 2:4]).astype(np.float32)
        sc, mn = _k_scales_mins(blocks[..., 4:16])
        # Each 32 bytes hold two sub-blocks: the low nibbles are the first, the high nibbles the second.
        nibbles = blocks[..., 16:].reshape(*blocks.shape[:-1], 4, 1, 32) >> np.array([[0], [4]], np.uint8)
        codes = (nibbles & 15).reshape(*raw.shape[:-1], -1, 32)
        scale = (d[..., None] * sc).reshape(codes.shape[:-1])
        offset = -(dmin[..., None] * mn).reshape(codes.shape[:-1])
        return QuantizedMatrix(codes[..., :16] | (codes[..., 16:] << 4), scale, offset, 4)
    if kind == _Q.Q6_K:  # 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 scales, d
        low = blocks[..., :128].reshape(*blocks.shape[:-1], 2, 1, 64) >> np.array([[0], [4]], np.uint8)
        high = blocks[..., 128:192].reshape(*blocks.shape[:-1], 2, 1, 32) >> np.array([[0], [2], [4], [6]], np.uint8)
        low = (low & 15).reshape(*blocks.shape[:-1], 2, 4, 32)
        high = (high & 3).reshape(*blocks.shape[:-1], 2, 4, 32)
        codes = ((low | (high << 4)).astype(np.int8) - 32).reshape(*raw.shape[:-1], -1, 16)
        sc = blocks[..., 192:208].view(np.int8).astype(np.float32)
        scale = (f16(blocks[..., 208:210]).astype(np.float32)[..., None] * sc).reshape(codes.shape[:-1])
        return QuantizedMatrix(codes, scale, None, 8)
    raise ValueError(f"GGUF type {kind.name} is not kept packed (packed: {sorted(t.name for t in PACKED_TYPES)})")


def _k_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 8 six-bit scales and mins from 12 bytes: bytes 0-3 hold scales 0-3 (low 6 bits) and
    the top 2 bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the low 4 bits of
    scales 4-7 (low nibble) and mins 4-7 (high nibble)."""
    first, second, rest = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([first & 63, (rest & 15) | ((first >> 6) << 4)], axis=-1)
    mn = np.concatenate([second & 63, (rest >> 4) | ((second >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


# -- stacking and concatenating (host side) --------------------------------------------------


def _converted(m: QuantizedMatrix, bits: int, block: int, with_offset: bool, dtype: Any) -> QuantizedMatrix:
    """``m`` re-expressed with ``bits``-bit codes in blocks of ``block`` (a divisor of ``m.block``;
    4 bits only if ``m`` has them in blocks of ``block``), scales and offsets in ``dtype``."""
    codes = m.codes
    if m.bits == 4 and bits == 8:
        codes = np.concatenate([codes & 15, codes >> 4], axis=-1).astype(np.int8)
    split = m.block // block
    codes = codes.reshape(*codes.shape[:-2], -1, codes.shape[-1] // split)
    offset = m.offset if m.offset is not None or not with_offset else np.zeros_like(m.scale)
    per_block = lambda a: np.repeat(a.astype(dtype), split, axis=-1)  # noqa: E731
    return QuantizedMatrix(codes, per_block(m.scale), None if offset is None else per_block(offset), bits)


def _common(parts: Sequence[np.ndarray | QuantizedMatrix]) -> list[np.ndarray | QuantizedMatrix]:
    """``parts`` in one representation: unchanged if they already share one; dense float32 if
    any is dense; else the smallest block, 4-bit codes only if all have them in that block,
    offsets if any has them (every conversion is exact)."""
    if not any(isinstance(p, QuantizedMatrix) for p in parts):
        return list(parts)
    if not all(isinstance(p, QuantizedMatrix) for p in parts):
        return [p.dequantize(np.float32) if isinstance(p, QuantizedMatrix) else p for p in parts]
    constants = lambda p: (p.scale, p.offset) if p.offset is not None else (p.scale,)  # noqa: E731
    forms = {(p.bits, p.block, *(a.dtype for a in constants(p))) for p in parts}
    if len(forms) == 1:
        return list(parts)
    block = min(p.block for p in parts)
    bits = 4 if all(p.bits == 4 and p.block == block for p in parts) else 8
    with_offset = any(p.offset is not None for p in parts)
    dtype = np.result_type(*(a for p in parts for a in constants(p)))
    return [_converted(p, bits, block, with_offset, dtype) for p in parts]


def stack(parts: Sequence[np.ndarray | QuantizedMatrix]) -> np.ndarray | QuantizedMatrix:
    """``np.stack`` along a new leading axis, for dense or quantised matrices alike."""
    return jax.tree.map(lambda *a: np.stack(a), *_common(parts))


def concatenate(parts: Sequence[np.ndarray | QuantizedMatrix]) -> np.ndarray | QuantizedMatrix:
    """``np.concatenate`` along the output (first) axis, for dense or quantised matrices alike."""
    return jax.tree.map(lambda *a: np.concatenate(a), *_common(parts))


def to_device(weight: np.ndarray | QuantizedMatrix, dtype: Any) -> Weight:
    """A host weight on the device: dense ones cast to ``dtype``, quantised ones as stored."""
    if isinstance(weight, QuantizedMatrix):
        return jax.tree.map(jnp.asarray, weight)
    return jnp.asarray(weight, dtype)
