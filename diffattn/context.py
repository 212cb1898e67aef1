"""Per-call facts a processor needs and diffusers does not pass to it.

``apply`` installs a forward pre-hook on every denoiser (UNet / transformer) that fills one
:class:`AttentionContext` before the model runs: the visual token grid after patchify, where the text
tokens sit in joint attention and how many are valid per sample, and the denoising step.

The step comes from the pipeline's scheduler: the timestep the denoiser is called with is located in
``scheduler.timesteps``. Counting forward calls would be wrong: Wan runs the transformer twice per step
for classifier-free guidance, and Wan 2.2 switches to a second transformer halfway.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch

Grid = tuple[int, int, int]

# text placement in joint attention, by denoiser class
_TEXT_FIRST = {"FluxTransformer2DModel", "CogVideoXTransformer3DModel"}
_TEXT_LAST = {"SD3Transformer2DModel", "HunyuanVideoTransformer3DModel", "MochiTransformer3DModel"}


@dataclass
class AttentionContext:
    """Mutable per-call state shared by the processors of one ``apply``.

    Attributes:
        grid: ``(frames, height, width)`` of visual tokens at the denoiser input after patchify
            (``frames == 1`` for images). UNet levels below the input are found with :meth:`grid_for`.
        n_text: text tokens in the joint sequence, or 0 when the model keeps text in cross-attention.
        text_position: ``"first"`` / ``"last"`` / ``None``.
        text_valid: ``(batch,)`` valid text tokens per sample, or ``None`` when all are valid.
        step_index: index of the current denoising step in ``scheduler.timesteps``, if known.
        num_steps: number of denoising steps, if known.
        timestep: the timestep value the denoiser was called with.
        model: class name of the denoiser that ran last.
    """

    grid: Grid | None = None
    n_text: int = 0
    text_position: str | None = None
    text_valid: torch.Tensor | None = None
    step_index: int | None = None
    num_steps: int | None = None
    timestep: float | None = None
    model: str | None = None

    @property
    def step_fraction(self) -> float | None:
        """Fraction of the denoising done before this step: 0.0 at the first step."""
        if self.step_index is None or not self.num_steps:
            return None
        return self.step_index / self.num_steps

    def grid_for(self, n_visual: int) -> Grid:
        """The grid of a layer with ``n_visual`` visual tokens (UNet levels are downsampled copies).

        Raises:
            ValueError: when no power-of-two downsampling of :attr:`grid` has ``n_visual`` tokens.
        """
        if self.grid is None:
            raise ValueError(
                "the token grid is unknown: use diffattn.apply(...) so a hook records it, or pass "
                "num_frames/height/width to the processor"
            )
        f, h, w = self.grid
        for s in (1, 2, 4, 8, 16, 32, 64):
            gh, gw = math.ceil(h / s), math.ceil(w / s)
            if f * gh * gw == n_visual:
                return (f, gh, gw)
        raise ValueError(f"{n_visual} visual tokens match no downsampling of the recorded grid {self.grid}")

    def reset(self) -> None:
        """Forget everything recorded (the state of a fresh context)."""
        self.grid, self.n_text, self.text_position, self.text_valid = None, 0, None, None
        self.step_index, self.num_steps, self.timestep, self.model = None, None, None, None


def given_grid(
    num_frames: int | None, height: int | None, width: int | None, *, with_frames: bool = False
) -> Grid | None:
    """The token grid a processor set by hand was given (tokens after patchify), checked; ``None`` if none.

    ``height`` and ``width`` come together; with ``with_frames`` ``num_frames`` must come with them,
    otherwise it defaults to 1.

    Raises:
        ValueError: a size given alone, or one that is not an integer >= 1.
    """
    if with_frames:
        given = [x is not None for x in (num_frames, height, width)]
        if any(given) and not all(given):
            raise ValueError("give num_frames, height and width together (tokens after patchify), or none of them")
    elif (height is None) != (width is None):
        raise ValueError("give height and width together (tokens after patchify), or neither")
    if height is None:
        return None
    for name, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return (num_frames or 1, height, width)


def recorded_grid(own: Grid | None, context: AttentionContext | None, method: str) -> Grid:
    """The denoiser-input token grid: the one given by hand, else the one ``apply``'s hook recorded.

    Raises:
        ValueError: neither is known (says how to give one).
    """
    grid = own if own is not None else (context.grid if context is not None else None)
    if grid is None:
        raise ValueError(
            f"{method} attention needs the token grid: use diffattn.apply(pipe, {method!r}, ...), or pass "
            "num_frames/height/width (tokens after patchify) to the processor"
        )
    return grid


def layer_grid(n_visual: int, own: Grid | None, context: AttentionContext | None, method: str) -> Grid:
    """The grid of a layer with ``n_visual`` visual tokens: the given or recorded grid, downsampled to
    the layer's UNet level; with neither known, a square single-frame grid.

    Raises:
        ValueError: no level of the grid has ``n_visual`` tokens, or (without a grid) ``n_visual`` is not
            a square.
    """
    if own is None and (context is None or context.grid is None):
        side = math.isqrt(n_visual)
        if side * side != n_visual:
            raise ValueError(
                f"{method}: cannot infer a token grid from {n_visual} tokens (not a square); pass height= and "
                "width= (the token grid at the model input) or use diffattn.apply, which records it"
            )
        return (1, side, side)
    return AttentionContext(grid=recorded_grid(own, context, method)).grid_for(n_visual)


def _arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _cfg(model: torch.nn.Module, name: str, default: Any = None) -> Any:
    config = getattr(model, "config", None)
    return getattr(config, name, default) if config is not None else default


def _pair(p: Any) -> tuple[int, int, int]:
    """Patch size as (t, h, w) from an int or a tuple."""
    if p is None:
        return (1, 1, 1)
    if isinstance(p, int):
        return (1, p, p)
    p = tuple(p)
    return (1, p[0], p[1]) if len(p) == 2 else (p[0], p[1], p[2])


def record_grid(ctx: AttentionContext, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """Fill grid and text facts from a denoiser's forward arguments."""
    model = getattr(model, "_orig_mod", model)  # torch.compile wrapper: the facts are on the model
    name = type(model).__name__
    ctx.model = name
    x = _arg(args, kwargs, "hidden_states", 0)
    if x is None:
        x = _arg(args, kwargs, "sample", 0)
    enc = _arg(args, kwargs, "encoder_hidden_states", 2 if name.startswith("UNet") else 1)
    ctx.n_text, ctx.text_position, ctx.text_valid = 0, None, None
    if not isinstance(x, torch.Tensor):
        ctx.grid = None
        return
    if name == "FluxTransformer2DModel":
        ids = _arg(args, kwargs, "img_ids", 99)
        if ids is not None:
            ids = ids[0] if ids.dim() == 3 else ids
            ctx.grid = (1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
        else:
            ctx.grid = None
    elif name == "CogVideoXTransformer3DModel":  # (B, F, C, H, W)
        pt = _cfg(model, "patch_size_t") or 1
        p = _cfg(model, "patch_size", 2)
        ctx.grid = (math.ceil(x.shape[1] / pt), x.shape[3] // p, x.shape[4] // p)
    elif x.dim() == 5:  # (B, C, F, H, W)
        pt, ph, pw = _pair(_cfg(model, "patch_size"))
        pt = _cfg(model, "patch_size_t", pt) or pt
        ctx.grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
    elif x.dim() == 4:  # (B, C, H, W)
        _, ph, pw = _pair(_cfg(model, "patch_size") if not name.startswith("UNet") else 1)
        ctx.grid = (1, x.shape[2] // ph, x.shape[3] // pw)
    else:
        ctx.grid = None
    if isinstance(enc, torch.Tensor) and (name in _TEXT_FIRST or name in _TEXT_LAST):
        ctx.n_text = enc.shape[1]
        ctx.text_position = "first" if name in _TEXT_FIRST else "last"
        mask = _arg(args, kwargs, "encoder_attention_mask", 99)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            ctx.text_valid = mask.bool().sum(-1)


def locate_step(timesteps: torch.Tensor, t: torch.Tensor | float) -> tuple[int, float]:
    """Index of timestep ``t`` in ``timesteps``; Flux-style callers pass ``t / 1000``."""
    ts = timesteps.detach().float().cpu().flatten()
    value = float(t.detach().float().flatten().max()) if isinstance(t, torch.Tensor) else float(t)
    best = None
    for scale in (1.0, 1000.0):
        err = (ts - value * scale).abs()
        i = int(err.argmin())
        if best is None or float(err[i]) < best[1]:
            best = (i, float(err[i]))
    return best[0], value


class ContextHook:
    """Forward pre-hook recording grid, text layout and step into an :class:`AttentionContext`."""

    def __init__(self, ctx: AttentionContext, pipeline: Any | None = None):
        self.ctx = ctx
        # a weak reference: the patch must not keep a deleted pipeline alive
        self._pipe = weakref.ref(pipeline) if pipeline is not None else None

    def __call__(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        record_grid(self.ctx, module, args, kwargs)
        t = _arg(args, kwargs, "timestep", 1)
        pipe = self._pipe() if self._pipe is not None else None
        scheduler = getattr(pipe, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if t is None:
            return
        if isinstance(timesteps, torch.Tensor) and timesteps.numel() > 0:
            self.ctx.step_index, self.ctx.timestep = locate_step(timesteps, t)
            self.ctx.num_steps = int(timesteps.numel())
        else:
            self.ctx.timestep = float(t.flatten().max()) if isinstance(t, torch.Tensor) else float(t)
            self.ctx.step_index, self.ctx.num_steps = None, None
