"""The Llama decoder against HF transformers (same weights), and its KV cache against
recomputation from scratch."""

from __future__ import annotations

import dataclasses
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from ppl.lm import LM
from ppl.models import Gemma3Config, KVCache, Llama, Tokenizer, load_model

# Each prompt length compiles its own programs (~20 s on 2 cores): CI checks two, `-m heavy` all five.
_HEAVY = [pytest.mark.slow, pytest.mark.heavy]
PROMPTS = [
    pytest.param("The capital of France is", marks=_HEAVY),
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    pytest.param("Q: What is 17 * 23?\nA:", marks=_HEAVY),
    pytest.param("Once upon a time, in a village at the edge of a great forest, there lived", marks=_HEAVY),
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]


@functools.partial(jax.jit, static_argnames=("steps", "max_len"))
def greedy(model: Llama, prompt: jax.Array, steps: int, max_len: int) -> jax.Array:
    """``steps`` greedy tokens after ``prompt``: one prefill, then one cached decode per token."""
    logits, cache = model.prefill(prompt, max_len)
    first = jnp.argmax(logits).astype(jnp.int32)[None]

    def step(carry, _):
        cache, token = carry
        logits, cache = model.decode(cache, token)
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, token), token[0]

    _, rest = jax.lax.scan(step, (cache, first), None, length=steps - 1)
    return jnp.concatenate([first, rest])


def hf_greedy(hf: torch.nn.Module, prompt: list[int], steps: int) -> list[int]:
    """HF's greedy tokens, decoding with its own KV cache (``past_key_values``)."""
    with torch.no_grad():
        out = hf(torch.tensor([prompt]), use_cache=True)
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(steps - 1):
            out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def hf_logits(hf: torch.nn.Module, tokens: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].numpy()


full_logits = eqx.filter_jit(lambda model, tokens: model(tokens))
batched_full_logits = eqx.filter_jit(lambda model, tokens: jax.vmap(model)(tokens))


# -- parity with HF ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_file) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_file)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_matches_hf(smollm2, smollm2_hf, smollm2_tokenizer, prompt):
    tokens = smollm2_tokenizer.encode(prompt)
    ours = np.asarray(full_logits(smollm2, jnp.asarray(tokens)))
    error = np.abs(ours - hf_logits(smollm2_hf, tokens)).max()
    print(f"SmolLM2 logits max-abs error {error:.2e} on {len(tokens)} tokens: {prompt[:30]!r}")
    assert error < 1e-3
    generated = greedy(smollm2, jnp.asarray(tokens), steps=32, max_len=len(tokens) + 32)
    assert generated.tolist() == hf_greedy(smollm2_hf, tokens, 32)


GEMMA3_PROMPTS = [
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Q: What is 17 * 23? Show your work.\nA:",
    "Once upon a time, in a village at the edge of a great forest, there lived",
    "<start_of_turn>user\nWrite a haiku about the sea.<end_of_turn>\n<start_of_turn>model\n",
]


@pytest.mark.slow
@pytest.mark.heavy  # CI time (~2 min and the Gemma packages' install); tiny Gemma 3 checkpoints match HF in CI
def test_gemma3_matches_hf(gemma3_pair, gemma3_file):
    """Gemma 3 270M against HF on the same dequantised tensors: logits on 5 prompts (cut to the
    shortest's length, so one compilation serves all) and 16 greedy tokens decoded with a cache."""
    ours, hf = gemma3_pair
    tokenizer = Tokenizer.from_gguf(gemma3_file)
    encoded = [tokenizer.encode(p) for p in GEMMA3_PROMPTS]
    prompts = [ids[: min(map(len, encoded))] for ids in encoded]
    logits = np.asarray(batched_full_logits(ours, jnp.asarray(prompts)))
    errors = [np.abs(logits[i] - hf_logits(hf, p)).max() for i, p in enumerate(prompts)]
    print(f"Gemma 3 logits max-abs errors {np.round(errors, 6).tolist()}")
    assert max(errors) < 1e-3
    generated = jax.vmap(lambda p: greedy(ours, p, steps=16, max_len=32))(jnp.asarray(prompts))
    assert generated.tolist() == [hf_greedy(hf, p, 16) for p in prompts]


def test_tiny_checkpoints_match_hf(tiny_pair):
    ours, hf, _ = tiny_pair
    tokens = np.random.default_rng(0).integers(0, ours.vocab_size, 40).tolist()
    error = np.abs(np.asarray(full_logits(ours, jnp.asarray(tokens))) - hf_logits(hf, tokens)).max()
    print(f"{type(hf).__name__} logits max-abs error {error:.2e}")
    assert error < 1e-4
    assert greedy(ours, jnp.asarray(tokens[:8]), steps=32, max_len=40).tolist() == hf_greedy(hf, tokens[:8], 32)


# Qwen3 differs from Qwen2 only by its q/k norms, which the HF parity test (prefill and cached
# greedy decode) checks; the cache and scan tests run on the other decoders.
without_qwen3 = pytest.mark.parametrize("tiny_pair", ["gemma3", "llama", "qwen2"], indirect=True)


def test_llama3_rope_scaling_is_applied(tiny_pair):
    ours, _, _ = tiny_pair
    default = dataclasses.replace(ours.config, rope_scaling=None).rope_inv_freq()
    assert np.allclose(ours.rope_inv_freq, default) == (ours.config.rope_scaling is None)


@pytest.mark.parametrize("tiny_pair", ["llama", "qwen2"], indirect=True)  # CI time: Gemma 3 runs in fp32
def test_protocol_and_bfloat16(tiny_pair):
    ours, _, directory = tiny_pair
    assert isinstance(ours, LM)
    tokens = jnp.arange(12) % ours.vocab_size
    half = load_model(directory, dtype=jnp.bfloat16)
    assert {a.dtype for a in jax.tree.leaves(half.layers)} == {half.embed.dtype} == {jnp.dtype(jnp.bfloat16)}
    assert half.prefill(tokens, 16)[1].keys.dtype == jnp.bfloat16
    logits32, logits16 = full_logits(ours, tokens), full_logits(half, tokens)
    assert logits16.dtype == jnp.float32
    assert float(jnp.abs(logits32 - logits16).max()) < 0.1 * float(jnp.abs(logits32).max())


# -- the cache -----------------------------------------------------------------------------


def stack_rows(caches: list[KVCache]) -> KVCache:
    return jax.tree.map(lambda *rows: jnp.concatenate(rows, axis=1 if rows[0].ndim == 5 else 0), *caches)


def recomputed_last(model: Llama, sequences: list[list[int]], length: int) -> np.ndarray:
    """Each sequence's last logits from scratch. Sequences are right-padded to one ``length``
    (one compilation); causality makes the padding invisible to earlier positions."""
    padded = jnp.asarray([s + [0] * (length - len(s)) for s in sequences])
    logits = batched_full_logits(model, padded)
    return np.stack([np.asarray(logits[i, len(s) - 1]) for i, s in enumerate(sequences)])


@without_qwen3
def test_cached_decode_equals_recomputation(tiny_pair):
    """Rows of different lengths, decoded together, then resampled with ``reindex``."""
    model, _, _ = tiny_pair
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, model.vocab_size, n).tolist() for n in (5, 9, 2)]
    max_len = 20
    caches = [model.prefill(jnp.asarray(p), max_len)[1] for p in prompts]
    cache = model.broadcast(stack_rows([c for c in caches[:1]]), 2)  # two copies of row 0 ...
    cache = stack_rows([cache, caches[1], caches[2]])  # ... plus rows of other lengths
    sequences = [list(prompts[0]), list(prompts[0]), list(prompts[1]), list(prompts[2])]
    decode, reindex = eqx.filter_jit(Llama.decode), eqx.filter_jit(Llama.reindex)
    worst = 0.0
    for step in range(6):
        tokens = rng.integers(0, model.vocab_size, len(sequences))
        logits, cache = decode(model, cache, jnp.asarray(tokens, jnp.int32))
        sequences = [s + [int(t)] for s, t in zip(sequences, tokens)]
        worst = max(worst, np.abs(np.asarray(logits) - recomputed_last(model, sequences, max_len)).max())
        if step == 2:
            ancestors = np.array([2, 2, 0, 3])
            cache = reindex(model, cache, jnp.asarray(ancestors))
            sequences = [list(sequences[a]) for a in ancestors]
    assert cache.lengths.tolist() == [len(s) for s in sequences]
    print(f"cache vs recomputation max-abs error {worst:.2e}")
    assert worst < 1e-4


def test_smollm2_cache_equals_recomputation(smollm2):
    prompt = [1, 504, 3575, 282, 4649, 314]
    logits, cache = smollm2.prefill(jnp.asarray(prompt), 12)
    errors = [np.abs(np.asarray(logits) - recomputed_last(smollm2, [prompt], 12)[0]).max()]
    cache = smollm2.broadcast(cache, 2)
    sequences = [list(prompt), list(prompt)]
    for tokens in ([28, 253], [2979, 30]):
        logits, cache = smollm2.decode(cache, jnp.asarray(tokens))
        sequences = [s + [t] for s, t in zip(sequences, tokens)]
        errors.append(np.abs(np.asarray(logits) - recomputed_last(smollm2, sequences, 12)).max())
    print(f"SmolLM2 cache vs recomputation max-abs error {max(errors):.2e}")
    assert max(errors) < 1e-4


def test_prompt_longer_than_cache_is_an_error(tiny_pair):
    model, _, _ = tiny_pair
    with pytest.raises(ValueError, match="7 tokens.*max_len=5"):
        model.prefill(jnp.zeros(7, jnp.int32), max_len=5)


@without_qwen3
def test_layers_are_scanned_not_unrolled(tiny_pair):
    """The decode step's program does not grow with depth (so neither does compile time)."""
    model, _, _ = tiny_pair
    deeper_config = {"num_layers": 3 * model.config.num_layers}
    if isinstance(model.config, Gemma3Config):
        deeper_config["global_layers"] = 3 * model.config.global_layers
    deeper = dataclasses.replace(
        model,
        config=dataclasses.replace(model.config, **deeper_config),
        layers=jax.tree.map(lambda a: jnp.concatenate([a, a, a]), model.layers),
    )
    sizes = []
    for m in (model, deeper):
        cache = m.broadcast(m.prefill(jnp.arange(3), 8)[1], 2)
        sizes.append(len(jax.make_jaxpr(m.decode)(cache, jnp.zeros(2, jnp.int32)).jaxpr.eqns))
    assert sizes[0] == sizes[1]
