"""``hilbert_local``: hierarchical local attention in Hilbert order (Scale-DiT) for Flux and SD3 through the
block-sparse engine.

Each image token attends to the image tokens within ``radius`` tokens in both axes (a ``(2r+1)^2``
neighbourhood); text rows and columns stay dense. Optional low-resolution guidance tokens (the second
stage of :class:`diffattn.pipelines.HighResPipeline`) appended after the HR tokens follow the LR rules
of :mod:`diffattn.masks.local`.

Inside the processor the image tokens are *gathered* into Hilbert order (``q``, ``k`` and ``v`` with one
``index_select`` each), attention runs on the permuted sequence, and the output is gathered back with the
inverse permutation. Permuting the tokens rather than the mask is what makes the pattern block-sparse: in
raster order a 17x17 neighbourhood touches 17 rows, i.e. about ``17 * width / block_size`` blocks per query
block, whereas in Hilbert order a query block is a compact patch and its neighbourhood a few blocks. The
permutation costs O(n * head_dim) copies, negligible next to the O(n * r^2 * head_dim) attention.

Rotary embeddings are applied by the stock code path before the permutation, so positions are untouched.
SD3 works within its position-embedding range (``pos_embed_max_size``); Flux (and the testbed DiT, a tiny
Flux) at any resolution. The default radius (8) is clamped to a smaller grid with a notice; a radius you
set that is larger than the grid raises a ``ValueError`` naming the largest that works.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ..context import AttentionContext, given_grid, recorded_grid
from ..masks.hilbert import ORDERS, token_order
from ..masks.local import LR_MODES, LocalGeometry, geometry_block_mask, visible_pairs
from ..ops import BlockMask
from ..ops.block_sparse_attention import BACKENDS
from ..registry import LayerInfo, Method, config_from
from .core import CoreAttnProcessor
from .layout import TokenLayout

__all__ = ["HILBERT_LOCAL_FAMILIES", "HilbertLocalAttnProcessor", "HilbertLocalConfig"]

HILBERT_LOCAL_FAMILIES = ("flux", "sd3")
HILBERT_LOCAL_MODELS = ("FluxTransformer2DModel", "SD3Transformer2DModel")
DEFAULT_RADIUS = 8  # Scale-DiT on FLUX
_CLAMPED: set[tuple[int, int]] = set()  # grids the default radius was clamped to (noticed once each)


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class HilbertLocalConfig:
    """Options of hierarchical local attention.

    Attributes:
        radius: HR tokens see HR tokens within ``radius`` tokens in both axes (Scale-DiT: 8 on FLUX).
            ``None`` (default): 8, clamped to a smaller token grid with a one-line notice; a radius you
            set is never changed (one larger than the grid is an error saying the largest that works).
        order: token order inside the processor: ``"hilbert"`` (default), ``"window"`` (the reference's
            16x16 window-first order) or ``"raster"`` (no permutation; for comparisons).
        block_size: engine block size.
        window: window side of ``order="window"``.
        lr_radius: LR guidance tokens see LR tokens within this radius on the LR grid.
        lr_mode: ``"window"``: HR sees the LR tokens under its ``lr_window`` window and the adjacent
            ones (the reference's inference mask; its window borders can leave seams); ``"all"``: HR sees
            every LR token (the LoRA bridge's training setting); ``"sliding"``: the LR tokens within
            ``1.5 * lr_window`` of each HR token (the same reach, centred on the token: no borders).
        lr_window: HR window side of the LR rule.
        lr_ratio: HR/LR ratio when LR tokens follow the HR tokens; ``None`` infers it from the token count.
        granularity: ``"token"``: exactly the rule; ``"block"``: whole 128x128 blocks holding any visible
            pair (a superset of the rule, as the reference's block-sparse kernel runs; fastest).
        backend: engine backend.
    """

    radius: int | None = None
    order: Literal["hilbert", "window", "raster"] = "hilbert"
    block_size: int = 128
    window: int = 16
    lr_radius: int = 2
    lr_mode: Literal["window", "all", "sliding"] = "window"
    lr_window: int = 16
    lr_ratio: int | None = None
    granularity: Literal["token", "block"] = "token"
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.radius is not None:
            _int("radius", self.radius, 1)
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {list(ORDERS)}, got {self.order!r}")
        _int("block_size", self.block_size, 1)
        _int("window", self.window, 1)
        _int("lr_radius", self.lr_radius, 0)
        if self.lr_mode not in LR_MODES:
            raise ValueError(f"lr_mode must be one of {list(LR_MODES)}, got {self.lr_mode!r}")
        _int("lr_window", self.lr_window, 1)
        if self.lr_ratio is not None:
            _int("lr_ratio", self.lr_ratio, 1)
        if self.granularity not in ("token", "block"):
            raise ValueError(f"granularity must be 'token' or 'block', got {self.granularity!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {self.backend!r}")

    def radius_for(self, height: int, width: int) -> int:
        """The radius on a ``height`` x ``width`` token grid: the one set, or the default 8 clamped to the grid."""
        if self.radius is not None:
            return self.radius
        radius = min(DEFAULT_RADIUS, max(height, width, 2) - 1)
        if radius < DEFAULT_RADIUS and (height, width) not in _CLAMPED:
            _CLAMPED.add((height, width))
            print(
                f"diffattn: hilbert_local's default radius {DEFAULT_RADIUS} is larger than the {height}x{width} token "
                f"grid; using {radius} (set the radius option to choose)",
                file=sys.stderr,
            )
        return radius


def lr_grid(height: int, width: int, n_lr: int, ratio: int | None = None) -> tuple[int, int]:
    """The LR grid of ``n_lr`` guidance tokens for an HR grid, from ``ratio`` or inferred from the count.

    Raises:
        ValueError: when no integer HR/LR ratio gives ``n_lr`` tokens.
    """
    if ratio is None:
        r2 = height * width / n_lr if n_lr > 0 else 0.0
        ratio = round(math.sqrt(r2)) if r2 > 0 else 0
    if ratio < 1 or height % ratio or width % ratio or (height // ratio) * (width // ratio) != n_lr:
        raise ValueError(
            f"{n_lr} tokens after the {height}x{width} image tokens are not an LR grid with an integer HR/LR "
            "ratio; LR guidance needs an HR grid that is an integer multiple of the LR grid"
        )
    return height // ratio, width // ratio


class HilbertLocalAttnProcessor(CoreAttnProcessor):
    """Hierarchical local attention as a diffusers attention processor (Flux double/single stream, SD3).

    Set it by hand with the token grid (``height``, ``width`` after patchify: Flux 1024 px -> 64, 64), or let
    ``diffattn.apply(pipe, "hilbert_local", radius=...)`` create one per layer, reading the grid from its
    context. Cross-attention and families it does not know run the stock processor.

    Args:
        height, width: HR token grid; ``None``: read from ``context`` (filled by ``diffattn.apply``).
        config: a :class:`HilbertLocalConfig`, or its fields as keyword options.
        context: the :class:`~diffattn.AttentionContext` holding the grid.
        family: the stock processor family, inferred per module when ``None``.
        text_len: text tokens leading single-stream Flux sequences, for ``set_attn_processor`` by hand
            (``diffattn.apply`` and ``install_processor`` find it per call instead).
    """

    def __init__(
        self,
        height: int | None = None,
        width: int | None = None,
        *,
        config: HilbertLocalConfig | None = None,
        context: AttentionContext | None = None,
        family: str | None = None,
        text_len: int | None = None,
        **options: Any,
    ) -> None:
        super().__init__(family=family, text_len=text_len)
        self.config = config_from(HilbertLocalConfig, config, options, "hilbert_local attention")
        given = given_grid(None, height, width)
        self.grid: tuple[int, int] | None = given[1:] if given is not None else None
        self.context = context if context is not None else AttentionContext()
        self._cache: dict[tuple, tuple[BlockMask, torch.Tensor | None, torch.Tensor | None]] = {}

    def applies(self, attn: nn.Module, layout: TokenLayout) -> bool:
        return not layout.is_cross and layout.family in HILBERT_LOCAL_FAMILIES

    def token_grid(self, n_visual: int, layer: str | None = None) -> tuple[int, int, int, int]:
        """``(height, width, lr_height, lr_width)`` of a call with ``n_visual`` image tokens (LR 0x0: none)."""
        own = (1, *self.grid) if self.grid is not None else None
        f, h, w = recorded_grid(own, self.context, "hilbert_local")
        if f != 1:
            raise ValueError(f"hilbert_local attention is for images; got a token grid of {f} frames")
        if n_visual == h * w:
            return h, w, 0, 0
        if n_visual < h * w:
            where = f" in layer {layer}" if layer else ""
            raise ValueError(
                f"token grid {h}x{w} has {h * w} tokens but the attention call{where} has {n_visual} image tokens"
            )
        lh, lw = lr_grid(h, w, n_visual - h * w, self.config.lr_ratio)
        return h, w, lh, lw

    def geometry(self, n: int, layout: TokenLayout) -> LocalGeometry:
        """The mask geometry of a call with ``n`` tokens."""
        h, w, lh, lw = self.token_grid(n - layout.n_text, layout.layer)
        cfg = self.config
        return LocalGeometry(
            h, w, cfg.radius_for(h, w), cfg.order, cfg.block_size, cfg.window, layout.n_text,
            layout.text_position or "first", lh, lw, cfg.lr_radius, cfg.lr_mode, cfg.lr_window,
        )

    def parts(self, n: int, layout: TokenLayout, device: torch.device) -> tuple[BlockMask, torch.Tensor | None, torch.Tensor | None]:
        """(block mask, permutation, inverse permutation) of the joint sequence, cached by geometry."""
        g = self.geometry(n, layout)
        key = (g, str(device))
        hit = self._cache.get(key)
        if hit is None:
            if g.order == "raster":
                perm = inv = None
            else:
                perm = torch.arange(n)
                perm[g.hr_start : g.hr_start + g.n_hr] = g.hr_start + token_order(g.height, g.width, g.order, g.window)
                if g.n_lr:
                    lr = token_order(g.lr_height, g.lr_width, g.order, g.window)
                    perm[g.lr_start : g.lr_start + g.n_lr] = g.lr_start + lr
                inv = torch.argsort(perm).to(device)
                perm = perm.to(device)
            hit = self._cache[key] = (geometry_block_mask(g, device, self.config.granularity), perm, inv)
        return hit

    def density(self, n: int, layout: TokenLayout) -> float:
        """Exact fraction of (query, key) pairs kept by a call with ``n`` tokens."""
        g = self.geometry(n, layout)
        return visible_pairs(g) / (g.n * g.n)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if attn_mask is not None or layout.text_valid is not None:
            raise ValueError(
                f"hilbert_local attention does not take attention masks (layer {layout.layer} got one); "
                "use the stock processor for masked (e.g. regional) attention"
            )
        bm, perm, inv = self.parts(q.shape[2], layout, q.device)
        if perm is not None:
            q, k, v = (t.index_select(2, perm) for t in (q, k, v))
        out = self.sparse_attention(q, k, v, bm, self.config.backend)
        return out if inv is None else out.index_select(2, inv)

    def __repr__(self) -> str:
        return f"HilbertLocalAttnProcessor(grid={self.grid}, config={self.config})"


# ----- registry -------------------------------------------------------------------------------------------


def _make(config: HilbertLocalConfig, ctx: AttentionContext, layer: LayerInfo) -> HilbertLocalAttnProcessor | None:
    if layer.is_cross or layer.family not in HILBERT_LOCAL_FAMILIES:
        return None
    return HilbertLocalAttnProcessor(config=config, context=ctx, family=layer.family)


def _geometry(config: HilbertLocalConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None, block_size: int) -> LocalGeometry:
    f, h, w = grid
    if f != 1:
        raise ValueError(f"hilbert_local attention is for images; got a token grid of {f} frames")
    return LocalGeometry(
        h, w, config.radius_for(h, w), config.order, block_size, config.window, n_text, text_position or "first",
        0, 0, config.lr_radius, config.lr_mode, config.lr_window,
    )


def _block_mask(
    config: HilbertLocalConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None, block_size: int
) -> BlockMask:
    """The mask over the *permuted* sequence (what the engine runs inside the processor)."""
    return geometry_block_mask(_geometry(config, grid, n_text, text_position, block_size), granularity=config.granularity)


def _token_density(
    config: HilbertLocalConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None, block_size: int
) -> float:
    g = _geometry(config, grid, n_text, text_position, block_size)
    return visible_pairs(g) / (g.n * g.n)


METHOD = Method(
    name="hilbert_local",
    config=HilbertLocalConfig,
    families=HILBERT_LOCAL_FAMILIES,
    make_processor=_make,
    models=HILBERT_LOCAL_MODELS,
    description="hierarchical local attention in Hilbert order (Scale-DiT): 2-D neighbourhoods as dense blocks",
    block_mask=_block_mask,
    token_density=_token_density,
    per_layer=True,
)
