"""Regex constraint compilation: ppl's byte-DFA route against outlines-core, on realistic patterns.

For each pattern of the corpus (exact lengths and counts, word lists, dates, JSON-schema
regexes from outlines-core's own converter, negated classes, Unicode), each route compiles a
``TokenDFA`` for SmolLM2's real vocabulary (49152 tokens) in a fresh process pinned to one core:

- ``ppl``: ``constraints.regex`` — parse, byte-level DFA, minimise, trie walk of the
  vocabulary, token classes. ``compile_s`` is the first call in the process (it includes
  building the vocabulary trie, ~1 s, cached per tokenizer), ``warm_s`` a second call;
- ``outlines``: the route ``constraints.regex`` took before (``_outlines_route`` below, kept
  here as the baseline): ``outlines_core.Index`` (``index_s``), then reading its transition
  dictionaries into the same compressed table.

Reported per pattern and route: seconds (imports and tokenizer loading excluded), the
process's peak RSS (``VmHWM``), token-DFA states, token classes and on-device table bytes
(``token_class`` + ``transitions`` int32, ``accepting`` bool). The outlines route runs under a
memory cap (``--outlines-gib`` more than it holds at the start) and a time limit
(``--timeout``): on some patterns it runs for minutes and then aborts on allocation.

    python benchmarks/constraint_compile.py [--timeout 60] [--outlines-gib 6] [--only NAME ...]

``RESULT`` lines: ``compile_s.<route>.<name>``, ``peak_rss_mb.<route>.<name>``, ``states``,
``classes``, ``table_bytes``, and ``warm_s`` (ppl) or ``index_s`` (outlines); a run that fails
prints ``failed.<route>.<name>=<why>``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from outlines_core.json_schema import build_regex_from_schema

_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0},
        "role": {"enum": ["admin", "editor", "viewer"]},
    },
    "required": ["name", "age", "role"],
}
_EVENT = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "date": {"type": "string", "format": "date"},
        "attendees": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3},
    },
    "required": ["title", "date"],
}
_FRUIT = "(apple|banana|cherry|dragonfruit|elderberry|fig|grape)"

CORPUS = {
    "sentence67_not_newline": r"[A-Z][^\n]{65}[.!?]",
    "sentence67_printable": r"[A-Z][ -~]{65}[.!?]",
    "not_newline_20": r"[^\n]{20}",
    "printable_20": r"[ -~]{20}",
    "ten_ascii_words": r"([A-Za-z]+ ){9}[A-Za-z]+\.",
    "fruit_list": rf"{_FRUIT}(, {_FRUIT}){{0,4}}",
    "date_unicode_digits": r"\d{4}-\d{2}-\d{2}",
    "date_iso": r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
    "email_simple": r"[a-z0-9._]{1,20}@[a-z]{1,15}\.(com|org|net)",
    "quoted_negated": r'"[^"\\\n]{0,40}"',
    "greek_words": r"[α-ω]{3,8}( [α-ω]{3,8}){0,3}",
    "non_ascii_10": r"[^\x00-\x7f]{1,10}",
    "json_person": build_regex_from_schema(json.dumps(_PERSON)),
    "json_event": build_regex_from_schema(json.dumps(_EVENT)),
}


def _peak_rss_mb() -> float:
    """This process's peak RSS (``ru_maxrss`` would include the parent's, kept across ``exec``)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM"))) / 1024


def _summary(dfa) -> dict:
    n_states, n_classes = dfa.transitions.shape
    return {
        "states": n_states,
        "classes": n_classes,
        "table_bytes": 4 * dfa.vocab_size + 4 * n_states * n_classes + n_states,
    }


def _outlines_route(pattern: str, tokenizer) -> tuple[object, float]:
    """The previous ``constraints.regex``: an outlines-core index read into a compressed table."""
    import numpy as np
    from outlines_core import Index, Vocabulary

    from ppl.models.constraints import DEAD, _compress, _never

    eos = tokenizer.eos_token_id
    spellings: dict[bytes, list[int]] = {}
    for token, data in enumerate(tokenizer.vocab_bytes):
        if data and token != eos:  # outlines-core refuses EOS in the vocabulary and adds it itself
            spellings.setdefault(data, []).append(token)
    start = time.perf_counter()
    index = Index(pattern, Vocabulary(eos, spellings))
    index_s = time.perf_counter() - start
    transitions, finals = index.get_transitions(), index.get_final_states()
    ids = {index.get_initial_state(), *finals, *transitions}
    ids.update(nxt for row in transitions.values() for nxt in row.values())
    states = {state: n for n, state in enumerate(sorted(ids))}
    read = sorted({token for row in transitions.values() for token in row if token != eos})
    column = {token: c for c, token in enumerate(read)}
    table = np.full((len(states), len(read) + 1), DEAD)  # the last column: tokens no state reads
    for state, row in transitions.items():
        for token, nxt in row.items():
            if token != eos:
                table[states[state], column[token]] = states[nxt]
    token_class = np.full(tokenizer.vocab_size, len(read))
    token_class[read] = np.arange(len(read))
    accepting = np.zeros(len(states), bool)
    accepting[[states[s] for s in finals]] = True
    dfa = _compress(table, token_class, accepting, states[index.get_initial_state()], eos, _never(tokenizer), pattern)
    return dfa, index_s


def _worker(route: str, pattern: str, gib: float) -> dict:
    from _cpus import pin

    pin(1)
    from ppl.models import constraints, smollm2_path
    from ppl.models.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(smollm2_path())
    if route == "outlines":  # cap the address space at what the process holds now plus ``gib``
        status = Path("/proc/self/status").read_text()
        held = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmSize"))) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (held + int(gib * 2**30),) * 2)
    start = time.perf_counter()
    if route == "ppl":
        dfa = constraints.regex(pattern, tokenizer)
        extra = {}
    else:
        dfa, index_s = _outlines_route(pattern, tokenizer)
        extra = {"index_s": index_s}
    dfa.transitions.block_until_ready()
    seconds = time.perf_counter() - start
    if route == "ppl":
        start = time.perf_counter()
        constraints.regex(pattern, tokenizer).transitions.block_until_ready()
        extra = {"warm_s": time.perf_counter() - start}
    return {"compile_s": seconds, **extra, **_summary(dfa)}


def _run(route: str, name: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", route, "--only", name, "--outlines-gib", str(args.outlines_gib)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"failed": f"timeout>{args.timeout}s"}
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {"failed": f"exit{done.returncode}:{last}".replace(" ", "_")}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per pattern and route")
    parser.add_argument("--outlines-gib", type=float, default=6.0, help="memory the outlines route may add")
    parser.add_argument("--only", nargs="*", default=sorted(CORPUS), choices=sorted(CORPUS))
    parser.add_argument("--routes", nargs="*", default=["ppl", "outlines"], choices=["ppl", "outlines"])
    parser.add_argument("--worker", choices=["ppl", "outlines"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps({**_worker(args.worker, CORPUS[args.only[0]], args.outlines_gib), "peak_rss_mb": _peak_rss_mb()})
        )
        return
    for name in args.only:
        for route in args.routes:
            result = _run(route, name, args)
            print(f"# {name} {route}: {json.dumps(result)}", flush=True)
            for key, value in result.items():
                print(f"RESULT {key}.{route}.{name}={value if isinstance(value, str) else round(value, 3)}", flush=True)


if __name__ == "__main__":
    main()
