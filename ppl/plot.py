"""Figures every SMC analysis draws, from a result and a matplotlib ``Axes``.

Each function draws into an ``ax`` you pass (so figures compose with ``plt.subplots``) and
returns it. Needs matplotlib: ``pip install 'ppl-jax[plot]'``.

- :func:`ess`: effective sample size after each step, with the resampling events.
- :func:`genealogy`: who descends from whom; the lineages of the final particles stand out.
- :func:`weight_histogram`: how the final normalised weights are spread.
- :func:`accuracy_vs_budget`: a quality measure against the number of particles, per method.

Only the leading ``n_steps`` entries of a result's per-step arrays are drawn: the loop stops
once every particle is done, and later entries are no-op padding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ppl.results import SMCResult


def _axes(ax: Any) -> Any:
    if ax is not None:
        return ax
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("ppl.plot needs matplotlib: pip install 'ppl-jax[plot]'") from error
    return plt.gca()


def _steps(result: SMCResult) -> int:
    if np.ndim(result.n_steps) != 0:
        raise ValueError(
            f"plot one SMC run at a time: this result is batched (n_steps has shape {np.shape(result.n_steps)}); "
            "index it first, e.g. jax.tree.map(lambda leaf: leaf[0], result)"
        )
    return int(result.n_steps)


def ess(result: SMCResult, ax: Any = None, *, label: str | None = None, relative: bool = True) -> Any:
    """ESS after each step (divided by ``N`` if ``relative``); dots on top mark steps that
    resampled first. A falling ESS is weight degeneracy; resampling restores it to ``N``."""
    ax = _axes(ax)
    steps = _steps(result)
    n = result.log_weights.shape[-1]
    values = np.asarray(result.ess, np.float64)[:steps] / (n if relative else 1.0)
    (line,) = ax.plot(np.arange(steps), values, marker=".", label=label)
    events = np.nonzero(np.asarray(result.resampled)[:steps])[0]
    top = 1.03 if relative else 1.03 * n
    ax.plot(events, np.full(events.shape, top), "|", color=line.get_color(), markersize=8)
    ax.set_xlabel("step t")
    ax.set_ylabel("ESS / N" if relative else "ESS")
    ax.set_ylim(0, 1.08 * (1 if relative else n))
    return ax


def lineages(ancestors: np.ndarray, survivors: np.ndarray) -> np.ndarray:
    """``paths[t, j]``: the index at step ``t`` of the ancestor of final particle
    ``survivors[j]``, found by walking ``ancestors[t, i]`` (the parent at ``t - 1`` of
    particle ``i`` at ``t``) backwards."""
    ancestors = np.asarray(ancestors)
    paths = np.empty((ancestors.shape[0], len(survivors)), int)
    paths[-1] = survivors
    for t in range(ancestors.shape[0] - 1, 0, -1):
        paths[t - 1] = ancestors[t, paths[t]]
    return paths


def genealogy(result: SMCResult, ax: Any = None, *, title: str | None = None) -> Any:
    """Every parent→child link in grey; the lineages of the final particles with non-zero
    weight in colour. Few coloured roots at step 0 is path degeneracy: the early tokens of
    every surviving particle were copied from a handful of ancestors."""
    from matplotlib.collections import LineCollection

    ax = _axes(ax)
    steps = _steps(result)
    ancestors = np.asarray(result.ancestors)[:steps]
    n = ancestors.shape[1]
    links = [[(t - 1, ancestors[t, i]), (t, i)] for t in range(1, steps) for i in range(n)]
    ax.add_collection(LineCollection(links, colors="0.8", linewidths=0.7))
    survivors = np.nonzero(np.isfinite(np.asarray(result.log_weights)))[0]
    paths = lineages(ancestors, survivors)
    ax.add_collection(
        LineCollection(
            [np.column_stack([np.arange(steps), paths[:, j]]) for j in range(len(survivors))],
            colors="C3",
            linewidths=1.5,
        )
    )
    ax.set_xlim(-0.5, steps - 0.5)
    ax.set_ylim(-0.5, n - 0.5)
    ax.set_xlabel("step t")
    ax.set_ylabel("particle")
    roots = len(set(paths[0].tolist())) if len(survivors) else 0
    summary = f"{len(survivors)} weighted particles from {roots} step-0 ancestor(s)"
    ax.set_title(f"{title}: {summary}" if title else summary, fontsize=10)
    return ax


def weight_histogram(result: SMCResult, ax: Any = None, *, bins: int = 20, label: str | None = None) -> Any:
    """Histogram of ``N · w_i`` (1 = a uniform share); particles with zero weight are counted
    in the title rather than drawn. One tall bar near 1 is a healthy population; mass near 0
    with a few large weights is degeneracy."""
    ax = _axes(ax)
    weights = np.asarray(result.weights, np.float64)
    n = weights.shape[-1]
    positive = weights[weights > 0] * n
    ax.hist(positive, bins=bins, histtype="stepfilled", alpha=0.6, label=label)
    ax.set_xlabel("N · normalised weight")
    ax.set_ylabel("particles")
    ax.set_title(f"{len(positive)}/{n} particles with non-zero weight", fontsize=10)
    return ax


def accuracy_vs_budget(
    budgets: Sequence[int], curves: Mapping[str, Sequence[float]], ax: Any = None, *, ylabel: str = "accuracy"
) -> Any:
    """One line per method: ``curves[name][k]`` is its quality at ``budgets[k]`` particles
    (or samples), on a log-2 axis."""
    ax = _axes(ax)
    for (name, values), marker in zip(curves.items(), "osd^v<>"):
        if len(values) != len(budgets):
            raise ValueError(f"curve {name!r} has {len(values)} values for {len(budgets)} budgets")
        ax.plot(budgets, values, marker=marker, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(budgets), [str(b) for b in budgets])
    ax.set_xlabel("budget N (particles / samples)")
    ax.set_ylabel(ylabel)
    return ax
