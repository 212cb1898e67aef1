"""The ``diffattn`` command: methods, generate, bench, mask, evaluate, train, testbed.

Every command runs in two stages. The *validation* stage checks everything it can without loading a
model or doing any work (option names and values, the method config, sizes, steps, frame counts,
output paths and extensions, instances files, data folders) and writes nothing; the *work* stage
loads and runs. ``main(argv, validate_only=True)`` runs the first stage only.

A user error prints one line, ``diffattn CMD: error: ...``, on stderr and exits with status 2; a bug
exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .checks import (
    UsageError,
    check_int,
    check_model_source,
    check_num_frames,
    check_out_dir,
    check_out_file,
    check_size,
    model_geometry,
    read_instances,
)
from .io import IMAGE_SUFFIXES, VIDEO_SUFFIXES
from .loading import DEFAULT_MODEL, TESTBED_PREFIX, call_kwargs, load_pipeline, parse_options

# pipeline class -> (the stock processor family of its denoiser's attention, the denoiser class), for the
# method check before loading (diffattn.apply makes the final one on the loaded model)
PIPELINE_ATTENTION: dict[str, tuple[str, str]] = {
    "StableDiffusionPipeline": ("sd", "UNet2DConditionModel"),
    "StableDiffusionXLPipeline": ("sd", "UNet2DConditionModel"),
    "StableDiffusionControlNetPipeline": ("sd", "UNet2DConditionModel"),
    "StableDiffusion3Pipeline": ("sd3", "SD3Transformer2DModel"),
    "PixArtAlphaPipeline": ("sd", "PixArtTransformer2DModel"),
    "FluxPipeline": ("flux", "FluxTransformer2DModel"),
    "WanPipeline": ("wan", "WanTransformer3DModel"),
    "WanImageToVideoPipeline": ("wan", "WanTransformer3DModel"),
    "HunyuanVideoPipeline": ("hunyuan-video", "HunyuanVideoTransformer3DModel"),
    "MochiPipeline": ("mochi", "MochiTransformer3DModel"),
    "CogVideoXPipeline": ("cogvideox", "CogVideoXTransformer3DModel"),
}
_MAX_SEED = 2**63 - 1


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``diffattn CMD: error: ...``, status 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(message: Any) -> str:
    return " ".join(str(message).split())


def _grid_arg(s: str) -> tuple[int, int, int]:
    try:
        parts = [int(p) for p in s.lower().replace("x", ",").split(",") if p.strip()]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts = [1, *parts]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"grid must be FRAMES,HEIGHT,WIDTH or HEIGHT,WIDTH tokens >= 1, got {s!r}")
    return tuple(parts)  # type: ignore[return-value]


def _options(pairs: list[str] | None) -> dict[str, Any]:
    try:
        options = parse_options(pairs)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if any(not k for k in options):
        raise UsageError(f"--option expects KEY=VALUE with a non-empty KEY, got {pairs!r}")
    return options


def _check_device(device: Any) -> str:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device must be a torch device such as cpu or cuda, got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device!r}: no CUDA device is available here (use --device cpu)")
    if dev.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UsageError(f"--device must be cpu or cuda (or mps / xpu), got {device!r}")
    return device


def _check_seed(seed: Any, span: int = 0) -> int:
    check_int("--seed", seed, 0)
    if seed + span > _MAX_SEED:
        raise UsageError(f"--seed must be at most {_MAX_SEED - span}, got {seed}")
    return seed


def _check_steps(steps: Any, min_steps: int, model: str) -> int:
    check_int("--steps", steps, 1)
    if steps < min_steps:
        raise UsageError(f"--steps: {model}'s scheduler needs at least {min_steps} steps, got {steps}")
    return steps


def _method_config(name: Any, options: dict[str, Any], what: str = "--attention") -> Any:
    """The registry's config for ``name`` with ``options``: unknown method / option / bad value -> UsageError."""
    from . import registry

    try:
        method = registry.get(name)
    except ValueError as e:
        raise UsageError(f"{what}: {e}") from None
    try:
        return method.build_config(dict(options))
    except (TypeError, ValueError) as e:
        raise UsageError(f"{what} {name}: {e}") from None


def supports(method: str, pipeline: str | None) -> bool | None:
    """Whether ``method`` changes the attention of a ``pipeline`` (a class name), known without loading
    it; ``None``: not known here (``diffattn.apply`` decides on the loaded model)."""
    from . import registry

    if pipeline not in PIPELINE_ATTENTION:
        return None
    family, denoiser = PIPELINE_ATTENTION[pipeline]
    spec = registry.get(method)
    if spec.families and family not in spec.families:
        return False
    # ``models`` names the denoisers when it is a plain list of class names (not "other transformers ...")
    if denoiser and spec.models and all(m.isidentifier() for m in spec.models) and denoiser not in spec.models:
        return False
    return True


def _check_family(method: str, model: str, pipeline: str | None) -> None:
    """A method that cannot change the model's attention at all is an error before loading it."""
    from . import registry

    if supports(method, pipeline) is False:
        spec = registry.get(method)
        which = ", ".join(spec.models) if spec.models and all(m.isidentifier() for m in spec.models) else ", ".join(spec.families)
        raise UsageError(f"method {method!r} does not apply to {model} (a {pipeline}); it supports: {which}")


def _save_output(out: Any, path: Path) -> list[Path]:
    """Write images (PNG/JPG, several -> numbered) or frames (GIF/MP4) atomically; returns the paths."""
    from .io import save_frames, save_images

    frames = getattr(out, "frames", None)
    if frames is not None:
        return save_frames(frames[0], path)
    return save_images(out.images, path)


def _labelled_frames(videos: Any, labels: list[str], scale: int = 3) -> list[Any]:
    """Videos ``(N, F, H, W, C)`` side by side, each labelled underneath: one PIL image per frame."""
    from PIL import Image, ImageDraw

    from .io import to_pil

    frames = []
    for f in range(len(videos[0])):
        pils = [to_pil(v[f]).convert("RGB") for v in videos]
        w, h = pils[0].size
        grid = Image.new("RGB", (w * scale * len(pils), h * scale + 14), "white")
        draw = ImageDraw.Draw(grid)
        for i, (im, label) in enumerate(zip(pils, labels)):
            grid.paste(im.resize((w * scale, h * scale), Image.NEAREST), (i * w * scale, 0))
            draw.text((i * w * scale + 3, h * scale + 1), label, fill="black")
        frames.append(grid)
    return frames


# ----- methods -------------------------------------------------------------------------------------------


def check_methods(args: argparse.Namespace) -> dict[str, Any]:
    return {}


def cmd_methods(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from . import registry

    for m in registry.all_methods():
        print(f"{m.name:16s} {m.description}")
    return 0


# ----- generate ------------------------------------------------------------------------------------------


def check_generate(args: argparse.Namespace) -> dict[str, Any]:
    model = check_model_source(args.model)
    geo = model_geometry(model)
    options = _options(args.option)
    labelled = False
    if model.startswith(TESTBED_PREFIX) and args.prompt is None:
        from .testbed import models

        labelled = models.get(model[len(TESTBED_PREFIX) :]).num_classes > 0
    # the output first: a bad name is refused before anything else
    if args.instances or geo.video is False:
        suffixes, what = IMAGE_SUFFIXES, f"images ({model} makes images)" if geo.video is False else "images"
    else:
        suffixes, what = IMAGE_SUFFIXES | VIDEO_SUFFIXES, "videos (GIF / MP4) or images" if geo.video else ""
    if labelled and geo.video:
        suffixes, what = VIDEO_SUFFIXES, f"the labelled video grid of {model}"
    out = check_out_file(args.out, suffixes, "--out", what)
    if out.suffix.lower() == ".mp4":
        import importlib.util

        if importlib.util.find_spec("imageio") is None:
            raise UsageError("--out *.mp4 needs the video extra: pip install 'diffattn[video]' (or write a .gif)")
    if args.steps is not None:
        _check_steps(args.steps, geo.min_steps, model)
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None:
            check_size(f"--{name}", value, geo.multiple, model)
    if args.num_frames is not None:
        if geo.video is False:
            raise UsageError(f"--num-frames applies to video models; {model} makes images")
        check_num_frames(args.num_frames, geo.temporal, model, "--num-frames")
    _check_seed(args.seed, 100)
    _check_device(args.device)
    preset, chosen = None, args.attention
    if args.preset is not None:  # read and checked now; whether it fits the model is checked once loaded
        from .presets import PresetError, load

        if args.instances or options:
            raise UsageError("--preset carries the method's options; it takes no --option or --instances")
        try:
            preset = load(args.preset)
        except (PresetError, FileNotFoundError) as e:
            raise UsageError(f"--preset: {e}") from None
        if args.attention not in (None, preset.method):
            raise UsageError(f"--preset {args.preset} is for method {preset.method!r}, not --attention {args.attention!r}")
        chosen = preset.method
    attention = chosen or ("regional_mask" if args.instances else "dense")
    instances = None
    if args.instances:
        if geo.video:
            raise UsageError(f"--instances needs an SD 1.x/2.x or SDXL image model; {model} makes videos")
        if attention not in ("roi", "regional_mask"):
            raise UsageError(f"--instances needs --attention roi or regional_mask, got {attention!r}")
        unknown = sorted(set(options) - {"adapter", "stop_fraction"})
        if unknown:
            raise UsageError(f"unknown option(s) {unknown} with --instances; valid: adapter (a folder), stop_fraction")
        if attention == "roi":
            if "adapter" not in options:
                raise UsageError("--attention roi needs --option adapter=FOLDER (a saved ROICtrlAdapter)")
            if not Path(str(options["adapter"])).is_dir():
                raise UsageError(f"--option adapter={options['adapter']!r}: no such folder")
        elif "adapter" in options:
            raise UsageError("--option adapter=... needs --attention roi")
        if "stop_fraction" in options:
            sf = options["stop_fraction"]
            if isinstance(sf, bool) or not isinstance(sf, int | float) or not 0.0 < sf <= 1.0:
                raise UsageError(f"--option stop_fraction must be a number in (0, 1], got {sf!r}")
        _check_family(attention, model, geo.pipeline)
        instances = read_instances(args.instances)
    elif attention == "none":
        if options:
            raise UsageError(f"--option {sorted(options)} needs a method; --attention none takes no options")
    else:
        _method_config(attention, options)
        _check_family(attention, model, geo.pipeline)
    return {
        "model": model,
        "geometry": geo,
        "options": options,
        "preset": preset,
        "attention": attention,
        "instances": instances,
        "out": out,
        "labelled": labelled,
    }


def _check_loaded(pipe: Any, call: dict[str, Any], model: str, out: Path) -> None:
    """What only the loaded pipeline tells (a hub id or a folder of an unknown class): its frame rule."""
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or getattr(pipe, "vae_temporal_scale_factor", None)
    if isinstance(temporal, int) and "num_frames" in call:
        check_num_frames(call["num_frames"], temporal, model, "--num-frames")
    if not isinstance(temporal, int) and out.suffix.lower() in VIDEO_SUFFIXES:
        raise UsageError(f"--out must end in one of {sorted(IMAGE_SUFFIXES)} for images ({model} makes images), got {str(out)!r}")


def cmd_generate(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    import diffattn

    from .benchmark import DTYPES

    model, options, attention, out = plan["model"], plan["options"], plan["attention"], plan["out"]
    pipe = load_pipeline(model, dtype=DTYPES[args.dtype], device=args.device)
    # the source's own keywords (the zoo's tiny sizes, a testbed model's schedule); the generator comes
    # from --seed below
    call = call_kwargs(model)
    call.pop("output_type", None)
    labels: list[str] | None = None
    if model.startswith(TESTBED_PREFIX):
        from .testbed import models

        spec = models.get(model[len(TESTBED_PREFIX) :])
        if plan["labelled"]:
            # no prompt: one sample per class, written as a labelled grid
            labels = spec.captions()
            call = models.prompt_kwargs(
                call, labels, [torch.Generator(args.device).manual_seed(args.seed + i) for i in range(len(labels))]
            )
    if args.prompt is not None:
        call["prompt"] = args.prompt
    for key in ("height", "width", "num_frames"):
        if getattr(args, key) is not None:
            call[key] = getattr(args, key)
    if args.steps is not None:
        call["num_inference_steps"] = args.steps
    if "generator" not in call:
        call["generator"] = torch.Generator(args.device).manual_seed(args.seed)
    _check_loaded(pipe, call, model, out)
    if plan["instances"] is not None:  # regional control: boxes with captions (RegionalControlPipeline)
        from .pipelines import regional_control as regional

        kw = dict(options)
        if attention == "roi":
            from .models.roictrl import ROICtrlAdapter

            kw["adapter"] = ROICtrlAdapter.from_pretrained(str(kw["adapter"]))
        patch, pipe = None, regional.RegionalControlPipeline(pipe, method=attention, **kw)
        call["instances"] = plan["instances"]
    else:
        if plan["preset"] is not None:  # refused here when it was made for another model config
            patch = diffattn.apply(pipe, attention, preset=plan["preset"])
        else:
            patch = diffattn.apply(pipe, attention, **options) if attention != "none" else None
        if patch is not None:
            print(patch.headline())
    t0 = time.perf_counter()
    result = pipe(**call)
    wall = time.perf_counter() - t0
    if patch is not None:
        patch.remove()
    if labels is not None and getattr(result, "frames", None) is not None:
        from .io import save_frames

        paths = save_frames(_labelled_frames(result.frames, labels), out)
    elif labels is not None:
        from .io import save_labelled_grid

        paths = [save_labelled_grid(result.images, labels, out)]
    else:
        paths = _save_output(result, out)
    if plan["instances"] is not None:  # the first image again with its boxes drawn: OUT-boxes.png
        from PIL import Image

        from .io import save_images
        from .pipelines import regional_control as regional

        boxed = regional.draw_instances(Image.open(paths[0]), call["instances"])
        paths += save_images([boxed], out.with_name(f"{out.stem}-boxes.png"))
    print(f"attention={attention} wall_time_s={wall:.3f} out={','.join(str(p) for p in paths)}")
    return 0


# ----- bench ---------------------------------------------------------------------------------------------


def check_bench(args: argparse.Namespace) -> dict[str, Any]:
    from . import registry
    from .bench_cli import bench_stem, benchmarkable, method_options

    stem = bench_stem(args.out)
    check_int("--heads", args.heads, 1)
    check_int("--head-dim", args.head_dim, 1)
    check_int("--text", args.text, 0)
    check_int("--repeats", args.repeats, 1)
    options = _options(args.option)
    able = benchmarkable()
    names = list(args.methods) if args.methods else able
    if args.methods is not None and not args.methods:
        raise UsageError(f"--methods needs at least one method; benchmarkable: {', '.join(able)}")
    for name in names:
        if name not in able:
            try:
                registry.get(name)
            except ValueError as e:
                raise UsageError(f"--methods: {e}") from None
            raise UsageError(f"--methods: {name!r} cannot be benchmarked on a bare attention shape; benchmarkable: {', '.join(able)}")
        _method_config(name, method_options(name, options), "--methods")
    for key in options:
        prefix = key.split(".", 1)[0] if "." in key else None
        if prefix is not None and prefix not in names:
            raise UsageError(f"--option {key}: method {prefix!r} is not benchmarked here (methods: {', '.join(names)})")
    return {"stem": stem, "options": options, "methods": names, "explicit": bool(args.methods)}


def cmd_bench(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from .bench_cli import run_bench

    run_bench(
        grid=args.grid,
        heads=args.heads,
        head_dim=args.head_dim,
        n_text=args.text,
        text_position=args.text_position,
        methods=plan["methods"] if plan["explicit"] else None,
        options=plan["options"],
        out=plan["stem"],
        dtype=args.dtype,
        repeats=args.repeats,
    )
    return 0


# ----- mask ----------------------------------------------------------------------------------------------


def check_mask(args: argparse.Namespace) -> dict[str, Any]:
    from . import registry
    from .bench_cli import MAX_MASK_BLOCKS, method_options, video_mask_args

    out = check_out_file(args.out, {".png"}, "--out", "the mask image")
    check_int("--block-size", args.block_size, 1)
    if args.text is not None:
        check_int("--text", args.text, 0)
    options = _options(args.option)
    _method_config(args.method, method_options(args.method, options), "method")
    if registry.get(args.method).block_mask is None:
        masks = [m.name for m in registry.all_methods() if m.block_mask is not None]
        raise UsageError(f"method {args.method!r} builds no block mask (it is not block-sparse); methods with one: {', '.join(masks)}")
    grid, n_text, position = args.grid, args.text or 0, args.text_position or "last"
    pixels = (args.frames, args.height, args.width)
    if pixels != (None, None, None):
        from .masks.video_geometry import VIDEO_MODELS

        if None in pixels:
            raise UsageError("give --frames, --height and --width together (pixels), or --grid (tokens)")
        if args.model not in VIDEO_MODELS:
            raise UsageError(f"--model {args.model!r}: unknown video model; known: {', '.join(sorted(VIDEO_MODELS))}")
        g = VIDEO_MODELS[args.model]
        check_num_frames(args.frames, g.temporal, args.model, "--frames")
        check_size("--height", args.height, g.spatial, args.model)
        check_size("--width", args.width, g.spatial, args.model)
        grid, n_text, position, options = video_mask_args(
            args.method, args.model, args.frames, args.height, args.width, args.text, args.text_position, options
        )
    n = grid[0] * grid[1] * grid[2] + n_text
    blocks = -(-n // args.block_size)
    if blocks > MAX_MASK_BLOCKS:
        raise UsageError(
            f"--block-size {args.block_size}: {n} tokens make {blocks} blocks per side, more than the {MAX_MASK_BLOCKS} a "
            f"mask image can show; use --block-size {-(-n // MAX_MASK_BLOCKS)} or more"
        )
    return {"out": out, "grid": grid, "n_text": n_text, "position": position, "options": options}


def cmd_mask(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from .bench_cli import draw_mask, mask_summary

    grid, n_text, position, options = plan["grid"], plan["n_text"], plan["position"], plan["options"]
    summary = mask_summary(args.method, grid, n_text, position, args.block_size, options)
    path = draw_mask(
        args.method,
        grid=grid,
        n_text=n_text,
        text_position=position,
        block_size=args.block_size,
        options=options,
        out=plan["out"],
    )
    print(summary)
    print(f"wrote {path}")
    return 0


# ----- train ---------------------------------------------------------------------------------------------


def _train_parser() -> argparse.ArgumentParser:
    from .lora.cli import build_parser

    parser = build_parser("diffattn train")
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {_one_line(message)}\n")  # type: ignore[method-assign]
    return parser


def check_train(args: argparse.Namespace) -> dict[str, Any]:
    from .checks import check_train_args
    from .lora.recipes import get_recipe

    argv = (["--help"] if args.train_help else []) + args.train_args
    targs = _train_parser().parse_args(argv)
    try:
        recipe = get_recipe(targs.recipe)
    except ValueError as e:
        raise UsageError(str(e)) from None
    check_train_args(targs, recipe)
    return {"argv": argv}


def cmd_train(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    # training code (peft, accelerate loops) loads only for this subcommand; the training parser
    # lives in diffattn.lora.cli, shared with `python -m diffattn.lora`
    from .lora.cli import main as train_main

    return train_main(plan["argv"])


# ----- evaluate ------------------------------------------------------------------------------------------


def check_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    model = check_model_source(args.model)
    out = check_out_dir(args.out, "--out")
    options = _options(args.option)
    _method_config(args.method, options, "--method")
    check_int("--samples", args.samples, 1)
    check_int("--batch-size", args.batch_size, 1)
    geo = model_geometry(model)
    if args.steps is not None:
        _check_steps(args.steps, geo.min_steps, model)
    _check_seed(args.seed, args.samples)
    _check_device(args.device)
    _check_family(args.method, model, geo.pipeline)
    if args.lora is not None:
        from .testbed.evaluate import lora_weights_file

        try:
            lora_weights_file(args.lora)
        except ValueError as e:
            raise UsageError(str(e).replace("lora:", "--lora:", 1)) from None
    return {"model": model, "out": out, "options": options}


def cmd_evaluate(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from .testbed.evaluate import evaluate

    report = evaluate(
        plan["model"],
        args.method,
        options=plan["options"],
        samples=args.samples,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        out_dir=plan["out"],
        device=args.device,
        dtype=args.dtype,
        timing=args.timing,
        lora=args.lora,
    )
    acc = report.get("class_accuracy")
    extra = f" accuracy dense={acc['dense']['accuracy']} method={acc['method']['accuracy']}" if acc else ""
    fd = report.get("frechet_distance")
    if fd and fd.get("dense"):
        d, m = fd["dense"], fd["method"]
        extra += f" fd dense={d['fd']:.3f}+-{d['std']:.3f} method={m['fd']:.3f}+-{m['std']:.3f} (n={d['n']}, bootstrap std)"
    print(
        f"psnr_db={report['psnr_db']['mean']} ssim={report['ssim']['mean']} "
        f"layer_rel_error={report['layer_rel_error_mean']}{extra} out={args.out}"
    )
    return 0


# ----- calibrate -----------------------------------------------------------------------------------------


def _seed_list(text: Any, name: str) -> list[int]:
    try:
        seeds = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{name} expects comma-separated integers >= 0, got {text!r}") from None
    if not seeds or any(s < 0 or s > _MAX_SEED for s in seeds):
        raise UsageError(f"{name} expects comma-separated integers in [0, {_MAX_SEED}], got {text!r}")
    return seeds


def check_calibrate(args: argparse.Namespace) -> dict[str, Any]:
    from .calibration import DEFAULT_CANDIDATES, Quality, Speed

    model = check_model_source(args.model)
    out = check_out_file(args.out, {".json"}, "--out", "a preset (JSON)")
    report = check_out_file(args.report, {".json"}, "--report") if args.report else None
    heatmap = check_out_file(args.heatmap, IMAGE_SUFFIXES, "--heatmap") if args.heatmap else None
    if args.method not in DEFAULT_CANDIDATES:
        raise UsageError(f"--method {args.method!r} cannot be calibrated; calibrated methods: {', '.join(DEFAULT_CANDIDATES)}")
    if (args.psnr is None) == (args.speed is None):
        raise UsageError("give exactly one target: --psnr DB (quality against dense) or --speed X (attention speed-up)")
    try:
        target = Quality(psnr=args.psnr) if args.psnr is not None else Speed(x=args.speed)
    except ValueError as e:
        raise UsageError(f"--{'psnr' if args.psnr is not None else 'speed'}: {e}") from None
    prompts = args.prompt or []
    if not prompts or any(not p.strip() for p in prompts):
        raise UsageError("--prompt: give at least one non-empty prompt (repeatable)")
    seeds = _seed_list(args.seeds, "--seeds")
    held_out = _seed_list(args.held_out_seeds, "--held-out-seeds")
    if set(seeds) & set(held_out):
        raise UsageError(f"--held-out-seeds must differ from --seeds; both hold {sorted(set(seeds) & set(held_out))}")
    geo = model_geometry(model)
    if args.steps is not None:
        _check_steps(args.steps, geo.min_steps, model)
    check_int("--sample-steps", args.sample_steps, 1)
    check_int("--max-trials", args.max_trials, 1)
    candidates = []
    for text in args.candidate or []:
        options = _options([kv for kv in text.split(",") if kv])
        if not options:
            raise UsageError(f"--candidate expects KEY=VALUE[,KEY=VALUE...], got {text!r}")
        _method_config(args.method, options, "--candidate")
        candidates.append(options)
    _check_family(args.method, model, geo.pipeline)
    _check_device(args.device)
    return {"model": model, "out": out, "report": report, "heatmap": heatmap, "target": target, "prompts": prompts,
            "seeds": seeds, "held_out": held_out, "candidates": candidates or None}  # fmt: skip


def cmd_calibrate(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    import diffattn

    from .benchmark import DTYPES, write_json
    from .loading import load

    source = load(plan["model"], dtype=DTYPES[args.dtype], device=args.device)
    call = {k: v for k, v in source.call_kwargs.items() if k not in ("prompt", "num_inference_steps")}
    steps = args.steps or source.call_kwargs.get("num_inference_steps")
    try:
        result = diffattn.calibrate(
            source.pipe, args.method, plan["prompts"], target=plan["target"], seeds=plan["seeds"],
            held_out_seeds=plan["held_out"], num_inference_steps=steps, sample_steps=args.sample_steps,
            candidates=plan["candidates"], max_trials=args.max_trials, call_kwargs=call,
        )  # fmt: skip
    except diffattn.CalibrationError as e:  # the target is out of reach: say so, write nothing
        print(f"diffattn calibrate: {e}", file=sys.stderr)
        return 1
    result.preset(source.pipe).save(plan["out"])
    if plan["report"] is not None:
        write_json(plan["report"], {"model": plan["model"], **result.to_dict()})
    if plan["heatmap"] is not None:
        result.heatmap(plan["heatmap"])
    pred, meas = result.predicted, result.measured
    print(
        f"{args.method}: {sum(v != 'dense' for v in result.layers.values())}/{len(result.layers)} layers sparse; "
        f"predicted attention {pred['attention_speedup']}x"
        + (f", PSNR {pred['psnr_db']} dB on the calibration seeds" if pred["psnr_db"] is not None else "")
        + f"; measured on held-out seeds {meas['seeds']}: attention {meas['attention_speedup']}x, PSNR {meas['psnr_db']} dB; "
        f"calibration {result.seconds:.1f} s = {result.seconds / result.generation_seconds:.1f} generations; preset {plan['out']}"
    )
    return 0


# ----- testbed -------------------------------------------------------------------------------------------

# rough seconds per training step on one CPU thread (README's shipped runs), for the line printed first
_SECONDS_PER_STEP = {"digits-unet": 0.8, "digits-dit": 0.6, "digits-lamamba": 0.4, "digits-video": 1.9}
_POSITIVE_OPTIONS = ("epochs", "batch_size", "max_steps", "grad_accum", "num_images", "threads", "rank")


def _testbed_train_keys(name: str) -> set[str]:
    import dataclasses
    import inspect

    if name == "classifier":
        from .testbed.classifier import train_classifier

        params = inspect.signature(train_classifier).parameters
        return {p for p in params if p not in ("out_dir", "seed")}
    from .lora.trainer import TrainConfig
    from .testbed.training import train_model

    params = inspect.signature(train_model).parameters
    keys = {p for p, v in params.items() if v.kind is not v.VAR_KEYWORD and p not in ("name", "out", "seed")}
    return keys | {f.name for f in dataclasses.fields(TrainConfig)} - {"recipe", "model", "data", "output"}


def check_testbed(args: argparse.Namespace) -> dict[str, Any]:
    from .testbed import commands

    if args.testbed_command == "train":
        if args.name not in commands.TRAINERS:
            raise UsageError(f"unknown testbed training target {args.name!r}; valid names: {', '.join(commands.TRAINERS)}")
        _check_seed(args.seed)
        options = _options(args.option)
        if (args.resume or args.run_dir) and args.name == "classifier":
            raise UsageError("--resume / --run-dir apply to the diffusion testbed models, not the classifier")
        valid = _testbed_train_keys(args.name)
        unknown = sorted(set(options) - valid)
        if unknown:
            raise UsageError(f"unknown --option {unknown} for {args.name}; valid: {', '.join(sorted(valid))}")
        for key in _POSITIVE_OPTIONS:
            if key in options and not (key == "threads" and options[key] is None):
                check_int(f"--option {key}", options[key], 1)
        if args.out is not None:
            check_out_dir(args.out, "--out")
        if args.run_dir is not None:
            check_out_dir(args.run_dir, "--run-dir")
        return {"options": options}
    if args.testbed_command == "data":
        from .testbed.data import DATASETS, MOVING_DIGIT

        if args.name not in DATASETS:
            raise UsageError(f"unknown testbed dataset {args.name!r}; valid names: {', '.join(DATASETS)}")
        out = check_out_dir(args.out, "--out")
        if out.exists() and not args.overwrite:
            raise UsageError(f"--out {str(out)!r} exists; pass --overwrite to replace it")
        if args.count is not None:
            if args.name == "digits":
                raise UsageError("digits has a fixed size per split; --count applies to scenes, photos and moving")
            check_int("--count", args.count, 1)
        if args.frames is not None:
            if args.name != "moving":
                raise UsageError("--frames applies to the moving-digit clips only")
            check_int("--frames", args.frames, 1)
        if args.size is not None:
            smallest = {"scenes": 28, "moving": MOVING_DIGIT + 2}.get(args.name, 1)
            check_int("--size", args.size, smallest)
            if args.size > 4096:
                raise UsageError(f"--size must be at most 4096 pixels, got {args.size}")
        _check_seed(args.seed)
        return {}
    return {}


def cmd_testbed(args: argparse.Namespace, plan: dict[str, Any]) -> int:
    from .testbed import commands

    if args.testbed_command == "train":
        options = dict(plan["options"])
        if args.resume:
            options["resume"] = True
        if args.run_dir is not None:
            options["run_dir"] = args.run_dir
        print(_training_notice(args.name, options), file=sys.stderr, flush=True)
        record = commands.train(args.name, out=args.out, seed=args.seed, **options)
        shown = {k: v for k, v in record.items() if not isinstance(v, list | dict)}
        print(" ".join(f"{k}={v}" for k, v in shown.items()))
    elif args.testbed_command == "data":
        path = commands.export(
            args.name,
            args.out,
            split=args.split,
            count=args.count,
            seed=args.seed,
            size=args.size,
            frames=args.frames,
            overwrite=args.overwrite,
        )
        print(f"wrote {path}")
    else:
        print("\n".join(commands.listing()))
    return 0


def _training_notice(name: str, options: dict[str, Any]) -> str:
    """One line before a testbed training: what runs and roughly how long it takes."""
    if name == "classifier":
        return f"diffattn: training the digit classifier ({options.get('epochs', 15)} epochs, about 20 s on a CPU)"
    from .testbed.training import RECIPES

    steps = options.get("max_steps", RECIPES.get(name, {}).get("max_steps", 1000))
    minutes = steps * _SECONDS_PER_STEP.get(name, 1.0) / 60
    extra = " plus an image phase of about 20 min" if name == "digits-video" and options.get("pretrain", True) else ""
    rough = f"about {minutes:.0f} min" if minutes >= 1 else "under a minute"
    return (
        f"diffattn: training {name} from scratch: {steps} steps, {rough}{extra} on one CPU thread "
        "(checkpoints let --resume continue it)"
    )


# ----- parser --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="diffattn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the attention methods").set_defaults(fn=cmd_methods, check=check_methods)

    g = sub.add_parser("generate", help="generate with a method applied and print the wall time")
    g.add_argument("--model", default=DEFAULT_MODEL, help="testbed:NAME (default: the trained digits UNet), zoo:NAME, a local pipeline folder, or a hub id")
    g.add_argument("--attention", default=None, help="a method from `diffattn methods`, or 'none' (default: dense; regional_mask with --instances)")
    g.add_argument("--instances", default=None, metavar="BOXES.JSON", help='regional control: [{"box": [x1, y1, x2, y2], "caption": "..."}, ...] normalized; also writes OUT-boxes.png')
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    g.add_argument("--preset", default=None, metavar="FILE", help="a calibration preset (JSON file, folder or hub id): its method, options and per-layer settings; refused for another model config")
    g.add_argument("--prompt", default=None)
    g.add_argument("--height", type=int, default=None, help="pixels (a multiple of what the model needs)")
    g.add_argument("--width", type=int, default=None, help="pixels (a multiple of what the model needs)")
    g.add_argument("--num-frames", dest="num_frames", type=int, default=None, help="video models: t*k+1 frames (Wan: 4k+1)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps, >= 1 (default: the model's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--out", required=True, help="PNG/JPG for images, GIF/MP4 for videos")
    g.set_defaults(fn=cmd_generate, check=check_generate)

    b = sub.add_parser("bench", help="one attention shape: dense SDPA vs each method (JSON + PNG)")
    b.add_argument("--grid", type=_grid_arg, default=(8, 16, 16), help="FRAMES,HEIGHT,WIDTH in tokens")
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--head-dim", dest="head_dim", type=int, default=64)
    b.add_argument("--text", type=int, default=0, help="text tokens in the joint sequence")
    b.add_argument("--text-position", dest="text_position", choices=["first", "last"], default="last")
    b.add_argument("--methods", nargs="*", default=None, help="default: every method that can be benchmarked and applies to the grid")
    b.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--out", default="outputs/bench/attention", help="path stem for .json and .png")
    b.set_defaults(fn=cmd_bench, check=check_bench)

    m = sub.add_parser("mask", help="draw the block mask a method builds for a shape")
    m.add_argument("method")
    m.add_argument("--grid", type=_grid_arg, default=(8, 16, 16), help="FRAMES,HEIGHT,WIDTH in tokens")
    m.add_argument("--text", type=int, default=None, help="text tokens (default 0, or the model's with --model)")
    m.add_argument("--text-position", dest="text_position", choices=["first", "last"], default=None)
    m.add_argument("--block-size", dest="block_size", type=int, default=128)
    m.add_argument("--frames", type=int, default=None, help="video frames, pixel space (with --height and --width)")
    m.add_argument("--height", type=int, default=None, help="video height in pixels")
    m.add_argument("--width", type=int, default=None, help="video width in pixels")
    m.add_argument("--model", default="wan", help="VAE/patch factors and text layout for --frames/--height/--width")
    m.add_argument("--option", action="append", metavar="KEY=VALUE")
    m.add_argument("--out", default="mask.png", help="a .png file")
    m.set_defaults(fn=cmd_mask, check=check_mask)

    t = sub.add_parser(
        "train", help="train a LoRA: diffattn train RECIPE --model ... --data ... --output ...", add_help=False
    )
    # argparse's REMAINDER cannot start with an option, so -h/--help is forwarded by hand
    t.add_argument("-h", "--help", dest="train_help", action="store_true")
    t.add_argument("train_args", nargs=argparse.REMAINDER, help="see `diffattn train --help`")
    t.set_defaults(fn=cmd_train, check=check_train)
    e = sub.add_parser("evaluate", help="a method vs dense attention on the same seeds: JSON report + PNG grid")
    e.add_argument("--model", default="testbed:digits-unet", help="zoo:NAME, testbed:NAME or a pipeline folder")
    e.add_argument("--method", required=True, help="a method from `diffattn methods`")
    e.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    e.add_argument("--samples", type=int, default=20, help="sample i: seed+i (and class i %% 10 on digits models)")
    e.add_argument("--steps", type=int, default=None, help="default: the model's (25 for testbed models)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", dest="batch_size", type=int, default=10)
    e.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    e.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    e.add_argument("--timing", action="store_true", help="add wall times (a field that differs run to run)")
    e.add_argument("--out", default="outputs/evaluate", help="folder for report.json and grid.png")
    e.add_argument(
        "--lora", default=None, help="a LoRA trained under the method (folder or .safetensors), used for its samples only"
    )
    e.set_defaults(fn=cmd_evaluate, check=check_evaluate)

    c = sub.add_parser("calibrate", help="choose a method's setting per layer to a quality or speed target: a preset")
    c.add_argument("--model", default=DEFAULT_MODEL, help="zoo:NAME, testbed:NAME, a pipeline folder or a hub id")
    c.add_argument("--method", required=True, help="radial, hilbert_local or agent")
    c.add_argument("--prompt", action="append", help="a calibration prompt (repeatable)")
    c.add_argument("--psnr", type=float, default=None, help="target: final output within this PSNR (dB) of dense")
    c.add_argument("--speed", type=float, default=None, help="target: attention this many times faster than dense")
    c.add_argument("--seeds", default="0", help="calibration seeds, comma-separated")
    c.add_argument("--held-out-seeds", dest="held_out_seeds", default="1000", help="verification seeds, comma-separated")
    c.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    c.add_argument("--sample-steps", dest="sample_steps", type=int, default=4, help="steps the per-layer errors are measured at")
    c.add_argument("--candidate", action="append", metavar="KEY=VALUE[,KEY=VALUE]", help="a candidate setting (repeatable; default: the method's)")
    c.add_argument("--max-trials", dest="max_trials", type=int, default=3, help="end-to-end trials of a --psnr target")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    c.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    c.add_argument("--out", required=True, help="the preset (.json), for `diffattn generate --preset` / diffattn.apply(preset=...)")
    c.add_argument("--report", default=None, help="also write the per-layer tables and measurements (.json)")
    c.add_argument("--heatmap", default=None, help="also draw each layer's error per candidate (.png)")
    c.set_defaults(fn=cmd_calibrate, check=check_calibrate)

    tb = sub.add_parser("testbed", help="testbed models, classifier and data: train, data, list")
    tbs = tb.add_subparsers(dest="testbed_command", required=True)
    tt = tbs.add_parser("train", help="retrain a testbed target from scratch (seeded): classifier, digits-unet, digits-dit, digits-video, digits-lamamba")
    tt.add_argument("name")
    tt.add_argument("--out", default=None, help="default: its shipped folder inside the package")
    tt.add_argument("--seed", type=int, default=0)
    tt.add_argument(
        "--option",
        action="append",
        metavar="KEY=VALUE",
        help="trainer option, e.g. epochs=15 (classifier), max_steps=3000 batch_size=32 (diffusion models)",
    )
    tt.add_argument(
        "--run-dir", default=None, help="diffusion models: checkpoints and logs (default outputs/testbed-runs/NAME)"
    )
    tt.add_argument("--resume", action="store_true", help="diffusion models: continue from the newest checkpoint")
    tt.set_defaults(fn=cmd_testbed, check=check_testbed)
    td = tbs.add_parser(
        "data", help="export a testbed dataset (digits, scenes, photos: image folder; moving: folders of frames)"
    )
    td.add_argument("name")
    td.add_argument("--out", required=True)
    td.add_argument("--split", choices=["train", "heldout", "all"], default="train", help="digits and scenes")
    td.add_argument("--count", type=int, default=None, help="scenes / photo crops / moving clips (default 1000)")
    td.add_argument("--seed", type=int, default=0)
    td.add_argument("--size", type=int, default=None, help="digit side, scene / clip canvas or crop side in pixels")
    td.add_argument("--frames", type=int, default=None, help="moving: frames per clip (default 29)")
    td.add_argument("--overwrite", action="store_true")
    td.set_defaults(fn=cmd_testbed, check=check_testbed)
    tbs.add_parser("list", help="testbed models, classifier and datasets").set_defaults(fn=cmd_testbed, check=check_testbed)
    return p


class _Quiet(logging.Filter):
    """Drops the transformers notices about torchvision (its image processors fall back to PIL: nothing
    is wrong, and nothing the user can act on)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def _quiet() -> None:
    for name in ("transformers.utils.import_utils", "transformers.image_processing_base", "transformers"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())


_USER_ERRORS = (UsageError, ValueError, TypeError, OSError)
_WORK_ERRORS = (ValueError, OSError)


def main(argv: list[str] | None = None, validate_only: bool = False) -> int:
    """Run ``diffattn`` with ``argv``; ``validate_only``: check the arguments and stop before any loading or work.

    Returns the exit status: 0, or 2 after printing a user error on one line (argparse errors exit 2 too).
    """
    _quiet()
    args, extra = build_parser().parse_known_args(argv)
    prog = f"diffattn {args.command}" + (f" {args.testbed_command}" if args.command == "testbed" else "")
    if extra:
        print(f"{prog}: error: unrecognized arguments: {' '.join(extra)}", file=sys.stderr)
        return 2
    try:
        plan = args.check(args)
    except _USER_ERRORS as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    if validate_only:
        return 0
    try:
        return args.fn(args, plan)
    except _WORK_ERRORS as e:  # found once loaded: a method that does not fit the model, a hub id offline ...
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
