"""``RegionalControlPipeline``: instance boxes with their own captions for SD 1.x / 2.x and SDXL pipelines.

It wraps any Stable Diffusion 1.x/2.x, SDXL or ControlNet pipeline (a community fine-tune loads like the
base model) and adds an ``instances`` argument to its call::

    from diffattn.pipelines import RegionalControlPipeline
    rc = RegionalControlPipeline(pipe, adapter=ROICtrlAdapter.from_pretrained("roictrl-adapter"))
    image = rc("a park", instances=[{"box": (0.1, 0.2, 0.5, 0.9), "caption": "a red dog"}]).images[0]
    draw_instances(image, [...]).save("park-boxes.png")

With an adapter it applies ROICtrl (``diffattn.apply(pipe, "roi", adapter=...)``); without one, the
training-free mask baseline (``"regional_mask"``). The method is applied for the call and removed after it;
no instances runs the wrapped pipeline untouched (bit-identical). Every other argument goes to the wrapped
pipeline's ``__call__`` unchanged, and other attributes are the wrapped pipeline's.

Instance captions are encoded with the pipeline's own ``encode_prompt``. Under classifier-free guidance
the unconditional half of the batch gets, for every instance, the pipeline's negative-prompt embedding
(so guidance pushes each box towards its caption); boxes are the same in both halves.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

import diffattn
from diffattn.models.roictrl import MAX_INSTANCES, ROICtrlAdapter
from diffattn.processors.roi import RegionInstances, set_instances, validate_instances

__all__ = ["RegionalControlPipeline", "draw_instances", "load_instances", "parse_instances"]

Instance = dict[str, Any]


def parse_instances(instances: Any, max_instances: int = MAX_INSTANCES) -> tuple[list[tuple[float, ...]], list[str]]:
    """``[{"box": (x1, y1, x2, y2), "caption": "..."}, ...]`` or ``{"boxes": [...], "captions": [...]}`` ->
    ``(boxes, captions)``, validated.

    Raises:
        ValueError: naming the instance index (missing key, box not 4 numbers, outside [0, 1], x2 <= x1 or
            y2 <= y1), more than ``max_instances``, or a caption list whose length differs from the boxes.
    """
    if instances is None:
        return [], []
    if isinstance(instances, dict):
        if set(instances) - {"boxes", "captions"} or "boxes" not in instances:
            raise ValueError(f"instances as a dict needs the keys 'boxes' and 'captions', got {sorted(instances)}")
        boxes, captions = list(instances["boxes"]), list(instances.get("captions") or [])
    else:
        boxes, captions = [], []
        for i, inst in enumerate(instances):
            if not isinstance(inst, dict) or "box" not in inst or "caption" not in inst:
                raise ValueError(f"instance {i}: expected a dict with 'box' and 'caption', got {inst!r}")
            boxes.append(inst["box"])
            captions.append(inst["caption"])
    return validate_instances(boxes, captions, max_instances), captions


def load_instances(path: str | Path) -> list[Instance]:
    """Instances from a JSON file: a list of ``{"box": [...], "caption": "..."}`` or ``{"instances": [...]}``."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and "instances" in data:
        data = data["instances"]
    boxes, captions = parse_instances(data)
    return [{"box": b, "caption": c} for b, c in zip(boxes, captions)]


def draw_instances(image: Image.Image, instances: Any, width: int = 2, labels: bool = True) -> Image.Image:
    """A copy of ``image`` with each instance box drawn (and its caption written) in its own colour."""
    boxes, captions = parse_instances(instances, max_instances=10**6)
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    w, h = out.size
    palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
               (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128)]
    for i, (b, cap) in enumerate(zip(boxes, captions)):
        color = palette[i % len(palette)]
        xy = (b[0] * w, b[1] * h, max(b[2] * w - 1, b[0] * w), max(b[3] * h - 1, b[1] * h))
        draw.rectangle(xy, outline=color, width=width)
        if labels and cap:
            draw.text((xy[0] + width + 1, xy[1] + width), cap, fill=color)
    return out


class RegionalControlPipeline:
    """A Stable Diffusion 1.x/2.x / SDXL / ControlNet pipeline with per-instance boxes and captions.

    Args:
        pipe: the pipeline to wrap (its ``unet`` gets the regional processors during a call).
        adapter: a :class:`~diffattn.models.ROICtrlAdapter` for ``pipe.unet`` (ROICtrl); ``None`` uses the
            training-free ``regional_mask`` baseline.
        stop_fraction: the regional branch runs while the denoising fraction is below this.
        method: ``"roi"`` or ``"regional_mask"`` (default: ``"roi"`` with an adapter).
    """

    def __init__(self, pipe: Any, adapter: ROICtrlAdapter | None = None, stop_fraction: float = 1.0,
                 method: str | None = None) -> None:
        if getattr(pipe, "unet", None) is None or not hasattr(pipe, "encode_prompt"):
            raise ValueError(f"RegionalControlPipeline needs an SD 1.x/2.x or SDXL pipeline, got {type(pipe).__name__}")
        method = method or ("roi" if adapter is not None else "regional_mask")
        if method not in ("roi", "regional_mask"):
            raise ValueError(f"method must be 'roi' or 'regional_mask', got {method!r}")
        if method == "roi" and adapter is None:
            raise ValueError("method 'roi' needs an adapter (ROICtrlAdapter.from_unet(pipe.unet) or from_pretrained)")
        self.pipe, self.adapter, self.method, self.stop_fraction = pipe, adapter, method, stop_fraction

    @classmethod
    def from_pretrained(cls, path: str, adapter: str | ROICtrlAdapter | None = None, **kwargs: Any) -> RegionalControlPipeline:
        """Load a pipeline folder / hub id (``DiffusionPipeline.from_pretrained(path, **kwargs)``) and an adapter."""
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
        if isinstance(adapter, (str, Path)):
            adapter = ROICtrlAdapter.from_pretrained(adapter)
        return cls(pipe, adapter)

    def __getattr__(self, name: str) -> Any:
        if name == "pipe":
            raise AttributeError(name)
        return getattr(self.pipe, name)

    @property
    def max_instances(self) -> int:
        return int(self.adapter.config.max_instances) if self.adapter is not None else MAX_INSTANCES

    def _encode(self, texts: list[str] | str, nipp: int, negative: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cond, uncond) text embeddings as the UNet sees them."""
        pipe = self.pipe
        device = pipe._execution_device
        if hasattr(pipe, "tokenizer_2"):  # SDXL
            cond, uncond, _, _ = pipe.encode_prompt(
                prompt=texts, device=device, num_images_per_prompt=nipp, do_classifier_free_guidance=True,
                negative_prompt=negative,
            )
        else:
            cond, uncond = pipe.encode_prompt(texts, device, nipp, True, negative_prompt=negative)
        return cond, uncond

    def _do_cfg(self, kwargs: dict[str, Any]) -> bool:
        scale = kwargs.get("guidance_scale")
        if scale is None:
            scale = inspect.signature(type(self.pipe).__call__).parameters["guidance_scale"].default
        return scale > 1 and getattr(self.pipe.unet.config, "time_cond_proj_dim", None) is None

    def region_instances(self, prompt: str | Sequence[str], instances: Any, **kwargs: Any) -> RegionInstances | None:
        """The :class:`RegionInstances` a call with these arguments gives the UNet (``None``: no instances)."""
        boxes, captions = parse_instances(instances, self.max_instances)
        if not boxes:
            return None
        if prompt is None:
            raise ValueError("instances need prompt=... (prompt_embeds alone are not supported)")
        nipp = int(kwargs.get("num_images_per_prompt") or 1)
        neg = kwargs.get("negative_prompt")
        n_prompts = 1 if isinstance(prompt, str) else len(prompt)
        inst_cond, _ = self._encode(list(captions), 1)  # (N, L, D)
        _, neg_global = self._encode(prompt, nipp, neg)  # (T, L, D): the pipeline's own negative embeddings
        total = n_prompts * nipp
        embeds = inst_cond[None].expand(total, -1, -1, -1)
        box_t = torch.tensor(boxes, dtype=torch.float32, device=embeds.device)[None].expand(total, -1, -1)
        if self._do_cfg(kwargs):
            uncond = neg_global[:, None].expand(-1, len(boxes), -1, -1)
            embeds = torch.cat([uncond, embeds])
            box_t = torch.cat([box_t, box_t])
        return RegionInstances(box_t.contiguous(), embeds.contiguous())

    def __call__(self, prompt: str | Sequence[str] | None = None, instances: Any = None, **kwargs: Any) -> Any:
        """``pipe(prompt, **kwargs)`` with ``instances=[{"box": (x1, y1, x2, y2), "caption": "..."}, ...]``."""
        region = self.region_instances(prompt, instances, **kwargs)
        if region is None:
            return self.pipe(prompt=prompt, **kwargs)
        options: dict[str, Any] = {"stop_fraction": self.stop_fraction}
        if self.method == "roi":
            unet = self.pipe.unet
            first = next(self.adapter.parameters())
            if first.dtype != unet.dtype or first.device != unet.device:
                # nn.Module.to: ModelMixin.to warns about fp32 modules on every dtype cast (it has none)
                torch.nn.Module.to(self.adapter, device=unet.device, dtype=unet.dtype)
            options["adapter"] = self.adapter
        else:
            options["max_instances"] = self.max_instances
        with diffattn.apply(self.pipe, self.method, **options) as patch:
            set_instances(patch, region)
            return self.pipe(prompt=prompt, **kwargs)
