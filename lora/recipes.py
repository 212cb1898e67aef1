"""Recipes: small declarations of what trains, which attention is applied while training, what data.

The built-in recipes are registered here and nowhere else: the plain ones below, and the method recipes
that live in modules of their own (``recipe_high_res``, ``recipe_roictrl``, ``recipe_lamamba``), which only
define their :class:`~diffattn.lora.recipe.Recipe`. A third-party recipe calls :func:`register_recipe`;
the trainer and the command need no change. Command-line options override a recipe's defaults.
"""

from __future__ import annotations

from . import recipe_high_res, recipe_lamamba, recipe_roictrl
from .recipe import Recipe

_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    """Add a recipe; a second recipe with the same name is an error."""
    if recipe.name in _RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    """The registered recipe ``name``; ``ValueError`` listing the valid ones otherwise."""
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
# the method recipes, defined in modules of their own
for _recipe in (
    recipe_high_res.RECIPE,
    recipe_lamamba.RECIPE,
    recipe_lamamba.TEXT_RECIPE,
    recipe_roictrl.RECIPE,
):
    register_recipe(_recipe)
