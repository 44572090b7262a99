"""Concrete models: the Llama-family decoder with its KV cache, weight loaders, tokenizers,
and the embedded SmolLM2 default (``ppl.models.smollm2()``)."""

from ppl.models.embedded import smollm2, smollm2_path
from ppl.models.llama import KVCache, Llama, LlamaConfig
from ppl.models.loaders import CheckpointError, load_gguf, load_hf_checkpoint
from ppl.models.tokenizer import Tokenizer

__all__ = [
    "CheckpointError",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "Tokenizer",
    "load_gguf",
    "load_hf_checkpoint",
    "smollm2",
    "smollm2_path",
]
