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
* :func:`frechet_distance` — FID's formula in the digit classifier's penultimate feature space:
  generated samples against the held-out real digits (per frame for videos), at one stated sample
  count, with a bootstrap standard deviation.

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

from ..benchmark import PSNR_CAP_DB  # re-exported: the cap of psnr below


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
# Fréchet distance in the digit classifier's feature space
# --------------------------------------------------------------------------------------------------

FRECHET_ROUNDS = 200  # bootstrap resamples behind a Fréchet distance's noise estimate


def gaussian_frechet(mu1: Any, cov1: Any, mu2: Any, cov2: Any) -> float:
    """Fréchet (2-Wasserstein squared) distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:

    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr((cov1^1/2 cov2 cov1^1/2)^1/2)``, in float64.

    The trace term goes through two symmetric eigen-decompositions instead of a general matrix square
    root of ``cov1 @ cov2`` (which is not symmetric and gives complex round-off): ``cov1^1/2`` from
    ``eigh`` with its eigenvalues clamped at 0, then the eigenvalues of the symmetric PSD product
    ``cov1^1/2 cov2 cov1^1/2`` (the same as those of ``cov1 @ cov2``), clamped at 0 before their square
    roots. A tiny negative total from round-off is clamped to 0. Arguments: numpy arrays, tensors or
    nested lists.
    """
    m1, m2 = (torch.as_tensor(np.asarray(m), dtype=torch.float64).flatten() for m in (mu1, mu2))
    c1, c2 = (torch.atleast_2d(torch.as_tensor(np.asarray(c), dtype=torch.float64)) for c in (cov1, cov2))
    if m1.shape != m2.shape or c1.shape != c2.shape or c1.shape != (m1.numel(), m1.numel()):
        raise ValueError(f"means {tuple(m1.shape)}, {tuple(m2.shape)} and covariances {tuple(c1.shape)}, {tuple(c2.shape)} do not match")
    return _gaussian_frechet(m1, c1, m2, c2)


def _gaussian_frechet(m1: torch.Tensor, c1: torch.Tensor, m2: torch.Tensor, c2: torch.Tensor) -> float:
    w, v = torch.linalg.eigh((c1 + c1.T) / 2)
    root1 = (v * w.clamp_min(0.0).sqrt()) @ v.T
    prod = root1 @ c2 @ root1
    cross = torch.linalg.eigvalsh((prod + prod.T) / 2).clamp_min(0.0).sqrt().sum()
    d = float((m1 - m2).pow(2).sum() + c1.trace() + c2.trace() - 2.0 * cross)
    return max(d, 0.0)


def _fit(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) covariance of ``(M, D)`` float64 feature rows."""
    return rows.mean(0), torch.atleast_2d(torch.cov(rows.T, correction=1))


def _frechet_rows(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to samples ``(n, [F,] D)`` (frames pooled)."""
    return _gaussian_frechet(*_fit(a.reshape(-1, a.shape[-1])), *_fit(b.reshape(-1, b.shape[-1])))


def frechet_features(images: Any, classifier: Any = None, digit_size: int | None = None) -> np.ndarray:
    """The digit classifier's penultimate features of images or moving-digit videos, float64.

    Images (any format :func:`~diffattn.testbed.classifier.to_classifier_input` accepts) give
    ``(N, D)``. With ``digit_size``, ``images`` is a batch of videos (``(N, F, H, W, C)`` numpy, or a
    sequence of per-video frames in any :func:`to_nchw` layout): every frame is cropped to its digit
    with :func:`locate_digit`, as the class accuracy of videos is, giving ``(N, F, D)``.
    """
    from .classifier import load_classifier

    model = classifier if classifier is not None else load_classifier()
    if digit_size is None:
        return model.embed(images).double().cpu().numpy()
    crops = [locate_digit(v, digit_size)[0].float() for v in images]
    frames = {len(c) for c in crops}
    if len(frames) != 1:
        raise ValueError(f"videos must all have the same number of frames, got {sorted(frames)}")
    feats = model.embed(torch.cat(crops)).double().cpu().numpy()
    return feats.reshape(len(crops), frames.pop(), -1)


def frechet_reference(
    count: int | None = None, *, num_frames: int | None = None, canvas: int | None = None, digit_size: int | None = None, seed: int = 0
) -> Any:
    """Held-out real digits to compare generated samples with.

    Images (``num_frames`` None): the held-out split of :class:`~diffattn.testbed.data.DigitsDataset`
    (32x32, ``(N, 1, 32, 32)``; all 359 when ``count`` is None). Videos: ``count`` clips of
    :class:`~diffattn.testbed.data.MovingDigitsDataset` drawn from the held-out digits, with ``num_frames``
    frames, as ``(count, F, canvas, canvas, 1)`` numpy (so :func:`frechet_features` reads them like
    generated videos).
    """
    from .data import MOVING_CANVAS, MOVING_DIGIT, DigitsDataset, MovingDigitsDataset

    if num_frames is None:
        images = DigitsDataset("heldout").images
        if count is not None and not 1 <= count <= len(images):
            raise ValueError(f"count must be in [1, {len(images)}] (the held-out digits), got {count}")
        return images if count is None else images[:count]
    if count is None or count < 1:
        raise ValueError(f"videos need a count of clips >= 1, got {count}")
    ds = MovingDigitsDataset(
        num_clips=count,
        split="heldout",
        seed=seed,
        num_frames=num_frames,
        canvas=canvas or MOVING_CANVAS,
        digit_size=digit_size or MOVING_DIGIT,
    )
    return np.stack([ds[i]["pixel_values"].permute(1, 2, 3, 0).numpy() for i in range(count)])


def frechet_distance_features(
    generated: Any, reference: Any, *, n: int | None = None, rounds: int = FRECHET_ROUNDS, seed: int = 0
) -> dict[str, Any]:
    """Fréchet distance between Gaussians fitted to two feature sets, at an equal sample count, with
    its bootstrap noise.

    ``generated`` / ``reference``: ``(N, D)`` features of images or ``(N, F, D)`` of videos (a video is
    one sample; its frames are pooled into the fitted Gaussian). The distance is biased upward by a
    term that shrinks like ``1/n``, so two values are comparable only at the same ``n``: differing
    counts are refused unless ``n`` is given, and then each set larger than ``n`` is subsampled
    (without replacement, seeded) to ``n``, and the result says so.

    The noise is the standard deviation of the distance over ``rounds`` bootstrap resamples (both sets
    resampled with replacement at ``n``, independently; videos resampled whole, because the frames of
    one clip are not independent).

    Returns ``{"fd", "std", "n", "frames", "dims", "noise", "rounds", "counts", "subsampled"}``:
    ``counts`` the sample counts given, ``subsampled`` whether any set was cut down to ``n``.
    """
    a, b = np.asarray(generated, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    if a.ndim not in (2, 3) or a.ndim != b.ndim or a.shape[1:] != b.shape[1:]:
        raise ValueError(
            f"features must both be (N, D) or (N, F, D) with the same trailing shape, got {a.shape} and {b.shape}"
        )
    counts = {"generated": len(a), "reference": len(b)}
    if n is None:
        if len(a) != len(b):
            raise ValueError(
                f"Fréchet distances are compared only at equal sample counts: got {len(a)} generated and "
                f"{len(b)} reference samples; pass n=... (at most {min(len(a), len(b))}) to subsample both to n"
            )
        n = len(a)
    if not 2 <= n <= min(len(a), len(b)):
        raise ValueError(f"n must be in [2, {min(len(a), len(b))}] (the smaller sample count), got {n}")
    if rounds < 2:
        raise ValueError(f"rounds must be >= 2 for a noise estimate, got {rounds}")
    rng = np.random.default_rng(seed)
    a = a if len(a) == n else a[np.sort(rng.choice(len(a), n, replace=False))]
    b = b if len(b) == n else b[np.sort(rng.choice(len(b), n, replace=False))]
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    draws = [(torch.from_numpy(rng.integers(0, n, n)), torch.from_numpy(rng.integers(0, n, n))) for _ in range(rounds)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64x64 decompositions: more threads only add synchronisation (badly on a busy CPU)
    try:
        fd = _frechet_rows(ta, tb)
        boot = [_frechet_rows(ta[i], tb[j]) for i, j in draws]
    finally:
        torch.set_num_threads(threads)
    return {
        "fd": fd,
        "std": float(np.std(boot, ddof=1)),
        "n": n,
        "frames": a.shape[1] if a.ndim == 3 else 1,
        "dims": a.shape[-1],
        "noise": "bootstrap",
        "rounds": rounds,
        "counts": counts,
        "subsampled": counts != {"generated": n, "reference": n},
    }


def frechet_distance(
    generated: Any,
    reference: Any = None,
    *,
    n: int | None = None,
    digit_size: int | None = None,
    classifier: Any = None,
    rounds: int = FRECHET_ROUNDS,
    seed: int = 0,
) -> dict[str, Any]:
    """Fréchet distance of generated digits to held-out real ones in the digit classifier's feature
    space (its penultimate layer), with its bootstrap noise and the sample count it was measured at.

    ``generated``: images in any format the classifier accepts, or with ``digit_size`` a batch of
    moving-digit videos (each frame's digit is located and read: the Gaussians are fitted per frame).
    ``reference``: images / videos in the same form; by default the held-out real digits
    (:func:`frechet_reference`: the 359 held-out digits for images; for videos as many held-out clips
    as there are generated ones, of the same length and frame size). Counts must be equal unless ``n``
    is given (see :func:`frechet_distance_features`, which also describes the returned dict).

    Lower is closer to the data; 0 only for identical Gaussians. Read a difference between two values
    against their ``std``.
    """
    from .classifier import load_classifier

    model = classifier if classifier is not None else load_classifier()
    feats = frechet_features(generated, model, digit_size)
    if reference is None:
        if digit_size is None:
            reference = frechet_reference()
        else:
            side = to_nchw(generated[0]).shape[-1]
            reference = frechet_reference(len(feats), num_frames=feats.shape[1], canvas=side, digit_size=digit_size, seed=seed)
    ref = frechet_features(reference, model, digit_size)
    return frechet_distance_features(feats, ref, n=n, rounds=rounds, seed=seed)


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
