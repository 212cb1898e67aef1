"""Peak memory and time of decoding a video at 1x and 4x length, stock VAE vs ``long_video_decoding``.

Full-size diffusers video VAEs (the published Wan 2.1, HunyuanVideo and Mochi architectures, random
weights: memory and time do not depend on the weights) decode a random latent of ``--latent-frames``
frames at ``--size`` pixels, once as diffusers ships them and once inside
``diffattn.pipelines.long_video_decoding(vae, tile_size=--tile-size)``. The figure is the RSS
high-water mark of the decode above the process's RSS just before it (activations and output, not
the weights). Writes ``OUT.json`` and ``OUT.png``.

    python scripts/bench_video_decode.py                      # 64 px, 8 and 32 latent frames, 32 px tiles
    python scripts/bench_video_decode.py --vaes wan --size 128 --tile-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path
from typing import Any

import torch
from diffattn.pipelines import long_video_decoding
from tqdm import tqdm

from diffattn.benchmark import environment, measure_peak, save_figure, write_json


def build_vae(name: str) -> tuple[torch.nn.Module, int]:
    """The published architecture of each VAE (random weights) and its latent channels."""
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLMochi, AutoencoderKLWan

    torch.manual_seed(0)
    if name == "wan":  # Wan 2.1's VAE config
        vae = AutoencoderKLWan(
            base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True]
        )
        return vae.eval(), 16
    if name == "hunyuan-video":
        return AutoencoderKLHunyuanVideo().eval(), 16
    if name == "mochi":
        return AutoencoderKLMochi().eval(), 12
    raise ValueError(f"--vaes: unknown VAE {name!r}; choose from wan, hunyuan-video, mochi")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vaes", nargs="+", default=["wan", "hunyuan-video", "mochi"])
    p.add_argument("--size", type=int, default=64, help="frame side in pixels (a multiple of 8)")
    p.add_argument("--latent-frames", type=int, nargs="+", default=[8, 32], help="1x and 4x length")
    p.add_argument("--tile-size", type=int, default=32, help="long_video_decoding's spatial tile, pixels")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/bench_video_decode")
    args = p.parse_args()
    if args.size % 8 or args.size < 8:
        p.error(f"--size must be a positive multiple of 8 (the VAEs' spatial factor), got {args.size}")
    if not Path("/proc/self/clear_refs").exists():
        p.error("this benchmark reads Linux's /proc/self RSS high-water mark")
    torch.set_num_threads(args.threads)

    rows: list[dict[str, Any]] = []
    jobs = [(v, f, mode) for v in args.vaes for f in args.latent_frames for mode in ("stock", "long_video_decoding")]
    bar = tqdm(jobs, desc="decode")
    vae_name, vae, channels = None, None, 0
    for name, frames, mode in bar:
        if name != vae_name:
            vae, channels = build_vae(name)
            vae_name = name
            with torch.no_grad():  # the first call pays for one-time allocations
                vae.decode(torch.zeros(1, channels, 1, args.size // 8, args.size // 8))
        bar.set_postfix_str(f"{name} {frames} latent frames {mode}")
        z = torch.randn(1, channels, frames, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
        box: dict[str, Any] = {}

        def decode(vae: torch.nn.Module = vae, z: torch.Tensor = z, mode: str = mode, box: dict[str, Any] = box) -> None:
            switch = long_video_decoding(vae, tile_size=args.tile_size) if mode != "stock" else contextlib.nullcontext()
            with torch.no_grad(), switch:
                t0 = time.perf_counter()
                box["frames"] = vae.decode(z).sample.shape[2]
                box["seconds"] = time.perf_counter() - t0

        before = _rss_mb()
        peak = measure_peak(decode)
        row = {
            "vae": name, "latent_frames": frames, "frames": box["frames"], "mode": mode,
            "peak_mb_above_start": round(peak - before, 1), "seconds": round(box["seconds"], 2),
        }
        rows.append(row)
        tqdm.write(
            f"{name:14s} latent_frames={frames:3d} frames={box['frames']:4d} {mode:20s} "
            f"peak={row['peak_mb_above_start']:8.1f} MB  time={row['seconds']:7.2f} s"
        )

    out = Path(args.out)
    write_json(out.with_suffix(".json"), {
        "benchmark": "video VAE decode: stock vs long_video_decoding",
        "size_px": args.size, "tile_size_px": args.tile_size, "threads": args.threads,
        "environment": environment(), "rows": rows,
    })

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.vaes), figsize=(4.5 * len(args.vaes), 3.6), squeeze=False)
    for ax, name in zip(axes[0], args.vaes):
        for k, mode in enumerate(("stock", "long_video_decoding")):
            sel = [r for r in rows if r["vae"] == name and r["mode"] == mode]
            xs = [i + (k - 0.5) * 0.35 for i in range(len(sel))]
            ax.bar(xs, [r["peak_mb_above_start"] for r in sel], width=0.35, label=mode)
        ax.set_xticks(range(len(args.latent_frames)), [f"{f} latent\n({r['frames']} frames)" for f, r in zip(
            args.latent_frames, [r for r in rows if r["vae"] == name and r["mode"] == "stock"])])
        ax.set_title(f"{name}, {args.size} px")
        ax.set_ylabel("decode peak above start (MB)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
