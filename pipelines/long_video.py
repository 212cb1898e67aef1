"""Decode long videos in bounded memory: the pipeline VAE's tiling, slicing and frame-wise decoding.

A video 4x longer than a model was trained for (radial attention + the ``long-video`` LoRA) is also 4x
longer to decode. The diffusers video VAEs differ in what bounds their memory:

- ``AutoencoderKLWan`` decodes one latent frame at a time with a causal cache (length costs nothing);
  spatial tiling bounds the activations of a frame, but keeps every tile's whole clip until the tiles
  are blended, so on small frames it can hold more than the stock decode
  (``scripts/bench_video_decode.py``).
- ``AutoencoderKLHunyuanVideo`` decodes in overlapping temporal tiles (``tile_sample_min_num_frames``,
  on by default) and spatial tiles once tiling is on.
- ``AutoencoderKLMochi`` decodes every frame at once; spatial tiling bounds each frame. Its frame-wise
  decoding (a private diffusers switch) fails with a shape error in diffusers 0.42, so it stays off.
- ``AutoencoderKLCogVideoX`` decodes a few latent frames at a time; tiling bounds each frame's size.

:func:`long_video_decoding` switches on all that the VAE has and returns a handle that puts the exact
previous state back (every flag and tile size), so outputs after ``restore`` are bit-identical to
those before.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from torch import nn

__all__ = ["VideoDecoding", "long_video_decoding"]

# VAE attributes long_video_decoding may change; saved and put back verbatim
_FLAGS = ("use_tiling", "use_slicing")
# the diffusers VAEs' own default ratio of tile stride to tile size (192 / 256): a quarter overlaps
_STRIDE_RATIO = 0.75


def _vae_of(pipe_or_vae: Any) -> nn.Module:
    if isinstance(pipe_or_vae, nn.Module) and hasattr(pipe_or_vae, "decode"):
        return pipe_or_vae
    vae = getattr(pipe_or_vae, "vae", None)
    if not isinstance(vae, nn.Module):
        raise ValueError(
            f"pipe_or_vae: expected a diffusers pipeline with a `vae` or a VAE module, got {type(pipe_or_vae).__name__}"
        )
    return vae


class VideoDecoding:
    """What :func:`long_video_decoding` changed on a VAE; ``restore()`` (or leaving the ``with``) undoes it."""

    def __init__(self, vae: nn.Module, saved: dict[str, Any]) -> None:
        self.vae, self._saved = vae, saved
        self.active = True

    @property
    def settings(self) -> dict[str, Any]:
        """The VAE's decoding switches and tile sizes as they are now."""
        return {k: getattr(self.vae, k) for k in self._saved}

    def restore(self) -> None:
        """Give the VAE back its own decoding settings (idempotent)."""
        if not self.active:
            return
        for k, v in self._saved.items():
            setattr(self.vae, k, v)
        self.active = False

    def __enter__(self) -> VideoDecoding:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()

    def __repr__(self) -> str:
        return f"VideoDecoding({type(self.vae).__name__}, {self.settings}, {'active' if self.active else 'restored'})"


def long_video_decoding(
    pipe_or_vae: Any,
    *,
    tile_size: int | None = None,
    tile_frames: int | None = None,
    slicing: bool = True,
) -> VideoDecoding:
    """Switch on the tiling and batch slicing a video VAE has.

    Args:
        pipe_or_vae: a diffusers video pipeline (its ``vae``) or the VAE itself.
        tile_size: spatial tile size in pixels (tiles overlap by a quarter); ``None``: the VAE's default
            (256 for Wan, HunyuanVideo and Mochi; CogVideoX takes only its default, 240 x 360).
        tile_frames: temporal tile length in frames, for VAEs that tile time (HunyuanVideo); ``None``: its
            default (16).
        slicing: decode the batch one video at a time (classifier-free guidance doubles the batch).

    Returns:
        A :class:`VideoDecoding` handle, also a context manager, whose ``restore()`` puts back the
        previous state exactly.

    Raises:
        ValueError: no VAE, a non-positive size, ``tile_size`` for CogVideoX, or ``tile_frames`` for a
            VAE that does not tile time.

    A VAE with nothing to switch (a pixel-space one) is left as it is, with a warning.
    """
    vae = _vae_of(pipe_or_vae)
    for name, value in (("tile_size", tile_size), ("tile_frames", tile_frames)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    tiling = getattr(vae, "enable_tiling", None)
    params = inspect.signature(tiling).parameters if callable(tiling) else {}
    if tile_frames is not None and "tile_sample_min_num_frames" not in params:
        raise ValueError(
            f"tile_frames: {type(vae).__name__} does not tile time (only AutoencoderKLHunyuanVideo does); "
            "leave it None"
        )
    if tile_size is not None and callable(tiling) and "tile_sample_stride_height" not in params:
        raise ValueError(
            f"tile_size: {type(vae).__name__}'s tiling derives its tile overlap from fixed factors and decodes "
            "other tile sizes to the wrong shape; leave tile_size None (its default tiles)"
        )
    # the VAEs step through the latent by stride // compression; a zero step fails deep inside diffusers
    for name, value, ratio in (
        ("tile_size", tile_size, getattr(vae, "spatial_compression_ratio", 1)),
        ("tile_frames", tile_frames, getattr(vae, "temporal_compression_ratio", 1)),
    ):
        if value is not None and int(value * _STRIDE_RATIO) < ratio:
            least = -(-ratio // _STRIDE_RATIO)
            raise ValueError(
                f"{name} must be >= {int(least)} for {type(vae).__name__} (its tiles step by 3/4 of the size "
                f"in latent units of {ratio}), got {value}"
            )
    if not callable(tiling) and not hasattr(vae, "use_slicing"):
        warnings.warn(
            f"{type(vae).__name__} has no tiling or slicing; long_video_decoding leaves it unchanged",
            stacklevel=2,
        )
        return VideoDecoding(vae, {})

    names = [k for k in _FLAGS if hasattr(vae, k)] + sorted(k for k in vars(vae) if k.startswith("tile_"))
    saved = {k: getattr(vae, k) for k in names}
    handle = VideoDecoding(vae, saved)
    try:
        if callable(tiling):
            kw: dict[str, Any] = {}
            if tile_size is not None:
                stride = int(tile_size * _STRIDE_RATIO)
                kw.update(tile_sample_min_height=tile_size, tile_sample_min_width=tile_size)
                kw.update(tile_sample_stride_height=stride, tile_sample_stride_width=stride)
            if tile_frames is not None:
                kw["tile_sample_min_num_frames"] = tile_frames
                kw["tile_sample_stride_num_frames"] = int(tile_frames * _STRIDE_RATIO)
            tiling(**kw)
        if slicing and hasattr(vae, "use_slicing"):
            vae.use_slicing = True
    except BaseException:
        handle.restore()
        raise
    return handle
