"""Scale-out (``ppl.inference.scale``): a batch of prompts in one call, particles over a
device mesh (exact global and island resampling), many processes.

The mesh checks need several devices: on the CPU they are forced with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``, which must be set before JAX is
imported, so they run in a separate process (``mesh_worker.py``) that reports JSON lines.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ppl
from ppl.inference.scale import check_devices, smc_batch
from ppl.models.constraints import regex
from ppl.models.toy_hmm import random_hmm
from ppl.models.toy_lm import EOS, MAX_NEW, PATTERN, LetterReward, tiny_llama, tiny_tokenizer

HERE = Path(__file__).parent
# Eight prompts of three lengths: the single-prompt reference runs share one compilation.
PROMPTS = [(6, 0, 4), (6,), (6, 1, 2), (6, 5), (6, 0, 0), (6, 3), (6,), (6, 2, 4)]


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(0)


@pytest.fixture(scope="module")
def options():
    return dict(
        constraint=regex(PATTERN, tiny_tokenizer()),
        potentials=[LetterReward()],
        proposal="locally_optimal",
        require_eos=True,
    )


def test_batch_of_prompts_equals_single_prompt_calls(lm, options):
    """A batch of 8 prompts of different lengths: entry ``b`` has the tokens, ancestors and
    resampling decisions of ``smc(programs[b], keys[b])`` exactly, and its ``log_z`` and
    log-weights to float32 rounding (``vmap`` batches the matmuls and reductions, which XLA
    may sum in another order: 1 ulp seen)."""
    programs = ppl.Generation.for_prompts(lm, PROMPTS, MAX_NEW, EOS, **options)
    keys = jax.random.split(jax.random.key(3), len(PROMPTS))
    batch = smc_batch(programs, keys, 16, ess_threshold=0.9)
    assert batch.log_z.shape == (8,) and batch.particles.tokens.shape == (8, 16, MAX_NEW)
    assert programs[0].lm is programs[1].lm  # the weights are shared, not stacked
    for index, (program, key) in enumerate(zip(programs, keys)):
        single = ppl.inference.smc(program, key, 16, ess_threshold=0.9)
        np.testing.assert_array_equal(single.particles.tokens, batch.particles.tokens[index])
        np.testing.assert_array_equal(single.ancestors, batch.ancestors[index])
        np.testing.assert_array_equal(single.resampled, batch.resampled[index])
        np.testing.assert_allclose(single.log_z, batch.log_z[index], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(single.log_weights, batch.log_weights[index], rtol=1e-6, atol=1e-6)
    assert len({float(z) for z in batch.log_z}) > 4  # the prompts really differ
    assert bool(jnp.any(batch.resampled)) and not bool(jnp.all(batch.resampled))


def test_a_padded_prompt_decodes_as_the_unpadded_one(lm):
    """Right padding is cut off the cache: a padded prompt's cache holds the same rows and
    length as the unpadded prompt's (same buffer), and the next decode gives the same logits
    (to float32 rounding: the prefill ran on a longer sequence). So ``programs[b]`` of
    :meth:`ppl.Generation.for_prompts` targets what ``Generation(lm, prompts[b])`` does."""
    prompt = jnp.array([6, 0, 4, 1])

    @jax.jit
    def next_logits(prompt, length):
        cache = ppl.prompt_cache(lm, prompt, 10, 2, length=length)
        return cache, lm.decode(cache, jnp.full(2, prompt[-1 if length is None else length - 1]))[0]

    exact, exact_logits = next_logits(prompt, None)
    cut, cut_logits = next_logits(jnp.pad(prompt, (0, 3), constant_values=5), 4)
    np.testing.assert_array_equal(cut.lengths, exact.lengths)
    np.testing.assert_allclose(cut.keys[:, :, :3], exact.keys[:, :, :3], atol=1e-6)
    np.testing.assert_allclose(cut_logits, exact_logits, atol=1e-5)


def test_bad_batches_are_clear_errors(lm, options):
    with pytest.raises(ValueError, match="prompt 2 of the batch has shape \\[0\\]"):
        ppl.Generation.for_prompts(lm, [(6, 0), (6,), ()], MAX_NEW, EOS)
    programs = [ppl.Generation(lm, jnp.array(prompt), MAX_NEW, EOS, max_len=8) for prompt in [(6, 0), (6,)]]
    with pytest.raises(ValueError, match="shape of .prompt"):
        smc_batch(programs, jax.random.key(0), 4)
    with pytest.raises(ValueError, match="program 1 differs from program 0 in its structure or static fields"):
        smc_batch([programs[0], ppl.Generation(lm, jnp.array((6, 1)), MAX_NEW, EOS)], jax.random.key(0), 4)
    hmm = random_hmm(jax.random.key(0), 3, 4, 6).program()
    with pytest.raises(ValueError, match="program 1 differs from program 0"):
        smc_batch([hmm, programs[0]], jax.random.key(0), 4)
    with pytest.raises(ValueError, match="one key or \\[2\\] keys"):
        smc_batch([hmm, hmm], jax.random.split(jax.random.key(0), 3), 4)
    with pytest.raises(ValueError, match="islands=True needs a mesh"):
        smc_batch([hmm], jax.random.key(0), 4, islands=True)


def test_devices_of_different_kinds_are_refused():
    """No second kind of device exists on this machine, so a stand-in with a GPU's
    ``platform``/``device_kind`` joins the real CPU device (the check reads only those)."""
    check_devices(jax.devices())
    gpu = SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3")
    with pytest.raises(ValueError, match="mixes devices of different kinds \\(cpu:cpu, gpu:NVIDIA H100"):
        check_devices([jax.devices()[0], gpu])


def _forced_devices(*checks: str, devices: int = 8, timeout: int = 300) -> dict:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, str(HERE / "mesh_worker.py"), *checks],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    return reports


def _check_global(reports: list[dict]) -> None:
    for report in reports:
        assert report["tokens_equal"] and report["ancestors_equal"] and report["resampled_equal"], report
        assert report["n_resampled"] > 0
        assert report["log_z"][0] == report["log_z"][1], report
        assert report["max_log_weight_difference"] < 1e-5
        assert report["cache_sharding"] == "P(None, 'particles')"


@pytest.mark.slow
def test_mesh_errors_and_global_resampling_on_forced_devices():
    """On forced CPU devices: a mesh axis that does not divide the particles or the prompts,
    or is missing, is a clear error; exact global resampling over 4 devices gives the
    one-device run's tokens, ancestors, resampling decisions and ``log_z`` for the same key,
    log-weights to float32 rounding (1 ulp seen: the partitioned program's elementwise
    kernels may round differently), and the KV cache is split with its particles."""
    reports = _forced_devices("errors", "global4")
    messages = reports[0]["messages"]
    assert "does not divide the 6 particles" in messages[0]
    assert "does not divide the 3 prompts" in messages[1]
    assert "mesh has no axis 'devices'" in messages[2]
    _check_global(reports[1:])
    assert reports[1]["devices"] == 4


@pytest.mark.slow
@pytest.mark.heavy
def test_global_resampling_on_eight_devices():
    """The same check as on 4 devices, on 8 (one more compilation, so CI leaves it out)."""
    reports = _forced_devices("global8")
    _check_global(reports)
    assert reports[0]["devices"] == 8


@pytest.mark.slow
@pytest.mark.heavy
def test_island_resampling_is_unbiased_on_forced_devices():
    """Island resampling over 4 devices (4 particles each, ESS threshold 0.9 so islands do
    resample): mean Ẑ/Z within 3 standard errors of 1 over 1000 vmapped seeds, on an HMM
    (exact Z: forward algorithm) and on the tiny Llama (exact Z: enumeration). SE < 0.04, so
    a 12% bias would be seen."""
    reports = _forced_devices("islands")
    assert [report["model"] for report in reports] == ["hmm", "tiny_llama"]
    for report in reports:
        print(report)
        assert report["standard_error"] < 0.04, report
        assert abs(report["mean"] - 1.0) < 3 * report["standard_error"], report
        assert report["resampled_fraction"] > 0.1, report
    assert reports[1]["cache_sharding"] == "P(None, None, 'particles')"  # [seeds, layers, particles, ...]


@pytest.mark.slow
@pytest.mark.heavy
def test_batch_over_a_two_dimensional_mesh():
    """Two prompts over a 2 x 4 (prompts x particles) mesh, global resampling: each equals
    its one-device single-prompt run (tokens exactly, log_z to float32 rounding), and so does
    the batch split over prompts only (each prompt's particles on one device)."""
    (report,) = _forced_devices("batch_mesh")
    assert report["tokens_equal"] and report["prompt_axis_only_tokens_equal"], report
    for single, batched in report["log_z"]:
        assert abs(single - batched) < 1e-5


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.heavy
def test_two_processes_equal_one_process(tmp_path):
    """``jax.distributed`` on the loopback coordinator (127.0.0.1 only; CPU devices, gloo
    collectives): SMC with the particles split over two processes' devices (global
    resampling) gives exactly this one process's run: log Ẑ, weights, particles and ancestry.
    Bounded: the processes have 120 s. Heavy: three compilations in three processes (about
    35 s of CPU), past what CI's slow step has left."""
    sys.path.insert(0, str(HERE))
    try:
        import multihost_worker as worker
    finally:
        sys.path.remove(str(HERE))
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)  # one CPU device per process
    port, out = str(_free_port()), tmp_path / "two.npz"
    processes = [
        subprocess.Popen(
            [sys.executable, worker.__file__, str(i), "2", port, str(out)], env=env, stderr=subprocess.PIPE
        )
        for i in range(2)
    ]
    single = ppl.inference.smc(
        worker.program(), jax.random.key(worker.SEED), worker.N_PARTICLES, ess_threshold=worker.ESS_THRESHOLD
    )
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=120)
        finally:
            process.kill()
        assert process.returncode == 0, stderr.decode()[-3000:]
    split = np.load(out)
    assert list(split["devices"]) == [2, 2, 2, 2]  # each process: 2 devices in all, 2 processes
    expected = {
        "log_z": single.log_z,
        "log_weights": single.log_weights,
        "path": single.particles["path"],
        "ancestors": single.ancestors,
    }
    for name, value in expected.items():
        np.testing.assert_array_equal(split[name], np.asarray(value), err_msg=name)
