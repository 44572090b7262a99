"""Concrete models: the Llama-family decoder with its KV cache, weight loaders, tokenizers,
the embedded SmolLM2 default (``ppl.models.smollm2()``), token-level constraints
(``ppl.models.constraints``), scorers (``ppl.models.scorers``, needs the ``scorers`` extra)
and toy models with exact answers (``ppl.models.toy``)."""

from ppl.models import constraints, grammar, process_rewards, quant, task_programs, tasks, toy
from ppl.models.checkpoints import load, load_model
from ppl.models.constraints import TokenDFA
from ppl.models.embedded import gemma3, gemma3_path, smollm2, smollm2_path
from ppl.models.gemma import Gemma3, Gemma3Config
from ppl.models.grammar import HostConstraint
from ppl.models.heads import ProposalHead, TwistHead, with_twist
from ppl.models.llama import KVCache, Llama, LlamaConfig
from ppl.models.loaders import CheckpointError, load_gguf, load_hf_checkpoint
from ppl.models.memory import InsufficientMemoryError, MemoryEstimate, available_memory, check_memory, estimate_memory
from ppl.models.quant import QuantizedMatrix
from ppl.models.tokenizer import Tokenizer

__all__ = [
    "ProposalHead",
    "TwistHead",
    "with_twist",
    "CheckpointError",
    "HostConstraint",
    "InsufficientMemoryError",
    "MemoryEstimate",
    "available_memory",
    "check_memory",
    "estimate_memory",
    "Gemma3",
    "Gemma3Config",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "QuantizedMatrix",
    "TokenDFA",
    "Tokenizer",
    "constraints",
    "gemma3",
    "gemma3_path",
    "grammar",
    "load",
    "load_model",
    "quant",
    "load_gguf",
    "load_hf_checkpoint",
    "smollm2",
    "smollm2_path",
    "toy",
    "process_rewards",
    "task_programs",
    "tasks",
]
