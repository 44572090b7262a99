"""Toy models with exact answers, against which every inference algorithm is checked.

Each model computes its normalising constant ``Z`` (and posterior quantities) exactly, and
turns itself into a :class:`ppl.StateSpace` whose target is the same unnormalised
distribution, so ``smc(model.program(), ...).log_z`` can be compared with ``model.log_z()``:

- :class:`CategoricalHMM` — forward algorithm, forward-backward marginals, FFBS samples.
- :class:`LinearGaussianSSM` — Kalman filter evidence, RTS smoother.
- :class:`ConstrainedBigram` — a bigram LM with EOS under a DFA constraint and a token-score
  potential; ``Z`` by dynamic programming and the posterior by enumeration.

``random_hmm``, ``random_lgssm`` and ``random_bigram`` draw instances with simulated data;
``abc_bigram`` is a hand-made constrained-generation instance.
"""

from ppl.models.toy_bigram import (
    PAD,
    BigramProgram,
    ConstrainedBigram,
    abc_bigram,
    random_bigram,
)
from ppl.models.toy_gaussian import (
    KalmanFilterResult,
    LGSSMProgram,
    LinearGaussianSSM,
    random_lgssm,
)
from ppl.models.toy_hmm import CategoricalHMM, HMMProgram, random_hmm

__all__ = [
    "PAD",
    "BigramProgram",
    "CategoricalHMM",
    "ConstrainedBigram",
    "HMMProgram",
    "KalmanFilterResult",
    "LGSSMProgram",
    "LinearGaussianSSM",
    "abc_bigram",
    "random_bigram",
    "random_hmm",
    "random_lgssm",
]
