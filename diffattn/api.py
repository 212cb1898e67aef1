"""``diffattn.apply`` / ``diffattn.restore``: set a method's processors on a pipeline and take them back.

``apply`` validates everything before it touches the model, so a failed call leaves the pipeline as
it was. ``restore`` puts back the very processor objects that were there and removes only the hooks
``apply`` installed (model CPU offload, caching and other diffusers hooks are left alone), so the
restored pipeline gives bit-identical outputs.

Several methods compose on disjoint layers: one call with per-method options
(``apply(pipe, {"agent": {...}, "roi": {...}})``) or one call per method. Two methods on one layer are an
error. Nothing switches a method off silently: when another call replaces processors ``apply`` set
(``enable_attention_slicing()``, ``fuse_qkv_projections()``, ``set_attn_processor()``), the next forward
pass refuses to run with an error that names the layers and what to undo, :attr:`AttentionPatch.replaced`
lists them, and ``restore`` still puts back what was there before ``apply``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn
from torch.utils.hooks import RemovableHandle

from . import registry
from .context import AttentionContext, ContextHook
from .denoisers import denoisers, is_pipeline
from .presets import load as load_preset
from .processors import agent, dense, hilbert_local, lamamba, radial, roi
from .processors.cp_plans import check_call
from .processors.parallel import follow_model, model_parallel_config
from .registry import LayerInfo

# The built-in methods, registered here and nowhere else (a method file only defines its Method record).
BUILTIN_METHODS = (
    dense.METHOD,
    agent.METHOD,
    radial.METHOD,
    hilbert_local.METHOD,
    roi.ROI_METHOD,
    roi.REGIONAL_MASK_METHOD,
    lamamba.METHOD,
)
for _method in BUILTIN_METHODS:
    registry.register(_method)

_PATCHES = "_diffattn_patches"  # on each denoiser: its active patches, in order
_SAVE = "save_pretrained"  # wrapped on each patched denoiser: saves the stock model (_stock_save)


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


@dataclass(eq=False)  # identity: two patches are never "equal"
class AttentionPatch:
    """What one method's ``apply`` did; ``remove()`` (or leaving a ``with`` block) undoes it exactly.

    Attributes:
        method: the method's name.
        config: its config dataclass.
        context: the per-call :class:`~diffattn.AttentionContext` its processors read.
        skipped: ``(layer, why)`` for the attention layers the method left as they were (``"per-layer
            setting"`` for the layers ``layers=`` keeps dense).
        options: the base options ``apply`` was given.
        layer_settings: the per-layer settings ``apply`` was given (``{layer: options or "dense"}``).
    """

    method: str
    config: Any
    context: AttentionContext
    saved: list[tuple[nn.Module, str, nn.Module, Any, Any]] = field(default_factory=list)  # model, name, layer, old, new
    hooks: list[RemovableHandle] = field(default_factory=list)
    models: list[nn.Module] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    active: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    layer_settings: dict[str, Any] = field(default_factory=dict)
    is_suspended: bool = False

    @property
    def layers(self) -> list[str]:
        """Qualified names of the layers whose processor was replaced."""
        return [f"{type(model).__name__}.{name}" for model, name, _, _, _ in self.saved]

    @property
    def replaced(self) -> list[str]:
        """Layers whose processor is no longer the one ``apply`` set (another call replaced it)."""
        if not self.active or self.is_suspended:
            return []
        return [f"{type(model).__name__}.{name}" for model, name, layer, _, new in self.saved if layer.processor is not new]

    @contextmanager
    def suspended(self) -> Iterator[AttentionPatch]:
        """Run the original processors inside the block and this patch's again after it.

        For a pipeline stage that must see the plain model, e.g. stage 1 of
        :class:`~diffattn.pipelines.HighResPipeline` under a method applied for stage 2.

        Raises:
            RuntimeError: the patch is removed, already suspended, or its processors were replaced.
        """
        if not self.active or self.is_suspended:
            raise RuntimeError(f"{self!r} cannot be suspended: it is {'suspended' if self.active else 'removed'}")
        self.check_intact()
        for _, _, layer, old, _ in self.saved:
            _set(layer, old)
        self.is_suspended = True
        try:
            yield self
        finally:
            self.is_suspended = False
            if self.active:  # remove() inside the block already put the originals back
                for _, _, layer, _, new in self.saved:
                    _set(layer, new)

    def summary(self) -> str:
        """One line per attention layer: the method, its processor and, once it has run, the backend and
        mask density of its last call; or ``dense: why`` for the layers it left alone."""
        lines = [self.headline()]
        replaced = set(self.replaced)
        for model, name, layer, _, new in self.saved:
            qual = f"{type(model).__name__}.{name}"
            if qual in replaced:
                what = f"replaced by {type(layer.processor).__name__} after apply (restore, then apply again)"
            else:
                describe = getattr(new, "describe", None)
                facts = describe() if callable(describe) else ""
                what = f"{self.method}: {type(new).__name__}" + (f", {facts}" if facts else "")
            lines.append(f"  {qual}  {what}")
        lines.extend(f"  {qual}  dense: {why}" for qual, why in self.skipped)
        return "\n".join(lines)

    def headline(self) -> str:
        """One line: how many layers run the method and why the others do not (the CLI prints it)."""
        state = "" if self.active else " (removed)"
        reasons: dict[str, int] = {}
        for _, why in self.skipped:
            reasons[why] = reasons.get(why, 0) + 1
        left = ", ".join(f"{n} {why}" for why, n in reasons.items())
        return f"diffattn {self.method!r}{state}: {len(self.saved)} layers" + (f"; dense: {left}" if left else "")

    def remove(self) -> None:
        """Put back the processors that were there before ``apply`` and remove its hooks (idempotent)."""
        if not self.active:
            return
        for model, _, layer, old, _ in reversed(self.saved):
            _set(layer, old)
            # enable_parallelism after apply set its config on our processors only
            config = model_parallel_config(model)
            if config is not None and hasattr(old, "_parallel_config"):
                old._parallel_config = config
        for h in self.hooks:
            h.remove()
        for model in self.models:
            patches = [p for p in getattr(model, _PATCHES, []) if p is not self]
            if patches:
                setattr(model, _PATCHES, patches)
            else:
                if _PATCHES in model.__dict__:
                    delattr(model, _PATCHES)
                model.__dict__.pop(_SAVE, None)  # the instance's save_pretrained wrapper (_stock_save)
                _forget_names(model)  # the names are shared by every patch on the model
        self.active = False

    def check_intact(self) -> None:
        """Raise when another call replaced processors this patch set (the forward pre-hook calls this).

        Raises:
            RuntimeError: naming the layers, the method and what to undo.
        """
        replaced = self.replaced
        if replaced:
            shown = ", ".join(replaced[:3]) + (f" and {len(replaced) - 3} more" if len(replaced) > 3 else "")
            raise RuntimeError(
                f"diffattn method {self.method!r}: the processors of {len(replaced)} layer(s) ({shown}) were replaced "
                "after diffattn.apply, e.g. by enable_attention_slicing(), fuse_qkv_projections() or "
                "set_attn_processor(); undo that call (unfuse_qkv_projections(), disable_attention_slicing()), or "
                "call diffattn.restore(...) and apply again"
            )

    def __enter__(self) -> AttentionPatch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"AttentionPatch(method={self.method!r}, layers={len(self.saved)}, {state})"


@dataclass(eq=False)
class PatchGroup:
    """The patches of one ``apply`` call with several methods; removed together, in reverse order."""

    patches: list[AttentionPatch]

    @property
    def active(self) -> bool:
        """Whether any of the patches is still applied."""
        return any(p.active for p in self.patches)

    @property
    def layers(self) -> list[str]:
        """Every layer the group's methods changed."""
        return [layer for p in self.patches for layer in p.layers]

    def summary(self) -> str:
        """The summaries of the patches, one after the other."""
        return "\n".join(p.summary() for p in self.patches)

    def remove(self) -> None:
        """Remove every patch of the group (idempotent)."""
        for p in reversed(self.patches):
            p.remove()

    def __enter__(self) -> PatchGroup:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


class _IntactCheck:
    """Forward pre-hook: refuse to run a denoiser whose diffattn processors were replaced behind our back."""

    def __init__(self, patch: AttentionPatch) -> None:
        self.patch = patch

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.patch.check_intact()


def _cp_check(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: under context parallelism, refuse inputs the cp plan cannot split (see
    :func:`diffattn.processors.cp_plans.check_call`), before diffusers' split hooks meet them."""
    check_call(module, args, kwargs)


def _forget_names(model: nn.Module) -> None:
    from .processors.families import FAMILY_ATTR, NAME_ATTR, TEXT_ONLY_ATTR

    for m in model.modules():
        for attr in (NAME_ATTR, FAMILY_ATTR, TEXT_ONLY_ATTR):
            if attr in m.__dict__:
                delattr(m, attr)


def _stock_save(model: nn.Module) -> Any:
    """``model.save_pretrained`` while diffattn is applied: it saves the stock model. Processors that hold
    parameters (``lamamba``'s SS2D branch and gate) are taken off for the save, with a warning saying what
    was left out, so a saved folder never mixes them into the stock weights."""
    import inspect
    import warnings

    stock = type(model).save_pretrained

    def save_pretrained(*args: Any, **kwargs: Any) -> Any:
        held = [(layer, old, new) for p in getattr(model, _PATCHES, []) for _, _, layer, old, new in p.saved
                if isinstance(new, nn.Module)]
        left: dict[str, int] = {}
        for p in getattr(model, _PATCHES, []):
            n = sum(t.numel() for _, _, _, _, new in p.saved if isinstance(new, nn.Module) for t in new.state_dict().values())
            if n:
                left[p.method] = left.get(p.method, 0) + n
        if left:
            what = ", ".join(f"{n:,} values of method {m!r}" for m, n in left.items())
            warnings.warn(
                f"diffattn: {type(model).__name__}.save_pretrained saves the stock model; the parameters the applied "
                f"method added ({what}, in its processors) are left out. Save them with "
                "diffattn.lora.adapters.save_extra(...), or call diffattn.restore(...) before saving",
                UserWarning,
                stacklevel=2,
            )
        try:
            for layer, old, _ in held:
                _set(layer, old)
            return stock(model, *args, **kwargs)
        finally:
            for layer, _, new in reversed(held):
                _set(layer, new)

    # diffusers' pipeline passes safe_serialization / variant / ... only when the signature names them
    save_pretrained.__signature__ = inspect.signature(stock.__get__(model))  # type: ignore[attr-defined]
    return save_pretrained


def _uses_fused_qkv(layer: nn.Module) -> bool:
    """Whether the layer computes q/k/v from fused weights right now. Classic ``Attention`` modules keep
    ``to_qkv`` after ``unfuse_qkv_projections()`` (only the processors go back), so there the processor
    decides; the newer attention classes (Flux, Wan) read their ``fused_projections`` flag."""
    from diffusers.models.attention_processor import Attention

    if type(layer.processor).__name__.startswith("Fused"):
        return True
    if isinstance(layer, Attention):
        return False
    return bool(getattr(layer, "fused_projections", False))


@dataclass
class _Plan:
    method: str
    config: Any
    context: AttentionContext
    changes: list[tuple[nn.Module, str, nn.Module, Any, Any]]
    skipped: list[tuple[str, str]]
    options: dict[str, Any] = field(default_factory=dict)
    layer_settings: dict[str, Any] = field(default_factory=dict)


PER_LAYER_DENSE = "per-layer setting"  # the skip reason of a layer ``layers=`` keeps dense


def _unknown_layer(method: str, name: str, applicable: list[str], skipped: dict[str, str]) -> ValueError:
    """The error for a per-layer setting naming a layer the method does not change, with close matches."""
    import difflib

    if name in skipped:
        why = f"method {method!r} does not change it ({skipped[name]})"
    else:
        why = "no attention layer of that name"
    # a name without its model class ("blocks.0.attn1") matches by suffix first
    close = [a for a in applicable if a.endswith(f".{name}")][:3] or difflib.get_close_matches(name, applicable, n=3, cutoff=0.6)
    hint = f"close matches: {close}" if close else f"layers it changes: {applicable[:4]}" + (
        f" and {len(applicable) - 4} more" if len(applicable) > 4 else ""
    )
    return ValueError(f"layers: {name!r}: {why}; {hint} (names as in AttentionPatch.layers)")


def _plan(models: list[tuple[str, nn.Module]], method: str, options: dict[str, Any]) -> _Plan:
    """What ``method`` would change, checked, without touching the models. ``options`` may hold
    ``layers``: per-layer settings (see :meth:`diffattn.registry.Method.layer_configs`)."""
    from .processors.families import family_of_processor

    spec = registry.get(method)
    options = dict(options)
    settings = options.pop("layers", None)
    config = spec.build_config(options)
    per_layer = spec.layer_configs(options, settings) if settings is not None else {}
    applicable: list[str] = []
    ctx = AttentionContext()
    # a layer another patch holds is judged by the processor that patch replaced (the clash is found later)
    stock = {id(layer): old for _, model in models for p in getattr(model, _PATCHES, []) for _, _, layer, old, _ in p.saved}
    changes: list[tuple[nn.Module, str, nn.Module, Any, Any]] = []
    skipped: list[tuple[str, str]] = []
    seen_classes, any_layers = [], False
    for _, model in models:
        seen_classes.append(type(model).__name__)
        for name, layer in _attention_layers(model):
            any_layers = True
            qual = f"{type(model).__name__}.{name}"
            old = stock.get(id(layer), layer.processor)
            family = family_of_processor(old)
            if family is None:
                skipped.append((qual, f"{type(old).__name__} is not a stock processor diffattn knows"))
                continue
            if family not in spec.families:
                skipped.append((qual, f"{method} does not support the {family!r} attention family"))
                continue
            info = LayerInfo(name=name, module=layer, family=family, model=type(model).__name__, is_cross=_is_cross(layer))
            own = per_layer.get(qual, config)
            new = spec.make_processor(config if own is registry.DENSE else own, ctx, info)
            if new is None:
                skipped.append((qual, "cross-attention" if info.is_cross else f"{method} leaves this layer"))
                continue
            applicable.append(qual)
            if own is registry.DENSE:
                skipped.append((qual, PER_LAYER_DENSE))
                continue
            # context parallelism set before apply: the new processor takes the config (or refuses it)
            follow_model(new, layer, model)
            if _uses_fused_qkv(layer):
                raise ValueError(
                    f"layer {name} of {type(model).__name__} has fused QKV projections; call "
                    "unfuse_qkv_projections() on the model before diffattn.apply"
                )
            changes.append((model, name, layer, old, new))
    if not any_layers:
        raise ValueError(f"{seen_classes} have no attention processors; diffattn patches diffusers attention layers")
    for name in per_layer:
        if name not in applicable:
            raise _unknown_layer(method, name, applicable, dict(skipped))
    if not applicable:
        supported = ", ".join(spec.models) if spec.models else f"models whose attention families are {list(spec.families)}"
        raise ValueError(
            f"method {method!r} does not support {seen_classes}: no layer it applies to. Supported: {supported}"
        )
    if not changes:  # every layer it applies to was set "dense" by hand: allowed, but never silent
        import warnings

        warnings.warn(
            f"diffattn method {method!r} changes no layer: layers= sets all {len(applicable)} layers it applies to "
            "to 'dense', so the model runs as it was",
            UserWarning,
            stacklevel=3,
        )
    return _Plan(method, config, ctx, changes, skipped, options, dict(settings or {}))


def _check_disjoint(plans: list[_Plan], models: list[tuple[str, nn.Module]]) -> None:
    """Two methods on one layer is an error naming the layers and both methods."""
    holder: dict[int, str] = {}  # id(layer) -> who holds it
    for _, model in models:
        for patch in getattr(model, _PATCHES, []):
            for _, _, layer, _, _ in patch.saved:
                holder[id(layer)] = f"diffattn method {patch.method!r} (already applied)"
    for plan in plans:
        clash = [(f"{type(m).__name__}.{n}", holder[id(layer)]) for m, n, layer, _, _ in plan.changes if id(layer) in holder]
        if clash:
            shown = ", ".join(name for name, _ in clash[:3]) + (f" and {len(clash) - 3} more" if len(clash) > 3 else "")
            raise ValueError(
                f"method {plan.method!r} would take {len(clash)} layer(s) that {clash[0][1]} holds ({shown}); "
                "two methods cannot share a layer: call diffattn.restore(...) (or patch.remove()) first, "
                "or give the methods disjoint layers"
            )
        for _, _, layer, _, _ in plan.changes:
            holder[id(layer)] = f"method {plan.method!r} of this call"


def _install(plan: _Plan, models: list[tuple[str, nn.Module]], pipe: Any) -> AttentionPatch:
    from .processors.core import set_processor_names, track_text_len

    # models are listed up front so a failure half-way is undone completely by remove()
    patch = AttentionPatch(
        method=plan.method, config=plan.config, context=plan.context, models=[m for _, m in models],
        skipped=plan.skipped, options=plan.options, layer_settings=plan.layer_settings,
    )
    try:
        for _, model in models:
            if not getattr(model, _PATCHES, None):
                # names, stock families and the HunyuanVideo refiner's text-only flag, read before replacing
                set_processor_names(model)
        for model, name, layer, old, new in plan.changes:
            _set(layer, new)
            patch.saved.append((model, name, layer, old, new))
        hook = ContextHook(plan.context, pipe)
        for _, model in models:
            patch.hooks.append(model.register_forward_pre_hook(_IntactCheck(patch), with_kwargs=True))
            # under context parallelism: a sequence the cp plan cannot split is refused before any work
            patch.hooks.append(model.register_forward_pre_hook(_cp_check, with_kwargs=True))
            patch.hooks.append(model.register_forward_pre_hook(hook, with_kwargs=True))
            # single-stream Flux blocks learn their text length from a block-level hook
            patch.hooks.extend(track_text_len(model))
            setattr(model, _PATCHES, [*getattr(model, _PATCHES, []), patch])
            if callable(getattr(type(model), _SAVE, None)) and _SAVE not in model.__dict__:
                model.__dict__[_SAVE] = _stock_save(model)
    except BaseException:
        patch.remove()
        raise
    return patch


def apply(
    pipe_or_model: Any, method: str | dict[str, dict[str, Any]], *, preset: Any = None, **options: Any
) -> AttentionPatch | PatchGroup:
    """Set ``method``'s attention processors on a pipeline or a bare denoiser.

    Args:
        pipe_or_model: a diffusers pipeline (its ``unet`` / ``transformer`` / ``transformer_2`` are
            patched) or a denoiser ``nn.Module``.
        method: a name from :func:`diffattn.methods`, or ``{name: options}`` for several methods on
            disjoint layers in one call.
        preset: a :class:`~diffattn.presets.CalibrationPreset`, a preset file or a hub id: its options
            and per-layer settings, after checking that it was made for this method and this model config
            (no other options then).
        **options: fields of the method's config dataclass (with a single method name), and ``layers``:
            per-layer settings ``{layer name as in AttentionPatch.layers: {option: value} or "dense"}``
            for the methods that take them (``radial``, ``hilbert_local``, ``agent``); the layers not
            named get the other options, a ``"dense"`` layer keeps its stock processor.

    Returns:
        An :class:`AttentionPatch` (a :class:`PatchGroup` for several methods); also a context manager.

    Raises:
        ValueError: unknown method, a layer another method holds, fused projections, no layer the
            method supports, a per-layer setting naming a layer the method does not change (close matches
            listed), or a preset made for another method or model config. Nothing is applied then.
        TypeError: an option the method does not have (the message lists the valid ones; per layer too).
    """
    if preset is not None:
        if isinstance(method, dict) or options:
            raise TypeError("preset= carries the options and per-layer settings: give one method name and no other options")
        found = load_preset(preset)
        found.check(pipe_or_model, method)
        options = {**found.options, **({"layers": dict(found.layers)} if found.layers else {})}
    if isinstance(method, dict):
        if options:
            raise TypeError("with several methods, give each its options in the dict: {name: {option: value}}")
        if not method or not all(isinstance(o, dict) for o in method.values()):
            raise TypeError(f"method must be a name or a non-empty {{name: {{options}}}} dict, got {method!r}")
        requests = list(method.items())
    else:
        requests = [(method, options)]
    models = denoisers(pipe_or_model)
    plans = [_plan(models, name, opts) for name, opts in requests]
    _check_disjoint(plans, models)
    pipe = pipe_or_model if is_pipeline(pipe_or_model) else None
    patches: list[AttentionPatch] = []
    try:
        for plan in plans:
            patches.append(_install(plan, models, pipe))
    except BaseException:
        for p in reversed(patches):
            p.remove()
        raise
    return patches[0] if not isinstance(method, dict) else PatchGroup(patches)


def restore(target: Any) -> None:
    """Undo ``apply`` on a pipeline, a denoiser, an :class:`AttentionPatch` or a :class:`PatchGroup`:
    every active patch, newest first.

    Raises:
        ValueError: when nothing diffattn applied is found on ``target``.
    """
    if isinstance(target, AttentionPatch | PatchGroup):
        target.remove()
        return
    patches = applied(target)
    if not patches:
        raise ValueError(f"no diffattn method is applied to this {type(target).__name__}")
    for p in reversed(patches):
        p.remove()


def applied(target: Any) -> list[AttentionPatch]:
    """Every active patch on a pipeline or denoiser, oldest first (empty when none). A patch whose
    processors another call replaced is still listed; its :attr:`AttentionPatch.replaced` names them."""
    found: list[AttentionPatch] = []
    for _, model in denoisers(target):
        for p in getattr(model, _PATCHES, []):
            if p not in found:
                found.append(p)
    return found
