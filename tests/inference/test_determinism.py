"""Determinism: the same key gives bit-identical particles, weights and log Z in two separate
processes, jitted and with ``jax.disable_jit()``, with JAX's persistent compilation cache cold
(first process, empty cache directory) and warm (second process, same directory).

Slow: each process imports JAX and compiles afresh (~2 x 20 s on the 2-core CI machine).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

RUN = textwrap.dedent(
    """
    import hashlib, json, sys
    import jax
    jax.config.update("jax_compilation_cache_dir", sys.argv[1])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    import numpy as np
    import ppl
    from ppl.inference import smc
    from ppl.models.toy_lm import EOS, MAX_NEW, PROMPT, tiny_llama

    hits = []
    jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event == "/jax/compilation_cache/cache_hits" else None)

    def digest(result):
        leaves = jax.tree.leaves((result.particles, result.log_weights, result.log_z, result.ancestors))
        return hashlib.sha256(b"".join(np.asarray(leaf).tobytes() for leaf in leaves)).hexdigest()

    program = ppl.Generation(tiny_llama(0), np.asarray(PROMPT, np.int32), MAX_NEW, EOS)
    out = {"jit": digest(smc(program, jax.random.key(5), 16)), "jit_cache_hits": len(hits)}
    with jax.disable_jit():
        out["no_jit"] = digest(smc(program, jax.random.key(5), 16))
    print(json.dumps(out))
    """
)


def run(cache_dir) -> dict:
    process = subprocess.run([sys.executable, "-c", RUN, str(cache_dir)], capture_output=True, text=True, timeout=600)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_same_key_same_bits_across_processes_jit_modes_and_cache_states(tmp_path):
    cold = run(tmp_path)
    assert any(tmp_path.iterdir()), "the first process wrote nothing to the compilation cache"
    warm = run(tmp_path)
    print(f"\ncold: {cold}\nwarm: {warm}")
    assert cold["jit_cache_hits"] == 0 and warm["jit_cache_hits"] > 0
    assert cold["jit"] == warm["jit"]
    assert cold["no_jit"] == warm["no_jit"]
