"""LaMamba-Diff: parameters, GFLOPs and forward time vs token count (issue 10's targets).

(a) parameters and GFLOPs (multiply-adds) of every preset at 256 and 512 px (latent 32x32 and 64x64),
    against the paper's figures and against diffusers' ``DiTTransformer2DModel`` XL/2. Models are built
    on the meta device (no memory) and counted with ``torch.utils.flop_counter.FlopCounterMode``, which
    counts 2 FLOPs per multiply-add (halved here). The counter does not see the selective scan (its
    elementwise recurrence), so the scan's multiply-adds are added analytically (9 per
    (batch, channel, state, step) plus the skip, as mamba-ssm / VMamba count them) and reported apart.
(b) forward time vs token count (256 to 16k tokens: latents 16x16 .. 128x128) for a small LaMamba-Diff
    (``--width``, the reference's layout) and a DiT of equal width (``DiTTransformer2DModel``, patch 1,
    ``--dit-layers`` blocks, the same width as LaMamba's full-resolution stage, so both see the same
    tokens), with the growth exponent fitted on log-log from 1k to 16k tokens.
(c) the selective scan alone: sequential reference vs the chunked scan at 4k tokens (forward, and
    forward + backward) at 64 and 256 channels: the reference's cost per step is mostly per-call
    overhead, the chunked scan's grows with the channels, so the speedup falls with width. With
    ``--device cuda`` mamba-ssm's fused kernel is timed beside them when it imports (its absence is
    recorded in the JSON, not hidden).

``--device cuda`` runs (b) and (c) on the GPU (the models' scans then take mamba-ssm's kernel when it
imports: ``selective_scan``'s ``auto``); (a) counts on the meta device either way.

Writes ``OUT.json`` and ``OUT.png`` (default ``docs/bench_lamamba``). ``--quick`` runs (b) at 256 and
1024 tokens only, (c) at 1k tokens, and writes to ``outputs/bench_lamamba_quick`` unless ``--out``.

    python scripts/bench_lamamba.py                 # full run (minutes on CPU)
    python scripts/bench_lamamba.py --quick
    python scripts/bench_lamamba.py --skip-timing   # (a) only
    python scripts/bench_lamamba.py --device cuda --skip-counts --out outputs/bench_lamamba_gpu
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

from diffattn.benchmark import environment, save_figure, timeit, write_json
from diffattn.models.lamamba import PAPER_FIGURES, PRESETS, LaMambaDiffModel
from diffattn.ops.selective_scan import (
    resolve_scan_backend,
    selective_scan,
    selective_scan_chunked,
    selective_scan_ref,
)

DIT_XL2_PAPER = {"params_m": 675.0, "gflops_256": 118.6, "gflops_512": 524.6}


def _dit(
    sample_size: int,
    width: int = 1152,
    heads: int = 16,
    layers: int = 28,
    patch: int = 2,
    classes: int = 1000,
):
    from diffusers import DiTTransformer2DModel

    return DiTTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=width // heads,
        in_channels=4,
        out_channels=8,
        num_layers=layers,
        sample_size=sample_size,
        patch_size=patch,
        num_embeds_ada_norm=classes,
    )


def _count(model: torch.nn.Module, latent: int, lamamba: bool) -> dict[str, float]:
    x = torch.randn(1, 4, latent, latent, device="meta")
    t = torch.tensor([1], device="meta")
    y = torch.tensor([0], device="meta")
    with FlopCounterMode(display=False) as fc:
        model(x, t, class_labels=y)
    counted = fc.get_total_flops() / 2 / 1e9
    scan = model.scan_macs(1, latent, latent) / 1e9 if lamamba else 0.0
    return {"gmacs_counted": counted, "gmacs_scan": scan, "gflops": counted + scan}


def part_a() -> dict:
    rows = []
    for name in tqdm(list(PRESETS), desc="(a) presets"):
        with torch.device("meta"):
            model = LaMambaDiffModel.from_preset(name)
        row = {"model": f"LaMamba-Diff-{name}", "params_m": sum(p.numel() for p in model.parameters()) / 1e6}
        for px in (256, 512):
            c = _count(model, px // 8, True)
            row[f"gflops_{px}"] = c["gflops"]
            row[f"gflops_{px}_scan_part"] = c["gmacs_scan"]
        paper = PAPER_FIGURES.get(name)
        if paper:
            row["paper"] = paper
            row["params_rel_err"] = row["params_m"] / paper["params_m"] - 1
            row["gflops_256_rel_err"] = row["gflops_256"] / paper["gflops_256"] - 1
            row["gflops_512_rel_err"] = row["gflops_512"] / paper["gflops_512"] - 1
        rows.append(row)
    dit = {"model": "DiT-XL/2 (diffusers DiTTransformer2DModel)", "paper": DIT_XL2_PAPER}
    for px in (256, 512):
        with torch.device("meta"):
            m = _dit(px // 8)
        dit["params_m"] = sum(p.numel() for p in m.parameters()) / 1e6
        dit[f"gflops_{px}"] = _count(m, px // 8, False)["gflops"]
    rows.append(dit)
    xl = next(r for r in rows if r["model"] == "LaMamba-Diff-XL")
    summary = {
        f"xl_gflops_saving_vs_dit_{px}": 1 - xl[f"gflops_{px}"] / dit[f"gflops_{px}"] for px in (256, 512)
    }
    return {"models": rows, "summary": summary}


def _fit(tokens: list[int], times: list[float], lo: int = 1024, hi: int = 16384) -> float | None:
    pts = [(n, t) for n, t in zip(tokens, times) if lo <= n <= hi and t is not None]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


@torch.no_grad()
def part_b(
    sides: list[int], width: int, heads: int, dit_layers: int, repeats: int, device: str = "cpu"
) -> dict:
    torch.manual_seed(0)
    lam = (
        LaMambaDiffModel(
            sample_size=32,
            embed_dim=width,
            num_heads=heads,
            depths=(2, 2, 2, 2),
            bottleneck_depth=2,
            num_classes=10,
        )
        .eval()
        .to(device)
    )
    dit = _dit(32, width=width, heads=heads, layers=dit_layers, patch=1, classes=10).eval().to(device)
    rows = []
    for side in tqdm(sides, desc="(b) tokens"):
        x = torch.randn(1, 4, side, side, device=device)
        t, y = torch.tensor([500], device=device), torch.tensor([1], device=device)
        row = {"tokens": side * side, "side": side}
        row["lamamba_s"] = timeit(lambda x=x, t=t, y=y: lam(x, t, class_labels=y), device, repeats=repeats)
        try:
            row["dit_s"] = timeit(lambda x=x, t=t, y=y: dit(x, t, class_labels=y), device, repeats=repeats)
        except Exception as exc:  # noqa: BLE001 (report, keep timing the rest)
            row["dit_s"], row["dit_error"] = None, f"{type(exc).__name__}: {exc}"
        rows.append(row)
    tokens = [r["tokens"] for r in rows]
    return {
        "device": device,
        "width": width,
        "heads": heads,
        "dit_layers": dit_layers,
        "lamamba_params_m": sum(p.numel() for p in lam.parameters()) / 1e6,
        "dit_params_m": sum(p.numel() for p in dit.parameters()) / 1e6,
        "rows": rows,
        "exponent_lamamba_1k_16k": _fit(tokens, [r["lamamba_s"] for r in rows]),
        "exponent_dit_1k_16k": _fit(tokens, [r["dit_s"] for r in rows]),
    }


def part_c(length: int, dim: int, repeats: int, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(0)
    u, dt = torch.randn(1, dim, length, generator=g), torch.randn(1, dim, length, generator=g)
    A = -torch.rand(dim, 1, generator=g) - 0.1
    B, C = torch.randn(1, 1, length, generator=g), torch.randn(1, 1, length, generator=g)
    u, dt, A, B, C, D = (x.to(device) for x in (u, dt, A, B, C, torch.ones(dim)))
    out = {"length": length, "dim": dim, "d_state": 1, "device": device}
    backends = {"reference": selective_scan_ref, "chunked": selective_scan_chunked}
    if torch.device(device).type == "cuda":
        if resolve_scan_backend(u) == "mamba_ssm":  # auto picks the kernel on CUDA when it imports
            backends["mamba_ssm"] = functools.partial(selective_scan, backend="mamba_ssm")
        else:
            out["mamba_ssm"] = "not available (mamba_ssm does not import)"
    for name, fn in backends.items():
        with torch.no_grad():
            out[f"{name}_fwd_s"] = timeit(
                lambda fn=fn: fn(u, dt, A, B, C, D, delta_softplus=True), device, repeats=repeats
            )
        leaf = u.clone().requires_grad_(True)

        def fwd_bwd(fn=fn, leaf=leaf):
            fn(leaf, dt, A, B, C, D, delta_softplus=True).sum().backward()

        # the reference's backward is slow: one call (after a warm-up only where it is cheap)
        warm = 0 if name == "reference" else 1
        out[f"{name}_fwd_bwd_s"] = timeit(
            fwd_bwd, device, repeats=1 if name == "reference" else repeats, warmup=warm
        )
    for name in backends:
        if name != "reference":
            prefix = "" if name == "chunked" else f"{name}_"
            out[f"{prefix}speedup_fwd"] = out["reference_fwd_s"] / out[f"{name}_fwd_s"]
            out[f"{prefix}speedup_fwd_bwd"] = out["reference_fwd_bwd_s"] / out[f"{name}_fwd_bwd_s"]
    return out


def _k(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    a = result.get("a")
    if a:
        ms = a["models"]
        names = [m["model"].replace("LaMamba-Diff-", "LaMamba-").split(" (")[0] for m in ms]
        xs = np.arange(len(ms))
        axes[0].bar(xs - 0.2, [m["gflops_256"] for m in ms], 0.4, label="256 px")
        axes[0].bar(xs + 0.2, [m["gflops_512"] for m in ms], 0.4, label="512 px")
        axes[0].set_xticks(xs, names, rotation=20)
        axes[0].set_ylabel("GFLOPs (multiply-adds)")
        axes[0].set_yscale("log")
        axes[0].legend()
        axes[0].set_title("compute per forward")
    b = result.get("b")
    if b:
        rows = b["rows"]
        tok = [r["tokens"] for r in rows]
        axes[1].loglog(
            tok,
            [r["lamamba_s"] for r in rows],
            "o-",
            label=f"LaMamba-Diff (k={_k(b['exponent_lamamba_1k_16k'])})",
        )
        if any(r["dit_s"] for r in rows):
            axes[1].loglog(
                [r["tokens"] for r in rows if r["dit_s"]],
                [r["dit_s"] for r in rows if r["dit_s"]],
                "s-",
                label=f"DiT, same width (k={_k(b['exponent_dit_1k_16k'])})",
            )
        axes[1].set_xlabel("tokens")
        axes[1].set_ylabel("forward time (s)")
        axes[1].legend()
        axes[1].set_title(f"{b.get('device', 'cpu').upper()} forward time, width {b['width']}")
    save_figure(fig, path)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output path without extension (default docs/bench_lamamba)")
    p.add_argument("--quick", action="store_true", help="256 and 1024 tokens only; scan at 1k tokens")
    p.add_argument("--skip-timing", action="store_true", help="only (a): parameters and GFLOPs")
    p.add_argument("--skip-counts", action="store_true", help="only (b) and (c): the timings")
    p.add_argument("--device", default="cpu", help="where (b) and (c) run: cpu (default) or cuda")
    p.add_argument(
        "--sides", type=int, nargs="+", default=[16, 32, 48, 64, 96, 128], help="latent sides for (b)"
    )
    p.add_argument("--width", type=int, default=64, help="LaMamba embed_dim and DiT width for (b)")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dit-layers", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--scan-length", type=int, default=4096)
    p.add_argument("--scan-dims", type=int, nargs="+", default=[64, 256], help="channels (b=1, d_state=1)")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch sees no CUDA device here")
    if args.skip_timing and args.skip_counts:
        p.error("--skip-timing and --skip-counts together leave nothing to run")
    out = Path(args.out or ("outputs/bench_lamamba_quick" if args.quick else "docs/bench_lamamba"))
    if args.quick:
        args.sides, args.repeats, args.scan_length = [16, 32], 1, 1024
    result: dict = {"environment": environment(), "args": vars(args)}
    if not args.skip_counts:
        result["a"] = part_a()
    if not args.skip_timing:
        result["c"] = [part_c(args.scan_length, d, args.repeats, args.device) for d in args.scan_dims]
        result["b"] = part_b(args.sides, args.width, args.heads, args.dit_layers, args.repeats, args.device)
    write_json(out.with_suffix(".json"), result)
    plot(result, out.with_suffix(".png"))
    for m in result.get("a", {}).get("models", []):
        print(
            f"{m['model']:45s} params {m['params_m']:8.1f}M  GFLOPs 256px {m['gflops_256']:7.1f}  512px {m['gflops_512']:7.1f}"
        )
    if "a" in result:
        print("XL saving vs DiT-XL/2:", {k: f"{v:.1%}" for k, v in result["a"]["summary"].items()})
    for c in result.get("c", []):
        line = f"scan L={c['length']} d={c['dim']} on {c['device']}: chunked fwd {c['speedup_fwd']:.1f}x, fwd+bwd {c['speedup_fwd_bwd']:.1f}x"
        if "mamba_ssm_speedup_fwd" in c:
            line += f"; mamba_ssm fwd {c['mamba_ssm_speedup_fwd']:.1f}x, fwd+bwd {c['mamba_ssm_speedup_fwd_bwd']:.1f}x"
        elif "mamba_ssm" in c:
            line += f"; mamba_ssm {c['mamba_ssm']}"
        print(line + " (vs the sequential reference)")
    if "b" in result:
        b = result["b"]
        for r in b["rows"]:
            print(f"tokens {r['tokens']:6d}: LaMamba {r['lamamba_s']:.3f}s  DiT {r['dit_s']}")
        print(f"exponent 1k-16k: LaMamba {b['exponent_lamamba_1k_16k']}, DiT {b['exponent_dit_1k_16k']}")
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
