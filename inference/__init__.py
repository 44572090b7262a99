"""Inference as program transformations: each takes a ``ppl.StateSpace`` and returns a
properly weighted result (see ``ppl.SMCResult``), or consumes one (PIMH, VI bounds)."""

from ppl.inference import resampling
from ppl.inference.mcmc import PIMHInfo, PIMHState, pimh, pimh_init, pimh_step
from ppl.inference.resampling import get_resampler
from ppl.inference.smc import SMCInfo, SMCState, effective_sample_size, importance, smc
from ppl.inference.vi import elbo, fit, iwae

__all__ = [
    "PIMHInfo",
    "PIMHState",
    "SMCInfo",
    "SMCState",
    "effective_sample_size",
    "elbo",
    "fit",
    "get_resampler",
    "importance",
    "iwae",
    "pimh",
    "pimh_init",
    "pimh_step",
    "resampling",
    "smc",
]
