"""Every research notebook runs top to bottom (``notebooks/*.ipynb``, one test id each).

A notebook is executed in memory with ``nbclient`` — the stored file is never rewritten — in a
fresh kernel started with *this* interpreter (``sys.executable``), not whatever ``python`` the
``python3`` kernelspec finds on ``PATH``: the notebook must see the same installed ``ppl`` as the
tests. Plots use the non-interactive ``Agg`` backend. A failing cell fails the test with that
cell's source and traceback.

Notebooks are stored with outputs cleared (reviewable diffs, no stale figures); that is checked
too, so a notebook saved after a local run is caught here rather than in review.
"""

from __future__ import annotations

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
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    with_outputs = [
        index
        for index, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not with_outputs, f"{path.name}: clear the outputs of cells {with_outputs} before committing"


def test_notebooks_exist() -> None:
    """Guards the glob: an empty parametrization would otherwise pass silently."""
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"
