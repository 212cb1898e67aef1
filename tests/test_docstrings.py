"""Every public function and class of the documented packages has a docstring (the API reference is built
from them by mkdocstrings)."""

from __future__ import annotations

import importlib
import inspect

import pytest

PACKAGES = [
    "diffattn",
    "diffattn.ops",
    "diffattn.masks",
    "diffattn.models",
    "diffattn.processors",
    "diffattn.pipelines",
    "diffattn.lora",
    "diffattn.loading",
]


def _own_doc(obj: object) -> str:
    if inspect.isclass(obj):
        doc = obj.__dict__.get("__doc__") or ""
        # dataclasses write "Name(field, ...)" when a class has no docstring of its own
        return "" if doc.startswith(f"{obj.__name__}(") else doc
    return getattr(obj, "__doc__", None) or ""


def _public(package: str) -> list[tuple[str, object]]:
    module = importlib.import_module(package)
    names = getattr(module, "__all__", None)
    assert names, f"{package} has no __all__"
    return [(n, getattr(module, n)) for n in names]


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_have_docstrings(package: str) -> None:
    missing = [
        f"{package}.{name}"
        for name, obj in _public(package)
        if (inspect.isclass(obj) or inspect.isfunction(obj)) and not _own_doc(obj).strip()
    ]
    assert missing == []


@pytest.mark.parametrize("package", PACKAGES)
def test_public_methods_have_docstrings(package: str) -> None:
    missing = []
    for name, obj in _public(package):
        if not inspect.isclass(obj) or obj.__module__.split(".")[0] != "diffattn":
            continue
        for attr, member in vars(obj).items():
            if attr.startswith("_") or not inspect.isfunction(member):
                continue
            # an override documented by the base class it overrides is fine
            inherited = any(getattr(getattr(base, attr, None), "__doc__", None) for base in obj.__mro__[1:])
            if not (member.__doc__ or "").strip() and not inherited:
                missing.append(f"{package}.{name}.{attr}")
    assert missing == []
