"""``JointAttnProcessor2_0``: SD3 / SD3.5 joint text-image attention."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention_processor import (
    Attention,
    JointAttnProcessor2_0,
)
from torch import nn

from ..layout import TokenLayout
from .base import (
    Attend,
    AttnCall,
    Family,
    layer_name,
    text_run_position,
)


class SD3Family(Family):
    """``JointAttnProcessor2_0``: text tokens appended after the image tokens."""

    name = "sd3"
    stock_cls = JointAttnProcessor2_0

    def call_stock(self, proc: Any, attn: nn.Module, call: AttnCall) -> Any:
        return proc(
            attn,
            call.hidden_states,
            encoder_hidden_states=call.encoder_hidden_states,
            attention_mask=call.attention_mask,
        )

    def layout(self, attn: nn.Module, call: AttnCall) -> TokenLayout:
        if call.encoder_hidden_states is None:  # SD3.5 attn2: plain self-attention over image tokens
            return TokenLayout(self.name, layer=layer_name(attn))
        n_text = call.encoder_hidden_states.shape[1]
        return TokenLayout(
            self.name, n_text=n_text, text_position=text_run_position(n_text, "last"), layer=layer_name(attn)
        )

    def run(self, attn: Attention, call: AttnCall, layout: TokenLayout, attend: Attend) -> Any:
        hidden_states, encoder_hidden_states = call.hidden_states, call.encoder_hidden_states
        residual = hidden_states
        batch_size = hidden_states.shape[0]

        query = attn.to_q(hidden_states)
        key = attn.to_k(hidden_states)
        value = attn.to_v(hidden_states)

        inner_dim = key.shape[-1]
        head_dim = inner_dim // attn.heads
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if encoder_hidden_states is not None:

            def split_heads(x: torch.Tensor) -> torch.Tensor:
                return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

            encoder_query = split_heads(attn.add_q_proj(encoder_hidden_states))
            encoder_key = split_heads(attn.add_k_proj(encoder_hidden_states))
            encoder_value = split_heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                encoder_query = attn.norm_added_q(encoder_query)
            if attn.norm_added_k is not None:
                encoder_key = attn.norm_added_k(encoder_key)
            query = torch.cat([query, encoder_query], dim=2)
            key = torch.cat([key, encoder_key], dim=2)
            value = torch.cat([value, encoder_value], dim=2)

        # The stock processor ignores attention_mask (SDPA without a mask).
        hidden_states = attend(query, key, value, layout, None)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)

        if encoder_hidden_states is not None:
            hidden_states, encoder_hidden_states = (
                hidden_states[:, : residual.shape[1]],
                hidden_states[:, residual.shape[1] :],
            )
            if not attn.context_pre_only:
                encoder_hidden_states = attn.to_add_out(encoder_hidden_states)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if encoder_hidden_states is not None:
            return hidden_states, encoder_hidden_states
        return hidden_states
