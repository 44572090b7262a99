"""ppl-jax: probabilistic programs over language-model generation, on NumPyro.

A program (``ppl.StateSpace``) is written with NumPyro primitives; inference
(``ppl.inference``) transforms it into one jit-compiled function.
"""

from ppl.distributions import LanguageModel, NextToken, check_prompt, prompt_cache
from ppl.generation import Generation, TokenState
from ppl.handlers import log_density, log_weight, observe, pin, propose, temper
from ppl.lm import ParticleCache
from ppl.lm import FeatureLM
from ppl.program import StateSpace, run_weighted
from ppl.results import MCMCResult, SMCResult

__all__ = [
    "FeatureLM",
    "Generation",
    "LanguageModel",
    "MCMCResult",
    "NextToken",
    "ParticleCache",
    "SMCResult",
    "StateSpace",
    "TokenState",
    "check_prompt",
    "log_density",
    "log_weight",
    "observe",
    "pin",
    "prompt_cache",
    "propose",
    "run_weighted",
    "temper",
]
