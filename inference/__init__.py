"""Inference as program transformations: each takes a ``ppl.StateSpace`` and returns a
properly weighted result (see ``ppl.SMCResult``), or consumes one (PIMH, VI bounds).

``ppl.inference.kernel`` holds the public pieces SMC is built from (``init``, ``resample``,
``propagate``, ``rejuvenate``, ``finalize``, ...), for writing new variants.
"""

from ppl.inference import kernel, resampling, search
from ppl.inference.arviz import to_inference_data
from ppl.inference.bounds import Bounds, bidirectional_bounds
from ppl.inference.gibbs import (
    PGInfo,
    PGState,
    conditional_smc,
    particle_gibbs,
    particle_gibbs_init,
    particle_gibbs_step,
)
from ppl.inference.kernel import Reference, SMCInfo, SMCState, effective_sample_size
from ppl.inference.mcmc import PIMHInfo, PIMHState, pimh, pimh_init, pimh_step
from ppl.inference.moves import SuffixMH, suffix_mh
from ppl.inference.objectives import ctl, distill, posterior_draws, smc_bound, twist_path
from ppl.inference.pmmh import PMMHInfo, PMMHState, pmmh, pmmh_init, pmmh_step
from ppl.inference.resampling import get_resampler
from ppl.inference.scale import smc_batch, smc_sharded
from ppl.inference.sequential import importance, smc
from ppl.inference.trajectories import replay, score
from ppl.inference.vi import elbo, fit, iwae

__all__ = [
    "Bounds",
    "bidirectional_bounds",
    "ctl",
    "distill",
    "posterior_draws",
    "smc_bound",
    "twist_path",
    "PGInfo",
    "PGState",
    "PIMHInfo",
    "PIMHState",
    "PMMHInfo",
    "PMMHState",
    "Reference",
    "SMCInfo",
    "SMCState",
    "SuffixMH",
    "conditional_smc",
    "effective_sample_size",
    "elbo",
    "fit",
    "get_resampler",
    "importance",
    "iwae",
    "kernel",
    "search",
    "particle_gibbs",
    "particle_gibbs_init",
    "particle_gibbs_step",
    "pimh",
    "pimh_init",
    "pimh_step",
    "pmmh",
    "pmmh_init",
    "pmmh_step",
    "replay",
    "resampling",
    "score",
    "smc",
    "smc_batch",
    "smc_sharded",
    "suffix_mh",
    "to_inference_data",
]
