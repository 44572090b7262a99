"""Warm starts: keep XLA's compiled code on disk between processes.

Every new process compiles a program's SMC function again: tens of seconds for SmolLM2 on a
CPU. JAX can store compiled executables in a persistent cache keyed by the program, its
shapes and the JAX/XLA version; a later process with the same shapes loads them in a fraction
of a second. One call turns it on::

    import ppl
    ppl.enable_compilation_cache()          # $PPL_CACHE_DIR, else the user cache folder

The ``ppl`` command line does this itself (``--cache-dir``, ``--no-cache``). Entries are reused
only for identical shapes: the same ``n_particles``, ``max_new_tokens`` and prompt length.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "PPL_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$PPL_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/ppl-jax/jax`` (``~/.cache/ppl-jax/jax``)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "ppl-jax" / "jax"


def enable_compilation_cache(path: str | os.PathLike[str] | None = None) -> Path:
    """Turn on JAX's persistent compilation cache in ``path`` (default: :func:`default_cache_dir`)
    and return the folder used.

    Every compilation that takes longer than a tenth of a second is stored, so the second
    process that runs the same program with the same shapes skips XLA compilation. Call it
    before the first jit-compiled call; it affects the whole process.
    """
    import jax

    folder = Path(path).expanduser() if path is not None else default_cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"cannot create the compilation cache folder {folder}: {error}") from error
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return folder
