"""The ``diffattn`` command: methods, generate, bench, mask."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .loading import DEFAULT_MODEL, TESTBED_PREFIX, ZOO_PREFIX, load_pipeline, parse_options


def _grid_arg(s: str) -> tuple[int, int, int]:
    parts = [int(p) for p in s.lower().replace("x", ",").split(",") if p]
    if len(parts) == 2:
        parts = [1, *parts]
    if len(parts) != 3 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"grid must be FRAMES,HEIGHT,WIDTH or HEIGHT,WIDTH tokens, got {s!r}")
    return tuple(parts)  # type: ignore[return-value]


def _save_output(out: Any, path: Path) -> list[Path]:
    """Write images (PNG/JPG, several -> numbered) or frames (GIF/MP4) atomically; returns the paths."""
    from .io import save_frames, save_images

    frames = getattr(out, "frames", None)
    if frames is not None:
        return save_frames(frames[0], path)
    return save_images(out.images, path)


def cmd_methods(args: argparse.Namespace) -> int:
    from . import registry

    for m in registry.all_methods():
        print(f"{m.name:16s} {m.description}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import diffattn

    from .benchmark import DTYPES

    options = parse_options(args.option)
    dtype = DTYPES[args.dtype]
    pipe = load_pipeline(args.model, dtype=dtype, device=args.device)
    call: dict[str, Any] = {}
    if args.model.startswith(ZOO_PREFIX):
        from . import zoo

        call.update(zoo.default_call_kwargs(args.model[len(ZOO_PREFIX) :]))
        call.pop("output_type", None)
    labels: list[str] | None = None
    if args.model.startswith(TESTBED_PREFIX):
        from .testbed import models

        spec = models.get(args.model[len(TESTBED_PREFIX) :])
        call.update(spec.call_kwargs)
        call.pop("output_type", None)
        if args.prompt is None and spec.num_classes:
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
    attention = args.attention or ("regional_mask" if args.instances else "dense")
    if args.instances:  # regional control: boxes with captions (diffattn.pipelines.RegionalControlPipeline)
        regional = _regional_pipeline(pipe, attention, options)
        instances = regional.load_instances(args.instances)
        patch, pipe = None, regional.RegionalControlPipeline(pipe, **options)
        call["instances"] = instances
    else:
        patch = diffattn.apply(pipe, attention, **options) if attention != "none" else None
    t0 = time.perf_counter()
    out = pipe(**call)
    wall = time.perf_counter() - t0
    if patch is not None:
        patch.remove()
    if labels is not None:
        from .io import save_labelled_grid

        paths = [save_labelled_grid(out.images, labels, Path(args.out))]
    else:
        paths = _save_output(out, Path(args.out))
    if args.instances:  # the first image again with its boxes drawn: OUT-boxes.png
        from PIL import Image

        from .io import save_images

        boxed = regional.draw_instances(Image.open(paths[0]), call["instances"])
        stem = Path(args.out)
        paths += save_images([boxed], stem.with_name(f"{stem.stem}-boxes.png"))
    print(f"attention={attention} wall_time_s={wall:.3f} out={','.join(str(p) for p in paths)}")
    return 0


def _regional_pipeline(pipe: Any, attention: str, options: dict[str, Any]) -> Any:
    """Check ``--instances`` options; ``options`` becomes RegionalControlPipeline's keyword arguments."""
    from .pipelines import regional_control

    if attention not in ("roi", "regional_mask"):
        raise SystemExit(f"--instances needs --attention roi or regional_mask, got {attention!r}")
    unknown = sorted(set(options) - {"adapter", "stop_fraction"})
    if unknown:
        raise SystemExit(f"unknown option(s) {unknown} with --instances; valid: adapter (a folder), stop_fraction")
    if attention == "roi":
        if "adapter" not in options:
            raise SystemExit("--attention roi needs --option adapter=FOLDER (a saved ROICtrlAdapter)")
        from .models.roictrl import ROICtrlAdapter

        options["adapter"] = ROICtrlAdapter.from_pretrained(str(options["adapter"]))
    elif "adapter" in options:
        raise SystemExit("--option adapter=... needs --attention roi")
    options["method"] = attention
    return regional_control


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench_cli import run_bench

    run_bench(
        grid=args.grid,
        heads=args.heads,
        head_dim=args.head_dim,
        n_text=args.text,
        text_position=args.text_position,
        methods=args.methods,
        options=parse_options(args.option),
        out=Path(args.out),
        dtype=args.dtype,
        repeats=args.repeats,
    )
    return 0


def cmd_mask(args: argparse.Namespace) -> int:
    from .bench_cli import draw_mask, mask_summary, video_mask_args

    grid, n_text, position = args.grid, args.text or 0, args.text_position or "last"
    options = parse_options(args.option)
    if (args.frames, args.height, args.width) != (None, None, None):
        # a pixel video size: tokens by the model's VAE and patchify factors, its text, its defaults
        grid, n_text, position, options = video_mask_args(
            args.method, args.model, args.frames, args.height, args.width, args.text, args.text_position, options
        )
    path = draw_mask(
        args.method,
        grid=grid,
        n_text=n_text,
        text_position=position,
        block_size=args.block_size,
        options=options,
        out=Path(args.out),
    )
    print(mask_summary(args.method, grid, n_text, position, args.block_size, options))
    print(f"wrote {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    # training code (peft, accelerate loops) loads only for this subcommand; the training parser
    # lives in diffattn.lora.cli, shared with `python -m diffattn.lora`
    from .lora.cli import main as train_main

    return train_main((["--help"] if args.train_help else []) + args.train_args)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .testbed.evaluate import evaluate

    report = evaluate(
        args.model,
        args.method,
        options=parse_options(args.option),
        samples=args.samples,
        steps=args.steps,
        seed=args.seed,
        batch_size=args.batch_size,
        out_dir=Path(args.out),
        device=args.device,
        dtype=args.dtype,
        timing=args.timing,
    )
    acc = report.get("class_accuracy")
    extra = f" accuracy dense={acc['dense']['accuracy']} method={acc['method']['accuracy']}" if acc else ""
    print(
        f"psnr_db={report['psnr_db']['mean']} ssim={report['ssim']['mean']} "
        f"layer_rel_error={report['layer_rel_error_mean']}{extra} out={args.out}"
    )
    return 0


def cmd_testbed(args: argparse.Namespace) -> int:
    from .testbed import commands

    if args.testbed_command == "train":
        options = parse_options(args.option)
        if args.resume:
            options["resume"] = True
        if args.run_dir is not None:
            options["run_dir"] = args.run_dir
        if (args.resume or args.run_dir) and args.name == "classifier":
            raise SystemExit("--resume / --run-dir apply to the diffusion testbed models, not the classifier")
        record = commands.train(args.name, out=args.out, seed=args.seed, **options)
        shown = {k: v for k, v in record.items() if not isinstance(v, (list, dict))}
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="diffattn", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("methods", help="list the attention methods").set_defaults(fn=cmd_methods)

    g = sub.add_parser("generate", help="generate with a method applied and print the wall time")
    g.add_argument("--model", default=DEFAULT_MODEL, help="testbed:NAME (default: the trained digits UNet), zoo:NAME, a local pipeline folder, or a hub id")
    g.add_argument("--attention", default=None, help="a method from `diffattn methods`, or 'none' (default: dense; regional_mask with --instances)")
    g.add_argument("--instances", default=None, metavar="BOXES.JSON", help='regional control: [{"box": [x1, y1, x2, y2], "caption": "..."}, ...] normalized; also writes OUT-boxes.png')
    g.add_argument("--option", action="append", metavar="KEY=VALUE", help="method option (repeatable)")
    g.add_argument("--prompt", default=None)
    g.add_argument("--height", type=int, default=None)
    g.add_argument("--width", type=int, default=None)
    g.add_argument("--num-frames", dest="num_frames", type=int, default=None)
    g.add_argument("--steps", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g.add_argument("--out", required=True, help="PNG/JPG for images, GIF/MP4 for videos")
    g.set_defaults(fn=cmd_generate)

    b = sub.add_parser("bench", help="one attention shape: dense SDPA vs each method (JSON + PNG)")
    b.add_argument("--grid", type=_grid_arg, default=(8, 16, 16), help="FRAMES,HEIGHT,WIDTH in tokens")
    b.add_argument("--heads", type=int, default=4)
    b.add_argument("--head-dim", dest="head_dim", type=int, default=64)
    b.add_argument("--text", type=int, default=0, help="text tokens in the joint sequence")
    b.add_argument("--text-position", dest="text_position", choices=["first", "last"], default="last")
    b.add_argument("--methods", nargs="*", default=None, help="default: every method that can be benchmarked")
    b.add_argument("--option", action="append", metavar="METHOD.KEY=VALUE")
    b.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--out", default="outputs/bench/attention", help="path stem for .json and .png")
    b.set_defaults(fn=cmd_bench)

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
    m.add_argument("--out", default="mask.png")
    m.set_defaults(fn=cmd_mask)

    t = sub.add_parser(
        "train", help="train a LoRA: diffattn train RECIPE --model ... --data ... --output ...", add_help=False
    )
    # argparse's REMAINDER cannot start with an option, so -h/--help is forwarded by hand
    t.add_argument("-h", "--help", dest="train_help", action="store_true")
    t.add_argument("train_args", nargs=argparse.REMAINDER, help="see `diffattn train --help`")
    t.set_defaults(fn=cmd_train)
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
    e.set_defaults(fn=cmd_evaluate)

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
    tt.set_defaults(fn=cmd_testbed)
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
    td.set_defaults(fn=cmd_testbed)
    tbs.add_parser("list", help="testbed models, classifier and datasets").set_defaults(fn=cmd_testbed)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as e:
        print(f"diffattn {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
