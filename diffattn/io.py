"""Writing generated images and videos: atomically (temp file, then rename), never half-written.

Every file the project writes goes through :func:`atomic_path` (or :func:`atomic_write` /
:func:`atomic_text`), which gives it the mode a plain ``open`` would (``0o666 & ~umask``; folders
``0o777 & ~umask``).
"""

from __future__ import annotations

import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
VIDEO_SUFFIXES = {".gif", ".mp4"}
_SEQ = itertools.count()


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


def current_umask() -> int:
    """The process's umask (read from ``/proc/self/status`` where it can be, else set and restored)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(directory: bool = False) -> int:
    """The mode a plain ``open`` (``0o666``) or ``mkdir`` (``0o777``) gives under the current umask."""
    return (0o777 if directory else 0o666) & ~current_umask()


def publish_modes(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes a plain ``open`` / ``mkdir`` would:
    temp files and folders (``mkstemp`` 0600, ``mkdtemp`` 0700) must not keep theirs once renamed into place."""
    path, mask = Path(path), current_umask()
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def replace_path(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename ``src`` onto ``dst`` (same filesystem); an existing folder ``dst`` is first moved aside and
    removed once ``src`` is in place (a folder cannot be renamed over a non-empty one)."""
    src, dst = Path(src), Path(dst)
    if src.is_dir() and dst.is_dir() and not dst.is_symlink():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _temp_name(path: Path, suffix: str) -> Path:
    return path.parent / f".{path.name}.tmp-{os.getpid()}-{time.time_ns()}-{next(_SEQ)}{suffix}"


@contextmanager
def atomic_path(path: str | os.PathLike, directory: bool = False) -> Iterator[Path]:
    """A temp path beside ``path`` to write into; on success it is renamed onto ``path`` with the
    umask's mode (like a plain ``open`` / ``mkdir``), on failure removed, so ``path`` is never half-written.

    ``directory``: the temp path is an empty folder (an existing ``path`` folder is moved aside, then
    removed, once the new one is in place); else nothing exists at the temp path (writers that open it
    by name, PIL, safetensors, matplotlib, see the suffix of ``path``). An error names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(path, "" if directory else path.suffix)
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        publish_modes(tmp)
        replace_path(tmp, path)
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename == str(tmp):
            raise type(e)(e.errno, f"cannot write {str(path)!r}: {e.strerror}") from e  # the user's path, not the temp
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(temp_path)`` then rename onto ``path`` (see :func:`atomic_path`); returns ``path``."""
    with atomic_path(path) as tmp:
        write(str(tmp))
    return Path(path)


def atomic_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically, with the umask's mode."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_images(images: Sequence[Any], path: str | os.PathLike) -> list[Path]:
    """One image -> ``path``; several -> ``stem_0.png``, ``stem_1.png``, ..."""
    path = Path(path)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise ValueError(f"out must end in one of {sorted(IMAGE_SUFFIXES)} for images, got {str(path)!r}")
    images = list(images)
    targets = [path] if len(images) == 1 else [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(len(images))]
    return [atomic_write(t, lambda tmp, im=im: to_pil(im).save(tmp)) for t, im in zip(targets, images)]


def save_frames(frames: Sequence[Any], path: str | os.PathLike, fps: int = 8) -> list[Path]:
    """Frames -> GIF (PIL) or MP4 (the ``video`` extra); a PNG path writes numbered frames."""
    path = Path(path)
    suffix = path.suffix.lower()
    pils = [to_pil(f) for f in frames]
    if suffix in IMAGE_SUFFIXES:
        return save_images(pils, path)
    if suffix == ".gif":
        return [
            atomic_write(
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

        return [atomic_write(path, write)]
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
    return atomic_write(path, grid.save)
