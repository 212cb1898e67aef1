"""Radial attention vs dense SDPA, side by side in one run (issue 7's speed targets).

(a) one attention layer, 2 heads x 128, at Wan's 480p frame size (480x832: 30x52 = 1560 tokens per latent
    frame) with 21 latent frames (81 video frames) and 81 latent frames (4x length), Wan settings (decay
    0.2, attention sink, 128-token blocks): dense SDPA vs the engine (each backend), with block density,
    speedup and efficiency = speedup x density.
(b) one denoising step of a 2-block WanTransformer3DModel at Wan 2.1 1.3B width (1536 = 12 heads x 128,
    FFN 8960, 512 text tokens) at 21 latent frames: dense vs radial on every block (a sparse step), the
    step amortized over the reference schedule (first 12 of 50 steps dense), the attention share of the
    dense step, and the end-to-end figure projected to 4x length from it (linear layers scale with the
    length, attention with its square; radial attention by the layer speedup measured in (a)).
(c) one attention layer forward + backward (the LoRA training path) at 41 latent frames.

Writes ``OUT.json`` and ``OUT.png``. The defaults are the issue's shapes and take a while on CPU (dense
attention over 126k tokens is ~1e13 FLOPs); ``--frames 5 9 --step-frames 5 --train-frames 5`` is a quick
smoke run.

    python scripts/bench_radial.py
    python scripts/bench_radial.py --frames 21 --skip-step --train-frames 0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

import diffattn
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
from diffattn.masks.radial import radial_block_mask, radial_density
from diffattn.ops import block_sparse_attention, flex_backend, resolve_backend
from diffattn.ops.gather_attention import cpu_kernel

DENSE_STEPS, TOTAL_STEPS = 12, 50  # the reference schedule: first 12 of 50 steps dense


def _qkv(n: int, heads: int, dim: int, dtype: torch.dtype, device: str, grad: bool = False):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(1, heads, n, dim, generator=g).to(device, dtype).requires_grad_(grad) for _ in range(3)]


def bench_layer(args, device: str, dtype: torch.dtype) -> list[dict]:
    """(a): one attention layer per frame count, dense SDPA vs each engine backend."""
    rows = []
    tpf = args.height_tokens * args.width_tokens
    bar = tqdm(total=len(args.frames) * (1 + len(args.backends)), desc="(a) attention layer")
    for f in args.frames:
        n = f * tpf
        q, k, v = _qkv(n, args.heads, args.head_dim, dtype, device)
        bm = radial_block_mask(
            f, tpf, decay_factor=args.decay_factor, block_size=args.block_size, sink=True, device=device
        )
        density = bm.density()
        token_density = radial_density(f, tpf, decay_factor=args.decay_factor, block_size=args.block_size, sink=True)
        with torch.no_grad():
            dense = lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v)  # noqa: E731
            mem_dense = measure_peak(dense, device)
            bar.update(1)
            fns, firsts, runs = {"dense": dense}, {}, {}
            for requested in args.backends:
                runs[requested] = backend, fn, kernel = engine_call(q, k, v, bm, requested)
                before = flex_backend.STATS.compiles
                t_first = timeit(fn, device, repeats=1, warmup=0)  # includes compiling, if any
                firsts[requested] = (t_first, flex_backend.STATS.compiles - before)
                fns[requested] = fn
            # dense and each backend in turn, round after round (see interleaved_samples)
            times = interleaved_samples(fns, args.repeats, device, warmup=0)
            for requested in args.backends:
                figures = rounds_figures(times["dense"], times[requested], density)
                t_dense, t = figures["dense_s"], figures["sparse_s"]
                backend, fn, kernel = runs[requested]
                t_first, compiles = firsts[requested]
                row = {
                    "latent_frames": f,
                    "tokens": n,
                    "requested": requested,
                    "backend": backend,
                    "cpu_kernel": kernel,
                    "auto_backend": resolve_backend(q, k, v, bm, "auto"),
                    "block_density": density,
                    "token_density": token_density,
                    **figures,
                    "radial_s": t,
                    "first_call_s": t_first,
                    "compiles": compiles,
                    "peak_mb_dense": mem_dense,
                    "peak_mb_radial": measure_peak(fn, device),
                }
                rows.append(row)
                bar.update(1)
                tqdm.write(
                    f"(a) frames={f:3d} tokens={n:6d} backend={backend:6s} kernel={kernel} block_density={density:.3f} "
                    f"dense={t_dense:8.3f}s radial={t:8.3f}s speedup={row['speedup']:5.2f}x "
                    f"ideal={row['ideal']:5.2f}x efficiency={row['efficiency']:.2f} "
                    f"(median {row['efficiency_median']:.2f}) first_call={t_first:.1f}s"
                )
    bar.close()
    return rows


def _wan_2block(dtype: torch.dtype, device: str):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    # Wan 2.1 T2V 1.3B, 2 of its 30 blocks
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=12,
        attention_head_dim=128,
        in_channels=16,
        out_channels=16,
        text_dim=4096,
        freq_dim=256,
        ffn_dim=8960,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    model = model.to(device).eval()
    # (a plain .to(dtype) would also cast the modules diffusers keeps in fp32; fp32 needs no cast)
    return model if dtype == torch.float32 else model.to(dtype)


def bench_step(args, device: str, dtype: torch.dtype, layer_rows: list[dict]) -> dict:
    """(b): one denoising step of a 2-block Wan 1.3B-width transformer, dense vs radial."""
    f = args.step_frames
    model = _wan_2block(dtype, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, f, 2 * args.height_tokens, 2 * args.width_tokens, generator=g).to(device, dtype)
    text = torch.randn(1, 512, 4096, generator=g).to(device, dtype)
    t = torch.tensor([500], device=device)
    n = f * args.height_tokens * args.width_tokens

    def step():
        model(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)

    with torch.no_grad():
        t_dense = timeit(step, device, args.repeats)
        # attention share: the two blocks' dense self-attention products alone
        qkv = _qkv(n, 12, 128, dtype, device)
        t_attn = 2 * timeit(
            lambda qkv=qkv: torch.nn.functional.scaled_dot_product_attention(*qkv), device, args.repeats
        )
        qkv = None  # free before the radial run
        with diffattn.apply(model, "radial", decay_factor=args.decay_factor, block_size=args.block_size) as patch:
            timeit(step, device, repeats=1, warmup=0)  # builds the mask, compiles if flex
            t_radial = timeit(step, device, args.repeats, warmup=0)
            assert len(patch.layers) == 2
    sparse_speedup = t_dense / t_radial
    amortized = t_dense / ((DENSE_STEPS * t_dense + (TOTAL_STEPS - DENSE_STEPS) * t_radial) / TOTAL_STEPS)
    share = min(t_attn / t_dense, 1.0)

    # 4x length projection: non-attention work grows with the tokens, attention with their square; radial
    # attention by the layer speedup measured in (a) at the longest length (best backend).
    longest = max(r["latent_frames"] for r in layer_rows) if layer_rows else None
    layer_best = max(
        (r["speedup"] for r in layer_rows if r["latent_frames"] == longest), default=float("nan")
    )
    r = longest / f if longest else float("nan")
    other = t_dense * (1 - share)
    attn = t_dense * share
    dense_4x = other * r + attn * r * r
    radial_4x = other * r + attn * r * r / layer_best
    projected = dense_4x / radial_4x
    projected_amortized = dense_4x / ((DENSE_STEPS * dense_4x + (TOTAL_STEPS - DENSE_STEPS) * radial_4x) / TOTAL_STEPS)
    result = {
        "latent_frames": f,
        "tokens": n,
        "cpu_kernel": cpu_kernel(x) if device == "cpu" else None,
        "dense_step_s": t_dense,
        "radial_step_s": t_radial,
        "sparse_step_speedup": sparse_speedup,
        "amortized_speedup": amortized,
        "attention_share_dense": share,
        "projection_frames": longest,
        "projection_layer_speedup": layer_best,
        "projected_speedup_sparse_steps": projected,
        "projected_speedup_amortized": projected_amortized,
    }
    print(
        f"(b) 2-block Wan 1.3B step, {f} latent frames ({n} tokens): dense={t_dense:.2f}s radial={t_radial:.2f}s "
        f"sparse-step speedup={sparse_speedup:.2f}x amortized ({DENSE_STEPS}/{TOTAL_STEPS} dense)={amortized:.2f}x "
        f"attention share={share:.2f}"
    )
    print(
        f"(b) projected to {longest} latent frames (layer speedup {layer_best:.2f}x): "
        f"sparse steps {projected:.2f}x, amortized {projected_amortized:.2f}x"
    )
    return result


def bench_train(args, device: str, dtype: torch.dtype) -> dict:
    """(c): one attention layer forward + backward at ``--train-frames``."""
    f = args.train_frames
    tpf = args.height_tokens * args.width_tokens
    n = f * tpf
    q, k, v = _qkv(n, args.heads, args.head_dim, dtype, device, grad=True)
    grad_out = torch.randn_like(q)
    bm = radial_block_mask(f, tpf, decay_factor=args.decay_factor, block_size=args.block_size, sink=True, device=device)
    backend = resolve_backend(q, k, v, bm, "auto")

    def dense_fb():
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(o, (q, k, v), grad_out)

    def radial_fb():
        o = block_sparse_attention(q, k, v, bm, backend="auto")
        torch.autograd.grad(o, (q, k, v), grad_out)

    t_dense = timeit(dense_fb, device, args.repeats, warmup=args.train_warmup)
    t_radial = timeit(radial_fb, device, args.repeats, warmup=args.train_warmup)
    result = {
        "latent_frames": f,
        "tokens": n,
        "backend": backend,
        "cpu_kernel": cpu_kernel(q) if backend == "gather" and device == "cpu" else None,
        "block_density": bm.density(),
        "dense_s": t_dense,
        "radial_s": t_radial,
        "speedup": t_dense / t_radial,
        "efficiency": t_dense / t_radial * bm.density(),
        "peak_mb_dense": measure_peak(dense_fb, device),
        "peak_mb_radial": measure_peak(radial_fb, device),
    }
    print(
        f"(c) fwd+bwd frames={f} tokens={n} backend={backend} block_density={bm.density():.3f} "
        f"dense={t_dense:.2f}s radial={t_radial:.2f}s speedup={result['speedup']:.2f}x"
    )
    return result


def plot(out: Path, layer_rows: list[dict], step: dict | None, train: dict | None, env: dict, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    labels, speedups, ideals = [], [], []
    for r in layer_rows:
        labels.append(f"{r['latent_frames']}f\n{r['requested']}")
        speedups.append(r["speedup"])
        ideals.append(r["ideal"])
    xs = range(len(labels))
    axes[0].bar(xs, speedups, label="measured")
    axes[0].scatter(xs, ideals, color="k", marker="_", s=400, label="ideal 1/density")
    axes[0].set_xticks(list(xs), labels)
    axes[0].set_ylabel("attention layer speedup vs dense SDPA")
    axes[0].set_title("(a) one layer, 2 heads x 128, 480p frames")
    axes[0].legend(fontsize=8)
    names, values = [], []
    if step is not None:
        names += ["step\n(sparse)", "step\n(amortized)", "4x proj.\n(sparse)", "4x proj.\n(amortized)"]
        values += [
            step["sparse_step_speedup"],
            step["amortized_speedup"],
            step["projected_speedup_sparse_steps"],
            step["projected_speedup_amortized"],
        ]
    if train is not None:
        names.append(f"fwd+bwd\n{train['latent_frames']}f")
        values.append(train["speedup"])
    axes[1].bar(range(len(names)), values)
    axes[1].set_xticks(list(range(len(names))), names)
    axes[1].axhline(1.0, color="k", lw=0.8)
    axes[1].set_ylabel("speedup vs dense")
    axes[1].set_title("(b) 2-block Wan 1.3B step, (c) training")
    fig.suptitle(f"radial attention (Wan settings) on {env['device']}, {dtype}, {env['threads']} threads")
    save_figure(fig, out.with_suffix(".png"))
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, nargs="+", default=[21, 81], help="latent frames for (a)")
    p.add_argument("--height-tokens", type=int, default=30, help="token rows per frame (480 px / 16)")
    p.add_argument("--width-tokens", type=int, default=52, help="token columns per frame (832 px / 16)")
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--decay-factor", type=float, default=0.2)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument(
        "--backends", nargs="+", default=["flex", "gather"], choices=ENGINE_BACKENDS,
        help="'gather-sdpa': gather with the native CPU kernel turned off",
    )
    p.add_argument("--step-frames", type=int, default=21, help="latent frames for (b)")
    p.add_argument("--skip-step", action="store_true", help="skip (b)")
    p.add_argument("--train-frames", type=int, default=41, help="latent frames for (c); 0 skips it")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-warmup", type=int, default=1,
                   help="(c): untimed calls before timing (0 at 41 frames, where one dense call takes minutes)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    p.add_argument("--out", default="outputs/bench_radial")
    args = p.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    env = environment()
    print(f"device={env['device']} torch={env['torch']} threads={env['threads']}")
    layer_rows = bench_layer(args, device, dtype)
    step = None if args.skip_step else bench_step(args, device, dtype, layer_rows)
    train = bench_train(args, device, dtype) if args.train_frames else None
    stats = flex_backend.STATS.as_dict()
    print(f"flex compiles={stats['compiles']} cache_hits={stats['cache_hits']} compile_s={stats['compile_seconds']:.1f}")
    out = Path(args.out)
    write_json(
        out.with_suffix(".json"),
        {"environment": env, "args": vars(args), "layer": layer_rows, "step": step, "train": train, "flex": stats},
    )
    plot(out, layer_rows, step, train, env, args.dtype)
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
