"""``ppl.models.load``: dispatch on the checkpoint's architecture, the tokenizer and chat template
that come with it, and a clear ``CheckpointError`` for what it cannot load.

Logit parity of each architecture with HF is in ``test_llama.py`` (``tiny_pair`` loads through
``load_model``, the same dispatch).
"""

from __future__ import annotations

import json
import shutil

import gguf
import jax
import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from ppl.lm import LM
from ppl.models import CheckpointError, Gemma3, load, load_model

CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def write_tokenizer(directory, letters: str = "abcdefghijklmnopqrstuvwxyz") -> int:
    """A byte-level BPE ``tokenizer.json`` (the given letters, a space, one merge, ``<s>``,
    ``</s>``) and a ``tokenizer_config.json`` naming EOS and a chat template. Returns its size."""
    spelled = ["Ġ", *letters]
    vocab = {token: i for i, token in enumerate([*spelled, "ab"])}
    backend = tokenizers.Tokenizer(models.BPE(vocab, [("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "</s>", "bos_token": "<s>", "chat_template": CHAT_TEMPLATE}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return backend.get_vocab_size()


@pytest.fixture
def checkpoint(tiny_pair, tmp_path):
    """A copy of a tiny HF checkpoint directory with a tokenizer: (directory, model loaded alone)."""
    model, _, saved = tiny_pair
    directory = tmp_path / "checkpoint"
    shutil.copytree(saved, directory)
    write_tokenizer(directory)
    return directory, model


def test_load_returns_the_model_and_its_tokenizer(checkpoint):
    directory, alone = checkpoint
    model, tokenizer = load(directory)
    assert isinstance(model, LM)
    assert type(model) is type(alone) and (type(model) is Gemma3) == (alone.config.__class__.__name__ == "Gemma3Config")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(model), jax.tree.leaves(alone), strict=True))
    # The 30-token tokenizer (28 pieces, <s>, </s>) is padded to the model's vocabulary with
    # ids that spell nothing.
    assert tokenizer.vocab_size == model.vocab_size > 30
    assert set(range(28, model.vocab_size)) == tokenizer.special_ids
    assert tokenizer.vocab_bytes[28:] == [b""] * (model.vocab_size - 28)
    ids = tokenizer.encode("ab cab")
    assert max(ids) < 28 and tokenizer.decode(ids) == "ab cab"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (28, 29)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "<s>user: hi</s>"


def test_directory_errors_name_the_cause(checkpoint, tmp_path):
    directory, _ = checkpoint
    with pytest.raises(CheckpointError, match="no such file or directory"):
        load(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load(empty)
    config = json.loads((directory / "config.json").read_text())
    for model_type, message in [("gpt_neox", "model_type 'gpt_neox' is not supported"), ("gemma3", "multimodal")]:
        (directory / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(CheckpointError, match=message):
            load_model(directory)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        load(directory)


def test_tokenizer_larger_than_the_model_is_refused(checkpoint):
    directory, model = checkpoint
    size = write_tokenizer(directory, letters="".join(chr(c) for c in range(0x21, 0x7F)) + "àáâãäåæçèéêëìíîïðñ")
    assert size > model.vocab_size
    with pytest.raises(
        CheckpointError, match=f"tokenizer has {size} tokens but the model scores only {model.vocab_size}"
    ):
        load(directory)


def test_unsupported_gguf_architecture_is_named(tmp_path):
    path = tmp_path / "falcon.gguf"
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="architecture 'falcon' is not supported"):
        load(path)
