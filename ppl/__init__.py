"""ppl-jax: probabilistic programs over language-model generation, on NumPyro.

A program (``ppl.StateSpace``) is written with NumPyro primitives; inference
(``ppl.inference``) transforms it into one jit-compiled function.
"""

from ppl.distributions import LanguageModel, NextToken
from ppl.generation import Generation, TokenState
from ppl.handlers import log_weight, observe, propose, temper
from ppl.program import StateSpace, run_weighted
from ppl.results import MCMCResult, SMCResult

__all__ = [
    "Generation",
    "LanguageModel",
    "MCMCResult",
    "NextToken",
    "SMCResult",
    "StateSpace",
    "TokenState",
    "log_weight",
    "observe",
    "propose",
    "run_weighted",
    "temper",
]
