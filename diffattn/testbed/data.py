"""Testbed data from installed packages only: digits, multi-digit scenes and sample photographs.

* :class:`DigitsDataset` — scikit-learn's 1,797 handwritten digits (8x8, 10 classes), upscaled to
  32x32, with a fixed stratified train / held-out split chosen by a seed.
* :class:`DigitScenesDataset` — 64x64 canvases with 1-4 digits in non-overlapping square boxes; each
  box is normalized ``xyxy`` with its class caption (``"a 3"``), plus a global caption.
* :class:`PhotoCropsDataset` — random square crops of scikit-image's bundled sample photographs
  (only those that ship with the package; nothing is downloaded), for resolution experiments.

Every dataset is deterministic given its seed: item ``i`` is drawn from a generator seeded with
``(seed, i)``, so it does not depend on the order items are read in. Items are dicts with
``pixel_values`` (``(C, H, W)`` float in ``[0, 1]``, white ink on black for digits) and ``caption``.

:func:`write_image_folder` exports any of them in the formats ``diffattn.lora`` reads: an image folder
with ``metadata.jsonl`` (``{"file_name", "text", "label"}`` per line) and, for scenes, ``boxes.jsonl``
(``{"file_name", "text", "boxes": [[x1, y1, x2, y2], ...], "box_captions": ["a 3", ...], "labels": [3, ...],
"normalized": true}``). Folders are written to a temporary directory and renamed into place, so an
interrupted export leaves nothing half-written.

scikit-learn and scikit-image are the ``testbed`` extra; they are imported only when data is loaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

NUM_CLASSES = 10
DIGIT_SIZE = 32  # testbed resolution of a single digit
SPLIT_SEED = 0  # the fixed train / held-out split everything here (classifier, models) uses
HELDOUT_FRACTION = 0.2

# scikit-image sample photographs that ship inside the wheel (checked offline with scikit-image
# 0.26: brain, cells3d, eagle, kidney, lily, skin, ... need pooch and a download and are left out).
# Synthetic images (checkerboard, logo, colorwheel, text pages, binary shapes) are not photographs.
PHOTOS = (
    "astronaut",
    "brick",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "grass",
    "gravel",
    "hubble_deep_field",
    "immunohistochemistry",
    "moon",
    "retina",
    "rocket",
)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:  # pragma: no cover - the dev/testbed extras install them
        raise ImportError(f"the testbed needs {module.split('.')[0]}: pip install 'diffattn[testbed]'") from e


def caption_for(label: int) -> str:
    """The class caption of a digit: ``3 -> "a 3"``."""
    return f"a {int(label)}"


def scene_caption(labels: Sequence[int]) -> str:
    """Global caption of a scene, digits in reading order: ``[3, 7, 1] -> "a 3, a 7 and a 1"``."""
    parts = [caption_for(lab) for lab in labels]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _rng(seed: int, index: int) -> np.random.Generator:
    # one stream per (seed, item): item i is the same whatever order items are read in
    return np.random.default_rng([int(seed), int(index)])


# --------------------------------------------------------------------------------------------------
# Digits
# --------------------------------------------------------------------------------------------------


def upscale_digits(digits8: torch.Tensor, size: int = DIGIT_SIZE) -> torch.Tensor:
    """(N, 1, 8, 8) in [0, 1] -> (N, 1, size, size): bilinear, the one resampling all testbed digits use."""
    return F.interpolate(digits8, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)


def load_digits_8x8() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 scikit-learn digits as ``(N, 1, 8, 8)`` float in [0, 1] and ``(N,)`` int64 labels."""
    datasets = _require("sklearn.datasets")
    d = datasets.load_digits()
    images = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0)[:, None]
    return images, torch.from_numpy(np.asarray(d.target, dtype=np.int64))


def split_indices(
    labels: torch.Tensor | np.ndarray, seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train, heldout)`` index arrays (sorted): ``round(fraction * n_c)`` of each class held out."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        held.append(rng.permutation(idx)[: int(round(heldout_fraction * len(idx)))])
    heldout = np.sort(np.concatenate(held))
    train = np.setdiff1d(np.arange(len(labels)), heldout)
    return train, heldout


def _split(split: str, labels: torch.Tensor, seed: int, heldout_fraction: float) -> np.ndarray:
    train, heldout = split_indices(labels, seed, heldout_fraction)
    choices = {"train": train, "heldout": heldout, "all": np.arange(len(labels))}
    if split not in choices:
        raise ValueError(f"split must be one of {list(choices)}, got {split!r}")
    return choices[split]


class DigitsDataset(Dataset):
    """scikit-learn digits upscaled to ``size`` x ``size``: items ``{"pixel_values", "label", "caption"}``.

    Args:
        split: ``"train"`` (80%), ``"heldout"`` (20%, stratified) or ``"all"``.
        seed: seed of the split (keep the default: the shipped classifier was trained on its train split).
        size: output side in pixels.
        channels: 1 (grayscale) or 3 (the gray value repeated, what RGB pipelines see).
    """

    def __init__(
        self,
        split: str = "train",
        seed: int = SPLIT_SEED,
        size: int = DIGIT_SIZE,
        channels: int = 1,
        heldout_fraction: float = HELDOUT_FRACTION,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        images8, labels = load_digits_8x8()
        self.indices = _split(split, labels, seed, heldout_fraction)
        idx = torch.from_numpy(self.indices)
        self.images = upscale_digits(images8[idx], size)  # (N, 1, size, size)
        self.labels = labels[idx]
        self.split, self.size, self.channels = split, size, channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        x = self.images[i]
        if self.channels == 3:
            x = x.expand(3, -1, -1).clone()
        label = int(self.labels[i])
        return {"pixel_values": x, "label": label, "caption": caption_for(label)}


# --------------------------------------------------------------------------------------------------
# Moving digits (video)
# --------------------------------------------------------------------------------------------------


# The moving-digit clips (digits-video's frames): the 8x8 scikit-learn digits drawn at 2x, so a digit
# pixel is 2x2 frame pixels. At their native 8 px on a 16 px canvas a tiny video transformer's leftover
# per-pixel noise looks like ink, and sampling sharpened it into speckle (chance-level accuracy after
# 1500 steps); at 2x the same budget gives compact moving blobs, though still not readable digits
# (the README's testbed section lists what was tried).
MOVING_CANVAS = 32  # side of the clips
MOVING_DIGIT = 16  # the digit's side in them
MOVING_SPEED = 2  # fastest motion on each axis, pixels per MOVING_SPEED_PERIOD frames (one digit pixel)
# frames per speed unit: 4 is one latent frame of digits-video (Wan's VAE stacks 4 frames), so the digit
# moves 1-2 px per latent frame, less than a 4 px token, as in a real video latent. At 1-2 px per frame
# a digit slid 4-8 px inside one latent frame, so a 4 px token's 4 stacked frames showed different parts of it.
MOVING_SPEED_PERIOD = 4


class MovingDigitsDataset(Dataset):
    """Clips of one digit gliding across a black canvas and bouncing off its edges.

    Items: ``pixel_values`` ``(C, num_frames, canvas, canvas)`` in ``[0, 1]`` (the channels-first
    video layout of diffusers' video VAEs), ``label``, ``caption`` (``"a 3"``) and ``positions``
    ``(num_frames, 2)`` (top-left ``x, y`` of the digit per frame, whole pixels). The start position, a
    velocity of ``1..max_speed`` pixels per ``speed_period`` frames on each axis (random signs; the
    position is rounded down, so the digit steps one pixel at a time) and the digit (from the given
    split of the scikit-learn digits) are drawn from ``(seed, i)``. Motion is periodic with a bounce, so a
    clip of any length is well defined: the same item at 4x ``num_frames`` continues the same path,
    which is what the length-extension experiment generates.
    """

    def __init__(
        self,
        num_clips: int = 1000,
        split: str = "train",
        seed: int = 0,
        num_frames: int = 29,
        canvas: int = MOVING_CANVAS,
        digit_size: int = MOVING_DIGIT,
        max_speed: int = MOVING_SPEED,
        channels: int = 1,
        split_seed: int = SPLIT_SEED,
        speed_period: int = MOVING_SPEED_PERIOD,
    ) -> None:
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        if not 4 <= digit_size < canvas:
            raise ValueError(f"need 4 <= digit_size < canvas, got digit_size={digit_size}, canvas={canvas}")
        if not 1 <= max_speed <= canvas - digit_size:
            raise ValueError(f"max_speed must be in [1, canvas - digit_size = {canvas - digit_size}], got {max_speed}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if speed_period < 1:
            raise ValueError(f"speed_period must be >= 1 frame, got {speed_period}")
        images8, labels = load_digits_8x8()
        idx = torch.from_numpy(_split(split, labels, split_seed, HELDOUT_FRACTION))
        self.digits = upscale_digits(images8[idx], digit_size)
        self.digit_labels = labels[idx]
        self.num_clips, self.seed, self.num_frames, self.canvas = num_clips, seed, num_frames, canvas
        self.digit_size, self.max_speed, self.channels = digit_size, max_speed, channels
        self.speed_period = speed_period

    def __len__(self) -> int:
        return self.num_clips

    def positions(self, rng: np.random.Generator) -> np.ndarray:
        """``(num_frames, 2)`` top-left corners along a straight path reflected at the canvas edges."""
        span = self.canvas - self.digit_size
        start = rng.integers(0, span + 1, size=2)
        speed = rng.integers(1, self.max_speed + 1, size=2) * rng.choice([-1, 1], size=2)
        p = self.speed_period  # in 1/p pixels until the floor: exact integer arithmetic, any length
        raw = (start[None, :] * p + np.arange(self.num_frames)[:, None] * speed[None, :]) // p
        folded = np.mod(raw, 2 * span)  # a triangle wave: the bounce
        return np.where(folded > span, 2 * span - folded, folded).astype(np.int64)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_clips:
            raise IndexError(i)
        rng = _rng(self.seed, i)
        pick = int(rng.integers(0, len(self.digit_labels)))
        pos = self.positions(rng)
        s = self.digit_size
        video = torch.zeros(1, self.num_frames, self.canvas, self.canvas)
        for t, (x, y) in enumerate(pos.tolist()):
            video[0, t, y : y + s, x : x + s] = self.digits[pick, 0]
        if self.channels == 3:
            video = video.expand(3, -1, -1, -1).clone()
        label = int(self.digit_labels[pick])
        return {"pixel_values": video, "label": label, "caption": caption_for(label), "positions": torch.from_numpy(pos)}


# --------------------------------------------------------------------------------------------------
# Multi-digit scenes
# --------------------------------------------------------------------------------------------------


def _overlaps(box: tuple[int, int, int, int], others: list[tuple[int, int, int, int]]) -> bool:
    x0, y0, x1, y1 = box
    return any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in others)


class DigitScenesDataset(Dataset):
    """Canvases with 1-4 digits at random non-overlapping square boxes.

    Items: ``pixel_values`` ``(C, canvas, canvas)``, ``boxes`` ``(k, 4)`` float normalized ``xyxy``,
    ``labels`` ``(k,)`` int64, ``caption`` (the global caption, digits ordered left to right) and
    ``instances`` (``[{"box": [...], "caption": "a 3", "label": 3}, ...]``, same order). Digits come
    from the given split of :class:`DigitsDataset`, each upscaled from its 8x8 source to its box size.
    Batch them with :func:`collate_scenes`.
    """

    def __init__(
        self,
        num_scenes: int = 1000,
        split: str = "train",
        seed: int = 0,
        canvas: int = 64,
        min_digits: int = 1,
        max_digits: int = 4,
        min_size: int = 16,
        max_size: int = 28,
        channels: int = 1,
        split_seed: int = SPLIT_SEED,
    ) -> None:
        if not 1 <= min_digits <= max_digits:
            raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
        if not 4 <= min_size <= max_size <= canvas:
            raise ValueError(f"need 4 <= min_size <= max_size <= canvas, got {min_size}, {max_size}, {canvas}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        images8, labels = load_digits_8x8()
        idx = torch.from_numpy(_split(split, labels, split_seed, HELDOUT_FRACTION))
        self.digits8, self.digit_labels = images8[idx], labels[idx]
        self.num_scenes, self.seed, self.canvas, self.channels = num_scenes, seed, canvas, channels
        self.min_digits, self.max_digits, self.min_size, self.max_size = min_digits, max_digits, min_size, max_size

    def __len__(self) -> int:
        return self.num_scenes

    def _layout(self, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
        k = int(rng.integers(self.min_digits, self.max_digits + 1))
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(k):
            for _attempt in range(200):  # rejection sampling; a crowded canvas just gets fewer digits
                s = int(rng.integers(self.min_size, self.max_size + 1))
                x, y = (int(v) for v in rng.integers(0, self.canvas - s + 1, size=2))
                box = (x, y, x + s, y + s)
                if not _overlaps(box, boxes):
                    boxes.append(box)
                    break
        return sorted(boxes, key=lambda b: (b[0], b[1]))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_scenes:
            raise IndexError(i)
        rng = _rng(self.seed, i)
        boxes = self._layout(rng)
        picks = rng.integers(0, len(self.digit_labels), size=len(boxes))
        img = torch.zeros(1, self.canvas, self.canvas)
        for (x0, y0, x1, y1), p in zip(boxes, picks):
            digit = upscale_digits(self.digits8[int(p)][None], x1 - x0)[0]
            img[:, y0:y1, x0:x1] = torch.maximum(img[:, y0:y1, x0:x1], digit)
        if self.channels == 3:
            img = img.expand(3, -1, -1).clone()
        labs = [int(self.digit_labels[int(p)]) for p in picks]
        norm = torch.tensor(boxes, dtype=torch.float32) / self.canvas
        instances = [
            {"box": [round(float(v), 6) for v in b], "caption": caption_for(lab), "label": lab}
            for b, lab in zip(norm.tolist(), labs)
        ]
        return {
            "pixel_values": img,
            "boxes": norm.reshape(-1, 4),
            "labels": torch.tensor(labs, dtype=torch.int64),
            "caption": scene_caption(labs),
            "instances": instances,
        }


def collate_scenes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch scenes: boxes padded to the most digits in the batch, with a ``box_mask``."""
    n = max(len(it["labels"]) for it in items)
    boxes = torch.zeros(len(items), n, 4)
    labels = torch.full((len(items), n), -1, dtype=torch.int64)
    mask = torch.zeros(len(items), n, dtype=torch.bool)
    for b, it in enumerate(items):
        k = len(it["labels"])
        boxes[b, :k], labels[b, :k], mask[b, :k] = it["boxes"], it["labels"], True
    return {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "boxes": boxes,
        "labels": labels,
        "box_mask": mask,
        "caption": [it["caption"] for it in items],
        "instances": [it["instances"] for it in items],
    }


# --------------------------------------------------------------------------------------------------
# Sample photographs
# --------------------------------------------------------------------------------------------------


def load_photo(name: str) -> np.ndarray:
    """A bundled scikit-image sample photograph as ``(H, W, 3)`` uint8 (grayscale ones repeated)."""
    if name not in PHOTOS:
        raise ValueError(f"unknown photo {name!r}; bundled photos: {', '.join(PHOTOS)}")
    skdata = _require("skimage.data")
    arr = np.asarray(getattr(skdata, name)())
    if arr.dtype != np.uint8:
        arr = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3])


def available_photos() -> list[str]:
    """The photos of :data:`PHOTOS` that load here, offline."""
    ok = []
    for name in PHOTOS:
        try:
            load_photo(name)
        except Exception:  # noqa: BLE001 - a photo that needs a download is simply not available
            continue
        ok.append(name)
    return ok


class PhotoCropsDataset(Dataset):
    """Random square crops of the bundled photographs, resized to ``size`` x ``size`` (RGB).

    Crop ``i`` picks a photo uniformly, a crop side uniformly in ``[size / max_zoom, size / min_zoom]``
    source pixels (clamped to the photo), a uniform position, and resamples it (bicubic, PIL) to
    ``size``: ``min_zoom = max_zoom = 1`` gives native-resolution crops. Captions are
    ``"a photo of <name>"``.
    """

    def __init__(
        self,
        size: int = 64,
        num_crops: int = 1000,
        seed: int = 0,
        photos: Sequence[str] | None = None,
        min_zoom: float = 0.25,
        max_zoom: float = 1.0,
    ) -> None:
        if size < 1 or not 0 < min_zoom <= max_zoom:
            raise ValueError(f"need size >= 1 and 0 < min_zoom <= max_zoom, got {size}, {min_zoom}, {max_zoom}")
        names = list(photos) if photos is not None else list(PHOTOS)
        from PIL import Image

        self.photos = {n: Image.fromarray(load_photo(n)) for n in names}
        self.names = names
        self.size, self.num_crops, self.seed = size, num_crops, seed
        self.min_zoom, self.max_zoom = min_zoom, max_zoom

    def __len__(self) -> int:
        return self.num_crops

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_crops:
            raise IndexError(i)
        from PIL import Image

        rng = _rng(self.seed, i)
        name = self.names[int(rng.integers(len(self.names)))]
        photo = self.photos[name]
        w, h = photo.size
        lo, hi = self.size / self.max_zoom, self.size / self.min_zoom
        side = float(min(rng.uniform(lo, hi), w, h))
        x0, y0 = rng.uniform(0, w - side), rng.uniform(0, h - side)
        crop = photo.resize((self.size, self.size), Image.BICUBIC, box=(x0, y0, x0 + side, y0 + side))
        x = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        return {"pixel_values": x, "caption": f"a photo of {name.replace('_', ' ')}", "photo": name}


# --------------------------------------------------------------------------------------------------
# Writers
# --------------------------------------------------------------------------------------------------


def _to_pil(x: torch.Tensor, mode: str) -> Any:
    from PIL import Image

    arr = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert(mode)


def write_image_folder(
    dataset: Iterable[dict[str, Any]] | Dataset,
    out_dir: str | os.PathLike,
    *,
    mode: str = "RGB",
    sidecar_txt: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export a dataset as PNGs plus ``metadata.jsonl`` (and ``boxes.jsonl`` when items have ``instances``).

    Args:
        dataset: items with ``pixel_values`` and ``caption`` (``label`` / ``instances`` are kept).
        out_dir: the folder to create; written under a temporary name and renamed when complete.
        mode: ``"RGB"`` (default: what RGB pipelines train on) or ``"L"``.
        sidecar_txt: also write ``NNNNN.txt`` captions next to the images.
        overwrite: replace an existing folder (otherwise it is an error).

    Returns:
        ``out_dir``.
    """
    meta, boxes = [], []

    def write(tmp: Path, items: Iterable[tuple[int, dict[str, Any]]]) -> None:
        for i, item in items:
            name = f"{i:05d}.png"
            _to_pil(item["pixel_values"], mode).save(tmp / name)
            row: dict[str, Any] = {"file_name": name, "text": item["caption"]}
            if "label" in item:
                row["label"] = int(item["label"])
            meta.append(row)
            if "instances" in item:  # the layout diffattn.lora's BoxesJsonl reads
                inst = item["instances"]
                boxes.append(
                    {
                        "file_name": name,
                        "text": item["caption"],
                        "boxes": [i["box"] for i in inst],
                        "box_captions": [i["caption"] for i in inst],
                        "labels": [i["label"] for i in inst],
                        "normalized": True,
                    }
                )
            if sidecar_txt:
                (tmp / f"{i:05d}.txt").write_text(item["caption"] + "\n")
        _write_jsonl(tmp / "metadata.jsonl", meta)
        if boxes:
            _write_jsonl(tmp / "boxes.jsonl", boxes)

    return _publish_folder(dataset, out_dir, write, mode, overwrite, progress)


def write_video_folder(
    dataset: Iterable[dict[str, Any]] | Dataset,
    out_dir: str | os.PathLike,
    *,
    mode: str = "RGB",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Export video items (``pixel_values`` ``(C, T, H, W)``) as one folder of PNG frames per clip.

    The layout ``diffattn.lora``'s video datasets read: ``NNNNN/000.png ...`` plus ``metadata.jsonl``
    (``{"file_name": "NNNNN", "text", "label"}``); written under a temporary name, then renamed.
    """
    meta = []

    def write(tmp: Path, items: Iterable[tuple[int, dict[str, Any]]]) -> None:
        for i, item in items:
            video = item["pixel_values"]
            if video.dim() != 4:
                raise ValueError(f"item {i}: pixel_values must be (C, T, H, W), got {tuple(video.shape)}")
            clip = tmp / f"{i:05d}"
            clip.mkdir()
            for t in range(video.shape[1]):
                _to_pil(video[:, t], mode).save(clip / f"{t:03d}.png")
            row: dict[str, Any] = {"file_name": clip.name, "text": item["caption"]}
            if "label" in item:
                row["label"] = int(item["label"])
            meta.append(row)
        _write_jsonl(tmp / "metadata.jsonl", meta)

    return _publish_folder(dataset, out_dir, write, mode, overwrite, progress)


def _publish_folder(
    dataset: Iterable[dict[str, Any]] | Dataset,
    out_dir: str | os.PathLike,
    write: Callable[[Path, Iterable[tuple[int, dict[str, Any]]]], None],
    mode: str,
    overwrite: bool,
    progress: bool,
) -> Path:
    """Run ``write(tmp, enumerated items)`` into a temp folder beside ``out_dir``, then rename it into place."""
    from tqdm.auto import tqdm

    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be 'RGB' or 'L', got {mode!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    from ..io import atomic_path

    with atomic_path(out, directory=True) as tmp:
        total = len(dataset) if hasattr(dataset, "__len__") else None  # type: ignore[arg-type]
        write(tmp, enumerate(tqdm(dataset, total=total, desc=f"writing {out.name}", disable=not progress)))
    return out


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


DATASETS: dict[str, Callable[..., Dataset]] = {
    "digits": DigitsDataset,
    "scenes": DigitScenesDataset,
    "photos": PhotoCropsDataset,
    "moving": MovingDigitsDataset,
}


def build_dataset(name: str, **kwargs: Any) -> Dataset:
    """A testbed dataset by name (``digits``, ``scenes``, ``photos``, ``moving``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown testbed dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return DATASETS[name](**kwargs)
