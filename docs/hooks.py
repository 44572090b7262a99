"""MkDocs hook: lay the sources out as installed, for the API reference.

``inference/`` and ``models/`` install as ``ppl.inference`` and ``ppl.models`` (the
``package-dir`` mapping in ``pyproject.toml``), which griffe cannot see in the source tree.
Before the build, ``.docs-src/ppl`` is rebuilt as symlinks: the files of ``ppl/`` plus
``inference`` and ``models`` inside it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MIRROR = ROOT / ".docs-src" / "ppl"


def on_startup(**kwargs) -> None:
    # on_startup runs before any plugin's on_config, where mkdocstrings reads its paths.
    shutil.rmtree(MIRROR.parent, ignore_errors=True)
    MIRROR.mkdir(parents=True)
    for entry in (ROOT / "ppl").iterdir():
        if entry.name != "__pycache__":
            (MIRROR / entry.name).symlink_to(entry)
    for subpackage in ("inference", "models"):
        (MIRROR / subpackage).symlink_to(ROOT / subpackage, target_is_directory=True)
