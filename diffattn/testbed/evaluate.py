"""``diffattn evaluate``: a method against dense attention on the same seeds -> JSON report + PNG grid.

Sample ``i`` uses seed ``seed + i`` (a CPU generator, so samples do not depend on the device) and, on
a digits testbed model, the caption of class ``i % 10``. Samples run in batches: each batch runs once
with the pipeline's own processors (dense) while forward hooks record every attention layer's output,
then once with the method applied while the hooks accumulate the per-layer error against that record.

The report holds only what the command determines (no timestamps or wall times unless ``timing`` is
asked for), with floats rounded to 6 decimals, so the same command gives the same JSON.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..benchmark import DTYPES, output_array, time_attention
from ..loading import load


def _r(x: float) -> float | None:
    """Round for the report; non-finite values become ``None`` (JSON has no infinity)."""
    return round(float(x), 6) if math.isfinite(float(x)) else None


def _summary(values: list[float]) -> dict[str, Any]:
    v = np.asarray(values, dtype=np.float64)
    return {"mean": _r(v.mean()), "min": _r(v.min()), "max": _r(v.max()), "per_sample": [_r(x) for x in v]}


def evaluate(
    model: str,
    method: str,
    options: dict[str, Any] | None = None,
    samples: int = 20,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 10,
    out_dir: str | os.PathLike | None = None,
    device: str = "cpu",
    dtype: str = "fp32",
    timing: bool = False,
    progress: bool = True,
    lora: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Evaluate ``method`` (with ``options``) against dense attention; write ``report.json`` and
    ``grid.png`` to ``out_dir`` when given. Returns the report.

    ``lora``: a LoRA folder (``diffattn train``'s output, ``pytorch_lora_weights.safetensors``) or file,
    trained under ``method``; it is loaded for the method's samples only, so the reference stays the
    untuned model with dense attention (what the LoRA is meant to recover).
    """
    from tqdm.auto import tqdm

    import diffattn

    from .. import registry
    from . import metrics
    from .data import caption_for
    from .models import prompt_kwargs

    options = dict(options or {})
    registry.get(method).build_config(options)  # fail on a bad method or option before any work
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples}, {batch_size}")
    lora_file = lora_weights_file(lora) if lora is not None else None
    target = load(model, dtype=DTYPES[dtype], device=device)
    target.call_kwargs.setdefault("output_type", "np")
    pipe, base = target.pipe, dict(target.call_kwargs)
    diffattn.apply(pipe, method, **options).remove()  # a model the method cannot patch fails before any sampling
    if lora_file is not None:
        if not hasattr(pipe, "load_lora_weights"):
            raise ValueError(f"lora: {type(pipe).__name__} cannot load LoRA weights (no load_lora_weights)")
        pipe.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name=LORA_ADAPTER)
        pipe.disable_lora()  # on only while the method samples
    if steps is not None:
        base["num_inference_steps"] = steps
    base["output_type"] = "np"
    labels = [i % target.num_classes for i in range(samples)] if target.num_classes else None
    prompts = [caption_for(lab) for lab in labels] if labels else [target.prompt or ""] * samples

    errors = metrics.LayerErrors()
    dense_out, method_out, patched = [], [], 0
    wall = {"dense_s": 0.0, "method_s": 0.0}
    attn = {"dense_s": 0.0, "method_s": 0.0}  # inside the attention modules only
    tokens: set[int] = set()
    batches = range(0, samples, batch_size)
    for start in tqdm(batches, desc=f"evaluate {method}", disable=not progress):
        idx = range(start, min(start + batch_size, samples))

        def kwargs(idx: range = idx) -> dict[str, Any]:
            gens = [torch.Generator("cpu").manual_seed(seed + i) for i in idx]
            return prompt_kwargs(base, [prompts[i] for i in idx], gens)

        with metrics.record_attention_outputs(pipe) as ref, time_attention(pipe) as t_dense:
            t0 = time.perf_counter()
            dense_out.append(output_array(pipe(**kwargs())))
            wall["dense_s"] += time.perf_counter() - t0
        attn["dense_s"] += t_dense.seconds
        if lora_file is not None:
            pipe.enable_lora()
        try:
            with diffattn.apply(pipe, method, **options) as patch, metrics.compare_attention_outputs(pipe, ref, errors):
                patched = len(patch.layers)
                with time_attention(pipe) as t_method:
                    t0 = time.perf_counter()
                    method_out.append(output_array(pipe(**kwargs())))
                    wall["method_s"] += time.perf_counter() - t0
                attn["method_s"] += t_method.seconds
                tokens.update(t_method.tokens)
        finally:
            if lora_file is not None:
                pipe.disable_lora()
        del ref

    dense, approx = np.concatenate(dense_out), np.concatenate(method_out)
    video = dense.ndim == 5
    # videos: every frame is an image; per-sample scores average that sample's frames
    flat_d = dense.reshape(-1, *dense.shape[-3:])
    flat_m = approx.reshape(-1, *approx.shape[-3:])
    per = dense.shape[1] if video else 1
    psnr = metrics.psnr(flat_m, flat_d).view(samples, per).mean(1).tolist()
    ssim = metrics.ssim(flat_m, flat_d).view(samples, per).mean(1).tolist()
    layers = {
        name: {k: (_r(v) if isinstance(v, float) else v) for k, v in row.items()} for name, row in errors.result().items()
    }
    finite = [row["rel_error"] for row in layers.values() if row["rel_error"] is not None]
    report: dict[str, Any] = {
        "model": model,
        "method": method,
        "options": options,
        "lora": str(lora) if lora is not None else None,
        "samples": samples,
        "steps": base.get("num_inference_steps"),
        "seed": seed,
        "batch_size": batch_size,
        "dtype": dtype,
        "video": video,
        "patched_layers": patched,
        "psnr_db": _summary(psnr),
        "ssim": _summary(ssim),
        "layer_rel_error_mean": _r(float(np.mean(finite))) if finite else None,
        "layers": layers,
        "environment": {"torch": torch.__version__, "diffusers": _version("diffusers"), "device": device},
    }
    if video and dense.shape[1] > 1:  # frame-to-frame steadiness, dense vs method
        report["temporal_consistency"] = {
            key: {
                m: _r(float(np.mean([metrics.temporal_consistency(v)[m] for v in arr])))
                for m in ("psnr_db", "ssim")
            }
            for key, arr in (("dense", dense), ("method", approx))
        }
    if labels is not None:
        from .classifier import load_classifier
        from .data import MOVING_DIGIT

        clf = load_classifier(device="cpu")
        acc = {}
        for key, arr in (("dense", dense), ("method", approx)):
            if video:
                # a moving digit: every frame's digit box is located and read (the classifier was trained
                # on whole-frame digits); per-frame accuracy, averaged per video
                per = metrics.video_frame_accuracies(arr, labels, MOVING_DIGIT, clf)
                hits = {c: [a for a, lab in zip(per, labels) if lab == c] for c in sorted(set(labels))}
                res = {"accuracy": float(np.mean(per)), "per_class": {str(c): float(np.mean(h)) for c, h in hits.items()}}
            else:
                res = metrics.class_accuracy(arr, labels, classifier=clf)
                per = [float(p == lab) for p, lab in zip(res["predictions"], labels)]
            acc[key] = {
                "accuracy": _r(res["accuracy"]),
                "per_class": {k: _r(v) for k, v in res["per_class"].items()},
                # per sample (a video: its frames' mean), so differences between runs can be paired
                "per_sample": [_r(v) for v in per],
            }
        report["class_accuracy"] = acc
        report["class_accuracy_of"] = "every frame (digit located)" if video else "each image"
        report["frechet_distance"] = _frechet(dense, approx, video, clf)
    if timing:  # wall times differ run to run: only on request, and outside every compared field
        report["timing"] = {k: round(v, 3) for k, v in wall.items()}
        report["timing"]["attention"] = {
            **{k: round(v, 3) for k, v in attn.items()},
            "speedup": _r(attn["dense_s"] / attn["method_s"]) if attn["method_s"] > 0 else None,
            "tokens": sorted(tokens),
            "of": "summed forward time of the attention modules (hidden_states token counts listed), this device",
        }
    if out_dir is not None:
        from ..benchmark import write_json
        from ..io import save_images

        out = Path(out_dir)
        write_json(out / "report.json", report)
        frames_d = dense[:, 0] if video else dense
        frames_m = approx[:, 0] if video else approx
        save_images([comparison_grid(frames_d, frames_m, method, [str(lab) for lab in labels] if labels else None)], out / "grid.png")
    return report


LORA_ADAPTER = "diffattn_eval"  # the adapter name evaluate loads a LoRA under


def lora_weights_file(lora: str | os.PathLike) -> Path:
    """The ``.safetensors`` file of a LoRA given as that file or as the folder holding
    ``pytorch_lora_weights.safetensors``; ``ValueError`` naming ``lora`` and what was expected otherwise."""
    path = Path(lora)
    if path.is_dir():
        path = path / "pytorch_lora_weights.safetensors"
        if not path.is_file():
            raise ValueError(f"lora: {lora} holds no pytorch_lora_weights.safetensors (expected `diffattn train`'s output folder or a .safetensors file)")
    elif not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"lora: expected a LoRA folder or a .safetensors file, got {str(lora)!r}")
    return path


def _frechet(dense: np.ndarray, approx: np.ndarray, video: bool, clf: Any) -> dict[str, Any]:
    """Fréchet distance of dense's and the method's samples to held-out real digits, at one ``n``.

    Images: the 359 held-out digits, both sides subsampled (seeded) to ``n = min(samples, 359)``.
    Videos: as many held-out clips as samples, same length; per-frame features, clips resampled whole.
    The reference subsample and bootstrap draws are seeded with 0, the same for every evaluation.
    """
    from . import metrics
    from .data import MOVING_DIGIT

    samples = len(dense)
    if samples < 2:
        return {"fd_of": "needs at least 2 samples", "dense": None, "method": None}
    digit_size = MOVING_DIGIT if video else None
    feats = {key: metrics.frechet_features(arr, clf, digit_size) for key, arr in (("dense", dense), ("method", approx))}
    if video:
        side = dense.shape[-2]
        ref = metrics.frechet_reference(samples, num_frames=dense.shape[1], canvas=side, digit_size=MOVING_DIGIT)
    else:
        ref = metrics.frechet_reference()
    ref_feats = metrics.frechet_features(ref, clf, digit_size)
    n = min(samples, len(ref_feats))
    out: dict[str, Any] = {
        "fd_of": (
            "per-frame classifier features (digit located) of the videos vs held-out real clips"
            if video
            else "classifier features of the images vs the held-out real digits"
        ),
    }
    for key, f in feats.items():
        r = metrics.frechet_distance_features(f, ref_feats, n=n, seed=0)
        out[key] = {"fd": _r(r["fd"]), "std": _r(r["std"]), **{k: r[k] for k in ("n", "frames", "noise", "rounds", "counts", "subsampled")}}
    return out


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def comparison_grid(
    dense: np.ndarray, method: np.ndarray, method_name: str, captions: list[str] | None = None, columns: int = 10
) -> Any:
    """PIL image: blocks of ``columns`` samples, each a dense row above a method row, labelled on the left."""
    from PIL import Image, ImageDraw

    n, h, w = dense.shape[:3]
    scale = max(1, 64 // max(h, w))  # blow tiny samples up (nearest) so they can be seen
    ch, cw = h * scale, w * scale
    pad, label_w, caption_h = 2, 64, 12 if captions else 0
    cols = min(columns, n)
    blocks = math.ceil(n / cols)
    block_h = caption_h + 2 * (ch + pad)
    grid = Image.new("RGB", (label_w + cols * (cw + pad), blocks * block_h + pad), "white")
    draw = ImageDraw.Draw(grid)

    def tile(arr: np.ndarray) -> Image.Image:
        img = (np.clip(arr, 0, 1) * 255).round().astype(np.uint8)
        img = img[..., 0] if img.shape[-1] == 1 else img[..., :3]
        return Image.fromarray(img).convert("RGB").resize((cw, ch), Image.NEAREST)

    for b in range(blocks):
        y0 = b * block_h + pad
        draw.text((2, y0 + caption_h + ch // 2 - 5), "dense", fill="black")
        draw.text((2, y0 + caption_h + ch + pad + ch // 2 - 5), method_name[:10], fill="black")
        for c in range(cols):
            i = b * cols + c
            if i >= n:
                break
            x = label_w + c * (cw + pad)
            if captions:
                draw.text((x + 2, y0), captions[i], fill="black")
            grid.paste(tile(dense[i]), (x, y0 + caption_h))
            grid.paste(tile(method[i]), (x, y0 + caption_h + ch + pad))
    return grid
