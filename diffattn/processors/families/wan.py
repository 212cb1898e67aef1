"""``WanAttnProcessor`` on ``WanAttention``: Wan 2.1 / 2.2 self- and cross-attention (I2V included)."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor
from torch import nn

from ..layout import TokenLayout
from .base import (
    WAN_TEXT_CONTEXT,
    Attend,
    AttnCall,
    Family,
    head_mask,
    layer_name,
    to_heads_first,
)


def _wan_rotary(
    hidden_states: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor
) -> torch.Tensor:
    # Copy of the closure inside WanAttnProcessor.__call__.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden_states)


class WanFamily(Family):
    """``WanAttnProcessor``: attn1 self-attention over video tokens, attn2 cross-attention (+ I2V image k/v)."""

    name = "wan"
    stock_cls = WanAttnProcessor

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        # WanAttention.forward passes these five positionally.
        return proc(attn, call.hidden_states, call.encoder_hidden_states, call.attention_mask, call.rotary)

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        return TokenLayout(self.name, is_cross=call.encoder_hidden_states is not None, layer=layer_name(attn))

    def run(self, attn: nn.Module, call: AttnCall, layout: TokenLayout, attend: Attend) -> torch.Tensor:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        encoder_hidden_states_img = None
        if attn.add_k_proj is not None:
            image_context_length = encoder_hidden_states.shape[1] - WAN_TEXT_CONTEXT
            encoder_hidden_states_img = encoder_hidden_states[:, :image_context_length]
            encoder_hidden_states = encoder_hidden_states[:, image_context_length:]

        kv_source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        query = attn.to_q(hidden_states)
        key = attn.to_k(kv_source)
        value = attn.to_v(kv_source)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if call.rotary is not None:
            query = _wan_rotary(query, *call.rotary)
            key = _wan_rotary(key, *call.rotary)

        hidden_states_img = None
        if encoder_hidden_states_img is not None:
            key_img = attn.add_k_proj(encoder_hidden_states_img)
            value_img = attn.add_v_proj(encoder_hidden_states_img)
            key_img = attn.norm_added_k(key_img)
            key_img = key_img.unflatten(2, (attn.heads, -1))
            value_img = value_img.unflatten(2, (attn.heads, -1))

            # The image-prompt branch is a second cross-attention with the same queries (stock: no mask).
            q, k, v = to_heads_first(query, key_img, value_img)
            hidden_states_img = attend(q, k, v, layout, None).transpose(1, 2)
            hidden_states_img = hidden_states_img.flatten(2, 3)
            hidden_states_img = hidden_states_img.type_as(query)

        q, k, v = to_heads_first(query, key, value)
        mask = head_mask(call.attention_mask, q.shape[0], k.shape[2])
        hidden_states = attend(q, k, v, layout, mask).transpose(1, 2)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        if hidden_states_img is not None:
            hidden_states = hidden_states + hidden_states_img

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states
