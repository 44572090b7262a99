"""The HF ``transformers`` twin of a GGUF model, for benchmarks that compare against PyTorch.

The GGUF tensors are dequantised once (``ppl.models.loaders``) and loaded, in float32, into an
``AutoModelForCausalLM`` built from the matching HF config, so the PyTorch model and
``ppl.models.load_gguf(path)`` hold exactly the same weights. PyTorch and transformers are
benchmark/test-only references; the library never imports them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from transformers.initialization import no_init_weights

from ppl.models.checkpoints import gguf_tensors, hf_config_json
from ppl.models.loaders import read_gguf


def hf_model(path) -> torch.nn.Module:
    """An HF ``*ForCausalLM`` (float32, eval mode) holding the dequantised tensors of the GGUF at
    ``path`` (any architecture ``ppl.models.load`` reads), or the HF checkpoint directory ``path``."""
    if Path(path).is_dir():
        return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    config, tensor = gguf_tensors(read_gguf(path))
    with no_init_weights():
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(**hf_config_json(config)), dtype=torch.float32
        )
    model.load_state_dict(
        {n: torch.from_numpy(tensor(n)) for n in model.state_dict() if n != "lm_head.weight"}, strict=False
    )
    model.tie_weights()
    return model.eval()
