"""Every public name of ``ppl``, ``ppl.inference`` and ``ppl.models`` has a docstring (the API
reference in ``docs/`` is generated from them), and so do the public methods and properties
that their classes define. A NamedTuple's generated ``Name(a, b)`` text does not count."""

import importlib
import inspect

import pytest

PACKAGES = ["ppl", "ppl.inference", "ppl.models"]


def _missing(package: str) -> list[str]:
    module = importlib.import_module(package)
    missing = []
    for name in module.__all__:
        value = getattr(module, name)
        doc = value.__doc__ if inspect.ismodule(value) else inspect.getdoc(value)
        if not doc or (isinstance(value, type) and doc.startswith(f"{name}(")):
            missing.append(name)
        if isinstance(value, type) and value.__module__.startswith("ppl"):
            for attribute, member in vars(value).items():
                public = not attribute.startswith("_") and (callable(member) or isinstance(member, property))
                if public and not inspect.getdoc(getattr(value, attribute)):
                    missing.append(f"{name}.{attribute}")
    return missing


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package):
    assert not _missing(package), f"{package}: add docstrings to {_missing(package)}"
