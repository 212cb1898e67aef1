"""peft LoRA on a denoiser, extra trainable modules, and saving both.

The LoRA is saved in the diffusers format (``pytorch_lora_weights.safetensors`` with the adapter
config in its metadata), so ``pipe.load_lora_weights(path)`` loads it into a stock pipeline.  Modules
trained in full (adapters, new branches, a ``conv_in``) go beside it in ``extra_modules.safetensors``
and are loaded by :func:`load_extra_modules` (or :func:`load`, which does both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

LORA_FILE = "pytorch_lora_weights.safetensors"
EXTRA_FILE = "extra_modules.safetensors"
_LORA_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _matches(name: str, target: str) -> bool:
    """peft's rule for a string target: the full module name or a suffix at a '.' boundary."""
    return name == target or name.endswith("." + target)


def lora_candidates(model: nn.Module) -> list[str]:
    """Short names of the layers LoRA can wrap (``to_q``, ``to_out.0``, ``proj_in`` ...), sorted."""
    short = set()
    for name, module in model.named_modules():
        if isinstance(module, _LORA_TYPES) and name:
            parts = name.split(".")
            short.add(".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1])
    return sorted(short)


def check_targets(model: nn.Module, targets: list[str], option: str = "--lora-targets") -> None:
    """Raise ``ValueError`` naming any target no LoRA-capable layer matches, with the candidates."""
    names = [n for n, m in model.named_modules() if isinstance(m, _LORA_TYPES)]
    missing = [t for t in targets if not any(_matches(n, t) for n in names)]
    if missing:
        raise ValueError(
            f"{option}: no layer of {type(model).__name__} matches {missing}; candidate modules: "
            f"{', '.join(lora_candidates(model))} (or any full module name)"
        )


def lora_alpha(rank: int, alpha: float | None = None) -> float:
    """The LoRA scaling numerator: ``alpha`` as given, else the rank (scale ``alpha / rank`` = 1).

    The one rule for the default, used by :func:`add_lora`, the checkpoint identity and the model card.
    """
    return rank if alpha is None else alpha


def add_lora(
    model: nn.Module,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    init: str | bool = True,
    targets: list[str] | None = None,
) -> None:
    """Inject a peft LoRA adapter named "default" (frozen base, trainable A/B) into a diffusers model."""
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"--rank must be >= 1, got {rank}")
    if not hasattr(model, "add_adapter"):
        raise ValueError(
            f"{type(model).__name__} has no peft adapter support in diffusers, so its LoRA could not be loaded with load_lora_weights"
        )
    targets = list(targets or ["to_q", "to_k", "to_v", "to_out.0"])
    check_targets(model, targets)
    model.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=lora_alpha(rank, alpha),
        lora_dropout=dropout,
        init_lora_weights=init,
        target_modules=targets,
    )
    model.add_adapter(config)


def mark_extra_trainable(model: nn.Module, names: list[str], option: str = "--train-modules") -> list[str]:
    """Unfreeze whole submodules by name (exact or '.'-suffix); returns the trainable parameter names.

    The name ``"*"`` is the whole model: every parameter trains (full fine-tuning, or training a model
    from scratch).
    """
    modules = dict(model.named_modules())
    params: list[str] = []
    for target in names:
        if target == "*":
            for pname, p in model.named_parameters():
                if "lora_" not in pname:
                    p.requires_grad_(True)
                    params.append(pname)
            continue
        hits = [n for n in modules if n and _matches(n, target)]
        if not hits:
            children = ", ".join(n for n, _ in model.named_children())
            raise ValueError(
                f"{option}: {type(model).__name__} has no module {target!r}; top-level modules: {children}"
            )
        for hit in hits:
            for pname, p in modules[hit].named_parameters(prefix=hit):
                if "lora_" not in pname:
                    p.requires_grad_(True)
                    params.append(pname)
    return sorted(set(params))


def lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The adapter's weights with peft keys (``...to_q.lora_A.weight``), which every diffusers loader reads.

    ``state``: the model's (trainable) tensors by parameter name, when they are not the model's own
    (gathered from FSDP shards). Not converted to the older ``lora.down`` naming: that conversion
    covers Linear layers only, and a file mixing both namings (conv LoRA) does not load back.
    """
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=state)


def save_lora(
    pipe_cls: type,
    component: str,
    model: nn.Module,
    out_dir: str | os.PathLike,
    state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (diffusers format, ``{component}_lora_layers``).

    ``state``: see :func:`lora_state_dict`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not hasattr(pipe_cls, "save_lora_weights"):
        raise ValueError(
            f"{pipe_cls.__name__} has no LoRA loader in diffusers; its LoRA cannot be saved in the diffusers format"
        )
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in lora_state_dict(model, state).items()}
    meta = model.peft_config["default"].to_dict()
    pipe_cls.save_lora_weights(
        out_dir,
        **{f"{component}_lora_layers": state, f"{component}_lora_adapter_metadata": meta},
        safe_serialization=True,
    )
    return out_dir


def save_extra(
    component: str,
    model: nn.Module,
    out_dir: str | os.PathLike,
    names: list[str],
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write the parameters ``names`` of ``model`` to ``extra_modules.safetensors`` (keys ``component.name``).

    ``tensors``: the values by parameter name when they are not the model's own (gathered FSDP shards).
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = tensors if tensors is not None else dict(model.named_parameters())
    out = {f"{component}.{n}": params[n].detach().to("cpu").contiguous() for n in names}
    meta = {"format": "pt", "component": component, "names": json.dumps(names)}
    save_file(out, str(out_dir / EXTRA_FILE), metadata=meta)
    return out_dir / EXTRA_FILE


def load_extra_modules(pipe: Any, path: str | os.PathLike) -> list[str]:
    """Copy ``extra_modules.safetensors`` (a file or the folder holding it) into ``pipe``; returns keys."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / EXTRA_FILE
    tensors = load_file(str(path))
    loaded = []
    for key, value in tensors.items():
        component, name = key.split(".", 1)
        model = getattr(pipe, component)
        params = dict(model.named_parameters())
        if name not in params:
            raise ValueError(f"{path}: {component} has no parameter {name!r}")
        with torch.no_grad():
            params[name].copy_(value.to(params[name]))
        loaded.append(key)
    return loaded


def load(pipe: Any, path: str | os.PathLike) -> None:
    """Load a trained result folder: the LoRA through diffusers, then any extra modules.

    Modules a recipe added to the model (a ``roictrl`` run's adapter, as ``pipe.unet.roictrl_adapter``)
    are rebuilt first by the recipe named in the folder's ``train_config.json``.
    """
    path = Path(path)
    if not any((path / f).is_file() for f in (LORA_FILE, EXTRA_FILE)):
        raise FileNotFoundError(f"{str(path)!r} holds neither {LORA_FILE} nor {EXTRA_FILE}: not a finished training output")
    if (path / LORA_FILE).is_file():
        pipe.load_lora_weights(str(path))
    if (path / EXTRA_FILE).is_file():
        recipe = _recipe_of(path)
        if recipe is not None and recipe.attach is not None:
            recipe.attach(pipe, path)
        load_extra_modules(pipe, path)


def _recipe_of(path: Path) -> Any:
    """The recipe named in ``path/train_config.json``, or ``None`` (no such file, or an unknown recipe)."""
    from .recipes import get_recipe

    try:
        return get_recipe(json.loads((path / "train_config.json").read_text())["recipe"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
