"""Where a decode step's matmul time goes, per layer matrix: fp32 against packed Q4_1 weights.

SmolLM2's fused gate/up matrix (``[3072, 576]``, the largest per layer) from its GGUF, stacked
30 times as the model stacks its layers, multiplied by ``[N, 576]`` activations inside a
``lax.scan`` over the stack, as a decode step does. Four variants, timed in turn (best of
``--repeats``, so all see the same machine load), in ms per layer matrix:

- ``fp32_scan``: float32 stack; XLA:CPU copies each layer's slice out of the stack, then dots;
- ``fp32_unstacked``: 30 separate float32 arrays, an unrolled loop: the dot alone;
- ``packed_scan``: the Q4_1 blocks stacked; each step dequantises its slice (the slice read is
  fused into the dequantisation), then dots;
- ``dequantise_only``: the dequantisation of the packed slice alone (summed, so it is computed).

    python benchmarks/quant_matmul.py [--repeats 5] [--threads 1]

Prints ``RESULT <variant>_n<N>_ms=...`` for N = 1, 8, 64.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _cpus  # benchmarks/ is on sys.path when this script runs

if __name__ == "__main__":
    _cpus.pin(_cpus.threads_from_argv(sys.argv, 1))

import jax  # noqa: E402  (after the pinning)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ppl.models import smollm2_path  # noqa: E402
from ppl.models.loaders import dequantize, read_gguf  # noqa: E402
from ppl.models.quant import concatenate, from_gguf_blocks, linear, stack, to_device  # noqa: E402

LAYERS, BATCHES = 30, (1, 8, 64)


def best_ms(fn, *args, repeats: int) -> float:
    fn(*args).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args).block_until_ready()
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / LAYERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="cores the process is pinned to")
    args = parser.parse_args()
    file = read_gguf(smollm2_path())
    blocks = [file.tensors[f"blk.0.ffn_{k}.weight"] for k in ("gate", "up")]
    packed_one = concatenate([from_gguf_blocks(t.raw, t.type) for t in blocks])
    dense_one = np.concatenate([dequantize(t) for t in blocks])
    packed = to_device(stack([packed_one] * LAYERS), jnp.float32)
    dense = jnp.asarray(np.stack([dense_one] * LAYERS))
    unstacked = [jnp.asarray(dense_one + i) for i in range(LAYERS)]  # distinct buffers

    def scan(weights, x):
        return jax.lax.scan(lambda acc, w: (acc + linear(x, w).sum(), None), 0.0, weights)[0]

    def unrolled(weights, x):
        return sum(linear(x, w).sum() for w in weights)

    def dequantise(weights, x):
        return jax.lax.scan(lambda acc, w: (acc + w.dequantize(x.dtype).sum(), None), 0.0, weights)[0]

    print(f"SmolLM2 ffn gate+up [3072, 576] x {LAYERS} layers; {len(os.sched_getaffinity(0))} core(s)")
    for batch in BATCHES:
        x = jnp.ones((batch, 576), jnp.float32) / 576
        variants = {
            "fp32_scan": (jax.jit(scan), dense),
            "fp32_unstacked": (jax.jit(unrolled), unstacked),
            "packed_scan": (jax.jit(scan), packed),
            "dequantise_only": (jax.jit(dequantise), packed),
        }
        for name, (fn, weights) in variants.items():
            print(f"RESULT {name}_n{batch}_ms={best_ms(fn, weights, x, repeats=args.repeats):.2f}", flush=True)


if __name__ == "__main__":
    main()
