"""Any local checkpoint as a model and its tokenizer: :func:`load`.

``load(path)`` reads what the checkpoint says it is and builds the matching decoder:

- a **GGUF file** (llama.cpp), by its ``general.architecture``: ``llama`` (Llama 2/3, SmolLM,
  with Llama 3.1 rope frequency tensors), ``qwen2``, ``qwen3`` (per-head q/k norms) and
  ``gemma3``; the tokenizer and chat template come from the file's ``tokenizer.*`` metadata;
- an **HF directory** (``config.json`` + ``*.safetensors`` + ``tokenizer.json``), by the
  config's ``model_type``: ``llama`` (with ``llama3`` rope scaling), ``mistral``, ``qwen2``,
  ``qwen3`` and ``gemma3_text``; the chat template from ``tokenizer_config.json`` or
  ``chat_template.jinja``.

Gemma 3 GGUF files carry no chat template (llama.cpp knows it by name), so
:data:`GEMMA_CHAT_TEMPLATE` stands in. A tokenizer with more tokens than the model scores is a
:class:`~ppl.models.loaders.CheckpointError`; one with fewer (Qwen pads its embedding to a
multiple of 128) is padded with tokens that spell nothing, so constraints never allow them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ppl.models.gemma import Gemma3, Gemma3Config, every_nth_global
from ppl.models.llama import Llama, LlamaConfig
from ppl.models.loaders import (
    _HF_TO_GGUF,
    _HF_TO_GGUF_LAYER,
    CheckpointError,
    GGUFFile,
    _metadata,
    _tensor,
    dequantize,
    directory_tensors,
    gguf_hf_tensors,
    gguf_rope_scaling,
    hf_config_dict,
    load_gguf,
    load_hf_checkpoint,
    read_gguf,
)
from ppl.models.tensor_checks import checked_tensors, make_config
from ppl.models.tokenizer import Tokenizer

GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] ~ '\n\n' %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% endif %}"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{{ system if loop.first else '' }}{{ message['content'] | trim }}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
"""Gemma's turn format (a system message joins the first user turn; the assistant is ``model``)."""


def load(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, quantized: bool = False) -> tuple[Llama, Tokenizer]:
    """The model (weights dequantised to ``dtype``, or kept packed with ``quantized=True``: see
    :func:`~ppl.models.loaders.load_gguf`) and tokenizer of a GGUF file or HF directory.

    Raises :class:`~ppl.models.loaders.CheckpointError` naming the cause: an architecture not
    listed in the module docstring, a directory without ``config.json`` or ``tokenizer.json``,
    a truncated or corrupt file, a tokenizer with more tokens than the model.
    """
    path = Path(path)
    model = load_model(path, dtype, quantized)
    tokenizer = _directory_tokenizer(path) if path.is_dir() else _gguf_tokenizer(path, model)
    if tokenizer.vocab_size > model.vocab_size:
        raise CheckpointError(
            f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model scores only "
            f"{model.vocab_size} (tokenizer and weights of different models?)"
        )
    return model, tokenizer.padded(model.vocab_size)


def load_model(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, quantized: bool = False) -> Llama:
    """The model of a GGUF file or HF directory, without its tokenizer (see :func:`load`).
    Packed weights (``quantized=True``) are for Llama-family GGUF files; anything else is a
    ``ValueError``."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        if quantized:
            raise ValueError(f"{path}: quantized=True needs a GGUF file")
        if path.is_dir():
            return _directory_model(path, dtype)
        raise CheckpointError(f"{path}: no such file or directory")
    file = read_gguf(path)
    if file.metadata.get("general.architecture") == "gemma3":
        if quantized:
            raise ValueError(f"{path}: Gemma 3 loads dequantised only (quantized=True is for Llama-family GGUF files)")
        return Gemma3.from_hf_tensors(*gemma3_gguf_tensors(file), dtype)
    return load_gguf(path, dtype, quantized)


def _gguf_tokenizer(path: Path, model: Llama) -> Tokenizer:
    try:
        tokenizer = Tokenizer.from_gguf(path)
    except ValueError as error:
        raise CheckpointError(f"{path}: cannot build the tokenizer: {error}") from error
    if tokenizer.chat_template is None and isinstance(model, Gemma3):
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
    return tokenizer


def _directory_model(directory: Path, dtype: jnp.dtype) -> Llama:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{directory}: no config.json, so not an HF checkpoint directory")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot read the config: {error}") from error
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: a JSON {type(config).__name__}, not an object")
    kind = config.get("model_type")
    if kind == "gemma3":
        raise CheckpointError(
            f"{config_path}: model_type 'gemma3' is the multimodal Gemma 3; only text checkpoints "
            "(model_type 'gemma3_text', e.g. gemma-3-270m and gemma-3-1b) are supported"
        )
    if kind == "gemma3_text":
        try:
            gemma_config = gemma3_hf_config(config, config_path)
        except (KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(f"{config_path}: malformed config ({type(error).__name__}: {error})") from error
        tensor = checked_tensors(gemma_config, directory_tensors(directory), directory, CheckpointError)
        return Gemma3.from_hf_tensors(gemma_config, tensor, dtype)
    return load_hf_checkpoint(directory, dtype)


def _directory_tokenizer(directory: Path) -> Tokenizer:
    tokenizer_path = directory / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise CheckpointError(f"{directory}: no tokenizer.json beside the weights")
    try:
        return Tokenizer.from_file(tokenizer_path)
    except (ValueError, OSError) as error:
        raise CheckpointError(f"{tokenizer_path}: cannot build the tokenizer: {error}") from error


# -- Gemma 3 configs and tensor names -------------------------------------------------------

_GEMMA3_TO_GGUF_LAYER = {
    **_HF_TO_GGUF_LAYER,
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}


def gemma3_gguf_config(file: GGUFFile) -> Gemma3Config:
    """A :class:`Gemma3Config` from a GGUF file's ``gemma3.*`` metadata (llama.cpp's conventions:
    every 6th layer global, local rope base 10 000)."""
    get = lambda key, default=...: _metadata(file, f"gemma3.{key}", default)
    hidden, heads, layers = get("embedding_length"), get("attention.head_count"), get("block_count")
    head_dim = get("attention.key_length", hidden // heads if isinstance(hidden, int) and heads else 0)
    scaling = gguf_rope_scaling(file, get)
    return make_config(
        file.path,
        CheckpointError,
        Gemma3Config,
        vocab_size=get("vocab_size", None) or _tensor(file, "token_embd.weight").shape[0],
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=head_dim,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 1e6),
        rope_scaling=scaling,
        tie_embeddings="output.weight" not in file.tensors,
        sliding_window=get("attention.sliding_window"),
        # As llama.cpp: queries scale by head_dim, except the 27B model's (62 layers) d / heads.
        query_pre_attn_scalar=hidden // heads if layers == 62 else head_dim,
        global_layers=every_nth_global(layers) if isinstance(layers, int) and layers > 0 else (),
    )


def gemma3_gguf_tensors(file: GGUFFile) -> tuple[Gemma3Config, Callable[[str], np.ndarray]]:
    """A Gemma 3 GGUF file's config, and its tensors by HF name in HF layout. llama.cpp stores
    the norms as ``1 + weight``; HF names hold the offset, so 1 is taken off here."""
    config = gemma3_gguf_config(file)

    def tensor(hf_name: str) -> np.ndarray:
        if hf_name.startswith("model.layers."):
            layer, rest = hf_name.removeprefix("model.layers.").split(".", 1)
            name = f"blk.{layer}.{_GEMMA3_TO_GGUF_LAYER[rest]}"
        else:
            name = _HF_TO_GGUF[hf_name]
        array = dequantize(_tensor(file, name), file.path)
        return array - 1 if hf_name.endswith("norm.weight") else array

    return config, checked_tensors(config, tensor, file.path, CheckpointError)


def gemma3_hf_config(config: Mapping[str, Any], path: Any = "<config.json>") -> Gemma3Config:
    """A :class:`Gemma3Config` from an HF ``Gemma3TextConfig`` dict (transformers 4.5x or 5)."""
    if config.get("final_logit_softcapping") or config.get("attn_logit_softcapping"):
        raise CheckpointError(f"{path}: logit soft-capping (Gemma 2) is not supported")
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise CheckpointError(f"{path}: hidden_activation={config['hidden_activation']!r} is not supported")
    rope = config.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers >= 5: rope settings per layer type
        global_rope, local_rope = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
    else:
        global_rope = {**(config.get("rope_scaling") or {}), "rope_theta": config.get("rope_theta", 1e6)}
        local_rope = {"rope_theta": config.get("rope_local_base_freq", 10000.0)}
    theta = global_rope.pop("rope_theta", 1e6)
    scaling = global_rope if global_rope.get("rope_type", global_rope.get("type", "default")) != "default" else None
    layers = config["num_hidden_layers"]
    pattern = config.get("sliding_window_pattern") or config.get("_sliding_window_pattern") or 6
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)
    ]
    heads = config["num_attention_heads"]
    return make_config(
        path,
        CheckpointError,
        Gemma3Config,
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=config.get("num_key_value_heads") or heads,
        head_dim=config.get("head_dim", 256),
        rms_norm_eps=config.get("rms_norm_eps", 1e-6),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(config.get("tie_word_embeddings", True)),
        attention_bias=bool(config.get("attention_bias")),
        output_bias=bool(config.get("attention_bias")),
        sliding_window=config.get("sliding_window", 4096),
        query_pre_attn_scalar=config.get("query_pre_attn_scalar", 256),
        global_layers=tuple(kind == "full_attention" for kind in layer_types),
        rope_local_theta=local_rope.get("rope_theta", 10000.0),
    )


def hf_config_json(config: LlamaConfig) -> dict[str, Any]:
    """The HF ``config.json`` dict of any config :func:`load` builds (the inverse of its readers)."""
    if not isinstance(config, Gemma3Config):
        return hf_config_dict(config)
    rope = {"rope_type": "default", **dict(config.rope_scaling or ()), "rope_theta": config.rope_theta}
    return {
        "model_type": "gemma3_text",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": {
            "full_attention": rope,
            "sliding_attention": {"rope_type": "default", "rope_theta": config.rope_local_theta},
        },
        "sliding_window": config.sliding_window,
        "layer_types": ["full_attention" if g else "sliding_attention" for g in config.global_layers],
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": config.attention_bias,
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
    }


def gguf_tensors(file: GGUFFile) -> tuple[LlamaConfig, Callable[[str], np.ndarray]]:
    """Any supported GGUF file's config and its tensors by HF name (what an HF twin loads)."""
    if file.metadata.get("general.architecture") == "gemma3":
        return gemma3_gguf_tensors(file)
    return gguf_hf_tensors(file)
