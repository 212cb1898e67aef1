"""Pixels -> latent tokens for the video models: VAE compression, patch size and text placement.

The one rule for valid frame counts and sizes (``frames = temporal * k + 1``, sides multiples of the
pixels per token), shared by ``diffattn generate``, ``diffattn mask``, evaluation and training.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VideoGeometry:
    """How a video model turns pixels into tokens, and where its text sits in joint attention."""

    temporal: int  # VAE temporal compression: frames = temporal * k + 1
    spatial: int  # VAE spatial compression x patch size: pixels per token side
    text_tokens: int = 0  # text tokens in joint self-attention (pipeline default)
    text_position: str | None = None
    family: str = "wan"


VIDEO_MODELS: dict[str, VideoGeometry] = {
    "wan": VideoGeometry(4, 16, family="wan"),  # Wan 2.1 T2V/I2V and Wan 2.2 A14B: VAE 4x8x8, patch 1x2x2
    "wan22-5b": VideoGeometry(4, 32, family="wan"),  # Wan 2.2 TI2V-5B: VAE 4x16x16, patch 1x2x2
    "hunyuan-video": VideoGeometry(4, 16, 256, "last", "hunyuan-video"),
    "mochi": VideoGeometry(6, 16, 256, "last", "mochi"),
    "cogvideox": VideoGeometry(4, 16, 226, "first", "cogvideox"),  # CogVideoX 1.0 (2B/5B)
}


def nearest_frames(num_frames: int, temporal: int) -> tuple[int, int]:
    """The valid counts ``temporal * k + 1`` around ``num_frames`` (at or below it, and above it)."""
    lo = max(1, (num_frames - 1) // temporal * temporal + 1)
    return lo, lo + temporal


def check_num_frames(num_frames: object, temporal: int | None, model: str = "the model", name: str = "frames") -> int:
    """The frame-count rule: an integer ``>= 1`` and, for a video VAE of temporal factor ``temporal``,
    ``temporal * k + 1``. Invalid counts raise ``ValueError`` naming the nearest valid ones; nothing is
    ever rounded. ``name`` is the argument as the caller knows it (``--num-frames``)."""
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        raise ValueError(f"{name} must be an integer >= 1, got {num_frames!r}")
    if num_frames < 1:
        raise ValueError(f"{name} must be >= 1, got {num_frames} (nearest valid: 1)")
    if temporal is not None and temporal > 1 and (num_frames - 1) % temporal:
        lo, hi = nearest_frames(num_frames, temporal)
        raise ValueError(
            f"{name}: {model}'s VAE produces {temporal}k+1 frames; {num_frames} is not one (nearest: {lo} or {hi})"
        )
    return num_frames


def latent_grid(model: str, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Token grid (latent frames, height, width) of a ``frames`` x ``height`` x ``width`` pixel video.

    Raises:
        ValueError: an unknown model, or a size the model's VAE and patchify cannot produce.
    """
    if model not in VIDEO_MODELS:
        raise ValueError(f"unknown video model {model!r}; known: {sorted(VIDEO_MODELS)}")
    g = VIDEO_MODELS[model]
    check_num_frames(frames, g.temporal, model)
    for name, px in (("height", height), ("width", width)):
        if px < g.spatial or px % g.spatial:
            raise ValueError(f"{model} needs {name} to be a positive multiple of {g.spatial} pixels, got {px}")
    return ((frames - 1) // g.temporal + 1, height // g.spatial, width // g.spatial)
