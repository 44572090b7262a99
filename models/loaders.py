"""Weight loaders: GGUF files (llama.cpp) and HF checkpoint directories (safetensors).

Both loaders translate a checkpoint into HF tensor names and layout (``[out, in]`` matrices,
rotary pairs ``(i, i + head_dim/2)``) and hand them to :meth:`Llama.from_hf_tensors`, so one
code path builds the model. Tensors are dequantised to float32 numpy arrays one at a time, or
(GGUF, ``quantized=True``) matrices of the types in :data:`~ppl.models.quant.PACKED_TYPES` are
handed over packed, as :class:`~ppl.models.quant.QuantizedMatrix`.

GGUF specifics: llama.cpp's converter permutes the q/k projection rows of ``llama``-arch
models so that rotary pairs become adjacent dimensions; :func:`_unpermute_rows` restores
the HF order. ``qwen2`` files keep the HF order. The GGUF header is parsed here rather than
with ``gguf.GGUFReader`` (whose per-field numpy views take ~5 s on SmolLM2's 49k-token
vocabulary; this takes ~0.5 s) so that a truncated file can be reported precisely;
``gguf.quants`` does the dequantisation.
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import equinox as eqx
import gguf
import jax
import jax.numpy as jnp
import numpy as np

from ppl.models.llama import Llama, LlamaConfig
from ppl.models.quant import PACKED_TYPES, QuantizedMatrix, from_gguf_blocks
from ppl.models.tensor_checks import checked_tensors, make_config


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupt or of a kind this loader cannot read."""


# -- GGUF ---------------------------------------------------------------------------------

_Q = gguf.GGMLQuantizationType
GGUF_TYPES = frozenset(
    {_Q.F32, _Q.F16, _Q.BF16, _Q.Q8_0, _Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1, _Q.Q4_K, _Q.Q5_K, _Q.Q6_K}
)
"""Tensor types the GGUF loader dequantises (each is checked against a reference in the tests)."""

_HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_TO_GGUF_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"mlp.{k}_proj.weight": f"ffn_{k}.weight" for k in ("gate", "up", "down")},
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    **{
        f"self_attn.{h}_proj.{p}": f"attn_{g}.{p}"
        for h, g in [("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")]
        for p in ("weight", "bias")
    },
}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its type, its shape in PyTorch order (GGUF lists dims
    reversed) and its raw bytes as ``[*shape[:-1], bytes_per_row]`` uint8."""

    name: str
    type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    raw: np.ndarray


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    """A parsed GGUF file: metadata key → value, tensor name → :class:`GGUFTensor`."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]


# GGUF metadata value types (gguf.GGUFValueType) → little-endian struct / numpy codes.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse a GGUF file's header (memory-mapped; tensor bytes are not read yet).

    The layout is: magic ``GGUF``, version, tensor count, metadata count, the metadata
    (key, typed value), the tensor infos (name, dims, type, offset), then the aligned data.
    A truncated or corrupt file raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        data = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
    try:
        return _parse_gguf(path, data)
    except CheckpointError:
        raise
    # A corrupt header can make any step of the parse fail; every failure is the file's.
    except (
        struct.error,
        ValueError,
        UnicodeDecodeError,
        OverflowError,
        MemoryError,
        RecursionError,
        IndexError,
        KeyError,
        TypeError,
    ) as error:
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file ({len(data)} bytes): {error}") from error


def _parse_gguf(path: Path, data: Any) -> GGUFFile:
    offset = 0

    def read(fmt: str) -> tuple:
        nonlocal offset
        values = struct.unpack_from("<" + fmt, data, offset)
        offset += struct.calcsize("<" + fmt)
        return values

    def read_string() -> str:
        nonlocal offset
        (size,) = read("Q")
        if offset + size > len(data):
            raise CheckpointError(f"{path}: a string runs past the end of the file (truncated?)")
        offset += size
        return bytes(data[offset - size : offset]).decode("utf-8")

    def read_value(kind: int) -> Any:
        nonlocal offset
        if kind == _GGUF_STRING:
            return read_string()
        if kind in _GGUF_SCALARS:
            return read(_GGUF_SCALARS[kind])[0]
        if kind != _GGUF_ARRAY:
            raise CheckpointError(f"{path}: unknown metadata value type {kind}")
        item_kind, count = read("IQ")
        if item_kind in _GGUF_SCALARS and count:
            values = np.frombuffer(data, "<" + _GGUF_SCALARS[item_kind], count, offset)
            offset += values.nbytes
            return values.tolist()
        return [read_value(item_kind) for _ in range(count)]

    if len(data) < 24 or read("I")[0] != gguf.GGUF_MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (bad magic number)")
    version, tensor_count, metadata_count = read("IQQ")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2, 3)")
    metadata = {read_string(): read_value(*read("I")) for _ in range(metadata_count)}
    infos = []
    for _ in range(tensor_count):
        name = read_string()
        (n_dims,) = read("I")
        if not 1 <= n_dims <= 4:
            raise CheckpointError(f"{path}: tensor {name!r} has {n_dims} dimensions (GGUF allows 1..4)")
        dims = read("Q" * n_dims)
        kind, tensor_offset = read("IQ")
        try:
            kind = gguf.GGMLQuantizationType(kind)
        except ValueError:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown GGUF type id {kind}") from None
        infos.append((name, kind, tuple(reversed(dims)), tensor_offset))
    alignment = metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    if isinstance(alignment, bool) or not isinstance(alignment, int) or not 0 < alignment <= 2**20:
        raise CheckpointError(f"{path}: general.alignment={alignment!r} is not a positive integer")
    start = -(-offset // alignment) * alignment
    tensors, extents = {}, []
    for name, kind, shape, tensor_offset in infos:
        if tensor_offset % alignment:
            raise CheckpointError(
                f"{path}: tensor {name!r} starts at offset {tensor_offset}, not a multiple of {alignment}"
            )
        block, block_bytes = gguf.GGML_QUANT_SIZES[kind]
        if shape[-1] % block:
            raise CheckpointError(
                f"{path}: tensor {name!r} rows of {shape[-1]} are not whole {kind.name} blocks of {block}"
            )
        row_bytes = shape[-1] // block * block_bytes
        begin = start + tensor_offset
        end = begin + row_bytes * math.prod(shape[:-1])
        if end > len(data):
            raise CheckpointError(
                f"{path}: tensor {name!r} needs bytes {begin}..{end} but the file has {len(data)} (truncated?)"
            )
        raw = np.frombuffer(data, np.uint8, end - begin, begin).reshape(*shape[:-1], row_bytes)
        tensors[name] = GGUFTensor(name, kind, shape, raw)
        extents.append((begin, end, name))
    # A corrupt offset that still lands inside the file would alias another tensor's bytes.
    extents.sort()
    for (_, end, first), (begin, _, second) in zip(extents, extents[1:]):
        if begin < end:
            raise CheckpointError(f"{path}: tensors {first!r} and {second!r} overlap (corrupt offsets?)")
    return GGUFFile(path, metadata, tensors)


def dequantize(tensor: GGUFTensor, path: Any = "<gguf>") -> np.ndarray:
    """One GGUF tensor as float32 in its PyTorch shape; unsupported types raise, naming it."""
    if tensor.type not in GGUF_TYPES:
        supported = ", ".join(sorted(t.name for t in GGUF_TYPES))
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r} has GGUF type {tensor.type.name}, not supported ({supported})"
        )
    return gguf.quants.dequantize(tensor.raw, tensor.type).astype(np.float32, copy=False).reshape(tensor.shape)


def gguf_config(file: GGUFFile) -> LlamaConfig:
    """The model config from a GGUF file's ``{arch}.*`` metadata (arch ``llama``, ``qwen2``, ``qwen3``)."""
    arch = _metadata(file, "general.architecture")
    if arch not in ("llama", "qwen2", "qwen3"):
        also = "; ppl.models.load reads gemma3 files" if arch == "gemma3" else ""
        raise CheckpointError(f"{file.path}: architecture {arch!r} is not supported (llama, qwen2, qwen3){also}")
    get = lambda key, default=...: _metadata(file, f"{arch}.{key}", default)
    heads = get("attention.head_count")
    hidden = get("embedding_length")
    scaling = gguf_rope_scaling(file, get)
    return make_config(
        file.path,
        CheckpointError,
        vocab_size=get("vocab_size", None) or _tensor(file, "token_embd.weight").shape[0],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length", hidden // heads if isinstance(hidden, int) and heads else 0),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in file.tensors,
        attention_bias="blk.0.attn_q.bias" in file.tensors,
        output_bias="blk.0.attn_output.bias" in file.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in file.tensors,
    )


def gguf_rope_scaling(file: GGUFFile, get: Callable[..., Any]) -> dict[str, Any] | None:
    """The HF ``rope_scaling`` of a GGUF file's ``{arch}.rope.scaling.*`` metadata (``get``
    reads ``{arch}.KEY``): linear scaling or none (Llama 3.1 stores its scaling as a tensor)."""
    if get("rope.scaling.type", None) != "linear":
        return None
    factor = get("rope.scaling.factor")
    if not isinstance(factor, (int, float)) or not 0 < factor < math.inf:
        raise CheckpointError(f"{file.path}: rope.scaling.factor={factor!r} is not a positive number")
    return {"rope_type": "linear", "factor": float(factor)}


def load_gguf(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, quantized: bool = False) -> Llama:
    """A :class:`Llama` from a GGUF file, computing in ``dtype``.

    By default every tensor is dequantised once, here, and cast to ``dtype``. With
    ``quantized`` the matrices stored as Q8_0, Q4_0, Q4_1, Q4_K or Q6_K stay packed on the
    device (:class:`~ppl.models.quant.QuantizedMatrix`, 0.16-0.31 of their float32 bytes) and
    are dequantised inside each step to the very values of the default path (the logits are
    the same): ~5x less weight memory and a ~4x faster load, but on XLA:CPU each step is
    slower, since the dequantised matrix is materialised before its dot (measured in
    ``benchmarks/RESULTS.md``, issue 13) — hence the default.
    """
    file = read_gguf(path)
    config, tensor = gguf_hf_tensors(file, quantized)
    model = Llama.from_hf_tensors(config, tensor, dtype)
    if "rope_freqs.weight" in file.tensors:  # Llama 3.1 files store rope frequency divisors as a tensor
        divisors = dequantize(file.tensors["rope_freqs.weight"], file.path)
        if divisors.shape != model.rope_inv_freq.shape or not (np.isfinite(divisors) & (divisors > 0)).all():
            raise CheckpointError(
                f"{file.path}: rope_freqs.weight is not {model.rope_inv_freq.shape[0]} positive numbers"
            )
        model = eqx.tree_at(lambda m: m.rope_inv_freq, model, model.rope_inv_freq / divisors)
    return model


def gguf_hf_tensors(
    file: GGUFFile, quantized: bool = False
) -> tuple[LlamaConfig, Callable[[str], np.ndarray | QuantizedMatrix]]:
    """A GGUF file's config, and a function giving each tensor by its HF name in HF layout:
    float32, or with ``quantized`` a packed :class:`QuantizedMatrix` for the matrices of a
    type in :data:`~ppl.models.quant.PACKED_TYPES`."""
    config = gguf_config(file)
    permuted = _metadata(file, "general.architecture") == "llama"

    def tensor(hf_name: str) -> np.ndarray:
        if hf_name.startswith("model.layers."):
            layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{_HF_TO_GGUF_LAYER[rest]}"
        else:
            name = _HF_TO_GGUF[hf_name]
        stored = _tensor(file, name)
        if quantized and stored.type in PACKED_TYPES and len(stored.shape) == 2:
            array = from_gguf_blocks(stored.raw, stored.type)
        else:
            array = dequantize(stored, file.path)
        if permuted and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_heads if ".attn_q." in name else config.num_kv_heads
            array = jax.tree.map(lambda rows: _unpermute_rows(rows, heads), array)
        return array

    return config, checked_tensors(config, tensor, file.path, CheckpointError)


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, rows ``(pair, half)`` → ``(half, pair)``."""
    rest = weight.shape[1:]
    return weight.reshape(heads, -1, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _metadata(file: GGUFFile, key: str, default: Any = ...) -> Any:
    if key not in file.metadata and default is ...:
        raise CheckpointError(f"{file.path}: metadata key {key!r} is missing")
    return file.metadata.get(key, default)


def _tensor(file: GGUFFile, name: str) -> GGUFTensor:
    if name not in file.tensors:
        raise CheckpointError(f"{file.path}: tensor {name!r} is missing")
    return file.tensors[name]


# -- HF checkpoint directories (safetensors + config.json) --------------------------------

_HF_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def hf_config(config: Mapping[str, Any], path: Any = "<config.json>") -> LlamaConfig:
    """A :class:`LlamaConfig` from an HF ``config.json`` dict (Llama, Mistral, Qwen2, Qwen3)."""
    kind = config.get("model_type")
    if kind not in _HF_ARCHITECTURES:
        also = "; ppl.models.load reads gemma3_text" if kind == "gemma3_text" else ""
        raise CheckpointError(f"{path}: model_type {kind!r} is not supported ({', '.join(_HF_ARCHITECTURES)}){also}")
    if config.get("mlp_bias"):
        raise CheckpointError(f"{path}: mlp_bias=true is not supported")
    if config.get("use_sliding_window"):
        raise CheckpointError(f"{path}: Qwen2 per-layer sliding windows are not supported")
    # transformers >= 5 keeps rope settings in `rope_parameters`; older files use rope_theta/rope_scaling.
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
    heads = config["num_attention_heads"]
    return make_config(
        path,
        CheckpointError,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim")
        or (config["hidden_size"] // heads if isinstance(heads, int) and heads > 0 else 0),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        attention_bias=kind == "qwen2" or bool(config.get("attention_bias")),
        output_bias=kind == "llama" and bool(config.get("attention_bias")),
        sliding_window=config.get("sliding_window") if kind == "mistral" else None,
        qk_norm=kind == "qwen3",
    )


def hf_config_dict(config: LlamaConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of ``config`` (the inverse of :func:`hf_config`)."""
    if config.qk_norm:
        model_type = "qwen3"
    elif config.attention_bias and not config.output_bias:
        model_type = "qwen2"
    elif config.sliding_window is not None:
        model_type = "mistral"
    else:
        model_type = "llama"
    rope = {"rope_type": "default", **dict(config.rope_scaling or ()), "rope_theta": config.rope_theta}
    return {
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": rope,
        "tie_word_embeddings": config.tie_embeddings,
        "sliding_window": config.sliding_window,
        **({"attention_bias": config.attention_bias} if model_type in ("llama", "qwen3") else {}),
    }


def load_hf_checkpoint(directory: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> Llama:
    """A :class:`Llama` from an HF directory: ``config.json`` plus one or more ``*.safetensors``."""
    directory = Path(directory)
    config_path = directory / "config.json"
    try:
        config = hf_config(json.loads(config_path.read_text()), config_path)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot read the config: {error}") from error
    except (KeyError, TypeError, AttributeError) as error:
        raise CheckpointError(f"{config_path}: malformed config ({type(error).__name__}: {error})") from error
    return Llama.from_hf_tensors(
        config, checked_tensors(config, directory_tensors(directory), directory, CheckpointError), dtype
    )


def directory_tensors(directory: Path) -> Callable[[str], np.ndarray]:
    """Name → float32 tensor over every ``*.safetensors`` file of an HF checkpoint directory."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory}: no *.safetensors files")
    tensors: dict[str, Callable[[], np.ndarray]] = {}
    for file in files:
        tensors.update(read_safetensors(file))

    def tensor(name: str) -> np.ndarray:
        if name not in tensors:
            raise CheckpointError(f"{directory}: tensor {name!r} is missing")
        return tensors[name]()

    return tensor


def read_safetensors(path: str | os.PathLike) -> dict[str, Callable[[], np.ndarray]]:
    """Index a safetensors file: name → a function returning that tensor as float32.

    The format is an 8-byte little-endian header size, a JSON header of
    ``{name: {dtype, shape, data_offsets: [begin, end]}}`` and the raw bytes; offsets count
    from the end of the header. Every entry is checked against the file size up front, so a
    truncated file fails here with its name rather than later inside numpy.
    """
    path = Path(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    fail = lambda problem: CheckpointError(f"{path}: {problem} (truncated or corrupt safetensors file?)")
    if data.size < 8:
        raise fail(f"only {data.size} bytes")
    header_size = int(data[:8].view("<u8")[0])
    if 8 + header_size > data.size:
        raise fail(f"header of {header_size} bytes does not fit in the file's {data.size} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + header_size]))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise fail(f"header is not JSON ({error})") from error
    if not isinstance(header, dict):
        raise fail(f"header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    body = data[8 + header_size :]
    loaders = {}
    for name, entry in header.items():
        if not _is_tensor_entry(entry):
            raise fail(f"tensor {name!r} has a malformed entry {str(entry)[:80]}")
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']}, not one of {sorted(_SAFETENSORS_DTYPES)}"
            )
        stored = np.dtype(_SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= body.size or end - begin != stored.itemsize * math.prod(entry["shape"]):
            raise fail(f"tensor {name!r} needs bytes {begin}..{end} of a {body.size}-byte data section")
        loaders[name] = _tensor_reader(body[begin:end], stored, entry["dtype"] == "BF16", tuple(entry["shape"]))
    return loaders


def _is_tensor_entry(entry: Any) -> bool:
    """``{dtype: str, shape: [int >= 0], data_offsets: [int, int]}``, nothing else trusted."""
    is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("dtype"), str)
        and isinstance(entry.get("shape"), list)
        and all(is_int(d) and 0 <= d < 2**40 for d in entry["shape"])
        and isinstance(entry.get("data_offsets"), list)
        and len(entry["data_offsets"]) == 2
        and all(is_int(o) for o in entry["data_offsets"])
    )


def _tensor_reader(
    raw: np.ndarray, stored: np.dtype, bfloat16: bool, shape: tuple[int, ...]
) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        values = raw.view(stored)
        if bfloat16:  # bf16 is the top half of a float32
            values = (values.astype(np.uint32) << 16).view(np.float32)
        return values.astype(np.float32, copy=False).reshape(shape)

    return read
