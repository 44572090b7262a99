"""Fixtures shared by the language tests: the real SmolLM2, loaded once per test process."""

import numpy as np
import pytest

from ppl.models import smollm2


@pytest.fixture(scope="session")
def model():
    """``(lm, tokenizer)`` of the embedded SmolLM2-135M-Instruct (slow tests only: ~15 s to load)."""
    return smollm2()


@pytest.fixture(scope="session")
def weighted_texts():
    """``weighted_texts(tokenizer, result)``: the decoded text of every particle with non-zero weight."""

    def texts(tokenizer, result) -> list[str]:
        weights = np.asarray(result.weights)
        rows = zip(np.asarray(result.particles.tokens), np.asarray(result.particles.length), weights)
        return [tokenizer.decode(row[:n].tolist(), skip_special_tokens=True) for row, n, w in rows if w > 0]

    return texts
