"""COLLIE-style constrained sentences on SmolLM2: pass@1, all-dead rate, fluency, wall time.

Six sentence templates in the style of COLLIE (Yao et al. 2023), each instance seeded (topic,
numbers and words drawn from ``--seed``), written as regexes compiled by
``ppl.models.constraints.regex`` (one task's several regexes intersected; the character count
as a byte DFA through ``from_char_dfa``, which outlines-core is too slow for today), the answer
required to end with EOS within ``BUDGET`` = 48 new tokens:

- ``char_count``: exactly n characters (30..60), a capital first, a period last;
- ``word_positions``: 8 words, the 3rd and the 8th given;
- ``word_length``: at least 8 words, none longer than k characters (4..6);
- ``required_words``: contains three given words (three regexes, intersected);
- ``word_count``: exactly n words (10..14);
- ``ends_with``: the last word given.

Methods, each with N particles (SmolLM2-135M-Instruct, chat template, the instruction states
the constraint in words):

- ``sample``: plain LM sampling, no constraint; pass@1 = the fraction of the N draws that
  satisfy it (the expected pass@1 of one draw);
- ``rejection``: the first of the same N draws that satisfies it (fails when none does);
- ``is``: ``importance`` on the constrained program (locally optimal proposal, budget masks),
  the answer one draw from the weighted particles (``SMCResult.sample``);
- ``smc``: ``smc`` on the same program (systematic resampling at ESS < N/2);
- ``smc_twist``: ``smc`` with the automaton's look-ahead twist (``ppl.AcceptanceTwist``).

pass@1: the answer fully matches every regex of its task (checked with Python's ``re`` on
the decoded text). all-dead: the run returned no particle of non-zero weight. Fluency: the
answer's mean log p_LM per token (EOS included), teacher-forced on the chat prompt — over the
answers that pass. Wall time: seconds per run after compilation. Every method compiles once
per N: the prompts are padded to one length (spaces before the user turn's end) and the
automata to one table shape (dead rows and columns).

    python benchmarks/collie.py [--seeds 2] [--quick] [--threads 1]

``--quick``: one instance per template, N = 8 only. Last lines: ``RESULT collie_pass_smc_n8``,
``collie_pass_is_n8``, ``collie_all_dead_n8`` (IS and SMC runs, N = 8), ``collie_fluency_gain``
(SMC's fluency minus IS's, N = 8, nats/token).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from typing import NamedTuple

import _cpus  # benchmarks/ is on sys.path when this script runs

_cpus.pin(_cpus.threads_from_argv(sys.argv, 1))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import ppl  # noqa: E402
from ppl.inference import importance, smc  # noqa: E402
from ppl.models import smollm2  # noqa: E402
from ppl.models.constraints import TokenDFA, from_char_dfa, intersect, regex  # noqa: E402

BUDGET = 48
WORD = "[A-Za-z',]+"
TOPICS = [
    "the sea",
    "an old library",
    "winter mornings",
    "a busy market",
    "the moon",
    "a small dog",
    "baking bread",
    "a long train ride",
]
WORDS = ["river", "light", "green", "music", "quiet", "bread", "stone", "dream", "smile", "cloud", "garden", "window"]
METHODS = ("sample", "rejection", "is", "smc", "smc_twist")


class Task(NamedTuple):
    name: str
    instruction: str
    patterns: tuple[str, ...]


def _tasks(rng: np.random.Generator) -> list[Task]:
    """One instance of each template."""
    topic = lambda: TOPICS[rng.integers(len(TOPICS))]  # noqa: E731
    a, b, c = rng.choice(WORDS, 3, replace=False)
    n_chars, k, n_words = int(rng.integers(30, 61)), int(rng.integers(4, 7)), int(rng.integers(10, 15))
    contains = lambda w: f"({WORD} )*{w}( {WORD})*\\."  # noqa: E731
    return [
        Task(
            "char_count",
            f"Write one sentence of exactly {n_chars} characters, spaces included, about {topic()}.",
            (f"[A-Z][A-Za-z ,']{{{n_chars - 2}}}\\.",),
        ),
        Task(
            "word_positions",
            f"Write one sentence of exactly 8 words about {topic()}: the third word is '{a}' and the last word is '{b}'.",
            (f"{WORD} {WORD} {a} {WORD} {WORD} {WORD} {WORD} {b}\\.",),
        ),
        Task(
            "word_length",
            f"Write one sentence of at least 8 words about {topic()} in which no word has more than {k} letters.",
            (f"[A-Za-z',]{{1,{k}}}( [A-Za-z',]{{1,{k}}}){{7,}}\\.",),
        ),
        Task(
            "required_words",
            f"Write one sentence that uses the words '{a}', '{b}' and '{c}'.",
            (contains(a), contains(b), contains(c)),
        ),
        Task(
            "word_count",
            f"Write one sentence of exactly {n_words} words about {topic()}.",
            (f"{WORD}( {WORD}){{{n_words - 1}}}\\.",),
        ),
        Task(
            "ends_with",
            f"Write one sentence about {topic()} that ends with the word '{c}'.",
            (f"{WORD}( {WORD})* {c}\\.",),
        ),
    ]


def _char_count(n: int, tokenizer) -> TokenDFA:
    """``[A-Z][A-Za-z ,']{n-2}\\.`` as a byte DFA (the state is the characters written):
    outlines-core takes minutes on this counted class over SmolLM2's vocabulary today."""
    inner = set(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,'")

    def step(written: int, byte: int) -> int:
        if written == 0:
            return 1 if 65 <= byte <= 90 else -1
        if written < n - 1:
            return written + 1 if byte in inner else -1
        return n if written == n - 1 and byte == ord(".") else -1

    return from_char_dfa(step, 0, [n], n + 1, tokenizer)


def _constraint(task: Task, tokenizer) -> TokenDFA:
    if task.name == "char_count":
        return _char_count(int(re.search(r"exactly (\d+)", task.instruction).group(1)), tokenizer)
    parts = [regex(pattern, tokenizer) for pattern in task.patterns]
    combined = parts[0]
    for part in parts[1:]:
        combined = intersect(combined, part)
    return combined


def _pad_dfa(dfa: TokenDFA, n_states: int, n_classes: int) -> TokenDFA:
    """The same automaton in a ``[n_states, n_classes]`` table: the extra rows and columns are
    dead, so no token reaches them (distances are recomputed for the bigger table)."""
    table = np.full((n_states, n_classes), -1, np.int32)
    table[: dfa.transitions.shape[0], : dfa.transitions.shape[1]] = np.asarray(dfa.transitions)
    accepting = np.zeros(n_states, bool)
    accepting[: dfa.accepting.shape[0]] = np.asarray(dfa.accepting)
    return TokenDFA(
        token_class=dfa.token_class,
        transitions=jnp.asarray(table),
        accepting=jnp.asarray(accepting),
        initial=dfa.initial,
        eos_token_id=dfa.eos_token_id,
    )


def _prompts(instructions: list[str], tokenizer) -> np.ndarray:
    """Chat prompts padded to one length with space tokens just before the user turn ends."""
    encoded = [tokenizer.encode_chat([{"role": "user", "content": text}]) for text in instructions]
    (end,) = tokenizer.encode("<|im_end|>", add_special_tokens=False)
    (space,) = tokenizer.encode(" ", add_special_tokens=False)
    longest = max(map(len, encoded))
    padded = []
    for ids in encoded:
        user_end = max(i for i, token in enumerate(ids) if token == end)  # the last turn is the user's
        padded.append(ids[:user_end] + [space] * (longest - len(ids)) + ids[user_end:])
    return np.asarray(padded, np.int32)


@eqx.filter_jit
def _answer_log_probs(lm, sequence, start):
    """Per-position log p_LM of ``sequence`` (prompt, answer, EOS, padding): teacher forcing."""
    log_probs = jax.nn.log_softmax(lm(sequence)[:-1])
    picked = jnp.take_along_axis(log_probs, sequence[1:, None], axis=1)[:, 0]
    return jnp.where(jnp.arange(sequence.shape[0] - 1) >= start - 1, picked, 0.0)


def _fluency(lm, prompt: np.ndarray, answer: list[int], eos: int) -> float:
    tokens = np.concatenate([prompt, answer, [eos], np.full(BUDGET + 1 - len(answer) - 1, eos)]).astype(np.int32)
    picked = np.asarray(_answer_log_probs(lm, jnp.asarray(tokens), len(prompt)))
    return float(picked[len(prompt) - 1 : len(prompt) + len(answer)].sum() / (len(answer) + 1))


def _texts(result, tokenizer) -> list[tuple[list[int], str]]:
    tokens, lengths = np.asarray(result.particles.tokens), np.asarray(result.particles.length)
    return [(row[:n].tolist(), tokenizer.decode(row[:n].tolist())) for row, n in zip(tokens, lengths)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=2, help="instances of each template (default 2)")
    parser.add_argument("--quick", action="store_true", help="one instance per template, N = 8 only")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nats-per-token", type=float, default=1.0, help="the look-ahead twist's strength")
    args = parser.parse_args()
    seeds, sizes = (1, (8,)) if args.quick else (args.seeds, (8, 32))

    lm, tokenizer = smollm2()
    eos = tokenizer.eos_token_id
    tasks = [task for s in range(seeds) for task in _tasks(np.random.default_rng(args.seed + s))]
    start = time.perf_counter()
    dfas = []
    for task in tasks:
        began = time.perf_counter()
        dfas.append(_constraint(task, tokenizer))
        print(
            f"{task.name}: {dfas[-1].transitions.shape} table in {time.perf_counter() - began:.1f} s", file=sys.stderr
        )
    print(f"compiled {len(dfas)} constraints in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    n_states = max(d.transitions.shape[0] for d in dfas)
    n_classes = max(d.transitions.shape[1] for d in dfas)
    dfas = [_pad_dfa(d, n_states, n_classes) for d in dfas]
    prompts = _prompts([task.instruction for task in tasks], tokenizer)

    def program(i, constrained, twist=False):
        if not constrained:
            return ppl.Generation(lm, prompts[i], BUDGET, eos)
        lookahead = ppl.AcceptanceTwist(dfas[i], BUDGET, args.nats_per_token) if twist else None
        return ppl.Generation(
            lm,
            prompts[i],
            BUDGET,
            eos,
            constraint=dfas[i],
            proposal="locally_optimal",
            require_eos=True,
            twist=lookahead,
        )

    runners = {
        "sample": lambda i, key, n: importance(program(i, False), key, n),
        "is": lambda i, key, n: importance(program(i, True), key, n),
        "smc": lambda i, key, n: smc(program(i, True), key, n),
        "smc_twist": lambda i, key, n: smc(program(i, True, twist=True), key, n),
    }
    rows = []  # (method, n, task name, passed, all_dead, fluency, seconds)
    for n in sizes:
        for method, run in runners.items():
            jax.block_until_ready(run(0, jax.random.key(0), n))  # compile once per (method, N)
            for i, task in enumerate(tasks):
                key = jax.random.key(1000 * args.seed + i)
                began = time.perf_counter()
                result = jax.block_until_ready(run(i, key, n))
                seconds = time.perf_counter() - began
                ok = lambda text: all(re.fullmatch(p, text) for p in task.patterns)  # noqa: E731,B023
                drawn = _texts(result, tokenizer)
                if method == "sample":
                    passing = [(ids, text) for ids, text in drawn if ok(text)]
                    rows.append(
                        (
                            "sample",
                            n,
                            task.name,
                            float(np.mean([ok(t) for _, t in drawn])),
                            False,
                            statistics.mean(_fluency(lm, prompts[i], ids, eos) for ids, _ in passing)
                            if passing
                            else None,
                            seconds,
                        )
                    )
                    first = passing[0] if passing else None
                    rows.append(
                        (
                            "rejection",
                            n,
                            task.name,
                            float(first is not None),
                            False,
                            _fluency(lm, prompts[i], first[0], eos) if first else None,
                            seconds,
                        )
                    )
                    continue
                dead = bool(result.all_dead)
                answer = None if dead else result.sample(jax.random.key(i), 1)
                ids, text = (
                    (None, None) if dead else (np.asarray(answer.tokens[0])[: int(answer.length[0])].tolist(), None)
                )
                text = None if dead else tokenizer.decode(ids)
                passed = text is not None and ok(text)
                rows.append(
                    (
                        method,
                        n,
                        task.name,
                        float(passed),
                        dead,
                        _fluency(lm, prompts[i], ids, eos) if passed else None,
                        seconds,
                    )
                )
                print(
                    f"{method:>9} N={n:<3} {task.name:<15} pass={passed!s:<5} dead={dead!s:<5} {seconds:6.2f}s  {text!r}",
                    file=sys.stderr,
                )
    _report(rows, sizes)


def _report(rows, sizes) -> None:
    def stat(method, n, column, task=None):
        values = [
            r[column]
            for r in rows
            if r[0] == method and r[1] == n and (task is None or r[2] == task) and r[column] is not None
        ]
        return float(np.mean(values)) if values else float("nan")

    names = list(dict.fromkeys(r[2] for r in rows))
    print("\n| method | N | pass@1 | " + " | ".join(names) + " | all-dead | fluency (nats/token) | s/run |")
    print("|---|---:|---:|" + "---:|" * len(names) + "---:|---:|---:|")
    for n in sizes:
        for method in METHODS:
            per_task = " | ".join(f"{stat(method, n, 3, name):.2f}" for name in names)
            print(
                f"| {method} | {n} | {stat(method, n, 3):.3f} | {per_task} | {stat(method, n, 4):.3f} | "
                f"{stat(method, n, 5):.3f} | {stat(method, n, 6):.2f} |"
            )
    dead = [r[4] for r in rows if r[0] in ("is", "smc", "smc_twist") and r[1] == 8]
    print(f"RESULT collie_pass_smc_twist_n8={stat('smc_twist', 8, 3):.3f}")
    print(f"RESULT collie_fluency_twist_gain={stat('smc_twist', 8, 5) - stat('is', 8, 5):.3f}")
    print(f"RESULT collie_pass_smc_n8={stat('smc', 8, 3):.3f}")
    print(f"RESULT collie_pass_is_n8={stat('is', 8, 3):.3f}")
    print(f"RESULT collie_all_dead_n8={float(np.mean(dead)):.3f}")
    print(f"RESULT collie_fluency_gain={stat('smc', 8, 5) - stat('is', 8, 5):.3f}")


if __name__ == "__main__":
    main()
