"""Quantised weights on device: each packed GGUF type against ``gguf.quants.dequantize`` (an
independent reference), mixed stacks, SmolLM2 on the packed path against the fp32 path (Q4_1 as
shipped, and its layers re-quantised to Q8_0), memory, bf16, and clear errors."""

from __future__ import annotations

import dataclasses

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ppl.models import CheckpointError, Llama, check_memory, estimate_memory, load_gguf
from ppl.models.loaders import GGUFTensor, dequantize, gguf_hf_tensors, read_gguf
from ppl.models.quant import PACKED_TYPES, QuantizedMatrix, concatenate, from_gguf_blocks, linear, stack, take_rows

Q = gguf.GGMLQuantizationType
ENCODABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1)  # gguf.quants encodes these; K-quant blocks are random bytes


def random_blocks(kind: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Raw GGUF bytes ``[rows, bytes_per_row]`` of ``kind``, with finite, mixed-sign block scales."""
    if kind in ENCODABLE:
        return gguf.quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), kind)
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(-0.01, 0.01, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q6_K:  # d is the last two bytes
        raw[..., -2:] = scales[..., :2]
    else:  # d, dmin are the first four
        raw[..., :4] = scales
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, kind: Q) -> np.ndarray:
    return gguf.quants.dequantize(raw, kind).reshape(raw.shape[0], -1)


@pytest.mark.parametrize("kind", sorted(PACKED_TYPES), ids=lambda k: k.name)
def test_device_dequantisation_is_gguf_bit_for_bit(kind):
    rng = np.random.default_rng(int(kind))
    raw = random_blocks(kind, 6, 512, rng)
    expected = reference(raw, kind)
    matrix = jax.tree.map(jnp.asarray, from_gguf_blocks(raw, kind))
    assert matrix.shape == (6, 512) and matrix.nbytes <= expected.nbytes / 3
    np.testing.assert_array_equal(jax.jit(QuantizedMatrix.dequantize)(matrix), expected)
    rows = jnp.array([[4, 0], [5, 4]])
    np.testing.assert_array_equal(take_rows(matrix, rows, jnp.float32), expected[np.asarray(rows)])
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.float32)  # the same dot as the dense path
    np.testing.assert_array_equal(jax.jit(linear)(x, matrix), jax.jit(linear)(x, jnp.asarray(expected)))


@pytest.mark.parametrize("kinds", [(Q.Q4_K, Q.Q6_K, Q.Q4_K), (Q.Q4_0, Q.Q4_1), (Q.Q8_0, Q.Q4_1, Q.Q6_K)])
def test_mixed_types_stack_and_concatenate_exactly(kinds):
    """Q4_K_M files mix Q4_K and Q6_K across layers and within q/k/v: one common form, no loss."""
    rng = np.random.default_rng(1)
    raws = [random_blocks(kind, 4, 256, rng) for kind in kinds]
    parts = [from_gguf_blocks(raw, kind) for raw, kind in zip(raws, kinds)]
    expected = [reference(raw, kind) for raw, kind in zip(raws, kinds)]
    stacked, joined = stack(parts), concatenate(parts)
    assert stacked.bits == joined.bits == (4 if set(kinds) <= {Q.Q4_0, Q.Q4_1} else 8)
    np.testing.assert_array_equal(stacked.dequantize(np.float32), np.stack(expected))
    np.testing.assert_array_equal(joined.dequantize(np.float32), np.concatenate(expected))
    mixed = concatenate([parts[0], expected[1]])  # with a dense part: everything dense
    np.testing.assert_array_equal(mixed, np.concatenate(expected[:2]))


LAYERS, VOCAB = 2, 4096


@pytest.fixture(scope="module")
def small_smollm2(smollm2_file):
    """SmolLM2's file cut to its first two layers and 4096 tokens (the tensors as shipped: Q4_1
    layers, a Q8_0 tied embedding), so that models build and compile in seconds."""
    file = read_gguf(smollm2_file)
    tensors = {n: t for n, t in file.tensors.items() if not n.startswith("blk.") or int(n.split(".")[1]) < LAYERS}
    embed = tensors["token_embd.weight"]
    tensors[embed.name] = GGUFTensor(embed.name, embed.type, (VOCAB, embed.shape[1]), embed.raw[:VOCAB])
    metadata = {**file.metadata, "llama.block_count": LAYERS, "llama.vocab_size": VOCAB}
    return dataclasses.replace(file, metadata=metadata, tensors=tensors)


def build(file, quantized: bool, dtype=jnp.float32) -> Llama:
    return Llama.from_hf_tensors(*gguf_hf_tensors(file, quantized), dtype)


def requantised(file, kind: Q):
    """``file`` with its layers' matrices re-encoded as ``kind``."""
    tensors = dict(file.tensors)
    for name, t in file.tensors.items():
        if len(t.shape) == 2 and name.startswith("blk."):
            tensors[name] = GGUFTensor(name, kind, t.shape, gguf.quants.quantize(dequantize(t), kind))
    return dataclasses.replace(file, tensors=tensors)


@pytest.mark.parametrize("kind", [Q.Q4_1, Q.Q8_0], ids=lambda k: k.name)
def test_smollm2_packed_logits_equal_fp32_path(small_smollm2, kind):
    """SmolLM2's layers (Q4_1 as shipped; re-quantised to Q8_0) with its Q8_0 tied head: the
    packed path computes the same dense matrices and dots as the fp32 path, so the logits agree
    to 1e-4 (in fact exactly, on XLA:CPU; all 30 layers: the slow test below)."""
    file = small_smollm2 if kind == Q.Q4_1 else requantised(small_smollm2, kind)
    packed, dense = build(file, True), build(file, False)
    assert isinstance(packed.layers.gate_up, QuantizedMatrix) and isinstance(packed.embed, QuantizedMatrix)
    assert packed.layers.qkv.shape == dense.layers.qkv.shape and packed.dtype == dense.dtype == jnp.float32
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, 12))
    run = jax.jit(Llama.__call__)
    np.testing.assert_allclose(run(packed, tokens), run(dense, tokens), atol=1e-4)


@pytest.mark.slow
@pytest.mark.heavy  # CI time; CI checks the packed path on two layers of the same file
def test_whole_smollm2_packed_logits_equal_fp32_path(smollm2_file):
    """All 30 layers and the 49,152-token head."""
    packed, dense = load_gguf(smollm2_file, quantized=True), load_gguf(smollm2_file, quantized=False)
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, packed.vocab_size, 16))
    run = jax.jit(Llama.__call__)
    np.testing.assert_allclose(run(packed, tokens), run(dense, tokens), atol=1e-4)


def test_smollm2_packed_weights_memory(smollm2_file):
    """All of SmolLM2 packed: at most a third of its float32 weights (measured: 0.18)."""
    model = load_gguf(smollm2_file, quantized=True)
    packed = sum(leaf.nbytes for leaf in jax.tree.leaves(model))
    assert packed <= estimate_memory(model.config, 1, 1).weights / 3
    # The memory guard counts the largest matrix dequantised for its product (the tied head).
    assert check_memory(model, 1, 8).temporaries >= 4 * model.vocab_size * model.hidden_size


def test_bfloat16_path_matches_fp32_within_bf16_rounding(small_smollm2):
    """Weights, activations and KV cache in bfloat16 (8 significant bits), against float32: the
    logits differ by less than 5% of their range and the next-token distributions by KL < 0.02
    nats (all 30 layers measured 4.4% and 0.017)."""
    half, full = build(small_smollm2, True, jnp.bfloat16), build(small_smollm2, True)
    assert half.dtype == half.init_cache(1, 4).keys.dtype == jnp.bfloat16
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, 12))
    run = jax.jit(Llama.__call__)
    low, high = run(half, tokens), run(full, tokens)
    assert low.dtype == jnp.float32
    assert float(jnp.abs(low - high).max()) < 0.05 * float(jnp.abs(high).max())
    log_p, log_q = jax.nn.log_softmax(high), jax.nn.log_softmax(low)
    assert float(jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).max()) < 0.02


def test_unsupported_and_corrupt_packed_tensors_are_named(small_smollm2, smollm2_file, tmp_path):
    file = small_smollm2
    q2 = dataclasses.replace(file, tensors=dict(file.tensors))
    t = file.tensors["blk.0.ffn_up.weight"]
    block, size = gguf.GGML_QUANT_SIZES[Q.Q2_K]
    q2.tensors[t.name] = GGUFTensor(
        t.name, Q.Q2_K, t.shape, np.zeros((t.shape[0], t.shape[1] // block * size), np.uint8)
    )
    with pytest.raises(CheckpointError, match="'blk.0.ffn_up.weight' has GGUF type Q2_K, not supported"):
        build(q2, True)
    nan = dataclasses.replace(file, tensors=dict(file.tensors))
    raw = file.tensors["blk.0.attn_q.weight"].raw.copy()
    raw[3, :2] = np.array([np.nan], np.float16).view(np.uint8)  # a Q4_1 block scale
    nan.tensors["blk.0.attn_q.weight"] = dataclasses.replace(file.tensors["blk.0.attn_q.weight"], raw=raw)
    with pytest.raises(CheckpointError, match="q_proj.weight' holds 1 non-finite values"):
        build(nan, True)
    path = tmp_path / "cut.gguf"
    path.write_bytes(smollm2_file.read_bytes()[:60_000_000])
    with pytest.raises(CheckpointError, match=r"cut.gguf: tensor .* needs bytes .* \(truncated\?\)"):
        load_gguf(path, quantized=True)
