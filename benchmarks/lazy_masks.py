"""The speed cost of lazy host masks (llguidance through ``pure_callback``) against a DFA table.

SmolLM2-135M-Instruct (fp32) generates a JSON object under a JSON schema (converted to a
regex by outlines-core) with SMC, ``N`` particles, at most ``T`` tokens, locally optimal
proposal, one core. The same regex is enforced two ways: ``constraints.regex`` (a ``TokenDFA``
on device: masking is a gather) and ``grammar.lazy_regex`` (llguidance computes each mask on
the host, one batched callback per step for ``mask`` and one for ``advance``). A small
context-free grammar (arithmetic with parentheses, which no DFA can express) runs the same
way through ``grammar.grammar``. Each configuration runs once to compile, then is timed on a
second key (the host store keeps what the first run computed, as a long session would).

    python benchmarks/lazy_masks.py [--particles 8] [--tokens 32]

``RESULT`` lines: ``lazy_masks_s.<name>`` per configuration and ``lazy_masks_slowdown`` (lazy
regex time over table time).
"""

from __future__ import annotations

import argparse
import json
import time

from _cpus import pin  # benchmarks/ is on sys.path when this script runs

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
}
ARITHMETIC = r"""start: expr
expr: term (("+" | "-" | "*") term)*
term: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    args = parser.parse_args()
    pin(1)
    import jax
    from outlines_core.json_schema import build_regex_from_schema

    import ppl
    from ppl.inference import smc
    from ppl.models import constraints, grammar, smollm2

    lm, tokenizer = smollm2()
    json_prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Describe Ada Lovelace as JSON with her name and age."}]
    )
    math_prompt = tokenizer.encode_chat(
        [{"role": "user", "content": "Write an arithmetic expression with parentheses."}]
    )
    pattern = build_regex_from_schema(json.dumps(SCHEMA))
    configurations = {
        "json_table": (json_prompt, lambda: constraints.regex(pattern, tokenizer)),
        "json_lazy": (json_prompt, lambda: grammar.lazy_regex(pattern, tokenizer)),
        "arithmetic_cfg_lazy": (math_prompt, lambda: grammar.grammar(ARITHMETIC, tokenizer)),
    }
    seconds = {}
    for name, (prompt, build) in configurations.items():
        start = time.perf_counter()
        constraint = build()
        built = time.perf_counter() - start
        program = ppl.Generation(
            lm,
            prompt,
            args.tokens,
            tokenizer.eos_token_id,
            constraint=constraint,
            proposal="locally_optimal",
            require_eos=True,
        )
        start = time.perf_counter()
        jax.block_until_ready(smc(program, jax.random.key(0), args.particles))
        first = time.perf_counter() - start
        start = time.perf_counter()
        result = jax.block_until_ready(smc(program, jax.random.key(1), args.particles))
        seconds[name] = time.perf_counter() - start
        host_calls = getattr(getattr(constraint, "store", None), "calls", 0)
        print(
            f"# {name}: build {built:.2f}s, first run (with compile) {first:.2f}s, timed run {seconds[name]:.2f}s, "
            f"host calls {host_calls}, log Z {float(result.log_z):.3f}",
            flush=True,
        )
        print(f"RESULT lazy_masks_s.{name}={seconds[name]:.3f}", flush=True)
    print(f"RESULT lazy_masks_slowdown={seconds['json_lazy'] / seconds['json_table']:.2f}")


if __name__ == "__main__":
    main()
