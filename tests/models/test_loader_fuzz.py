"""Loader fuzzing: thousands of truncated, bit-flipped and header-corrupted GGUF and safetensors
files made from tiny valid checkpoints, plus shape, dtype and missing-tensor edits.

Each corrupted file goes through the real load path up to the model build (for GGUF:
``read_gguf`` → ``gguf_hf_tensors`` → every tensor; for safetensors: ``read_safetensors`` → the
checked tensor function ``load_hf_checkpoint`` uses → every tensor), and a sample through the
full ``load_gguf`` / ``load_hf_checkpoint``. The outcome must be one of:

- ``CheckpointError`` naming the file (counted by cause);
- a model identical to the original (the corruption hit padding or an unused metadata value);
- for a bit flip inside tensor *data* only (or a safetensors dtype relabelled F16 <-> BF16,
  which reinterprets the same bytes, or a GGUF flip inside the float value of
  ``rms_norm_eps`` / ``rope.freq_base``): finite but different values. Neither format stores a
  checksum, so this is undetectable; flips to NaN/Inf are caught. These are counted apart and
  are out of scope.

Any other exception, a different model from a corrupted header, or a case over its time bound
fails the test. Files are written to tmpfs; cases are seeded; each case has a time limit
(SIGALRM) and the whole run a total bound.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import re
import signal
import struct
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors.numpy

from ppl.models import CheckpointError, LlamaConfig, load_gguf, load_hf_checkpoint
from ppl.models.loaders import gguf_hf_tensors, hf_config, hf_config_dict, read_gguf, read_safetensors
from ppl.models.tensor_checks import checked_tensors, hf_shapes

Q = gguf.GGMLQuantizationType
CONFIG = LlamaConfig(
    vocab_size=40, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8
)
CASE_SECONDS, TOTAL_SECONDS = 2, 60
N_GGUF, N_SAFETENSORS = 1100, 1000


def hf_tensors(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in hf_shapes(CONFIG).items()}


def gguf_name(hf_name: str) -> str:
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in names:
        return names[hf_name]
    layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
    part = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }[rest]
    return f"blk.{layer}.{part}"


def write_tiny_gguf(
    path: Path,
    tensors: dict[str, np.ndarray],
    drop: str | None = None,
    kinds: dict[str, Q] | None = None,
    metadata: dict | None = None,
) -> None:
    """A llama-arch GGUF of CONFIG; matrices alternate F16 / Q8_0 / Q4_0 / F32 to cover the decoders."""
    c = CONFIG
    writer = gguf.GGUFWriter(path, "llama")
    meta = {
        "llama.block_count": c.num_layers,
        "llama.embedding_length": c.hidden_size,
        "llama.feed_forward_length": c.intermediate_size,
        "llama.attention.head_count": c.num_heads,
        "llama.attention.head_count_kv": c.num_kv_heads,
        "llama.vocab_size": c.vocab_size,
        **(metadata or {}),
    }
    for key, value in meta.items():
        writer.add_uint32(key, value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_string("general.name", "tiny fuzz base")
    cycle = [Q.F16, Q.Q8_0, Q.Q4_0, Q.F32]
    for i, (name, array) in enumerate(tensors.items()):
        if gguf_name(name) == drop:
            continue
        kind = (kinds or {}).get(name, cycle[i % 4] if array.ndim == 2 else Q.F32)
        if kind == Q.Q2_K:  # gguf cannot encode it: random blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[kind]
            data = np.random.default_rng(0).integers(
                0, 256, (array.shape[0], -(-array.shape[1] // block) * size), np.uint8
            )
        else:
            data = (
                array.astype(np.float16)
                if kind == Q.F16
                else array
                if kind == Q.F32
                else gguf.quants.quantize(array, kind)
            )
        writer.add_tensor(gguf_name(name), data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def load_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """``load_gguf``'s path up to the model build: parse, config, every checked tensor."""
    config, tensor = gguf_hf_tensors(read_gguf(path))
    return {"config": config} | {name: tensor(name) for name in hf_shapes(config)}


def load_safetensors_tensors(directory: Path) -> dict[str, np.ndarray]:
    """``load_hf_checkpoint``'s path up to the model build."""
    config = hf_config(json.loads((directory / "config.json").read_text()), directory / "config.json")
    readers = read_safetensors(directory / "model.safetensors")

    def tensor(name):
        if name not in readers:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing")
        return readers[name]()

    checked = checked_tensors(config, tensor, directory, CheckpointError)
    return {"config": config} | {name: checked(name) for name in hf_shapes(config)}


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(*_):
        raise TimeoutError(f"case ran past {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def cause(error: CheckpointError) -> str:
    """The error's problem with the path and numbers removed (for counting)."""
    text = str(error).split(": ", 1)[1]
    text = re.sub(r"'[^']*'|\d+|\([^)]*\)", "_", text)
    return " ".join(text.split()[:6])


class Tally:
    def __init__(self):
        self.counts: collections.Counter[str] = collections.Counter()
        self.failures: list[str] = []

    def run(self, label: str, mutation: str, path: Path, load, original: dict, *, data_only: bool) -> None:
        try:
            with time_limit(CASE_SECONDS):
                loaded = load(path)
        except CheckpointError as error:
            if path.name not in str(error) and path.parent.name not in str(error):
                self.failures.append(f"{label}: error does not name the file: {error}")
            self.counts[f"{mutation} -> CheckpointError: {cause(error)}"] += 1
            return
        except Exception as error:  # noqa: BLE001 -- anything else is a loader bug
            self.failures.append(f"{label}: {type(error).__name__}: {error}")
            return
        same = loaded.keys() == original.keys() and all(_equal(loaded[k], original[k]) for k in original)
        if same:
            self.counts[f"{mutation} -> no effect (identical model)"] += 1
        elif data_only:
            self.counts[f"{mutation} -> finite data change (undetectable, out of scope)"] += 1
        elif _only_float_constants_differ(loaded, original):
            self.counts[f"{mutation} -> rms_norm_eps / rope_theta value changed (undetectable, out of scope)"] += 1
        else:
            differing = sorted(k for k in original if k not in loaded or not _equal(loaded[k], original[k]))
            self.failures.append(f"{label} ({mutation}): loaded as a different model; differs in {differing[:3]}")


def _only_float_constants_differ(loaded: dict, original: dict) -> bool:
    """A flip inside a float metadata value (epsilon, rope base) gives another valid value:
    as undetectable without a checksum as a flip inside tensor data."""
    if any(not _equal(loaded[k], original[k]) for k in original if k != "config"):
        return False
    a, b = loaded["config"], original["config"]
    return dataclasses.replace(a, rms_norm_eps=b.rms_norm_eps, rope_theta=b.rope_theta) == b


def _equal(a, b) -> bool:
    return a == b if isinstance(a, LlamaConfig) else np.array_equal(a, b)


def flip_bit(data: bytes, position: int, bit: int) -> bytes:
    return data[:position] + bytes([data[position] ^ (1 << bit)]) + data[position + 1 :]


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(dir="/dev/shm" if Path("/dev/shm").is_dir() else None) as directory:
        yield Path(directory)


def _data_start(path: Path) -> int:
    """Offset of the first tensor byte: the end of the header, aligned."""
    reader = gguf.GGUFReader(path)
    return min(int(t.data_offset) for t in reader.tensors)


def test_gguf_fuzz(workdir):
    original_tensors = hf_tensors(0)
    base_path = workdir / "base.gguf"
    write_tiny_gguf(base_path, original_tensors)
    base = base_path.read_bytes()
    original = load_gguf_tensors(base_path)
    header_end = _data_start(base_path)
    rng = np.random.default_rng(20261203)
    tally, start = Tally(), time.perf_counter()
    path = workdir / "case.gguf"
    structural = [
        ("missing tensor", dict(drop="blk.1.ffn_up.weight")),
        ("missing tensor", dict(drop="blk.0.attn_k.weight")),
        ("shape mismatch", dict(metadata={"llama.feed_forward_length": 32})),
        ("shape mismatch", dict(metadata={"llama.attention.head_count_kv": 4})),
        ("shape mismatch", dict(metadata={"llama.vocab_size": 41})),
        ("bad config", dict(metadata={"llama.attention.head_count": 0})),
        ("bad config", dict(metadata={"llama.attention.head_count_kv": 3})),
        ("dtype", dict(kinds={"model.layers.0.mlp.up_proj.weight": Q.Q2_K})),
    ]
    for i, (mutation, edit) in enumerate(structural):
        write_tiny_gguf(path, original_tensors, **edit)
        tally.run(f"gguf structural {i}", mutation, path, load_gguf_tensors, original, data_only=False)
    for i in range(N_GGUF):
        kind = i % 4
        if kind == 0:
            data, mutation, data_only = base[: int(rng.integers(0, len(base)))], "truncated", False
        elif kind == 1:
            data, mutation, data_only = (
                flip_bit(base, int(rng.integers(0, header_end)), int(rng.integers(8))),
                "header bit flip",
                False,
            )
        elif kind == 2:
            data, mutation, data_only = (
                flip_bit(base, int(rng.integers(header_end, len(base))), int(rng.integers(8))),
                "data bit flip",
                True,
            )
        else:
            where = int(rng.integers(0, header_end - 8))
            garbage = bytes(rng.choice([0x00, 0xFF, 0x7F, 0x80], 8)) if rng.random() < 0.5 else rng.bytes(8)
            data, mutation, data_only = base[:where] + garbage + base[where + 8 :], "header bytes overwritten", False
        path.write_bytes(data)
        tally.run(f"gguf case {i}", mutation, path, load_gguf_tensors, original, data_only=data_only)
        assert time.perf_counter() - start < TOTAL_SECONDS, f"fuzzing ran past {TOTAL_SECONDS} s at case {i}"
    report("GGUF", tally, len(structural) + N_GGUF, time.perf_counter() - start)
    assert not tally.failures, tally.failures[:10]


def report(kind: str, tally: Tally, n: int, seconds: float) -> None:
    print(f"\n{kind} fuzzing: {n} files in {seconds:.1f} s")
    for outcome, count in sorted(tally.counts.items()):
        print(f"  {count:5d}  {outcome}")


def test_safetensors_fuzz(workdir):
    tensors = hf_tensors(1)
    directory = workdir / "hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    base_file = directory / "model.safetensors"
    safetensors.numpy.save_file(
        {k: (v.astype(np.float16) if i % 3 == 1 else v) for i, (k, v) in enumerate(tensors.items())}, base_file
    )
    base = base_file.read_bytes()
    original = {
        k: (v if k == "config" else v.copy()) for k, v in load_safetensors_tensors(directory).items()
    }  # the file is rewritten below
    header_size = struct.unpack("<Q", base[:8])[0]
    header = json.loads(base[8 : 8 + header_size])
    names = [k for k in header if k != "__metadata__"]
    rng = np.random.default_rng(20261204)
    tally, start = Tally(), time.perf_counter()

    def with_header(edit) -> bytes:
        new = json.loads(json.dumps(header))
        edit(new)
        text = json.dumps(new).encode()
        text += b" " * (-len(text) % 8)
        return struct.pack("<Q", len(text)) + text + base[8 + header_size :]

    def header_edit(i: int) -> tuple[str, bytes]:
        name = names[int(rng.integers(len(names)))]
        choice = i % 6
        if choice == 0:
            return "missing tensor", with_header(lambda h: h.pop(name))
        if choice == 1:
            return "shape mismatch", with_header(lambda h: h[name].update(shape=h[name]["shape"][::-1] + [1]))
        if choice == 2:
            dtype = str(rng.choice(["F16", "F32", "BF16", "I8", "F64", "?"]))
            # F16 <-> BF16 keeps every size right: a reinterpretation of data, undetectable
            relabel = {header[name]["dtype"], dtype} == {"F16", "BF16"}
            return "dtype relabelled (same width)" if relabel else "dtype changed", with_header(
                lambda h: h[name].update(dtype=dtype)
            )
        if choice == 3:
            delta = int(rng.choice([-8, -2, 2, 8, 10**6, -(10**6)]))
            return "offsets changed", with_header(
                lambda h: h[name]["data_offsets"].__setitem__(int(rng.integers(2)), h[name]["data_offsets"][0] + delta)
            )
        if choice == 4:
            value = [None, "x", [1], {"a": 1}, -1, 1.5, True][int(rng.integers(7))]
            field = str(rng.choice(["dtype", "shape", "data_offsets"]))
            return "malformed entry", with_header(lambda h: h[name].__setitem__(field, value))
        size = int(rng.choice([0, 1, 2**63, header_size + 1, header_size - 1, len(base)]))
        return "header size field", struct.pack("<Q", size) + base[8:]

    for i in range(N_SAFETENSORS):
        kind = i % 5
        data_only = False
        if kind == 0:
            mutation, data = "truncated", base[: int(rng.integers(0, len(base)))]
        elif kind == 1:
            mutation, data = (
                "header bit flip",
                flip_bit(base, int(rng.integers(0, 8 + header_size)), int(rng.integers(8))),
            )
        elif kind == 2:
            mutation, data, data_only = (
                "data bit flip",
                flip_bit(base, int(rng.integers(8 + header_size, len(base))), int(rng.integers(8))),
                True,
            )
        elif kind == 3:
            where = int(rng.integers(0, 8 + header_size - 4))
            mutation, data = "header bytes overwritten", base[:where] + rng.bytes(4) + base[where + 4 :]
        else:
            mutation, data = header_edit(i)
            data_only = mutation == "dtype relabelled (same width)"
        base_file.write_bytes(data)
        tally.run(f"safetensors case {i}", mutation, directory, load_safetensors_tensors, original, data_only=data_only)
        assert time.perf_counter() - start < TOTAL_SECONDS, f"fuzzing ran past {TOTAL_SECONDS} s at case {i}"
    report("safetensors", tally, N_SAFETENSORS, time.perf_counter() - start)
    assert not tally.failures, tally.failures[:10]


def test_full_loaders_refuse_corrupt_files(workdir):
    """The full ``load_gguf`` / ``load_hf_checkpoint`` (model build included) on a few corruptions."""
    tensors = hf_tensors(2)
    path = workdir / "full.gguf"
    write_tiny_gguf(path, tensors)
    load_gguf(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="full.gguf"):
        load_gguf(path)
    write_tiny_gguf(path, tensors, metadata={"llama.feed_forward_length": 32})
    with pytest.raises(
        CheckpointError,
        match=r"full.gguf: tensor 'model.layers.0.mlp.gate_proj.weight' has shape \(64, 32\), the config implies \(32, 32\)",
    ):
        load_gguf(path)
    directory = workdir / "full_hf"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(hf_config_dict(CONFIG)))
    tensors["model.norm.weight"][3] = np.nan
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match="full_hf: tensor 'model.norm.weight' holds 1 non-finite values"):
        load_hf_checkpoint(directory)
    (directory / "config.json").write_text(json.dumps({**hf_config_dict(CONFIG), "num_attention_heads": 0}))
    with pytest.raises(CheckpointError, match="config.json: num_heads=0 is not a positive integer"):
        load_hf_checkpoint(directory)
