"""``digits-lamamba`` shortcuts; the model is a regular testbed model now.

Its definition is :func:`diffattn.testbed.models.build_digits_lamamba` (registry name
``digits-lamamba``) and it trains like the others, through :func:`diffattn.testbed.training.train_model`
(recipe ``lamamba``; settings in ``training.RECIPES["digits-lamamba"]``):
``diffattn testbed train digits-lamamba``.
"""

from __future__ import annotations

import os
from typing import Any

NAME = "digits-lamamba"


def build(seed: int = 0, **model_options: Any) -> Any:
    """The untrained pipeline (``models.build("digits-lamamba", seed, **model_options)``)."""
    from .models import build as build_model

    return build_model(NAME, seed=seed, **model_options)


def train(out: str | os.PathLike | None = None, seed: int = 0, **options: Any) -> dict[str, Any]:
    """``training.train_model("digits-lamamba", out, seed, **options)``: default ``out`` is the shipped folder."""
    from .training import train_model

    return train_model(NAME, out, seed=seed, **options)
