"""Recipes: small declarations of what trains, which attention is applied while training, what data.

A method issue adds its recipe with :func:`register_recipe` (``long-video``, ``high-res``,
``roictrl``, ``lamamba``); the trainer and the command need no change.  Command-line options override
a recipe's defaults.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """One way of training.

    Attributes:
        name: what ``diffattn train NAME`` takes.
        description: one line for ``--help``.
        data: dataset kind, "image", "video" or "boxes" (see :mod:`diffattn.lora.data`).
        lora_targets: module names LoRA wraps in the denoiser; empty: no LoRA (only ``train_modules``).
        train_modules: denoiser submodules trained in full, saved in ``extra_modules.safetensors``.
        attention: ``(method, options)`` set with ``diffattn.apply`` while training (and for validation
            samples), or ``None`` for the model's own attention.
        defaults: defaults for :class:`~diffattn.lora.trainer.TrainConfig` fields (resolution, frames ...).
        prepare: optional ``(pipe, config) -> None`` run after loading, before LoRA is added (adds new
            modules such as an adapter branch, initialised under the run's seed).  Everything is frozen
            afterwards; name a new module in ``train_modules`` to train it and save it.
        condition: optional ``(trainer, batch, cond) -> cond`` run for every micro-batch after the
            captions are encoded: adds what the recipe's data carries (boxes, region captions) to the
            conditioning; ``cond["model_kwargs"]`` goes to the denoiser call.
        lr_scale: optional ``(parameter name, config) -> factor``: the learning rate of that trainable
            parameter is ``--learning-rate`` times the factor (the LR schedule scales every group alike).
            For zero-initialised scalar gates, which Adam moves by at most about one learning rate per
            step: at an adapter's learning rate they cannot leave zero within a short run.
    """

    name: str
    description: str
    data: str = "image"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    train_modules: tuple[str, ...] = ()
    attention: tuple[str, dict[str, Any]] | None = None
    defaults: dict[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any, Any], None] | None = None
    condition: Callable[[Any, dict[str, Any], dict[str, Any]], dict[str, Any]] | None = None
    lr_scale: Callable[[str, Any], float] | None = None


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe; a second recipe with the same name is an error."""
    if recipe.name in _RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    if name not in _RECIPES:
        raise ValueError(f"unknown recipe {name!r}; valid recipes: {', '.join(_RECIPES)}")
    return _RECIPES[name]


def recipe_names() -> list[str]:
    """Names of the registered recipes."""
    return list(_RECIPES)


register_recipe(
    Recipe(
        name="image",
        description="plain LoRA fine-tuning of an image model on a folder of captioned images (the baseline)",
        data="image",
        defaults={"resolution": 512},
    )
)
register_recipe(
    Recipe(
        name="video",
        description="plain LoRA fine-tuning of a video model on a folder of captioned clips (the baseline)",
        data="video",
        defaults={"resolution": 256, "num_frames": 17},
    )
)
register_recipe(
    Recipe(
        name="long-video",
        description="LoRA length extension: radial attention (O(n log n)) active while training on longer clips",
        data="video",
        attention=("radial", {}),  # --option decay_factor=... / block_size=... / sink=...
        defaults={"resolution": 256, "num_frames": 69},
    )
)
register_recipe(
    Recipe(
        name="full",
        description="train every parameter of the denoiser (full fine-tuning, or from scratch); saves the whole pipeline",
        data="image",
        lora_targets=(),
        train_modules=("*",),
        defaults={"resolution": 512, "save_pipeline": True},
    )
)
register_recipe(
    Recipe(
        name="full-video",
        description="train every parameter of a video denoiser (full fine-tuning, or from scratch); saves the whole pipeline",
        data="video",
        lora_targets=(),
        train_modules=("*",),
        defaults={"resolution": 256, "num_frames": 17, "save_pipeline": True},
    )
)
# the recipes defined in modules of their own register themselves on import. Module imports, not name
# imports: a user who imports one of them first (``from diffattn.lora.recipe_roictrl import load_adapter``)
# gets here while that module is still half-initialised, and only ``from . import module`` accepts that.
from . import recipe_high_res, recipe_lamamba, recipe_roictrl  # noqa: E402, F401
