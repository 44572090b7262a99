"""Shared test configuration.

``PPL_CHECK_LEAKS=1 pytest ...`` runs every test inside ``jax.checking_leaks()`` (CI does this
once for the inference tests): a tracer that escapes a transformation is an error.

``PPL_X64=1 pytest ...`` runs with ``jax_enable_x64`` on, to show nothing silently depends on
32-bit defaults.

Property-based tests use the ``ppl`` hypothesis profile: derandomised (the same examples on
every run), a bounded number of examples, no per-example deadline (the first example of a
jitted property pays its compilation).
"""

import os

import jax
import pytest
from hypothesis import HealthCheck, settings

if os.environ.get("PPL_X64") == "1":
    jax.config.update("jax_enable_x64", True)

settings.register_profile(
    "ppl",
    derandomize=True,
    max_examples=50,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ppl")


@pytest.fixture(autouse=True)
def _maybe_check_leaks(request):
    # The leak checker bypasses JAX's compilation caches, so tests that count compilations
    # run without it.
    if os.environ.get("PPL_CHECK_LEAKS") == "1" and "compile_counter" not in request.fixturenames:
        with jax.checking_leaks():
            yield
    else:
        yield


class CompileCounter:
    """Counts XLA backend compilations while active (via ``jax.monitoring``)."""

    def __init__(self):
        self.count = 0
        self.active = False

    def __call__(self, event, duration_secs, **kwargs):
        if self.active and event == "/jax/core/compile/backend_compile_duration":
            self.count += 1


_COUNTER = CompileCounter()
jax.monitoring.register_event_duration_secs_listener(_COUNTER)


@pytest.fixture
def compile_counter():
    _COUNTER.count, _COUNTER.active = 0, True
    yield _COUNTER
    _COUNTER.active = False
