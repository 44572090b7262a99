"""GGUF and safetensors loading: every dequantised type against a reference, configs, and
clear errors for truncated, corrupt or unsupported files."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from ppl.models import CheckpointError, LlamaConfig, load_gguf, load_model
from ppl.models.loaders import GGUF_TYPES, dequantize, gguf_config, hf_config, hf_config_dict, read_gguf

Q = gguf.GGMLQuantizationType
QUANTIZABLE = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]  # gguf.quants can encode these
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]  # gguf.quants only decodes these: random blocks are written


def encode(values: np.ndarray, kind: Q) -> np.ndarray:
    if kind == Q.F32:
        return values.astype(np.float32)
    if kind == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, kind)


def random_k_blocks(rows: int, cols: int, kind: Q, rng: np.random.Generator) -> np.ndarray:
    """Random K-quant bytes whose f16 super-block scales are finite and moderate."""
    block, size = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.01, (rows, cols // block, 2)).astype(np.float16).view(np.uint8)
    if kind == Q.Q6_K:  # d is the last 2 bytes
        raw[..., -2:] = scales[..., :2]
    else:  # d, dmin are the first 4 bytes
        raw[..., :4] = scales
    return raw.reshape(rows, -1)


def write_gguf(path, tensors: dict[str, tuple[np.ndarray, Q]], metadata: dict | None = None, arch="llama"):
    writer = gguf.GGUFWriter(path, arch)
    for key, value in (metadata or {}).items():
        (writer.add_uint32 if isinstance(value, int) else writer.add_float32)(key, value)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if kind in (Q.F32, Q.F16) else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def every_type_file(tmp_path_factory):
    """One 6 x 512 tensor of each supported type, with the float values it encodes."""
    rng = np.random.default_rng(0)
    tensors, expected = {}, {}
    for kind in QUANTIZABLE:
        values = rng.standard_normal((6, 512)).astype(np.float32)
        tensors[kind.name] = (encode(values, kind), kind)
        expected[kind.name] = values
    for kind in K_QUANTS:
        tensors[kind.name] = (random_k_blocks(6, 512, kind, rng), kind)
    path = tmp_path_factory.mktemp("gguf") / "types.gguf"
    write_gguf(path, tensors)
    return path, tensors, expected


@pytest.mark.parametrize("kind", QUANTIZABLE + K_QUANTS, ids=lambda k: k.name)
def test_gguf_dequantisation(every_type_file, kind):
    path, tensors, expected = every_type_file
    loaded = dequantize(read_gguf(path).tensors[kind.name])
    assert loaded.shape == (6, 512) and loaded.dtype == np.float32
    reference = gguf.quants.dequantize(tensors[kind.name][0], kind).reshape(6, 512)
    np.testing.assert_array_equal(loaded, reference)
    if kind.name in expected:  # and the values survive quantisation within its resolution
        tolerance = {Q.F32: 0, Q.F16: 2e-3, Q.BF16: 2e-2, Q.Q8_0: 3e-2}.get(kind, 0.6)
        np.testing.assert_allclose(loaded, expected[kind.name], atol=tolerance)
    assert kind in GGUF_TYPES


def test_unsupported_gguf_type_names_it(tmp_path):
    path = tmp_path / "q2k.gguf"
    write_gguf(path, {"w": (random_k_blocks(2, 256, Q.Q2_K, np.random.default_rng(0)), Q.Q2_K)})
    with pytest.raises(CheckpointError, match="Q2_K"):
        dequantize(read_gguf(path).tensors["w"], path)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01])
def test_truncated_gguf_is_a_clear_error(every_type_file, tmp_path, keep):
    data = every_type_file[0].read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="truncated.gguf"):
        read_gguf(path)


def test_corrupt_gguf_is_a_clear_error(every_type_file, tmp_path):
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(b"GGML" + every_type_file[0].read_bytes()[4:])
    with pytest.raises(CheckpointError, match="corrupt.gguf.*not a GGUF file"):
        read_gguf(path)
    with pytest.raises(CheckpointError, match="no such file"):
        read_gguf(tmp_path / "missing.gguf")


def test_smollm2_config_from_metadata(smollm2_file):
    config = gguf_config(read_gguf(smollm2_file))
    assert config == LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=float(np.float32(1e-5)),
        rope_theta=100000.0,
        tie_embeddings=True,
    )


def test_qwen2_gguf_matches_hf(make_tiny_hf, tmp_path):
    """A qwen2-arch GGUF (unpermuted q/k, biases) written from an HF model loads to the same logits."""
    hf = make_tiny_hf("qwen2", seed=2)
    c = hf.config
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight",
        "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight",
        "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
        "self_attn.o_proj.weight": "attn_output.weight",
        **{f"self_attn.{k}_proj.{p}": f"attn_{k}.{p}" for k in "qkv" for p in ("weight", "bias")},
    }
    for i in range(c.num_hidden_layers):
        names.update({f"model.layers.{i}.{h}": f"blk.{i}.{g}" for h, g in layer_names.items()})
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    tensors = {g: (state[h], Q.F32) for h, g in names.items()}
    metadata = {
        "qwen2.block_count": c.num_hidden_layers,
        "qwen2.embedding_length": c.hidden_size,
        "qwen2.feed_forward_length": c.intermediate_size,
        "qwen2.attention.head_count": c.num_attention_heads,
        "qwen2.attention.head_count_kv": c.num_key_value_heads,
        "qwen2.rope.freq_base": 1000000.0,
        "qwen2.attention.layer_norm_rms_epsilon": c.rms_norm_eps,
    }
    path = tmp_path / "qwen2.gguf"
    write_gguf(path, tensors, metadata, arch="qwen2")
    ours = load_gguf(path)
    tokens = np.arange(20) % c.vocab_size
    with torch.no_grad():
        reference = hf(torch.tensor(tokens)[None]).logits[0].numpy()
    assert np.abs(np.asarray(ours(tokens)) - reference).max() < 1e-4


# -- safetensors ------------------------------------------------------------------------------


def test_hf_config_round_trip():
    for config in (
        LlamaConfig(
            100,
            32,
            64,
            2,
            4,
            2,
            8,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        LlamaConfig(100, 32, 64, 2, 4, 4, 8, tie_embeddings=True, attention_bias=True),
        LlamaConfig(100, 32, 64, 2, 4, 1, 8, sliding_window=16),
    ):
        assert hf_config(hf_config_dict(config)) == config


def test_old_style_hf_config():
    old = {
        "model_type": "mistral",
        "vocab_size": 10,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 1e6,
        "rope_scaling": None,
        "sliding_window": 4096,
    }
    config = hf_config(old)
    assert (config.rope_theta, config.head_dim, config.sliding_window) == (1e6, 4, 4096)
    with pytest.raises(CheckpointError, match="gpt2"):
        hf_config({**old, "model_type": "gpt2"})


def test_safetensors_errors(tiny_pair, tmp_path):
    _, _, directory = tiny_pair
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((directory / name).read_bytes())
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*truncated"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(CheckpointError, match="model.safetensors.*not JSON"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(CheckpointError, match="config.json.*gemma"):
        load_model(tmp_path)
