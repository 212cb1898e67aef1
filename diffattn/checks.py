"""Checks on user input that run before any model is loaded or any work starts.

The rules every entry point shares live here: frame counts (one rule for ``generate``, ``mask``,
``evaluate`` and training: a video VAE with temporal factor ``t`` takes ``t * k + 1`` frames, and any
other count is an error naming the nearest valid ones, never rounded), sizes (positive, and a
multiple of what the model needs where it is known without loading it), output paths (extension,
a writable place; nothing is created by a check), JSON inputs (the file named in every error, a bad
entry by its index) and model sources (``zoo:NAME``, ``testbed:NAME``, a folder, a hub id).

Every failure raises :class:`UsageError` (a ``ValueError``), whose message names the argument and says
what was expected; the ``diffattn`` command prints it on one line and exits with status 2.
No check loads a model or writes a file; each costs microseconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .masks.video_geometry import check_num_frames as _check_num_frames
from .masks.video_geometry import nearest_frames

__all__ = [
    "ModelGeometry",
    "UsageError",
    "check_int",
    "check_model_source",
    "check_num_frames",
    "check_out_dir",
    "check_out_file",
    "check_size",
    "model_geometry",
    "nearest_frames",
    "read_instances",
    "read_json",
]


class UsageError(ValueError):
    """A user error found before any work: the CLI prints the message on one line and exits 2."""


# ----- numbers -------------------------------------------------------------------------------------------


def check_int(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int ``>= minimum``; ``name`` is the argument as the user wrote it (``--steps``)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise UsageError(f"{name} must be an integer >= {minimum}, got {value}")
    return value


def check_num_frames(num_frames: Any, temporal: int | None, model: str = "the model", name: str = "frames") -> int:
    """The one frame-count rule (:func:`diffattn.masks.video_geometry.check_num_frames`), as a UsageError."""
    try:
        return _check_num_frames(num_frames, temporal, model, name)
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_size(name: str, value: Any, multiple: int | None = None, model: str = "the model") -> int:
    """A pixel size: an integer >= 1 and, where the model needs it, a multiple of ``multiple``."""
    check_int(name, value, 1)
    if multiple and multiple > 1 and value % multiple:
        lo = value // multiple * multiple
        near = f"{lo} or {lo + multiple}" if lo else f"{multiple}"
        raise UsageError(f"{name}: {model} needs a multiple of {multiple} pixels, got {value} (nearest: {near})")
    return value


# ----- models --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelGeometry:
    """What a model source needs, where it is known without loading it.

    Attributes:
        pipeline: the diffusers pipeline class name (``None``: unknown, e.g. a hub id).
        video: whether it makes videos (``None``: unknown).
        temporal: frames are ``temporal * k + 1`` (video models), ``None`` for images or unknown.
        multiple: height and width must be multiples of this many pixels (``None``: unknown).
        default_frames: the source's default frame count (zoo / testbed videos).
        min_steps: the fewest denoising steps its pipeline runs (2 where one step fails inside diffusers).
    """

    pipeline: str | None = None
    video: bool | None = None
    temporal: int | None = None
    multiple: int | None = None
    default_frames: int | None = None
    min_steps: int = 1


# pipeline class -> (temporal factor or None for images, pixel multiple its check_inputs asks for)
PIPELINES: dict[str, tuple[int | None, int | None]] = {
    "StableDiffusionPipeline": (None, 8),
    "StableDiffusionXLPipeline": (None, 8),
    "StableDiffusionControlNetPipeline": (None, 8),
    "StableDiffusionXLControlNetPipeline": (None, 8),
    "StableDiffusion3Pipeline": (None, None),  # VAE factor x patch size, read from the loaded model
    "PixArtAlphaPipeline": (None, 8),
    "PixArtSigmaPipeline": (None, 8),
    "FluxPipeline": (None, None),  # VAE factor x 2
    "LaMambaDiffPipeline": (None, None),
    "WanPipeline": (4, 16),
    "WanImageToVideoPipeline": (4, 16),
    "HunyuanVideoPipeline": (4, 16),
    "MochiPipeline": (6, 8),
    "CogVideoXPipeline": (4, 8),
    "LTXPipeline": (8, 32),
}

# pipelines whose stock scheduler fails with a single step (Mochi's sigma schedule divides by steps - 1,
# PixArt's DPM-Solver indexes past its one timestep)
MIN_STEPS = {"MochiPipeline": 2, "PixArtAlphaPipeline": 2, "PixArtSigmaPipeline": 2}

# zoo name -> (pipeline class, pixel multiple of the tiny model, default frames)
_ZOO: dict[str, tuple[str, int, int | None]] = {
    "sd": ("StableDiffusionPipeline", 8, None),
    "sdxl": ("StableDiffusionXLPipeline", 8, None),
    "sd3": ("StableDiffusion3Pipeline", 4, None),  # VAE x2, patch 2
    "pixart": ("PixArtAlphaPipeline", 8, None),
    "flux": ("FluxPipeline", 4, None),  # VAE x2, 2x2 packing
    "wan": ("WanPipeline", 16, 9),
    "wan-i2v": ("WanImageToVideoPipeline", 16, 9),
    "wan22": ("WanPipeline", 16, 9),
    "hunyuan-video": ("HunyuanVideoPipeline", 16, 9),
    "mochi": ("MochiPipeline", 16, 7),  # VAE x8, patch 2
    "cogvideox": ("CogVideoXPipeline", 16, 9),  # VAE x8, patch 2
    "sd-controlnet": ("StableDiffusionControlNetPipeline", 8, None),
}

# testbed name -> pixel multiple (pixel space: the pipeline's own rule, or the denoiser's packing)
_TESTBED_MULTIPLE = {"digits-unet": 8, "digits-dit": 2, "digits-video": 16, "digits-lamamba": None}


def _geometry(pipeline: str | None, multiple: int | None = None, frames: int | None = None) -> ModelGeometry:
    if pipeline is None:
        return ModelGeometry()
    temporal, base = PIPELINES.get(pipeline, (None, None))
    known = pipeline in PIPELINES
    video = (temporal is not None) if known else None
    return ModelGeometry(pipeline, video, temporal, multiple or base, frames, MIN_STEPS.get(pipeline, 1))


def check_model_source(model: Any, name: str = "--model") -> str:
    """``zoo:NAME``, ``testbed:NAME``, an existing pipeline folder or a hub id; names what is wrong."""
    from .loading import TESTBED_PREFIX, ZOO_PREFIX, is_hub_id

    if not isinstance(model, str) or not model:
        raise UsageError(f"{name} must be zoo:NAME, testbed:NAME, a pipeline folder or a hub id, got {model!r}")
    if model.startswith(ZOO_PREFIX):
        zoo = model[len(ZOO_PREFIX) :]
        if zoo not in _ZOO:
            raise UsageError(f"{name} {model!r}: unknown zoo pipeline {zoo!r}; valid names: {', '.join(_ZOO)}")
        return model
    if model.startswith(TESTBED_PREFIX):
        tb = model[len(TESTBED_PREFIX) :]
        if tb not in _TESTBED_MULTIPLE:
            raise UsageError(
                f"{name} {model!r}: unknown testbed model {tb!r}; valid names: {', '.join(_TESTBED_MULTIPLE)}"
            )
        return model
    path = Path(model)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UsageError(f"{name} {model!r}: the folder holds no model_index.json (not a saved pipeline)")
        return model
    if path.exists():
        raise UsageError(f"{name} {model!r} is a file; expected a pipeline folder (with model_index.json)")
    if not is_hub_id(model):
        raise UsageError(
            f"{name} {model!r} is not zoo:NAME, testbed:NAME, an existing pipeline folder or a hub id (OWNER/NAME)"
        )
    return model


def model_geometry(model: str) -> ModelGeometry:
    """What ``model`` needs (frames, size multiple), from its name or its folder's ``model_index.json``."""
    from .loading import TESTBED_PREFIX, ZOO_PREFIX

    if model.startswith(ZOO_PREFIX):
        pipeline, multiple, frames = _ZOO[model[len(ZOO_PREFIX) :]]
        return _geometry(pipeline, multiple, frames)
    if model.startswith(TESTBED_PREFIX):
        tb = model[len(TESTBED_PREFIX) :]
        from .testbed.models import get

        spec = get(tb)
        return _geometry(spec.pipeline_class, _TESTBED_MULTIPLE.get(tb), spec.call_kwargs.get("num_frames"))
    index = Path(model) / "model_index.json"
    if index.is_file():
        data = read_json(index, "--model")
        pipeline = data.get("_class_name") if isinstance(data, dict) else None
        return _geometry(pipeline if isinstance(pipeline, str) else None)
    return ModelGeometry()


# ----- files ---------------------------------------------------------------------------------------------


def _writable_place(path: Path, name: str) -> None:
    """Raise unless ``path`` could be created: its nearest existing ancestor is a writable folder."""
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{name} {str(path)!r}: {str(parent)!r} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{name} {str(path)!r}: cannot write in {str(parent)!r} (permission denied)")


def check_out_file(path: Any, suffixes: set[str] | list[str], name: str = "--out", what: str = "") -> Path:
    """An output file: one of ``suffixes`` (lowercase, with the dot), not a folder, in a writable place.

    Nothing is created; the caller writes atomically later.
    """
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise UsageError(f"{name} must be a file path, got {path!r}")
    p = Path(path)
    allowed = sorted(suffixes)
    if p.suffix.lower() not in suffixes:
        for_what = f" for {what}" if what else ""
        raise UsageError(f"{name} must end in {' or '.join(allowed)}{for_what}, got {str(p)!r}")
    if p.is_dir():
        raise UsageError(f"{name} {str(p)!r} is a folder; give a file name ending in {' or '.join(allowed)}")
    _writable_place(p, name)
    return p


def check_out_dir(path: Any, name: str = "--out", empty: bool = False) -> Path:
    """An output folder: not a file, in a writable place; ``empty``: must not exist or be empty."""
    if not isinstance(path, str | os.PathLike) or not str(path):
        raise UsageError(f"{name} must be a folder path, got {path!r}")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{name} {str(p)!r} is a file; expected a folder")
    if empty and p.is_dir() and any(p.iterdir()):
        raise UsageError(f"{name} {str(p)!r} exists and is not empty (pass --overwrite to replace it)")
    _writable_place(p / "x", name)
    return p


def read_json(path: Any, name: str) -> Any:
    """The JSON in ``path``; a missing file or broken JSON names the file (and the line and column)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{name} {str(p)!r}: no such file" if not p.exists() else f"{name} {str(p)!r} is not a file")
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{name} {str(p)!r}: cannot read it ({e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"{name} {str(p)!r} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None


def read_instances(path: Any, name: str = "--instances") -> list[dict[str, Any]]:
    """Regional-control instances from a JSON file: ``[{"box": [x1, y1, x2, y2], "caption": "..."}, ...]`` or
    ``{"instances": [...]}``, validated; errors name the file and the entry's index."""
    from .pipelines.regional_control import parse_instances

    data = read_json(path, name)
    if isinstance(data, dict) and "instances" in data:
        data = data["instances"]
    if not isinstance(data, list | dict):
        raise UsageError(
            f"{name} {str(path)!r}: expected a list of {{\"box\": [x1, y1, x2, y2], \"caption\": ...}}, "
            f"got {type(data).__name__}"
        )
    entries = data if isinstance(data, list) else data.get("boxes", [])
    if not isinstance(entries, list):
        raise UsageError(f"{name} {str(path)!r}: 'boxes' must be a list, got {type(entries).__name__}")
    for i, inst in enumerate(entries):
        box = inst.get("box") if isinstance(inst, dict) else inst if isinstance(data, dict) else None
        if isinstance(data, list) and not (isinstance(inst, dict) and "box" in inst and "caption" in inst):
            raise UsageError(f"{name} {str(path)!r}: entry {i}: expected an object with 'box' and 'caption', got {inst!r}")
        numbers = isinstance(box, list) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in box)
        if not numbers or len(box) != 4:
            raise UsageError(f"{name} {str(path)!r}: entry {i}: box must be 4 numbers [x1, y1, x2, y2], got {box!r}")
    try:
        boxes, captions = parse_instances(data)
    except (ValueError, TypeError) as e:
        raise UsageError(f"{name} {str(path)!r}: {e}") from None
    if not boxes:
        raise UsageError(f"{name} {str(path)!r} holds no instances")
    return [{"box": b, "caption": c} for b, c in zip(boxes, captions)]


# ----- training ------------------------------------------------------------------------------------------


def _number(name: str, value: Any, lo: float | None = None, hi: float | None = None, hi_open: bool = False) -> None:
    if value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, int | float) and value == value
    ok = ok and (lo is None or value >= lo) and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        rng = f"[{lo}, {hi}{')' if hi_open else ']'}" if hi is not None else f">= {lo}"
        raise UsageError(f"{name} must be a number in {rng}, got {value!r}" if hi is not None else f"{name} must be {rng}, got {value!r}")


def check_train_args(args: Any, recipe: Any) -> None:
    """The checks of ``diffattn train`` (and ``python -m diffattn.lora``) on its parsed arguments, before
    any data or model is read: numbers, the model source, the data path, the output folder, the frame
    count against the model's rule (the recipe's default included), the method and its options.

    ``recipe``: the :class:`~diffattn.lora.recipes.Recipe` named by ``args.recipe`` (its defaults and
    attention method).
    """
    from . import registry

    for name in ("max_steps", "batch_size", "grad_accum", "rank", "log_every"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    for name in ("lr_warmup_steps", "checkpoint_every", "validation_every", "eval_samples", "num_workers", "seed"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), 0)
    for name in ("checkpoints_total_limit", "validation_inference_steps", "max_sequence_length"):
        if getattr(args, name) is not None:
            check_int(f"--{name.replace('_', '-')}", getattr(args, name), 1)
    _number("--learning-rate", args.learning_rate, 0.0)
    if not args.learning_rate > 0:
        raise UsageError(f"--learning-rate must be > 0, got {args.learning_rate}")
    _number("--weight-decay", args.weight_decay, 0.0)
    _number("--max-grad-norm", args.max_grad_norm, 0.0)
    _number("--caption-dropout", args.caption_dropout, 0.0, 1.0)
    _number("--lora-dropout", args.lora_dropout, 0.0, 1.0, hi_open=True)
    _number("--ema-decay", args.ema_decay, 0.0, 1.0, hi_open=True)
    if args.lora_alpha is not None:
        _number("--lora-alpha", args.lora_alpha, 0.0)
    if args.fps is not None and not (isinstance(args.fps, int | float) and args.fps > 0):
        raise UsageError(f"--fps must be > 0, got {args.fps}")
    _number("--logit-std", args.logit_std, 0.0)
    model = check_model_source(args.model)
    geo = model_geometry(model)
    if not Path(args.data).exists():
        raise UsageError(f"--data {args.data!r}: no such data folder (or boxes .jsonl file)")
    check_out_dir(args.output, "--output")
    defaults = dict(getattr(recipe, "defaults", {}) or {})
    resolution = args.resolution if args.resolution is not None else defaults.get("resolution")
    if resolution is not None:
        given = "--resolution" if args.resolution is not None else f"--resolution (the {args.recipe} recipe's default)"
        check_size(given, resolution, geo.multiple, model)
    frames = args.num_frames if args.num_frames is not None else defaults.get("num_frames")
    if frames is not None and (args.num_frames is not None or geo.video):
        given = "--num-frames" if args.num_frames is not None else f"--num-frames (the {args.recipe} recipe's default)"
        if geo.video is False:
            raise UsageError(f"--num-frames applies to video models; {model} makes images")
        check_num_frames(frames, geo.temporal, model, given)
    if args.resume is not None and args.resume != "latest" and not Path(args.resume).is_dir():
        raise UsageError(f"--resume {args.resume!r}: expected 'latest' or a checkpoint folder (no such folder)")
    attention, options = args.attention, {}
    from .loading import parse_options

    try:
        options = parse_options(args.option)
    except ValueError as e:
        raise UsageError(str(e)) from None
    recipe_attention = getattr(recipe, "attention", None)
    if attention is None and recipe_attention:
        attention, options = recipe_attention[0], {**recipe_attention[1], **options}
    if attention in (None, "none"):
        if args.option:
            raise UsageError("--option sets attention method options; give --attention METHOD (the recipe has none)")
        return
    try:
        method = registry.get(attention)
    except ValueError as e:
        raise UsageError(f"--attention: {e}") from None
    try:
        method.build_config(options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"--attention {attention}: {e}") from None
