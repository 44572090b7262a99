"""``ppl.plot`` draws what a real SMC run produced, and ``ppl.inference.to_inference_data``
hands MCMC chains to ArviZ (a small HMM; both need optional extras the test extra installs)."""

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ppl  # noqa: E402
from ppl import plot  # noqa: E402
from ppl.inference import smc, to_inference_data  # noqa: E402
from ppl.models.toy import random_hmm  # noqa: E402


@pytest.fixture(scope="module")
def result():
    program = random_hmm(jax.random.key(0), n_states=3, n_obs_symbols=4, n_steps=8).program()
    return smc(program, jax.random.key(1), 16)


def test_figures_draw_the_run(result):
    steps = int(result.n_steps)
    fig, axes = plt.subplots(1, 4, figsize=(8, 2))
    plot.ess(result, axes[0])
    assert np.allclose(axes[0].lines[0].get_ydata(), np.asarray(result.ess)[:steps] / 16)
    plot.genealogy(result, axes[1])
    n_links = sum(len(collection.get_segments()) for collection in axes[1].collections[:1])
    assert n_links == (steps - 1) * 16
    plot.weight_histogram(result, axes[2])
    assert "16/16" in axes[2].get_title()
    plot.accuracy_vs_budget([4, 8], {"a": [0.1, 0.2], "b": [0.3, 0.4]}, axes[3])
    assert len(axes[3].lines) == 2
    plt.close(fig)


def test_lineages_walk_ancestors_backwards():
    ancestors = np.array([[0, 1, 2], [2, 2, 0], [1, 0, 0]])  # ancestors[t, i]: parent at t-1 of i at t
    paths = plot.lineages(ancestors, np.array([0, 2]))
    assert paths[:, 0].tolist() == [2, 1, 0] and paths[:, 1].tolist() == [2, 0, 2]


def test_batched_result_is_refused_with_a_clear_error(result):
    batched = jax.tree.map(lambda leaf: np.stack([leaf, leaf]), result)
    with pytest.raises(ValueError, match="batched"):
        plot.ess(batched)
    with pytest.raises(ValueError, match="curve 'a' has 1 values for 2 budgets"):
        plot.accuracy_vs_budget([4, 8], {"a": [0.1]})


def test_mcmc_chains_become_inference_data():
    """Shapes and values pass through; notebook 04 converts real PMMH chains (slow step)."""
    import arviz

    draws = jax.random.normal(jax.random.key(2), (3, 20))
    chains = ppl.MCMCResult(samples=draws, log_z=-jnp.ones((3, 20)), accepted=draws > 0)
    idata = to_inference_data(chains, name="beta")
    assert idata.posterior["beta"].shape == (3, 20)
    np.testing.assert_array_equal(idata.posterior["beta"].values, np.asarray(draws))
    np.testing.assert_array_equal(idata.sample_stats["accepted"].values, np.asarray(chains.accepted))
    one = to_inference_data(jax.tree.map(lambda leaf: leaf[0], chains))
    assert one.posterior["theta"].shape == (1, 20)
    trajectories = to_inference_data(ppl.MCMCResult({"x": draws[..., None]}, chains.log_z, chains.accepted))
    assert trajectories.posterior["x"].shape == (3, 20, 1)
    assert list(arviz.summary(idata, kind="stats").index) == ["beta"]
    with pytest.raises(TypeError, match="MCMCResult"):
        to_inference_data(draws)
