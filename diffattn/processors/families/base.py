"""What every family shares: the call record, the :class:`Family` contract and the mask helpers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..layout import TextPosition, TokenLayout

# Attributes recorded on attention modules (plain python attributes, not buffers: they never reach a state dict).
NAME_ATTR = "_diffattn_name"
FAMILY_ATTR = "_diffattn_family"
TEXT_ONLY_ATTR = "_diffattn_text_only"

# Wan hardcodes the text context length of its I2V cross-attention: the first `len - 512` encoder tokens are
# the image context.
WAN_TEXT_CONTEXT = 512

Attend = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout, "torch.Tensor | None"], torch.Tensor
]

SUPPORTED_MODELS = (
    "UNet2DConditionModel / ControlNetModel / PixArtTransformer2DModel / AutoencoderKL (Attention + AttnProcessor2_0), "
    "SD3Transformer2DModel (Attention + JointAttnProcessor2_0), FluxTransformer2DModel (FluxAttention), "
    "WanTransformer3DModel (WanAttention), HunyuanVideoTransformer3DModel (Attention + HunyuanVideoAttnProcessor2_0), "
    "MochiTransformer3DModel (MochiAttention), CogVideoXTransformer3DModel (Attention + CogVideoXAttnProcessor2_0)"
)


@dataclass
class AttnCall:
    """The arguments of one processor call, whatever names the calling module used for them."""

    hidden_states: torch.Tensor
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    rotary: Any = None  # `image_rotary_emb` (Flux, HunyuanVideo, Mochi, CogVideoX) or `rotary_emb` (Wan)
    temb: torch.Tensor | None = None  # only read by `spatial_norm` in the "sd" family
    text_len: int | None = None  # text tokens at the start of a single-stream Flux sequence


def head_mask(mask: torch.Tensor | None, batch: int, n_keys: int) -> torch.Tensor | None:
    """What diffusers' native dispatch backend does to a mask before SDPA: (batch, keys) -> (batch, 1, 1, keys)."""
    if mask is not None and mask.ndim == 2 and mask.shape[0] == batch and mask.shape[1] == n_keys:
        return mask.unsqueeze(1).unsqueeze(1)
    return mask


def valid_key_counts(mask: torch.Tensor | None, batch: int, keys: slice) -> torch.Tensor | None:
    """Per-sample number of keys in ``keys`` that ``mask`` lets through, read from the first query row.

    Only meaningful for key-padding masks (HunyuanVideo's ``(batch, 1, 1, tokens)``, its token refiner's
    ``(batch, 1, tokens, tokens)`` whose first row is the key mask); stays on the mask's device, no sync.
    """
    if mask is None:
        return None
    m = mask
    while m.ndim > 2:
        m = m[:, 0]
    m = m[:, keys]
    valid = m if m.dtype == torch.bool else m == 0  # additive masks: 0 keeps, negative drops
    counts = valid.sum(-1)
    if counts.shape[0] != batch:
        counts = counts.expand(batch) if counts.shape[0] == 1 else counts.reshape(batch, -1)[:, 0]
    return counts


def to_heads_first(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    # dispatch_attention_fn takes (batch, tokens, heads, dim); cores take (batch, heads, tokens, dim).
    return tuple(x.transpose(1, 2) for x in xs)


class Family:
    """One stock processor: its layout, its math with a pluggable core, and how to call the stock one."""

    name: ClassVar[str]
    stock_cls: ClassVar[type]

    def stock_type(self, attn: nn.Module | None = None) -> type:
        """The stock processor class diffusers uses for this family (on ``attn``, when given)."""
        return self.stock_cls

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        raise NotImplementedError

    def run(self, attn: nn.Module, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        raise NotImplementedError

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        return proc(
            attn,
            call.hidden_states,
            encoder_hidden_states=call.encoder_hidden_states,
            attention_mask=call.attention_mask,
            image_rotary_emb=call.rotary,
        )


def layer_name(attn: nn.Module) -> str | None:
    """The qualified name ``set_processor_names`` recorded on ``attn`` (for messages and per-layer state)."""
    return getattr(attn, NAME_ATTR, None)


def text_run_position(n_text: int, where: TextPosition) -> TextPosition | None:
    """``where`` when the call has text tokens, else ``None`` (``TokenLayout``'s "no text run")."""
    return where if n_text else None
