"""What an attention core needs to know about the joint token sequence it is given."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

TextPosition = Literal["first", "last"]


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one attention call sit.

    ``q``/``k``/``v`` handed to a core are ``(batch, heads, tokens, head_dim)``. Visual tokens are in
    the model's own order (raster inside a frame, frame after frame). Text tokens, when a model
    attends jointly over text and visual tokens, are a contiguous run at ``text_position``.

    Attributes:
        family: the stock processor family the call came from (``"sd"``, ``"sd3"``, ``"flux"``,
            ``"wan"``, ``"hunyuan-video"``, ``"mochi"``, ``"cogvideox"``).
        is_cross: queries are visual tokens and keys are text (or image-prompt) tokens only.
        n_text: text tokens in the joint key sequence (0 for pure self-attention and cross-attention).
        text_position: ``"first"``/``"last"`` when ``n_text > 0``, else ``None``.
        text_valid: ``(batch,)`` number of valid (unpadded) text tokens per sample, counted from the
            start of the text run; ``None`` when all are valid.
        layer: qualified name of the attention module, when known (``set_processor_names``).
    """

    family: str
    is_cross: bool = False
    n_text: int = 0
    text_position: TextPosition | None = None
    text_valid: torch.Tensor | None = None
    layer: str | None = None

    def n_visual(self, n_tokens: int) -> int:
        """Visual tokens in a call of ``n_tokens`` tokens."""
        return n_tokens - self.n_text

    def visual_slice(self, n_tokens: int) -> slice:
        """Where the visual tokens sit in a call of ``n_tokens`` tokens."""
        if self.text_position == "first":
            return slice(self.n_text, n_tokens)
        return slice(0, n_tokens - self.n_text)


# A core replaces the attention product of a stock processor: it receives the projected, normalised,
# rotated (batch, heads, tokens, head_dim) q/k/v and the mask the stock processor would have passed to
# SDPA, and returns the (batch, heads, q_tokens, head_dim) output.
AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, TokenLayout, "torch.Tensor | None"], torch.Tensor]


def dense_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: TokenLayout,
    attn_mask: torch.Tensor | None = None,
    backend: Any = None,
) -> torch.Tensor:
    """Plain attention, what every stock processor computes, through diffusers' dispatcher: the backend
    ``set_attention_backend`` chose (``backend``: a processor's own, else the active one; native SDPA unless
    the user set another)."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    # the dispatcher takes (batch, tokens, heads, dim)
    out = dispatch_attention_fn(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, backend=backend
    )
    return out.transpose(1, 2)
