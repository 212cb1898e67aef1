"""The recipe contract: a small declaration of what trains, which attention is applied while training,
and on what data. :mod:`diffattn.lora.recipes` holds the registry and the built-in recipes."""

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
        attach: optional ``(pipe, output folder) -> None`` run by :func:`diffattn.lora.load` before it copies
            the extra modules' weights: rebuilds on a freshly loaded pipeline the modules ``prepare`` added
            (from what the run wrote), so the weights have somewhere to go.
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
    attach: Callable[[Any, Any], None] | None = None
