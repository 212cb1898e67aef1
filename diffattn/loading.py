"""Model sources: ``zoo:NAME``, ``testbed:NAME``, a local pipeline folder or a hub id; the option parser.

The one place that turns a ``--model`` string into a pipeline and the call keywords that suit it; the
CLI, the trainer, the evaluator and the examples all load models here.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_MODEL",
    "TESTBED_PREFIX",
    "ZOO_PREFIX",
    "ModelSource",
    "call_kwargs",
    "is_hub_id",
    "load",
    "load_pipeline",
    "parse_options",
    "testbed_name",
    "zoo_name",
]

ZOO_PREFIX = "zoo:"
TESTBED_PREFIX = "testbed:"
# the digits UNet trained here and shipped with the package (see `diffattn testbed list`)
DEFAULT_MODEL = "testbed:digits-unet"


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["decay_factor=0.2", "dense_timesteps=12"]`` -> ``{"decay_factor": 0.2, "dense_timesteps": 12}``.

    Values are Python literals where they parse as one, else plain strings.

    Raises:
        ValueError: an entry without ``=``.
    """
    options: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ValueError(f"--option expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        try:
            options[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            options[key.strip()] = raw
    return options


@dataclass
class ModelSource:
    """A loaded pipeline and how to call it.

    Attributes:
        pipe: the diffusers pipeline.
        call_kwargs: keywords that suit the source (the zoo's tiny sizes, a testbed model's schedule),
            without ``prompt`` and ``generator``.
        prompt: the source's one default prompt (``None`` for class-conditional testbed models).
        num_classes: > 0 for a digits model, whose prompts are class captions.
    """

    pipe: Any
    call_kwargs: dict[str, Any]
    prompt: str | None
    num_classes: int


def zoo_name(model: str) -> str | None:
    """``"zoo:sd"`` -> ``"sd"``; ``None`` when ``model`` is not a zoo source."""
    return model[len(ZOO_PREFIX) :] if model.startswith(ZOO_PREFIX) else None


def testbed_name(model: str) -> str | None:
    """``"testbed:digits-unet"`` -> ``"digits-unet"``; ``None`` when ``model`` is not a testbed source."""
    return model[len(TESTBED_PREFIX) :] if model.startswith(TESTBED_PREFIX) else None


def is_hub_id(model: str) -> bool:
    """``OWNER/NAME`` that is not a local path: what ``from_pretrained`` would look up on the hub."""
    parts = model.split("/")
    return len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not Path(model).exists()


def call_kwargs(model: str) -> dict[str, Any]:
    """The call keywords that suit ``model`` (a fresh dict; no ``generator``): the zoo's tiny sizes and
    steps, a testbed model's schedule, nothing for a folder or hub id."""
    if (name := zoo_name(model)) is not None:
        from . import zoo

        kw = zoo.default_call_kwargs(name)
        kw.pop("generator", None)
        return kw
    if (name := testbed_name(model)) is not None:
        from .testbed import models

        return dict(models.get(name).call_kwargs)
    return {}


def load(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> ModelSource:
    """Load ``model`` (``zoo:NAME``, ``testbed:NAME``, a pipeline folder or a hub id).

    A folder written by ``diffattn testbed train`` (it holds ``testbed.json``) keeps its call keywords and
    classes; any other folder or a hub id loads with ``DiffusionPipeline.from_pretrained``.
    """
    kw = call_kwargs(model)
    if (name := zoo_name(model)) is not None:
        from . import zoo

        pipe = zoo.load(name, dtype=dtype).to(device)
        return ModelSource(pipe, kw, kw.pop("prompt", ""), 0)
    if (name := testbed_name(model)) is not None:
        from .testbed import models

        spec = models.get(name)
        return ModelSource(models.load(name, dtype=dtype, device=device), kw, None, spec.num_classes)
    folder = Path(model)
    if folder.is_dir():
        from .testbed import models

        info = models.read_info(folder)
        if info is not None:
            pipe = models.load_folder(folder, dtype=dtype, device=device)
            return ModelSource(pipe, dict(info.get("call_kwargs", {})), None, len(info.get("captions", [])))
    elif not is_hub_id(model):
        raise FileNotFoundError(
            f"--model {model!r} is not zoo:NAME, testbed:NAME, an existing pipeline folder or a hub id (OWNER/NAME)"
        )
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return ModelSource(pipe.to(device), {}, "", 0)


def load_pipeline(model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Any:
    """The pipeline of :func:`load`."""
    return load(model, dtype=dtype, device=device).pipe
