"""Quality metrics every method is judged by, none of which need hub weights.

* :func:`class_accuracy` — generated digits read by the shipped digit classifier (any size, RGB or
  gray: converted by :func:`~diffattn.testbed.classifier.to_classifier_input`).
* :func:`psnr` and :func:`ssim` — a method's samples against dense attention's samples from the same
  seed. :func:`ssim` is Wang et al.'s SSIM with an 11-tap Gaussian window (sigma 1.5), matching
  ``skimage.metrics.structural_similarity(..., gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False, data_range=1)`` (mean over channels).
* :func:`record_attention_outputs` / :func:`compare_attention_outputs` — forward hooks on every
  attention module of a pipeline's denoisers: record dense outputs in one run, then accumulate
  ``||method - dense|| / ||dense||`` per layer in a second run with a method applied. Errors compound
  along the trajectory (later layers and steps see inputs that already differ), which is what a user
  of the method gets; ``first_call`` is the error at the first denoiser call, before any step drifted.
* :func:`per_frame_accuracy` / :func:`temporal_consistency` — for videos (frames of moving digits).

Image arguments accept numpy ``NHWC`` (pipelines' ``output_type="np"``), torch ``NCHW`` or a list of
PIL images; values in ``[0, 1]`` (uint8 is scaled).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

PSNR_CAP_DB = 100.0  # identical images: PSNR is infinite; JSON has no infinity, so it is capped here


def to_nchw(images: Any) -> torch.Tensor:
    """Images (numpy NHWC / HWC, torch NCHW / CHW, PIL or a list of them) -> float64 NCHW in [0, 1]."""
    from PIL import Image

    if isinstance(images, Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)):
        return torch.cat([to_nchw(np.asarray(im) if isinstance(im, Image.Image) else im) for im in images])
    if isinstance(images, torch.Tensor):
        x = images.detach()
        x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
        return x[None] if x.ndim == 3 else x
    arr = np.ascontiguousarray(images)
    x = torch.from_numpy(arr if arr.flags.writeable else arr.copy())  # PIL arrays are read-only
    x = x.double() / 255.0 if x.dtype == torch.uint8 else x.double()
    if x.ndim == 2:
        return x[None, None]
    if x.ndim == 3:
        x = x[None] if x.shape[-1] in (1, 3, 4) else x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected images as HW, HWC, NHW or NHWC arrays, got shape {arr.shape}")
    return x.permute(0, 3, 1, 2)


def _pair(a: Any, b: Any) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = to_nchw(a), to_nchw(b)
    if x.shape != y.shape:
        raise ValueError(f"images must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)} (NCHW)")
    return x, y.to(x.device)


def psnr(a: Any, b: Any, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, ``(N,)`` float64; capped at :data:`PSNR_CAP_DB` for identical images."""
    x, y = _pair(a, b)
    mse = (x - y).pow(2).flatten(1).mean(1)
    floor = data_range**2 * 10 ** (-PSNR_CAP_DB / 10)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(floor))


def gaussian_kernel(sigma: float = 1.5, truncate: float = 3.5, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """scipy's 1-D Gaussian: radius ``int(truncate * sigma + 0.5)``, normalized to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=dtype)
    k = torch.exp(-0.5 * x**2 / sigma**2)
    return k / k.sum()


def ssim(
    a: Any,
    b: Any,
    data_range: float = 1.0,
    sigma: float = 1.5,
    truncate: float = 3.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Per-image SSIM ``(N,)`` float64: Gaussian-weighted local statistics, mean over channels.

    Only windows that lie fully inside the image count (skimage computes the full map with padding
    and then crops exactly that border away), so no padding mode is involved.
    """
    x, y = _pair(a, b)
    k = gaussian_kernel(sigma, truncate).to(x.device)
    side = k.numel()
    if min(x.shape[-2:]) < side:
        raise ValueError(f"SSIM needs images of at least {side}x{side} pixels, got {tuple(x.shape[-2:])}")
    c = x.shape[1]
    kh, kw = k.view(1, 1, 1, side).repeat(c, 1, 1, 1), k.view(1, 1, side, 1).repeat(c, 1, 1, 1)

    def filt(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, kh, groups=c), kw, groups=c)

    ux, uy = filt(x), filt(y)
    vx = filt(x * x) - ux * ux
    vy = filt(y * y) - uy * uy
    vxy = filt(x * y) - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def class_accuracy(images: Any, labels: Sequence[int] | torch.Tensor, classifier: Any = None) -> dict[str, Any]:
    """How many generated digits the classifier reads as their intended class.

    Returns ``{"accuracy", "n", "per_class": {"0": acc, ...}, "predictions": [...]}``.
    """
    from .classifier import load_classifier

    model = classifier if classifier is not None else load_classifier()
    pred = model.predict(images).cpu()
    labels = torch.as_tensor(labels).cpu()
    if len(pred) != len(labels):
        raise ValueError(f"{len(pred)} images but {len(labels)} labels")
    hit = (pred == labels).double()
    per_class = {str(int(c)): float(hit[labels == c].mean()) for c in torch.unique(labels)}
    return {"accuracy": float(hit.mean()), "n": len(labels), "per_class": per_class, "predictions": pred.tolist()}


# --------------------------------------------------------------------------------------------------
# Videos
# --------------------------------------------------------------------------------------------------


def _frames(video: Any) -> torch.Tensor:
    """(F, H, W, C) numpy / (F, C, H, W) torch / list of PIL frames -> float64 (F, C, H, W)."""
    return to_nchw(video)


def locate_digit(video: Any, digit_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``digit_size`` square holding the most ink in each frame: ``(crops, positions)``.

    ``crops`` is ``(F, C, digit_size, digit_size)``, ``positions`` ``(F, 2)`` top-left ``(x, y)``. A box
    filter's argmax: for a single digit on a dark canvas (the moving-digit clips) this finds the digit
    wherever it is, so the classifier, trained on full-frame digits, can read it.
    """
    frames = _frames(video)
    f, c, h, w = frames.shape
    if not 1 <= digit_size <= min(h, w):
        raise ValueError(f"digit_size must be in [1, {min(h, w)}] for {h}x{w} frames, got {digit_size}")
    ink = F.avg_pool2d(frames.mean(dim=1, keepdim=True), digit_size, stride=1)[:, 0]  # (F, h-s+1, w-s+1)
    flat = ink.flatten(1).argmax(dim=1)
    ys, xs = flat // ink.shape[-1], flat % ink.shape[-1]
    crops = torch.stack([frames[i, :, y : y + digit_size, x : x + digit_size] for i, (y, x) in enumerate(zip(ys.tolist(), xs.tolist()))])
    return crops, torch.stack([xs, ys], dim=1)


def per_frame_accuracy(video: Any, label: int, classifier: Any = None, digit_size: int | None = None) -> dict[str, Any]:
    """Class accuracy of every frame of one video of a single digit: ``{"accuracy", "per_frame"}``.

    ``digit_size``: the digit is that large inside a bigger frame (moving-digit clips); each frame is
    cropped to it with :func:`locate_digit` before it is classified.
    """
    from .classifier import load_classifier

    model = classifier if classifier is not None else load_classifier()
    frames = _frames(video).float() if digit_size is None else locate_digit(video, digit_size)[0].float()
    hits = (model.predict(frames).cpu() == int(label)).double()
    return {"accuracy": float(hits.mean()), "per_frame": hits.tolist()}


def motion_jitter(video: Any, digit_size: int) -> float:
    """Mean absolute second difference (pixels) of the digit's located position: 0 for constant
    velocity; bounces and a digit that jumps or vanishes raise it."""
    pos = locate_digit(video, digit_size)[1].double()
    if len(pos) < 3:
        raise ValueError("motion jitter needs at least 3 frames")
    return float((pos[2:] - 2 * pos[1:-1] + pos[:-2]).abs().sum(dim=1).mean())


def video_frame_accuracies(videos: Sequence[Any], labels: Sequence[int], digit_size: int, classifier: Any) -> list[float]:
    """Each moving-digit video's per-frame accuracy (every frame's digit box located and read)."""
    if len(videos) != len(labels):
        raise ValueError(f"{len(videos)} videos but {len(labels)} labels")
    return [per_frame_accuracy(v, lab, classifier, digit_size=digit_size)["accuracy"] for v, lab in zip(videos, labels)]


def moving_digit_metrics(
    videos: Sequence[Any], labels: Sequence[int], digit_size: int, classifier: Any = None
) -> dict[str, Any]:
    """Means over videos of one moving digit each: per-frame accuracy (``per_video`` too), consecutive-
    frame PSNR and motion jitter — the figures the video testbed reports. Single frames (the image phase
    of digits-video's training) get ``None`` for PSNR, and clips under 3 frames for jitter."""
    from .classifier import load_classifier

    acc = video_frame_accuracies(videos, labels, digit_size, classifier if classifier is not None else load_classifier())
    n_frames = min(len(v) for v in videos)  # frames come first in every accepted layout
    return {
        "frame_accuracy": float(np.mean(acc)),
        "per_video": acc,
        "consecutive_psnr_db": float(np.mean([temporal_consistency(v)["psnr_db"] for v in videos])) if n_frames >= 2 else None,
        "motion_jitter_px": float(np.mean([motion_jitter(v, digit_size) for v in videos])) if n_frames >= 3 else None,
    }


def temporal_consistency(video: Any) -> dict[str, float]:
    """Mean PSNR / SSIM between consecutive frames (higher: steadier video)."""
    frames = _frames(video)
    if len(frames) < 2:
        raise ValueError("temporal consistency needs at least 2 frames")
    return {
        "psnr_db": float(psnr(frames[1:], frames[:-1]).mean()),
        "ssim": float(ssim(frames[1:], frames[:-1]).mean()),
    }


# --------------------------------------------------------------------------------------------------
# Per-layer attention error
# --------------------------------------------------------------------------------------------------


def attention_layers(pipe_or_model: Any) -> dict[str, nn.Module]:
    """Every attention module of a pipeline's denoisers, as ``"component.module.path"``."""
    from ..api import denoisers
    from ..processors.core import attention_modules

    return {
        f"{comp}.{name}": module for comp, model in denoisers(pipe_or_model) for name, module in attention_modules(model).items()
    }


def _tensors(out: Any) -> list[torch.Tensor]:
    """An attention module's output as a list of tensors (Flux's joint blocks return a tuple)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


@contextlib.contextmanager
def record_attention_outputs(pipe_or_model: Any) -> Iterator[dict[str, list[list[torch.Tensor]]]]:
    """Record each attention layer's output of every call (detached, on its device) while active."""
    records: dict[str, list[list[torch.Tensor]]] = {}
    handles = []
    for name, module in attention_layers(pipe_or_model).items():
        records[name] = []

        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            records[name].append([t.detach().clone() for t in _tensors(out)])

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()


@dataclass
class LayerErrors:
    """Running sums of ``||a - b||^2`` and ``||b||^2`` per layer, over calls and batches."""

    num: dict[str, float] = field(default_factory=dict)
    den: dict[str, float] = field(default_factory=dict)
    first_num: dict[str, float] = field(default_factory=dict)
    first_den: dict[str, float] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    missing_calls: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, out: list[torch.Tensor], ref: list[torch.Tensor], first: bool) -> None:
        if len(out) != len(ref) or any(o.shape != r.shape for o, r in zip(out, ref)):
            raise ValueError(
                f"attention layer {name}: method output shapes {[tuple(o.shape) for o in out]} differ from "
                f"dense {[tuple(r.shape) for r in ref]}"
            )
        num = sum(float((o.double() - r.double()).pow(2).sum()) for o, r in zip(out, ref))
        den = sum(float(r.double().pow(2).sum()) for r in ref)
        self.num[name] = self.num.get(name, 0.0) + num
        self.den[name] = self.den.get(name, 0.0) + den
        self.calls[name] = self.calls.get(name, 0) + 1
        if first:
            self.first_num[name] = self.first_num.get(name, 0.0) + num
            self.first_den[name] = self.first_den.get(name, 0.0) + den

    def result(self) -> dict[str, dict[str, float]]:
        """``{layer: {"rel_error", "first_call", "calls"[, "missing_calls"]}}`` in layer order."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.num:
            row: dict[str, Any] = {
                "rel_error": _ratio(self.num[name], self.den[name]),
                "first_call": _ratio(self.first_num.get(name, 0.0), self.first_den.get(name, 0.0)),
                "calls": self.calls[name],
            }
            if self.missing_calls.get(name):
                row["missing_calls"] = self.missing_calls[name]
            out[name] = row
        return out


def _ratio(num: float, den: float) -> float:
    return math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf)


@contextlib.contextmanager
def compare_attention_outputs(
    pipe_or_model: Any, reference: dict[str, list[list[torch.Tensor]]], errors: LayerErrors | None = None
) -> Iterator[LayerErrors]:
    """While active, compare each attention layer's output with the ``reference`` recorded for the same
    call (n-th call of the layer vs its n-th recorded output) and accumulate into ``errors``."""
    errors = errors if errors is not None else LayerErrors()
    seen: dict[str, int] = {}
    handles = []
    layers = attention_layers(pipe_or_model)
    for name, module in layers.items():

        def hook(mod: nn.Module, args: Any, out: Any, name: str = name) -> None:
            i = seen.get(name, 0)
            seen[name] = i + 1
            refs = reference.get(name, [])
            if i < len(refs):
                errors.add(name, _tensors(out), refs[i], first=i == 0)

        handles.append(module.register_forward_hook(hook))
    try:
        yield errors
    finally:
        for h in handles:
            h.remove()
        # a layer the method ran fewer times than dense (or not at all) is reported, not hidden
        for name, refs in reference.items():
            short = len(refs) - seen.get(name, 0)
            if short > 0:
                errors.missing_calls[name] = errors.missing_calls.get(name, 0) + short
                errors.num.setdefault(name, 0.0)
                errors.den.setdefault(name, 0.0)
                errors.calls.setdefault(name, 0)


def layer_relative_errors(
    pipe: Any, method: str, call_kwargs: dict[str, Any], options: dict[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Run ``pipe(**call_kwargs)`` with its own processors, then with ``method`` applied, and return
    the per-layer relative error of attention outputs. ``call_kwargs`` should carry a seeded
    ``generator``; it is re-seeded identically for the second run."""
    import copy

    import diffattn

    kw_dense, kw_method = copy.deepcopy(call_kwargs), copy.deepcopy(call_kwargs)  # generators too
    with record_attention_outputs(pipe) as ref:
        pipe(**kw_dense)
    with diffattn.apply(pipe, method, **(options or {})), compare_attention_outputs(pipe, ref) as errors:
        pipe(**kw_method)
    return errors.result()
