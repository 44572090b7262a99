"""Regex constraint compilation: ppl's byte-DFA route against outlines-core, on realistic patterns.

For each pattern of the corpus (exact lengths and counts, word lists, dates, JSON-schema
regexes from outlines-core's own converter, negated classes, Unicode), each route compiles
for SmolLM2's real vocabulary (49152 tokens) in a fresh process pinned to one core:

- ``ppl``: ``constraints.regex`` — parse, byte-level DFA, minimise, trie walk of the
  vocabulary, token classes (a ``TokenDFA`` on device);
- ``outlines``: ``outlines_core.Index(pattern, Vocabulary)`` — only the index, which is the
  part the previous ``constraints.regex`` spent its time in (its table conversion came after).

Reported per pattern and route: compile seconds (imports and tokenizer loading excluded), peak
RSS of the process, byte-DFA states, token-DFA states, token classes and on-device table bytes
(``token_class`` + ``transitions`` int32, ``accepting`` bool). outlines-core runs under a memory
cap (``--outlines-gib``) and a time limit (``--timeout``), since on some of these patterns it
runs for minutes and then aborts the process on allocation.

    python benchmarks/constraint_compile.py [--timeout 60] [--outlines-gib 6] [--only NAME ...]

``RESULT`` lines: ``compile_s.<route>.<name>``, ``peak_rss_mb.<route>.<name>``, and for ppl
``states.ppl.<name>``, ``classes.ppl.<name>``, ``table_bytes.ppl.<name>``; a run that fails
prints ``failed.<route>.<name>=<why>``.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from outlines_core.json_schema import build_regex_from_schema

_PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0},
    "role": {"enum": ["admin", "editor", "viewer"]}}, "required": ["name", "age", "role"]}
_EVENT = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "date": {"type": "string", "format": "date"},
    "attendees": {"type": "array", "items": {"type": "string", "maxLength": 15}, "maxItems": 3}},
    "required": ["title", "date"]}
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
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _worker_ppl(pattern: str) -> dict:
    from _cpus import pin
    pin(1)
    from ppl.models import constraints, smollm2_path
    from ppl.models.regex_dfa import compile_regex
    from ppl.models.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(smollm2_path())
    start = time.perf_counter()
    dfa = constraints.regex(pattern, tokenizer)
    dfa.transitions.block_until_ready()
    seconds = time.perf_counter() - start
    n_states, n_classes = dfa.transitions.shape
    return {"compile_s": seconds, "byte_states": len(compile_regex(pattern).table), "states": n_states,
            "classes": n_classes, "table_bytes": 4 * dfa.vocab_size + 4 * n_states * n_classes + n_states}


def _worker_outlines(pattern: str, vocab_file: str, gib: float) -> dict:
    from _cpus import pin
    pin(1)
    resource.setrlimit(resource.RLIMIT_AS, (int(gib * 2**30), int(gib * 2**30)))
    from outlines_core import Index, Vocabulary
    eos, spellings = pickle.loads(Path(vocab_file).read_bytes())
    start = time.perf_counter()
    index = Index(pattern, Vocabulary(eos, spellings))
    seconds = time.perf_counter() - start
    return {"compile_s": seconds, "states": len(index.get_transitions()) + len(index.get_final_states())}


def _vocab_file(directory: str) -> str:
    """The vocabulary as outlines-core wants it (bytes → ids, EOS apart), pickled for the workers."""
    from ppl.models import smollm2_path
    from ppl.models.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_gguf(smollm2_path())
    spellings: dict[bytes, list[int]] = {}
    for token, data in enumerate(tokenizer.vocab_bytes):
        if data and token != tokenizer.eos_token_id:
            spellings.setdefault(data, []).append(token)
    path = Path(directory) / "vocab.pkl"
    path.write_bytes(pickle.dumps((tokenizer.eos_token_id, spellings)))
    return str(path)


def _run(route: str, name: str, vocab: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, __file__, "--worker", route, "--only", name, "--vocab", vocab,
               "--outlines-gib", str(args.outlines_gib)]
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
    parser.add_argument("--outlines-gib", type=float, default=6.0, help="address-space cap for outlines-core")
    parser.add_argument("--only", nargs="*", default=sorted(CORPUS), choices=sorted(CORPUS))
    parser.add_argument("--routes", nargs="*", default=["ppl", "outlines"], choices=["ppl", "outlines"])
    parser.add_argument("--worker", choices=["ppl", "outlines"], help=argparse.SUPPRESS)
    parser.add_argument("--vocab", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        pattern = CORPUS[args.only[0]]
        result = (_worker_ppl(pattern) if args.worker == "ppl"
                  else _worker_outlines(pattern, args.vocab, args.outlines_gib))
        print(json.dumps({**result, "peak_rss_mb": _peak_rss_mb()}))
        return
    with tempfile.TemporaryDirectory() as directory:
        vocab = _vocab_file(directory)
        for name in args.only:
            for route in args.routes:
                result = _run(route, name, vocab, args)
                print(f"# {name} {route}: {json.dumps(result)}", flush=True)
                for key, value in result.items():
                    if key != "byte_states":
                        print(f"RESULT {key}.{route}.{name}={value if isinstance(value, str) else round(value, 3)}",
                              flush=True)


if __name__ == "__main__":
    main()
