"""The length-extension experiment of radial attention, reproduced on the testbed (issue 7).

``digits-video`` (the tiny Wan-architecture testbed model) was trained on 29-frame clips (8 latent
frames). At that length it first compares dense and radial attention without tuning; then at
``--factor`` x that length (default 4: 32 latent frames, 125 frames) it compares

(a) dense attention, no tuning            (b) radial attention, no tuning
(c) radial attention + LoRA (recipe ``long-video``)
(d) dense attention + LoRA (the same recipe with ``--attention dense``, the same steps and seed)

Radial generation keeps the reference's dense warm-up at the same fraction of the schedule (the first
12 of 50 steps there, ``--dense-timesteps 6`` of 25 here); LoRA training runs the sparse mask on every
step and layer.

Quality: per-frame digit accuracy (the shipped classifier on the digit's box, located per frame),
temporal consistency (PSNR between consecutive frames) and motion jitter (mean |second difference| of
the digit's position; 0 for constant velocity) on ``--samples`` videos at 4x length and
``--trained-samples`` at the trained length (class ``i % 10``, seed ``1000 + i``: every condition draws
the same videos, so differences between conditions are paired, reported with their standard errors);
the same metrics on real clips of that length are the reference row. Cost: LoRA training wall time
(c) vs (d) and generation time per video. Writes ``OUT.json`` and ``OUT.png``.

    python scripts/length_extension.py                          # the README table
    python scripts/length_extension.py --samples 4 --trained-samples 4 --train-steps 4 --clips 8 --steps 4 \
        --dense-timesteps 1 --out /tmp/le
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import diffattn
from diffattn.benchmark import environment, save_figure, write_json
from diffattn.testbed import models
from diffattn.testbed.classifier import load_classifier
from diffattn.testbed.data import (
    MOVING_CANVAS,
    MOVING_DIGIT,
    MovingDigitsDataset,
    caption_for,
    write_video_folder,
)
from diffattn.testbed.metrics import moving_digit_metrics

DIGIT = MOVING_DIGIT  # digit side in the moving-digit clips
TRAINED_FRAMES = models.default_call_kwargs("digits-video")["num_frames"]  # its training length
TRAINED_LATENT = (TRAINED_FRAMES - 1) // 4 + 1  # 4 video frames per latent frame after the first


def video_metrics(videos: list[np.ndarray], labels: list[int], classifier: Any) -> dict[str, Any]:
    """The testbed's moving-digit figures, rounded for the table (``per_video``: each video's accuracy)."""
    m = moving_digit_metrics(videos, labels, DIGIT, classifier)
    return {
        "frame_accuracy": round(m["frame_accuracy"], 4),
        "consecutive_psnr_db": round(m["consecutive_psnr_db"], 2),
        "motion_jitter_px": round(m["motion_jitter_px"], 3),
        "per_video": [round(a, 4) for a in m["per_video"]],
    }


def paired_difference(a: list[float], b: list[float]) -> dict[str, float]:
    """Mean of ``a - b`` over videos made from the same seeds and class, with its standard error: the same
    noise and prompt cancel, so this is far tighter than the difference of two means."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    se = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": round(float(d.mean()), 4), "standard_error": round(se, 4), "videos": len(d)}


def generate(
    pipe: Any, args: argparse.Namespace, num_frames: int, desc: str, samples: int | None = None
) -> tuple[list[np.ndarray], float]:
    kw = {**models.default_call_kwargs("digits-video"), "num_frames": num_frames, "num_inference_steps": args.steps}
    samples = args.samples if samples is None else samples
    videos, seconds = [], 0.0
    for i in tqdm(range(samples), desc=desc, leave=False):
        t0 = time.perf_counter()
        out = pipe(prompt=caption_for(i % 10), generator=torch.Generator().manual_seed(1000 + i), **kw).frames[0]
        seconds += time.perf_counter() - t0
        videos.append(np.asarray(out))
    return videos, seconds / samples


def train_lora(args: argparse.Namespace, data: Path, out: Path, attention: str | None) -> tuple[float, dict]:
    """Train one LoRA; returns its wall time and losses (the fixed-set loss: 8 fixed (timestep, noise)
    draws of training clips, before and after, each under the attention it trains with)."""
    from diffattn.lora.trainer import TrainConfig, Trainer

    cfg = TrainConfig(
        recipe="long-video",
        model=args.model,
        data=str(data),
        output=str(out),
        seed=0,
        resolution=MOVING_CANVAS,
        num_frames=args.long_frames,
        max_steps=args.train_steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        rank=args.rank,
        lr_scheduler="constant",
        cpu=True,
        eval_samples=8,
        log_every=10,
        max_sequence_length=models.TEXT_LENGTH,
        timestep_sampling="logit_normal",
        attention=attention,
        attention_options={} if attention == "dense" else dict(args.radial),
    )
    t0 = time.perf_counter()
    result = Trainer(cfg).train()
    losses = {
        "lora_final_train_loss": round(result.final_loss, 4),
        "lora_fixed_set_loss": [round(result.fixed_loss_start, 4), round(result.fixed_loss_end, 4)],
    }
    return time.perf_counter() - t0, losses


def figure(rows: list[dict], strips: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(12, 2.0 + 0.9 * len(strips)))
    grid = fig.add_gridspec(len(strips) + 1, 3, height_ratios=[2.2] + [1] * len(strips))
    names = [r["condition"] for r in rows]
    for j, (key, label) in enumerate(
        (("frame_accuracy", "per-frame digit accuracy"), ("consecutive_psnr_db", "consecutive-frame PSNR (dB)"),
         ("motion_jitter_px", "motion jitter (px, lower = smoother)"))
    ):
        ax = fig.add_subplot(grid[0, j])
        ax.barh(names, [r[key] for r in rows], color=["#bbb", "#9c9", "#888", "#4a7", "#27c", "#c72", "#555"][: len(rows)])
        ax.invert_yaxis()
        ax.set_title(label, fontsize=9)
        ax.tick_params(labelsize=7)
    for i, (name, strip) in enumerate(strips.items()):
        ax = fig.add_subplot(grid[i + 1, :])
        ax.imshow(strip)
        ax.set_axis_off()
        ax.set_title(f"{name}: every 4th frame of sample 0", fontsize=8, loc="left")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--factor", type=int, default=4, help="length multiple of the trained 8 latent frames")
    p.add_argument("--samples", type=int, default=20, help="videos per condition at 4x length")
    p.add_argument(
        "--trained-samples", type=int, default=100,
        help="videos per condition at the trained length (cheap; the radial-vs-dense gap is a few points, so "
        "it needs many videos: reported as a paired difference with its standard error)",
    )
    p.add_argument("--steps", type=int, default=25, help="denoising steps per video")
    p.add_argument("--train-steps", type=int, default=150)
    p.add_argument("--clips", type=int, default=400, help="long training clips (from the training digits)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--block-size", type=int, default=64, help="radial block size (64 = one latent frame)")
    p.add_argument("--decay-factor", type=float, default=1.0)
    p.add_argument(
        "--dense-timesteps",
        type=int,
        default=6,
        help="generation: the first N denoising steps stay dense (the reference runs 12 of 50 dense; 6 of 25 here)",
    )
    p.add_argument("--dense-layers", type=int, default=0, help="generation: the first N transformer blocks stay dense")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--model", default=None, help="a digits-video pipeline folder (default: the shipped one)")
    p.add_argument("--out", default="docs/length_extension")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.model = args.model or str(models.weights_dir("digits-video"))
    for name in ("steps", "samples", "trained_samples", "train_steps", "clips", "batch_size", "factor"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.dense_timesteps <= args.steps:
        p.error(f"--dense-timesteps must be in [0, --steps={args.steps}], got {args.dense_timesteps}")
    if args.dense_layers < 0:
        p.error(f"--dense-layers must be >= 0, got {args.dense_layers}")
    # training runs the sparse mask on every layer and step; generation adds the dense warm-up
    args.radial = {"block_size": args.block_size, "decay_factor": args.decay_factor}
    args.radial_generation = {**args.radial, "dense_timesteps": args.dense_timesteps, "dense_layers": args.dense_layers}
    args.long_frames = 1 + (TRAINED_LATENT * args.factor - 1) * 4
    classifier = load_classifier()
    rows: list[dict] = []
    strips: dict[str, np.ndarray] = {}

    def record(name: str, videos: list[np.ndarray], gen_s: float | None, extra: dict | None = None) -> None:
        labels = [i % 10 for i in range(len(videos))]
        row = {"condition": name, **video_metrics(videos, labels, classifier)}
        if gen_s is not None:
            row["seconds_per_video"] = round(gen_s, 2)
        rows.append({**row, **(extra or {})})
        strips[name] = np.concatenate(list(videos[0][::4]), axis=1)
        print({k: v for k, v in rows[-1].items() if k != "per_video"})

    clips = MovingDigitsDataset(num_clips=args.samples, split="heldout", seed=1, num_frames=args.long_frames, channels=3)
    real = [clips[i]["pixel_values"].permute(1, 2, 3, 0).numpy() for i in range(len(clips))]
    rows_real = {"condition": "real clips (reference)", **video_metrics(real, [clips[i]["label"] for i in range(len(clips))], classifier)}

    pipe = models.load_folder(args.model, "digits-video")
    # at the trained length first: radial without tuning should stay close to dense there
    for label, opts in (("dense, trained length", None), ("radial, trained length", args.radial_generation)):
        with diffattn.apply(pipe, "radial", **opts) if opts else contextlib.nullcontext():
            videos, t = generate(pipe, args, TRAINED_FRAMES, label, args.trained_samples)
        record(label, videos, t)
    trained_gap = paired_difference(rows[1]["per_video"], rows[0]["per_video"])
    print(f"radial - dense at the trained length: {trained_gap}")
    videos, t = generate(pipe, args, args.long_frames, "(a) dense")
    record("(a) dense, no tuning", videos, t)
    with diffattn.apply(pipe, "radial", **args.radial_generation):
        videos, t = generate(pipe, args, args.long_frames, "(b) radial")
    record("(b) radial, no tuning", videos, t)

    with tempfile.TemporaryDirectory(prefix="diffattn-le-") as tmp:
        data = write_video_folder(
            MovingDigitsDataset(num_clips=args.clips, split="train", seed=7, num_frames=args.long_frames, channels=3),
            Path(tmp) / "clips",
        )
        train_s, losses = {}, {}
        for name, attention in (("radial", None), ("dense", "dense")):
            train_s[name], losses[name] = train_lora(args, data, Path(tmp) / name, attention)
            print(f"LoRA training with {name} attention: {train_s[name]:.1f} s, {losses[name]}")
        for name, label in (("radial", "(c) radial + LoRA"), ("dense", "(d) dense + LoRA")):
            tuned = models.load_folder(args.model, "digits-video")
            tuned.load_lora_weights(str(Path(tmp) / name))
            if name == "radial":
                with diffattn.apply(tuned, "radial", **args.radial_generation):
                    videos, t = generate(tuned, args, args.long_frames, label)
            else:
                videos, t = generate(tuned, args, args.long_frames, label)
            record(label, videos, t, {"lora_train_seconds": round(train_s[name], 1), **losses[name]})
    rows.append(rows_real)
    by = {r["condition"][:3]: r["per_video"] for r in rows}
    paired = {f"{a} - {b}": paired_difference(by[a], by[b]) for a, b in (("(b)", "(a)"), ("(c)", "(a)"), ("(c)", "(b)"), ("(d)", "(a)"))}
    print(f"paired differences of per-frame accuracy at 4x length: {paired}")

    out = Path(args.out)
    result = {
        "model": "testbed:digits-video (trained on 29 frames = 8 latent frames)",
        "frames": args.long_frames,
        "latent_frames": 8 * args.factor,
        "tokens": 8 * args.factor * 64,
        "radial_options": args.radial,  # training
        "radial_generation_options": args.radial_generation,
        "samples": args.samples,
        "trained_samples": args.trained_samples,
        "radial_minus_dense_trained_length": trained_gap,
        "paired_differences_4x": paired,
        "denoising_steps": args.steps,
        "lora": {"steps": args.train_steps, "batch_size": args.batch_size, "rank": args.rank, "clips": args.clips,
                 "learning_rate": args.learning_rate},
        "training_speedup_radial_vs_dense": round(train_s["dense"] / train_s["radial"], 2),
        "rows": rows,
        "environment": environment(),
        "threads": args.threads,
    }
    write_json(out.with_suffix(".json"), result)
    figure(rows[:-1], strips, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
