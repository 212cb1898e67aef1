"""The denoising models of a diffusers pipeline: what ``apply``, presets and the context act on."""

from __future__ import annotations

from typing import Any

import torch.nn as nn

__all__ = ["DENOISER_COMPONENTS", "denoisers", "is_pipeline"]

# pipeline components that denoise; ControlNets, VAEs and text encoders keep their attention
DENOISER_COMPONENTS = ("unet", "transformer", "transformer_2")


def is_pipeline(obj: Any) -> bool:
    """Whether ``obj`` is a diffusers pipeline."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DiffusionPipeline)


def denoisers(pipe_or_model: Any) -> list[tuple[str, nn.Module]]:
    """The denoising models of a pipeline (or the bare model itself)."""
    if is_pipeline(pipe_or_model):
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
