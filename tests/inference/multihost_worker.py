"""One process of the multi-host check in ``test_scale.py`` (not a test module itself).

``python multihost_worker.py PROCESS_ID N_PROCESSES PORT OUT``: the process joins the others
through ``jax.distributed.initialize`` on the loopback coordinator ``127.0.0.1:PORT`` (CPU
devices, gloo collectives), runs SMC with the particles split over every process's device
(exact global resampling) and process 0 writes the gathered result to ``OUT`` (``.npz``).
``program()`` is the run, shared with the test's one-process reference.
"""

import sys

import jax
import numpy as np

N_PARTICLES, SEED, ESS_THRESHOLD = 8, 3, 0.9


def program():
    from ppl.models.toy_hmm import random_hmm

    return random_hmm(jax.random.key(0), 3, 4, 6).program()


def main(process_id: int, n_processes: int, port: int, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=n_processes,
        process_id=process_id,
        initialization_timeout=60,
    )
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh

    from ppl.inference.scale import smc_sharded

    mesh = Mesh(np.array(jax.devices()), ("particles",))
    result = smc_sharded(program(), jax.random.key(SEED), N_PARTICLES, mesh=mesh, ess_threshold=ESS_THRESHOLD)
    fields = {
        "log_z": result.log_z,
        "log_weights": result.log_weights,
        "path": result.particles["path"],
        "ancestors": result.ancestors,
        "devices": np.array([len(jax.devices()), jax.process_count()]),  # gathered: one pair per process
    }
    gathered = {
        name: np.asarray(multihost_utils.process_allgather(value, tiled=True)) for name, value in fields.items()
    }
    if process_id == 0:
        np.savez(out, **gathered)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
