"""Hierarchical local attention in Hilbert order (issue 8): block structure, layer speed, projected end-to-end.

(a) Block fill and density of raster vs window-first vs Hilbert order at 1K/2K/4K FLUX token grids (64x64,
    128x128, 256x256 tokens; radius 8, 128-token blocks), HR tokens alone and with Scale-DiT's 512 text
    tokens and a 4x smaller LR grid. Block-level only, cheap at every size.
(b) One attention layer, 2 heads x 128, over 512 text + HR + LR (side / 4) tokens at 2K (128x128 HR) and
    4K (256x256): dense SDPA vs the engine on the Hilbert mask (token- and block-granularity), timed in
    turn round after round, with speedup, ideal 1/density and efficiency = speedup x density from each
    side's best round (medians beside them in the JSON).
(c) The attention share of a FLUX-width double-stream block (3072 = 24 heads x 128, FFN 12288), measured
    at ``--block-tokens``; with it and (b) the block time is projected at each size of (b): linear layers
    per token as measured, attention as measured in (b) scaled from 2 to 24 heads. Beside it, the bound
    1 / (1 - attention share): the block's speedup if attention cost nothing, which no attention method
    can beat.

Writes ``OUT.json``, ``OUT.png`` (speed) and ``OUT_orders.png`` (the curves and the masks). The defaults
are the issue's shapes; dense attention over 70k tokens takes minutes on CPU. ``--quick`` shrinks (b) and
(c) to a smoke run ((a) always runs in full: it is cheap).

    python scripts/bench_hilbert_local.py --out docs/bench_hilbert_local
    python scripts/bench_hilbert_local.py --quick --out docs/bench_hilbert_local
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from diffattn.benchmark import (
    DTYPES,
    ENGINE_BACKENDS,
    engine_call,
    environment,
    interleaved_samples,
    measure_peak,
    rounds_figures,
    save_figure,
    timeit,
    write_json,
)
from diffattn.masks import block_fill, local_block_mask, local_density, token_order
from diffattn.ops import flex_backend

ORDERS = ("raster", "window", "hilbert")


def bench_orders(args) -> list[dict]:
    """(a): density and block fill per order and grid, HR only and with text + LR."""
    rows = []
    for side in tqdm(args.grids + args.extra_grids, desc="(a) orders"):
        for guided in (False, True):
            opts = dict(text_len=args.text, lr_height=side // args.ratio, lr_width=side // args.ratio) if guided else {}
            for order in ORDERS:
                row = {
                    "grid": side,
                    "tokens": side * side + (args.text + (side // args.ratio) ** 2 if guided else 0),
                    "with_text_lr": guided,
                    "order": order,
                    "block_density": local_density(side, side, args.radius, order, args.block_size, granularity="block",
                                                   **opts),
                    "token_density": local_density(side, side, args.radius, order, args.block_size, **opts),
                    "block_fill": block_fill(side, side, args.radius, order, args.block_size, **opts),
                }
                rows.append(row)
            best = max((r for r in rows[-3:]), key=lambda r: r["block_fill"])
            tqdm.write(
                f"(a) {side}x{side} {'text+HR+LR' if guided else 'HR only   '} "
                + "  ".join(f"{r['order']}: density={r['block_density']:.4f} fill={r['block_fill']:.3f}" for r in rows[-3:])
                + f"  best fill: {best['order']}"
            )
    return rows


def _qkv(n: int, heads: int, dim: int, dtype: torch.dtype, device: str):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, n, dim, generator=g).to(device, dtype) for _ in range(3)]


def bench_layer(args, device: str, dtype: torch.dtype) -> list[dict]:
    """(b): one layer at each HR side, dense SDPA vs the local mask (each granularity and backend)."""
    rows = []
    sides = args.layer_grids
    bar = tqdm(total=len(sides) * (1 + 2 * len(args.backends)), desc="(b) attention layer")
    for side in sides:
        lr = side // args.ratio
        n = args.text + side * side + lr * lr
        q, k, v = _qkv(n, args.heads, args.head_dim, dtype, device)
        with torch.no_grad():
            dense = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            mem_dense = measure_peak(dense, device)
            bar.update(1)
            cases, fns = [], {"dense": dense}
            for granularity in ("token", "block"):
                bm = local_block_mask(side, side, args.radius, "hilbert", args.block_size, text_len=args.text,
                                      lr_height=lr, lr_width=lr, granularity=granularity, device=device)
                for requested in args.backends:
                    backend, fn, kernel = engine_call(q, k, v, bm, requested)
                    t_first = timeit(fn, device, repeats=1, warmup=0)  # includes compiling, if any
                    fns[f"{granularity}/{requested}"] = fn
                    cases.append((granularity, requested, bm, backend, kernel, fn, t_first))
            # dense and every engine case timed in turn, round after round (see interleaved_samples)
            times = interleaved_samples(fns, args.repeats, device, warmup=0)
            # the token rule's density: the same for every case of this side
            token_density = local_density(side, side, args.radius, "hilbert", args.block_size,
                                          text_len=args.text, lr_height=lr, lr_width=lr)
            for granularity, requested, bm, backend, kernel, fn, t_first in cases:
                density = bm.density()
                figures = rounds_figures(times["dense"], times[f"{granularity}/{requested}"], density)
                row = {
                    "grid": side,
                    "lr_grid": lr,
                    "tokens": n,
                    "granularity": granularity,
                    "requested": requested,
                    "backend": backend,
                    "cpu_kernel": kernel,
                    "block_density": density,
                    "token_density": token_density,
                    **figures,
                    "local_s": figures["sparse_s"],
                    "first_call_s": t_first,
                    "peak_mb_dense": mem_dense,
                    "peak_mb_local": measure_peak(fn, device),
                }
                rows.append(row)
                bar.update(1)
                tqdm.write(
                    f"(b) {side}x{side} (+{args.text} text, {lr}x{lr} LR) tokens={n} {granularity:5s} "
                    f"{requested:11s} {row['backend']:6s} kernel={kernel} density={density:.4f} dense={row['dense_s']:.3f}s "
                    f"local={row['local_s']:.3f}s speedup={row['speedup']:.1f}x ideal={row['ideal']:.1f}x "
                    f"efficiency={row['efficiency']:.2f} (median {row['efficiency_median']:.2f})"
                )
    bar.close()
    return rows


def bench_block(args, device: str, dtype: torch.dtype, layer_rows: list[dict]) -> dict:
    """(c): attention share of a FLUX-width double-stream block; projected block speedup per size of (b)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    torch.manual_seed(0)
    block = FluxTransformerBlock(dim=3072, num_attention_heads=24, attention_head_dim=128).to(device, dtype).eval()
    n_img, n_txt = args.block_tokens, args.text
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n_img, 3072, generator=g).to(device, dtype)
    enc = torch.randn(1, n_txt, 3072, generator=g).to(device, dtype)
    temb = torch.randn(1, 3072, generator=g).to(device, dtype)
    n = n_img + n_txt
    with torch.no_grad():
        t_block = timeit(lambda: block(x, enc, temb), device, args.repeats)
        qkv = _qkv(n, 24, 128, dtype, device)
        t_attn = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(*qkv), device, args.repeats)
    share = min(t_attn / t_block, 1.0)
    other_per_token = (t_block - min(t_attn, t_block)) / n
    heads_scale = 24 / args.heads
    projections = []
    for side in sorted({r["grid"] for r in layer_rows}):
        rows = [r for r in layer_rows if r["grid"] == side]
        tokens = rows[0]["tokens"]
        dense_block = other_per_token * tokens + heads_scale * rows[0]["dense_s"]
        # the block with attention for free: no attention method can beat 1 / (1 - attention share)
        entry = {"grid": side, "tokens": tokens, "dense_block_s": dense_block,
                 "attention_share_dense": heads_scale * rows[0]["dense_s"] / dense_block,
                 "bound_speedup": dense_block / (other_per_token * tokens)}
        for granularity in ("token", "block"):
            best = min((r["local_s"] for r in rows if r["granularity"] == granularity), default=None)
            if best is not None:
                local_block = other_per_token * tokens + heads_scale * best
                entry[f"local_block_s_{granularity}"] = local_block
                entry[f"projected_speedup_{granularity}"] = dense_block / local_block
        projections.append(entry)
        tqdm.write(
            f"(c) {side}x{side} ({tokens} tokens): dense attention share {entry['attention_share_dense']:.2f} "
            f"(free attention would give {entry['bound_speedup']:.2f}x), "
            f"projected block speedup token={entry.get('projected_speedup_token', float('nan')):.2f}x "
            f"block={entry.get('projected_speedup_block', float('nan')):.2f}x"
        )
    result = {"tokens": n, "block_s": t_block, "attention_s": t_attn, "attention_share": share,
              "other_s_per_token": other_per_token, "projections": projections}
    print(f"(c) FLUX-width double block at {n} tokens: block={t_block:.3f}s attention={t_attn:.3f}s share={share:.2f}")
    return result


def plot_orders(out: Path, order_rows: list[dict], args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    h, w = 24, 40  # a non-power-of-two grid
    for ax, order in zip(axes[0], ORDERS, strict=True):
        perm = token_order(h, w, order, 8)
        ys, xs = (perm // w).numpy(), (perm % w).numpy()
        ax.plot(xs, ys, lw=0.8, color="0.3")
        blocks = torch.arange(h * w) // 32
        ax.scatter(xs, ys, c=blocks.numpy(), cmap="tab20", s=9, zorder=3)
        ax.set_title(f"{order}, {h}x{w}\n(colour: 32-token blocks)")
        ax.invert_yaxis()
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    side = 64
    for ax, order in zip(axes[1], ORDERS, strict=True):
        bm = local_block_mask(side, side, args.radius, order, args.block_size, text_len=args.text,
                              lr_height=side // args.ratio, lr_width=side // args.ratio)
        ax.imshow(bm.effective_bitmap()[0, 0].numpy(), cmap="Greys", interpolation="nearest")
        fill = next(r["block_fill"] for r in order_rows
                    if r["grid"] == side and r["order"] == order and r["with_text_lr"])
        ax.set_title(f"{order}: blocks at {side}x{side} + text + LR\ndensity {bm.density():.3f}, fill {fill:.3f}")
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(f"token orders and local masks (radius {args.radius}, {args.block_size}-token blocks)")
    save_figure(fig, out.with_name(out.name + "_orders.png"))
    plt.close(fig)


def plot_speed(out: Path, order_rows: list[dict], layer_rows: list[dict], block: dict | None, env: dict, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    grids = sorted({r["grid"] for r in order_rows})
    for order in ORDERS:
        vals = [next(r["block_fill"] for r in order_rows if r["grid"] == g and r["order"] == order
                     and not r["with_text_lr"]) for g in grids]
        axes[0].plot(range(len(grids)), vals, marker="o", label=order)
    axes[0].set_xticks(range(len(grids)), [f"{g}x{g}" for g in grids], rotation=30)
    axes[0].set_ylabel("block fill (HR only)")
    axes[0].set_title("(a) fraction of computed pairs the rule keeps")
    axes[0].legend()
    labels = [f"{r['grid']}\n{r['granularity']}\n{r['requested']}" for r in layer_rows]
    xs = range(len(labels))
    axes[1].bar(xs, [r["speedup"] for r in layer_rows], label="measured")
    axes[1].scatter(xs, [r["ideal"] for r in layer_rows], color="k", marker="_", s=300, label="ideal 1/density")
    axes[1].set_xticks(list(xs), labels, fontsize=7)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("layer speedup vs dense SDPA")
    axes[1].set_title("(b) one layer, 2 heads x 128, text + HR + LR")
    axes[1].legend(fontsize=8)
    if block is not None:
        proj = block["projections"]
        names = [f"{p['grid']}x{p['grid']}" for p in proj]
        for i, gran in enumerate(("token", "block")):
            axes[2].bar([j + 0.4 * i for j in range(len(proj))], [p.get(f"projected_speedup_{gran}", 0) for p in proj],
                        width=0.4, label=gran)
        axes[2].set_xticks([j + 0.2 for j in range(len(proj))], names)
        axes[2].axhline(1.0, color="k", lw=0.8)
        axes[2].set_ylabel("projected FLUX block speedup")
        axes[2].set_title(f"(c) attention share measured at {block['tokens']} tokens")
        axes[2].legend(fontsize=8)
    fig.suptitle(f"hierarchical local attention on {env['device']}, {dtype}, {env['threads']} threads")
    save_figure(fig, out.with_suffix(".png"))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grids", type=int, nargs="+", default=[64, 128, 256], help="HR token sides for (a)")
    p.add_argument("--extra-grids", type=int, nargs="*", default=[48, 96, 192], help="non-power-of-two sides for (a)")
    p.add_argument("--layer-grids", type=int, nargs="+", default=[128, 256], help="HR token sides for (b)")
    p.add_argument("--block-tokens", type=int, default=4096, help="image tokens of the (c) block")
    p.add_argument("--radius", type=int, default=8)
    p.add_argument("--ratio", type=int, default=4, help="HR/LR ratio (4K from 1K)")
    p.add_argument("--text", type=int, default=512)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument(
        "--backends", nargs="+", default=["auto"], choices=ENGINE_BACKENDS,
        help="'gather-sdpa': gather with the native CPU kernel turned off",
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--skip-layer", action="store_true", help="skip (b) and (c)")
    p.add_argument("--quick", action="store_true", help="small (b) and (c): a smoke run")
    p.add_argument("--out", default="outputs/bench_hilbert_local")
    args = p.parse_args()
    if args.quick:
        args.layer_grids, args.block_tokens, args.repeats = [32, 64], 256, 3

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    env = environment()
    print(f"device={env['device']} torch={env['torch']} threads={env['threads']}")
    order_rows = bench_orders(args)
    layer_rows = [] if args.skip_layer else bench_layer(args, device, dtype)
    block = None if args.skip_layer else bench_block(args, device, dtype, layer_rows)
    out = Path(args.out)
    write_json(
        out.with_suffix(".json"),
        {"environment": env, "args": vars(args), "orders": order_rows, "layer": layer_rows, "block": block,
         "flex": flex_backend.STATS.as_dict()},
    )
    plot_orders(out, order_rows, args)
    plot_speed(out, order_rows, layer_rows, block, env, args.dtype)
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.png')} and {out.name}_orders.png")


if __name__ == "__main__":
    main()
