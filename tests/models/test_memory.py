"""The memory guard: the estimate matches what the KV cache really allocates, impossible work is
refused in well under a second without allocating, and work that fits is not refused."""

from __future__ import annotations

import time

import jax
import pytest

import ppl.models
from ppl import cli
from ppl.models import InsufficientMemoryError, available_memory, check_memory, estimate_memory
from ppl.models.toy_lm import tiny_llama


@pytest.fixture(scope="module")
def loaded():
    """SmolLM2 and its tokenizer, loaded once: the CLI test reuses them instead of loading again."""
    return ppl.models.smollm2()


def test_kv_cache_estimate_is_the_real_allocation():
    lm = tiny_llama(0)
    cache = lm.init_cache(7, 13)
    estimate = estimate_memory(lm.config, 7, 13, lm.dtype)
    assert estimate.kv_cache == 2 * (cache.keys.nbytes + cache.values.nbytes)  # x2: resampling's copy
    weights = sum(leaf.nbytes for leaf in jax.tree.leaves(lm) if isinstance(leaf, jax.Array))
    assert abs(estimate.weights - weights) <= 0.05 * weights  # the config-only count (rope table aside)
    with pytest.raises(ValueError, match="positive"):
        estimate_memory(lm.config, 0, 13)


def test_available_memory_is_known_on_this_machine():
    available = available_memory()
    assert available is not None and 0 < available < 2**50


def test_impossible_work_is_refused_fast(loaded):
    start = time.perf_counter()
    with pytest.raises(
        InsufficientMemoryError,
        match=r"1000000 particles x 200 positions needs ~.* TiB.*available on cpu.*particles fit",
    ):
        check_memory(loaded[0], 1_000_000, 200)
    seconds = time.perf_counter() - start
    print(f"\ncheck_memory refusal: {seconds * 1e3:.2f} ms")
    assert seconds < 0.1


def test_work_that_fits_is_not_refused(loaded):
    estimate = check_memory(loaded[0], 32, 128)
    assert estimate.kv_cache + estimate.temporaries < available_memory()


def test_steer_refuses_a_million_particles(loaded, monkeypatch):
    """Timed from the moment the model is loaded (the load is the fixture's, reused here; the
    whole ``ppl steer`` call with its imports and the load took 68 s on the shared 2-core
    machine, ~all of it loading) to the refusal."""
    loaded_at = []

    def load():
        loaded_at.append(time.perf_counter())
        return loaded

    monkeypatch.setattr(ppl.models, "smollm2", load)
    with pytest.raises(SystemExit, match=r"ppl steer: generating with 1000000 particles.*--particles, --max-tokens"):
        cli.main(["steer", "Hello", "--particles", "1000000"])
    seconds = time.perf_counter() - loaded_at[0]
    print(f"\nppl steer --particles 1000000: refused {seconds:.3f} s after the model load")
    assert seconds < 1.0
