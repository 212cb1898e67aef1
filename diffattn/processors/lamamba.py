"""``lamamba``: LaMamba attention for pretrained image transformers (Flux, SD3, PixArt, the testbed DiT).

Self-attention over image tokens becomes *window attention* (Swin windows of ``window_size`` tokens
on the token grid, shifted by half a window on every second transformer block) plus an SS2D branch
(the 2D selective scan of LaMamba-Diff, :class:`~diffattn.models.SS2D`) on the image values, whose
output is multiplied by a per-channel gate that starts at **zero**: right after ``apply`` the model
equals window-attention-only, and fine-tuning (the new parameters live in the processor, i.e. under
``<attention module>.processor``; LoRA on the rest) lets the global branch grow in.

- Image queries attend to the image keys of their window and to every text key (joint attention of
  Flux / SD3: the prompt stays visible to every image token); text queries keep dense attention over
  everything. Padded text keys (``encoder_attention_mask``) are masked.
- Cross-attention (PixArt ``attn2``), calls with an attention mask other than text padding, and video
  grids (more than one frame) run the stock attention.
- Grid sizes that are not multiples of the window are padded and cropped (padded keys masked), as in
  :class:`~diffattn.models.WindowAttention`.

The processor is an ``nn.Module`` (as diffusers' IP-Adapter processors are): ``restore`` takes it, and
its parameters, away again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..context import AttentionContext, given_grid, layer_grid
from ..models.ss2d import SS2D
from ..ops.window_partition import merge_windows, partition_windows, window_mask, window_plan
from ..registry import LayerInfo, Method, config_from
from .core import CoreAttnProcessor
from .families import FAMILY_ATTR, infer_family
from .layout import TokenLayout, dense_core

__all__ = ["LAMAMBA_MODELS", "LaMambaAttnProcessor", "LaMambaConfig", "window_joint_attention"]

LAMAMBA_FAMILIES = ("sd", "sd3", "flux")
LAMAMBA_MODELS = (
    "FluxTransformer2DModel",
    "SD3Transformer2DModel",
    "PixArtTransformer2DModel",
    "DiTTransformer2DModel",
)
_BLOCK = re.compile(r"(?:^|\.)(?:single_transformer_blocks|transformer_blocks|blocks)\.(\d+)(?:\.|$)")


@dataclass(frozen=True)
class LaMambaConfig:
    """Options of the ``lamamba`` method.

    Attributes:
        window_size: window side in tokens (8 in LaMamba-Diff).
        shift: shift the windows by half a window on odd-numbered transformer blocks.
        d_state: SS2D state size (1 in LaMamba-Diff).
        ssm_ratio: SS2D inner width / attention width (LaMamba-Diff uses 2; 1 keeps the added parameters
            near ``3 x width^2`` per layer).
        ssm: add the SS2D branch (gate initialised at zero); ``False`` gives window attention only.
    """

    window_size: int = 8
    shift: bool = True
    d_state: int = 1
    ssm_ratio: float = 1.0
    ssm: bool = True

    def __post_init__(self) -> None:
        for name in ("window_size", "d_state"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        r = self.ssm_ratio
        if isinstance(r, bool) or not isinstance(r, int | float) or not r > 0:
            raise ValueError(f"ssm_ratio must be a number > 0, got {r!r}")
        for name in ("shift", "ssm"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")


def window_joint_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    grid: tuple[int, int],
    window: int,
    shift: int = 0,
    text_k: torch.Tensor | None = None,
    text_v: torch.Tensor | None = None,
    text_keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Window attention of image tokens ``(b, heads, h*w, d)`` (raster order) over their window's keys
    and, when given, the text keys ``(b, heads, t, d)`` (``text_keep``: ``(b, t)`` bool, valid keys).

    Returns ``(b, heads, h*w, d)``. Windows by reshaping; padded keys and the shifted-window rule masked.
    """
    b, nh, n, d = q.shape
    h, w = grid
    if h * w != n:
        raise ValueError(f"grid {grid} has {h * w} tokens, q has {n}")
    ws_h, ws_w, sh, sw, H, W = window_plan(h, w, window, shift)

    def windows(t: torch.Tensor) -> torch.Tensor:
        t = t.reshape(b * nh, h, w, d)
        if (H, W) != (h, w):
            t = F.pad(t, (0, 0, 0, W - w, 0, H - h))
        if sh or sw:
            t = torch.roll(t, shifts=(-sh, -sw), dims=(1, 2))
        t = partition_windows(t, ws_h, ws_w)
        return t.view(b, nh, *t.shape[1:])  # (b, heads, nW, N, d)

    qw, kw, vw = windows(q), windows(k), windows(v)
    nw, nn_ = qw.shape[2], qw.shape[3]
    allowed = window_mask(h, w, window, shift)
    allowed = allowed.to(q.device) if allowed is not None else None
    if text_k is not None:
        t = text_k.shape[2]
        kw = torch.cat([kw, text_k[:, :, None].expand(b, nh, nw, t, d)], dim=3)
        vw = torch.cat([vw, text_v[:, :, None].expand(b, nh, nw, t, d)], dim=3)
        img = allowed if allowed is not None else torch.ones(nw, nn_, nn_, dtype=torch.bool, device=q.device)
        img = img.expand(b, nw, nn_, nn_)
        txt = (
            text_keep.to(q.device)[:, None, None, :].expand(b, nw, nn_, t)
            if text_keep is not None
            else torch.ones(b, nw, nn_, t, dtype=torch.bool, device=q.device)
        )
        allowed = torch.cat([img, txt], dim=-1)[:, None]  # (b, 1, nW, N, N + t)
    bias = None
    if allowed is not None:
        # finite fill: padded query rows that see nothing stay finite (they are cropped away)
        neg = torch.full((), torch.finfo(q.dtype).min / 2, dtype=q.dtype, device=q.device)
        bias = torch.where(allowed, torch.zeros((), dtype=q.dtype, device=q.device), neg)
    out = F.scaled_dot_product_attention(qw, kw, vw, attn_mask=bias)  # (b, heads, nW, N, d)
    out = merge_windows(out.reshape(b * nh, nw, nn_, d), ws_h, ws_w, H, W)
    if sh or sw:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :h, :w].reshape(b, nh, n, d)


class LaMambaAttnProcessor(CoreAttnProcessor, nn.Module):
    """Window attention + a zero-gated SS2D branch on image tokens; see the module docstring.

    Args:
        dim: attention width (``heads * head_dim``) of the layer: the SS2D branch's width.
        config: a :class:`LaMambaConfig`; ``**options`` are its fields instead.
        context: the :class:`~diffattn.context.AttentionContext` ``apply`` fills (token grid).
        height, width: the image token grid after patchify, when set by hand.
        shift: this layer's window shift (``window_size // 2`` on odd blocks with ``apply``).
        family, text_len: as for :class:`~diffattn.processors.CoreAttnProcessor`.
    """

    def __init__(
        self,
        dim: int,
        config: LaMambaConfig | None = None,
        *,
        context: AttentionContext | None = None,
        height: int | None = None,
        width: int | None = None,
        shift: int = 0,
        family: str | None = None,
        text_len: int | None = None,
        **options: Any,
    ) -> None:
        nn.Module.__init__(self)
        CoreAttnProcessor.__init__(self, family=family, text_len=text_len)
        self.config = config_from(LaMambaConfig, config, options, "lamamba attention")
        if not 0 <= shift < self.config.window_size:
            raise ValueError(f"shift must be in [0, window_size={self.config.window_size}), got {shift}")
        self.context = context
        self._own_grid = given_grid(None, height, width)
        self.shift = shift
        if self.config.ssm:
            self.ss2d = SS2D(dim, d_state=self.config.d_state, ssm_ratio=self.config.ssm_ratio)
            self.gate = nn.Parameter(torch.zeros(dim))
        else:
            self.ss2d, self.gate = None, None

    context_parallel = (
        "lamamba's window attention and SS2D branch need the whole image grid on one rank, and the SS2D "
        "branch mixes all channels (every head), so neither a shard of the tokens nor of the heads will do"
    )

    def family_of(self, attn: nn.Module, has_rotary: bool | None = None) -> str:
        return self.family or getattr(attn, FAMILY_ATTR, None) or infer_family(attn, has_rotary=has_rotary)

    def applies(self, attn: nn.Module, layout: TokenLayout) -> bool:
        return not layout.is_cross and layout.family in LAMAMBA_FAMILIES

    def grid(self, n_visual: int) -> tuple[int, int] | None:
        """``(h, w)`` of the image tokens, or None for a multi-frame grid (stock attention there)."""
        f, h, w = layer_grid(n_visual, self._own_grid, self.context, "lamamba")
        return (h, w) if f == 1 else None

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layout: TokenLayout,
        attn_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        n = q.shape[2]
        n_visual = layout.n_visual(n)
        if layout.is_cross or n_visual <= 0 or attn_mask is not None or k.shape[2] != n:
            return dense_core(q, k, v, layout, attn_mask)
        grid = self.grid(n_visual)
        if grid is None:
            return dense_core(q, k, v, layout, attn_mask)
        vis = layout.visual_slice(n)
        text_k = text_v = keep = None
        if layout.n_text:
            text = slice(0, layout.n_text) if layout.text_position == "first" else slice(n - layout.n_text, n)
            text_k, text_v = k[:, :, text], v[:, :, text]
            if layout.text_valid is not None:
                keep = (
                    torch.arange(layout.n_text, device=q.device)[None]
                    < layout.text_valid.to(q.device)[:, None]
                )
        out = window_joint_attention(
            q[:, :, vis],
            k[:, :, vis],
            v[:, :, vis],
            grid,
            self.config.window_size,
            self.shift,
            text_k,
            text_v,
            keep,
        )
        if self.ss2d is not None:
            b, nh, nv, d = out.shape
            vv = v[:, :, vis].transpose(1, 2).reshape(b, *grid, nh * d)
            branch = self.ss2d(vv.to(self.gate.dtype)) * self.gate
            out = out + branch.reshape(b, nv, nh, d).transpose(1, 2).to(out.dtype)
        if not layout.n_text:
            return out
        key_mask = None
        if keep is not None:
            full = torch.ones(q.shape[0], n, dtype=torch.bool, device=q.device)
            full[:, text] = keep
            key_mask = full[:, None, None, :]
        out_text = F.scaled_dot_product_attention(q[:, :, text], k, v, attn_mask=key_mask)
        return torch.cat([out_text, out] if layout.text_position == "first" else [out, out_text], dim=2)

    def extra_repr(self) -> str:
        return f"family={self.family!r}, shift={self.shift}, config={self.config}"


def _width(module: nn.Module) -> int:
    to_q = getattr(module, "to_q", None)
    to_q = getattr(to_q, "base_layer", to_q)  # a projection wrapped by a LoRA (peft)
    if isinstance(to_q, nn.Linear):
        return to_q.out_features
    raise ValueError(f"{type(module).__name__} has no to_q linear: cannot size the SS2D branch")


def _make(config: LaMambaConfig, ctx: AttentionContext, layer: LayerInfo) -> LaMambaAttnProcessor | None:
    if layer.is_cross or layer.family not in LAMAMBA_FAMILIES or layer.model not in LAMAMBA_MODELS:
        return None
    m = _BLOCK.search(layer.name)
    shift = config.window_size // 2 if (config.shift and m is not None and int(m.group(1)) % 2) else 0
    proc = LaMambaAttnProcessor(_width(layer.module), config, context=ctx, shift=shift, family=layer.family)
    to_q = layer.module.to_q
    to_q = getattr(to_q, "base_layer", to_q)  # under a LoRA (peft)
    ref = to_q.weight
    # layerwise casting stores the weights in e.g. float8 and computes in its compute dtype: so do we
    registry = getattr(to_q, "_diffusers_hook", None)
    casting = registry.get_hook("layerwise_casting") if registry is not None else None
    return proc.to(device=ref.device, dtype=casting.compute_dtype if casting is not None else ref.dtype)


def _attention(
    config: LaMambaConfig, grid: tuple[int, int, int], n_text: int, text_position: str | None
) -> Any:
    """The window part on a bare (q, k, v) shape, for ``diffattn bench`` (the SS2D branch needs weights)."""
    f, h, w = grid
    layout = TokenLayout("sd", n_text=n_text, text_position=text_position if n_text else None)
    if f != 1:  # video grids keep the stock attention, as in the processor
        return lambda q, k, v: dense_core(q, k, v, layout, None)
    proc = LaMambaAttnProcessor(1, LaMambaConfig(**{**config.__dict__, "ssm": False}), height=h, width=w)
    return lambda q, k, v: proc.attention(q, k, v, layout, None)


METHOD = Method(
    name="lamamba",
    config=LaMambaConfig,
    families=LAMAMBA_FAMILIES,
    make_processor=_make,
    models=LAMAMBA_MODELS,
    attention=_attention,
    description="LaMamba: window attention + zero-gated SS2D (Mamba) branch on image tokens; text stays dense",
)
