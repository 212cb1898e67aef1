"""Dense SDPA vs the block-sparse engine, side by side in one run.

For each sequence length and block density it prints the speedup over dense SDPA, the ideal
speedup 1/density and the efficiency speedup x density (density of the block mask: blocks are what
the engine pays for), then times forward + backward at one length (the LoRA training path). Compile
time, cache hits and peak memory are reported separately. Writes ``OUT.json`` and ``OUT.png``.

    python scripts/bench_engine.py                      # 4k-32k tokens, 4 heads x 64, fp32
    python scripts/bench_engine.py --lengths 16384 --densities 0.07 0.15 0.3 0.45
    python scripts/bench_engine.py --lengths 4096 --densities 1.0 --backward-length 0 --kernel-table

Dense and every engine case are timed in turn, round after round
(``diffattn.benchmark.interleaved_samples``), so drift in the machine's speed lands on all of them
alike. Speedup and efficiency compare each side's best round (interference only adds time); the
medians are in the JSON and printed beside them. ``--kernel-table`` adds the fused SDPA
kernel's cost per score at the query/key lengths of sparse calls, relative to one dense call.
"""

from __future__ import annotations

import argparse
import math
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
from diffattn.ops import BlockMask, block_sparse_attention, flex_backend, resolve_backend
from diffattn.ops.gather_attention import cpu_kernel


def pattern_bitmap(n_blocks: int, density: float, pattern: str, seed: int = 0) -> torch.Tensor:
    """A bitmap with about ``density`` of its blocks kept.

    ``band``: a diagonal band (local attention, the shape radial / Hilbert-local masks mostly have);
    ``random``: independent blocks plus the diagonal.
    """
    if density >= 1.0:  # the full mask: what each backend's kernel costs against dense SDPA itself
        return torch.ones(n_blocks, n_blocks, dtype=torch.bool)
    if pattern == "band":
        # a band of half-width w keeps about (2w + 1) / n blocks per row
        w = max(0, round((density * n_blocks - 1) / 2))
        i = torch.arange(n_blocks)
        return (i[:, None] - i[None, :]).abs() <= w
    g = torch.Generator().manual_seed(seed)
    bits = torch.rand(n_blocks, n_blocks, generator=g) < density
    return bits | torch.eye(n_blocks, dtype=torch.bool)


def kernel_table(device: str, dtype: torch.dtype, heads: int, dim: int, repeats: int) -> list[dict]:
    """Cost per score of the fused SDPA kernel for ``(queries, keys)`` calls, relative to one dense call.

    A sparse row is a call of 128 queries against its kept keys; the CPU kernel tiles short queries in
    small splits, so these calls cost more per score than dense attention does.
    """
    n = 8192
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, dim, generator=g).to(device, dtype) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with torch.no_grad():
        per_score = timeit(lambda: sdpa(q, k, v), device, repeats) / (heads * n * n)
        rows = []
        for nq in (128, 256, 768):
            for nk in (256, 512, 1152, 2048):
                batch = max(1, heads * n * n // 4 // (nq * nk))
                qs, ks, vs = (torch.randn(batch, 1, m, dim, generator=g).to(device, dtype) for m in (nq, nk, nk))
                t = timeit(lambda qs=qs, ks=ks, vs=vs: sdpa(qs, ks, vs), device, repeats)
                rows.append({"queries": nq, "keys": nk, "relative_cost_per_score": t / (batch * nq * nk) / per_score})
                print(f"kernel: {nq:4d} queries x {nk:4d} keys: {rows[-1]['relative_cost_per_score']:.2f}x per score of dense")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument(
        "--densities", type=float, nargs="+", default=[0.05, 0.07, 0.15, 0.3, 0.45, 1.0],
        help="target block densities; 1.0 is the full mask, the ceiling of each backend's efficiency",
    )
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--pattern", choices=["band", "random"], default="band")
    p.add_argument(
        "--backends", nargs="+", default=["flex", "gather"], choices=ENGINE_BACKENDS,
        help="engine backends timed side by side (forward; 'gather-sdpa': gather with the native CPU kernel "
        "turned off); the backward uses 'auto'",
    )
    p.add_argument("--backward-length", type=int, default=8192, help="length of the forward + backward run (0: skip)")
    p.add_argument("--backward-densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    p.add_argument("--repeats", type=int, default=5, help="rounds (every case timed once per round)")
    p.add_argument(
        "--kernel-table", action="store_true",
        help="also time the fused SDPA kernel per score at the query/key lengths sparse calls have, "
        "relative to one dense call (what the engine's row grouping is tuned on)",
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--out", default="outputs/bench_engine")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    bs = args.block_size
    env = environment()
    print(f"device={env['device']} torch={env['torch']} threads={env['threads']} pattern={args.pattern}")
    forward_rows, backward_rows = [], []

    def qkv(n: int, grad: bool = False):
        g = torch.Generator().manual_seed(0)
        ts = [torch.randn(1, args.heads, n, args.head_dim, generator=g).to(device, dtype) for _ in range(3)]
        return [t.requires_grad_(grad) for t in ts]

    bar = tqdm(total=len(args.lengths) * len(args.densities) * len(args.backends), desc="forward")
    for n in args.lengths:
        q, k, v = qkv(n)
        nb = math.ceil(n / bs)
        with torch.no_grad():
            dense = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            mem_dense = measure_peak(dense, device)
            cases, fns, recompiles = [], {"dense": dense}, {}
            for target, requested in [(t, b) for t in args.densities for b in args.backends]:
                bm = BlockMask(pattern_bitmap(nb, target, args.pattern), n, n, bs)
                backend, fn, kernel = engine_call(q, k, v, bm, requested)
                before = flex_backend.STATS.compiles
                t_first = timeit(fn, device, repeats=1, warmup=0)  # includes compiling, if any
                key = f"{target}/{requested}"
                recompiles[key] = 0

                def counted(fn=fn, key=key, recompiles=recompiles) -> None:
                    mid = flex_backend.STATS.compiles
                    fn()
                    recompiles[key] += flex_backend.STATS.compiles - mid

                fns[key] = counted
                cases.append((key, target, requested, bm, backend, kernel, t_first, flex_backend.STATS.compiles - before, fn))
            # dense and every engine case timed in turn, round after round (see interleaved_samples)
            times = interleaved_samples(fns, args.repeats, device, warmup=0)
            for key, target, requested, bm, backend, kernel, t_first, compiled, fn in cases:
                density, recompiled = bm.density(), recompiles[key] > 0
                mem = measure_peak(fn, device)
                row = {
                    "tokens": n,
                    "target_density": target,
                    "density": density,
                    "requested": requested,
                    "backend": backend,
                    "cpu_kernel": kernel,
                    **rounds_figures(times["dense"], times[key], density),
                    "first_call_s": t_first,
                    "compiles": compiled,
                    "recompiled_on_repeat": recompiled,
                    "peak_mb_dense": mem_dense,
                    "peak_mb_sparse": mem,
                }
                forward_rows.append(row)
                bar.update(1)
                tqdm.write(
                    f"n={n:6d} density={density:.3f} backend={backend:6s} kernel={kernel} dense={row['dense_s'] * 1e3:8.1f}ms "
                    f"sparse={row['sparse_s'] * 1e3:8.1f}ms speedup={row['speedup']:5.2f}x ideal={row['ideal']:5.2f}x "
                    f"efficiency={row['efficiency']:.2f} (median {row['efficiency_median']:.2f}) "
                    f"first_call={t_first:.2f}s compiles={compiled} "
                    f"recompiled_on_repeat={recompiled} peak_mb dense={mem_dense:.0f} sparse={mem:.0f}"
                )
    bar.close()

    if args.backward_length:
        n = args.backward_length
        q, k, v = qkv(n, grad=True)
        grad_out = torch.randn_like(q)
        nb = math.ceil(n / bs)

        def dense_fb():
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            torch.autograd.grad(o, (q, k, v), grad_out)

        mem_dense = measure_peak(dense_fb, device)
        cases, fns = [], {"dense": dense_fb}
        for target in args.backward_densities:
            bm = BlockMask(pattern_bitmap(nb, target, args.pattern), n, n, bs)

            def sparse_fb(bm=bm):
                o = block_sparse_attention(q, k, v, bm, backend="auto")
                torch.autograd.grad(o, (q, k, v), grad_out)

            cases.append((target, bm, sparse_fb))
            fns[str(target)] = sparse_fb
        times = interleaved_samples(fns, args.repeats, device)
        for target, bm, sparse_fb in cases:
            density = bm.density()
            backend = resolve_backend(q, k, v, bm, "auto")
            mem = measure_peak(sparse_fb, device)
            row = {
                "tokens": n,
                "density": density,
                "backend": backend,
                "cpu_kernel": cpu_kernel(q) if backend == "gather" and device == "cpu" else None,
                **rounds_figures(times["dense"], times[str(target)], density),
                "peak_mb_dense": mem_dense,
                "peak_mb_sparse": mem,
            }
            backward_rows.append(row)
            print(
                f"fwd+bwd n={n} density={density:.3f} backend={backend} dense={row['dense_s'] * 1e3:.1f}ms "
                f"sparse={row['sparse_s'] * 1e3:.1f}ms speedup={row['speedup']:.2f}x efficiency={row['efficiency']:.2f} "
                f"peak_mb dense={mem_dense:.0f} sparse={mem:.0f}"
            )

    kernel_rows = kernel_table(device, dtype, args.heads, args.head_dim, args.repeats) if args.kernel_table else []

    stats = flex_backend.STATS.as_dict()
    print(f"flex compiles={stats['compiles']} cache_hits={stats['cache_hits']} compile_s={stats['compile_seconds']:.1f}")
    out = Path(args.out)
    write_json(
        out.with_suffix(".json"),
        {
            "environment": env,
            "args": vars(args),
            "forward": forward_rows,
            "forward_backward": backward_rows,
            "kernel": kernel_rows,
            "flex": stats,
        },
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for n in args.lengths:
        for b in args.backends:
            rows = [r for r in forward_rows if r["tokens"] == n and r["requested"] == b]
            label = f"{n} tokens, {b}"
            axes[0].plot([r["density"] for r in rows], [r["speedup"] for r in rows], "o-", label=label)
            axes[1].plot([r["density"] for r in rows], [r["efficiency"] for r in rows], "o-", label=label)
    dens = sorted({r["density"] for r in forward_rows})
    axes[0].plot(dens, [1 / d for d in dens], "k--", label="ideal 1/density")
    if backward_rows:
        axes[0].plot(
            [r["density"] for r in backward_rows],
            [r["speedup"] for r in backward_rows],
            "s:",
            label=f"fwd+bwd {args.backward_length}",
        )
    axes[0].set_yscale("log")
    axes[0].set_xlabel("block density")
    axes[0].set_ylabel("speedup vs dense SDPA")
    axes[0].legend(fontsize=7)
    axes[1].axhline(0.85, color="k", ls="--", lw=0.8)
    axes[1].set_xlabel("block density")
    axes[1].set_ylabel("efficiency = speedup x density")
    axes[1].legend(fontsize=7)
    fig.suptitle(f"block-sparse engine ({args.pattern} masks) on {env['device']}, {args.dtype}")
    save_figure(fig, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
