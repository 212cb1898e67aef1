"""diffattn: sparse, linear and regional attention for diffusers pipelines.

    import diffattn
    patch = diffattn.apply(pipe, "dense")
    ...
    diffattn.restore(pipe)          # or patch.remove(), or `with diffattn.apply(...):`

The names below are imported on first use, so ``import diffattn`` (and ``diffattn --help``) does not pay
for importing diffusers.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import registry as _registry

__version__ = "0.1.0"

# the built-in methods are registered by diffattn.api; the first registry lookup imports it
_registry.set_builtin_loader(lambda: importlib.import_module(".api", __name__))

_EXPORTS = {
    "AttentionContext": "context",
    "AttentionPatch": "api",
    "CalibrationError": "calibration",
    "CalibrationPreset": "presets",
    "CalibrationResult": "calibration",
    "Method": "registry",
    "PatchGroup": "api",
    "Quality": "calibration",
    "Speed": "calibration",
    "applied": "api",
    "apply": "api",
    "calibrate": "calibration",
    "methods": "registry",
    "register": "registry",
    "restore": "api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    try:  # `import diffattn; diffattn.zoo` works for submodules as with eager imports
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
