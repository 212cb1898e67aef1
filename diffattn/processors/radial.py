"""``radial``: radial spatiotemporal attention for video transformers (Wan 2.1/2.2, HunyuanVideo, Mochi,
CogVideoX) through the block-sparse engine.

Only video self-attention changes (joint text + video attention included, text rows and columns stay
dense). Cross-attention (Wan ``attn2``), HunyuanVideo's text-only token refiner, the first
``dense_layers`` transformer blocks and the first ``dense_timesteps`` / last ``dense_last_timesteps``
denoising steps run the stock processor, bit-identical to it.

Transformer blocks are numbered in execution order from a layer's qualified name: ``blocks.N`` (Wan),
``transformer_blocks.N`` (HunyuanVideo dual-stream, Mochi, CogVideoX), then HunyuanVideo's
``single_transformer_blocks.N`` continue after the last dual-stream block.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..context import AttentionContext, given_grid, recorded_grid
from ..masks.radial import radial_block_mask, radial_density
from ..ops import BlockMask
from ..ops.block_sparse_attention import BACKENDS
from ..registry import LayerInfo, Method, config_from
from .core import CoreAttnProcessor
from .layout import TokenLayout

__all__ = [
    "RADIAL_FAMILIES",
    "BlockOrder",
    "RadialAttnProcessor",
    "RadialConfig",
]

RADIAL_FAMILIES = ("wan", "hunyuan-video", "mochi", "cogvideox")
RADIAL_MODELS = (
    "WanTransformer3DModel",
    "HunyuanVideoTransformer3DModel",
    "MochiTransformer3DModel",
    "CogVideoXTransformer3DModel",
)
# Attention sink by default: the reference's current mask keeps it for Wan only.
_SINK_FAMILIES = ("wan",)


@dataclass(frozen=True)
class RadialConfig:
    """Options of radial attention.

    Attributes:
        decay_factor: scales the spatial window at frame distance >= 2 (reference: Wan 2.1 0.2,
            HunyuanVideo 0.95); must be > 0.
        block_size: engine block size, also the window floor and the frame-subsampling threshold.
        granularity: ``"block"`` (the reference: whole 128x128 blocks by its block rule) or ``"token"``
            (the exact token rule inside the blocks that hold any visible pair).
        sink: every frame sees the first frame in full; ``None``: on for Wan, off for the others (the
            reference's current choice; its earlier version had a sink for every model).
        adjacent: window at frame distance 1: ``"full"`` (current reference) or ``"half"`` (``s // 2``,
            the reference's earlier rule for Wan).
        dense_layers: the first N transformer blocks stay dense.
        dense_timesteps: the first N denoising steps stay dense.
        dense_last_timesteps: the last N denoising steps stay dense.
        backend: engine backend (``"auto"``: FlexAttention for inference, gather when gradients are needed
            on CPU).
    """

    decay_factor: float = 1.0
    block_size: int = 128
    granularity: Literal["block", "token"] = "block"
    sink: bool | None = None
    adjacent: Literal["full", "half"] = "full"
    dense_layers: int = 0
    dense_timesteps: int = 0
    dense_last_timesteps: int = 0
    backend: str = "auto"

    def __post_init__(self) -> None:
        d = self.decay_factor
        if isinstance(d, bool) or not isinstance(d, int | float) or not d > 0 or d == float("inf"):
            raise ValueError(f"decay_factor must be a finite number > 0, got {d!r}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.granularity not in ("block", "token"):
            raise ValueError(f"granularity must be 'block' or 'token', got {self.granularity!r}")
        if self.sink not in (None, True, False):
            raise ValueError(f"sink must be True, False or None (model default), got {self.sink!r}")
        if self.adjacent not in ("full", "half"):
            raise ValueError(f"adjacent must be 'full' or 'half', got {self.adjacent!r}")
        for name in ("dense_layers", "dense_timesteps", "dense_last_timesteps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")

    def sink_for(self, family: str | None) -> bool:
        """Whether the attention sink is on for a model family."""
        return self.sink if self.sink is not None else family in _SINK_FAMILIES


class BlockOrder:
    """Transformer-block index of an attention layer, in execution order, from its qualified name."""

    _PATTERN = re.compile(r"(?:^|\.)(single_transformer_blocks|transformer_blocks|blocks)\.(\d+)(?:\.|$)")

    def __init__(self) -> None:
        self.dual_blocks = 0  # `transformer_blocks` seen so far; single-stream blocks are numbered after them

    def observe(self, name: str | None) -> None:
        m = self._PATTERN.search(name or "")
        if m is not None and m.group(1) == "transformer_blocks":
            self.dual_blocks = max(self.dual_blocks, int(m.group(2)) + 1)

    def index(self, name: str | None) -> int | None:
        """The block index, or ``None`` when the name is unknown or not inside a transformer block."""
        m = self._PATTERN.search(name or "")
        if m is None:
            return None
        idx = int(m.group(2))
        return self.dual_blocks + idx if m.group(1) == "single_transformer_blocks" else idx


class RadialAttnProcessor(CoreAttnProcessor):
    """Radial attention as a diffusers attention processor, for every supported video model.

    Set it by hand on a whole transformer (``set_attn_processor``; cross-attention and text-only layers
    keep stock behaviour) with the token grid after patchify, or let ``diffattn.apply(pipe, "radial",
    ...)`` create one per layer, reading the grid and the denoising step from its context.

    Args:
        num_frames, height, width: latent frames and tokens per frame side after patchify (e.g. Wan
            480x832x81 -> 21, 30, 52); ``None``: read from ``context`` (filled by ``diffattn.apply``).
        config: a :class:`RadialConfig`, or its fields as keyword options.
        context: the :class:`~diffattn.AttentionContext` with grid and step; a processor set by hand owns
            one, and :meth:`set_step` fills its step.
        family: the stock processor family, inferred per module when ``None``.
        block_order: shared :class:`BlockOrder` (``apply`` shares one between the layers of a model).
    """

    def __init__(
        self,
        num_frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        *,
        config: RadialConfig | None = None,
        context: AttentionContext | None = None,
        family: str | None = None,
        block_order: BlockOrder | None = None,
        **options: Any,
    ) -> None:
        super().__init__(family=family)
        self.config = config_from(RadialConfig, config, options, "radial attention")
        self.grid = given_grid(num_frames, height, width, with_frames=True)
        self.context = context if context is not None else AttentionContext()
        self.block_order = block_order if block_order is not None else BlockOrder()
        self._masks: dict[tuple, BlockMask] = {}
        self._warned: set[str] = set()

    # ----- schedule ---------------------------------------------------------------------------------

    def set_step(self, step_index: int | None, num_steps: int | None) -> None:
        """Tell a processor set by hand which denoising step runs (``apply`` does this through its hooks)."""
        self.context.step_index, self.context.num_steps = step_index, num_steps

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def is_dense_step(self) -> bool:
        """Whether the current denoising step is a dense warm-up (or final) step."""
        cfg = self.config
        if not (cfg.dense_timesteps or cfg.dense_last_timesteps):
            return False
        step, total = self.context.step_index, self.context.num_steps
        if step is None or not total:
            self._warn_once(
                "step",
                "radial: the denoising step is unknown, so dense_timesteps/dense_last_timesteps cannot apply; "
                "use diffattn.apply(pipe, 'radial', ...) or call processor.set_step(i, num_steps)",
            )
            return False
        return step < cfg.dense_timesteps or step >= total - cfg.dense_last_timesteps

    def applies(self, attn: nn.Module, layout: TokenLayout) -> bool:
        """Sparse on video self-attention outside the dense layers and steps; stock everywhere else."""
        if layout.is_cross or layout.family not in RADIAL_FAMILIES:
            return False
        if self.config.dense_layers:
            self.block_order.observe(layout.layer)
            idx = self.block_order.index(layout.layer)
            if idx is None:
                self._warn_once(
                    "layer",
                    f"radial: cannot tell the transformer block of layer {layout.layer!r}, so dense_layers does "
                    "not apply to it; use diffattn.apply or diffattn.processors.core.set_processor_names(model)",
                )
            elif idx < self.config.dense_layers:
                return False
        return not self.is_dense_step()

    # ----- the core ---------------------------------------------------------------------------------

    def token_grid(self, n_visual: int, layer: str | None = None) -> tuple[int, int, int]:
        """The (frames, height, width) token grid of a call with ``n_visual`` visual tokens."""
        f, h, w = grid = recorded_grid(self.grid, self.context, "radial")
        if f * h * w != n_visual:
            where = f" in layer {layer}" if layer else ""
            raise ValueError(
                f"token grid (frames, height, width) = {tuple(grid)} has {f * h * w} tokens but the attention "
                f"call{where} has {n_visual} visual tokens"
            )
        return (f, h, w)

    def block_mask(self, q: torch.Tensor, layout: TokenLayout) -> BlockMask:
        """The engine mask for this call (bitmap and token rule cached by shape; key padding per call)."""
        n = q.shape[2]
        n_text = layout.n_text
        f, h, w = self.token_grid(n - n_text, layout.layer)
        cfg = self.config
        key = (f, h * w, n_text, layout.text_position, cfg.sink_for(layout.family), str(q.device))
        base = self._masks.get(key)
        if base is None:
            base = self._masks[key] = radial_block_mask(
                f,
                h * w,
                decay_factor=cfg.decay_factor,
                block_size=cfg.block_size,
                sink=cfg.sink_for(layout.family),
                text_tokens=n_text,
                text_position=layout.text_position,
                granularity=cfg.granularity,
                adjacent=cfg.adjacent,
                device=q.device,
            )
        if layout.text_valid is None or not n_text:
            return base
        # Padded text keys are hidden from every query, as the stock key-padding masks do; the cached
        # bitmap and token rule are shared, so compiled kernels are reused.
        text0 = n - n_text if layout.text_position == "last" else 0
        idx = torch.arange(n, device=q.device)[None, :]
        valid = layout.text_valid.to(q.device).reshape(-1, 1)
        key_padding = (idx < text0) | (idx >= text0 + n_text) | (idx - text0 < valid)
        return BlockMask(
            base.bitmap,
            n,
            n,
            base.block_size,
            token_rule=base.token_rule,
            dense_q=base.dense_q,
            dense_kv=base.dense_kv,
            key_padding=key_padding.expand(q.shape[0], n),
        )

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if attn_mask is not None and layout.text_valid is None:
            raise ValueError(
                f"radial attention supports key-padding text masks only; layer {layout.layer} got an attention "
                f"mask of shape {tuple(attn_mask.shape)} without per-sample text lengths"
            )
        return self.sparse_attention(q, k, v, self.block_mask(q, layout), self.config.backend)

    def __repr__(self) -> str:
        return f"RadialAttnProcessor(grid={self.grid}, config={self.config})"


# ----- registry -------------------------------------------------------------------------------------------

_ORDER_ATTR = "_radial_block_order"


def _make(config: RadialConfig, ctx: AttentionContext, layer: LayerInfo) -> RadialAttnProcessor | None:
    if layer.is_cross or layer.family not in RADIAL_FAMILIES:
        return None  # cross-attention keeps its processor object
    # One BlockOrder per apply (kept on its context), so HunyuanVideo's single-stream blocks are numbered
    # after every dual-stream block of the model.
    order = getattr(ctx, _ORDER_ATTR, None)
    if order is None:
        order = BlockOrder()
        setattr(ctx, _ORDER_ATTR, order)
    order.observe(layer.name)
    return RadialAttnProcessor(config=config, context=ctx, family=layer.family, block_order=order)


def _mask_args(
    config: RadialConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None, block_size: int
) -> dict[str, Any]:
    """The mask functions' arguments for one attention shape."""
    f, h, w = grid
    return dict(
        num_frames=f,
        tokens_per_frame=h * w,
        decay_factor=config.decay_factor,
        block_size=block_size,
        sink=bool(config.sink),
        text_tokens=n_text,
        text_position=text_position if n_text else None,
        adjacent=config.adjacent,
    )


def _block_mask(
    config: RadialConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None, block_size: int
) -> BlockMask:
    return radial_block_mask(
        **_mask_args(config, grid, n_text, text_position, block_size), granularity=config.granularity
    )


def _token_density(
    config: RadialConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None, block_size: int
) -> float:
    return radial_density(**_mask_args(config, grid, n_text, text_position, block_size))


METHOD = Method(
    name="radial",
    config=RadialConfig,
    families=RADIAL_FAMILIES,
    make_processor=_make,
    models=RADIAL_MODELS,
    description="radial spatiotemporal attention: O(n log n) static mask for video transformers",
    block_mask=_block_mask,
    token_density=_token_density,
    per_layer=True,
)
