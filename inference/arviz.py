"""MCMC results as ArviZ ``InferenceData``, the format NumPyro users summarise and plot.

    chains = jax.vmap(lambda k: pmmh(make_program, prior, k, 500, 16))(jax.random.split(key, 4))
    idata = ppl.inference.to_inference_data(chains, name="beta")
    arviz.summary(idata)                       # mean, sd, ess_bulk, r_hat per latent

Global latents (PMMH's ``theta``, any ``MCMCResult`` of a few numbers per draw) go to the
``posterior`` group; each draw's ``log_z`` (the evidence estimate the chain carried) and
whether the move was accepted go to ``sample_stats``. Needs ``pip install 'ppl-jax[arviz]'``.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import numpy as np

from ppl.results import MCMCResult


def to_inference_data(result: MCMCResult, *, name: str = "theta", chains: bool | None = None) -> Any:
    """``arviz.InferenceData`` from an :class:`ppl.MCMCResult`.

    Args:
        result: one chain (``log_z`` of shape ``[draws]``) or chains run under ``jax.vmap``
            (``[chains, draws]``); every leaf of ``samples`` shares those leading axes.
        name: the variable name when ``samples`` is a single array (a dict keeps its keys;
            other pytrees are named by their key paths).
        chains: whether the leading axis is a chain axis; inferred from ``log_z``'s rank if
            ``None``.
    """
    try:
        import arviz
    except ImportError as error:
        raise ImportError("to_inference_data needs ArviZ: pip install 'ppl-jax[arviz]'") from error
    if not isinstance(result, MCMCResult):
        raise TypeError(f"to_inference_data takes a ppl.MCMCResult, got {type(result).__name__}")
    rank = np.ndim(result.log_z)
    if rank not in (1, 2):
        raise ValueError(f"result.log_z must have shape [draws] or [chains, draws], got {np.shape(result.log_z)}")
    batched = rank == 2 if chains is None else chains

    def with_chain_axis(leaf: Any) -> np.ndarray:
        array = np.asarray(leaf)
        return array if batched else array[None]

    if isinstance(result.samples, dict):
        posterior = {key: with_chain_axis(value) for key, value in result.samples.items()}
    elif isinstance(result.samples, (jax.Array, np.ndarray)):
        posterior = {name: with_chain_axis(result.samples)}
    else:
        leaves = jax.tree_util.tree_flatten_with_path(result.samples)[0]
        posterior = {f"{name}{jax.tree_util.keystr(path)}": with_chain_axis(leaf) for path, leaf in leaves}
    stats = {"log_z": with_chain_axis(result.log_z), "accepted": with_chain_axis(result.accepted)}
    with warnings.catch_warnings():
        # ArviZ guesses the layout is wrong when chains outnumber draws; here it is explicit.
        warnings.filterwarnings("ignore", message="More chains")
        return arviz.from_dict(posterior=posterior, sample_stats=stats)
