"""The method contract and registry: a method's name, config, layers and processor.

The built-in methods are registered in one place, :mod:`diffattn.api`, which the package root names as
the loader of the built-ins: the first lookup (:func:`get`, :func:`methods`, :func:`all_methods`) imports
it, so ``import diffattn`` and the CLI's ``--help`` stay light. A third-party method calls :func:`register`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
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
        per_layer: the method takes per-layer settings (``diffattn.apply(..., layers={name: options or
            "dense"})``): ``make_processor`` is then called with each layer's own config, so it must keep
            nothing that depends on the config across layers except through the context.
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
    per_layer: bool = False

    def build_config(self, options: dict[str, Any]) -> Any:
        """The method's config from ``diffattn.apply``'s options (checked: unknown names list the valid ones)."""
        return check_options(self.config, options, f"method {self.name!r}")(**options)

    def layer_configs(self, options: dict[str, Any], layers: Any) -> dict[str, Any]:
        """Each named layer's config from per-layer settings, built and checked before anything is applied.

        Args:
            options: the base options (every layer not named gets them).
            layers: ``{qualified layer name: {option: value} | "dense"}`` (names as in
                ``AttentionPatch.layers``); a layer's options override the base options.

        Returns:
            ``{name: config}``, with :data:`DENSE` for the layers that keep their stock processor.

        Raises:
            TypeError: the method takes no per-layer settings, a malformed mapping, or an unknown option
                (naming the layer and listing the valid options).
            ValueError: an invalid value (naming the layer).
        """
        if not self.per_layer:
            able = [m.name for m in all_methods() if m.per_layer]
            raise TypeError(f"method {self.name!r} takes no per-layer settings (layers=); methods that do: {able}")
        if not isinstance(layers, Mapping):
            raise TypeError(f"layers must be a mapping {{layer name: options dict or {DENSE!r}}}, got {type(layers).__name__}")
        out: dict[str, Any] = {}
        for name, setting in layers.items():
            if not isinstance(name, str):
                raise TypeError(f"layers: names must be strings (as in AttentionPatch.layers), got {name!r}")
            if setting == DENSE:
                out[name] = DENSE
                continue
            if not isinstance(setting, Mapping):
                raise TypeError(f"layers[{name!r}] must be an options dict or {DENSE!r}, got {setting!r}")
            try:
                out[name] = check_options(self.config, dict(setting), f"method {self.name!r} in layers[{name!r}]")(
                    **{**options, **setting}
                )
            except ValueError as e:
                raise ValueError(f"layers[{name!r}] of method {self.name!r}: {e}") from e
        return out


DENSE = "dense"  # a per-layer setting: the layer keeps its stock processor
RESERVED_OPTIONS = ("layers", "preset")  # apply's own arguments: no method config may have these fields


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


def config_from(config_cls: type, config: Any, options: dict[str, Any], owner: str) -> Any:
    """A processor's config from what its caller passed: ``config``, ``**options``, or both (the options
    then override fields of ``config``).

    Raises:
        TypeError: an unknown option (the valid ones listed), or a ``config`` of another class.
    """
    check_options(config_cls, options, owner)
    if config is None:
        return config_cls(**options)
    if not isinstance(config, config_cls):
        raise TypeError(f"config of {owner} must be a {config_cls.__name__}, got {type(config).__name__}")
    return dataclasses.replace(config, **options) if options else config


_METHODS: dict[str, Method] = {}
_builtin_loader: Callable[[], Any] | None = None


def set_builtin_loader(loader: Callable[[], Any]) -> None:
    """Name what registers the built-in methods (the package root passes the import of ``diffattn.api``);
    it runs once, at the first lookup."""
    global _builtin_loader
    _builtin_loader = loader


def _load_builtins() -> None:
    global _builtin_loader
    if _builtin_loader is not None:
        loader, _builtin_loader = _builtin_loader, None
        loader()


def register(method: Method) -> Method:
    """Add ``method`` to the registry so ``diffattn.apply(pipe, method.name)`` finds it.

    Raises:
        ValueError: a method of that name is already registered.
        TypeError: ``method.config`` is not a dataclass.
    """
    if method.name in _METHODS:
        raise ValueError(f"method {method.name!r} is already registered")
    if not dataclasses.is_dataclass(method.config):
        raise TypeError(f"config of method {method.name!r} must be a dataclass")
    taken = sorted({f.name for f in dataclasses.fields(method.config)} & set(RESERVED_OPTIONS))
    if taken:
        raise ValueError(f"config of method {method.name!r} has field(s) {taken}, reserved for diffattn.apply")
    _METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method ``name``.

    Raises:
        ValueError: an unknown name (the message lists the registered ones).
    """
    _load_builtins()
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available methods: {methods()}")
    return _METHODS[name]


def methods() -> list[str]:
    """Names of the registered methods."""
    _load_builtins()
    return sorted(_METHODS)


def all_methods() -> list[Method]:
    """Every registered method, sorted by name."""
    _load_builtins()
    return [_METHODS[n] for n in sorted(_METHODS)]
