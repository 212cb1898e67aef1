"""Testbed check of the two-stage high-resolution pipeline (issue 8, item 6) on the testbed DiT.

Generates ``--samples`` digits at ``--scale`` x the base side (32 px -> 128 px by default) with
:class:`~diffattn.pipelines.HighResPipeline`, once with hierarchical local attention in stage 2 and once
with dense attention over the same tokens (same seeds, same LR image), optionally after training the LoRA
bridge (recipe ``high-res``) for ``--train-steps`` on the testbed digits at the base size. Per sample:

- structure: PSNR of the HR output box-downsampled to the LR size against the LR image (dB);
- detail: fraction of the spectral energy above the LR image's Nyquist frequency;
- window-grid artifacts: power at the harmonics of the LR-window period (``lr_window`` tokens) over the
  median power of the neighbouring frequencies, along rows and columns (about 1: no grid). The
  harmonics also hit the content's own pixel grid (a 32 px LR digit is 4 px blocks, 16 px at 4x), so
  the same figure is taken of stage 2's starting image (the LR image upsampled as the pipeline does,
  no attention at all), and the summary gives the paired local - dense difference with its standard
  error: local attention adds a window grid only if it scores above dense attention on the same tokens;
- centre seam: the jump across the centre column's token border over the median token-border jump;
- window-border seams: the same figure at every vertical LR-window border (token columns that are
  multiples of ``lr_window``), beside the number of LR windows that enter or leave the guidance an HR
  token sees when it steps across that border (each HR token sees the LR under its own window and the
  adjacent ones, so the set shifts at every window border; at the centre of a 4-window row both ends
  change, at the other borders one);
- centre profile: the same figure at every pixel-column border within 2 tokens of the centre (the
  middle one is the centre border): a seam stands out alone, busy content raises its neighbours too.

Writes ``OUT.json`` and ``OUT.png`` (LR | HR local | HR dense per sample).

    python scripts/eval_high_res.py --out docs/eval_high_res                 # trained digits-dit weights
    python scripts/eval_high_res.py --train-steps 200 --out docs/eval_high_res
    python scripts/eval_high_res.py --untrained --samples 1 --steps 4 --out /tmp/eval_high_res   # smoke run
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffattn.pipelines import HighResPipeline
from diffattn.pipelines.high_res import upsample_image
from tqdm import tqdm

from diffattn.benchmark import environment, save_figure, write_json
from diffattn.testbed import metrics, models
from diffattn.testbed.data import caption_for


def spectrum_metrics(image: np.ndarray, lr_side: int, period_px: int) -> dict[str, float]:
    """High-frequency energy fraction and window-grid peak ratio of an ``(H, W, 3)`` image in [0, 1]."""
    gray = torch.from_numpy(image).float().mean(-1)
    gray = gray - gray.mean()
    power = torch.fft.fft2(gray).abs().square()
    h, w = gray.shape
    fy = torch.fft.fftfreq(h).abs()[:, None] * h
    fx = torch.fft.fftfreq(w).abs()[None, :] * w
    high = (fy > lr_side / 2) | (fx > lr_side / 2)  # beyond the LR image's Nyquist frequency
    total = float(power.sum())
    hf = float(power[high].sum()) / total if total > 0 else 0.0
    ratios = []
    for axis_power, n in ((power.mean(0), w), (power.mean(1), h)):
        base = n // period_px  # grid frequency in cycles per image
        for k in range(1, n // 2 // max(base, 1) + 1):
            f = k * base
            if base < 1 or f >= n // 2:
                break
            around = torch.cat([axis_power[max(1, f - 3) : f - 1], axis_power[f + 2 : f + 4]])
            if len(around):
                ratios.append(float(axis_power[f] / around.median().clamp_min(1e-12)))
    return {"high_freq_energy": hf, "grid_peak_ratio": max(ratios) if ratios else float("nan")}


def relative_jumps(image: np.ndarray, unit: int) -> np.ndarray:
    """Jump at every pixel-column border over the median jump across token borders.

    Jump: mean absolute horizontal difference between the two pixel columns that meet at a border
    (entry ``k``: between columns ``k`` and ``k + 1``); ``unit``-px tokens. About 1 at a token border
    like any other.
    """
    jumps = np.abs(np.diff(image.mean(-1), axis=1)).mean(0)
    return jumps / np.median(jumps[unit - 1 :: unit])


def seam_ratio(image: np.ndarray, unit: int) -> float:
    """The relative jump across the centre column's token border."""
    return float(relative_jumps(image, unit)[image.shape[1] // 2 - 1])


def centre_profile(image: np.ndarray, unit: int, span: int = 2) -> list[float]:
    """:func:`seam_ratio`'s figure at every pixel-column border within ``span`` tokens of the centre (the
    middle entry is the centre border itself): a seam is high there alone, busy content around it too."""
    c = image.shape[1] // 2 - 1
    return relative_jumps(image, unit)[c - span * unit : c + span * unit + 1].tolist()


def border_seams(image: np.ndarray, unit: int, window: int) -> list[float]:
    """:func:`seam_ratio`'s figure at each vertical border between ``window``-token columns."""
    step = window * unit
    return relative_jumps(image, unit)[step - 1 : image.shape[1] - 1 : step].tolist()


def lr_context_changes(n_windows: int) -> list[int]:
    """LR windows entering or leaving the guidance across each window border (window ``j - 1`` -> ``j``):
    a token in window ``i`` sees LR windows ``i - 1 .. i + 1`` (clipped to the grid)."""

    def seen(i: int) -> set[int]:
        return set(range(max(0, i - 1), min(n_windows, i + 2)))

    return [len(seen(j - 1) ^ seen(j)) for j in range(1, n_windows)]


def structure_psnr(hr: np.ndarray, lr: np.ndarray) -> float:
    a = torch.from_numpy(hr).permute(2, 0, 1)[None].float()
    down = F.adaptive_avg_pool2d(a, lr.shape[:2])[0].permute(1, 2, 0).numpy()
    return float(metrics.psnr(down, lr))


def train_bridge(args, folder: Path) -> Path:
    from diffattn.lora.trainer import TrainConfig, Trainer

    from diffattn.testbed.data import build_dataset, write_image_folder

    data = write_image_folder(build_dataset("digits", size=args.base, channels=3), folder / "data", progress=False)
    cfg = TrainConfig(
        recipe="high-res", model="testbed:digits-dit", data=str(data), output=str(folder / "bridge"),
        resolution=args.base, max_steps=args.train_steps, batch_size=8, learning_rate=1e-3, cpu=True,
        eval_samples=0, attention_options={"radius": args.radius},
    )
    Trainer(cfg).train()
    return folder / "bridge"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--base", type=int, default=32, help="base side in px (the testbed's training size)")
    p.add_argument("--scale", type=int, default=4, help="target side = base x scale")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--hr-steps", type=int, default=16)
    p.add_argument("--radius", type=int, default=8)
    p.add_argument("--lr-window", type=int, default=16)
    p.add_argument("--lr-mode", choices=["window", "all", "sliding"], default="window",
                   help="LR guidance of stage 2 (window: the reference's inference mask)")
    p.add_argument("--bridge", default=None, help="a trained bridge LoRA folder")
    p.add_argument("--train-steps", type=int, default=0, help="train the bridge first (0: no bridge)")
    p.add_argument("--untrained", action="store_true", help="random digits-dit weights (smoke run only)")
    p.add_argument("--out", default="outputs/eval_high_res")
    args = p.parse_args()

    pipe = models.build("digits-dit") if args.untrained else models.load("digits-dit")
    hr = HighResPipeline(**pipe.components)
    bridge = args.bridge
    if args.train_steps and not args.untrained:
        bridge = str(train_bridge(args, Path(tempfile.mkdtemp(prefix="high_res_"))))
    if bridge:
        hr.load_lora_weights(bridge)
    spec = models.get("digits-dit")
    side = args.base * args.scale
    unit = hr.vae_scale_factor * 2
    period_px = args.lr_window * unit
    rows, tiles = [], []
    for i in tqdm(range(args.samples), desc="samples"):
        label = i % 10
        prompt = caption_for(label)
        common = dict(prompt=prompt, height=side, width=side, lr_height=args.base, lr_width=args.base,
                      num_inference_steps=args.steps, hr_steps=args.hr_steps, radius=args.radius,
                      lr_window=args.lr_window, lr_mode=args.lr_mode, output_type="np", return_lr=True,
                      max_sequence_length=spec.call_kwargs.get("max_sequence_length", 512),
                      true_cfg_scale=spec.call_kwargs.get("true_cfg_scale", 1.0),
                      negative_prompt=spec.call_kwargs.get("negative_prompt"))
        local = hr(**common, generator=torch.Generator().manual_seed(i))
        dense = hr(**common, local_attention=False, generator=torch.Generator().manual_seed(i))
        lr_img = local.lr_images[0]
        row = {"sample": i, "prompt": prompt}
        for name, out in (("local", local.images[0]), ("dense", dense.images[0])):
            row[f"{name}_structure_psnr"] = structure_psnr(out, lr_img)
            for k, v in spectrum_metrics(out, args.base, period_px).items():
                row[f"{name}_{k}"] = v
            row[f"{name}_centre_seam_ratio"] = seam_ratio(out, unit)
            row[f"{name}_border_seams"] = border_seams(out, unit, args.lr_window)
            row[f"{name}_centre_profile"] = centre_profile(out, unit)
        start = upsample_image(torch.from_numpy(lr_img).permute(2, 0, 1)[None].float(), side, side)
        row["lr_upsampled_grid_peak_ratio"] = spectrum_metrics(start[0].permute(1, 2, 0).numpy(), args.base, period_px)[
            "grid_peak_ratio"
        ]
        row["local_vs_dense_psnr"] = float(metrics.psnr(local.images[0], dense.images[0]))
        rows.append(row)
        up = np.kron(lr_img, np.ones((args.scale, args.scale, 1)))
        tiles.append(np.concatenate([up, local.images[0], dense.images[0]], axis=1))
        tqdm.write(" ".join(f"{k}={np.round(v, 3).tolist()}" if not isinstance(v, str) else f"{k}={v}"
                            for k, v in row.items()))
    summary = {k: np.mean([r[k] for r in rows], axis=0).tolist() for k in rows[0] if k not in ("sample", "prompt")}
    summary["lr_context_changes"] = lr_context_changes(-(-side // unit // args.lr_window))
    diff = np.array([r["local_grid_peak_ratio"] - r["dense_grid_peak_ratio"] for r in rows])
    summary["grid_peak_ratio_local_minus_dense"] = float(diff.mean())
    summary["grid_peak_ratio_local_minus_dense_sem"] = (
        float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else float("nan")
    )
    print("mean:", " ".join(f"{k}={np.round(v, 3).tolist()}" for k, v in summary.items()))
    out = Path(args.out)
    write_json(out.with_suffix(".json"), {"environment": environment(), "args": vars(args), "bridge": bridge,
                                          "samples": rows, "mean": summary})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3 * len(tiles)))
    ax.imshow(np.concatenate(tiles, axis=0).clip(0, 1))
    ax.set_axis_off()
    ax.set_title(f"LR (upsampled) | HR local (radius {args.radius}) | HR dense, {side} px from {args.base} px")
    save_figure(fig, out.with_suffix(".png"))
    plt.close(fig)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
