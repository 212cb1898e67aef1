"""Writing generated images and videos: atomically (temp file, then rename), never half-written."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".gif", ".mp4"}


def to_pil(img: Any) -> Image.Image:
    """PIL image from a PIL image, an HWC float array in [0, 1] or a uint8 array."""
    if isinstance(img, Image.Image):
        return img
    arr = np.asarray(img)
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0.0, 1.0) * 255).round().astype(np.uint8)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def _atomic(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_images(images: Sequence[Any], path: str | os.PathLike) -> list[Path]:
    """One image -> ``path``; several -> ``stem_0.png``, ``stem_1.png``, ..."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"out must end in one of {sorted(IMAGE_SUFFIXES)} for images, got {str(path)!r}")
    images = list(images)
    targets = [path] if len(images) == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(images))]
    return [_atomic(t, lambda tmp, im=im: to_pil(im).save(tmp)) for t, im in zip(targets, images)]


def save_frames(frames: Sequence[Any], path: str | os.PathLike, fps: int = 8) -> list[Path]:
    """Frames -> GIF (PIL) or MP4 (the ``video`` extra); a PNG path writes numbered frames."""
    path = Path(path)
    suffix = path.suffix.lower()
    pils = [to_pil(f) for f in frames]
    if suffix in IMAGE_SUFFIXES:
        return save_images(pils, path)
    if suffix == ".gif":
        return [
            _atomic(
                path,
                lambda tmp: pils[0].save(tmp, save_all=True, append_images=pils[1:], duration=int(1000 / fps), loop=0),
            )
        ]
    if suffix == ".mp4":
        try:
            import imageio.v2 as imageio
        except ImportError as e:
            raise ImportError("writing mp4 needs the video extra: pip install 'diffattn[video]'") from e

        def write(tmp: str) -> None:
            imageio.mimwrite(tmp, [np.asarray(p.convert("RGB")) for p in pils], fps=fps, format="FFMPEG")

        return [_atomic(path, write)]
    raise ValueError(f"out must end in one of {sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES)}, got {str(path)!r}")


def save_labelled_grid(images: Sequence[Any], labels: Sequence[str], path: str | os.PathLike, scale: int = 3) -> Path:
    """One row of images, each upscaled ``scale`` times with its label underneath; written atomically."""
    from PIL import ImageDraw

    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"out must end in one of {sorted(IMAGE_SUFFIXES)} for images, got {str(path)!r}")
    pils = [to_pil(im).convert("RGB") for im in images]
    w, h = pils[0].size
    cell_w, cell_h, label_h = w * scale, h * scale, 14
    grid = Image.new("RGB", (cell_w * len(pils), cell_h + label_h), "white")
    draw = ImageDraw.Draw(grid)
    for i, (im, label) in enumerate(zip(pils, labels)):
        grid.paste(im.resize((cell_w, cell_h), Image.NEAREST), (i * cell_w, 0))
        draw.text((i * cell_w + 3, cell_h + 1), label, fill="black")
    return _atomic(path, grid.save)
