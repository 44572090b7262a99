"""Byte-level BPE tokenizers built on Hugging Face ``tokenizers``, from a GGUF or a tokenizer.json.

Inference needs three things from a tokenizer (``ppl.lm.Tokenizer``): text to ids, ids to text,
and the exact bytes each token stands for, so that constraints and rewards can reason about
tokens as byte strings. ``Tokenizer`` provides them for the byte-level BPE family (GPT-2,
SmolLM, Llama 3, Qwen2, ...), where every token spells a byte string in GPT-2's printable
"byte alphabet" (a space is ``Ġ``, a newline ``Ċ``).

    >>> tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")      # doctest: +SKIP
    >>> ids = tok.encode_chat([{"role": "user", "content": "Hi!"}])        # doctest: +SKIP
    >>> "".join(tok.decode_stream(ids)) == tok.decode(ids)                 # doctest: +SKIP
    True

**Special tokens** (``<|im_start|>``, ``<|endoftext|>``, ...) are control signals, not text:
``vocab_bytes[i]`` is ``b""`` for every id in ``special_ids``, so byte-level constraints never
mistake ``<|im_end|>`` for the seven characters it is written with. ``encode`` still recognises
them written out in the text (that is how a chat template's markup becomes ids), and ``decode``
writes them out again unless asked to skip them, so ``decode(encode(s)) == s`` for every text
the vocabulary can spell. A byte-level vocabulary may lack some single-byte tokens (SmolLM2
has none for six control characters and for 0xF1, 0xF2, the lead bytes of Unicode planes
4-11); BPE drops such bytes, exactly as the reference ``tokenizers`` conversion does.

**Splitting text before BPE** is what differs between model families: the merges were learned
on text cut by one regex, and ids match the reference only when text is cut the same way. A
GGUF names its family in ``tokenizer.ggml.pre``; ``PRE_TOKENIZER_FLAVOURS`` lists those known
here, each reproducing the ``tokenizer.json`` its model family publishes.
"""

from __future__ import annotations

import codecs
import copy
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from .chat import render_chat_template


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's spelling of the 256 bytes as printable characters.

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, soft hyphen, ...)
    are given U+0100, U+0101, ... in byte order, so no token string contains whitespace.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    spelling = {byte: chr(byte) for byte in printable}
    shifted = [byte for byte in range(256) if byte not in spelling]
    spelling.update({byte: chr(0x100 + n) for n, byte in enumerate(shifted)})
    return spelling


_SPELLING = _byte_alphabet()
_UNSPELLING = {char: byte for byte, char in _SPELLING.items()}


def _spell(data: bytes) -> str:
    return "".join(_SPELLING[byte] for byte in data)


def _is_spelled(token: str) -> bool:
    return all(char in _UNSPELLING for char in token)


# --- Pre-tokenizer flavours --------------------------------------------------------------------

# GPT-2's split: contractions, letter runs, number runs, punctuation runs (each optionally led by
# one space), and whitespace that leaves the last space to the word after it.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama 3: case-insensitive contractions, a word may be led by any one non-letter, numbers in
# groups of at most three digits, newlines kept with the punctuation before them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2: Llama 3's split with every digit on its own.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class Flavour:
    """How one model family prepares text for BPE (``tokenizer.ggml.pre`` names it)."""

    split: str
    """The regex cutting text into the pieces BPE merges within."""
    digits_first: bool = False
    """Isolate every number character before ``split`` runs (SmolLM, StarCoder)."""
    nfc: bool = False
    """Compose text to Unicode NFC first (Qwen2); ``decode(encode(s))`` is then NFC(s)."""
    ignore_merges: bool = False
    """A piece that is itself a vocabulary token becomes that token without merging (Llama 3)."""

    def pre_tokenizer(self) -> pre_tokenizers.PreTokenizer:
        split = [pre_tokenizers.Split(Regex(self.split), behavior="isolated")]
        digits = [pre_tokenizers.Digits(individual_digits=True)] if self.digits_first else []
        return pre_tokenizers.Sequence(
            [*digits, *split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )


PRE_TOKENIZER_FLAVOURS: dict[str, Flavour] = {
    "gpt2": Flavour(_GPT2_SPLIT),
    "smollm": Flavour(_GPT2_SPLIT, digits_first=True),
    "starcoder": Flavour(_GPT2_SPLIT, digits_first=True),
    "llama-bpe": Flavour(_LLAMA3_SPLIT, ignore_merges=True),
    "qwen2": Flavour(_QWEN2_SPLIT, nfc=True),
    "deepseek-r1-qwen": Flavour(_QWEN2_SPLIT, nfc=True),
}
"""``tokenizer.ggml.pre`` values understood by ``Tokenizer.from_gguf``."""


# --- GGUF metadata -----------------------------------------------------------------------------

# llama.cpp token types (``tokenizer.ggml.token_type``).
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6
_SPACE = "\u2581"  # SentencePiece writes a space as "▁"


def _gguf_metadata(path: Path) -> dict[str, Any]:
    """The ``tokenizer.*`` key/values of a GGUF file, decoded to Python values.

    Read with the loader's own header parser: ``gguf.GGUFReader`` builds a memory-map view
    per vocabulary entry and takes seconds on a 49k-token vocabulary."""
    from ppl.models.loaders import read_gguf

    return {key: value for key, value in read_gguf(path).metadata.items() if key.startswith("tokenizer.")}


def _require(metadata: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF file {path} has no tokenizer metadata {key!r}; cannot build its tokenizer")
    return metadata[key]


def _backend_from_gguf(metadata: dict[str, Any], path: Path) -> tokenizers.Tokenizer:
    kind = _require(metadata, "tokenizer.ggml.model", path)
    if kind == "llama":
        return _sentencepiece_backend_from_gguf(metadata, path)
    if kind != "gpt2":
        raise ValueError(
            f"GGUF file {path} has a {kind!r} tokenizer; only byte-level BPE ('gpt2') and "
            "SentencePiece BPE ('llama') are supported"
        )
    pre = metadata.get("tokenizer.ggml.pre")
    if pre not in PRE_TOKENIZER_FLAVOURS:
        raise ValueError(
            f"GGUF file {path} has tokenizer.ggml.pre={pre!r}, a pre-tokenizer flavour not known "
            f"here; known: {sorted(PRE_TOKENIZER_FLAVOURS)}"
        )
    flavour = PRE_TOKENIZER_FLAVOURS[pre]
    tokens: list[str] = _require(metadata, "tokenizer.ggml.tokens", path)
    types: list[int] = metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))

    # Added tokens (control, user-defined) are stored as the raw text they match; every other
    # token in the byte alphabet, except for a few files that store raw text there too.
    vocab: dict[str, int] = {}
    for token_id, (token, token_type) in enumerate(zip(tokens, types, strict=True)):
        is_added = token_type in (_CONTROL, _USER_DEFINED)
        key = token if is_added or _is_spelled(token) else _spell(token.encode("utf-8"))
        if vocab.setdefault(key, token_id) != token_id:
            raise ValueError(f"GGUF file {path}: tokens {vocab[key]} and {token_id} both spell {key!r}")
    merges = [tuple(merge.split(" ")) for merge in _require(metadata, "tokenizer.ggml.merges", path)]

    backend = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=flavour.ignore_merges))
    backend.normalizer = normalizers.NFC() if flavour.nfc else None
    backend.pre_tokenizer = flavour.pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    _add_special_tokens(backend, metadata, tokens, types)
    return backend


def _sentencepiece_backend_from_gguf(metadata: dict[str, Any], path: Path) -> tokenizers.Tokenizer:
    """A SentencePiece BPE tokenizer (Llama 2, Gemma) from its pieces and scores.

    SentencePiece BPE repeatedly merges the adjacent pair of pieces whose union is the
    best-scored piece, so the BPE merge list is every split ``(left, right)`` of every piece into
    two pieces, ordered by the whole piece's score. Text is spelled with "▁" for spaces;
    characters no piece covers fall back to the ``<0xNN>`` byte pieces.
    """
    tokens: list[str] = _require(metadata, "tokenizer.ggml.tokens", path)
    scores: list[float] = _require(metadata, "tokenizer.ggml.scores", path)
    types: list[int] = metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens))
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"GGUF file {path}: the vocabulary spells some piece twice")
    mergeable = {
        token for token, token_type in zip(tokens, types, strict=True) if token_type in (_NORMAL, _USER_DEFINED)
    }
    by_score = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    merges = [
        (token[:cut], token[cut:])
        for token in (tokens[i] for i in by_score)
        if token in mergeable
        for cut in range(1, len(token))
        if token[:cut] in mergeable and token[cut:] in mergeable
    ]
    unknown = metadata.get("tokenizer.ggml.unknown_token_id")
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab,
            merges,
            byte_fallback=True,
            fuse_unk=True,
            unk_token=tokens[unknown] if unknown is not None else None,
        )
    )
    prefix = [normalizers.Prepend(_SPACE)] if metadata.get("tokenizer.ggml.add_space_prefix", False) else []
    backend.normalizer = normalizers.Sequence([*prefix, normalizers.Replace(" ", _SPACE)])
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    _add_special_tokens(backend, metadata, tokens, types)
    return backend


def _add_special_tokens(
    backend: tokenizers.Tokenizer, metadata: dict[str, Any], tokens: list[str], types: list[int]
) -> None:
    """Control and user-defined tokens matched as written, and the BOS the model wants first."""
    backend.add_tokens(
        [
            AddedToken(token, special=token_type == _CONTROL, normalized=False)
            for token, token_type in zip(tokens, types)
            if token_type in (_CONTROL, _USER_DEFINED)
        ]
    )
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", pair=f"{tokens[bos]} $A $B", special_tokens=[(tokens[bos], bos)]
        )


# --- tokenizer.json + tokenizer_config.json ----------------------------------------------------


def _token_content(value: str | dict[str, Any] | None) -> str | None:
    """A special token as ``tokenizer_config.json`` writes it: a string or an AddedToken dict."""
    return value["content"] if isinstance(value, dict) else value


def _chat_template_beside(config: dict[str, Any], folder: Path) -> str | None:
    """The chat template: ``chat_template.jinja`` (newer repos) or ``tokenizer_config.json``."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        template = {entry["name"]: entry["template"] for entry in template}.get("default")
    return template


# --- the tokenizer -----------------------------------------------------------------------------


class Tokenizer:
    """A BPE tokenizer (byte-level, or SentencePiece with byte fallback) with the model's
    special tokens and chat template.

    Satisfies ``ppl.lm.Tokenizer``. Build one with ``from_gguf`` or ``from_file``; the
    constructor takes an already configured ``tokenizers.Tokenizer`` whose decoder is
    byte-level, or a BPE model with ``byte_fallback`` (SentencePiece: a token ``▁the`` stands
    for `` the``, ``<0x0A>`` for the byte 0x0A).
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_id: int,
        bos_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._sentencepiece = not isinstance(backend.decoder, decoders.ByteLevel)
        if self._sentencepiece and not getattr(backend.model, "byte_fallback", False):
            raise ValueError(
                "only byte-level BPE and SentencePiece BPE (byte_fallback) tokenizers are supported; "
                f"this one decodes with {backend.decoder!r}"
            )
        self.backend = backend
        """The underlying ``tokenizers.Tokenizer``."""
        self.eos_token_id = eos_token_id
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template
        """The Jinja chat template shipped with the model, or ``None``."""

        added = backend.get_added_tokens_decoder()
        self.special_ids: frozenset[int] = frozenset(i for i, token in added.items() if token.special)
        """Ids of control tokens; their ``vocab_bytes`` entry is ``b""``."""
        self._text_bytes = [self._token_text_bytes(i, added) for i in range(backend.get_vocab_size())]
        self._vocab_bytes = [b"" if i in self.special_ids else data for i, data in enumerate(self._text_bytes)]

    def _token_text_bytes(self, token_id: int, added: dict[int, AddedToken]) -> bytes:
        """The bytes ``decode`` writes for one token: an added token's own text, else its spelling."""
        if token_id in added:
            return added[token_id].content.encode("utf-8")
        token = self.backend.id_to_token(token_id)
        if self._sentencepiece and token is not None:
            is_byte = len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            return bytes([int(token[3:5], 16)]) if is_byte else token.replace(_SPACE, " ").encode("utf-8")
        if token is None or not _is_spelled(token):
            raise ValueError(f"token {token_id} ({token!r}) is not a byte-level BPE token")
        return bytes(_UNSPELLING[char] for char in token)

    @classmethod
    def from_gguf(cls, path: str | Path) -> Tokenizer:
        """The tokenizer described by a GGUF model file's ``tokenizer.*`` metadata.

        Raises ``ValueError`` when the file has no tokenizer metadata, a tokenizer other than
        byte-level BPE, or a ``tokenizer.ggml.pre`` flavour not in ``PRE_TOKENIZER_FLAVOURS``.
        """
        path = Path(path)
        metadata = _gguf_metadata(path)
        backend = _backend_from_gguf(metadata, path)
        return cls(
            backend,
            eos_token_id=int(_require(metadata, "tokenizer.ggml.eos_token_id", path)),
            bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    @classmethod
    def from_file(cls, path: str | Path, *, eos_token: str | None = None) -> Tokenizer:
        """A tokenizer from a ``tokenizer.json``, with ``tokenizer_config.json`` beside it if present.

        The config supplies the EOS/BOS tokens and the chat template (``chat_template.jinja``
        beside it takes precedence, as in ``transformers``). ``eos_token`` overrides the
        config's, and is required when there is no config naming one.
        """
        path = Path(path)
        backend = tokenizers.Tokenizer.from_file(str(path))
        config_path = path.parent / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        eos_token = eos_token or _token_content(config.get("eos_token"))
        if eos_token is None or backend.token_to_id(eos_token) is None:
            raise ValueError(
                f"no EOS token for {path}: tokenizer_config.json names none in the vocabulary "
                f"(got {eos_token!r}); pass eos_token="
            )
        bos_token = _token_content(config.get("bos_token"))
        return cls(
            backend,
            eos_token_id=backend.token_to_id(eos_token),
            bos_token_id=backend.token_to_id(bos_token) if bos_token else None,
            chat_template=_chat_template_beside(config, path.parent),
        )

    def padded(self, vocab_size: int) -> Tokenizer:
        """This tokenizer with ids up to ``vocab_size``: the extra ids (a model's embedding
        padding) are special tokens that spell nothing, so constraints never allow them."""
        if vocab_size < self.vocab_size:
            raise ValueError(f"cannot pad a vocabulary of {self.vocab_size} down to {vocab_size}")
        if vocab_size == self.vocab_size:
            return self
        padded = copy.copy(self)
        padding = [b""] * (vocab_size - self.vocab_size)
        padded._text_bytes, padded._vocab_bytes = self._text_bytes + padding, self._vocab_bytes + padding
        padded.special_ids = self.special_ids | frozenset(range(self.vocab_size, vocab_size))
        return padded

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special tokens included."""
        return len(self._vocab_bytes)

    @property
    def vocab_bytes(self) -> list[bytes]:
        """``vocab_bytes[i]`` is the exact byte string token ``i`` stands for (``b""`` if special)."""
        return self._vocab_bytes

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in it are recognised.

        ``add_special_tokens`` adds what the model wants around any text (a BOS for Llama 3,
        nothing for SmolLM2), as ``transformers`` does.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _check_ids(self, ids: Sequence[int]) -> None:
        for token_id in ids:
            if not 0 <= token_id < self.vocab_size:
                raise ValueError(f"token id {token_id} out of range for a vocabulary of {self.vocab_size}")

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; byte sequences that are not valid UTF-8 become U+FFFD."""
        self._check_ids(ids)
        kept = (i for i in ids if not (skip_special_tokens and i in self.special_ids))
        return b"".join(self._text_bytes[i] for i in kept).decode("utf-8", errors="replace")

    def decode_stream(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> Iterator[str]:
        """Decode ids as they come, yielding text as soon as whole characters are complete.

        The pieces concatenate to ``decode(ids)``; none ends inside a multi-byte character.
        """
        decoder = IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)
        for token_id in ids:
            if text := decoder.push(token_id):
                yield text
        if text := decoder.flush():
            yield text

    def apply_chat_template(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **context: Any
    ) -> str:
        """The prompt text for a conversation, rendered through the model's chat template.

        ``context`` passes extra template variables (``tools``, ``documents``, ...).
        """
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        special_tokens = {
            name: self.backend.id_to_token(token_id)
            for name, token_id in (("bos_token", self.bos_token_id), ("eos_token", self.eos_token_id))
            if token_id is not None
        }
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt, **special_tokens, **context
        )

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True, **context: Any
    ) -> list[int]:
        """Token ids of ``apply_chat_template(...)``: the template writes any BOS itself."""
        text = self.apply_chat_template(messages, add_generation_prompt, **context)
        return self.encode(text, add_special_tokens=False)


class IncrementalDecoder:
    """Turns ids into text one at a time, never splitting a character.

    A token may end in the middle of a multi-byte UTF-8 character (an emoji is often two or
    three tokens); its bytes wait here until the character is complete.

        >>> decoder = IncrementalDecoder(tok)                          # doctest: +SKIP
        >>> [decoder.push(i) for i in tok.encode("🤗")]                # doctest: +SKIP
        ['', '', '🤗']
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the characters it completes (possibly ``""``)."""
        tokenizer = self._tokenizer
        tokenizer._check_ids((token_id,))
        if self._skip_special_tokens and token_id in tokenizer.special_ids:
            return ""
        return self._utf8.decode(tokenizer._text_bytes[token_id])

    def flush(self) -> str:
        """End of the stream: bytes still waiting for a character's end become U+FFFD."""
        return self._utf8.decode(b"", final=True)
