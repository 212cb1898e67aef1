"""Testbed for regional control: a base UNet on multi-digit scenes, a ROICtrl adapter on it, and the
instance success rate of three ways to place digits in boxes.

1. ``base``: the ``digits-unet`` architecture (pixel space) trained with the ``full`` recipe on 64x64
   scenes (1-4 digits in non-overlapping boxes) with their **global captions only** (``"a 3, a 7 and a
   1"``), the testbed's digits-unet settings (batch 32, AdamW 1e-3 cosine, 100 warmup steps, caption
   dropout 0.1, EMA 0.999). ``--base-init digits-unet`` (the default) starts from the shipped
   ``digits-unet`` (32x32 single digits, captions ``"a 3"``), the way ROICtrl starts from an SD model that
   already knows its objects by name: the adapter reuses the base's own cross-attention on each box, so
   a base that cannot draw "a 3" gives it nothing to reuse. ``--base-init scratch`` starts from random
   weights (seeded);
2. ``adapter``: recipe ``roictrl`` on the same scenes' ``boxes.jsonl`` (boxes + ``"a 3"`` per box), the
   base frozen, ROI grids 8 (32x32 level) and 4 (16x16 level);
3. ``eval``: held-out layouts (digits from the held-out split); each is generated three ways with the same
   seed — the global caption only, ``regional_mask`` (training-free, on the base) and ``roi`` (the trained
   adapter) — and every box's crop is read by the testbed's digit classifier. Instance success rate =
   fraction of boxes read as their caption's digit (target for ``roi``: >= 80%).

Writes ``RUN/report.json`` and ``RUN/grid.png`` (rows: global, regional_mask, roi; boxes drawn).
Each stage resumes from its newest checkpoint (``--resume``) and is skipped when its result exists.

    python scripts/eval_roictrl_testbed.py --run outputs/roictrl-testbed --threads 2   # ~1 h 45 min on 2 CPU cores
    python scripts/eval_roictrl_testbed.py --run /tmp/rt --tiny                     # a smoke run (minutes)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

CANVAS = 64
ROI_SIZES = (16, 8, 4)  # by UNet level: 64x64 (no attention in digits-unet), 32x32, 16x16


def export_scenes(folder: Path, count: int, split: str, seed: int) -> Path:
    from diffattn.testbed.data import DigitScenesDataset, write_image_folder

    if not (folder / "boxes.jsonl").is_file():
        scenes = DigitScenesDataset(num_scenes=count, split=split, seed=seed, canvas=CANVAS, channels=3)
        write_image_folder(scenes, folder, overwrite=folder.exists())
    return folder


def train_base(run: Path, args: argparse.Namespace) -> Path:
    from diffattn.lora.trainer import TrainConfig, train

    from diffattn.testbed.models import build_digits_unet, weights_dir

    out = run / "base"
    if (out / "pipeline" / "model_index.json").is_file():
        return out / "pipeline"
    if args.base_init == "digits-unet":
        init = weights_dir("digits-unet")
    else:
        init = run / "init"
        if not (init / "model_index.json").is_file():
            build_digits_unet(args.seed).save_pretrained(init)
    data = export_scenes(run / "scenes", args.count, "train", args.seed)
    cfg = TrainConfig(
        recipe="full", model=str(init), data=str(data), output=str(out), seed=args.seed, resolution=CANVAS,
        max_steps=args.base_steps, batch_size=args.batch_size, learning_rate=1e-3, lr_scheduler="cosine",
        lr_warmup_steps=min(100, args.base_steps // 10), caption_dropout=0.1, ema=True, ema_decay=0.999,
        checkpoint_every=max(1, min(250, args.base_steps // 2)), checkpoints_total_limit=2, log_every=10,
        eval_samples=0, resume="latest" if args.resume and (out / "checkpoints").is_dir() else None,
    )
    train(cfg)
    return out / "pipeline"


def train_adapter(run: Path, base: Path, args: argparse.Namespace) -> Path:
    from diffattn.lora.trainer import TrainConfig, train

    out = run / "adapter"
    if (out / "extra_modules.safetensors").is_file():
        return out
    data = export_scenes(run / "scenes", args.count, "train", args.seed)
    cfg = TrainConfig(
        recipe="roictrl", model=str(base), data=str(data / "boxes.jsonl"), output=str(out), seed=args.seed,
        resolution=CANVAS, max_steps=args.adapter_steps, batch_size=args.batch_size, learning_rate=args.adapter_lr,
        lr_scheduler="cosine", lr_warmup_steps=min(100, args.adapter_steps // 10), caption_dropout=0.1,
        checkpoint_every=max(1, min(250, args.adapter_steps // 2)), checkpoints_total_limit=2, log_every=10,
        eval_samples=0, attention_options={"roi_sizes": tuple(args.roi_sizes), "gate_lr_scale": args.gate_lr_scale},
        resume="latest" if args.resume and (out / "checkpoints").is_dir() else None,
    )
    train(cfg)
    return out


def evaluate(run: Path, base: Path, adapter_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    from diffattn.lora.recipe_roictrl import load_adapter
    from diffattn.pipelines import RegionalControlPipeline, draw_instances
    from diffusers import DiffusionPipeline

    from diffattn.testbed.classifier import load_classifier
    from diffattn.testbed.data import DigitScenesDataset

    pipe = DiffusionPipeline.from_pretrained(str(base))
    pipe.set_progress_bar_config(disable=True)
    adapter = load_adapter(adapter_dir).eval()
    methods = {"global": pipe, "regional_mask": RegionalControlPipeline(pipe),
               "roi": RegionalControlPipeline(pipe, adapter=adapter)}
    clf = load_classifier()
    scenes = DigitScenesDataset(num_scenes=args.samples, split="heldout", seed=args.seed + 1, canvas=CANVAS, channels=3)
    hits = {m: 0 for m in methods}
    total = 0
    rows: dict[str, list[Image.Image]] = {m: [] for m in methods}
    per_sample = []
    for i in range(len(scenes)):
        scene = scenes[i]
        inst = [{"box": tuple(s["box"]), "caption": s["caption"]} for s in scene["instances"]]
        labels = [s["label"] for s in scene["instances"]]
        total += len(labels)
        record = {"caption": scene["caption"], "labels": labels}
        for name, p in methods.items():
            kw = {"prompt": scene["caption"], "height": CANVAS, "width": CANVAS, "num_inference_steps": args.steps,
                  "guidance_scale": args.guidance, "output_type": "np",
                  "generator": torch.Generator().manual_seed(args.seed + i)}
            if name != "global":
                kw["instances"] = inst
            img = np.asarray(p(**kw).images[0])
            crops = []
            for s in scene["instances"]:
                x1, y1, x2, y2 = (int(round(v * CANVAS)) for v in s["box"])
                crops.append(img[y1:y2, x1:x2])
            pred = clf.predict(crops).tolist()
            ok = sum(int(a == b) for a, b in zip(pred, labels))
            hits[name] += ok
            record[name] = pred
            if i < args.grid:
                rows[name].append(draw_instances(Image.fromarray((img * 255).round().astype(np.uint8)), inst, width=1,
                                                 labels=False))
        per_sample.append(record)
    report = {
        "instance_success_rate": {m: hits[m] / max(total, 1) for m in methods},
        "boxes": total,
        "samples": len(scenes),
        "settings": {k: v for k, v in vars(args).items() if k != "run"},
        "per_sample": per_sample,
    }
    (run / "report.json").write_text(json.dumps(report, indent=2))
    if rows["global"]:
        w = len(rows["global"])
        grid = Image.new("RGB", (w * CANVAS, len(methods) * CANVAS))
        for r, name in enumerate(methods):
            for c, im in enumerate(rows[name]):
                grid.paste(im, (c * CANVAS, r * CANVAS))
        grid.save(run / "grid.png")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default="outputs/roictrl-testbed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--count", type=int, default=2000, help="training scenes")
    ap.add_argument("--base-init", dest="base_init", choices=["digits-unet", "scratch"], default="digits-unet",
                    help="the base's starting weights: the shipped digits-unet (default) or random")
    ap.add_argument("--base-steps", dest="base_steps", type=int, default=600)
    ap.add_argument("--adapter-steps", dest="adapter_steps", type=int, default=1800)
    ap.add_argument("--adapter-lr", dest="adapter_lr", type=float, default=5e-4)
    ap.add_argument("--gate-lr-scale", dest="gate_lr_scale", type=float, default=10.0,
                    help="learning-rate factor of the adapter's scalar gates (recipe option gate_lr_scale)")
    ap.add_argument("--roi-sizes", dest="roi_sizes", type=int, nargs=3, default=list(ROI_SIZES),
                    help="ROI grid per UNet level (64x64, 32x32, 16x16 maps)")
    ap.add_argument("--batch-size", dest="batch_size", type=int, default=32)
    ap.add_argument("--samples", type=int, default=120, help="held-out layouts to generate")
    ap.add_argument("--steps", type=int, default=25, help="denoising steps")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--grid", type=int, default=12, help="layouts shown in grid.png")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="smoke run: 64 scenes, 4 + 4 steps, 3 samples")
    args = ap.parse_args(argv)
    if args.tiny:
        args.count, args.base_steps, args.adapter_steps, args.batch_size = 64, 4, 4, 8
        args.samples, args.steps, args.grid = 3, 4, 3
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    base = train_base(run, args)
    adapter = train_adapter(run, base, args)
    report = evaluate(run, base, adapter, args)
    print(json.dumps(report["instance_success_rate"]), f"boxes={report['boxes']}", f"out={run}")
    return report


if __name__ == "__main__":
    main()
