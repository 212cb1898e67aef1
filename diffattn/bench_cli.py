"""``diffattn bench`` and ``diffattn mask``: one attention shape, every method, side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import registry
from .benchmark import DTYPES, environment, measure_peak, save_figure, timeit, write_json
from .ops import BlockMask, block_sparse_attention

MAX_MASK_BLOCKS = 4096  # query/key blocks per side that `diffattn mask` draws


def bench_stem(out: str | os.PathLike) -> Path:
    """The path stem of ``diffattn bench --out``: ``x`` (or ``x.json`` / ``x.png``) -> ``x``; ``x.json`` and
    ``x.png`` are written.

    Raises:
        ValueError: another extension (it would be replaced silently), a folder, or an unwritable place.
    """
    from .checks import UsageError, check_out_file

    p = Path(out)
    if not str(out):
        raise UsageError("--out must be a path stem, got ''")
    suffix = p.suffix.lower()
    if suffix in (".json", ".png"):
        p = p.with_suffix("")
    elif suffix:
        raise UsageError(f"--out is a path stem (STEM.json and STEM.png are written); got {str(out)!r} with the extension {p.suffix!r}")
    for ext in (".json", ".png"):
        check_out_file(p.with_name(p.name + ext), {ext}, "--out")
    return p


def method_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """``{"radial.decay_factor": 0.2}`` -> the options of ``radial``; keys without a prefix go to all."""
    out = {}
    for key, value in options.items():
        if "." in key:
            m, k = key.split(".", 1)
            if m == method:
                out[k] = value
        else:
            out[key] = value
    return out


def method_block_mask(
    name: str,
    grid: tuple[int, int, int],
    n_text: int = 0,
    text_position: str | None = None,
    block_size: int = 128,
    options: dict[str, Any] | None = None,
) -> BlockMask:
    spec = registry.get(name)
    if spec.block_mask is None:
        raise ValueError(f"method {name!r} builds no block mask (it is not block-sparse)")
    config = spec.build_config(method_options(name, options or {}))
    return spec.block_mask(config, grid, n_text, text_position, block_size)


def method_attention(
    name: str, grid: tuple[int, int, int], n_text: int, text_position: str | None, options: dict[str, Any]
) -> tuple[Any, float | None]:
    """A ``fn(q, k, v)`` for the method at this shape, and its block density when block-sparse."""
    spec = registry.get(name)
    config = spec.build_config(method_options(name, options))
    if spec.attention is not None:
        return spec.attention(config, grid, n_text, text_position), None
    if spec.block_mask is not None:
        bm = spec.block_mask(config, grid, n_text, text_position, 128)
        return (lambda q, k, v: block_sparse_attention(q, k, v, bm)), bm.density()
    raise ValueError(f"method {name!r} cannot be benchmarked on a bare attention shape")


def benchmarkable() -> list[str]:
    return [m.name for m in registry.all_methods() if m.block_mask is not None or m.attention is not None]


def run_bench(
    grid: tuple[int, int, int],
    heads: int,
    head_dim: int,
    n_text: int,
    text_position: str | None,
    methods: list[str] | None,
    options: dict[str, Any],
    out: Path,
    dtype: str = "fp32",
    repeats: int = 3,
) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = methods if methods else benchmarkable()
    # which methods apply to this shape, decided before any timing: methods named with --methods must,
    # the default list skips the others with a line saying why
    fns: dict[str, tuple[Any, float | None]] = {}
    skipped: dict[str, str] = {}
    for name in names:
        try:
            fns[name] = method_attention(name, grid, n_text, text_position, options)
        except ValueError as e:
            if methods:
                raise ValueError(f"--methods {name}: {e}") from None
            skipped[name] = " ".join(str(e).split())
            print(f"{name:16s} skipped: {skipped[name]}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    n = grid[0] * grid[1] * grid[2] + n_text
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim, generator=g).to(device, DTYPES[dtype]) for _ in range(3))
    rows = []
    with torch.no_grad():
        # the memory-peak call is also the untimed warm-up call
        m_dense = measure_peak(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device)
        t_dense = timeit(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device, repeats, warmup=0)
        rows.append({"method": "dense-sdpa", "seconds": t_dense, "speedup": 1.0, "density": 1.0, "peak_mb": m_dense})
        print(f"{'dense-sdpa':16s} {t_dense * 1e3:9.2f} ms")
        for name, (fn, density) in fns.items():
            mem = measure_peak(lambda fn=fn: fn(q, k, v), device)
            t = timeit(lambda fn=fn: fn(q, k, v), device, repeats, warmup=0)
            rows.append({"method": name, "seconds": t, "speedup": t_dense / t, "density": density, "peak_mb": mem})
            dens = f"density {density:.3f}" if density is not None else ""
            print(f"{name:16s} {t * 1e3:9.2f} ms  speedup {t_dense / t:5.2f}x  {dens}", flush=True)
    result = {
        "grid": grid,
        "tokens": n,
        "heads": heads,
        "head_dim": head_dim,
        "dtype": dtype,
        "environment": environment(),
        "rows": rows,
        "skipped": skipped,
    }
    json_path, png_path = out.with_name(out.name + ".json"), out.with_name(out.name + ".png")
    write_json(json_path, result)
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar([r["method"] for r in rows], [r["speedup"] for r in rows])
    ax.set_ylabel("speedup vs dense SDPA")
    ax.set_title(f"{n} tokens, {heads} heads x {head_dim}, {dtype}, {environment()['device']}")
    save_figure(fig, png_path)
    plt.close(fig)
    print(f"wrote {json_path} and {png_path}")
    return result


def draw_mask(
    method: str,
    grid: tuple[int, int, int],
    n_text: int,
    text_position: str | None,
    block_size: int,
    options: dict[str, Any],
    out: Path,
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bm = method_block_mask(method, grid, n_text, text_position if n_text else None, block_size, options)
    bitmap = bm.effective_bitmap()[0, 0].float().cpu().numpy()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(bitmap, cmap="Blues", interpolation="nearest", vmin=0, vmax=1)
    ax.set_title(f"{method}: grid {grid}, text {n_text}, density {bm.density():.3f}")
    ax.set_xlabel(f"key block ({block_size} tokens)")
    ax.set_ylabel("query block")
    if out.suffix.lower() != ".png":
        raise ValueError(f"--out must end in .png (the mask image), got {str(out)!r}")
    save_figure(fig, out)
    plt.close(fig)
    return out


def video_mask_args(
    method: str,
    model: str,
    frames: int | None,
    height: int | None,
    width: int | None,
    n_text: int | None,
    text_position: str | None,
    options: dict[str, Any],
) -> tuple[tuple[int, int, int], int, str, dict[str, Any]]:
    """Token grid, text tokens/position and options of ``diffattn mask`` for a pixel video size.

    The model's VAE and patchify factors give the grid, its pipeline default the text tokens, and for
    ``radial`` its attention-sink default (Wan) unless ``sink`` is given.
    """
    from .masks.video_geometry import VIDEO_MODELS, latent_grid

    if None in (frames, height, width):
        raise ValueError("give --frames, --height and --width together (pixels), or --grid (tokens)")
    grid = latent_grid(model, frames, height, width)  # type: ignore[arg-type]
    geometry = VIDEO_MODELS[model]
    n_text = geometry.text_tokens if n_text is None else n_text
    position = text_position or geometry.text_position or "last"
    options = dict(options)
    if method == "radial" and "sink" not in options:
        options["sink"] = geometry.family == "wan"
    return grid, n_text, position, options


def mask_summary(
    method: str,
    grid: tuple[int, int, int],
    n_text: int,
    text_position: str | None,
    block_size: int,
    options: dict[str, Any],
) -> str:
    """One line: the shape, the block density and, when the method reports it, the exact token density."""
    bm = method_block_mask(method, grid, n_text, text_position if n_text else None, block_size, options)
    f, h, w = grid
    line = (
        f"{method}: grid {f}x{h}x{w} ({h * w} tokens per frame) + {n_text} text = {bm.q_len} tokens; "
        f"block density {bm.density():.4f} ({block_size}-token blocks)"
    )
    spec = registry.get(method)
    if spec.token_density is not None:
        config = spec.build_config(method_options(method, options))
        token = spec.token_density(config, grid, n_text, text_position, block_size)
        line += f"; token density {token:.4f}"
    return line
