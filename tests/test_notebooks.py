"""Every research notebook runs top to bottom (``notebooks/*.ipynb``, one test id each).

A notebook is executed in memory with ``nbclient`` — the stored file is never rewritten — in a
fresh kernel started with *this* interpreter (``sys.executable``), not whatever ``python`` the
``python3`` kernelspec finds on ``PATH``: the notebook must see the same installed ``ppl`` as the
tests. Plots use the non-interactive ``Agg`` backend. A failing cell fails the test with that
cell's source and traceback.

Notebooks are stored *with* their outputs, so they show their figures where they are browsed
(a code-hosting page, the documentation site): every code cell executed in order, no error
output, at least one figure, each figure a small PNG. Re-executing them here checks only that
they still run; the new outputs may differ and are not compared. To refresh a notebook:
``MPLBACKEND=Agg jupyter nbconvert --execute --to notebook --inplace notebooks/NAME.ipynb``.
"""

from __future__ import annotations

import base64
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
MAX_PNG_BYTES = 150_000  # figures at ~70 dpi are 20-80 kB; a larger one bloats the repository
CELL_TIMEOUT_S = 300  # per cell; the notebooks are sized to finish in well under a minute in all
STARTUP_TIMEOUT_S = 120  # kernel start-up on a loaded CI machine


class _ThisInterpreterSpecs(KernelSpecManager):
    """Resolves every kernel name to an ipykernel run by the interpreter running pytest."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python 3 ({sys.executable})",
            language="python",
        )


# Notebooks that load the real SmolLM2 take minutes on 2 cores: CI runs them in its slow step.
_RUNS = [
    pytest.param(path, id=path.name, marks=[pytest.mark.slow] if not path.name.startswith("01_") else [])
    for path in NOTEBOOKS
]


@pytest.mark.parametrize("path", _RUNS)
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The kernel inherits this process's environment: no GUI backend, and no GPU preallocation
    # surprises if a notebook is run on a machine that has one.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    notebook = nbformat.read(path, as_version=4)
    kernel_manager = KernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreterSpecs())
    client = NotebookClient(
        notebook,
        km=kernel_manager,
        timeout=CELL_TIMEOUT_S,
        startup_timeout=STARTUP_TIMEOUT_S,
        # Run from the notebook's folder, as a user opening it in Jupyter would.
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as error:
        # The message already holds the failing cell's source and the kernel's traceback.
        pytest.fail(f"{path.name} failed:\n{error}", pytrace=False)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_with_outputs(path: Path) -> None:
    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: run every cell in order, top to bottom, then save"
    outputs = [output for cell in code for output in cell.outputs]
    errors = [output.get("ename") for output in outputs if output.output_type == "error"]
    assert not errors, f"{path.name} is stored with errors: {errors}"
    pngs = [base64.b64decode(output.data["image/png"]) for output in outputs if "image/png" in output.get("data", {})]
    assert pngs, f"{path.name} is stored without a figure"
    sizes = [len(png) for png in pngs]
    assert max(sizes) <= MAX_PNG_BYTES, f"{path.name}: figures of {sizes} bytes; save them smaller (dpi ~70)"


def test_notebooks_exist() -> None:
    """Guards the glob: an empty parametrization would otherwise pass silently."""
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
