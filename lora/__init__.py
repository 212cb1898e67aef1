"""LoRA and adapter training on accelerate + peft (``diffattn train``; see README "Training").

Imports are lazy so ``import diffattn.lora`` stays cheap::

    from diffattn.lora import TrainConfig, train, load
    train(TrainConfig(recipe="image", model="zoo:sd", data="pics/", output="out/", max_steps=200))
    load(pipe, "out/")   # LoRA via pipe.load_lora_weights + extra modules
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "TrainConfig": "trainer",
    "TrainResult": "trainer",
    "Trainer": "trainer",
    "train": "trainer",
    "Recipe": "recipe",
    "register_recipe": "recipes",
    "get_recipe": "recipes",
    "recipe_names": "recipes",
    "load": "adapters",
    "load_extra_modules": "adapters",
    "DataError": "data",
    "ImageFolder": "data",
    "VideoFolder": "data",
    "BoxesJsonl": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
