"""ROICtrl vs the mask-based regional baseline: UNet step time by instance count and box area.

The SD 1.5 UNet architecture with random weights (speed does not depend on them), batch 2 (classifier-free
guidance), fp32, no grad. Side by side in one process, interleaved (one call of each variant per round,
median over rounds) so that load on a shared machine hits them alike:

* ``base``: the UNet without regional control (0 instances: both methods run exactly this);
* ``roi``: ROICtrl (``diffattn.apply(unet, "roi", adapter=...)``, GLIGEN branch included);
* ``roi_nogligen``: ROICtrl without the gated self-attention / feed-forward branch;
* ``regional_mask``: per-instance full-map cross-attention kept inside the box (queries computed once);
* ``regional_mask_naive``: the same with the whole stock cross-attention run once per instance.

Besides the timings the JSON holds an analytic count of the multiply-adds one more instance adds
(``analytic_macs_per_instance``: projections and attention products of every cross-attention layer, box
area 1/16), which does not depend on the machine.

Sweeps: instance count ``N`` in 0, 1, 4, 8, 16, 30 with boxes of side 1/4 (1/16 of the image each, placed
at seeded random positions); then box area at ``N = 8`` (side 1/8, 1/4, 1/2). Each variant is fitted on
the time it adds to the base timed in the same interleaved rounds, so drift of the machine between points
cancels. The marginal cost per instance is what one more instance adds: the slope of
``fixed + N * per_instance`` fitted over ``N >= 1`` (``per_instance_seconds_from_one``). ``roi /
regional_mask`` of those slopes at the largest size (``roi_over_mask_from_one``) is the figure the issue
targets (<= 0.25 for boxes of <= 1/16 of the image at 1024 px). Reported beside it: the fixed part
(``fixed_seconds``: what the first instance brings, whatever N — the windows' setup, host copies and the
GLIGEN branch's full-map self-attention), and the slope over all ``N`` including 0
(``marginal_seconds_per_instance``, ``*_marginal`` ratios), which spreads that fixed part over the instances.
Writes ``OUT.json`` and ``OUT.png``.

    python scripts/bench_roictrl.py                   # 512 and 1024 px: hours on a CPU, minutes on a GPU
    python scripts/bench_roictrl.py --quick           # a tiny UNet at 64 / 128 px: a smoke run
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel

import diffattn
from diffattn.benchmark import DTYPES, environment, interleaved, save_figure, write_json
from diffattn.models import ROICtrlAdapter
from diffattn.processors.roi import RegionInstances

VARIANTS = ("roi", "roi_nogligen", "regional_mask", "regional_mask_naive")


def sd15_unet(tiny: bool = False) -> UNet2DConditionModel:
    """The SD 1.5 UNet architecture (runwayml/stable-diffusion-v1-5 unet/config.json); ``tiny``: same
    layout (4 levels, 2 layers each, attention at levels 0-2 + mid) with narrow channels."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64, 64, 64) if tiny else (320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=32 if tiny else 768,
        attention_head_dim=8,
        norm_num_groups=8 if tiny else 32,
    ).eval()


def random_boxes(n: int, side: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * (1.0 - side)
    return torch.cat([xy, xy + side], -1)


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def _ms(times: dict[str, float]) -> str:
    return ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in times.items())


def summarize_counts(rows: list[dict[str, Any]], variants: list[str]) -> dict[str, Any]:
    """Per-instance cost of each variant from one size's count sweep.

    Each point's ``base`` is timed in the same interleaved rounds as its variants, so every slope is taken
    over the time a variant adds to that base. Slow drift of the machine between points then cancels. Two
    fits: over every ``N`` (``marginal_seconds_per_instance``), and ``fixed + N * per_instance`` over
    ``N >= 1`` (``per_instance_seconds_from_one``, ``fixed_seconds``).
    """
    def added(r: dict[str, Any], v: str) -> float:
        return r["seconds"][v] - r["seconds"]["base"]

    ns = [r["instances"] for r in rows]
    per = {v: slope(ns, [added(r, v) for r in rows]) for v in variants}
    entry: dict[str, Any] = {"base_seconds": statistics.fmean(r["seconds"]["base"] for r in rows),
                             "marginal_seconds_per_instance": per}
    some = [r for r in rows if r["instances"] >= 1]
    if len(some) >= 2:
        after = {v: slope([r["instances"] for r in some], [added(r, v) for r in some]) for v in variants}
        entry["per_instance_seconds_from_one"] = after
        entry["fixed_seconds"] = {v: statistics.fmean(added(r, v) - after[v] * r["instances"] for r in some)
                                  for v in variants}
    for v in ("roi", "roi_nogligen"):
        for m in ("regional_mask", "regional_mask_naive"):
            short = m.replace("regional_", "")
            if v in per and per.get(m):
                entry[f"{v}_over_{short}_marginal"] = per[v] / per[m]
            after = entry.get("per_instance_seconds_from_one", {})
            if v in after and after.get(m):
                entry[f"{v}_over_{short}_from_one"] = after[v] / after[m]
    return entry


def bench_point(unet: UNet2DConditionModel, adapters: dict[str, ROICtrlAdapter], variants: list[str], latent: int,
                n: int, side: float, rounds: int, text_len: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    dim = unet.config.cross_attention_dim
    dev, dt = unet.device, unet.dtype
    x = torch.randn(2, 4, latent, latent, generator=g).to(dev, dt)
    enc = torch.randn(2, text_len, dim, generator=g).to(dev, dt)
    t = torch.tensor([500.0, 500.0], device=dev)
    boxes = random_boxes(n, side, seed=n)[None].expand(2, -1, -1).contiguous().to(dev)
    inst = RegionInstances(boxes, torch.randn(2, n, text_len, dim, generator=g).to(dev, dt))

    def call_with(method: str, **options: Any) -> Callable[[], None]:
        def fn() -> None:
            with torch.no_grad(), diffattn.apply(unet, method, instances=inst, **options):
                unet(x, t, enc)
        return fn

    def base() -> None:
        with torch.no_grad():
            unet(x, t, enc)

    fns: dict[str, Callable[[], None]] = {"base": base}
    if "roi" in variants:
        fns["roi"] = call_with("roi", adapter=adapters["roi"])
    if "roi_nogligen" in variants:
        fns["roi_nogligen"] = call_with("roi", adapter=adapters["roi_nogligen"])
    if "regional_mask" in variants:
        fns["regional_mask"] = call_with("regional_mask")
    if "regional_mask_naive" in variants:
        fns["regional_mask_naive"] = call_with("regional_mask", share_queries=False)
    return interleaved(fns, rounds, str(dev), desc=f"{latent * 8}px N={n} side={side}")


def analytic_macs(unet: UNet2DConditionModel, adapter: ROICtrlAdapter, latent: int, box_area: float,
                  text_len: int, gligen: bool) -> dict[str, float]:
    """Multiply-adds one more instance adds per image (batch 1), summed over the cross-attention layers.

    regional_mask: the instance's keys / values (``2 L Dc D``) and its attention product over the whole map
    (``2 HW L D``); naive adds the map's ``to_q`` and ``to_out`` (``2 HW D^2``). roi: keys / values,
    ``to_q`` and ``to_out`` on the ROI (``2 P^2 D^2``), the ROI attention product (``2 P^2 L D``), the
    learned ROI self-attention (``4 P^2 D^2 + 2 P^4 D``) and unpool + fusion over the box (``~8 A HW D``);
    the GLIGEN branch adds one grounding token to a full-map self-attention (``~4 HW D``, negligible).
    """
    out = {"regional_mask": 0.0, "regional_mask_naive": 0.0, "roi": 0.0}
    for name, module in unet.named_modules():
        if not (name.endswith("attn2") and getattr(module, "is_cross_attention", False)):
            continue
        d, dc = module.to_q.in_features, module.to_k.in_features
        parts = name.split(".")
        if parts[0] == "mid_block":
            lv = len(unet.config.block_out_channels) - 1
        elif parts[0] == "down_blocks":
            lv = int(parts[1])
        else:
            lv = len(unet.config.block_out_channels) - 1 - int(parts[1])
        hw = (latent >> lv) ** 2
        p = adapter.roi_size(lv)
        kv = 2 * text_len * dc * d
        mask = kv + 2 * hw * text_len * d
        out["regional_mask"] += mask
        out["regional_mask_naive"] += mask + 2 * hw * d * d
        roi = kv + 2 * p * p * d * d + 2 * p * p * text_len * d + 4 * p * p * d * d + 2 * p**4 * d
        roi += 8 * box_area * hw * d + (4 * hw * d if gligen else 0)
        out["roi"] += roi
    return out


def plot(result: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["sizes"]
    colors = {k: f"C{i}" for i, k in enumerate(["base", *VARIANTS])}
    fig, axes = plt.subplots(1, len(sizes) + 1, figsize=(5 * (len(sizes) + 1), 4))
    for ax, size in zip(axes, sizes):
        rows = [r for r in result["count_sweep"] if r["size"] == size]
        ns = [r["instances"] for r in rows]
        for k in ["base", *result["variants"]]:
            ax.plot(ns, [r["seconds"][k] * 1000 for r in rows], marker="o", label=k, color=colors[k])
        ax.set_title(f"{size}px, boxes 1/16 of the image")
        ax.set_xlabel("instances")
        ax.set_ylabel("UNet step (ms, batch 2)")
        ax.legend()
    ax = axes[-1]
    big = sizes[-1]
    rows = [r for r in result["area_sweep"] if r["size"] == big]
    areas = [r["box_area"] for r in rows]
    for k in result["variants"]:
        ax.plot(areas, [(r["seconds"][k] - r["seconds"]["base"]) * 1000 for r in rows], marker="o", label=k,
                color=colors[k])
    ax.set_xscale("log")
    ax.set_xticks(areas, [f"{a:.3g}" for a in areas])
    ax.minorticks_off()
    ax.set_title(f"{big}px, {result['area_instances']} instances: added time vs box area")
    ax.set_xlabel("box area (fraction of the image)")
    ax.set_ylabel("added ms over base")
    ax.legend()
    save_figure(fig, out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny UNet, 64/128 px, N in 0,1,4,8, one round")
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="pixel sizes (default 512 1024)")
    ap.add_argument("--counts", type=int, nargs="*", default=None, help="default 0 1 4 8 16 30")
    ap.add_argument("--sides", type=float, nargs="*", default=None, help="box sides for the area sweep (none given: skip it)")
    ap.add_argument("--area-instances", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=None, help="default 3 (1 with --quick)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    ap.add_argument("--out", default=None, help="path stem (default docs/bench_roictrl, or outputs/... with --quick)")
    ap.add_argument("--analytic-only", action="store_true",
                    help="no timing: the multiply-add counts for the SD 1.5 architecture at 512 / 1024 px (meta device)")
    args = ap.parse_args(argv)
    quick = args.quick
    if args.analytic_only:
        with torch.device("meta"):
            unet = sd15_unet()
            adapter = ROICtrlAdapter.from_unet(unet)
        res = {}
        for size in (512, 1024):
            macs = analytic_macs(unet, adapter, size // 8, 1 / 16, 77, gligen=True)
            res[str(size)] = {"macs_per_instance": macs, "roi_over_mask": macs["roi"] / macs["regional_mask"],
                              "roi_over_mask_naive": macs["roi"] / macs["regional_mask_naive"]}
            print(f"{size}px per instance: " + ", ".join(f"{k} {v / 1e9:.2f} GMAC" for k, v in macs.items())
                  + f"; roi / mask {res[str(size)]['roi_over_mask']:.2f}, roi / naive mask "
                  f"{res[str(size)]['roi_over_mask_naive']:.2f}")
        return res
    sizes = args.sizes or ([64, 128] if quick else [512, 1024])
    counts = args.counts or ([0, 1, 4, 8] if quick else [0, 1, 4, 8, 16, 30])
    sides = [0.125, 0.25, 0.5] if args.sides is None else args.sides  # `--sides` alone: no area sweep
    rounds = args.rounds or (1 if quick else 3)
    out = args.out or ("outputs/bench_roictrl_quick" if quick else "docs/bench_roictrl")
    text_len = 77

    dtype = DTYPES[args.dtype]
    unet = torch.nn.Module.to(sd15_unet(tiny=quick), args.device, dtype)  # (ModelMixin.to warns needlessly)
    adapters = {}
    for name, gligen in (("roi", True), ("roi_nogligen", False)):
        if name in args.variants:
            adapter = ROICtrlAdapter.from_unet(unet, gligen=gligen).eval()
            adapters[name] = torch.nn.Module.to(adapter, args.device, dtype)
    variants = [v for v in VARIANTS if v in args.variants]
    result: dict[str, Any] = {
        "what": f"UNet forward, batch 2, {args.dtype}, no grad, SD 1.5 architecture" + (" (tiny widths)" if quick else ""),
        "environment": environment(),
        "sizes": sizes,
        "variants": variants,
        "rounds": rounds,
        "text_tokens": text_len,
        "roi_sizes": list(ROICtrlAdapter.from_unet(unet).config.roi_sizes),
        "area_instances": args.area_instances,
        "count_sweep": [],
        "area_sweep": [],
    }
    for size in sizes:
        latent = size // 8
        for n in counts:
            sec = bench_point(unet, adapters, variants, latent, n, 0.25, rounds, text_len)
            result["count_sweep"].append({"size": size, "instances": n, "box_area": 0.0625, "seconds": sec})
        for side in sides:
            sec = bench_point(unet, adapters, variants, latent, args.area_instances, side, rounds, text_len)
            result["area_sweep"].append({"size": size, "instances": args.area_instances, "box_area": side * side,
                                         "seconds": sec})
    summary = {str(size): summarize_counts([r for r in result["count_sweep"] if r["size"] == size], variants)
               for size in sizes}
    result["summary"] = summary
    for size in ([512, 1024] if not quick else sizes):
        macs = analytic_macs(unet, adapters.get("roi") or ROICtrlAdapter.from_unet(unet), size // 8, 1 / 16,
                             text_len, gligen=True)
        summary.setdefault(str(size), {})["analytic_macs_per_instance"] = macs
        summary[str(size)]["analytic_roi_over_mask"] = macs["roi"] / macs["regional_mask"]
        summary[str(size)]["analytic_roi_over_mask_naive"] = macs["roi"] / macs["regional_mask_naive"]
    write_json(f"{out}.json", result)
    plot(result, f"{out}.png")
    for size, e in summary.items():
        if "marginal_seconds_per_instance" not in e:
            macs = ", ".join(f"{k} {v / 1e9:.2f} GMAC" for k, v in e["analytic_macs_per_instance"].items())
            print(f"{size}px (analytic, per instance): {macs}")
            continue
        ratio = ", ".join(f"{k} {v:.2f}" for k, v in e.items() if "_over_mask" in k)
        print(f"{size}px: base {e['base_seconds'] * 1000:.0f} ms")
        if "fixed_seconds" in e:
            print(f"  per instance (N >= 1): {_ms(e['per_instance_seconds_from_one'])}; fixed: {_ms(e['fixed_seconds'])}")
        print(f"  slope over all N: {_ms(e['marginal_seconds_per_instance'])}")
        print(f"  ratios: {ratio}")
    print(f"wrote {out}.json and {out}.png")
    return result


if __name__ == "__main__":
    main()
