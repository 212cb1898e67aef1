"""Training datasets: image folders, video folders and JSON-lines files of boxes with captions.

Bad files: every dataset checks all of its files when it is built (before any model is loaded) and
raises one :class:`DataError` that lists every unreadable file, every file without a caption and every
video shorter than the requested frame count. Nothing is skipped silently: a run trains on exactly the
files in the folder or fails before it starts.

Randomness (random crops, the start frame of a clip) comes from the per-sample generator the trainer
passes in (seeded from the run seed, the epoch and the sample index), so an item is the same whichever
process loads it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_EXTS = {".gif", ".mp4", ".webm", ".mov"}
METADATA = "metadata.jsonl"
CAPTION_KEYS = ("text", "caption", "prompt")


class DataError(ValueError):
    """A dataset problem; the message names every offending file."""


def _listing(problems: list[str], limit: int = 20) -> str:
    more = f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else ""
    return "\n  " + "\n  ".join(problems[:limit]) + more


def _check_root(root: str | os.PathLike) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {str(root)!r} does not exist")
    if root.is_dir() and not any(root.iterdir()):
        raise DataError(f"data folder {str(root)!r} is empty")
    return root


def _read_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """``metadata.jsonl`` rows keyed by ``file_name``; a malformed line is an error naming its number."""
    rows: dict[str, dict[str, Any]] = {}
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or "file_name" not in row:
            raise DataError(f"{path}:{i}: each line needs a 'file_name' key")
        rows[str(row["file_name"])] = row
    return rows


def _caption_of(row: dict[str, Any] | None) -> str | None:
    if row is None:
        return None
    for key in CAPTION_KEYS:
        if isinstance(row.get(key), str):
            return row[key]
    return None


def _sidecar_caption(path: Path) -> str | None:
    """``x.png`` -> ``x.txt``; a frame folder ``clip/`` -> ``clip.txt`` or ``clip/caption.txt``."""
    for cand in (path.with_suffix(".txt"), path.parent / f"{path.name}.txt", path / "caption.txt"):
        if cand != path and cand.is_file():
            return cand.read_text().strip()
    return None


def resize_crop(
    img: Image.Image, size: tuple[int, int], crop: str, box: tuple[float, float] | None
) -> tuple[Image.Image, tuple[float, float, float]]:
    """Resize so the image covers ``size`` (height, width), then crop to it.

    ``crop`` is "center" or "random"; a random crop takes its position ``box`` (two numbers in [0, 1))
    from the caller so every frame of a clip gets the same crop.  Returns the image and
    ``(scale, left, top)`` so boxes can follow the same transform.
    """
    h, w = size
    scale = max(h / img.height, w / img.width)
    nh, nw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
    img = img.resize((nw, nh), Image.BICUBIC)
    fx, fy = (0.5, 0.5) if crop == "center" or box is None else box
    left, top = int(round((nw - w) * fx)), int(round((nh - h) * fy))
    return img.crop((left, top, left + w, top + h)), (scale, float(left), float(top))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> (3, H, W) float in [-1, 1], the range every diffusers VAE expects."""
    arr = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _crop_pos(generator: torch.Generator | None, crop: str) -> tuple[float, float] | None:
    if crop != "random" or generator is None:
        return None
    u = torch.rand(2, generator=generator)
    return float(u[0]), float(u[1])


def _size(resolution: int | tuple[int, int]) -> tuple[int, int]:
    return (
        (resolution, resolution) if isinstance(resolution, int) else (int(resolution[0]), int(resolution[1]))
    )


def parse_buckets(spec: str | None, resolution: int | tuple[int, int]) -> list[tuple[int, int]] | None:
    """``None`` -> no bucketing; "auto" -> about ``resolution**2`` pixels at aspect ratios 1, 4:3, 3:4,
    16:9, 9:16 (sides multiples of 8); "HxW,HxW,..." -> those sizes."""
    if not spec:
        return None
    if spec == "auto":
        h0, w0 = _size(resolution)
        area = h0 * w0
        out = []
        for r in (1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16):  # r = width / height
            h = max(8, round((area / r) ** 0.5 / 8) * 8)
            w = max(8, round((area * r) ** 0.5 / 8) * 8)
            if (h, w) not in out:
                out.append((h, w))
        return out
    out = []
    for part in spec.split(","):
        try:
            h, w = (int(x) for x in part.lower().strip().split("x"))
        except ValueError as e:
            raise ValueError(
                f"--buckets expects 'auto' or HxW,HxW,... (e.g. 512x512,384x640), got {part!r}"
            ) from e
        out.append((h, w))
    return out


def _dims(path: Path) -> tuple[int, int]:
    """(width, height) of an image, a clip's first frame or a frame folder's first frame."""
    if path.is_dir():
        path = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)[0]
    if path.suffix.lower() in IMAGE_EXTS | {".gif"}:
        with Image.open(path) as im:
            return im.size
    import imageio.v2 as imageio

    reader = imageio.get_reader(str(path))
    try:
        w, h = reader.get_meta_data()["size"]
    finally:
        reader.close()
    return int(w), int(h)


@dataclass
class Item:
    path: Path
    caption: str
    extra: dict[str, Any]


class ImageFolder(torch.utils.data.Dataset):
    """Images in a folder (recursively) with captions from sidecar ``.txt`` files or ``metadata.jsonl``.

    ``metadata.jsonl`` lines look like ``{"file_name": "a.png", "text": "a red cat"}`` (``caption`` or
    ``prompt`` also work); a sidecar ``a.txt`` wins over it.  ``default_caption`` fills in for files
    with no caption; without it, any missing caption is an error listing the files.
    """

    kind = "image"

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | tuple[int, int] = 512,
        crop: str = "center",
        default_caption: str | None = None,
        buckets: list[tuple[int, int]] | None = None,
    ) -> None:
        if crop not in ("center", "random"):
            raise ValueError(f"crop must be 'center' or 'random', got {crop!r}")
        self.root = _check_root(root)
        self.size = _size(resolution)
        self.crop = crop
        self.items = self._scan(default_caption)
        self.buckets = list(buckets) if buckets else None
        if self.buckets:
            for item in self.items:  # the bucket whose aspect ratio is closest (in log scale)
                w, h = _dims(item.path)
                item.extra["size"] = min(self.buckets, key=lambda b: abs(np.log((b[1] / b[0]) / (w / h))))

    def groups(self) -> list[list[int]] | None:
        """Sample indices per size bucket (non-empty buckets only), or ``None`` without bucketing."""
        if not self.buckets:
            return None
        by = {b: [i for i, it in enumerate(self.items) if it.extra["size"] == b] for b in self.buckets}
        return [g for g in by.values() if g]

    def _files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)

    def _scan(self, default_caption: str | None) -> list[Item]:
        meta_path = self.root / METADATA
        meta = _read_metadata(meta_path) if meta_path.is_file() else {}
        files = self._files()
        if not files:
            raise DataError(
                f"data folder {str(self.root)!r} has no {self.kind} files ({', '.join(sorted(self._exts()))})"
            )
        items, unreadable, uncaptioned = [], [], []
        for f in files:
            err = self._check(f)
            if err:
                unreadable.append(f"{f}: {err}")
                continue
            rel = f.relative_to(self.root).as_posix()
            cap = _sidecar_caption(f)
            if cap is None:
                cap = _caption_of(meta.get(rel))
            if cap is None:
                cap = default_caption
            if cap is None:
                uncaptioned.append(str(f))
                continue
            items.append(Item(f, cap, {}))
        missing_meta = sorted(set(meta) - {f.relative_to(self.root).as_posix() for f in files})
        problems = unreadable + [
            f"{p}: no caption (no sidecar .txt, no {METADATA} entry)" for p in uncaptioned
        ]
        problems += [f"{meta_path}: lists {name!r}, which is not in the folder" for name in missing_meta]
        if problems:
            raise DataError(
                f"{len(problems)} problem(s) in data folder {str(self.root)!r}:{_listing(problems)}"
            )
        return items

    def _exts(self) -> set[str]:
        return IMAGE_EXTS

    def _check(self, path: Path) -> str | None:
        try:
            with Image.open(path) as im:
                im.verify()
        except Exception as e:  # PIL raises many types for broken files
            return f"unreadable image ({type(e).__name__}: {e})"
        return None

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Sample ``index`` with its random choices drawn from ``generator``."""
        item = self.items[index]
        with Image.open(item.path) as im:
            size = item.extra.get("size", self.size)
            img, _ = resize_crop(im.convert("RGB"), size, self.crop, _crop_pos(generator, self.crop))
        return {"pixels": to_tensor(img), "caption": item.caption, "index": index}

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)


def _gif_frames(path: Path) -> tuple[list[Image.Image], float]:
    with Image.open(path) as im:
        frames, durations = [], []
        for i in range(getattr(im, "n_frames", 1)):
            im.seek(i)
            frames.append(im.convert("RGB"))
            durations.append(im.info.get("duration", 100) or 100)
    return frames, 1000.0 / (sum(durations) / len(durations))


def _mp4_frames(path: Path) -> tuple[list[Image.Image], float]:
    try:
        import imageio.v2 as imageio
    except ImportError as e:
        raise DataError(
            f"{path}: reading {path.suffix} needs the video extra: pip install 'diffattn[video]'"
        ) from e
    reader = imageio.get_reader(str(path))
    try:
        fps = float(reader.get_meta_data().get("fps", 8.0))
        frames = [Image.fromarray(f) for f in reader]
    finally:
        reader.close()
    return frames, fps


def _probe(path: Path, folder_fps: float) -> tuple[int, float]:
    """(frame count, native fps) without decoding the frames; a frame folder plays at ``folder_fps``."""
    if path.is_dir():
        return len([p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS]), folder_fps
    if path.suffix.lower() == ".gif":
        with Image.open(path) as im:
            durations = []
            for i in range(getattr(im, "n_frames", 1)):
                im.seek(i)
                durations.append(im.info.get("duration", 100) or 100)
        return len(durations), 1000.0 / (sum(durations) / len(durations))
    try:
        import imageio.v2 as imageio
    except ImportError as e:
        raise DataError(
            f"{path}: reading {path.suffix} needs the video extra: pip install 'diffattn[video]'"
        ) from e
    reader = imageio.get_reader(str(path))
    try:
        n, fps = reader.count_frames(), float(reader.get_meta_data().get("fps", folder_fps))
    finally:
        reader.close()
    return int(n), fps


class VideoFolder(ImageFolder):
    """Clips (GIF; MP4/WebM/MOV through the ``video`` extra) or folders of frames, with captions.

    Each clip is read at ``fps`` (frames are picked with a stride from the clip's own fps; frame folders
    are taken to be at ``source_fps``, default ``fps``) and cut to ``num_frames`` frames, starting at a
    position drawn from the sample's generator (or the first frame without one).  A clip with fewer
    frames than that is an error naming the clip and its length.
    """

    kind = "video"

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int | tuple[int, int] = 256,
        num_frames: int = 16,
        fps: float | None = None,
        source_fps: float | None = None,
        crop: str = "center",
        default_caption: str | None = None,
        buckets: list[tuple[int, int]] | None = None,
    ) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        self.num_frames, self.fps, self.source_fps = num_frames, fps, source_fps
        super().__init__(root, resolution, crop, default_caption, buckets)

    def _exts(self) -> set[str]:
        return VIDEO_EXTS | {"<folder of frames>"}

    def _files(self) -> list[Path]:
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_file() and p.suffix.lower() in VIDEO_EXTS:
                out.append(p)
            elif p.is_dir() and any(q.suffix.lower() in IMAGE_EXTS for q in p.iterdir()):
                out.append(p)
        return out

    def _stride(self, native_fps: float) -> int:
        return 1 if self.fps is None else max(1, round(native_fps / self.fps))

    def _check(self, path: Path) -> str | None:
        try:
            n, native = _probe(path, self.source_fps or self.fps or 8.0)
        except DataError:
            raise
        except Exception as e:  # decoders raise many types for broken files
            return f"unreadable video ({type(e).__name__}: {e})"
        need = (self.num_frames - 1) * self._stride(native) + 1
        if n < need:
            at = f" at fps={self.fps}" if self.fps else ""
            return f"has {n} frames, fewer than the {need} needed for num_frames={self.num_frames}{at}"
        return None

    def _frames(self, path: Path) -> tuple[list[Image.Image], float]:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS)
            frames = []
            for f in files:
                with Image.open(f) as im:
                    frames.append(im.convert("RGB"))
            return frames, float(self.source_fps or self.fps or 8.0)
        if path.suffix.lower() == ".gif":
            return _gif_frames(path)
        return _mp4_frames(path)

    def load(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        item = self.items[index]
        frames, native = self._frames(item.path)
        stride = self._stride(native)
        span = (self.num_frames - 1) * stride + 1
        start = 0
        if generator is not None and len(frames) > span:
            start = int(torch.randint(0, len(frames) - span + 1, (1,), generator=generator))
        pos = _crop_pos(generator, self.crop)
        picked = frames[start : start + span : stride]
        size = item.extra.get("size", self.size)
        tensors = [to_tensor(resize_crop(f, size, self.crop, pos)[0]) for f in picked]
        # (C, F, H, W): the layout of every diffusers video VAE
        return {"pixels": torch.stack(tensors, dim=1), "caption": item.caption, "index": index}


class BoxesJsonl(torch.utils.data.Dataset):
    """A JSON-lines file of images with boxes and region captions (for regional control).

    Each line: ``{"file_name": "a.png", "caption": "...", "boxes": [[x0, y0, x1, y1], ...],
    "box_captions": ["...", ...]}`` with pixel boxes in the original image (or ``"normalized": true``
    for [0, 1] boxes).  Paths are relative to the file's folder.  Items give boxes in [0, 1] of the
    cropped image, clipped, in a (N, 4) tensor.
    """

    kind = "boxes"

    def __init__(
        self, path: str | os.PathLike, resolution: int | tuple[int, int] = 512, crop: str = "center"
    ) -> None:
        path = Path(path)
        if path.is_dir():
            cands = sorted(path.glob("*.jsonl"))
            if not cands:
                _check_root(path)
                raise DataError(f"data folder {str(path)!r} has no .jsonl file of boxes")
            path = cands[0]
        if not path.is_file():
            raise DataError(f"boxes file {str(path)!r} does not exist")
        self.path, self.size, self.crop = path, _size(resolution), crop
        self.rows: list[dict[str, Any]] = []
        problems: list[str] = []
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            raise DataError(f"boxes file {str(path)!r} is empty")
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(f"{path}:{i}: not valid JSON ({e.msg})")
                continue
            img = path.parent / str(row.get("file_name", ""))
            cap, boxes = _caption_of(row), row.get("boxes")
            caps = row.get("box_captions", [])
            if not img.is_file():
                problems.append(f"{path}:{i}: image {str(img)!r} not found")
            elif cap is None:
                problems.append(f"{path}:{i}: no caption")
            elif not isinstance(boxes, list) or any(len(b) != 4 for b in boxes):
                problems.append(f"{path}:{i}: 'boxes' must be a list of [x0, y0, x1, y1]")
            elif len(caps) != len(boxes):
                problems.append(f"{path}:{i}: {len(boxes)} boxes but {len(caps)} box_captions")
            else:
                self.rows.append({**row, "_image": img, "_caption": cap})
        if problems:
            raise DataError(f"{len(problems)} problem(s) in {str(path)!r}:{_listing(problems)}")

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, index: int, generator: torch.Generator | None = None) -> dict[str, Any]:
        """Row ``index``: the image resized and cropped to the training size, its boxes mapped with it."""
        row = self.rows[index]
        with Image.open(row["_image"]) as im:
            w0, h0 = im.size
            img, (scale, left, top) = resize_crop(
                im.convert("RGB"), self.size, self.crop, _crop_pos(generator, self.crop)
            )
        b = torch.tensor(row["boxes"], dtype=torch.float32).reshape(-1, 4)
        if row.get("normalized"):
            b = b * torch.tensor([w0, h0, w0, h0])
        h, w = self.size
        b = (b * scale - torch.tensor([left, top, left, top])) / torch.tensor([w, h, w, h])
        return {
            "pixels": to_tensor(img),
            "caption": row["_caption"],
            "boxes": b.clamp(0.0, 1.0),
            "box_captions": list(row["box_captions"]),
            "index": index,
        }

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.load(index)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep captions, boxes and box captions as lists."""
    out: dict[str, Any] = {"pixels": torch.stack([s["pixels"] for s in samples])}
    for key in samples[0]:
        if key != "pixels":
            out[key] = [s[key] for s in samples]
    return out


def build_dataset(kind: str, path: str | os.PathLike, **kw: Any) -> torch.utils.data.Dataset:
    """``kind`` is "image", "video" or "boxes"; keyword arguments go to the dataset class."""
    classes = {"image": ImageFolder, "video": VideoFolder, "boxes": BoxesJsonl}
    if kind not in classes:
        raise ValueError(f"unknown dataset kind {kind!r}; valid: {sorted(classes)}")
    cls = classes[kind]
    import inspect

    accepted = set(inspect.signature(cls.__init__).parameters)
    if kw.get("buckets") and "buckets" not in accepted:
        raise ValueError(f"--buckets: size bucketing is not available for {kind} data")
    return cls(path, **{k: v for k, v in kw.items() if k in accepted and v is not None})
