"""ppl-jax: probabilistic programs over language-model generation, on NumPyro.

A program (``ppl.StateSpace``) is written with NumPyro primitives; inference
(``ppl.inference``) transforms it into one jit-compiled function.

``ppl.inference``, ``ppl.models`` and ``ppl.plot`` are loaded on first use
(``import ppl; ppl.inference.smc``): they import ``ppl`` themselves, so importing them here
eagerly would be a cycle.
"""

import importlib
from typing import Any

__version__ = "0.1.0"

from ppl.cache import default_cache_dir, enable_compilation_cache
from ppl.distributions import LanguageModel, NextToken, check_prompt, prompt_cache
from ppl.generation import Generation, TokenState
from ppl.handlers import log_density, log_weight, observe, pin, propose, temper
from ppl.lm import FeatureLM, ParticleCache
from ppl.lookahead import AcceptanceTwist
from ppl.program import StateSpace, run_weighted
from ppl.results import AllDeadError, MCMCResult, SMCResult

__all__ = [
    "FeatureLM",
    "AllDeadError",
    "AcceptanceTwist",
    "Generation",
    "LanguageModel",
    "MCMCResult",
    "NextToken",
    "ParticleCache",
    "SMCResult",
    "StateSpace",
    "TokenState",
    "check_prompt",
    "default_cache_dir",
    "enable_compilation_cache",
    "log_density",
    "log_weight",
    "observe",
    "pin",
    "prompt_cache",
    "propose",
    "run_weighted",
    "temper",
]

_LAZY_SUBMODULES = ("inference", "models", "plot")


def __getattr__(name: str) -> Any:
    """Import ``ppl.inference`` / ``ppl.models`` / ``ppl.plot`` on first attribute access."""
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"ppl.{name}")
    raise AttributeError(f"module 'ppl' has no attribute {name!r}")


def __dir__() -> list[str]:
    """Module attributes, the lazily loaded subpackages included (tab completion, doc tools)."""
    return sorted([*globals(), *_LAZY_SUBMODULES])
