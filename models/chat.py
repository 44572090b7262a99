"""Chat templates: the Jinja programs a model ships to turn a conversation into its prompt text.

A chat model was trained on conversations written in one exact layout (ChatML's
``<|im_start|>user\\n...<|im_end|>``, Llama 3's header tokens, ...). The model file carries that
layout as a Jinja template (``tokenizer.chat_template`` in a GGUF, ``chat_template`` in
``tokenizer_config.json``). Templates come from model repositories, so they are untrusted code:
they run in Jinja's immutable sandbox, with the same environment Hugging Face ``transformers``
gives them so that any template renders here exactly as it does there:

- ``trim_blocks`` / ``lstrip_blocks`` on, and the ``loopcontrols`` extension (``{% break %}``);
- ``raise_exception(message)`` for templates that reject a malformed conversation;
- ``strftime_now(format)`` for templates that stamp today's date (Llama 3.x);
- a ``tojson`` filter that keeps non-ASCII text as is (Jinja's own escapes HTML characters);
- ``{% generation %}...{% endgeneration %}`` blocks (which mark assistant text for training
  masks) render their body unchanged.

    >>> render_chat_template("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\\n{% endfor %}",
    ...                      [{"role": "user", "content": "hi"}], add_generation_prompt=False)
    'user: hi\\n'
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateError(ValueError):
    """A chat template rejected the conversation (its own ``raise_exception`` call)."""


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.datetime.now().strftime(format)


def _tojson(
    value: Any, indent: int | None = None, separators: tuple[str, str] | None = None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """Parses ``{% generation %}body{% endgeneration %}`` as just ``body``."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Cached: a tokenizer renders the same template for every conversation.
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment.from_string(template)


def render_chat_template(
    template: str, messages: Sequence[dict[str, Any]], *, add_generation_prompt: bool = True, **context: Any
) -> str:
    """Render ``messages`` (dicts with at least ``role`` and ``content``) through ``template``.

    ``add_generation_prompt`` asks the template to end with the opening of an assistant turn, so
    that what the model generates next is the reply. ``context`` supplies the other variables
    templates read: ``bos_token``, ``eos_token``, ``tools``, ``documents``, ...
    """
    return _compile(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
