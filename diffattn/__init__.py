"""diffattn: sparse, linear and regional attention for diffusers pipelines.

    import diffattn
    patch = diffattn.apply(pipe, "dense")
    ...
    diffattn.restore(pipe)          # or patch.remove(), or `with diffattn.apply(...):`
"""

from .api import AttentionPatch, applied, apply, restore
from .context import AttentionContext
from .registry import Method, methods, register

__version__ = "0.1.0"

__all__ = [
    "AttentionContext",
    "AttentionPatch",
    "Method",
    "applied",
    "apply",
    "methods",
    "register",
    "restore",
]
