"""How long the memory guard takes to refuse impossible work, and to pass work that fits.

    python benchmarks/memory_guard.py

Loads SmolLM2-135M-Instruct once, then times ``check_memory`` (pure arithmetic on the config,
plus one read of /proc/meminfo): for N = 1,000,000 particles x 200 positions, which it must
refuse, and for N = 32 x 128, which it must pass. Prints ``RESULT name=value`` lines.
"""

from __future__ import annotations

import time

from ppl.models import InsufficientMemoryError, check_memory, load_gguf, smollm2_path


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    lm = load_gguf(smollm2_path())

    def refuse():
        try:
            check_memory(lm, 1_000_000, 200)
        except InsufficientMemoryError as error:
            return str(error)
        raise AssertionError("a million particles were not refused")

    print(refuse())
    print(f"RESULT memory_guard_refusal_ms={best_of(20, refuse) * 1e3:.3f}")
    print(f"RESULT memory_guard_pass_ms={best_of(20, lambda: check_memory(lm, 32, 128)) * 1e3:.3f}")


if __name__ == "__main__":
    main()
