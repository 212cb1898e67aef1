"""``diffattn.apply`` / ``diffattn.restore``: set a method's processors on a pipeline and take them back.

``apply`` validates everything before it touches the model, so a failed call leaves the pipeline as
it was. ``restore`` puts back the very processor objects that were there and removes only the hooks
``apply`` installed (model CPU offload, caching and other diffusers hooks are left alone), so the
restored pipeline gives bit-identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from . import registry
from .context import AttentionContext, ContextHook
from .registry import LayerInfo

# pipeline components that denoise; ControlNets, VAEs and text encoders keep their attention
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")
_MARK = "_diffattn_patch"


def _is_pipeline(obj: Any) -> bool:
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DiffusionPipeline)


def denoisers(pipe_or_model: Any) -> list[tuple[str, nn.Module]]:
    """The denoising models of a pipeline (or the bare model itself)."""
    if _is_pipeline(pipe_or_model):
        found = [(n, getattr(pipe_or_model, n, None)) for n in DENOISER_COMPONENTS]
        found = [(n, m) for n, m in found if isinstance(m, nn.Module)]
        if not found:
            raise ValueError(
                f"{type(pipe_or_model).__name__} has no denoiser component (looked for {list(DENOISER_COMPONENTS)})"
            )
        return found
    if isinstance(pipe_or_model, nn.Module):
        return [(type(pipe_or_model).__name__, pipe_or_model)]
    raise TypeError(
        f"expected a diffusers pipeline or a torch.nn.Module denoiser, got {type(pipe_or_model).__name__}"
    )


def _attention_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from .processors.core import attention_modules

    return list(attention_modules(model).items())


def _is_cross(module: nn.Module) -> bool:
    return bool(getattr(module, "is_cross_attention", False)) or getattr(
        module, "cross_attention_dim_head", None
    ) is not None


def _set(module: nn.Module, processor: Any) -> None:
    if callable(getattr(module, "set_processor", None)):
        module.set_processor(processor)
    else:  # MochiAttention keeps a plain attribute
        module.processor = processor


@dataclass
class AttentionPatch:
    """What ``apply`` did; ``remove()`` (or leaving a ``with`` block) undoes it exactly."""

    method: str
    config: Any
    context: AttentionContext
    saved: list[tuple[nn.Module, str, nn.Module, Any]] = field(default_factory=list)  # model, name, layer, old
    hooks: list[RemovableHandle] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list)
    active: bool = True

    @property
    def layers(self) -> list[str]:
        """Qualified names of the layers whose processor was replaced."""
        return [f"{type(model).__name__}.{name}" for model, name, _, _ in self.saved]

    def remove(self) -> None:
        if not self.active:
            return
        for _, _, layer, old in reversed(self.saved):
            _set(layer, old)
        for h in self.hooks:
            h.remove()
        for model in self.models:
            if getattr(model, _MARK, None) is self:
                delattr(model, _MARK)
            _forget_names(model)
        self.active = False

    def __enter__(self) -> AttentionPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"AttentionPatch(method={self.method!r}, layers={len(self.saved)}, {state})"


def _forget_names(model: nn.Module) -> None:
    from .processors.families import FAMILY_ATTR, NAME_ATTR, TEXT_ONLY_ATTR

    for m in model.modules():
        for attr in (NAME_ATTR, FAMILY_ATTR, TEXT_ONLY_ATTR):
            if attr in m.__dict__:
                delattr(m, attr)


def apply(pipe_or_model: Any, method: str, **options: Any) -> AttentionPatch:
    """Set ``method``'s attention processors on a pipeline or a bare denoiser.

    Args:
        pipe_or_model: a diffusers pipeline (its ``unet`` / ``transformer`` / ``transformer_2`` are
            patched) or a denoiser ``nn.Module``.
        method: a name from :func:`diffattn.methods`.
        **options: fields of the method's config dataclass.

    Returns:
        An :class:`AttentionPatch`; also a context manager.

    Raises:
        ValueError: unknown method, already applied, fused projections, or no layer the method supports.
        TypeError: an option the method does not have (the message lists the valid ones).
    """
    spec = registry.get(method)
    config = spec.build_config(options)
    from .processors.core import set_processor_names, track_text_len
    from .processors.families import family_of_processor

    models = denoisers(pipe_or_model)
    for comp, model in models:
        if getattr(model, _MARK, None) is not None:
            raise ValueError(
                f"diffattn method {getattr(model, _MARK).method!r} is already applied to {comp}; "
                "call diffattn.restore(...) (or patch.remove()) before applying another"
            )

    ctx = AttentionContext()
    plan: list[tuple[nn.Module, str, nn.Module, Any, Any]] = []
    seen_classes, any_layers = [], False
    for _, model in models:
        seen_classes.append(type(model).__name__)
        for name, layer in _attention_layers(model):
            any_layers = True
            old = layer.processor
            family = family_of_processor(old)
            if family is None or family not in spec.families:
                continue
            info = LayerInfo(name=name, module=layer, family=family, model=type(model).__name__, is_cross=_is_cross(layer))
            new = spec.make_processor(config, ctx, info)
            if new is None:
                continue
            if getattr(layer, "fused_projections", False) or getattr(layer, "to_qkv", None) is not None:
                raise ValueError(
                    f"layer {name} of {type(model).__name__} has fused QKV projections; call "
                    "unfuse_qkv_projections() on the model before diffattn.apply"
                )
            plan.append((model, name, layer, old, new))
    if not any_layers:
        raise ValueError(f"{seen_classes} have no attention processors; diffattn patches diffusers attention layers")
    if not plan:
        supported = ", ".join(spec.models) if spec.models else f"models whose attention families are {list(spec.families)}"
        raise ValueError(
            f"method {method!r} does not support {seen_classes}: no layer it applies to. Supported: {supported}"
        )

    # models are listed up front so a failure half-way is undone completely by remove()
    patch = AttentionPatch(method=method, config=config, context=ctx, models=[m for _, m in models])
    try:
        for _, model in models:
            # names, stock families and the HunyuanVideo refiner's text-only flag, read before replacing
            set_processor_names(model)
        for model, name, layer, old, new in plan:
            _set(layer, new)
            patch.saved.append((model, name, layer, old))
        pipe = pipe_or_model if _is_pipeline(pipe_or_model) else None
        hook = ContextHook(ctx, pipe)
        for _, model in models:
            patch.hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))
            # single-stream Flux blocks learn their text length from a block-level hook
            patch.hooks.extend(track_text_len(model))
            setattr(model, _MARK, patch)
    except BaseException:
        patch.remove()
        raise
    return patch


def restore(target: Any) -> None:
    """Undo ``apply`` on a pipeline, a denoiser, or an :class:`AttentionPatch`.

    Raises:
        ValueError: when nothing diffattn applied is found on ``target``.
    """
    if isinstance(target, AttentionPatch):
        target.remove()
        return
    patches = []
    for _, model in denoisers(target):
        p = getattr(model, _MARK, None)
        if p is not None and p not in patches:
            patches.append(p)
    if not patches:
        raise ValueError(f"no diffattn method is applied to this {type(target).__name__}")
    for p in patches:
        p.remove()


def applied(target: Any) -> AttentionPatch | None:
    """The active patch on a pipeline or denoiser, if any."""
    for _, model in denoisers(target):
        p = getattr(model, _MARK, None)
        if p is not None:
            return p
    return None
