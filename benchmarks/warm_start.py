"""Cold and warm start of the README's first command, as a user runs it.

    python benchmarks/warm_start.py [--runs 2]

Each run is a fresh ``ppl steer ... --json`` process sharing one new, empty compilation-cache
folder: run 1 compiles and fills it (cold), later runs load from it (warm). Wall time is
measured here, around the whole process (interpreter start and imports included). The first
token is the moment the compiled SMC starts plus one step's share of its run time; the process
reports its own timings relative to its ``main()``, and the difference between our wall
clock and its total is the start-up that precedes ``main()``.

Prints ``RESULT name=value`` lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMAND = ["steer", "Describe the sea to a child in one sentence.", "--max-word-length", "5"]


def run_once(cache: Path) -> dict:
    ppl = Path(sys.executable).with_name("ppl")
    start = time.perf_counter()
    done = subprocess.run([str(ppl), *COMMAND, "--json", "--cache-dir", str(cache)], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"ppl steer failed:\n{done.stderr}")
    report = json.loads(done.stdout)
    startup = wall - report["seconds"]["total"]
    return {"wall": wall, "first_token": startup + report["seconds"]["first_token"], "report": report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="ppl-warm-start-"))
    try:
        for index in range(args.runs):
            run = run_once(cache)
            name = "cold" if index == 0 else f"warm{index}"
            answer = run["report"]["answers"][0]["text"] if run["report"]["answers"] else ""
            print(f"# {name}: {answer!r}", flush=True)
            print(f"RESULT {name}_wall_s={run['wall']:.2f}")
            print(f"RESULT {name}_first_token_s={run['first_token']:.2f}", flush=True)
    finally:
        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
