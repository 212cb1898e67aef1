"""The digit classifier: the judge of generated digits (class accuracy, per-box accuracy in scenes).

A small CNN (three conv-BN-ReLU-pool stages, ~90k parameters, ~0.4 MB) trained on the train split of
:class:`~diffattn.testbed.data.DigitsDataset` with light affine / contrast / noise augmentation so that
it judges generated digits, not just the exact training pixels. Shipped as a diffusers-style folder
(``config.json`` + safetensors + ``training.json``) in ``diffattn/testbed/weights/digit-classifier``.

Retrain it (seeded; about a minute on 2 CPU cores)::

    diffattn testbed train classifier

Any image (PIL, numpy HWC / NHWC, torch CHW / NCHW; RGB, RGBA or gray; any size) goes through
:func:`to_classifier_input`, the one conversion to 32x32 grayscale used everywhere.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from ..io import atomic_path
from .data import DIGIT_SIZE, NUM_CLASSES, DigitsDataset

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
CLASSIFIER_DIR = WEIGHTS_DIR / "digit-classifier"
TRAINING_FILE = "training.json"
RETRAIN_COMMAND = "diffattn testbed train classifier"

# ITU-R BT.601 luma, the weights PIL's convert("L") uses
_LUMA = (0.299, 0.587, 0.114)


class DigitClassifier(ModelMixin, ConfigMixin):
    """Small CNN: ``(N, 1, 32, 32)`` grayscale in [0, 1] (white ink on black) -> ``(N, 10)`` logits."""

    @register_to_config
    def __init__(
        self,
        channels: tuple[int, ...] = (16, 32, 64),
        hidden: int = 64,
        num_classes: int = NUM_CLASSES,
        image_size: int = DIGIT_SIZE,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 1
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** len(channels)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(c_in * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x * 2.0 - 1.0))

    @torch.no_grad()
    def predict(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Predicted labels ``(N,)`` of images in any format :func:`to_classifier_input` accepts."""
        p = next(self.parameters())
        x = to_classifier_input(images, size=self.config.image_size).to(device=p.device, dtype=p.dtype)
        return torch.cat([self(x[i : i + batch_size]).argmax(-1) for i in range(0, len(x), batch_size)])

    @torch.no_grad()
    def embed(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Penultimate activations ``(N, hidden)`` (after the hidden layer's ReLU, before the logits) of
        images in any format :func:`to_classifier_input` accepts; computed in eval mode (no dropout).

        These are the features :func:`diffattn.testbed.metrics.frechet_distance` fits its Gaussians to.
        """
        was_training = self.training
        self.eval()
        p = next(self.parameters())
        x = to_classifier_input(images, size=self.config.image_size).to(device=p.device, dtype=p.dtype)
        penultimate = self.head[:-1]  # Flatten, Dropout, Linear, ReLU
        try:
            return torch.cat(
                [penultimate(self.features(x[i : i + batch_size] * 2.0 - 1.0)) for i in range(0, len(x), batch_size)]
            )
        finally:
            self.train(was_training)


# --------------------------------------------------------------------------------------------------
# The one image conversion
# --------------------------------------------------------------------------------------------------


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) float -> (N, 1, H, W): luma for RGB(A), the channel itself for gray."""
    if x.shape[1] == 1:
        return x
    if x.shape[1] in (3, 4):
        w = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x[:, :3] * w).sum(1, keepdim=True)
    raise ValueError(f"images must have 1, 3 or 4 channels, got {x.shape[1]} (shape {tuple(x.shape)})")


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _array_to_nchw(arr: np.ndarray) -> torch.Tensor:
    """numpy images: (H, W), (H, W, C), (N, H, W), (N, H, W, C) or (N, C, H, W) -> NCHW float tensor."""
    arr = np.ascontiguousarray(arr)
    t = _as_float(torch.from_numpy(arr if arr.flags.writeable else arr.copy()))  # PIL arrays are read-only
    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        return t.permute(2, 0, 1)[None] if t.shape[-1] in (1, 3, 4) else t[:, None]
    if t.ndim == 4:
        if t.shape[-1] in (1, 3, 4):
            return t.permute(0, 3, 1, 2)
        return t
    raise ValueError(f"expected an image array with 2-4 dims, got shape {arr.shape}")


def to_classifier_input(images: Any, size: int = DIGIT_SIZE) -> torch.Tensor:
    """Images in any common format -> ``(N, 1, size, size)`` float32 grayscale in [0, 1].

    Accepts a PIL image or a list of them, numpy arrays (``HW``, ``HWC``, ``NHW``, ``NHWC``; uint8 or
    float in [0, 1]) and torch tensors (``CHW`` / ``NCHW``; uint8 or float in [0, 1]). Color is reduced
    with BT.601 luma (alpha dropped) and the result resampled bilinearly with antialiasing (identity at
    ``size``), which is how testbed digits are made; tensors stay on their device.
    """
    from PIL import Image

    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("no images given")
        return torch.cat([to_classifier_input(im, size) for im in images])
    if isinstance(images, torch.Tensor):
        x = _as_float(images)
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4:
            raise ValueError(f"expected a CHW or NCHW tensor, got shape {tuple(images.shape)}")
    else:
        if isinstance(images, Image.Image) and images.mode not in ("L", "RGB", "RGBA"):
            images = images.convert("RGB")
        x = _array_to_nchw(np.asarray(images))
    x = _gray(x)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Loading, evaluating, training
# --------------------------------------------------------------------------------------------------


def load_classifier(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """The shipped classifier (or the one saved at ``path``), in eval mode."""
    folder = Path(path) if path is not None else CLASSIFIER_DIR
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(
            f"no digit classifier at {folder} (missing {config.name}); train it with `{RETRAIN_COMMAND}`"
        )
    cls_name = json.loads(config.read_text()).get("_class_name")
    if cls_name != DigitClassifier.__name__:
        raise ValueError(f"{config} describes a {cls_name!r}, expected {DigitClassifier.__name__!r}")
    model = DigitClassifier.from_pretrained(folder)
    return model.to(device).eval()


@torch.no_grad()
def accuracy(model: DigitClassifier, images: Any, labels: Sequence[int] | torch.Tensor) -> float:
    """Fraction of ``images`` the classifier labels as ``labels``."""
    was_training = model.training
    model.eval()
    pred = model.predict(images).cpu()
    model.train(was_training)
    labels = torch.as_tensor(labels).cpu()
    return float((pred == labels).float().mean())


def features(images: Any, classifier: DigitClassifier | None = None, batch_size: int = 256) -> torch.Tensor:
    """The digit classifier's penultimate activations ``(N, hidden)`` (float32, on the classifier's
    device) of ``images`` in any format :func:`to_classifier_input` accepts; the shipped classifier
    unless one is given. See :meth:`DigitClassifier.embed`."""
    model = classifier if classifier is not None else load_classifier()
    return model.embed(images, batch_size=batch_size)


def as_generated(images: torch.Tensor, size: int = 64) -> np.ndarray:
    """(N, 1, H, W) digits in [0, 1] -> RGB uint8 ``(N, size, size, 3)`` like a pipeline's output.

    Used to check that a held-out digit still reads correctly after the round trip
    ``to_classifier_input`` makes generated images take.
    """
    x = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return x.expand(-1, 3, -1, -1).permute(0, 2, 3, 1).numpy()


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), scale (0.85-1.15), shift (+-10%), contrast (0.7-1.2) and noise."""
    n = x.shape[0]

    def u(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(n, generator=g) * (hi - lo) + lo

    ang, scale = u(-12, 12) * math.pi / 180, u(0.85, 1.15)
    tx, ty = u(-0.2, 0.2), u(-0.2, 0.2)  # affine_grid coordinates span [-1, 1]: 0.2 = 10% of the side
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x * u(0.7, 1.2).view(n, 1, 1, 1) + torch.randn(x.shape, generator=g) * u(0.0, 0.05).view(n, 1, 1, 1)
    return x.clamp(0.0, 1.0)


def train_classifier(
    out_dir: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 3e-3,
    progress: bool = True,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Train the digit classifier on the train split and save it (atomically) to ``out_dir``.

    Returns the training record also written to ``training.json``: held-out accuracy on the 32x32
    digits and after the generated-image round trip (:func:`as_generated` then
    :func:`to_classifier_input`), per-epoch loss, and the settings. Global RNG state is left untouched.

    ``threads`` caps torch's intra-op threads while training (restored after): convolutions this small
    run fastest on one thread, and several spinning OpenMP threads slow a busy machine down.
    """
    out = Path(out_dir) if out_dir is not None else CLASSIFIER_DIR
    train, held = DigitsDataset("train"), DigitsDataset("heldout")
    g = torch.Generator().manual_seed(seed)
    n_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(max(1, min(threads, n_threads)))
    try:
        record = _fit(train, held, g, seed, epochs, batch_size, lr, progress)
    finally:
        torch.set_num_threads(n_threads)
    save_classifier(record.pop("model"), out, record)
    return record


def _fit(
    train: DigitsDataset,
    held: DigitsDataset,
    g: torch.Generator,
    seed: int,
    epochs: int,
    batch_size: int,
    lr: float,
    progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    history = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initialisation and dropout
        model = DigitClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps_per_epoch = math.ceil(len(train) / batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
        bar = tqdm(total=epochs * steps_per_epoch, desc="digit classifier", disable=not progress)
        for epoch in range(epochs):
            model.train()
            perm = torch.randperm(len(train), generator=g)
            total = 0.0
            for i in range(0, len(train), batch_size):
                idx = perm[i : i + batch_size]
                x = _augment(train.images[idx], g)
                loss = F.cross_entropy(model(x), train.labels[idx], label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                total += float(loss.detach()) * len(idx)
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{float(loss.detach()):.3f}")
            acc = accuracy(model, held.images, held.labels)
            history.append({"epoch": epoch, "loss": round(total / len(train), 5), "heldout_accuracy": round(acc, 5)})
        bar.close()
    model.eval()
    record = {
        "command": RETRAIN_COMMAND,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "train_size": len(train),
        "heldout_size": len(held),
        "heldout_accuracy": round(accuracy(model, held.images, held.labels), 5),
        "heldout_accuracy_generated_roundtrip": round(accuracy(model, as_generated(held.images), held.labels), 5),
        "parameters": sum(p.numel() for p in model.parameters()),
        "history": history,
        "model": model,
    }
    return record


def save_classifier(model: DigitClassifier, out_dir: str | os.PathLike, record: dict[str, Any] | None = None) -> Path:
    """Write the classifier folder under a temporary name, then rename it into place."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out, directory=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if record is not None:
            (tmp / TRAINING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out
