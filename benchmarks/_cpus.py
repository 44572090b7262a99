"""Pin a benchmark to a few cores, before jax is imported.

Every thread PyTorch and XLA start later inherits the process's CPU affinity, so two systems
timed in one process get exactly the same CPUs. With one core XLA:CPU is also made
single-threaded: it reads ``XLA_FLAGS`` once, when its backend starts, hence "before import".
"""

from __future__ import annotations

import os


def pin(cores: int) -> None:
    """Restrict this process to its first ``cores`` allowed CPUs (single-threaded XLA for 1)."""
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:cores])
    if cores == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()


def pin_from_argv(argv: list[str], default: int) -> int:
    """Pin to the ``--threads K`` found in ``argv`` (``default`` without one), before argparse
    runs, since jax must not be imported first; returns ``K``."""
    cores = default
    for flag, value in zip(argv, argv[1:]):
        if flag == "--threads":
            cores = int(value)
    pin(cores)
    return cores
