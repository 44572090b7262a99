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


def threads_from_argv(argv: list[str], default: int) -> int:
    """The value of ``--threads K`` / ``--threads=K`` in ``argv`` (read before argparse runs,
    since pinning must happen before jax is imported), else ``default``."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return default
