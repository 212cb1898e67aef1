"""The method registry: each method file registers its name, config, layers and processor here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn

from .context import AttentionContext


@dataclass(frozen=True)
class LayerInfo:
    """One attention layer of a denoiser, as ``apply`` sees it."""

    name: str  # qualified module name inside the denoiser
    module: nn.Module
    family: str  # stock processor family ("sd", "flux", "wan", ...)
    model: str  # denoiser class name
    is_cross: bool  # keys come from text / image-prompt states only


@dataclass(frozen=True)
class Method:
    """A registered method.

    Attributes:
        name: what users pass to ``diffattn.apply``.
        config: frozen dataclass of the method's options; validates in ``__post_init__``.
        families: stock processor families the method knows how to change.
        make_processor: ``(config, context, layer) -> processor | None``; ``None`` leaves the layer's
            processor untouched.
        models: denoiser class names the method supports, for error messages; empty means any model
            whose layers belong to ``families``.
        description: one line for ``diffattn methods``.
        block_mask: optional ``(config, grid, n_text, text_position, block_size) -> BlockMask`` for a
            single attention shape; drives ``diffattn mask`` and, through the engine, ``diffattn bench``.
        token_density: optional ``(config, grid, n_text, text_position, block_size) -> float``: the exact
            fraction of (query, key) pairs kept, when it differs from the block density;
            ``diffattn mask`` prints it.
        attention: optional ``(config, grid, n_text, text_position) -> fn(q, k, v)`` for methods that are
            not block-sparse (agent attention); ``diffattn bench`` times it against dense SDPA.
    """

    name: str
    config: type
    families: tuple[str, ...]
    make_processor: Callable[[Any, AttentionContext, LayerInfo], Any]
    models: tuple[str, ...] = ()
    description: str = ""
    block_mask: Callable[..., Any] | None = None
    token_density: Callable[..., float] | None = None
    attention: Callable[..., Any] | None = None

    def build_config(self, options: dict[str, Any]) -> Any:
        return check_options(self.config, options, f"method {self.name!r}")(**options)


def check_options(config_cls: type, options: dict[str, Any], owner: str) -> type:
    """``config_cls`` after checking that every key of ``options`` is one of its fields.

    Raises:
        TypeError: naming the unknown options and listing the valid ones.
    """
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for {owner}; valid options: {valid}")
    return config_cls


_METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if not dataclasses.is_dataclass(method.config):
        raise TypeError(f"config of method {method.name!r} must be a dataclass")
    _METHODS[method.name] = method
    return method


def _load_builtin_methods() -> None:
    # importing the processors package runs each method file's register() call
    from . import processors  # noqa: F401


def get(name: str) -> Method:
    _load_builtin_methods()
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {methods()}")
    return _METHODS[name]


def methods() -> list[str]:
    """Names of the registered methods."""
    _load_builtin_methods()
    return sorted(_METHODS)


def all_methods() -> list[Method]:
    _load_builtin_methods()
    return [_METHODS[n] for n in sorted(_METHODS)]
