"""The testbed quality table: every method on every testbed model it applies to, against dense attention.

For each row, ``diffattn.testbed.evaluate`` draws the same seeds (sample i: seed ``--seed + i``, class
``i % 10``) with dense attention and with the method, and this script reports, with their sample counts
and standard errors:

- class accuracy of dense and of the method (videos: per-frame, digit located, averaged per video), and
  the paired difference method - dense with its standard error;
- the Fréchet distance of each to held-out real digits (classifier features; n and bootstrap std);
- PSNR / SSIM of the method's samples against dense (mean and standard error over samples);
- the attention speed-up measured on this machine: the summed forward time of the attention modules,
  dense / method, at the token counts listed. At these 64-512 token counts a speed-up measures the
  method's overhead, not its asymptotic saving.

``digits-lamamba`` has no dense attention to compare with: its row is the model's own accuracy and
Fréchet distance. Rows whose method does not apply to a model are reported as such, not dropped.

    python scripts/quality_table.py --models digits-unet,digits-dit,digits-lamamba --samples 359 --out docs/quality_images
    python scripts/quality_table.py --models digits-video --samples 100 --out docs/quality_video

Writes ``OUT.json``, ``OUT.png`` (per row: dense samples above the method's) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffattn.benchmark import environment, write_json
from diffattn.testbed import models
from diffattn.testbed.evaluate import evaluate

# (model, method, options, label, needs_lora): the methods' defaults unless the docs' figures use others
ROWS: list[tuple[str, str, dict[str, Any], str, bool]] = [
    ("digits-unet", "agent", {}, "agent (AgentSD schedule)", False),
    ("digits-unet", "agent", {"agent_ratio": 0.0, "sx": 2, "sy": 2}, "ToMe (ratio 0.4, no agents)", False),
    ("digits-unet", "hilbert_local", {}, "hilbert_local", False),
    ("digits-dit", "agent", {"num_agents": 64}, "agent (64 pooled agents)", False),
    ("digits-dit", "agent", {"num_agents": 64}, "agent (64 pooled agents) + LoRA", True),
    ("digits-dit", "hilbert_local", {}, "hilbert_local", False),
    ("digits-video", "radial", {"decay_factor": 1.0, "block_size": 64, "dense_timesteps": 6}, "radial", False),
    ("digits-video", "hilbert_local", {}, "hilbert_local", False),
    # 16 agents per latent frame: at the default 64 the agents are the 64 tokens of a latent frame and
    # every layer stays dense (the processor says so)
    ("digits-video", "agent", {"num_agents": 16}, "agent (16 pooled agents per latent frame)", False),
]


def _mean_se(values: list[float]) -> tuple[float, float]:
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _row(report: dict[str, Any]) -> dict[str, Any]:
    acc, fd = report["class_accuracy"], report["frechet_distance"]
    d, m = acc["dense"]["per_sample"], acc["method"]["per_sample"]
    out: dict[str, Any] = {"samples": report["samples"], "patched_layers": report["patched_layers"]}
    for key, vals in (("accuracy_dense", d), ("accuracy_method", m)):
        out[key], out[key + "_se"] = _mean_se(vals)
    out["accuracy_diff"], out["accuracy_diff_se"] = _mean_se([b - a for a, b in zip(d, m)])
    for key in ("dense", "method"):
        out[f"fd_{key}"], out[f"fd_{key}_std"] = fd[key]["fd"], fd[key]["std"]
    out["fd_n"] = fd["dense"]["n"]
    out["psnr_db"], out["psnr_db_se"] = _mean_se(report["psnr_db"]["per_sample"])
    out["ssim"], out["ssim_se"] = _mean_se(report["ssim"]["per_sample"])
    attn = report["timing"]["attention"]
    out["attention_dense_s"], out["attention_method_s"] = attn["dense_s"], attn["method_s"]
    out["attention_speedup"], out["tokens"] = attn["speedup"], attn["tokens"]
    return out


def _lamamba_row(samples: int, seed: int, steps: int | None) -> tuple[dict[str, Any], np.ndarray]:
    """digits-lamamba's own accuracy and Fréchet distance (it has no dense attention to compare with)."""
    from diffattn.testbed import metrics
    from diffattn.testbed.classifier import load_classifier
    from diffattn.testbed.data import caption_for

    pipe = models.load("digits-lamamba")
    call = {**models.default_call_kwargs("digits-lamamba"), "output_type": "np"}
    if steps is not None:
        call["num_inference_steps"] = steps
    labels = [i % 10 for i in range(samples)]
    images = []
    for start in range(0, samples, 10):
        idx = range(start, min(start + 10, samples))
        gens = [torch.Generator().manual_seed(seed + i) for i in idx]
        images.append(np.asarray(pipe(**models.prompt_kwargs(call, [caption_for(labels[i]) for i in idx], gens)).images))
    arr = np.concatenate(images)
    clf = load_classifier()
    res = metrics.class_accuracy(arr, labels, classifier=clf)
    hits = [float(p == lab) for p, lab in zip(res["predictions"], labels)]
    fd = metrics.frechet_distance(arr, n=min(samples, 359), classifier=clf)
    row: dict[str, Any] = {"samples": samples}
    row["accuracy_method"], row["accuracy_method_se"] = _mean_se(hits)
    row["fd_method"], row["fd_method_std"], row["fd_n"] = fd["fd"], fd["std"], fd["n"]
    return row, arr


def _fmt(x: Any, se: Any = None, pct: bool = False, digits: int = 2) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    scale = 100.0 if pct else 1.0
    text = f"{x * scale:.{1 if pct else digits}f}"
    if se is not None and isinstance(se, float) and math.isfinite(se):
        text += f" ± {se * scale:.{1 if pct else digits}f}"
    return text + ("%" if pct else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | method | n | accuracy dense | accuracy method | method - dense | FD dense | FD method | "
        "PSNR vs dense | SSIM vs dense | attention speed-up (tokens) |\n" + "|---" * 11 + "|"
    )
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"| `{r['model']}` | {r['label']} | | not applicable: {r['error']} |" + " |" * 7)
            continue
        speed = f"{r['attention_speedup']:.2f}x ({', '.join(map(str, r['tokens']))})" if r.get("attention_speedup") else "-"
        fd_dense = _fmt(r.get("fd_dense"), r.get("fd_dense_std"))
        lines.append(
            f"| `{r['model']}` | {r['label']} | {r['samples']} | {_fmt(r.get('accuracy_dense'), r.get('accuracy_dense_se'), True)} | "
            f"{_fmt(r['accuracy_method'], r['accuracy_method_se'], True)} | {_fmt(r.get('accuracy_diff'), r.get('accuracy_diff_se'), True)} | "
            f"{fd_dense} | {_fmt(r['fd_method'], r['fd_method_std'])} (n={r['fd_n']}) | "
            f"{_fmt(r.get('psnr_db'), r.get('psnr_db_se'))} | {_fmt(r.get('ssim'), r.get('ssim_se'), digits=3)} | {speed} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="digits-unet,digits-dit,digits-video,digits-lamamba")
    p.add_argument("--samples", type=int, default=100, help="samples per row (images: 359 uses every held-out digit in the FD)")
    p.add_argument("--seed", type=int, default=1000, help="sample i: seed + i, class i % 10")
    p.add_argument("--inference-steps", type=int, default=None, help="default: each model's (25)")
    p.add_argument("--agent-lora", default=None, help="the digits-dit agent LoRA (scripts/agent_lora_recovery.py's OUT/lora)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/quality_table")
    args = p.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - set(models.names()))
    if unknown or not wanted:
        p.error(f"--models: unknown {unknown or '(none given)'}; valid: {', '.join(models.names())}")
    if args.samples < 2 or args.threads < 1 or (args.inference_steps is not None and args.inference_steps < 1):
        p.error("--samples must be >= 2, --threads and --inference-steps >= 1")
    if args.agent_lora is not None and not Path(args.agent_lora).exists():
        p.error(f"--agent-lora: {args.agent_lora} does not exist")
    torch.set_num_threads(args.threads)
    rows, strips = [], []
    t_start = time.perf_counter()
    for model, method, options, label, needs_lora in ROWS:
        if model not in wanted:
            continue
        if needs_lora and args.agent_lora is None:
            print(f"skip {model} / {label}: no --agent-lora given")
            continue
        base = {"model": model, "method": method, "options": options, "label": label}
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            try:
                report = evaluate(
                    f"testbed:{model}", method, options=options, samples=args.samples, seed=args.seed, steps=args.inference_steps,
                    timing=True, lora=args.agent_lora if needs_lora else None, out_dir=tmp, progress=True,
                )  # fmt: skip
            except (ValueError, NotImplementedError) as e:  # the method does not apply to this model
                rows.append({**base, "error": str(e).splitlines()[0][:160]})
                print(f"{model} / {label}: not applicable: {rows[-1]['error']}")
                continue
            from PIL import Image

            grid = np.asarray(Image.open(Path(tmp) / "grid.png"))
            # the first block of 10 samples only (comparison_grid: 2 px pad, 12 px captions, two 64 px rows)
            grid = grid[: 2 + 12 + 2 * (64 + 2)]
        rows.append({**base, **_row(report), "lora": report["lora"], "seconds": round(time.perf_counter() - t0, 1)})
        strips.append((f"{model}: {label}", grid, None))
        print(markdown([rows[-1]]).splitlines()[-1])
    if "digits-lamamba" in wanted:
        t0 = time.perf_counter()
        row, arr = _lamamba_row(args.samples, args.seed, args.inference_steps)
        rows.append({"model": "digits-lamamba", "method": "lamamba", "options": {}, "label": "lamamba (the model)",
                     **row, "seconds": round(time.perf_counter() - t0, 1)})  # fmt: skip
        strips.append(("digits-lamamba: its own samples", arr, None))
    out = Path(args.out)
    record = {
        "samples": args.samples,
        "seed": args.seed,
        "command": "python scripts/quality_table.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "rows": rows,
        "seconds": round(time.perf_counter() - t_start, 1),
        "environment": environment(),
    }
    write_json(out.with_suffix(".json"), record)
    _save_grids(strips, out.with_suffix(".png"))
    print(markdown(rows))


def _save_grids(strips: list[tuple[str, np.ndarray, Any]], path: Path) -> None:
    """Stack the evaluation grids (dense row above the method row, first 10 samples) with their labels."""
    from PIL import Image, ImageDraw

    images = []
    for label, arr, _ in strips:
        if arr.ndim == 4:  # a batch of samples (digits-lamamba): one row
            tiles = [Image.fromarray((np.clip(a, 0, 1) * 255).round().astype(np.uint8)[..., :3]).resize((64, 64), Image.NEAREST) for a in arr[:10]]
            row = Image.new("RGB", (64 + 10 * 66, 66), "white")
            for i, t in enumerate(tiles):
                row.paste(t, (64 + i * 66, 1))
            arr = np.asarray(row)
        img = Image.fromarray(arr[..., :3].astype(np.uint8))
        canvas = Image.new("RGB", (img.width, img.height + 16), "white")
        ImageDraw.Draw(canvas).text((4, 2), label, fill="black")
        canvas.paste(img, (0, 16))
        images.append(canvas)
    if not images:
        return
    width = max(i.width for i in images)
    sheet = Image.new("RGB", (width, sum(i.height for i in images)), "white")
    y = 0
    for i in images:
        sheet.paste(i, (0, y))
        y += i.height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


if __name__ == "__main__":
    main()
