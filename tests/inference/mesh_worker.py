"""Checks on forced CPU devices for ``test_scale.py`` (not a test module itself).

``python mesh_worker.py CHECK...`` in a process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set before JAX is
imported, hence a separate process) prints one ``json`` line per check:

- ``errors``: the messages of a mesh that does not divide the particles or the prompts;
- ``global4``, ``global8``, ``global4,8``: tiny-Llama SMC with particles split over 4 (8)
  devices (exact global resampling) against one device, same key;
- ``islands``: island resampling over 4 devices, ``Ẑ/Z`` over 1000 seeds (vmapped) on an HMM
  (exact ``Z`` by the forward algorithm) and on the tiny Llama (exact ``Z`` by enumeration);
- ``batch_mesh``: a batch of 2 prompts over a 2 x 4 (prompts x particles) mesh against
  one-device single-prompt runs.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

import ppl
from ppl.inference.scale import smc_batch, smc_sharded
from ppl.models.toy_hmm import random_hmm
from ppl.models.toy_lm import EOS, MAX_NEW, PROMPT, enumerate_posterior, tiny_generation, tiny_llama

N_SEEDS = 1000


def mesh_of(n: int, names=("particles",), shape=None) -> Mesh:
    return Mesh(np.array(jax.devices()[:n]).reshape(shape or (n,)), names)


def report(check: str, **values) -> None:
    print(json.dumps({"check": check, **values}), flush=True)


def errors() -> None:
    program = random_hmm(jax.random.key(0), 3, 4, 6).program()
    messages = []
    for call in (
        lambda: smc_sharded(program, jax.random.key(0), 6, mesh=mesh_of(4)),
        lambda: smc_batch(
            [program] * 3,
            jax.random.key(0),
            8,
            mesh=mesh_of(8, ("prompts", "particles"), (2, 4)),
            prompt_axis="prompts",
            particle_axis="particles",
        ),
        lambda: smc_sharded(program, jax.random.key(0), 8, mesh=mesh_of(4), particle_axis="devices"),
    ):
        try:
            call()
            messages.append(None)
        except ValueError as error:
            messages.append(str(error))
    report("errors", messages=messages)


def global_mode(*device_counts: int) -> None:
    program = tiny_generation(tiny_llama(0))
    key, n = jax.random.key(5), 32
    one = ppl.inference.smc(program, key, n, ess_threshold=0.9)
    for devices in device_counts:
        split = smc_sharded(program, key, n, mesh=mesh_of(devices), ess_threshold=0.9)
        report(
            "global",
            devices=devices,
            tokens_equal=bool(np.array_equal(one.particles.tokens, split.particles.tokens)),
            ancestors_equal=bool(np.array_equal(one.ancestors, split.ancestors)),
            resampled_equal=bool(np.array_equal(one.resampled, split.resampled)),
            n_resampled=int(one.resampled.sum()),
            log_z=[float(one.log_z), float(split.log_z)],
            max_log_weight_difference=float(
                np.max(np.abs(np.asarray(one.log_weights) - np.asarray(split.log_weights)))
            ),
            cache_sharding=str(split.particles.cache.keys.sharding.spec),
        )


def islands() -> None:
    mesh = mesh_of(4)
    hmm = random_hmm(jax.random.key(1), 3, 4, 6)
    lm = tiny_llama(0)
    cases = {
        "hmm": (hmm.program(), float(hmm.log_z())),
        "tiny_llama": (tiny_generation(lm), float(jax.nn.logsumexp(jnp.array(list(enumerate_posterior(lm).values()))))),
    }
    for name, (program, log_z) in cases.items():
        keys = jax.random.split(jax.random.key(11), N_SEEDS)
        result = smc_batch(
            [program] * N_SEEDS, keys, 16, mesh=mesh, particle_axis="particles", islands=True, ess_threshold=0.9
        )
        ratios = np.exp(np.asarray(result.log_z, np.float64) - log_z)
        report(
            "islands",
            model=name,
            mean=float(ratios.mean()),
            standard_error=float(ratios.std(ddof=1) / np.sqrt(N_SEEDS)),
            resampled_fraction=float(np.asarray(result.resampled).mean()),
            cache_sharding=str(result.particles.cache.keys.sharding.spec) if name == "tiny_llama" else None,
        )


def batch_mesh() -> None:
    lm = tiny_llama(0)
    programs = ppl.Generation.for_prompts(lm, [PROMPT, (6, 1)], MAX_NEW, EOS, **_options())
    keys = jax.random.split(jax.random.key(2), 2)
    mesh = mesh_of(8, ("prompts", "particles"), (2, 4))
    batch = smc_batch(
        programs, keys, 16, mesh=mesh, prompt_axis="prompts", particle_axis="particles", ess_threshold=0.9
    )
    single = [ppl.inference.smc(program, key, 16, ess_threshold=0.9) for program, key in zip(programs, keys)]
    by_prompt = smc_batch(programs, keys, 16, mesh=mesh_of(2, ("prompts",)), prompt_axis="prompts", ess_threshold=0.9)
    report(
        "batch_mesh",
        prompt_axis_only_tokens_equal=bool(np.array_equal(by_prompt.particles.tokens, batch.particles.tokens)),
        tokens_equal=all(
            bool(np.array_equal(r.particles.tokens, batch.particles.tokens[i])) for i, r in enumerate(single)
        ),
        log_z=[[float(r.log_z), float(batch.log_z[i])] for i, r in enumerate(single)],
    )


def _options():
    from ppl.models.constraints import regex
    from ppl.models.toy_lm import PATTERN, LetterReward, tiny_tokenizer

    return dict(
        constraint=regex(PATTERN, tiny_tokenizer()),
        potentials=[LetterReward()],
        proposal="locally_optimal",
        require_eos=True,
    )


if __name__ == "__main__":
    checks = {"errors": errors, "islands": islands, "batch_mesh": batch_mesh}
    for check in sys.argv[1:]:
        if check.startswith("global"):  # global4, global4,8: the device counts
            global_mode(*map(int, check.removeprefix("global").split(",")))
        else:
            checks[check]()
