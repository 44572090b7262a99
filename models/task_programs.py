"""Generation programs for a problem set of :mod:`ppl.models.tasks`, one compiled program for all.

    suite = TaskPrograms.build(problems, lm, tokenizer, verifier=tasks.step_verdicts)
    result = ppl.inference.search.search(suite.program(3), key, 16, "particle_filter")
    suite.texts(result.smc.particles)

Each problem's program generates the solution with SmolLM2 (or any LM with a tokenizer): steps
are lines (chunk steps ending at a newline), the solution format
(:data:`ppl.models.tasks.SOLUTION_PATTERN`) is a regex constraint sampled with the locally
optimal proposal and finished by EOS, and the process reward
(:func:`ppl.models.process_rewards.verifier_reward`) is the first potential. Prompts are
left-padded with newlines to one length and the reward's problem index is an array, so
switching problem changes data, never shapes: the set compiles once per algorithm and budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

import ppl
from ppl.distributions import check_prompt
from ppl.models import tasks
from ppl.models.constraints import delimiter_tokens, regex
from ppl.models.process_rewards import Verifier, VerifierReward, verifier_reward


def padded_prompts(problems: Sequence[tasks.Problem], tokenizer: Any) -> np.ndarray:
    """``[n, P]``: every problem's few-shot prompt, left-padded with newline tokens to one length."""
    encoded = [tokenizer.encode(tasks.few_shot_prompt(p)) for p in problems]
    pad = tokenizer.encode("\n")[-1]
    width = max(len(ids) for ids in encoded)
    return np.array([[pad] * (width - len(ids)) + list(ids) for ids in encoded], np.int32)


@dataclass(frozen=True)
class TaskPrograms:
    """The program of every problem of a set (``prompts``: ``[n, P]`` token ids); build it
    with :meth:`build`."""

    template: ppl.Generation
    reward: VerifierReward
    prompts: np.ndarray
    weighting: str
    decode: Any

    @classmethod
    def build(
        cls,
        problems: Sequence[tasks.Problem],
        lm: Any,
        tokenizer: Any,
        *,
        verifier: Verifier = tasks.step_verdicts,
        weighting: str = "product",
        max_new_tokens: int = 64,
        max_len: int | None = None,
        **reward_options: Any,
    ) -> TaskPrograms:
        """Programs for ``problems``; ``reward_options`` go to ``verifier_reward`` (aggregate,
        link, temperature, floor), ``weighting`` to ``ppl.rewards.incremental``. ``max_len``
        (the KV-cache buffer) defaults to what the longest prompt and the budget need; a
        prompt that does not fit it is a ``ValueError``."""
        if not problems:
            raise ValueError("the problem set is empty")
        reward = verifier_reward(tuple(problems), verifier, tokenizer.decode, **reward_options)
        prompts = padded_prompts(problems, tokenizer)
        check_prompt(prompts[0], max_new_tokens, max_len)  # before compiling the constraint
        template = ppl.Generation(
            lm,
            jnp.asarray(prompts[0]),
            max_new_tokens,
            tokenizer.eos_token_id,
            constraint=regex(tasks.SOLUTION_PATTERN, tokenizer),
            potentials=[ppl.rewards.incremental(reward, weighting)],
            proposal="locally_optimal",
            require_eos=True,
            delimiter=delimiter_tokens(tasks.STEP_DELIMITER, tokenizer),
            step="chunk",
            max_len=max_len,
        )
        return cls(template, reward, prompts, weighting, tokenizer.decode)

    def program(self, index: int) -> ppl.Generation:
        """Problem ``index``'s program (same shapes as every other's)."""
        potential = ppl.rewards.incremental(self.reward.for_problem(index), self.weighting)
        program = eqx.tree_at(lambda p: p.prompt, self.template, jnp.asarray(self.prompts[index]))
        return eqx.tree_at(lambda p: p.potentials, program, (potential,))

    def texts(self, particles: Any) -> list[str]:
        """Each particle's generated text."""
        tokens, lengths = np.asarray(particles.tokens), np.asarray(particles.length)
        return [self.decode(row[:n].tolist()) for row, n in zip(tokens, lengths)]


__all__ = ["TaskPrograms", "padded_prompts"]
