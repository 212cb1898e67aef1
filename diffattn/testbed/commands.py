"""What ``diffattn testbed ...`` runs: train a testbed model, export a dataset, list what ships."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _train_classifier(out: str | os.PathLike | None, seed: int, **options: Any) -> dict[str, Any]:
    from .classifier import train_classifier

    return train_classifier(out, seed=seed, **options)


def _train_diffusion(name: str) -> Callable[..., dict[str, Any]]:
    def run(out: str | os.PathLike | None, seed: int, **options: Any) -> dict[str, Any]:
        from .training import train_model

        return train_model(name, out, seed=seed, **options)

    return run


# name -> (out, seed, **options) -> training record; the diffusion models train on diffattn.lora's
# trainer (recipe "full", "full-video" or "lamamba"), see diffattn.testbed.training
TRAINERS: dict[str, Callable[..., dict[str, Any]]] = {
    "classifier": _train_classifier,
    "digits-unet": _train_diffusion("digits-unet"),
    "digits-dit": _train_diffusion("digits-dit"),
    "digits-video": _train_diffusion("digits-video"),
    "digits-lamamba": _train_diffusion("digits-lamamba"),
}


def train(name: str, out: str | os.PathLike | None = None, seed: int = 0, **options: Any) -> dict[str, Any]:
    """Train testbed target ``name`` (default output: its shipped folder inside the package)."""
    if name not in TRAINERS:
        raise ValueError(f"unknown testbed training target {name!r}; valid names: {', '.join(TRAINERS)}")
    return TRAINERS[name](out, seed, **options)


def export(
    name: str,
    out: str | os.PathLike,
    *,
    split: str = "train",
    count: int | None = None,
    seed: int = 0,
    size: int | None = None,
    frames: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Write testbed dataset ``name``: ``digits``, ``scenes``, ``photos`` as an image folder, ``moving`` as
    folders of frames."""
    from .data import DATASETS, build_dataset, write_image_folder, write_video_folder

    if name not in DATASETS:
        raise ValueError(f"unknown testbed dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if frames is not None and name != "moving":
        raise ValueError("--frames applies to the moving-digit clips only")
    kw: dict[str, Any] = {}
    if name == "digits":
        if count is not None:
            raise ValueError("digits has a fixed size per split; --count applies to scenes, photos and moving")
        kw = {"split": split, **({"size": size} if size else {})}
    elif name == "scenes":
        kw = {"split": split, "seed": seed, "num_scenes": count or 1000, **({"canvas": size} if size else {})}
    elif name == "moving":
        kw = {"split": split, "seed": seed, "num_clips": count or 1000, "channels": 3}
        kw.update({"canvas": size} if size else {})
        kw.update({"num_frames": frames} if frames else {})
        return write_video_folder(build_dataset(name, **kw), out, overwrite=overwrite)
    else:
        kw = {"seed": seed, "num_crops": count or 1000, **({"size": size} if size else {})}
    return write_image_folder(build_dataset(name, **kw), out, overwrite=overwrite)


def listing() -> list[str]:
    """One line per testbed model, the classifier and each dataset, saying what ships."""
    from .classifier import CLASSIFIER_DIR
    from .data import DATASETS
    from .models import MODELS, weights_dir

    lines = []
    for name, spec in MODELS.items():
        shipped = (weights_dir(name) / "model_index.json").is_file()
        lines.append(f"{name:14s} {'shipped' if shipped else 'not trained':12s} {spec.description}")
    clf = (CLASSIFIER_DIR / "config.json").is_file()
    lines.append(f"{'classifier':14s} {'shipped' if clf else 'not trained':12s} digit classifier, the judge of generated digits")
    for name, cls in DATASETS.items():
        doc = (cls.__doc__ or "").splitlines()[0].replace("``", "")
        lines.append(f"{name:14s} {'dataset':12s} {doc}")
    return lines
