"""``ppl steer``: constrained, reward-guided generation with the embedded SmolLM2 from a shell.

    ppl steer "Write a short story about a cat." --no-letter e --particles 32 --max-tokens 48

The prompt goes through the model's chat template; the constraint flags build one
token-level automaton (their intersection), ``--reward`` adds a reward as a likelihood, and
SMC (``ppl.inference.smc``) returns weighted particles and a log-normalising-constant
estimate. This is an application entry point, so unlike the rest of ``ppl/`` it imports
``ppl.models`` and ``ppl.inference`` (lazily, inside :func:`main`).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ppl", description="Probabilistic programs over LM generation.")
    commands = parser.add_subparsers(dest="command", required=True)
    steer = commands.add_parser(
        "steer",
        help="sample from the LM conditioned on constraints and rewards (SMC)",
        description="Posterior samples of SmolLM2-135M-Instruct's answer to PROMPT under hard "
        "constraints and rewards, by sequential Monte Carlo.",
    )
    steer.add_argument("prompt", help="the user message (the chat template is applied)")
    steer.add_argument("--particles", type=int, default=32, help="number of SMC particles (default 32)")
    steer.add_argument("--max-tokens", type=int, default=48, help="new-token budget (default 48)")
    steer.add_argument("--no-letter", default="", metavar="LETTERS", help="lipogram: forbid these letters")
    steer.add_argument("--regex", help="the whole answer must match this regular expression")
    steer.add_argument("--max-word-length", type=int, help="every word has at most this many letters")
    steer.add_argument("--reward", choices=["sentiment"], help="reward as likelihood: exp(reward / beta)")
    steer.add_argument("--beta", type=float, default=0.1, help="reward temperature (default 0.1)")
    steer.add_argument("--proposal", choices=["locally_optimal", "prior"], default="locally_optimal")
    steer.add_argument("--resampling", choices=["systematic", "stratified", "residual", "multinomial"], default="systematic")
    steer.add_argument("--ess-threshold", type=float, default=0.5)
    steer.add_argument("--seed", type=int, default=0)
    steer.add_argument("--show", type=int, default=3, help="how many distinct particles to print")
    steer.add_argument("--raw", action="store_true", help="use the prompt as raw text, no chat template")
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


def steer(args: argparse.Namespace) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    import ppl
    from ppl.distributions import check_prompt
    from ppl.inference import smc
    from ppl.models import InsufficientMemoryError, check_memory, smollm2

    start = time.perf_counter()
    print("loading SmolLM2-135M-Instruct ...", file=sys.stderr)
    lm, tokenizer = smollm2()
    if args.raw:
        prompt = tokenizer.encode(args.prompt)
    else:
        prompt = tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    try:  # refuse impossible work before building constraints and compiling, not as an XLA allocation error after
        check_memory(lm, args.particles, check_prompt(np.asarray(prompt), args.max_tokens))
    except InsufficientMemoryError as error:
        raise SystemExit(f"ppl steer: {error} (--particles, --max-tokens)") from None
    constraint = _constraint(args, tokenizer)
    program = ppl.Generation(
        lm, np.asarray(prompt, np.int32), args.max_tokens, tokenizer.eos_token_id,
        constraint=constraint, potentials=_potentials(args, tokenizer), proposal=args.proposal,
        require_eos=args.regex is not None,
    )

    bar = tqdm(total=args.max_tokens, desc="compiling", unit="tok", file=sys.stderr, leave=False)
    first_step: list[float] = []

    def progress(t, ess, n_finished):
        if not first_step:
            first_step.append(time.perf_counter())
            bar.set_description("generating")
        bar.update(1)
        bar.set_postfix(ess=f"{float(ess):.1f}", finished=f"{int(n_finished)}/{args.particles}")

    result = _interruptible(lambda: jax.block_until_ready(smc(
        program, jax.random.key(args.seed), args.particles, resampling=args.resampling,
        ess_threshold=args.ess_threshold, progress=progress,
    )))
    end = time.perf_counter()
    bar.close()
    _report(args, tokenizer, result, end - (first_step[0] if first_step else start), end - start)
    return 0


def _report(args, tokenizer, result, generation_seconds: float, total_seconds: float) -> None:
    import numpy as np

    weights = np.asarray(result.weights, np.float64)
    tokens, lengths = np.asarray(result.particles.tokens), np.asarray(result.particles.length)
    merged: dict[str, float] = {}
    for row, length, weight in zip(tokens, lengths, weights):
        if weight > 0:
            text = tokenizer.decode(row[:length].tolist(), skip_special_tokens=True)
            merged[text] = merged.get(text, 0.0) + weight
    steps = int(result.n_steps)
    print(f"\nprompt: {args.prompt!r}")
    if bool(result.all_dead):
        print("every particle was killed: no continuation satisfies the constraints (log Z = -inf)")
    for rank, (text, weight) in enumerate(sorted(merged.items(), key=lambda item: -item[1])[: args.show], 1):
        print(f"\n#{rank}  weight {weight:.3f}\n{text}")
    print(
        f"\nlog Z estimate {float(result.log_z):.3f} | final ESS {float(result.ess[steps - 1]):.1f}/{args.particles}"
        f" | {steps} steps, {args.particles * steps / generation_seconds:.0f} tokens/s"
        f" | {total_seconds:.1f} s in all (loading and compiling included)"
    )


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
    args = _parser().parse_args(argv)
    if args.particles < 1:
        raise SystemExit("--particles must be at least 1")
    try:
        return steer(args)
    except KeyboardInterrupt:
        print("\nppl: interrupted", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # A compiled loop may still be running on the worker thread and cannot be cancelled;
        # leave at once rather than wait for it at interpreter shutdown.
        os._exit(130)


if __name__ == "__main__":
    sys.exit(main())
