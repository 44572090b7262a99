"""``ppl steer``: constrained, reward-guided generation with an LM from a shell (the embedded
SmolLM2 by default; ``--model gemma3`` or ``--model PATH`` for any checkpoint ``ppl.models.load`` reads).

    ppl steer "Describe the sea to a child in one sentence." --max-word-length 5

The prompt goes through the model's chat template; the constraint flags build one
token-level automaton (their intersection), ``--reward`` adds a reward as a likelihood, and
SMC (``ppl.inference.smc``) returns weighted particles and a log-normalising-constant
estimate. Compiled code is kept in JAX's persistent cache (see :mod:`ppl.cache`), so a second
run with the same shapes starts in seconds. This is an application entry point, so unlike the
rest of ``ppl/`` it imports ``ppl.models`` and ``ppl.inference`` (lazily, inside
:func:`main`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from ppl import __version__, cli_scale

EXAMPLES = """\
examples (one per constraint kind; flags combine, their constraints intersect):
  ppl steer "Describe the sea to a child in one sentence." --max-word-length 5
  ppl steer "Write one sentence about a cat." --no-letter e
  ppl steer "When did the Berlin Wall fall? Answer with a date." --regex "[0-9]{4}-[0-9]{2}-[0-9]{2}"
  ppl steer "Describe your day." --reward sentiment --beta 0.2      (needs: pip install 'ppl-jax[scorers]')
  ppl steer "Write a haiku about rain." --no-letter e --json > out.json
  ppl steer "Write one sentence about a cat." --no-letter e --model gemma3
  ppl steer "Name a colour." --model ./Qwen3-0.6B      (a GGUF file or an HF directory)

log Z estimates the log of the probability mass the LM puts on answers that satisfy the
constraints (weighted by the rewards); ESS is how many independent samples the final weighted
particles are worth. Same --seed, same output. Compiled code is cached in $PPL_CACHE_DIR, else
$XDG_CACHE_HOME/ppl-jax/jax (~/.cache/ppl-jax/jax); --cache-dir and --no-cache override it.
"""

EXPLANATION = (
    "log Z: log of the probability mass the LM puts on answers meeting the constraints (times rewards); "
    "ESS: how many independent samples the weighted particles are worth."
)


class _CompileClock:
    """Remembers when the last XLA compilation (or persistent-cache load) finished."""

    def __init__(self) -> None:
        self.last = 0.0
        self.installed = False

    def install(self) -> None:
        import jax

        if not self.installed:
            jax.monitoring.register_event_duration_secs_listener(self)
            self.installed = True

    def __call__(self, event: str, duration_secs: float, **kwargs: Any) -> None:
        if event in ("/jax/core/compile/backend_compile_duration", "/jax/compilation_cache/cache_retrieval_time_sec"):
            self.last = time.perf_counter()


_COMPILE_CLOCK = _CompileClock()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl", description="Probabilistic programs over LM generation.")
    parser.add_argument("--version", action="version", version=f"ppl-jax {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    steer = commands.add_parser(
        "steer",
        help="sample from the LM conditioned on constraints and rewards (SMC)",
        description="Posterior samples of an LM's answer to PROMPT under hard constraints and "
        "rewards, by sequential Monte Carlo.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    steer.add_argument("prompt", help="the user message (the chat template is applied)")
    steer.add_argument(
        "--model",
        default="smollm2",
        metavar="smollm2|gemma3|PATH",
        help="SmolLM2-135M-Instruct (default), Gemma 3 270M, or a GGUF file / HF checkpoint directory",
    )
    steer.add_argument("--particles", type=int, default=16, help="number of SMC particles (default 16)")
    steer.add_argument("--max-tokens", type=int, default=32, help="new-token budget (default 32)")
    steer.add_argument("--no-letter", default="", metavar="LETTERS", help="lipogram: forbid these letters")
    steer.add_argument("--regex", help="the whole answer must match this regular expression (ends with EOS)")
    steer.add_argument("--max-word-length", type=int, help="every word has at most this many letters")
    steer.add_argument("--reward", choices=["sentiment"], help="reward as likelihood: exp(reward / beta)")
    steer.add_argument("--beta", type=float, default=0.1, help="reward temperature (default 0.1)")
    steer.add_argument("--proposal", choices=["locally_optimal", "prior"], default="locally_optimal")
    steer.add_argument(
        "--resampling", choices=["systematic", "stratified", "residual", "multinomial"], default="systematic"
    )
    steer.add_argument("--ess-threshold", type=float, default=0.5, help="resample when ESS < this · N")
    steer.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same output")
    steer.add_argument("--show", type=int, default=3, help="how many distinct particles to print (default 3)")
    steer.add_argument("--raw", action="store_true", help="use the prompt as raw text, no chat template")
    steer.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    steer.add_argument("--cache-dir", help="persistent compilation cache folder (default: see below)")
    steer.add_argument("--no-cache", action="store_true", help="do not read or write compiled code on disk")
    cli_scale.add_parser(commands)
    return parser


def _constraint(args: argparse.Namespace, tokenizer):
    from ppl.models import constraints

    parts = []
    if args.no_letter:
        parts.append(constraints.lipogram(args.no_letter, tokenizer))
    if args.max_word_length is not None:
        parts.append(constraints.max_word_length(args.max_word_length, tokenizer))
    if args.regex is not None:
        parts.append(constraints.regex(args.regex, tokenizer))
    if not parts:
        return None
    combined = parts[0]
    for part in parts[1:]:
        combined = constraints.intersect(combined, part)
    return combined


def _potentials(args: argparse.Namespace, tokenizer) -> list:
    if args.reward is None:
        return []
    from ppl.models import scorers
    from ppl.rewards import exp_reward

    try:
        score = scorers.sentiment(tokenizer)
    except ImportError as error:
        raise SystemExit(f"--reward sentiment needs VADER: pip install 'ppl-jax[scorers]' ({error})") from error
    return [exp_reward(score, args.beta)]


def steer(args: argparse.Namespace, started: float) -> int:
    """Run ``ppl steer``: load the model, build the program, run SMC, print the report."""
    import jax
    import numpy as np

    import ppl
    from ppl.distributions import check_prompt
    from ppl.inference import smc
    from ppl.models import InsufficientMemoryError, check_memory

    if not args.no_cache:
        ppl.enable_compilation_cache(args.cache_dir)
    _COMPILE_CLOCK.install()
    lm, tokenizer = load_model(args.model)
    if not args.raw:
        tokenizer = _ending_turns(tokenizer)
    if args.raw:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    try:  # refuse impossible work before building constraints and compiling, not as an XLA allocation error after
        check_memory(lm, args.particles, check_prompt(np.asarray(prompt), args.max_tokens))
    except InsufficientMemoryError as error:
        raise SystemExit(f"ppl steer: {error} (--particles, --max-tokens)") from None
    constraint = _constraint(args, tokenizer)
    if _too_short(args, constraint):  # known before running: say so without compiling anything
        print(_all_dead_message(args, constraint), file=sys.stderr)
        return 1
    program = ppl.Generation(
        lm,
        np.asarray(prompt, np.int32),
        args.max_tokens,
        tokenizer.eos_token_id,
        constraint=constraint,
        potentials=_potentials(args, tokenizer),
        proposal=args.proposal,
        require_eos=args.regex is not None,
    )

    print("compiling SMC (a later run with the same shapes loads it from the cache) ...", file=sys.stderr)
    steps_per_update = 4
    timing: dict[str, float] = {}
    from tqdm.auto import tqdm

    with tqdm(total=args.max_tokens, unit="step", file=sys.stderr, dynamic_ncols=True, leave=False) as bar:

        def progress(steps: int, ess: Any, finished: Any) -> None:
            if not timing:
                # The first segment's compilation (or cache load) ends just before it runs.
                timing["generating"] = max(_COMPILE_CLOCK.last, started)
                segment_s = time.perf_counter() - timing["generating"]
                timing["first_token"] = timing["generating"] + segment_s / steps_per_update
            bar.update(steps - bar.n)
            bar.set_postfix_str(f"ESS {float(ess):.1f}/{args.particles}, {int(finished)} finished")

        result = _interruptible(
            lambda: jax.block_until_ready(
                smc(
                    program,
                    jax.random.key(args.seed),
                    args.particles,
                    resampling=args.resampling,
                    ess_threshold=args.ess_threshold,
                    progress=progress,
                    progress_every=steps_per_update,
                )
            )
        )
    end = time.perf_counter()
    first, generating = timing.get("first_token", end), timing.get("generating", end)
    report = summarise(args, tokenizer, result, first - started, end - started, end - generating)
    if report["all_dead"]:
        print(_all_dead_message(args, constraint), file=sys.stderr)
    if args.json or not report["all_dead"]:
        print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 1 if report["all_dead"] else 0


def load_model(name: str) -> tuple[Any, Any]:
    """``--model``: ``smollm2``, ``gemma3``, or a path for :func:`ppl.models.load`; a path that
    cannot be loaded exits with the loader's message."""
    from ppl.models import CheckpointError, gemma3, load, smollm2

    named = {"smollm2": ("SmolLM2-135M-Instruct", smollm2), "gemma3": ("Gemma 3 270M", gemma3)}
    title, loader = named.get(name, (name, lambda: load(name)))
    print(f"loading {title} ...", file=sys.stderr)
    try:
        return loader()
    except (CheckpointError, ModuleNotFoundError) as error:
        raise SystemExit(f"ppl steer: --model {name}: {error}") from None


def _ending_turns(tokenizer: Any) -> Any:
    """The tokenizer whose EOS ends a chat answer: Gemma closes a turn with ``<end_of_turn>``
    and keeps ``<eos>`` for the end of a document (other templates end turns with their EOS).
    Constraints read EOS from the tokenizer, so it is swapped there, on a copy."""
    end_of_turn = tokenizer.backend.token_to_id("<end_of_turn>")
    if end_of_turn is None:
        return tokenizer
    tokenizer = copy.copy(tokenizer)
    tokenizer.eos_token_id = end_of_turn
    return tokenizer


def _too_short(args: argparse.Namespace, constraint) -> bool:
    """Whether the budget cannot hold the shortest accepted answer plus EOS (``--regex`` needs EOS)."""
    return constraint is not None and args.regex is not None and constraint.min_tokens + 1 > args.max_tokens


def _all_dead_message(args: argparse.Namespace, constraint) -> str:
    """One line: what was impossible and what to relax (the budget or the constraint)."""
    if _too_short(args, constraint):
        return (
            f"no answer: the shortest text the constraints accept takes {constraint.min_tokens} tokens plus EOS, "
            f"more than --max-tokens {args.max_tokens}; raise --max-tokens to at least {constraint.min_tokens + 1}"
        )
    return (
        f"no answer: all {args.particles} particles violated the constraints within {args.max_tokens} tokens "
        f"(proposal {args.proposal}); relax the constraint or raise --max-tokens"
        + (", or use --proposal locally_optimal" if args.proposal == "prior" else "")
    )


def summarise(args, tokenizer, result, first_token_s: float, total_s: float, generation_s: float) -> dict[str, Any]:
    """The run as plain data: distinct answers with their summed weights, evidence, ESS, timings."""
    import numpy as np

    weights = np.asarray(result.weights, np.float64)
    particles = result.particles
    rows = zip(np.asarray(particles.tokens), np.asarray(particles.length), np.asarray(particles.ended_with_eos))
    merged: dict[tuple[str, bool], dict[str, Any]] = {}
    for (row, length, eos), weight in zip(rows, weights):
        if weight > 0:
            text = tokenizer.decode(row[:length].tolist(), skip_special_tokens=True)
            entry = merged.setdefault(
                (text, bool(eos)), {"text": text, "ended_with_eos": bool(eos), "weight": 0.0, "count": 0}
            )
            entry["weight"] += float(weight)
            entry["count"] += 1
    answers = sorted(merged.values(), key=lambda entry: -entry["weight"])
    steps = int(result.n_steps)
    return {
        "prompt": args.prompt,
        "seed": args.seed,
        "particles": args.particles,
        "answers": answers[: args.show],
        "distinct_answers": len(answers),
        "all_dead": bool(result.all_dead),
        "log_z": float(result.log_z),
        "ess": float(result.ess[max(steps - 1, 0)]),
        "steps": steps,
        "seconds": {"first_token": round(first_token_s, 2), "total": round(total_s, 2)},
        "tokens_per_second": round(args.particles * steps / max(generation_s, 1e-9), 1),
        "version": __version__,
    }


def format_report(report: dict[str, Any]) -> str:
    """The human-readable report: each distinct answer with its weight and how it ended."""
    lines = [f"\nprompt: {report['prompt']!r}"]
    for rank, answer in enumerate(report["answers"], 1):
        ending = "ended with EOS" if answer["ended_with_eos"] else "cut at --max-tokens"
        particles = f"{answer['count']} particle{'s' if answer['count'] != 1 else ''}"
        lines.append(f"\n#{rank}  weight {answer['weight']:.3f}  ({particles}, {ending})")
        lines.append(answer["text"])
    n = report["particles"]
    seconds = report["seconds"]
    lines.append(
        f"\nlog Z {report['log_z']:.2f} | ESS {report['ess']:.1f}/{n} | {report['distinct_answers']} distinct answers"
        f" | {report['steps']} steps, {report['tokens_per_second']:.0f} tokens/s"
        f" | first token {seconds['first_token']:.1f} s, {seconds['total']:.1f} s in all"
    )
    lines.append(EXPLANATION)
    return "\n".join(lines)


def _interruptible(work: Callable[[], Any]) -> Any:
    """``work()`` on a worker thread while the main thread waits in short slices: compiling and
    running an XLA loop do not return to Python until they end, so a Ctrl-C would otherwise wait
    for the whole run."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as error:  # noqa: BLE001 -- handed to the main thread
            outcome["error"] = error

    thread = threading.Thread(target=run, name="ppl-steer", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ppl`` command (``ppl --help``)."""
    started = time.perf_counter()
    args = _parser().parse_args(argv)
    if args.command == "scale":
        work = lambda: _interruptible(lambda: cli_scale.run(args))  # noqa: E731
    else:
        if args.particles < 1:
            raise SystemExit("--particles must be at least 1")
        if args.max_tokens < 1:
            raise SystemExit("--max-tokens must be at least 1")
        work = lambda: steer(args, started)  # noqa: E731
    try:
        return work()
    except KeyboardInterrupt:
        print("\nppl: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # A compiled loop may still be running on the worker thread and cannot be cancelled;
        # leave at once rather than wait for it at interpreter shutdown.
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
