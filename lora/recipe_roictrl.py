"""Recipe ``roictrl``: train a ROICtrl adapter on a frozen SD 1.x/2.x or SDXL UNet from boxes with captions.

    diffattn train roictrl --model zoo:sd --data scenes/boxes.jsonl --output runs/roictrl \
        --resolution 64 --max-steps 2000 --batch-size 16 --learning-rate 1e-4 [--option gligen=False]

Data: a ``boxes`` JSON-lines file (``{"file_name", "caption", "boxes", "box_captions"[, "normalized"]}``
per line; ``diffattn testbed data scenes`` writes one). The base model is frozen; a fresh
:class:`~diffattn.models.ROICtrlAdapter` is attached to the UNet as the submodule ``roictrl_adapter`` (so
the trainer's ``train_modules`` trains it, checkpoints it, resumes it and saves it in
``extra_modules.safetensors``) and ``diffattn.apply(unet, "roi", adapter=...)`` is set. LoRA on the UNet
too: ``--lora-targets to_q,to_k,to_v,to_out.0``. Multi-GPU runs use the trainer's accelerate path unchanged.

Adapter options (``--option KEY=VALUE``): ``roi_sizes``, ``gligen``, ``fourier_freqs``, ``max_instances``
(the adapter's config), ``stop_fraction`` (kept in the saved config folder for inference) and
``gate_lr_scale`` (default 10): the learning rate of the adapter's zero-initialised scalar gates
(``ROIBlockAdapter.GATES``) is ``--learning-rate`` times this. Adam moves a parameter by about one learning
rate per step at most, so at an adapter's learning rate a gate that starts at 0 can reach only
``~lr x steps``: after 900 steps at 5e-4 (cosine) the testbed adapter's gates sat at |tanh| <= 0.3, right
at that bound, i.e. the instance branch still entered at a fraction of its strength.

Per micro-batch the ``condition`` hook encodes the box captions with the pipeline's text encoder, pads the
boxes to the batch's largest count with a mask (boxes emptied by the crop are masked out; a sample whose
caption ``--caption-dropout`` emptied gets the empty caption in its boxes too, as the unconditional half
does at inference) and hands them
to the UNet call as ``roi_instances=``; a forward pre-hook on the UNet takes that keyword out and gives the
instances to the processors for that call only. Calls without it (validation samples) run without
instances, i.e. exactly the base model. :func:`load_adapter` reads the trained adapter back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from diffattn.io import atomic_text
from diffattn.models.roictrl import RUN_SUBFOLDER

from .recipe import Recipe

__all__ = ["ADAPTER_ATTR", "load_adapter"]

ADAPTER_ATTR = RUN_SUBFOLDER  # the adapter's name in the UNet, so its weights are keyed unet.roictrl_adapter.*
CONFIG_DIR = RUN_SUBFOLDER  # the subfolder of the output holding the adapter's config
_ADAPTER_OPTIONS = ("roi_sizes", "gligen", "fourier_freqs", "max_instances")
_TRAIN_OPTIONS = ("stop_fraction", "gate_lr_scale")
DEFAULT_GATE_LR_SCALE = 10.0
_KWARG = "roi_instances"


def _instances_hook(unet: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    from diffattn.processors.roi import set_instances

    if _KWARG not in kwargs:
        set_instances(unet, None)
        return args, kwargs
    kwargs = dict(kwargs)
    set_instances(unet, kwargs.pop(_KWARG))
    return args, kwargs


def _prepare(pipe: Any, cfg: Any) -> None:
    import diffattn
    from diffattn.models import ROICtrlAdapter

    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"recipe 'roictrl' trains SD 1.x/2.x or SDXL UNets; {type(pipe).__name__} has no unet")
    options = dict(cfg.attention_options or {})
    unknown = sorted(set(options) - {*_ADAPTER_OPTIONS, *_TRAIN_OPTIONS})
    if unknown:
        raise ValueError(f"unknown --option(s) {unknown} for recipe 'roictrl'; valid: {[*_ADAPTER_OPTIONS, *_TRAIN_OPTIONS]}")
    stop = options.pop("stop_fraction", 1.0)
    _gate_lr_scale(cfg)  # checked before anything is built
    options.pop("gate_lr_scale", None)
    adapter = ROICtrlAdapter.from_unet(unet, **options).to(device=unet.device)
    unet.add_module(ADAPTER_ATTR, adapter)
    diffattn.apply(unet, "roi", adapter=adapter, stop_fraction=stop)
    unet.register_forward_pre_hook(_instances_hook, with_kwargs=True)
    # the adapter's config beside the run's outputs, for load_adapter (the weights go in extra_modules)
    text = json.dumps({**dict(adapter.config), "stop_fraction": stop}, indent=2, default=list)
    atomic_text(Path(cfg.output) / CONFIG_DIR / "config.json", text)


def _gate_lr_scale(cfg: Any) -> float:
    value = (cfg.attention_options or {}).get("gate_lr_scale", DEFAULT_GATE_LR_SCALE)
    try:
        factor = float(value)
    except (TypeError, ValueError):
        factor = float("nan")
    if not factor > 0:
        raise ValueError(f"--option gate_lr_scale must be a number > 0, got {value!r}")
    return factor


def _lr_scale(name: str, cfg: Any) -> float:
    from diffattn.models.roictrl import ROIBlockAdapter

    return _gate_lr_scale(cfg) if name.rsplit(".", 1)[-1] in ROIBlockAdapter.GATES else 1.0


def _condition(trainer: Any, batch: dict[str, Any], cond: dict[str, Any]) -> dict[str, Any]:
    from diffattn.processors.roi import RegionInstances

    unet = trainer.family.denoiser
    adapter = getattr(unet, ADAPTER_ATTR)
    limit = int(adapter.config.max_instances)
    boxes_list, caps_list = batch["boxes"], batch["box_captions"]
    n = max((len(c) for c in caps_list), default=0)
    if n > limit:
        raise ValueError(f"a training image has {n} boxes; the adapter takes at most max_instances={limit}")
    device = cond["encoder_hidden_states"].device
    b = len(caps_list)
    if n == 0:
        return cond
    flat = [c for caps in caps_list for c in caps]
    emb = trainer.family.encode_text(flat, device)["encoder_hidden_states"]
    dropped = [False] * b
    if getattr(trainer.cfg, "caption_dropout", 0) > 0:
        # a sample whose caption was dropped (CFG training) gets the empty caption in every box too: what
        # RegionalControlPipeline gives the unconditional half at inference
        empty = trainer.family.encode_text([""], device)["encoder_hidden_states"][0]
        dropped = [torch.equal(cond["encoder_hidden_states"][i], empty) for i in range(b)]
    boxes = torch.zeros(b, n, 4, device=device)
    boxes[..., 2:] = 1.0
    embeds = emb.new_zeros(b, n, *emb.shape[1:])
    mask = torch.zeros(b, n, dtype=torch.bool, device=device)
    k = 0
    for i, (bx, caps) in enumerate(zip(boxes_list, caps_list)):
        m = len(caps)
        if m:
            bx = bx.to(device).reshape(-1, 4)
            boxes[i, :m] = bx
            embeds[i, :m] = empty if dropped[i] else emb[k : k + m]
            mask[i, :m] = (bx[:, 2] > bx[:, 0]) & (bx[:, 3] > bx[:, 1])  # a box the crop emptied is padding
        k += m
    inst = RegionInstances(boxes, embeds, mask)
    return {**cond, "model_kwargs": {**cond.get("model_kwargs", {}), _KWARG: inst}}


def load_adapter(output: str | os.PathLike) -> Any:
    """The trained :class:`~diffattn.models.ROICtrlAdapter` of a ``roictrl`` run: its output folder (the final
    ``extra_modules.safetensors``), that folder's ``roictrl_adapter/`` subfolder, or one of its checkpoint
    folders (``checkpoints/step-N``: its ``trainable.safetensors``). ``ROICtrlAdapter.from_pretrained`` takes
    the first two as well."""
    from diffattn.models import ROICtrlAdapter

    path = Path(output)
    if (path / "trainable.safetensors").is_file() and path.parent.name == "checkpoints":
        run = path.parent.parent
        config = run / CONFIG_DIR / "config.json"
        if not config.is_file():
            raise ValueError(f"checkpoint {str(path)!r}: the run folder {str(run)!r} has no {CONFIG_DIR}/config.json")
        return ROICtrlAdapter.from_training_files(config, path / "trainable.safetensors")
    if not (path / CONFIG_DIR / "config.json").is_file() and not (path / "config.json").is_file():
        raise ValueError(
            f"{str(path)!r} is not a roictrl training output (no {CONFIG_DIR}/config.json), its {CONFIG_DIR}/ "
            "subfolder, nor a checkpoint folder of one"
        )
    return ROICtrlAdapter.from_pretrained(path)


def _attach(pipe: Any, output: Path) -> None:
    """``diffattn.lora.load``: the trained adapter as ``pipe.unet.roictrl_adapter`` (as in training), for
    ``RegionalControlPipeline(pipe, adapter=pipe.unet.roictrl_adapter)``."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"{str(output)!r} holds a ROICtrl adapter for a UNet; {type(pipe).__name__} has no unet")
    if not hasattr(unet, ADAPTER_ATTR):
        unet.add_module(ADAPTER_ATTR, load_adapter(output).to(device=unet.device))


RECIPE = Recipe(
    name="roictrl",
    description="ROICtrl regional control: train the ROI adapter (base frozen) on boxes with captions",
    data="boxes",
    lora_targets=(),
    train_modules=(ADAPTER_ATTR,),
    defaults={"resolution": 512},
    prepare=_prepare,
    condition=_condition,
    lr_scale=_lr_scale,
    attach=_attach,
)
