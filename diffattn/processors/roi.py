"""Regional control on SD 1.x / 2.x / SDXL UNets: ``roi`` (ROICtrl) and ``regional_mask`` (the mask baseline).

Both methods replace only the cross-attention processors (``attn2`` of every ``BasicTransformerBlock``); a
processor there receives the normed hidden states and the prompt embedding, computes the stock
cross-attention (``AttnProcessor2_0``, bit-identical) and then adds the instances:

* ``roi``: the :class:`~diffattn.models.ROICtrlAdapter` branch of that layer (ROI-Align, the layer's own
  cross-attention per instance, gated ROI self-attention, ROI-Unpool, per-pixel softmax fusion over box windows);
* ``regional_mask``: training-free: each instance caption is attended by the **whole** map with the layer's
  cross-attention and kept only inside its box (a per-instance full-map mask); pixels in several boxes
  average those instances, pixels in none keep the global output. Cost: ``N`` full cross-attentions.

Instances (boxes, caption embeddings, padding mask) change per call and reach the processors through a
shared :class:`RegionState` held by the method's config: pass ``instances=RegionInstances(...)`` to
``diffattn.apply`` or call :func:`set_instances` (``patch`` or the pipeline / UNet) between calls. Their
batch is the UNet's batch (with classifier-free guidance, ``[uncond; cond]``), or a divisor of it (tiled).
No instances: the stock output, bit-identical. The UNet's token grid comes from the context hook
``apply`` installs (``AttentionContext.grid_for``); the UNet level (for the ROI size) from its downsampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from torch import nn

from ..context import AttentionContext, layer_grid, recorded_grid
from ..ops.roi_align import check_boxes
from ..registry import LayerInfo, Method
from .parallel import check_context_parallel

__all__ = [
    "RegionInstances",
    "RegionMaskAttnProcessor",
    "RegionMaskConfig",
    "RegionState",
    "ROICtrlAttnProcessor",
    "ROIConfig",
    "box_masks",
    "set_instances",
    "validate_instances",
]

UNET_MODELS = ("UNet2DConditionModel",)


def validate_instances(boxes: Any, captions: Any = None, max_instances: int = 30) -> list[tuple[float, ...]]:
    """Check one image's instance boxes (and captions); return the boxes as tuples of floats.

    Raises:
        ValueError: naming the instance index: a box that is not 4 numbers, outside [0, 1], with
            ``x2 <= x1`` or ``y2 <= y1``; more than ``max_instances``; a caption list of another length.
    """
    boxes = [tuple(float(v) for v in b) if hasattr(b, "__len__") else b for b in boxes]
    if len(boxes) > max_instances:
        raise ValueError(f"{len(boxes)} instances given; at most max_instances={max_instances} are supported")
    if captions is not None and len(captions) != len(boxes):
        raise ValueError(f"captions has {len(captions)} entries but there are {len(boxes)} boxes")
    for i, b in enumerate(boxes):
        if not isinstance(b, tuple) or len(b) != 4:
            raise ValueError(f"instance {i}: box must be 4 numbers (x1, y1, x2, y2), got {b!r}")
        if any(not math.isfinite(v) or v < 0.0 or v > 1.0 for v in b):
            raise ValueError(f"instance {i}: box {b} is outside [0, 1] (boxes are normalized x1, y1, x2, y2)")
        if b[2] <= b[0] or b[3] <= b[1]:
            raise ValueError(f"instance {i}: box {b} needs x2 > x1 and y2 > y1")
    if captions is not None:
        for i, c in enumerate(captions):
            if not isinstance(c, str):
                raise ValueError(f"instance {i}: caption must be a string, got {type(c).__name__}")
    return boxes


@dataclass
class RegionInstances:
    """The instances of one UNet call.

    Attributes:
        boxes: ``(B, N, 4)`` normalized xyxy.
        embeds: ``(B, N, L, Dc)`` instance caption embeddings (the UNet's ``encoder_hidden_states`` format).
        mask: ``(B, N)`` bool, False for padding slots; ``None`` = all valid.
        host_boxes, host_mask: CPU copies of ``boxes`` and ``mask``, made once here (one device sync when
            the boxes live on a GPU) so that the processors decide which instances to run without reading
            device tensors in every layer.

    Treat an instance as immutable once built: its batch-tiled copies and the windows derived from its boxes
    are kept on it (``cache``) and reused by every layer and denoising step that sees it.
    """

    boxes: torch.Tensor
    embeds: torch.Tensor
    mask: torch.Tensor | None = None
    host_boxes: torch.Tensor | None = field(default=None, repr=False, compare=False)
    host_mask: torch.Tensor | None = field(default=None, repr=False, compare=False)
    cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_boxes(self.boxes)
        b, n = self.boxes.shape[:2]
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.dim() != 4 or self.embeds.shape[:2] != (b, n):
            shape = tuple(self.embeds.shape) if isinstance(self.embeds, torch.Tensor) else type(self.embeds).__name__
            raise ValueError(f"embeds must be (B, N, L, Dc) with (B, N) = {(b, n)} like boxes; got {shape}")
        if self.mask is None:
            self.mask = torch.ones(b, n, dtype=torch.bool, device=self.boxes.device)
        elif tuple(self.mask.shape) != (b, n):
            raise ValueError(f"mask must be (B, N) = {(b, n)} like boxes; got {tuple(self.mask.shape)}")
        self.mask = self.mask.bool()
        if self.host_boxes is None:
            self.host_boxes = self.boxes.detach().cpu()
        if self.host_mask is None:
            self.host_mask = self.mask.cpu()

    @property
    def count(self) -> int:
        return self.boxes.shape[1]

    @property
    def cacheable(self) -> bool:
        """Whether derived tensors may be kept on the instance: not with autograd history, since a graph
        shared by two forward passes would be freed by the first backward."""
        return not (self.boxes.requires_grad or self.embeds.requires_grad)

    def for_batch(self, batch: int, device: torch.device, dtype: torch.dtype) -> RegionInstances:
        """Tiled to ``batch`` (a multiple of the stored batch) on ``device``; embeds in ``dtype``."""
        b = self.boxes.shape[0]
        if batch % b:
            raise ValueError(f"the UNet batch {batch} is not a multiple of the instances' batch {b}")
        rep = batch // b
        key = ("batch", batch, torch.device(device), dtype)
        if key in self.cache:
            return self.cache[key]
        tiled = RegionInstances(
            self.boxes.to(device).repeat(rep, 1, 1),
            self.embeds.to(device=device, dtype=dtype).repeat(rep, 1, 1, 1),
            self.mask.to(device).repeat(rep, 1),
            host_boxes=self.host_boxes.repeat(rep, 1, 1),
            host_mask=self.host_mask.repeat(rep, 1),
        )
        if tiled.cacheable:
            self.cache[key] = tiled
        return tiled


@dataclass
class RegionState:
    """Mutable holder shared by the processors of one ``apply``: the current :class:`RegionInstances`."""

    instances: RegionInstances | None = None
    max_instances: int = 30  # what the adapter (roi) or the config (regional_mask) accepts


def _validate_fraction(value: float, name: str) -> None:
    if not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")


@dataclass(frozen=True)
class ROIConfig:
    """Options of ``roi``.

    Attributes:
        adapter: the :class:`~diffattn.models.ROICtrlAdapter` built for this UNet (required).
        instances: initial :class:`RegionInstances` (or set them per call with :func:`set_instances`).
        stop_fraction: the adapter runs while ``step_fraction < stop_fraction`` (1.0 = every step).
    """

    adapter: Any = None
    instances: RegionInstances | None = None
    stop_fraction: float = 1.0

    def __post_init__(self) -> None:
        from ..models.roictrl import ROICtrlAdapter

        if not isinstance(self.adapter, ROICtrlAdapter):
            raise ValueError(
                f"adapter must be a diffattn.models.ROICtrlAdapter (ROICtrlAdapter.from_unet(unet)), got "
                f"{type(self.adapter).__name__}"
            )
        # not an option: the processors' shared holder
        object.__setattr__(self, "state", RegionState(max_instances=self.adapter.config.max_instances))
        _validate_fraction(self.stop_fraction, "stop_fraction")
        if self.instances is not None and not isinstance(self.instances, RegionInstances):
            raise ValueError(f"instances must be a RegionInstances, got {type(self.instances).__name__}")
        if self.instances is not None and self.instances.count > self.adapter.config.max_instances:
            raise ValueError(
                f"{self.instances.count} instances; the adapter takes at most {self.adapter.config.max_instances}"
            )
        if self.instances is not None:
            self.state.instances = self.instances


@dataclass(frozen=True)
class RegionMaskConfig:
    """Options of ``regional_mask``.

    Attributes:
        instances: initial :class:`RegionInstances` (or :func:`set_instances` per call).
        stop_fraction: instances are used while ``step_fraction < stop_fraction``.
        max_instances: the most instances accepted.
        share_queries: compute the map's queries once and each instance's attention product only (the
            default); ``False`` runs the whole stock cross-attention once per instance (a naive baseline).
    """

    instances: RegionInstances | None = None
    stop_fraction: float = 1.0
    max_instances: int = 30
    share_queries: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", RegionState(max_instances=self.max_instances))
        _validate_fraction(self.stop_fraction, "stop_fraction")
        if self.instances is not None and not isinstance(self.instances, RegionInstances):
            raise ValueError(f"instances must be a RegionInstances, got {type(self.instances).__name__}")
        if self.instances is not None:
            self.state.instances = self.instances


def _regional_processors(target: Any) -> list[_RegionalProcessor]:
    """The ``roi`` / ``regional_mask`` processors set on ``target``: an ``AttentionPatch`` (its denoisers,
    while active), a ``PatchGroup``, a pipeline (its module components) or a module."""
    if isinstance(target, nn.Module):
        roots = [target]
    elif hasattr(target, "saved") and hasattr(target, "models"):  # an AttentionPatch (api sits above us)
        roots = list(target.models) if target.active else []
    elif hasattr(target, "patches"):  # a PatchGroup: the patches of one apply with several methods
        return [proc for patch in target.patches for proc in _regional_processors(patch)]
    else:
        roots = list(getattr(target, "components", {}).values())
    return [
        m.processor
        for root in roots
        if isinstance(root, nn.Module)
        for m in root.modules()
        if isinstance(getattr(m, "processor", None), _RegionalProcessor)
    ]


def set_instances(target: Any, instances: RegionInstances | None) -> None:
    """Give the ``roi`` / ``regional_mask`` processors of ``target`` (a patch, pipeline or UNet) new instances
    (``None`` clears them: the base model runs unchanged).

    Raises:
        ValueError: when no regional method is applied to ``target``, or the instances are too many.
    """
    states = {id(p.state): p.state for p in _regional_processors(target)}
    if not states:
        raise ValueError("set_instances needs a patch from diffattn.apply(..., 'roi' or 'regional_mask')")
    if instances is not None and not isinstance(instances, RegionInstances):
        raise ValueError(f"instances must be a RegionInstances, got {type(instances).__name__}")
    for state in states.values():
        if instances is not None and instances.count > state.max_instances:
            raise ValueError(f"{instances.count} instances; at most {state.max_instances} are supported")
    for state in states.values():
        state.instances = instances


def box_masks(boxes: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``(B, N, H*W)`` bool: pixel ``(i, j)`` whose centre lies in the box (ROI-Unpool's coverage rule)."""
    h, w = hw
    dt = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    bx = boxes.to(dt)
    cy = torch.arange(h, device=boxes.device, dtype=dt) + 0.5
    cx = torch.arange(w, device=boxes.device, dtype=dt) + 0.5
    iy = (cy >= bx[..., 1:2] * h) & (cy <= bx[..., 3:4] * h)  # (B, N, H)
    ix = (cx >= bx[..., 0:1] * w) & (cx <= bx[..., 2:3] * w)
    return (iy[..., :, None] & ix[..., None, :]).flatten(-2)


class _RegionalProcessor:
    """Shared plumbing: stock cross-attention, then ``self.regional(...)`` when instances are active."""

    _attention_backend: Any = None
    context_parallel = "regional control is for UNets (Attention cross-attention), which have no context-parallel plan"

    @property
    def _parallel_config(self) -> Any:
        """What diffusers' ``enable_parallelism`` would set: refused (see :mod:`.parallel`)."""
        return self.__dict__.get("_diffattn_parallel_config")

    @_parallel_config.setter
    def _parallel_config(self, config: Any) -> None:
        check_context_parallel(self, config)
        self.__dict__["_diffattn_parallel_config"] = config

    def __init__(self, state: RegionState, context: AttentionContext | None, stop_fraction: float = 1.0,
                 hw: tuple[int, int] | None = None) -> None:
        self.state = state
        self.context = context
        self.stop_fraction = stop_fraction
        self.hw = hw  # latent (H, W) when set by hand without a context
        self._sdpa, self._classic = AttnProcessor2_0(), AttnProcessor()

    def _stock(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        # what diffusers' Attention sets by default: the classic processor when it must not use SDPA's scale
        proc = self._sdpa if getattr(attn, "scale_qk", True) else self._classic
        return proc(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                    attention_mask=attention_mask, temb=temb)

    def stock(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
              attention_mask: torch.Tensor | None, temb: torch.Tensor | None) -> torch.Tensor:
        """The stock cross-attention of this call (bit-identical to the processor this one replaced)."""
        return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    def grid(self, n_tokens: int) -> tuple[int, int, int]:
        """``(level, h, w)`` of a layer with ``n_tokens`` tokens."""
        own = (1, *self.hw) if self.hw is not None else None
        _, gh, gw = recorded_grid(own, self.context, "roi")
        _, h, w = layer_grid(n_tokens, own, self.context, "roi")
        return round(math.log2(max(gh / h, 1.0))), h, w

    def active(self) -> bool:
        frac = self.context.step_fraction if self.context is not None else None
        return frac is None or frac < self.stop_fraction

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        base = self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        inst = self.state.instances
        if (inst is None or inst.count == 0 or encoder_hidden_states is None or hidden_states.ndim != 3
                or not self.active()):
            return base
        inst = inst.for_batch(hidden_states.shape[0], hidden_states.device, encoder_hidden_states.dtype)
        return self.regional(attn, hidden_states, base, inst)

    def regional(self, attn: nn.Module, hidden_states: torch.Tensor, base: torch.Tensor,
                 inst: RegionInstances) -> torch.Tensor:
        """The layer's output with the instances applied, from the stock output ``base`` of this call."""
        raise NotImplementedError


class ROICtrlAttnProcessor(_RegionalProcessor):
    """``attn2`` processor running one :class:`~diffattn.models.roictrl.ROIBlockAdapter`.

    By hand: ``attn.set_processor(ROICtrlAttnProcessor(adapter.block_for(name), adapter, RegionState(inst),
    hw=(latent_h, latent_w)))``.
    """

    def __init__(self, block: nn.Module, adapter: nn.Module, state: RegionState,
                 context: AttentionContext | None = None, stop_fraction: float = 1.0,
                 hw: tuple[int, int] | None = None) -> None:
        super().__init__(state, context, stop_fraction, hw)
        self.block = block
        self.adapter = adapter

    def regional(self, attn: nn.Module, hidden_states: torch.Tensor, base: torch.Tensor,
                 inst: RegionInstances) -> torch.Tensor:
        level, h, w = self.grid(hidden_states.shape[1])

        def cross(tokens: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            return self._stock(attn, tokens, encoder_hidden_states=context)

        return self.block(hidden_states, base, inst.boxes, inst.embeds, inst.mask, (h, w),
                          self.adapter.roi_size(level), cross, host_boxes=inst.host_boxes, host_mask=inst.host_mask,
                          cache=inst.cache if inst.cacheable else None)


class RegionMaskAttnProcessor(_RegionalProcessor):
    """``attn2`` processor of the mask baseline: per-instance full-map cross-attention kept inside its box.

    The queries (``to_q`` of the whole map) are computed once; each instance adds its keys / values and one
    full-map attention product; the box-masked average of the products goes through ``to_out`` once
    (``to_out`` is affine and the weights sum to one, so this equals averaging per-instance outputs).
    """

    def __init__(self, state: RegionState, context: AttentionContext | None, stop_fraction: float = 1.0,
                 hw: tuple[int, int] | None = None, share_queries: bool = True) -> None:
        super().__init__(state, context, stop_fraction, hw)
        self.share_queries = share_queries

    def regional(self, attn: nn.Module, hidden_states: torch.Tensor, base: torch.Tensor,
                 inst: RegionInstances) -> torch.Tensor:
        _, h, w = self.grid(hidden_states.shape[1])
        masks = box_masks(inst.boxes, (h, w)) & inst.mask[..., None]  # (B, N, HW)
        plain = (self.share_queries and getattr(attn, "spatial_norm", None) is None
                 and getattr(attn, "group_norm", None) is None and not getattr(attn, "residual_connection", False)
                 and getattr(attn, "rescale_output_factor", 1.0) == 1.0 and getattr(attn, "scale_qk", True))
        if not plain:
            return self._per_instance(attn, hidden_states, base, inst, masks)
        b, heads = hidden_states.shape[0], attn.heads
        q = attn.to_q(hidden_states)
        hd = q.shape[-1] // heads
        q = q.view(b, -1, heads, hd).transpose(1, 2)
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        acc, count = None, None
        for i in range(inst.count):
            if not bool(inst.host_mask[:, i].any()):  # host copy: no device sync per instance and layer
                continue
            ctx = inst.embeds[:, i]
            if attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            k = attn.to_k(ctx).view(b, -1, heads, hd).transpose(1, 2)
            v = attn.to_v(ctx).view(b, -1, heads, hd).transpose(1, 2)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, hd)
            m = masks[:, i, None, :, None].to(o.dtype)
            acc = o * m if acc is None else acc + o * m
            count = m if count is None else count + m
        if acc is None:
            return base
        o = (acc / count.clamp(min=1)).transpose(1, 2).reshape(b, -1, heads * hd).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](o))
        return torch.where(count[:, 0] > 0, out, base)

    def _per_instance(self, attn: nn.Module, hidden_states: torch.Tensor, base: torch.Tensor,
                      inst: RegionInstances, masks: torch.Tensor) -> torch.Tensor:
        acc, count = None, None
        for i in range(inst.count):
            if not bool(inst.host_mask[:, i].any()):
                continue
            out = self._stock(attn, hidden_states, encoder_hidden_states=inst.embeds[:, i])
            m = masks[:, i, :, None].to(out.dtype)
            acc = out * m if acc is None else acc + out * m
            count = m if count is None else count + m
        if acc is None:
            return base
        return torch.where(count > 0, acc / count.clamp(min=1), base)


def _is_unet_cross(layer: LayerInfo) -> bool:
    return layer.is_cross and layer.family == "sd" and layer.name.endswith("attn2") and layer.model in UNET_MODELS


def _make_roi(config: ROIConfig, ctx: AttentionContext, layer: LayerInfo) -> ROICtrlAttnProcessor | None:
    if not _is_unet_cross(layer):
        return None
    block = config.adapter.block_for(layer.name)
    if block is None:
        raise ValueError(
            f"the ROICtrl adapter has no branch for layer {layer.name!r}; build it for this UNet with "
            "ROICtrlAdapter.from_unet(unet)"
        )
    return ROICtrlAttnProcessor(block, config.adapter, config.state, ctx, config.stop_fraction)


def _make_mask(config: RegionMaskConfig, ctx: AttentionContext, layer: LayerInfo) -> RegionMaskAttnProcessor | None:
    if not _is_unet_cross(layer):
        return None
    return RegionMaskAttnProcessor(config.state, ctx, config.stop_fraction, share_queries=config.share_queries)


ROI_METHOD = Method(
    name="roi",
    config=ROIConfig,
    families=("sd",),
    make_processor=_make_roi,
    models=UNET_MODELS,
    description="ROICtrl regional control: ROI-Align, per-instance cross-attention, ROI-Unpool (needs an adapter)",
)
REGIONAL_MASK_METHOD = Method(
    name="regional_mask",
    config=RegionMaskConfig,
    families=("sd",),
    make_processor=_make_mask,
    models=UNET_MODELS,
    description="training-free regional cross-attention with per-instance full-map box masks (baseline)",
)
