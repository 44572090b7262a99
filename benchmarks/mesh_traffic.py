"""Cross-device traffic of one SMC step, read from the compiled HLO: global vs island resampling.

Weak scaling cannot be timed on a 2-core machine, but what a step sends between devices can
be read off the program XLA compiles. This script forces ``--devices`` CPU devices, compiles
constrained SMC on the tiny random Llama (``ppl.models.toy_lm``) with ``N`` particles split
over them, in both resampling modes, and lists every collective (all-gather, all-reduce,
all-to-all, collective-permute, reduce-scatter) in the compiled module with its result
shape and bytes (what each device ends up holding: an upper bound on what it receives),
classed by the JAX operation it was made for (the HLO's ``op_name`` metadata): inside the
SMC loop's body it runs every step, inside the step's resampling ``cond`` only when the
step resamples, elsewhere once. A collective of shape ``[layers, N, max_len * kv_heads *
head_dim]`` moves KV-cache rows; one ending in ``[kv_heads, head_dim]`` moves the step's new
key/value entries.

    python benchmarks/mesh_traffic.py [--particles 1024] [--devices 4]

Prints a table and ``RESULT`` lines per mode: ``bytes_per_step`` (every step),
``bytes_per_resampling`` (added when a step resamples), of which
``cache_row_bytes_per_resampling`` are KV-cache rows, ``cache_row_bytes_per_step`` and
``new_kv_bytes_per_step`` (every step), and ``bytes_once`` (outside the loop).
"""

from __future__ import annotations

import argparse
import os
import re
import sys

DTYPE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1, "s64": 8, "u64": 8}
COLLECTIVE = re.compile(
    r"= (\S+?)(?:\{[^}]*\})? (all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter)(?:-start)?\(.*"
    r'op_name="([^"]*)"'
)
SHAPE = re.compile(r"(\w+)\[([\d,]*)\]")
SMC_LOOP = "jit(_smc)/while/body/"


def shape_bytes(shape: str) -> int:
    total = 0
    for dtype, dims in SHAPE.findall(shape):
        count = 1
        for dim in filter(None, dims.split(",")):
            count *= int(dim)
        total += count * DTYPE_BYTES.get(dtype, 4)
    return total


def traffic(hlo: str, cache_row: int, layers: int, kv_shape: tuple[int, int]) -> dict[str, list]:
    """Collectives of the compiled module by when they run, read from the JAX op each came
    from (its ``op_name`` metadata): ``step`` (inside the SMC loop's body: every step; one
    inside the decoder's layer loop counts ``layers`` times), ``resampling`` (inside the
    resampling ``cond`` of the step: only when it resamples), ``once``. Each entry is
    ``(opcode, shape, bytes per run, what)``, ``what`` naming KV-cache rows or new K/V entries."""
    found = {"step": [], "resampling": [], "once": []}
    for line in hlo.splitlines():
        match = COLLECTIVE.search(line)
        if not match:
            continue
        shape, op, name = match.groups()
        dims = [int(d) for d in SHAPE.search(shape).group(2).split(",") if d] if SHAPE.search(shape) else []
        trailing = 1
        for dim in dims[2:]:
            trailing *= dim
        what = ""
        if len(dims) >= 3 and dims[0] == layers and trailing % cache_row == 0:
            what = "KV-cache rows"
        elif tuple(dims[-2:]) == kv_shape:
            what = "new K/V entries"
        size = shape_bytes(shape)
        if SMC_LOOP not in name:
            found["once"].append((op, shape, size, what))
            continue
        inside = name.split(SMC_LOOP, 1)[1]
        size *= layers if "while/body" in inside else 1
        where = "resampling" if "cond/branch_1_fun/cond/branch_1_fun" in inside else "step"
        found[where].append((op, shape, size, what))
    return found


def total(items: list, kind: str | None = None) -> int:
    """Bytes of ``items`` (of one ``kind`` of traffic, or all)."""
    return sum(size for _, _, size, what in items if kind is None or what == kind)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--particles", type=int, default=1024)
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from ppl.inference.resampling import get_resampler
    from ppl.inference.scale import _run, place_on_mesh
    from ppl.models.toy_lm import tiny_generation, tiny_llama

    program = tiny_generation(tiny_llama(0))
    config = program.lm.config
    cache_row = program.max_len * config.num_kv_heads * config.head_dim
    mesh = Mesh(np.array(jax.devices()[: args.devices]), ("particles",))
    key = jax.random.key(0)
    print(
        f"# {args.particles} particles over {args.devices} {jax.devices()[0].platform} devices; per-particle cache "
        f"{2 * config.num_layers * cache_row * 4} bytes; jax {jax.__version__}"
    )
    for mode, islands in (("global", False), ("island", True)):
        lowered = _run.lower(
            place_on_mesh(program, mesh),
            None,
            place_on_mesh(jax.random.key_data(key), mesh),
            str(jax.random.key_impl(key)),
            args.particles,
            get_resampler("systematic"),
            jnp.float32(0.5),
            None,
            (mesh, None, "particles", islands),
        )
        kv_shape = (config.num_kv_heads, config.head_dim)
        found = traffic(lowered.compile().compiled.as_text(), cache_row, config.num_layers, kv_shape)
        for where, items in found.items():
            for op, shape, size, what in items:
                print(f"{mode:7s} {where:10s} {op:18s} {size:>10d} B  {shape}  {what}")
        print(f"RESULT {mode}_bytes_per_step={total(found['step'])}")
        print(f"RESULT {mode}_bytes_per_resampling={total(found['resampling'])}")
        print(f"RESULT {mode}_cache_row_bytes_per_resampling={total(found['resampling'], 'KV-cache rows')}")
        print(f"RESULT {mode}_cache_row_bytes_per_step={total(found['step'], 'KV-cache rows')}")
        print(f"RESULT {mode}_new_kv_bytes_per_step={total(found['step'], 'new K/V entries')}")
        print(f"RESULT {mode}_bytes_once={total(found['once'])}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
