"""Checks that a checkpoint's config and tensors describe one consistent model, so that a
corrupt file fails with :class:`~ppl.models.loaders.CheckpointError` naming the file and the
problem rather than building a silently wrong model or failing inside numpy or XLA.

Both loaders route every tensor through :func:`checked_tensors`: the shape must be the one the
config implies, and every value finite. A bit flip inside tensor data that leaves a finite value
cannot be detected without a checksum (neither GGUF nor safetensors stores one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from ppl.models.gemma import Gemma3Config
from ppl.models.llama import LlamaConfig
from ppl.models.quant import nonfinite


def make_config(
    path: Any, error: type[Exception], config_class: type[LlamaConfig] = LlamaConfig, **fields: Any
) -> LlamaConfig:
    """A ``config_class`` (a :class:`LlamaConfig`) from raw header values, refusing non-positive sizes, non-finite
    constants and inconsistent head counts with ``error`` naming ``path``."""
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
    ):
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 < value < 2**31:
            raise error(f"{path}: {name}={value!r} is not a positive integer below 2**31")
        fields[name] = int(value)
    for name in ("rms_norm_eps", "rope_theta"):
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not 0 < value < math.inf:
            raise error(f"{path}: {name}={value!r} is not a positive finite number")
        fields[name] = float(value)
    try:
        return config_class(**fields)
    except (ValueError, TypeError) as problem:
        raise error(f"{path}: inconsistent config: {problem}") from problem


def hf_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name the config needs, with its ``[out, in]`` shape."""
    c = config
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    layer = {
        "input_layernorm.weight": (c.hidden_size,),
        "post_attention_layernorm.weight": (c.hidden_size,),
        "self_attn.q_proj.weight": (q, c.hidden_size),
        "self_attn.k_proj.weight": (kv, c.hidden_size),
        "self_attn.v_proj.weight": (kv, c.hidden_size),
        "self_attn.o_proj.weight": (c.hidden_size, q),
        "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
        "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
    }
    if c.attention_bias:
        layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    if c.output_bias:
        layer["self_attn.o_proj.bias"] = (c.hidden_size,)
    if c.qk_norm:
        layer |= {"self_attn.q_norm.weight": (c.head_dim,), "self_attn.k_norm.weight": (c.head_dim,)}
    if isinstance(c, Gemma3Config):
        layer |= {f"{norm}_feedforward_layernorm.weight": (c.hidden_size,) for norm in ("pre", "post")}
    for i in range(c.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in layer.items()}
    return shapes


def checked_tensors(
    config: LlamaConfig, tensor: Callable[[str], Any], path: Any, error: type[Exception]
) -> Callable[[str], Any]:
    """``tensor`` with each result (an array or a quantised matrix) checked against the config's
    shape and for NaN/Inf."""
    shapes = hf_shapes(config)

    def checked(name: str) -> np.ndarray:
        array = tensor(name)
        if name in shapes and array.shape != shapes[name]:
            raise error(f"{path}: tensor {name!r} has shape {array.shape}, the config implies {shapes[name]}")
        if bad := nonfinite(array):
            raise error(f"{path}: tensor {name!r} holds {bad} non-finite values (corrupt data?)")
        return array

    return checked
