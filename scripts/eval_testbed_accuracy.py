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
from diffattn.testbed.metrics import class_accuracy, moving_digit_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-unet", help=f"one of {models.names()}")
    p.add_argument("--samples", type=int, default=50, help="samples per class")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="outputs/testbed-accuracy")
    p.add_argument("--folder", default=None, help="a trained folder of --model (default: the shipped one)")
    p.add_argument("--num-frames", type=int, default=None, help="video models: frames per sample (default: the model's)")
    args = p.parse_args()
    if args.num_frames is not None and args.num_frames < 1:
        p.error(f"--num-frames must be >= 1, got {args.num_frames}")

    pipe = models.load(args.model) if args.folder is None else models.load_folder(args.folder, args.model)
    spec = models.get(args.model)
    call = {**spec.call_kwargs, "num_inference_steps": args.steps}
    video = "num_frames" in call
    if args.num_frames is not None:
        if not video:
            p.error(f"--num-frames applies to video models; {args.model} makes images")
        call["num_frames"] = args.num_frames
    imgs, labels = [], []
    t0 = time.perf_counter()
    for c, caption in enumerate(spec.captions()):
        gens = [torch.Generator().manual_seed(1000 * c + i) for i in range(args.samples)]
        out = pipe(**models.prompt_kwargs(call, [caption] * args.samples, gens))
        imgs.append(np.asarray(out.frames if video else out.images))
        labels += [c] * args.samples
    imgs = np.concatenate(imgs)
    record = {"model": args.model, "folder": args.folder, "samples_per_class": args.samples, "steps": args.steps, "call": call}
    n = args.samples
    if video:
        m = moving_digit_metrics(imgs, labels, MOVING_DIGIT)
        per_video = m.pop("per_video")
        classes = sorted(set(labels))
        per_class = {str(c): float(np.mean([a for a, lab in zip(per_video, labels) if lab == c])) for c in classes}
        record.update({**m, "per_class": per_class})
        # every 4th frame of the first sample of each class, a row per class
        grid = np.concatenate([np.concatenate(list(imgs[c * n][::4]), axis=1) for c in classes], axis=0)
        summary = f"per-frame accuracy {m['frame_accuracy']:.4f} on {len(labels)} videos ({call['num_frames']} frames)"
        if m["consecutive_psnr_db"] is not None:
            summary += f", consecutive-frame PSNR {m['consecutive_psnr_db']:.2f} dB"
        if m["motion_jitter_px"] is not None:
            summary += f", motion jitter {m['motion_jitter_px']:.3f} px"
    else:
        acc = class_accuracy(imgs, labels)
        record.update({"accuracy": acc["accuracy"], "per_class": acc["per_class"]})
        h, w = imgs.shape[1], imgs.shape[2]
        grid = imgs.reshape(len(spec.captions()), n, h, w, -1).transpose(0, 2, 1, 3, 4).reshape(-1, n * w, imgs.shape[-1])
        summary = f"class accuracy {acc['accuracy']:.4f} on {len(labels)} samples ({args.steps} steps)"
    record["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    write_json(out.with_suffix(".json"), record)
    save_images([Image.fromarray((grid.clip(0, 1) * 255).round().astype(np.uint8))], out.with_suffix(".png"))
    print(f"{args.model}: {summary}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
