"""Class accuracy of a digits testbed model: N samples per class with its default call (stock
processors: dense attention for digits-unet / digits-dit; digits-lamamba has no dense attention).

    python scripts/eval_testbed_accuracy.py --model digits-unet --samples 50 --out outputs/digits-unet-accuracy

Each class c is prompted with its caption ("a c"); sample i of class c uses seed 1000 * c + i. The
classifier trained here judges the samples. Writes OUT.json and a grid OUT.png (a row per class).
Video models (``digits-video``) are judged frame by frame (the digit's box located in each frame) and
also get temporal consistency and motion jitter; their grid shows every 4th frame of the first sample
of each class.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffattn.benchmark import write_json
from diffattn.io import save_images
from diffattn.testbed import models
from diffattn.testbed.data import MOVING_DIGIT
from diffattn.testbed.metrics import class_accuracy, motion_jitter, per_frame_accuracy, temporal_consistency


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-unet", help=f"one of {models.names()}")
    p.add_argument("--samples", type=int, default=50, help="samples per class")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="outputs/testbed-accuracy")
    p.add_argument("--folder", default=None, help="a trained folder of --model (default: the shipped one)")
    args = p.parse_args()

    pipe = models.load(args.model) if args.folder is None else models.load_folder(args.folder, args.model)
    spec = models.get(args.model)
    call = {**spec.call_kwargs, "num_inference_steps": args.steps}
    imgs, labels = [], []
    t0 = time.perf_counter()
    for c, caption in enumerate(spec.captions()):
        gens = [torch.Generator().manual_seed(1000 * c + i) for i in range(args.samples)]
        out = pipe(**models.prompt_kwargs(call, [caption] * args.samples, gens))
        imgs.append(np.asarray(out.frames if "num_frames" in call else out.images))
        labels += [c] * args.samples
    imgs = np.concatenate(imgs)
    if "num_frames" in call:
        video_report(args, call, imgs, labels, time.perf_counter() - t0)
        return
    acc = class_accuracy(imgs, labels)
    out = Path(args.out)
    record = {
        "model": args.model,
        "folder": args.folder,
        "samples_per_class": args.samples,
        "steps": args.steps,
        "call": call,
        "accuracy": acc["accuracy"],
        "per_class": acc["per_class"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    write_json(out.with_suffix(".json"), record)
    n, h, w = args.samples, imgs.shape[1], imgs.shape[2]
    grid = imgs.reshape(len(spec.captions()), n, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(-1, n * w, imgs.shape[-1])
    save_images([Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))], out.with_suffix(".png"))
    print(f"{args.model}: class accuracy {acc['accuracy']:.4f} on {len(labels)} samples ({args.steps} steps)")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


def video_report(args: argparse.Namespace, call: dict, videos: np.ndarray, labels: list[int], seconds: float) -> None:
    """Per-frame accuracy (the digit located per frame), temporal consistency and motion jitter."""
    acc = [per_frame_accuracy(v, lab, digit_size=MOVING_DIGIT)["accuracy"] for v, lab in zip(videos, labels)]
    per_class = {str(c): float(np.mean([a for a, lab in zip(acc, labels) if lab == c])) for c in sorted(set(labels))}
    out = Path(args.out)
    record = {
        "model": args.model,
        "folder": args.folder,
        "samples_per_class": args.samples,
        "steps": args.steps,
        "call": call,
        "frame_accuracy": float(np.mean(acc)),
        "per_class": per_class,
        "consecutive_psnr_db": float(np.mean([temporal_consistency(v)["psnr_db"] for v in videos])),
        "motion_jitter_px": float(np.mean([motion_jitter(v, MOVING_DIGIT) for v in videos])),
        "seconds": round(seconds, 1),
    }
    write_json(out.with_suffix(".json"), record)
    rows = [np.concatenate(list(videos[c * args.samples][::4]), axis=1) for c in range(len(per_class))]
    grid = np.concatenate(rows, axis=0)
    save_images([Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))], out.with_suffix(".png"))
    print(
        f"{args.model}: per-frame accuracy {record['frame_accuracy']:.4f} on {len(labels)} videos, consecutive-frame "
        f"PSNR {record['consecutive_psnr_db']:.2f} dB, motion jitter {record['motion_jitter_px']:.3f} px"
    )
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
