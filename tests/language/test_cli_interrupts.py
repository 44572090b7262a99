"""Interrupts and failing callbacks: Ctrl-C during ``ppl steer`` exits at once with one line
and code 130, and a progress callback that raises surfaces as an error instead of a hang."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time

import jax
import pytest

from ppl.cli import _interruptible
from ppl.inference import smc
from ppl.models.toy import abc_bigram


def test_ctrl_c_reaches_the_main_thread_while_work_runs():
    """``_interruptible`` waits in 0.1 s slices, so SIGINT is handled within ~0.1 s even though
    the work (here a sleep, standing in for a compiled XLA loop) does not return to Python."""
    timer = threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,))
    start = time.perf_counter()
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        _interruptible(lambda: time.sleep(5))
    assert time.perf_counter() - start < 1.5
    assert _interruptible(lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        _interruptible(lambda: 1 / 0)


def test_progress_callback_that_raises_surfaces_promptly():
    program = abc_bigram(5).program()
    calls = []

    def progress(t, ess, n_finished):
        calls.append(time.perf_counter())
        if len(calls) == 2:
            raise RuntimeError("progress bar broke")

    with pytest.raises(Exception, match="progress bar broke"):
        jax.block_until_ready(smc(program, jax.random.key(0), 8, progress=progress))
    assert len(calls) == 2  # no step ran its callback after the failure
    assert time.perf_counter() - calls[1] < 5


@pytest.mark.slow
@pytest.mark.heavy
def test_ctrl_c_during_steer_exits_130_with_one_line():
    """A real ``ppl steer`` subprocess (SmolLM2 load, compilation, a long generation) gets SIGINT
    once generation has started."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ppl.cli", "steer", "Write a long story.", "--particles", "4", "--max-tokens", "400"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    stderr = b""
    deadline = time.monotonic() + 400
    try:
        while b"generating" not in stderr and b"compiling" not in stderr:
            assert time.monotonic() < deadline and process.poll() is None, stderr.decode()[-2000:]
            if select.select([process.stderr], [], [], 1.0)[0]:
                stderr += os.read(process.stderr.fileno(), 65536)
        time.sleep(2)  # well inside compilation or the generation loop
        sent = time.monotonic()
        process.send_signal(signal.SIGINT)
        _, rest = process.communicate(timeout=30)
        seconds = time.monotonic() - sent
    finally:
        process.kill()
    stderr = (stderr + rest).decode()
    print(f"\nSIGINT -> exit {process.returncode} after {seconds:.2f} s")
    assert process.returncode == 130
    assert stderr.rstrip().splitlines()[-1] == "ppl: interrupted"
    assert "Traceback" not in stderr
    assert seconds < 5
