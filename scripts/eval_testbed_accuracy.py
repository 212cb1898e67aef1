"""Dense class accuracy of a digits testbed model: N samples per class with its default call.

    python scripts/eval_testbed_accuracy.py --model digits-unet --samples 50 --out outputs/digits-unet-accuracy

Each class c is prompted with its caption ("a c"); sample i of class c uses seed 1000 * c + i. The
classifier trained here judges the samples. Writes OUT.json and a grid OUT.png (a row per class).
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
from diffattn.testbed.metrics import class_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits-unet", help=f"one of {models.names()}")
    p.add_argument("--samples", type=int, default=50, help="samples per class")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", default="outputs/testbed-accuracy")
    args = p.parse_args()

    pipe = models.load(args.model)
    spec = models.get(args.model)
    call = {**spec.call_kwargs, "num_inference_steps": args.steps}
    imgs, labels = [], []
    t0 = time.perf_counter()
    for c, caption in enumerate(spec.captions()):
        gens = [torch.Generator().manual_seed(1000 * c + i) for i in range(args.samples)]
        imgs.append(np.asarray(pipe(**models.prompt_kwargs(call, [caption] * args.samples, gens)).images))
        labels += [c] * args.samples
    imgs = np.concatenate(imgs)
    acc = class_accuracy(imgs, labels)
    out = Path(args.out)
    record = {
        "model": args.model,
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


if __name__ == "__main__":
    main()
